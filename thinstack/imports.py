"""`thinstack import SOURCE VG/NAME`: a disk image (VHD, QCOW2, GOW, raw, or what qemu-img reads)
becomes a thin volume holding the same bytes, allocating pool chunks only for non-zero data.

The image is opened and mapped before anything is touched, so a bad image (exit 8), a volume
that exists, or a pool that cannot hold the data even after growing changes nothing. Then, under
the VG lock and journalled as operation `import`:

  1. the thin volume NAME.importing is created, tagged with the operation's tag (so `thinstack
     list` hides it and recovery knows it is unfinished), and the step `created:NAME.importing`
     journalled;
  2. the copy loop fills it, journalling its position (`copied:OFFSET`) every CHECKPOINT_BYTES
     after syncing the volume;
  3. it is deactivated, renamed to NAME, then activated and committed (the tag dropped) by one
     command.

An import interrupted after step 1 (kill, Ctrl-C, SIGTERM, an lvm or I/O error) leaves only the
hidden, tagged volume and its journal entry: other commands' recovery leaves them be (import is
in recovery.DEFERRED), `thinstack import --resume SOURCE VG/NAME` continues from the journalled
position after checking SOURCE is the same file, and `thinstack recover` removes them. An
import that fails for a reason resuming cannot fix (a bad image, a check before creation) is
rolled back at once.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from thinstack import budget, faults, growth, lvm
from thinstack.copy import BlockDeviceSink, CopyStats, copy_extents, data_bytes
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import ThinStatus
from thinstack.errors import Exists, NoSpace, NotFound, Refused, ThinstackError
from thinstack.extents import Extent, Kind
from thinstack.importers import Converting, Image, ImageError, Policy, open_image
from thinstack.journal import Entry, Journal, Step, StepKind, last_target
from thinstack.lvm import LV, VolumeRef
from thinstack.operation import KEEP_FOR_RESUME, ROLL_BACK, Op, operation
from thinstack.progress import Bar
from thinstack.sizes import SECTOR, format_size, parse_size

TEMP_SUFFIX = ".importing"
# How much is copied between two journalled positions: a resume repeats at most this much, and
# each checkpoint costs a flush of the volume (a thin-pool metadata commit).
CHECKPOINT_BYTES = 128 << 20
DEFAULT_MAX_VIRTUAL_SIZE = 16 << 40
MAX_VIRTUAL_SIZE_ENV = "THINSTACK_MAX_VIRTUAL_SIZE"


@dataclass(frozen=True)
class Summary:
    """What `thinstack import --json` prints."""

    format: str
    virtual_size: int
    bytes_read: int  # by this run (a resumed import reads only what was left)
    bytes_written: int
    chunks_allocated: int  # pool chunks the volume maps, from the kernel's thin status
    seconds: float
    path: str

    def to_json(self) -> dict:
        return asdict(self)


# --- decisions ---------------------------------------------------------------------------------

def policy(allow_dirs: tuple[Path, ...], env: Mapping[str, str] = os.environ) -> Policy:
    text = env.get(MAX_VIRTUAL_SIZE_ENV)
    try:
        limit = parse_size(text) if text else DEFAULT_MAX_VIRTUAL_SIZE
    except ValueError as e:
        raise ThinstackError(f"{MAX_VIRTUAL_SIZE_ENV}: {e}") from None
    return Policy(allowed_dirs=tuple(allow_dirs), max_virtual_size=limit)


def volume_size(virtual_size: int, requested: int | None) -> int:
    if virtual_size == 0:
        raise ThinstackError("the image is empty (virtual size 0): there is nothing to import")
    if requested is None:
        return virtual_size
    if requested < virtual_size:
        raise ThinstackError(f"--size {format_size(requested)} ({requested} bytes) is smaller "
                             f"than the image's virtual size of {virtual_size} bytes")
    return requested


def check_capacity(needed: int, pool_free: int, vg_free: int) -> None:
    """Thin volumes overcommit their virtual size freely; only the data must fit. `vg_free` is
    what growth may still add to the pool (0 when growth is off)."""
    if needed > pool_free + vg_free:
        raise NoSpace(f"the image holds {format_size(needed)} of data; the pool has "
                      f"{format_size(pool_free)} free and can grow by {format_size(vg_free)}")


def identity(path: Path, image: Image) -> dict:
    """What must not change between an interrupted import and its resumption."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "device": st.st_dev, "format": image.format, "virtual_size": image.virtual_size}


