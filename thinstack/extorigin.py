"""Clones of a block device outside the volume group: thin volumes whose external origin LVM
cannot name.

LVM only accepts an LV of the same VG as a thin volume's external origin. But dm-thin keeps no
trace of the origin in the pool's metadata: the origin is a parameter of the thin target's
table, given at each activation. So LVM owns the thin volume (its thin id, size and space in the
pool, its removal), and thinstack owns its activation:

- the LV is made inactive and with LVM's activation-skip flag, so neither `vgchange -ay` nor
  boot-time autoactivation brings it up without its origin (which would read zeros where the
  origin's bytes are, and copy zeros into every partly written block);
- thinstack activates it itself, as the dm device LVM would use (`VG-NAME`, so an `lvchange -ay
  -K` fails on the name instead of making a second view), but with a uuid of its own
  (`TS-EXT-<lv uuid>`), so LVM sees the LV as inactive and never reloads a table without the
  origin into it;
- the origin's path and size are LVM tags on the LV, committed with it; an origin that is
  missing, or of another size, keeps the clone down rather than showing it other bytes;
- the origin is made read-only in the kernel (`blockdev --setro`) at the clone and at every
  activation; a device-mapper origin must already be read-only, since a table reload would
  undo a flag set from outside.

Because LVM sees these LVs as inactive, anything that removes one must first take down the
device here (`release`): LVM would otherwise drop the LV from its metadata and leave the pool's
delete message queued behind the busy device.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from thinstack import growth, lvm, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import RUNNER, Runner
from thinstack.dm.targets import Table, ThinTarget
from thinstack.errors import NotFound, Refused
from thinstack.lvm import LV
from thinstack.sizes import SECTOR

UUID_PREFIX = "TS-EXT-"


@dataclass(frozen=True)
class Origin:
    """A block device as a clone's origin sees it."""

    path: str  # as the operator named it, and as it is recorded (a stable name is best)
    devno: str  # major:minor, as tables name it
    size: int
    readonly: bool
    is_dm: bool
    holders: tuple[str, ...]  # kernel devices stacked on it or on a partition of it (dm-3,
    #                            md0, ...), not our clones
    mounted: bool  # it, or a partition of it (writes there change the origin too)


def recorded(lv: LV) -> tuple[str, int] | None:
    """The origin's path and size in bytes, if `lv` is a clone of a device outside the VG."""
    path = tags.value(lv.tags, tags.EXT_ORIGIN)
    size = tags.value(lv.tags, tags.EXT_SIZE)
    if path is None:
        return None
    return path, int(size) if size and size.isdigit() else -1


def is_outside_clone(lv: LV) -> bool:
    return origin_path(lv) is not None


def origin_path(lv: LV) -> str | None:
    """The recorded origin's path, if `lv` is a clone of a device outside the VG."""
    return tags.value(lv.tags, tags.EXT_ORIGIN)


def origin_tags(origin: Origin) -> list[str]:
    try:
        return [tags.kv(tags.EXT_ORIGIN, origin.path), tags.kv(tags.EXT_SIZE, origin.size)]
    except ValueError:
        raise Refused(f"{origin.path}: name the origin by a path of letters, digits and "
                      "'/_.-:+' (e.g. one under /dev/disk/by-id) so it can be recorded") from None


def probe(path: str) -> Origin:
    """What the kernel says about the device at `path`; NotFound/Refused if it is none."""
    if not path.startswith("/"):
        raise Refused(f"{path}: give the origin device as an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such device") from None
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(f"{path} is not a block device (import an image with `thinstack import`)")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sys = Path(f"/sys/dev/block/{major}:{minor}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    # A whole disk's partitions are its own bytes: a mount or a holder there writes the origin.
    parts = [p for p in sys.resolve().iterdir() if (p / "partition").exists()]
    devnos = [f"{major}:{minor}", *((p / "dev").read_text().strip() for p in parts)]
    holders = tuple(sorted(h.name for d in [sys, *parts] if (d / "holders").is_dir()
                           for h in (d / "holders").iterdir() if not _is_clone(h)))
    return Origin(path=path, devno=f"{major}:{minor}", size=size,
                  readonly=(sys / "ro").read_text().strip() == "1", is_dm=(sys / "dm").is_dir(),
                  holders=holders, mounted=_mounted(devnos))


def _is_clone(holder: Path) -> bool:
    uuid_file = holder / "dm" / "uuid"
    return uuid_file.exists() and uuid_file.read_text().startswith(UUID_PREFIX)


def _mounted(devnos: list[str]) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[2] in devnos for line in f)


def check_usable(origin: Origin) -> None:
    """Refuse an origin something else may be writing (other clones may read it too)."""
    if origin.mounted:
        raise Refused(f"{origin.path} (or a partition of it) is mounted; unmount it: a clone's "
                      "origin must not change")
    if origin.holders:
        raise Refused(f"{origin.path} is in use by {', '.join(origin.holders)}; a clone's "
                      "origin must not change")
    if origin.is_dm and not origin.readonly:
        raise Refused(f"{origin.path} is a writable device-mapper device; make it read-only "
                      "first (e.g. `lvchange -pr VG/LV`)")


