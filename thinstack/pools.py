"""Thin pools: creating one (on whole disks, an md raid1 of two disks, or a sparse file on a loop
device), re-attaching file-backed ones at boot, reporting their state, checking their metadata,
growing their data, and per-volume usage read from their metadata.

A pool is the LV `pool` of its VG, tagged `ts_pool`, with its growth policy in two more tags
(`ts_grow_threshold=PCT`, `ts_grow_step=BYTES`) that the monitor reads. A file-backed VG carries
`ts_file=PATH`; since no tag can be read before the file is attached, the path is also kept in a
small registry under the state folder: one symlink per VG, `backing-files/VG -> PATH`.

Creation is journalled: each resource is recorded as a step before it is made, and its
identity (VG and pool uuids, the file's device and inode) once it exists; the VG carries the
operation's tag (`ts_op_<id>`) until the commit. An interrupted or failed creation is rolled back
in reverse order (see `rollback_plan`), but only what is still what it made: a VG that lost the
tag, changed uuid or holds volumes it did not make is left as it is (the creation is adopted),
and a file is unlinked only if it is still the one it created.

`thinstack pool status --json` and `thinstack pool list --json` print a JSON array of objects,
one per pool, with exactly these keys (sizes in bytes; null where the kernel must be asked and the
pool is not active):

  vg                string   the volume group
  name              string   the pool LV's name (always "pool" for pools thinstack made)
  path              string   /dev/mapper/VG-pool
  data_size         int      the pool's data size
  data_used         int|null bytes of data in use (the kernel's count of allocated chunks)
  data_percent      float|null  data_used / data_size * 100
  metadata_size     int      the pool's metadata size
  metadata_percent  float|null  metadata in use, percent
  mode              string   rw | ro | out_of_data_space | failed (the kernel's view) | inactive
  when_full         string   error | queue: what writes do when the data is full
  zeroing           bool     new chunks are zeroed before first use
  chunk_size        int      the pool's allocation unit
  grow_threshold    float|null  the monitor grows the pool when data_percent reaches this
  grow_step         int|null    by at least this many bytes at a time (both null: growth is
                                switched off with the ts_no_grow tag)
  vg_size           int      the volume group's size
  vg_free           int      unallocated space left in the volume group
  backing_file      string|null  the sparse file behind a file-backed VG
  thin_count        int      thin volumes in the pool
"""

from __future__ import annotations

import json
import os
import stat
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from thinstack import extorigin, faults, growth, lvm, recovery, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import CommandError, run
from thinstack.dm.pool import Pool
from thinstack.dm.status import Failed, ThinPoolStatus
from thinstack.errors import Exists, NoSpace, NotFound, Refused, ThinstackError
from thinstack.journal import Entry, Journal, sync_dir
from thinstack.lock import flocked, vg_lock
from thinstack.lvm import LV
from thinstack.sizes import format_size
from thinstack.state import run_dir, state_dir
from thinstack.volumes import pool_of, run_lvm

POOL_LV = "pool"
DEFAULT_CHUNK = 64 << 10
DEFAULT_GROW_STEP = 256 << 20

# dm-thin's limits on the data block size: 64 KiB to 1 GiB, in multiples of 64 KiB.
MIN_CHUNK, MAX_CHUNK = 64 << 10, 1 << 30
# Metadata: LVM's estimate is 64 bytes per data chunk; snapshots and clones that diverge map the
# same chunks again, so twice that, and never less than 4 MiB (nor more than the kernel can use).
METADATA_PER_CHUNK = 2 * growth.MAPPING_BYTES
MIN_METADATA = 4 << 20
MD_NAME_MAX = 32  # mdadm keeps "host:name" in 32 bytes; the host part may be dropped


