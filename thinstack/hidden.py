"""Block devices that show an image's bytes while a live import copies it in, and that LVM must
therefore never scan: the nbd device qemu-nbd serves the image on, the clone's destination and
the clone itself (VG-NAME before it becomes the LV).

An image is the guest's disk, so it often holds the guest's own LVM: a PV, and a VG named as
the installer named it (`ubuntu-vg`, `debian-vg`, `rhel`, ... or the host's own VG's name).
LVM scans every block device it is not told to skip. Seen by the host's LVM, such a VG shows
in `vgs`, and when its name is a thinstack VG's, LVM refuses every command that names that VG
("Use --select vg_uuid=<uuid> in place of the VG name"): every thinstack command on it failed,
and the live import itself could not finish. So every LVM command thinstack runs carries a
device filter that rejects these devices, by every name LVM knows them by, ahead of the
host's own `devices/filter` (its `global_filter` still applies as it is).

LVM finds LVs themselves unfit to scan (`scan_lvs = 0`), and plain imports write into LVs, so
nothing but a live import's devices needs this.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from thinstack.state import run_dir

DEST_SUFFIX = "-clonedest"  # a single dash: no LV's dm name can end so (LVM doubles them)
_SAFE = re.compile(r"[A-Za-z0-9_/:-]")


def server_dir() -> Path:
    """Where the pid files of the live imports' qemu-nbd servers are."""
    return run_dir() / "live"


def nbd_of(pid: int) -> str | None:
    """The nbd device a qemu-nbd process serves (the kernel names the serving thread)."""
    for dev in Path("/sys/block").glob("nbd*"):
        try:
            served = (dev / "pid").read_text().strip()
        except OSError:
            continue
        if Path(f"/proc/{pid}/task/{served}").exists():
            return f"/dev/{dev.name}"
    return None


def devices() -> list[str]:
    """The paths of the devices that show a live import's image now (none: nothing to hide,
    at the cost of a directory listing or two)."""
    found = []
    try:
        names = os.listdir("/dev/mapper")
    except OSError:
        names = []
    for name in names:
        if name.endswith(DEST_SUFFIX):
            found += [f"/dev/mapper/{name}", f"/dev/mapper/{name[:-len(DEST_SUFFIX)]}"]
    for pid_file in server_dir().glob("*.pid"):
        if pid_file.name.endswith(".pacer.pid"):
            continue
        try:
            nbd = nbd_of(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
        if nbd is not None:
            found.append(nbd)
    return found


def aliases(paths: Iterable[str], root: str = "/dev") -> list[str]:
    """Every name under `root` for the block devices at `paths`: LVM scans /dev and knows a
    device by all of them (its node, /dev/mapper/..., /dev/VG/LV, udev's /dev/disk/by-...)."""
    devnos = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            devnos.add(st.st_rdev)
    names = []
    for folder, dirs, files in os.walk(root):  # symlinked folders (/dev/fd) are not followed
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev in devnos:
                names.append(path)
    return sorted(names)


def pattern(path: str) -> str:
    """LVM's filter pattern rejecting exactly `path`. A character other than a letter, digit,
    `_ / : -` becomes `.` (any), so no quote or regex character reaches LVM's parsers; it can
    only widen the pattern to names that differ from a hidden device's in such a character."""
    return "r|^" + "".join(c if _SAFE.fullmatch(c) else "." for c in path) + "$|"


def host_patterns(lvmconfig_output: str) -> list[str]:
    """The host's `devices/filter` patterns, verbatim, from `lvmconfig --typeconfig full
    devices/filter` (`filter=["a|...|","r|...|"]`)."""
    _, _, value = lvmconfig_output.partition("=")
    return re.findall(r'"((?:[^"\\]|\\.)*)"', value)


def config(hidden: Iterable[str], host: Iterable[str]) -> str:
    """The `--config` that rejects the hidden names first, then filters as the host does."""
    patterns = [pattern(p) for p in hidden] + list(host)
    return "devices{filter=[" + ",".join(f'"{p}"' for p in patterns) + "]}"