def changed(journalled: dict, now: dict) -> list[str]:
    return sorted(k for k in set(journalled) | set(now) if journalled.get(k) != now.get(k))


def copied(entry: Entry) -> int:
    """The journalled copy position: everything before it is on the volume."""
    return int(last_target(entry.steps, StepKind.COPIED) or 0)


def resumable(error: BaseException, entry: Entry) -> bool:
    """Worth keeping for --resume: the volume was made, and the image itself was fine."""
    return last_target(entry.steps, StepKind.CREATED) is not None \
        and not isinstance(error, ImageError)


def direct(image: Image, pool_attr: str, pool: str = "VG/POOL") -> bool:
    """Whether the image writes itself into the volume (`convert_into`: formats read through
    qemu-img, which thinstack does not copy chunk by chunk). Such a writer leaves chunks partly
    written, which only a pool that zeroes new chunks (lv_attr[7] 'z') shows as zeros around
    the data; in any other pool that would expose what its disk held before, so it is refused."""
    if not hasattr(image, "convert_into"):
        return False
    if pool_attr[7:8] != "z":
        raise Refused(f"this image's format is written by qemu-img, which needs a pool that "
                      f"zeroes new chunks; pool {pool} does not (turn zeroing on with `lvchange "
                      f"-Zy {pool}`)")
    return True


def temp_ref(ref: VolumeRef) -> VolumeRef:
    return VolumeRef(ref.vg, lvm.check_name(ref.name + TEMP_SUFFIX, "volume name"))


# --- the command -------------------------------------------------------------------------------

def import_image(source: str | os.PathLike, ref: VolumeRef, *, format: str = "auto",
                 size: int | None = None, allow_dirs: tuple[Path, ...] = (), resume: bool = False,
                 progress: bool = False, pool_name: str | None = None) -> Summary:
    """Import `source` into a new volume `ref` in pool `pool_name` (None: the VG's only pool),
    or, with resume, finish an interrupted import into it: then the size and pool journalled by
    the first run apply."""
    started = time.monotonic()
    source = Path(source)
    image = open_image(source, policy(allow_dirs), format)
    try:
        extents = list(image.extents())
        wanted = volume_size(image.virtual_size, size)
        journal = Journal()
        # A resumed import continues its old entry; a failed one is kept for --resume when the
        # volume was made and the image itself was fine.
        with operation("import", ref.vg, lambda lvs: _entry(
                journal, ref, source, identity(source, image), wanted, resume, pool_name),
                on_failure=lambda e, entry: KEEP_FOR_RESUME if resumable(e, entry) else ROLL_BACK,
                journal=journal, at=pool_name) as op:
            stats, chunk = _run(op, ref, image, extents, progress)
    finally:
        image.close()
    return Summary(format=image.format, virtual_size=image.virtual_size,
                   bytes_read=stats.bytes_read, bytes_written=stats.bytes_written,
                   chunks_allocated=mapped_chunks(device_path(ref), chunk),
                   seconds=round(time.monotonic() - started, 3), path=device_path(ref))


def device_path(ref: VolumeRef) -> str:
    """LVM's path of an active volume: known without asking it."""
    return f"/dev/{ref.vg}/{ref.name}"