# --- decisions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    data: int
    metadata: int


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def metadata_size(vg_size: int, chunk: int, extent: int) -> int:
    """Metadata sized for the whole VG, since the pool's data grows into all of it."""
    wanted = max(MIN_METADATA, METADATA_PER_CHUNK * (vg_size // chunk))
    return min(_round_up(wanted, extent), growth.METADATA_MAX // extent * extent)


def plan_sizes(vg_size: int, vg_free: int, extent: int, chunk: int,
               data: int | None = None) -> Sizes:
    """The pool's data and metadata sizes. Besides the metadata the VG keeps as much again for
    LVM's spare metadata LV (pmspare, used by repairs) and as much again for the metadata to
    grow; the default data size is everything else."""
    meta = metadata_size(vg_size, chunk, extent)
    overhead = 2 * meta  # the metadata and its spare, allocated now
    if data is None:
        data = (vg_free - overhead - meta) // extent * extent
        if data < chunk:
            raise NoSpace(f"the volume group ({format_size(vg_free)} free) is too small for a "
                          f"thin pool with {format_size(meta)} of metadata and its spare")
        return Sizes(data, meta)
    data = _round_up(data, extent)
    if data + overhead > vg_free:
        raise NoSpace(f"a pool of {format_size(data)} needs {format_size(data + overhead)} with "
                      f"its metadata and spare; the volume group has {format_size(vg_free)} free")
    return Sizes(data, meta)


def md_name(vg: str) -> str:
    return f"ts-{vg}"


def check_create_args(vg: str, devices: list[str], file: Path | None, raid1: bool,
                      size: int | None, chunk: int, grow_threshold: float,
                      grow_step: int) -> None:
    """Every reason to refuse `pool create` that needs no look at the system."""
    lvm.check_name(vg, "volume group name")
    if file is not None and devices:
        raise ThinstackError("give either devices or --file, not both")
    if file is None and not devices:
        raise ThinstackError("give the devices for the volume group, or --file PATH --size SIZE")
    if file is not None:
        if raid1:
            raise ThinstackError("--raid1 mirrors two devices; it does not apply to --file")
        if size is None:
            raise ThinstackError("--file needs --size: the size of the sparse file to create")
        try:
            tags.kv(tags.BACKING_FILE, file)
        except ValueError:
            raise ThinstackError(f"{file}: a backing file's path may only contain letters, "
                                 "digits and _+.-/=!:&# (it is kept in an LVM tag)") from None
    if len(set(map(os.path.realpath, devices))) != len(devices):
        raise ThinstackError("a device is named twice")
    if raid1 and len(devices) != 2:
        raise ThinstackError(f"--raid1 mirrors exactly two devices, not {len(devices)}")
    if raid1 and len(md_name(vg)) > MD_NAME_MAX:
        raise ThinstackError(f"volume group name {vg!r} is too long for --raid1: its md array "
                             f"{md_name(vg)!r} must fit in {MD_NAME_MAX} characters")
    if size is not None and size <= 0:
        raise ThinstackError("--size must be positive")
    if not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk % MIN_CHUNK == 0):
        raise ThinstackError(f"--chunk {format_size(chunk)}: a thin pool's chunk is a multiple "
                             "of 64KiB between 64KiB and 1GiB")
    if not 0 < grow_threshold < 100:
        raise ThinstackError(f"--grow-threshold {grow_threshold:g}: a percentage between 0 and 100")
    if grow_step <= 0:
        raise ThinstackError("--grow-step must be positive")


def pool_tags(grow_threshold: float, grow_step: int) -> list[str]:
    return [tags.POOL, tags.kv(tags.GROW_THRESHOLD, f"{grow_threshold:g}"),
            tags.kv(tags.GROW_STEP, grow_step)]


@dataclass(frozen=True)
class Undo:
    kind: str  # registry | pool | vg | pv | md | md-member | loop | file
    target: str
    check: str = ""  # what it must still be: an LVM selection (pool, vg), DEV:INO (loop, file)


@dataclass(frozen=True)
class Rollback:
    undos: list[Undo]
    kept: str | None = None  # why the VG is left as it is: the creation is adopted


# Steps that record what a resource is once it exists, rather than a resource to undo.
IDENTITY_STEPS = ("vg-uuid", "pool-uuid", "file-id")


def _recorded(steps: list[str], kind: str) -> str | None:
    found = None
    for step in steps:
        k, sep, value = step.partition(":")
        if sep and k == kind:
            found = value
    return found


def foreign(steps: list[str], tag: str, vg: lvm.VG, lvs: list[LV]) -> str | None:
    """Why the existing VG `vg` (with its visible volumes `lvs`) is not, or no longer only, what
    the creation that recorded `steps` made; None when it is. The creation tags the VG right
    after making it and then records its uuid: a VG without the tag is its own only if it was
    killed in between and the VG is still empty."""
    uuid = _recorded(steps, "vg-uuid")
    if f"vg:{vg.name}" not in steps:
        return f"{vg.name} was made by someone else while the creation had not yet made it"
    if uuid is not None and vg.uuid != uuid:
        return f"{vg.name} is another volume group now (uuid {vg.uuid}, not {uuid})"
    if tag not in vg.tags and (uuid is not None or lvs):
        return f"{vg.name} no longer carries the creation's tag {tag}"
    pool_uuid = _recorded(steps, "pool-uuid")
    made_pool = f"pool:{vg.name}/{POOL_LV}" in steps
    others = [lv.name for lv in lvs if not (
        made_pool and lv.name == POOL_LV and lv.is_thin_pool
        and pool_uuid in (None, lv.uuid))]
    if others:
        return f"{vg.name} holds volumes the creation did not make ({', '.join(sorted(others))})"
    return None


def rollback_plan(steps: list[str], tag: str = "", vg: lvm.VG | None = None,
                  lvs: list[LV] = ()) -> Rollback:
    """What undoes a creation that recorded `steps` (`kind:target`, each recorded before its
    resource was made), given the VG of its name as it is now (`vg`, or None) and its visible
    volumes: the reverse order, so each resource goes before what it was built on, each undo
    checking that its target is still what the creation made. A committed creation is kept
    whole, and so is one whose VG is now someone's (see `foreign`)."""
    if "committed" in steps:
        return Rollback([])
    if vg is not None:
        why = foreign(steps, tag, vg, lvs)
        if why:
            return Rollback([], why)
    file_id = _recorded(steps, "file-id") or ""
    pool = next((lv for lv in lvs if lv.name == POOL_LV), None)
    undos = []
    for step in reversed(steps):
        kind, _, target = step.partition(":")
        if kind in IDENTITY_STEPS or kind == "committed":
            continue
        if kind == "pool":
            if pool is not None:
                undos.append(Undo(kind, target, f"lv_uuid={pool.uuid}"))
        elif kind == "vg":
            if vg is not None:
                # Checked again by LVM itself, under its lock: the same VG, and empty.
                undos.append(Undo(kind, target, f"vg_uuid={vg.uuid} && lv_count=0"))
        elif kind in ("loop", "file"):
            # A file is known by its identity, not its name: in a folder others can write, the
            # name may have been given to another file. Unknown identity: leave it.
            if file_id:
                undos.append(Undo(kind, target, file_id))
        else:
            undos.append(Undo(kind, target))
    return Rollback(undos)


def creation_steps(vg: str, pvs: list[str], md_members: list[str], file: Path | None) -> list[str]:
    """The steps recorded before blivet writes the PVs and the VG (in the order it makes them).
    A loop device's PV goes with its file, and its name may differ after a reboot, so it is not
    recorded."""
    steps = [f"md-member:{d}" for d in md_members]
    if md_members:
        steps.append(f"md:{md_name(vg)}")
    if file is None:
        steps += [f"pv:{pv}" for pv in pvs]
    return steps + [f"vg:{vg}"]


# --- pool create -------------------------------------------------------------------------------

def create(vg: str, *, devices: list[str] = (), file: Path | None = None, raid1: bool = False,
           size: int | None = None, chunk: int = DEFAULT_CHUNK,
           grow_threshold: float = growth.DEFAULT_THRESHOLD,
           grow_step: int = DEFAULT_GROW_STEP) -> "PoolStatus":
    """A new VG on `devices` (or on a new sparse file of `size` bytes) and a thin pool in it.
    The pool's data is `size` bytes on devices, and by default most of the VG."""
    devices = list(devices)
    file = Path(os.path.abspath(file)) if file is not None else None
    check_create_args(vg, devices, file, raid1, size, chunk, grow_threshold, grow_step)
    journal = Journal()
    with vg_lock(vg):
        recovery.recover_vg(vg, journal)
        if lvm.vgs(vg):
            raise Exists(f"volume group {vg} already exists")
        reuse = file is not None and _check_new_file(vg, file)
        entry = journal.begin("pool-create", vg, devices=devices, file=str(file or ""),
                              raid1=raid1, size=size, chunk=chunk)
        faults.point("pool-create", "after-intent")
        try:
            _create(journal, entry, devices, file, raid1, size, chunk,
                    pool_tags(grow_threshold, grow_step), reuse)
        except BaseException:
            recovery.recover_vg(vg, journal)
            raise
        journal.finish(entry)
    return status(vg)[0]


def _create(journal: Journal, entry: Entry, devices: list[str], file: Path | None, raid1: bool,
            size: int | None, chunk: int, pool_tag_list: list[str], reuse: bool = False) -> None:
    from thinstack import provision

    vg = entry.vg
    if file is not None:
        journal.step(entry, f"file:{file}")
        journal.step(entry, f"file-id:{_make_sparse_file(file, size, reuse)}")
        journal.step(entry, f"loop:{file}")
        devices = [_attach_loop(file)]
    prepared = provision.prepare_vg(vg, devices, md_name=md_name(vg) if raid1 else None)
    for step in creation_steps(vg, prepared.pvs, devices if raid1 else [], file):
        journal.step(entry, step)
    prepared.create()
    # The VG is the creation's until the commit, and a rollback checks it still is: by this tag,
    # and by its uuid.
    backing = ["--addtag", tags.kv(tags.BACKING_FILE, file)] if file is not None else []
    run_lvm("vgchange", "-q", "--addtag", entry.tag, *backing, vg)
    journal.step(entry, f"vg-uuid:{lvm.vgs(vg)[0].uuid}")
    if file is not None:
        journal.step(entry, f"registry:{vg}")
        _register(vg, file)
    faults.point("pool-create", "after-vg")

    info = lvm.vgs(vg)[0]
    sizes = plan_sizes(info.size, info.free, info.extent_size, chunk,
                       size if file is None else None)
    journal.step(entry, f"pool:{vg}/{POOL_LV}")
    # -Zy: a chunk is zeroed when first provisioned, so a partial write never exposes what the
    # disk held before (old data of deleted volumes, or of whoever owned the disk).
    run_lvm("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", f"{sizes.data}b",
         "--chunksize", f"{chunk}b", "--poolmetadatasize", f"{sizes.metadata}b", "-Zy",
         *[a for t in pool_tag_list for a in ("--addtag", t)], "-n", POOL_LV, vg)
    journal.step(entry, f"pool-uuid:{lvm.lv(lvm.VolumeRef(vg, POOL_LV)).uuid}")
    faults.point("pool-create", "after-pool")
    run_lvm("vgchange", "-q", "--deltag", entry.tag, vg)
    journal.step(entry, "committed")


def _check_new_file(vg: str, file: Path) -> bool:
    """thinstack creates the backing file itself: an existing one is refused unless it is this
    VG's own (per the registry) and holds nothing, as an interrupted creation may leave it.
    Whether that file is there to be reused."""
    if not os.path.lexists(file):
        return False
    if _registered().get(vg) == file and _signature(file) is None:
        return True
    raise Exists(f"{file} already exists; thinstack creates the backing file itself "
                 "(choose a new path, or remove it if it is not needed)")


def _signature(path: Path) -> str | None:
    """What blkid recognises in a file or device (e.g. LVM2_member), or None."""
    try:
        return run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)]).strip() or None
    except CommandError as e:
        if e.exit_status == 2:  # nothing recognised
            return None
        raise


