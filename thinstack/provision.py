"""Whole disks (or a loop device) into LVM physical volumes, optionally under an md raid1, and a
volume group on them, through blivet.

blivet is imported here only, and only inside functions: loading it (libblockdev's plugins, then
a udev scan of every block device) takes a second or more that commands which don't provision
disks must not pay. Everything above this module sees plain paths; rolling back what was made
here is the caller's (pools.py), with the plain tools, so that recovery never needs blivet.
Whatever blivet (or libblockdev under it) raises reaches the user as one thinstack line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import RUNNER, CommandError, Runner
from thinstack.errors import NotFound, Refused, ThinstackError


@dataclass
class PreparedVG:
    """A volume group scheduled in blivet but not yet written: nothing on disk has changed."""

    pvs: list[str]  # the devices that become PVs: the disks, the md array, or the loop device
    _storage: Any  # a blivet.Blivet (blivet is imported only when provisioning)

    def create(self) -> None:
        """Write it all: md superblocks, PV labels, the VG metadata."""
        import blivet.udev

        with blivet_errors(f"writing the volume group on {', '.join(self.pvs)}"):
            self._storage.do_it()
            # Later commands (lvcreate, pvs) look devices up through udev; let it catch up.
            blivet.udev.settle()


# blivet models whole disks, md and loops over files; for what it does not (multipath, LUKS, a
# loop over a block device: "device is too small"), the VG can be made by hand.
HINT = "; or make the volume group yourself (pvcreate, vgcreate) and give no devices"


@contextmanager
def blivet_errors(what: str) -> Iterator[None]:
    """blivet's failures (its StorageError tree, but also ValueError, GLib.Error, ...) as one
    ThinstackError line saying what was being done; thinstack's own errors pass as they are."""
    try:
        yield
    except ThinstackError:
        raise
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ThinstackError(f"{what}: {detail}{HINT}") from None


def prepare_vg(vg: str, devices: list[str], *, md_name: str | None = None) -> PreparedVG:
    """Schedule `vg` on `devices` (each a whole, blank block device); with md_name, on an md raid1
    of the two devices, named md_name. Refuses devices that hold anything: a partition table, a
    filesystem, an old PV or md superblock, or devices built on top of them."""
    with blivet_errors(f"preparing volume group {vg} on {', '.join(devices)}"):
        blivet = _blivet()
        from blivet.formats import get_format

        storage = blivet.Blivet()
        storage.reset()
        disks = [_blank_device(storage, path) for path in devices]
        for disk in disks:
            storage.format_device(disk, get_format("mdmember" if md_name else "lvmpv"))
        if md_name:
            md = storage.new_mdarray(name=md_name, level="raid1", parents=disks,
                                     total_devices=2, member_devices=2, fmt_type="lvmpv")
            storage.create_device(md)
            pvs = [md]
        else:
            pvs = disks
        storage.create_device(storage.new_vg(name=vg, parents=pvs))
        return PreparedVG(pvs=[pv.path for pv in pvs], _storage=storage)


def require_thin_pool(runner: Runner = RUNNER, misc: Path = Path("/proc/misc")) -> None:
    """ThinstackError with what to do when this kernel cannot run a thin pool (a container, a
    CI runner): rather than LVM's own failure, ending in "Run `lvcreate --help'"."""
    fix = "this kernel has no dm-thin-pool target; run it inside `thinstack lab run`"
    try:
        has_dm = any(line.split()[-1:] == ["device-mapper"] for line in misc.open())
    except OSError:
        has_dm = True  # no /proc to ask: let dmsetup say
    if not has_dm:
        raise ThinstackError(f"{fix} (no device-mapper driver)")
    dm = DeviceMapper(runner)
    try:
        if "thin-pool" in dm.targets():
            return
        runner.run(["modprobe", "dm-thin-pool"], timeout=30)  # modules load on first use, too
        if "thin-pool" in dm.targets():
            return
    except CommandError as e:
        raise ThinstackError(f"{fix} ({e})") from None
    raise ThinstackError(fix)


def _blank_device(storage, path: str):
    real = os.path.realpath(path)
    device = storage.devicetree.get_device_by_path(real)
    if device is None:
        raise NotFound(f"{path}: no such block device")
    if device.format.type is not None or device.children:
        what = device.format.type or \
            "devices built on it: " + ", ".join(c.name for c in device.children)
        raise Refused(f"{path} is in use ({what}); thinstack only takes blank devices "
                      f"(wipe it with `wipefs -a {path}` if its contents are not needed)")
    return device


def _blivet():
    """blivet, loaded quietly and without D-Bus."""
    import gi

    gi.require_version("BlockDev", "2.0")
    from gi.repository import BlockDev

    # Debian's libblockdev-lvm-dbus configures the lvm plugin to go through lvmdbusd on the system
    # bus, which early boot and the lab lack (and which prints CRITICAL lines when it is missing).
    # Loading the plugins that run the tools directly first makes blivet's own initialisation
    # (which does not reload loaded plugins) keep them.
    plugins = []
    for plugin, soname in ((BlockDev.Plugin.LVM, "libbd_lvm.so.2"),
                           (BlockDev.Plugin.MDRAID, "libbd_mdraid.so.2")):
        spec = BlockDev.PluginSpec()
        spec.name, spec.so_name = plugin, soname
        plugins.append(spec)
    BlockDev.switch_init_checks(False)
    BlockDev.try_init(plugins, None)
    # blivet asks libblockdev for every plugin it knows (btrfs, nvdimm, ...); those not installed
    # are GLib warnings on stderr ("failed to load module btrfs") about features thinstack never
    # uses. Other warnings still show.
    from gi.repository import GLib

    def quiet(domain: str | None, level: object, message: str, data: object) -> None:
        if not message.startswith("failed to load module "):
            GLib.log_default_handler(domain, level, message, data)

    GLib.log_set_handler(None, GLib.LogLevelFlags.LEVEL_WARNING, quiet, None)
    # blivet logs its scan (down to DEBUG, with warnings such as "libstoragemgmt functionality
    # not available") and routes Python warnings into logging: none of it is ours to show;
    # thinstack reports failures through its own errors.
    for name in ("blivet", "program", "testdata", "py.warnings"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    import blivet

    return blivet
