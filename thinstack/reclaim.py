"""Give a volume's all-zero chunks back to its pool: `thinstack reclaim VG/NAME`.

A guest that zeroed its free space, or anything that wrote zeros without discarding, leaves
chunks mapped that hold nothing. Reclaim reads only the chunks the thin mapping says are mapped
(mapping.read: one metadata snapshot), with O_DIRECT, and discards the all-zero ones: the pool
unmaps them, and they read as zeros as before.

It runs on a live volume, and a chunk read as zeros, then written by the VM, then discarded
would lose that write. So no discard is ever decided on an old read:
  1. scan, holding no lock and changing nothing: read every mapped chunk, keep the all-zero
     ones as candidates.
  2. under the VG lock, as an operation: a private thin device on the same pool and thin id
     (dm-thin lets a thin id be opened twice: its metadata counts the opens). Then for each
     batch of at most BATCH bytes of candidates: suspend the volume (I/O in flight completes,
     new I/O queues), re-read the candidates through the private device, discard those still
     all zeros, resume. No write can reach the volume between that re-read and the discard;
     the suspension lasts one bounded batch.
There is no simpler safe way: a discard cannot be made conditional on the chunk's content, and
the suspended volume itself can neither be read nor discarded. A kill leaves the volume
suspended and the private device up: both were journalled before they happened (a SUSPEND step,
the device in the entry's arguments), and any recovery of the VG resumes the one and removes the
other (recovery.Undo.RESUME, Undo.REMOVE_DEVICE).

Refused: volumes nothing may write (gold masters, read-only volumes), volumes over an external
origin (an unmapped chunk reads the origin, not zeros), live imports, inactive volumes, pools
that ignore discards, and pools that do not zero new chunks: there a later partial write into
a discarded chunk would show the disk's old bytes in the rest of it, where readers saw zeros.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from thinstack import extorigin, faults, lvm, mapping, tags, thinpool
from thinstack.copy import Buffer, _runs
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import Discards, PoolMode
from thinstack.dm.targets import ThinTarget
from thinstack.errors import NotFound, Refused, ThinstackError
from thinstack.extents import Kind
from thinstack.journal import Step, StepKind
from thinstack.lvm import LV, VolumeRef
from thinstack.operation import operation

OP = "reclaim"
BATCH = 16 << 20  # candidate bytes re-read per suspension: keeps each one to milliseconds
SCAN = 4 << 20  # bytes per read while scanning
BLKDISCARD = 0x1277  # _IO(0x12, 119)
DEVICE_SUFFIX = "-reclaim"  # a single dash: no LV's dm name ends so (LVM doubles them)
UUID_PREFIX = "TS-RECLAIM-"


# --- decisions (pure) --------------------------------------------------------------------------

def refusal(lv: LV, lvs: list[LV]) -> str | None:
    """Why `lv` (among its VG's `lvs`) cannot be reclaimed, or None."""
    if tags.GOLD in lv.tags:
        return f"{lv.ref} is a gold master: read-only, its clones share its chunks"
    if not lv.is_thin:
        return f"{lv.ref} is not a thin volume: only a pool's volumes map chunks"
    if lv.readonly:
        return f"{lv.ref} is read-only"
    if extorigin.is_outside_clone(lv) or lvm.external_origin(lv, lvs) is not None:
        return (f"{lv.ref} reads an external origin wherever it maps nothing: a discarded chunk "
                "would read the origin's bytes, not zeros")
    if tags.LIVE in lv.tags:
        return f"{lv.ref} is still being imported live; reclaim it once the copy has finished"
    return None


def zero_chunks(data: bytes | bytearray, base: int, length: int, offset: int, chunk: int
                ) -> Iterator[int]:
    """The volume offsets of the whole all-zero chunks in data[base:base + length], which was
    read at `offset` (a chunk boundary). A partial chunk (at the volume's end) is never one."""
    zeros = memoryview(bytes(chunk))
    for lo, hi, zero in _runs(data, base, length, chunk, zeros):
        if zero:
            yield from range(offset + lo, offset + hi - (hi - lo) % chunk, chunk)


def ranges(chunks: Sequence[int], chunk: int) -> list[tuple[int, int]]:
    """Sorted chunk offsets as (offset, length) runs of adjacent chunks."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1] = (out[-1][0], out[-1][1] + chunk)
        else:
            out.append((c, chunk))
    return out


def batches(chunks: Sequence[int], chunk: int, limit: int = BATCH) -> list[Sequence[int]]:
    """Sorted chunk offsets in batches of at most `limit` bytes (at least one chunk each)."""
    per = max(1, limit // chunk)
    return [chunks[i:i + per] for i in range(0, len(chunks), per)]


# --- the operation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    volume: str
    chunk_size: int
    bytes_mapped: int  # what the mapping held before
    bytes_scanned: int
    candidate_chunks: int  # all zeros when scanned
    discarded_chunks: int  # still all zeros under suspension, and discarded
    bytes_discarded: int
    pool_used_before: int
    pool_used_after: int
    suspensions: int
    longest_suspension: float  # seconds
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def reclaim(ref: VolumeRef) -> Summary:
    started = time.monotonic()
    lvs = lvm.volumes_of(ref.vg)
    lv = _find(ref, lvs)
    pool = lvm.volume_pool(lv, lvs)
    device = thinpool.kernel_pool(pool)
    if device is None or not extorigin.active(lv):
        raise Refused(f"{ref} is not active: activate it to reclaim it")
    status = device.status()
    if status.mode is PoolMode.RO or (status.mode is PoolMode.OUT_OF_DATA_SPACE
                                      and not status.error_if_no_space):
        # A suspension would wait on the writes a full pool queues; a read-only one discards
        # nothing.
        raise Refused(f"{pool.ref} is {status.mode.value}: grow or repair it first")
    if status.discards is Discards.IGNORED:
        raise Refused(f"{pool.ref} ignores discards: let it take them first (`lvchange "
                      f"--discards nopassdown {pool.ref}`, or passdown)")
    before = status.used_data_blocks * pool.chunk_size
    assert lv.thin_id is not None  # refusal(): a thin volume
    mapped, _ = mapping.read(pool, lv.thin_id, device=device)
    chunk = mapping.block_size(mapped)
    try:
        candidates, scanned = _scan(lv.path, mapping.mapped_extents(mapped, lv.size), chunk)
    except OSError as e:  # a read error of the volume: nothing changed yet
        raise ThinstackError(f"{ref}: reading it: {e.strerror}") from None
    discarded, suspensions, longest = 0, 0, 0.0
    if candidates:
        discarded, suspensions, longest = _discard(lv, candidates, chunk)
    after = device.status().used_data_blocks * pool.chunk_size
    return Summary(str(ref), chunk, mapped.mapped_blocks * chunk, scanned, len(candidates),
                   discarded, discarded * chunk, before, after, suspensions, round(longest, 3),
                   round(time.monotonic() - started, 3))


def _find(ref: VolumeRef, lvs: list[LV]) -> LV:
    lv = next((lv for lv in lvs if lv.name == ref.name and not lv.internal and not lv.op_tags
               and not lv.is_thin_pool), None)
    if lv is None:
        raise NotFound(f"{ref}: no such volume")
    why = refusal(lv, lvs)
    if why:
        raise Refused(why)
    pool = next((p for p in lvs if p.name == lv.pool), None)
    if pool is not None and pool.attr[7] != "z":
        raise Refused(f"{pool.ref} does not zero new chunks: a later write into a discarded "
                      "chunk would show the disk's old bytes beside it")
    return lv


def _scan(path: str, extents, chunk: int) -> tuple[array, int]:
    """Step 1: the offsets of the all-zero mapped chunks (8 bytes each: a TiB of zeros in 64 KiB
    chunks is 128 MiB of them), and the bytes read."""
    step = max(chunk, SCAN - SCAN % chunk)
    buf = Buffer(step)
    found = array("q")
    scanned = 0
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for e in extents:
            if e.kind is not Kind.DATA:
                continue
            for offset in range(e.offset, e.end, step):
                n = min(step, e.end - offset)
                _read(fd, buf, offset, n)
                scanned += n
                found.extend(zero_chunks(buf.raw, buf.base, n, offset, chunk))
    finally:
        os.close(fd)
    return found, scanned


def _read(fd: int, buf: Buffer, offset: int, length: int) -> None:
    got = os.preadv(fd, [buf.view[:length]], offset)
    if got != length:
        raise ThinstackError(f"short read at {offset}: {got} of {length} bytes")


def _discard(source: LV, candidates: Sequence[int], chunk: int) -> tuple[int, int, float]:
    """Step 2, as an operation under the VG lock: (chunks discarded, suspensions, the longest
    suspension in seconds)."""
    dm = DeviceMapper()
    name = os.path.basename(source.dm_path)
    private, uuid = name + DEVICE_SUFFIX, UUID_PREFIX + name

    def checked(lvs: list[LV]) -> dict:
        # The VG lock was not held while scanning: it must still be the volume scanned.
        lv = _find(source.ref, lvs)
        if (lv.uuid, lv.thin_id, lv.size) != (source.uuid, source.thin_id, source.size):
            raise Refused(f"{source.ref} was replaced or resized while it was scanned; run "
                          "reclaim again")
        return dict(name=source.name, private_device=private, private_uuid=uuid)

    with operation(OP, source.vg, checked, at=source.name) as op:
        info = dm.info(name)
        table = dm.table(name)
        if info is None or not isinstance(table.target, ThinTarget) or table.target.origin:
            raise Refused(f"{source.ref}: its device is not a plain thin device")
        op.step(Step(StepKind.SUSPEND, f"{name} {info.uuid}"))  # before any suspension
        dm.create(private, table, uuid=uuid)
        faults.point(OP, "after-device")
        try:
            result = _batches(dm, name, f"/dev/mapper/{private}", candidates, chunk)
        except OSError as e:  # rolled back: the volume resumed, the device removed
            raise ThinstackError(f"{source.ref}: {e.strerror}") from None
        finally:
            dm.remove(private)
        op.commit()
    return result


def _batches(dm: DeviceMapper, name: str, path: str, candidates: Sequence[int], chunk: int
             ) -> tuple[int, int, float]:
    discarded, suspensions, longest = 0, 0, 0.0
    buf = Buffer(min(BATCH, len(candidates) * chunk) // chunk * chunk or chunk)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    try:
        for batch in batches(candidates, chunk, len(buf.view)):
            started = time.monotonic()
            with dm.suspended(name):
                still: list[int] = []
                for offset, length in ranges(batch, chunk):
                    _read(fd, buf, offset, length)
                    still += zero_chunks(buf.raw, buf.base, length, offset, chunk)
                for offset, length in ranges(still, chunk):
                    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
                discarded += len(still)
                faults.point(OP, "mid-batch")
            suspensions += 1
            longest = max(longest, time.monotonic() - started)
    finally:
        os.close(fd)
    return discarded, suspensions, longest