def _make_sparse_file(file: Path, size: int, reuse: bool = False) -> str:
    """The backing file: new, never one planted under its name (O_EXCL, O_NOFOLLOW), or with
    `reuse` the blank one an interrupted creation of this VG left (_check_new_file). Returns its
    identity, DEV:INO, for a rollback to check."""
    file.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(file, flags if reuse else flags | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Exists(f"{file} is not a regular file")
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)  # a hole of `size` bytes: the file takes space as the pool fills
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(file.parent)
    return f"{st.st_dev}:{st.st_ino}"


def _attach_loop(file: Path) -> str:
    """A loop device over `file`, with direct I/O where the file's filesystem supports it: the
    pool's data is then cached once (above the loop device), not twice, and a flush from above
    reaches the file without a second round through the page cache."""
    found = _loops_of(file)
    if found:
        return found[0]
    try:
        device = run(["losetup", "--find", "--show", "--direct-io=on", str(file)]).strip()
    except CommandError as e:
        if "Invalid argument" not in e.stderr:
            raise
        # The file's filesystem cannot do O_DIRECT (tmpfs before 6.6, some network and FUSE
        # filesystems): buffered I/O through its page cache is still correct.
        device = run(["losetup", "--find", "--show", str(file)]).strip()
    run(["udevadm", "settle"])  # LVM finds devices through udev
    return device


