"""Export a volume to an image file: `thinstack export VG/NAME DEST`.

An export reads a thin snapshot taken at its start, so the image is the volume at one instant
however the VM writes meanwhile (a read-only volume, such as a gold master, is read as it is).
It reads only the blocks the thin mapping says are there, and the copy loop turns all-zero
chunks into holes. The writer builds the image beside DEST and renames it into place at the end.

An export runs in three steps, because the copy may take hours and must not hold the VG lock
(which every other command of the VG needs) all that time:
  1. under the VG lock: journal the intent, take the snapshot (op-tagged, so hidden);
  2. without it, holding only this volume's export lock: copy the extents into the image;
  3. under the VG lock: remove the snapshot, or with --incremental keep it as the base of the
     next export (NAME.last-export), and close the journal entry.
An export killed anywhere leaves DEST as it was (or complete, after the rename); `thinstack
recover` then removes its snapshot and the writer's temporary file (HANDLERS["export"]), and so
do the next export of the same volume and any command of the VG, once the export lock proves the
export dead. A clone of an outside device is suspended around its snapshot: that step is
journalled first, and the rollback resumes the device, so a kill there leaves no VM frozen.

The folder DEST is in may be writable by others: the image is built under a random name made
with O_EXCL|O_NOFOLLOW relative to the folder (exporters.atomic), 0600 or DEST's own mode.
Every image records its format (the JSON summary, the --incremental record, and the
`user.thinstack.format` attribute where the file system keeps one), which restoring it names:
`thinstack import --format FMT IMAGE VG/NAME`.

Incremental: `--since SNAP` writes only what changed between SNAP and now (thin_delta), as an
image whose parent is the image exported at SNAP: a differencing VHD, a qcow2 overlay, or a GOW3
image whose changed blocks carry a new session number. `--incremental` keeps that bookkeeping
itself: one read-only snapshot per volume, NAME.last-export (used and removed only while it
carries tags.LAST_EXPORT and is a snapshot of the volume), and a record of the image exported
from it and of the chain of images that one needs (state_dir()/exports/VG/NAME.json, valid only
while it names that snapshot's LVM uuid). It exports in full when there is no sound base, and
when the chain has as many images as readers follow; and it never writes over an image the
chain still needs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

from thinstack import extorigin, faults, growth, live, lvm, mapping, recovery, tags, thinpool
from thinstack.copy import CopyStats, copy_extents, data_bytes
from thinstack.dm import tools
from thinstack.dm.client import DeviceMapper
from thinstack.dm.errors import DmError
from thinstack.dm.pool import Pool
from thinstack.dm.status import ThinStatus
from thinstack.dm.targets import Table, ThinTarget
from thinstack.errors import NoSpace, NotFound, Refused, ThinstackError
from thinstack.exporters import ExportError, driver
from thinstack.exporters.atomic import partial_name
from thinstack.extents import Extent, Kind
from thinstack.importers import Policy
from thinstack.journal import Entry, Journal, Step, StepKind, write_atomically
from thinstack.lock import held
from thinstack.lvm import LV, VolumeRef
from thinstack.operation import KEEP_FOR_RESUME, Op, operation
from thinstack.progress import Bar
from thinstack.sizes import SECTOR
from thinstack.state import run_dir, state_dir

# The formats with an incremental form, and what that form is.
INCREMENTAL = {"vhd": "a differencing VHD", "qcow2": "a qcow2 overlay",
               "gow3": "a GOW3 image of the next session"}
# An incremental image of these is a full image: it may replace the very file it builds on.
SELF_CONTAINED = {"gow3"}
LAST_EXPORT_SUFFIX = ".last-export"  # NAME.last-export: the next --incremental export's base
FORMAT_XATTR = "user.thinstack.format"  # on every image: the --format that restores it
# Readers follow so many parents and no more (thinstack's importers by default, and QEMU's own
# limits are of that order): --incremental starts a new chain with a full export before that.
MAX_PARENTS = Policy().max_chain_depth


# --- decisions -------------------------------------------------------------------------------

def check_options(format: str, *, compress: bool, round_to_mib: bool, incremental: bool,
                  since: str | None, parent: Path | None, full: bool = False) -> None:
    """Refuse combinations that cannot mean anything, before anything is touched."""
    if full and not incremental:
        raise ExportError("--full starts a new --incremental chain: give it with --incremental "
                          "(without it every export is full)")
    if incremental and since:
        raise ExportError("--incremental chooses its own base snapshot; drop --since")
    if parent is not None and not since:
        raise ExportError("--parent names the image exported at --since SNAPNAME; give both")
    if (incremental or since) and format not in INCREMENTAL:
        raise ExportError(f"{format} has no incremental form; use "
                          + ", ".join(f"{f} ({what})" for f, what in INCREMENTAL.items()))
    if compress and format != "qcow2":
        raise ExportError("--compress is for qcow2")
    if round_to_mib and format not in ("vhd", "vhd-fixed"):
        raise ExportError("--round-to-mib is for vhd and vhd-fixed")


@dataclass(frozen=True)
class Base:
    """What an incremental export builds on: the snapshot the parent image was exported from."""

    snapshot: str
    thin_id: int
    parent: Path


@dataclass(frozen=True)
class Record:
    """The image the last --incremental export wrote, and the snapshot it was read from."""

    snapshot: str
    uuid: str  # the snapshot's LVM uuid: a record of an earlier LV of that name is stale
    path: str
    format: str
    chain: tuple[str, ...]  # the images reading it takes: itself, its parent, ..., a full one


def next_record(last: Record | None, base: Base | None, snapshot: str, uuid: str, path: Path,
                format: str) -> Record:
    """The record of an --incremental export to `path` from snapshot `snapshot`, over `base`
    (the last export's snapshot, whose record is `last`) or full."""
    chain: tuple[str, ...] = (str(path),)
    if base is not None and last is not None and format not in SELF_CONTAINED:
        chain += last.chain
    return Record(snapshot, uuid, str(path), format, chain)


def check_dest(dest: Path, record: Record | None) -> None:
    """Refuse to write over an image that the last export's chain still reads: every later
    image of that chain would silently change. (The last image itself nothing reads yet.)"""
    if record is not None and str(dest) in record.chain[1:]:
        raise Refused(f"{dest} is an earlier image of the chain {record.path} needs; writing it "
                      f"would corrupt that chain: choose a new name")


def incremental_base(format: str, dest: Path, record: Record | None, last: LV | None,
                     parent_exists: bool) -> tuple[Base | None, str]:
    """The base of an --incremental export, or None for a full export; and why, for the log.
    dest and the recorded path are compared as given: pass them resolved."""
    if last is None or record is None:
        return None, "no earlier incremental export"
    if record.uuid != last.uuid or record.snapshot != last.name:
        return None, f"{last.name} is not the snapshot the last export recorded"
    if record.format != format:
        return None, f"the last export was {record.format}, not {format}"
    if not parent_exists:
        return None, f"the last export {record.path} is gone"
    if len(record.chain) > MAX_PARENTS:
        return None, f"the chain has {len(record.chain)} images, the most readers follow"
    if Path(record.path) == dest and format not in SELF_CONTAINED:
        return None, f"DEST is the last export, which {INCREMENTAL[format]} needs as its parent"
    assert last.thin_id is not None  # last_export: a thin snapshot
    return Base(last.name, last.thin_id, Path(record.path)), f"changes since {last.name}"


def last_export(source: LV, lvs: list[LV]) -> LV | None:
    """NAME.last-export, the base snapshot --incremental keeps, if there is one. Its name alone
    proves nothing: it is thinstack's only with the tag its export added at the commit, as a thin
    snapshot of the volume. Any other volume of that name is refused, never used nor removed."""
    found = next((lv for lv in lvs if lv.name == source.name + LAST_EXPORT_SUFFIX), None)
    if found is None:
        return None
    if tags.LAST_EXPORT in found.tags and found.is_thin and found.origin == source.name:
        return found
    raise Refused(f"{found.ref} is not the base snapshot thinstack keeps for {source.ref} (it "
                  f"lacks thinstack's tag or is no snapshot of it); rename it to export "
                  f"--incremental")


def since_base(snap: LV, source: LV, parent: Path | None, record: Record | None) -> Base:
    """The base of a --since SNAP export: SNAP, and the image exported from it (--parent, or the
    one recorded for it)."""
    if not snap.is_thin or snap.origin != source.name:
        raise Refused(f"{snap.ref} is not a thin snapshot of {source.ref}")
    if parent is None:
        if record is None or (record.snapshot, record.uuid) != (snap.name, snap.uuid):
            raise NotFound(f"no image is recorded for {snap.ref}: pass --parent IMAGE, the image "
                           f"exported from it")
        parent = Path(record.path)
    assert snap.thin_id is not None  # is_thin, checked above
    return Base(snap.name, snap.thin_id, parent)


class SourceKind(StrEnum):
    """How a volume's content is found."""
    THIN = "thin"  # its thin mapping says where the data is
    # A thin volume over an external origin, which reads the origin wherever the volume maps
    # nothing: all of it is data.
    EXTERNAL = "external"
    PLAIN = "plain"  # a read-only volume outside the pool: all data too


def source_kind(source: LV, lvs: list[LV]) -> SourceKind:
    """How `source`'s content is found. A writable volume outside the pool cannot be exported:
    no thin snapshot would keep it from changing while it is read."""
    if source.is_thin and extorigin.is_outside_clone(source):
        return SourceKind.EXTERNAL
    if source.is_thin:
        return SourceKind.THIN if lvm.external_origin(source, lvs) is None \
            else SourceKind.EXTERNAL
    if source.readonly:
        return SourceKind.PLAIN
    raise Refused(f"{source.ref} is neither a thin volume (which a thin snapshot freezes for the "
                  f"export) nor read-only: nothing would keep it from changing while it is read")


def volume_extents(kind: SourceKind, size: int, mapped: tools.ThinRanges | None,
                   delta: tools.ThinDelta | None) -> list[Extent]:
    """What to copy: the changes since the base when there is a delta, else the whole volume
    (a thin one as its mapping has it)."""
    if delta is not None:
        return list(mapping.changed_extents(delta, size,
                                            unmapped_reads_zero=kind == SourceKind.THIN))
    if kind == SourceKind.THIN:
        assert mapped is not None  # a thin volume's mapping is always read
        return list(mapping.mapped_extents(mapped, size))
    return [Extent(0, size, Kind.DATA)]


# --- the operation ---------------------------------------------------------------------------

# The chunk a volume outside the pool is read in (a pool's volumes are read in its blocks).
PLAIN_CHUNK = 64 << 10


@dataclass(frozen=True)
class Summary:
    path: Path
    format: str
    volume: str
    size: int
    snapshot: str | None  # kept as the next --incremental export's base; None: removed
    base: str | None  # the snapshot this image holds the changes since; None: a full image
    parent: str | None
    reason: str  # why the export is full or incremental
    block_size: int
    bytes_mapped: int  # what the pool maps for the volume (all of it, outside a pool)
    changed_blocks: int  # blocks the image had to store: changed since the base, or mapped
    bytes_read: int
    bytes_written: int  # non-zero data handed to the writer
    file_bytes: int  # the space DEST takes on its file system
    seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class _Job:
    entry: Entry
    source: LV
    kind: SourceKind
    read_from: LV  # the snapshot, or the read-only source itself
    pool: LV | None
    base: Base | None
    reason: str
    keep: bool  # rotate the snapshot into NAME.last-export at the end
    last: LV | None  # the NAME.last-export it replaces then
    record: Record | None  # and the record of that one
    kernel: Pool | None = None  # the pool's kernel device, once looked up


def export_volume(ref: VolumeRef, dest: str | os.PathLike, *, format: str = "raw",
                  compress: bool = False, round_to_mib: bool = False, incremental: bool = False,
                  since: str | None = None, parent: Path | None = None, full: bool = False,
                  progress: bool = False) -> Summary:
    """full: with incremental, a full image that starts a new chain (a weekly full, say); the
    next --incremental export builds on it."""
    check_options(format, compress=compress, round_to_mib=round_to_mib, incremental=incremental,
                  since=since, parent=parent, full=full)
    dest = Path(dest).absolute()
    if not dest.parent.is_dir():
        raise NotFound(f"{dest.parent}: no such directory")
    if dest.is_dir():
        raise ExportError(f"{dest} is a directory; DEST names the image file")
    if parent is not None and not parent.is_file():
        raise NotFound(f"{parent}: no such image")
    if parent is not None and parent.resolve() == dest.resolve() and format not in SELF_CONTAINED:
        raise ExportError(f"{dest} cannot replace its own parent: {INCREMENTAL[format]} reads it")
    started = time.monotonic()
    with export_lock(ref):
        job = _start(ref, dest, format, incremental, since, parent, full)
        try:
            extents, mapped, unit = _extents(job)
            stats = _write(job, dest, extents, unit, format=format, compress=compress,
                           round_to_mib=round_to_mib, progress=progress)
        except BaseException:
            _finish(job, dest, format, keep=False)
            raise
        _finish(job, dest, format, keep=job.keep)
    return Summary(
        path=dest, format=format, volume=str(ref), size=job.read_from.size,
        snapshot=ref.name + LAST_EXPORT_SUFFIX if job.keep else None,
        base=job.base.snapshot if job.base else None,
        parent=str(job.base.parent) if job.base else None, reason=job.reason, block_size=unit,
        bytes_mapped=mapped, changed_blocks=mapping.block_count(extents, unit),
        bytes_read=stats.bytes_read, bytes_written=stats.bytes_written,
        file_bytes=dest.stat().st_blocks * 512, seconds=round(time.monotonic() - started, 3))


def _start(ref: VolumeRef, dest: Path, format: str, incremental: bool, since: str | None,
           parent: Path | None, full: bool = False) -> _Job:
    """Step 1, under the VG lock: decide what to read and take the snapshot."""
    journal = Journal()
    found: dict = {}

    def checked(lvs: list[LV]) -> dict:
        """Everything decided before anything is made; the entry's arguments."""
        earlier = _earlier_exports(ref, journal)
        for e in earlier:
            _undo(e)
            journal.finish(e)
        if earlier:
            lvs = lvm.volumes_of(ref.vg)
        source = _find(ref.name, lvs, ref)
        live.refuse_if_hydrating(source, "export")
        kind = source_kind(source, lvs)
        if (since or incremental) and kind == SourceKind.PLAIN:
            raise Refused(f"{ref} is not a thin volume: only thin volumes export incrementally")
        record = read_record(ref)
        check_dest(dest.resolve(), record)
        last = last_export(source, lvs) if incremental else None
        base, reason = None, "full export"
        if since:
            base, reason = since_base(_find(since, lvs, ref), source, parent, record), \
                f"changes since {since}"
        elif full:
            reason = "--full: a new chain"
        elif incremental:
            exists = record is not None and Path(record.path).is_file()
            base, reason = incremental_base(format, dest.resolve(), record, last, exists)
        active = extorigin.active(source)
        if not (incremental or source.readonly or active):
            raise Refused(f"{ref} is not active: activate it to export it")
        pool = lvm.holding_pool(source, lvs)
        found.update(source=source, kind=kind, active=active, pool=pool, base=base,
                     reason=reason, last=last, record=record)
        return dict(name=ref.name, dest=str(dest), partial=str(_partial(dest)))

    # Open on success: the copy runs without the VG lock, and _finish closes the entry.
    with operation("export", ref.vg, checked, journal=journal, finish=False,
                   at=ref.name) as op:
        source, pool, kernel = found["source"], found["pool"], None
        read_from = source
        # A read-only volume cannot change under the copy; --incremental keeps a snapshot
        # even of one, as the next export's base.
        if incremental or not source.readonly:
            assert pool is not None  # source_kind: only a thin volume may be writable
            kernel = thinpool.kernel_pool(pool)
            thinpool.refuse_if_metadata_would_run_out(pool, kernel)
            read_from = _snapshot(op, source, active=found["active"], pool=pool)
            faults.point("export", "after-snapshot")
    return _Job(op.entry, source, found["kind"], read_from, pool, found["base"], found["reason"],
                keep=incremental, last=found["last"], record=found["record"], kernel=kernel)


def _extents(job: _Job) -> tuple[list[Extent], int, int]:
    """The extents to copy, the bytes the pool maps for the volume, and the pool's block size
    (the chunk the copy works in). Reads of the pool's metadata (a process each) only where
    the kernel's status of the device (an ioctl) does not say enough."""
    size = job.read_from.size
    if job.kind == SourceKind.PLAIN:
        return volume_extents(job.kind, size, None, None), size, PLAIN_CHUNK
    thin_id = job.read_from.thin_id
    assert job.pool is not None and thin_id is not None  # not PLAIN: a thin volume
    status = _thin_status(job.read_from)
    if status is not None and job.base is not None:
        changes = mapping.read_delta(job.pool, job.base.thin_id, thin_id, device=job.kernel)
        return volume_extents(job.kind, size, None, changes), status.mapped_sectors * SECTOR, \
            mapping.block_size(changes)
    if status is not None and whole_volume_is_data(job.kind, size, status):
        return [Extent(0, size, Kind.DATA)], status.mapped_sectors * SECTOR, job.pool.chunk_size
    ranges, delta = mapping.read(job.pool, thin_id, job.base.thin_id if job.base else None,
                                 device=job.kernel)
    unit = mapping.block_size(ranges)
    return volume_extents(job.kind, size, ranges, delta), ranges.mapped_blocks * unit, unit


def whole_volume_is_data(kind: SourceKind, size: int, status: ThinStatus) -> bool:
    """Whether a full export may read [0, size) whole without reading the thin mapping: the
    volume reads an external origin wherever it maps nothing, or it maps every block of it
    (and none past its end, which a volume shrunk since keeps: then the count says nothing)."""
    if kind == SourceKind.EXTERNAL:
        return True
    highest = status.highest_mapped_sector
    return highest is not None and highest * SECTOR < size \
        and status.mapped_sectors * SECTOR >= size


def _thin_status(lv: LV) -> ThinStatus | None:
    """The kernel's status of the volume's thin device, or None when it has no device up (a
    read-only volume exported as it is need not be active)."""
    try:
        status = DeviceMapper().target_status(lv.path)
    except DmError:
        return None
    return status if isinstance(status, ThinStatus) else None


def _write(job: _Job, dest: Path, extents: list[Extent], unit: int, *, format: str,
           compress: bool, round_to_mib: bool, progress: bool) -> CopyStats:
    """Step 2, without the VG lock: the extents into a new image at DEST."""
    size = job.read_from.size
    total = data_bytes(extents, size=size, chunk=unit)
    bar = Bar(f"export {job.source.ref}", total) if progress else None

    def report(stats: CopyStats) -> None:
        if stats.bytes_read * 2 >= total:
            faults.point("export", "mid-copy")
        if bar is not None:
            bar.update(stats.bytes_read)

    try:
        writer = driver(format).create(dest, size, format=format, compress=compress,
                                       round_to_mib=round_to_mib,
                                       parent=job.base.parent if job.base else None,
                                       partial=Path(job.entry.args["partial"]).name)
        try:
            writer.file.set_xattr(FORMAT_XATTR, format)
            fd = os.open(job.read_from.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                stats = copy_extents(extents, lambda offset, length: os.pread(fd, length, offset),
                                     writer, size=size, chunk=unit, progress=report)
            finally:
                os.close(fd)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    except OSError as e:
        # The backup file system full, or not writable: a nightly job's likeliest failures.
        error = NoSpace if e.errno in (errno.ENOSPC, errno.EDQUOT) else ThinstackError
        raise error(f"{e.filename or dest}: {e.strerror}") from None
    if bar is not None:
        bar.finish(stats.bytes_read)
    faults.point("export", "after-write")
    return stats


def _finish(job: _Job, dest: Path, format: str, *, keep: bool) -> None:
    """Step 3, under the VG lock again: drop the snapshot, or keep it as the next export's base.
    A failure here leaves the entry to the recovery that runs once the export lock is let go."""
    with operation("export", job.source.vg, entry=job.entry, on_failure=KEEP_FOR_RESUME):
        if job.read_from is not job.source and keep:
            _rotate(job, dest, format)
        elif job.read_from is not job.source:
            extorigin.release(job.read_from)
            lvm.lvm("lvremove", "-q", "-y", "-f", str(job.read_from.ref))


def _rotate(job: _Job, dest: Path, format: str) -> None:
    """The snapshot becomes NAME.last-export, recorded with DEST. Until the operation's tag
    comes off at the end, recovery removes it: a kill in between leaves no base, and the next
    export is a full one."""
    snapshot = job.read_from
    last = VolumeRef(snapshot.vg, job.source.name + LAST_EXPORT_SUFFIX)
    # Only the base checked at the start (the VG lock was let go meanwhile): LVM selects it by
    # uuid and name under its lock, and removes nothing if it has gone.
    if job.last is not None:
        lvm.lvm("lvremove", "-q", "-y", "-f", "-S",
                f'lv_uuid={job.last.uuid} && lv_name="{job.last.name}"', job.last.vg)
    # A base is only ever read from the pool's metadata: it needs no device. (Renaming an
    # inactive LV is also much quicker: no device to suspend.)
    if extorigin.is_outside_clone(snapshot):
        extorigin.release(snapshot)
    else:
        lvm.lvm("lvchange", "-q", "-an", str(snapshot.ref))
    lvm.lvm("lvrename", "-q", snapshot.vg, snapshot.name, last.name)
    write_record(job.source.ref, next_record(job.record, job.base, last.name, snapshot.uuid,
                                             dest.resolve(), format))
    lvm.lvm("lvchange", "-q", "--deltag", job.entry.tag, "--addtag", tags.LAST_EXPORT, str(last))


def _find(name: str, lvs: list[LV], ref: VolumeRef) -> LV:
    for lv in lvs:
        if lv.name == name and not lv.internal and not lv.is_thin_pool \
                and not lv.op_tags:
            return lv
    raise NotFound(f"{ref.vg}/{name}: no such volume")


def _snapshot(op: Op, source: LV, *, active: bool, pool: LV) -> LV:
    """A read-only thin snapshot carrying the operation's tag: hidden, and removed by any
    recovery until the export commits it (or removes it)."""
    entry = op.entry
    ref = VolumeRef(source.vg, f"{source.name}.export-{entry.id}")
    if extorigin.is_outside_clone(source):
        return _outside_snapshot(op, source, ref, active=active, pool=pool)
    # -K: active now, though LVM's activation-skip flag (kept) leaves it down after a reboot.
    lvm.lvm("lvcreate", "-q", "-y", "-s", str(source.ref), "-n", ref.name, "-p", "r",
            "--addtag", entry.tag, "-K", "--config", growth.arming(pool.tags))
    dm = DeviceMapper()
    device = lvm.dm_name(ref.vg, ref.name)
    info = dm.info(device)
    if info is None or info.uuid is None:
        raise ThinstackError(f"{ref}: lvcreate made no active device {device}")
    return snapshot_made(source, ref, entry.tag, info.uuid, dm.table(device))


def snapshot_made(source: LV, ref: VolumeRef, tag: str, dm_uuid: str, table: Table) -> LV:
    """The read-only thin snapshot REF of SOURCE that lvcreate has just made and activated, as
    `lvs` would report it, from its device's dm uuid and table (ioctls): in a VG of 1,000
    volumes another `lvs` took 2 s in the lab. Its thin id and size are the kernel's."""
    thin = table.target
    if not isinstance(thin, ThinTarget):
        raise ThinstackError(f"{ref}: its device is not a thin volume: {table.render().strip()}")
    attr = "Vr" + source.attr[2:4] + "a-" + source.attr[6:9] + "k"  # LVM's thin snapshot
    return replace(source, name=ref.name, uuid=lvm.lv_uuid(dm_uuid), attr=attr,
                   size=table.size * SECTOR, origin=source.name, tags=frozenset({tag}),
                   path=f"/dev/{ref.vg}/{ref.name}",
                   dm_path=f"/dev/mapper/{lvm.dm_name(ref.vg, ref.name)}",
                   thin_id=thin.dev_id, skip_activation=True, open=False)


def _outside_snapshot(op: Op, source: LV, ref: VolumeRef, *, active: bool, pool: LV) -> LV:
    """The same for a clone of a device outside the VG. LVM sees the clone as inactive, so it
    would not suspend it while the pool takes the snapshot: that is done here, and LVM is told
    to skip the suspended device when it scans (it would wait on it). The snapshot reads the
    same origin, so it carries the same origin tags, and comes up through extorigin."""
    args = ["lvcreate", "-q", "-y", "-s", str(source.ref), "-n", ref.name, "-p", "r",
            "--addtag", op.entry.tag, *(a for t in sorted(source.tags)
                                     if t.startswith((tags.EXT_ORIGIN, tags.EXT_SIZE))
                                     for a in ("--addtag", t)),
            "--config", "devices{ignore_suspended_devices=1} "
                        + growth.arming(pool.tags)]
    if active:
        name = extorigin.dm_name(source)
        # Journalled before: a kill while it is suspended would leave its VM frozen, and LVM
        # commands would hang on it; the rollback resumes it.
        op.step(Step(StepKind.SUSPEND, f"{name} {extorigin.uuid(source)}"))
        with DeviceMapper().suspended(name):
            faults.point("export", "after-suspend")
            lvm.lvm(*args)
        op.step(Step(StepKind.RESUMED, name))
    else:
        lvm.lvm(*args)
    snap = lvm.lv(ref)
    extorigin.activate(snap, pool)
    return snap


def _partial(dest: Path) -> Path:
    """A new name for the temporary file the writer builds DEST in: journalled before the file
    exists, and given to the writer."""
    return dest.with_name(partial_name(dest))


# --- the record of the last incremental export -----------------------------------------------

def _record_path(ref: VolumeRef) -> Path:
    return state_dir() / "exports" / ref.vg / f"{ref.name}.json"


def read_record(ref: VolumeRef) -> Record | None:
    try:
        data = json.loads(_record_path(ref).read_text())
        return Record(**{**data, "chain": tuple(data["chain"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # none yet, or unreadable: either way the next export is full


def write_record(ref: VolumeRef, record: Record) -> None:
    write_atomically(_record_path(ref), json.dumps(asdict(record)).encode())


# --- one export per volume at a time, and recovery -------------------------------------------

def lock_path(ref: VolumeRef) -> Path:
    return run_dir() / "locks" / "export" / ref.vg / f"{ref.name}.lock"


@contextmanager
def export_lock(ref: VolumeRef):
    """Held for the whole export (flock: the kernel drops it when the holder dies)."""
    path = lock_path(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise Refused(f"{ref} is being exported by another thinstack process (pid {holder})"
                          "; try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _running(ref: VolumeRef) -> bool:
    return held(lock_path(ref))


def _earlier_exports(ref: VolumeRef, journal: Journal) -> list[Entry]:
    """Entries of exports of this volume left behind: dead, since we hold its export lock."""
    return [e for e in journal.pending(ref.vg)
            if e.op == "export" and e.args.get("name") == ref.name]


# An export rolls back as any operation does (recovery.plan): the device it suspended, its
# snapshot (tagged with the operation until the end), its temporary file.
_undo = recovery.roll_back


def running(entry: Entry) -> bool:
    """recovery.LIVE["export"]: whether the export of this entry may still be running (its
    volume's export lock is held). A dead one is rolled back by any recovery of its VG, and an
    explicit recovery refuses while it runs."""
    return _running(VolumeRef(entry.vg, entry.args["name"]))