def _entry(journal: Journal, ref: VolumeRef, source: Path, ident: dict, size: int,
           resume: bool, pool_name: str | None) -> Entry | dict:
    """The interrupted entry to continue (with resume), or the new entry's arguments."""
    # A committed entry is a finished import whose record was not yet removed: not ours.
    pending = [e for e in journal.pending(ref.vg) if e.op == "import"
               and e.args.get("name") == ref.name and not e.committed]
    if resume:
        if not pending:
            raise NotFound(f"{ref}: no interrupted import to resume")
        entry = pending[-1]
        differs = changed(entry.args["source"], ident)
        if differs:
            raise Refused(f"{source} is not the image the interrupted import of {ref} was "
                          f"reading ({', '.join(differs)} changed); roll that import back with "
                          f"`thinstack recover {ref.vg}` and import again")
        return entry
    if pending:
        raise Refused(f"an interrupted import into {ref} exists: continue it with `thinstack "
                      f"import --resume` or roll it back with `thinstack recover {ref.vg}`")
    return dict(name=ref.name, size=size, path=str(source), source=ident, pool=pool_name)


def _run(op: Op, ref: VolumeRef, image: Image, extents: list[Extent],
         progress: bool) -> tuple[CopyStats, int]:
    """Make, fill, rename and commit the volume, continuing from wherever an interrupted run of
    this entry stopped. Returns what the copy did and the pool's chunk size."""
    temp = temp_ref(ref)
    pool = lvm.pool_of(ref.vg, op.lvs, op.entry.args.get("pool"))
    # The volume this import made before it was interrupted, if any: NAME.importing, or NAME if
    # it was renamed already. A journalled position counts only on that volume.
    # Refused, if it must be, before anything is made.
    by_image = direct(image, pool.attr, f"{ref.vg}/{pool.name}")
    made = next((lv for lv in op.lvs if op.entry.tag in lv.tags), None)
    # A direct writer cannot start midway: a resumed one writes everything again.
    start = copied(op.entry) if made and not by_image else 0
    if made is None:
        taken = [lv.name for lv in op.lvs if lv.name in (ref.name, temp.name)]
        if taken:
            raise Exists(f"{ref.vg}/{taken[0]} already exists")
    _check_space(ref.vg, pool, data_bytes(extents, size=image.virtual_size,
                                          chunk=pool.chunk_size, start=start))
    if made is None:
        budget.refuse(pool, op.lvs, op.entry.args["size"], f"importing into {ref}")
        lvm.lvm("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", pool.name,
                     "-V", f"{op.entry.args['size']}b", "-n", temp.name, "--addtag", op.entry.tag,
                     "--setactivationskip", "n", "--config", growth.arming(pool.tags), ref.vg)
        op.step(Step(StepKind.CREATED, temp.name))
        faults.point("import", "after-lvcreate")
    if made is None or made.name == temp.name:
        if made is not None and not made.active:  # interrupted while being renamed
            lvm.lvm("lvchange", "-q", "-ay", "--config", growth.arming(pool.tags), str(temp))
        stats = _copy(op, temp, image, extents, start, pool.chunk_size, progress)
        faults.point("import", "after-copy")
        # Renaming an inactive volume changes LVM's metadata only, which takes half the time of
        # renaming a live device (and leaves udev nothing to race with).
        _deactivate_written(temp)
        lvm.lvm("lvrename", "-q", ref.vg, temp.name, ref.name)
        faults.point("import", "after-rename")
    else:  # renamed before the interruption: only the commit is left
        stats = CopyStats(position=image.virtual_size)
    # Activated and committed (its tag dropped) by one LVM command: one device scan, not two.
    lvm.lvm("lvchange", "-q", "-ay", "--deltag", op.entry.tag, "--config", growth.arming(pool.tags),
            str(ref))
    op.commit()
    return stats, pool.chunk_size


def _deactivate_written(ref: VolumeRef) -> None:
    """udev probes a device its writer has just closed (its watch rule). On a slow disk (dm-delay
    of 200 ms, issue 13) the probe outlasts LVM's own wait and lvchange answers "in use": then
    wait once for udev's queue to empty, and try again."""
    try:
        lvm.lvm("lvchange", "-q", "-an", str(ref))
    except Refused:
        lvm.LVM.runner.run(["udevadm", "settle", "--timeout=120"], timeout=130)
        lvm.lvm("lvchange", "-q", "-an", str(ref))