def _loops_of(file: Path) -> list[str]:
    out = run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated", str(file)])
    return out.split()


# --- the backing-file registry -----------------------------------------------------------------

def _registry_dir() -> Path:
    return state_dir() / "backing-files"


def _registered() -> dict[str, Path]:
    folder = _registry_dir()
    if not folder.is_dir():
        return {}
    return {link.name: Path(os.readlink(link)) for link in folder.iterdir() if link.is_symlink()}


def _register(vg: str, file: Path) -> None:
    folder = _registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{vg}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(file, tmp)
    os.rename(tmp, folder / vg)  # atomic: the entry is either absent or whole
    sync_dir(folder)


def _unregister(vg: str) -> None:
    folder = _registry_dir()
    (folder / vg).unlink(missing_ok=True)
    if folder.is_dir():
        sync_dir(folder)


# --- rollback ----------------------------------------------------------------------------------

def recover(entry: Entry) -> None:
    """recovery.HANDLERS["pool-create"]: roll back an uncommitted creation, or adopt it when its
    VG has become someone's (said on stderr: nothing of it is removed)."""
    found = lvm.vgs(entry.vg)
    vg = found[0] if found else None
    plan = rollback_plan(entry.steps, entry.tag, vg, lvm.lvs(entry.vg) if vg else [])
    if plan.kept:
        if vg is not None and entry.tag in vg.tags:
            lvm.lvm("vgchange", "-q", "--deltag", entry.tag, entry.vg)
        print(f"thinstack: pool create of {entry.vg} (journal entry {entry.id}) was interrupted; "
              f"{plan.kept}, so it is kept as it is", file=sys.stderr, flush=True)
    for undo in plan.undos:
        _UNDO[undo.kind](entry.vg, undo)