def table(lv: LV, pool_devno: str, origin_devno: str) -> Table:
    if lv.thin_id is None:
        raise Refused(f"{lv.vg}/{lv.name} is not a thin volume")
    return Table.of(lv.size // SECTOR, ThinTarget(pool_devno, lv.thin_id, origin_devno))


def dm_name(lv: LV) -> str:
    return lvm.dm_name(lv.vg, lv.name)


def uuid(lv: LV) -> str:
    return UUID_PREFIX + lv.uuid


def tpool_name(pool: LV) -> str:
    return dm_name(pool) + "-tpool"  # LVM's name for the pool's thin-pool device


# --- the kernel side ---------------------------------------------------------------------------

def set_readonly(origin: Origin) -> None:
    if not origin.readonly:
        RUNNER.run(["blockdev", "--setro", origin.path])


def set_writable(path: str, runner: Runner = RUNNER) -> None:
    runner.run(["blockdev", "--setrw", path])


def active(lv: LV, dm: DeviceMapper | None = None) -> bool:
    """Whether the volume's device is up: LVM knows for every volume but these clones."""
    if not is_outside_clone(lv):
        return lv.active
    info = (dm or DeviceMapper()).info(dm_name(lv))
    return info is not None and info.uuid == uuid(lv)


def activate(lv: LV, pool: LV) -> str:
    """Bring the clone up over its origin; returns its /dev/mapper path. An already active
    clone is left as it is."""
    dm = DeviceMapper()
    if active(lv, dm):
        return f"/dev/mapper/{dm_name(lv)}"
    found = recorded(lv)
    if found is None:
        raise Refused(f"{lv.vg}/{lv.name} is not a clone of a device outside the VG")
    path, size = found
    origin = probe(path)
    if origin.size != size:
        raise Refused(f"{lv.vg}/{lv.name}: its origin {path} is {origin.size} bytes, but was "
                      f"{size} when the clone was made; is it the same device? not activating")
    check_usable(origin)
    set_readonly(origin)
    tpool = dm.info(tpool_name(pool))
    if tpool is None:
        lvm.lvm("lvchange", "-q", "-ay", "--config", growth.arming(pool.tags),
                f"{pool.vg}/{pool.name}")
        tpool = dm.info(tpool_name(pool))
        if tpool is None:
            raise Refused(f"{pool.vg}/{pool.name}: the thin pool did not come up")
    device = dm.create(dm_name(lv), table(lv, tpool.device.devno, origin.devno), uuid=uuid(lv),
                       readonly=lv.readonly)
    _link(lv, f"../dm-{device.minor}")
    return device.path


def reload(lv: LV, size: int) -> None:
    """Give the active clone a new length (after LVM has recorded it)."""
    dm = DeviceMapper()
    (line,) = dm.table(dm_name(lv)).lines
    dm.load(dm_name(lv), Table.of(size // SECTOR, line.target))
    dm.resume(dm_name(lv))  # suspends, swaps in the loaded table, resumes


def discard(lv: LV, start: int, length: int, *, zero: bool = False) -> None:
    """Unmap a byte range of the active volume (the tail a shrink drops); `zero`: write zeros
    over it instead (a range smaller than a chunk, which a discard leaves mapped)."""
    RUNNER.run(["blkdiscard", *(["-z"] if zero else []), "-o", str(start), "-l", str(length),
                f"/dev/mapper/{dm_name(lv)}"])


def release(lv: LV) -> None:
    """Take the clone's device down (and its /dev/VG/NAME link): before LVM may remove or
    rename the LV. A clone that is not up is left alone; an open one raises."""
    if is_outside_clone(lv):
        release_device(lv.vg, lv.name, uuid(lv))


def release_device(vg: str, name: str, dm_uuid: str, dm: DeviceMapper | None = None) -> None:
    dm = dm or DeviceMapper()
    info = dm.info(lvm.dm_name(vg, name))
    if info is None or info.uuid != dm_uuid:
        return
    if info.open_count:
        raise Refused(f"{vg}/{name} is open (a VM or a mount is using it)")
    dm.remove(info.name)
    link = Path("/dev", vg, name)
    if link.is_symlink() and not link.exists():
        link.unlink()


def _link(lv: LV, target: str) -> None:
    """/dev/VG/NAME, which LVM's udev rules make only for devices with LVM's uuid."""
    folder = Path("/dev", lv.vg)
    folder.mkdir(exist_ok=True)
    link = folder / lv.name
    tmp = folder / f".{lv.name}.ts-link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def activate_all(lvs: list[LV]) -> list[NotFound | Refused]:
    """Every committed outside-origin clone of the VG (`lvs`, one VG's), up, each in its own
    pool; returns the failures (one clone whose origin is missing must not keep the others
    down)."""
    pools = {lv.name: lv for lv in lvs if lv.is_thin_pool}
    failed: list[NotFound | Refused] = []
    for lv in lvs:
        if is_outside_clone(lv) and not lv.op_tags \
                and tags.LAST_EXPORT not in lv.tags:
            try:
                if lv.pool not in pools:
                    raise NotFound(f"{lv.ref} is in no thin pool")
                activate(lv, pools[lv.pool])
            except (NotFound, Refused) as e:
                failed.append(e)
    return failed


def dependants(path: str, lvs: list[LV]) -> list[LV]:
    """The clones, among `lvs`, whose recorded origin is the device at `path`."""
    target = os.path.realpath(path)
    return [lv for lv in lvs if (origin := origin_path(lv)) is not None
            and os.path.realpath(origin) == target
            and not lv.op_tags]