def _check_space(vg: str, pool: LV, needed: int) -> None:
    # LVM reports the pool's use to a hundredth of a percent: close enough to refuse what cannot
    # fit (the kernel status would cost three more commands). Inactive: no use reported.
    free = pool.size - math.ceil(pool.size * (pool.data_percent or 0) / 100)
    growable = needed > free and growth.settings(pool.tags).enabled
    room = lvm.vgs(vg)[0].free if growable else 0
    limit = budget.of(pool).limit
    if limit is not None:  # the pool never grows past its limit
        room = max(0, min(room, limit - pool.size))
    check_capacity(needed, free, room)


def _copy(op: Op, temp: VolumeRef, image: Image, extents: list[Extent], start: int,
          chunk: int, progress: bool) -> CopyStats:
    size = image.virtual_size
    if isinstance(image, Converting):
        return _convert(op, temp, image, extents)
    bar = Bar(f"import {op.entry.vg}/{op.entry.args['name']}",
              data_bytes(extents, size=size, chunk=chunk, start=start)) if progress else None
    sink = BlockDeviceSink(device_path(temp))
    report = None if bar is None else (lambda stats: bar.update(stats.bytes_read))

    def checkpoint(position: int) -> None:
        sink.sync()  # journal only what is durable
        _journal_position(op, position)
        faults.point("import", "mid-copy")

    try:
        stats = copy_extents(extents, image.read, sink, size=size, chunk=chunk, start=start,
                             read_into=getattr(image, "read_into", None), progress=report,
                             checkpoint=checkpoint, checkpoint_every=CHECKPOINT_BYTES)
        sink.sync()
    except OSError as e:
        # A pool out of space (one that fails writes when full) or an I/O error: what was
        # copied stays for --resume once the cause is fixed.
        error = NoSpace if e.errno == errno.ENOSPC else ThinstackError
        raise error(f"import into {op.entry.vg}/{op.entry.args['name']} stopped: {e.strerror}; "
                    f"continue it with `thinstack import --resume` or roll it back with "
                    f"`thinstack recover {op.entry.vg}`") from None
    finally:
        sink.close()
    _journal_position(op, size)
    if bar is not None:
        bar.finish(stats.bytes_read)
    return stats


def _convert(op: Op, temp: VolumeRef, image: Converting, extents: list[Extent]
             ) -> CopyStats:
    """The image writes itself straight into the fresh volume (no copy in $TMPDIR); what it
    skips reads as zeros there. It flushes the volume before it returns."""
    where = f"{op.entry.vg}/{op.entry.args['name']}"
    try:
        image.convert_into(device_path(temp))
    except ImageError as e:
        if "No space left on device" not in e.message:
            raise
        raise NoSpace(f"import into {where} stopped: no space left on device; continue it with "
                      f"`thinstack import --resume` or roll it back with `thinstack recover "
                      f"{op.entry.vg}`") from None
    _journal_position(op, image.virtual_size)
    data = sum(e.length for e in extents if e.kind is Kind.DATA)
    return CopyStats(bytes_read=data, bytes_written=data, position=image.virtual_size)


def _journal_position(op: Op, position: int) -> None:
    # Only the latest position matters: one step, not one per checkpoint of a long copy.
    op.entry.steps = [str(s) for s in op.entry.parsed() if s.kind is not StepKind.COPIED]
    op.step(Step(StepKind.COPIED, str(position)))


def mapped_chunks(path: str, chunk: int) -> int:
    """Pool chunks a thin volume maps, as the kernel counts them (exact, unlike lvs' percent)."""
    status = DeviceMapper().target_status(path)  # a device's path names it, as in dmsetup
    if not isinstance(status, ThinStatus):
        raise ThinstackError(f"{path}: the kernel reports the thin device failed")
    return status.mapped_sectors * SECTOR // chunk