def _undo_pool(vg: str, undo: Undo) -> None:
    # By uuid, under LVM's lock: only the pool the plan found, never another of that name.
    lvm.lvm("lvremove", "-q", "-y", "-f", "-S", undo.check, vg)


def _undo_vg(vg: str, undo: Undo) -> None:
    # LVM selects the VG only while it is still the one the plan found, and empty.
    lvm.lvm("vgremove", "-q", "-y", "-f", "-S", undo.check)


def _undo_pv(vg: str, undo: Undo) -> None:
    # Only a PV that belongs to no VG: device names can change across a reboot, and a PV that
    # is someone else's must never be wiped.
    real = os.path.realpath(undo.target)
    if any(os.path.realpath(pv.name) == real and not pv.vg for pv in lvm.pvs()):
        lvm.lvm("pvremove", "-q", "-y", "-ff", undo.target)


def _undo_md(vg: str, undo: Undo) -> None:
    device = f"/dev/md/{undo.target}"
    if os.path.exists(device):
        run(["mdadm", "--stop", device])


def _undo_md_member(vg: str, undo: Undo) -> None:
    # Only a superblock of our array (by name), for the same reason as PVs above.
    target = undo.target
    try:
        out = run(["mdadm", "--examine", "--export", target])
    except CommandError:
        return  # no md superblock there
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if fields.get("MD_NAME", "").rpartition(":")[2] == md_name(vg):
        run(["mdadm", "--zero-superblock", target])


def _undo_loop(vg: str, undo: Undo) -> None:
    """Detach the loop devices over the file the creation made (by identity: whatever file the
    name leads to now)."""
    for name in loops_by_identity(run(["losetup", "--list", "--json", "--output",
                                       "NAME,BACK-MAJ:MIN,BACK-INO"]), undo.check):
        run(["losetup", "--detach", name])


def loops_by_identity(listing: str, identity: str) -> list[str]:
    """The loop devices, in `losetup --list --json` output, whose backing file is DEV:INO."""
    found = []
    for loop in json.loads(listing or "{}").get("loopdevices", []):
        major, _, minor = str(loop.get("back-maj:min") or "").strip().partition(":")
        ino = str(loop.get("back-ino") or "").strip()
        if major.isdigit() and minor.isdigit() and \
                f"{os.makedev(int(major), int(minor))}:{ino}" == identity:
            found.append(loop["name"])
    return found


def _undo_file(vg: str, undo: Undo) -> None:
    """Unlink the file only if the name still leads to the file the creation made: looked up
    and unlinked relative to its folder's descriptor, never following a link."""
    path = Path(undo.target)
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        st = os.stat(path.name, dir_fd=folder, follow_symlinks=False)
        if f"{st.st_dev}:{st.st_ino}" == undo.check and stat.S_ISREG(st.st_mode):
            os.unlink(path.name, dir_fd=folder)
            os.fsync(folder)
    except FileNotFoundError:
        pass
    finally:
        os.close(folder)


_UNDO = {
    "registry": lambda vg, undo: _unregister(undo.target),
    "pool": _undo_pool,
    "vg": _undo_vg,
    "pv": _undo_pv,
    "md": _undo_md,
    "md-member": _undo_md_member,
    "loop": _undo_loop,
    "file": _undo_file,
}

recovery.HANDLERS["pool-create"] = recover


# --- attach ------------------------------------------------------------------------------------

def attach(vg: str | None = None) -> list[str]:
    """Attach the backing files of file-backed VGs (all registered ones and those with clones of
    outside devices, or just `vg`) to loop devices and activate their volumes; for another VG, just activate it. Clones of devices
    outside the VG, which LVM's activation skips, come up here over their origins. Returns the
    VGs activated. Tries every VG (and every such clone) before reporting failures, so one bad
    VG does not keep the others down at boot."""
    files = _registered()
    # At boot (no VG named), also every VG with clones of outside devices: LVM's own activation
    # leaves those down, by design.
    names = [vg] if vg else sorted(set(files) | {lv.vg for lv in lvm.lvs()
                                                 if extorigin.is_outside_clone(lv)})
    failed = []
    for name in names:
        try:
            with vg_lock(name):
                if name in files:
                    if not files[name].exists():
                        raise NotFound(f"{name}: backing file {files[name]} is missing")
                    _attach_loop(files[name])
                if not lvm.vgs(name):
                    raise NotFound(f"volume group {name} not found")
                run_lvm("vgchange", "-q", "-ay", name)
                lvs = lvm.lvs(name)
                if any(extorigin.is_outside_clone(lv) for lv in lvs):
                    errors = extorigin.activate_all(lvs, pool_of(name, lvs))
                    if len(errors) == 1:
                        raise errors[0]
                    if errors:
                        raise ThinstackError("; ".join(map(str, errors)))
        except (ThinstackError, CommandError) as e:
            if vg:
                raise
            failed.append(str(e))
    if failed:
        raise ThinstackError("; ".join(failed))
    return names


# --- status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolStatus:
    vg: str
    name: str
    path: str
    data_size: int
    data_used: int | None
    data_percent: float | None
    metadata_size: int
    metadata_percent: float | None
    mode: str
    when_full: str
    zeroing: bool
    chunk_size: int
    grow_threshold: float | None
    grow_step: int | None
    vg_size: int
    vg_free: int
    backing_file: str | None
    thin_count: int

    def to_json(self) -> dict:
        return asdict(self)


def status(vg: str | None = None) -> list[PoolStatus]:
    """The pool of `vg` (tagged, or the VG's only one), or every pool thinstack made."""
    if vg is not None:
        pool = _pool_lv(vg)
        return [pool_status(lvm.vgs(vg)[0], pool, lvm.lvs(vg), _kernel_status(pool))]
    all_lvs = lvm.lvs()
    out = []
    for info in lvm.vgs():
        lvs = [lv for lv in all_lvs if lv.vg == info.name]
        out += [pool_status(info, lv, lvs, _kernel_status(lv)) for lv in lvs
                if lv.is_thin_pool and tags.POOL in lv.tags]
    return out


def pool_status(info: lvm.VG, pool: LV, lvs: list[LV],
                kernel: ThinPoolStatus | Failed | None) -> PoolStatus:
    """The status of `pool` in VG `info` among `lvs`, given the kernel's thin-pool status (None
    when the pool is not active)."""
    policy = growth.settings(pool.tags)
    used = data_pct = meta_pct = None
    when_full = pool.when_full or "queue"  # LVM's default when its profile sets nothing
    if kernel is None:
        mode = "inactive"
    elif isinstance(kernel, Failed):
        mode = "failed"
    else:
        mode = kernel.mode.value
        used = kernel.used_data_blocks * pool.chunk_size
        data_pct = 100 * kernel.used_data_blocks / kernel.total_data_blocks
        meta_pct = 100 * kernel.used_metadata_blocks / kernel.total_metadata_blocks
        when_full = "error" if kernel.error_if_no_space else "queue"
    return PoolStatus(
        vg=pool.vg, name=pool.name, path=pool.dm_path, data_size=pool.size, data_used=used,
        data_percent=data_pct, metadata_size=pool.metadata_size, metadata_percent=meta_pct,
        mode=mode, when_full=when_full, zeroing=pool.attr[7] == "z", chunk_size=pool.chunk_size,
        grow_threshold=policy.threshold if policy.enabled else None,
        grow_step=(policy.step or growth.default_step(pool.size)) if policy.enabled else None,
        vg_size=info.size, vg_free=info.free,
        backing_file=tags.value(info.tags, tags.BACKING_FILE),
        thin_count=sum(1 for lv in lvs if lv.is_thin and lv.pool == pool.name))


def _kernel_status(pool: LV) -> ThinPoolStatus | Failed | None:
    device = kernel_pool(pool)
    return device.dm.target_status(device.name) if device is not None else None


# --- extend, check, usage ----------------------------------------------------------------------

def extend(vg: str, size: int) -> PoolStatus:
    """Grow the pool's data by `size` bytes."""
    if size <= 0:
        raise ThinstackError("the size to add must be positive")
    with vg_lock(vg):
        pool = _pool_lv(vg)
        free = lvm.vgs(vg)[0].free
        if size > free:
            raise NoSpace(f"volume group {vg} has {format_size(free)} free, less than "
                          f"{format_size(size)}: add a device to it first")
        run_lvm("lvextend", "-q", "-L", f"+{size}b", str(pool.ref))
    return status(vg)[0]


def check(vg: str) -> str:
    """thin_check the pool's metadata, read through a metadata snapshot so the live pool is never
    touched: one line when clean; ThinstackError when damaged."""
    pool = _pool_lv(vg)
    device = kernel_pool(pool)
    if device is None:
        raise Refused(f"{pool.ref} is not active: activate it (`thinstack pool attach {vg}`) "
                      "to check it")
    if isinstance(device.dm.target_status(device.name), Failed):
        detail = "the kernel failed the pool"
    else:
        result = _reading_metadata(pool, device.thin_check)
        if result.clean:
            return f"{pool.ref}: metadata clean"
        detail = result.output.splitlines()[-1] if result.output else "thin_check found errors"
    raise ThinstackError(f"{pool.ref}: metadata damaged ({detail}); deactivate the pool and "
                         f"repair it with `lvconvert --repair {pool.ref}`")


def thin_usage(vg: str) -> dict[int, tuple[int, int, int]] | None:
    """thin device id -> (mapped, exclusive, shared) bytes, from thin_ls on a metadata snapshot;
    None when the VG has no active pool, or another reader holds the metadata snapshot (callers
    then fall back to LVM's coarser percentages)."""
    try:
        pool = _pool_lv(vg)
    except NotFound:
        return None
    device = kernel_pool(pool)
    if device is None:
        return None
    try:
        entries = _reading_metadata(pool, device.thin_ls)
    except Refused:
        return None
    chunk = pool.chunk_size
    return {e.dev_id: (e.mapped_blocks * chunk, e.exclusive_blocks * chunk,
                       e.shared_blocks * chunk) for e in entries}


def _reading_metadata(pool: LV, read):
    """Run `read` (which reserves the pool's one metadata snapshot); Refused if another reader
    holds it now."""
    try:
        return read()
    except CommandError as e:
        if "reserve_metadata_snap" in e.argv:
            raise Refused(f"{pool.ref}: another reader holds the pool's metadata snapshot; "
                          "try again shortly") from None
        raise


def _pool_lv(vg: str) -> LV:
    if not lvm.vgs(vg):
        raise NotFound(f"volume group {vg} not found")
    return pool_of(vg, lvm.lvs(vg))


# A reader holding the metadata snapshot for longer than this is stuck, not slow.
METADATA_READER_WAIT = 30.0


@contextmanager
def _metadata_reader(name: str):
    """Pool.reader_lock for thin-pool device `name`: see Pool."""
    path = run_dir() / "locks" / f"{name}.metasnap"
    with flocked(path, METADATA_READER_WAIT, f"thin-pool {name}: another reader has held its "
                 f"metadata snapshot for over {METADATA_READER_WAIT:g} s"):
        yield path.with_name(f"{name}.metasnap-held")


def kernel_pool(pool: LV) -> Pool | None:
    """The kernel's thin-pool device of an LVM pool, or None when it is not active. LVM stacks
    it as VG-pool-tpool once thin volumes use the pool, and as VG-pool itself before."""
    dm = DeviceMapper()
    name = os.path.basename(pool.dm_path)
    for candidate in (f"{name}-tpool", name):
        if dm.exists(candidate):
            return Pool(dm, candidate, reader_lock=lambda: _metadata_reader(candidate))
    return None
