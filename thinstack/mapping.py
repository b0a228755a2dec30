"""The volume side of the seam: a thin device's content as extents, read from its thin mapping.

A thin device reads zeros wherever nothing is mapped, so `thin_dump` of the device says all
there is to read: mapped blocks are DATA, the rest HOLE. `thin_delta` between an older device
(a snapshot) and a newer one says what an image of the older needs to become the newer: blocks
mapped differently or newly mapped are DATA; blocks only the older one maps were discarded
since and read as zeros now, so they are ZERO, which a differencing image must store or the
parent's old bytes would show through. Unchanged blocks are HOLE: the parent's bytes stand.

The tools count in pool blocks; extents are in bytes and clipped to the device's size (a device
shrunk since keeps, and thin_delta reports, mappings past its end).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from thinstack import thinpool
from thinstack.dm import tools
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError
from thinstack.dm.pool import Pool
from thinstack.errors import Refused, ThinstackError
from thinstack.extents import Extent, Kind, coalesce, fill_gaps
from thinstack.lvm import LV
from thinstack.sizes import SECTOR

# The pool lends its one metadata snapshot to one reader at a time; another export, `list` or
# the monitor may hold it for a moment.
METADATA_SNAP_WAIT = 60.0

T = TypeVar("T")

_DELTA_KINDS = {tools.DeltaKind.DIFFERENT: Kind.DATA, tools.DeltaKind.RIGHT_ONLY: Kind.DATA,
                tools.DeltaKind.LEFT_ONLY: Kind.ZERO}


def block_size(report: tools.ThinRanges | tools.ThinDelta) -> int:
    """The pool's block size in bytes."""
    return report.data_block_size * SECTOR


def mapped_extents(mapped: tools.ThinRanges, size: int) -> Iterator[Extent]:
    """[0, size) of the thin device: DATA where it maps blocks, HOLE elsewhere."""
    unit = block_size(mapped)
    return fill_gaps((Extent(r.begin * unit, r.length * unit, Kind.DATA)
                      for r in mapped.ranges), size)


def changed_extents(delta: tools.ThinDelta, size: int, *, unmapped_reads_zero: bool = True
                    ) -> Iterator[Extent]:
    """[0, size) of the newer device (delta.right) against the older (delta.left): DATA where
    it changed, ZERO where it was discarded since, HOLE where it is as it was.

    unmapped_reads_zero is False for a thin device over an external origin: there a block
    discarded since reads the origin's bytes again, which must be copied like any change."""
    unit = block_size(delta)
    kinds = {**_DELTA_KINDS,
             tools.DeltaKind.LEFT_ONLY: Kind.ZERO if unmapped_reads_zero else Kind.DATA}
    changed = sorted((r for r in delta.ranges if r.kind is not tools.DeltaKind.SAME),
                     key=lambda r: r.begin)
    return fill_gaps(coalesce(Extent(r.begin * unit, r.length * unit, kinds[r.kind])
                              for r in changed), size)


def block_count(extents: list[Extent], unit: int) -> int:
    """Pool blocks of `unit` bytes covered by the DATA and ZERO extents (which start and end on
    blocks, or at the device's end)."""
    return sum(-(-e.length // unit) for e in extents if e.kind is not Kind.HOLE)


# --- reading the pool's metadata ---------------------------------------------------------------

def read(pool: LV, thin_id: int, base_id: int | None = None, *, device: Pool | None = None
         ) -> tuple[tools.ThinRanges, tools.ThinDelta | None]:
    """Thin device `thin_id`'s mappings and, given a base, how it differs from thin device
    `base_id`: both from one metadata snapshot of the live pool. `device`: the pool's kernel
    device (thinpool.kernel_pool), if the caller has it already."""
    def both(metadata: str) -> tuple[tools.ThinRanges | None, tools.ThinDelta | None]:
        mapped = tools.thin_ranges(metadata, thin_id)
        return mapped, None if base_id is None else tools.thin_delta(metadata, base_id, thin_id)

    mapped, delta = _reading(pool, device, both)
    if mapped is None:
        raise ThinstackError(f"{pool.ref}: thin device {thin_id} is not in the pool")
    return mapped, delta


def read_delta(pool: LV, base_id: int, thin_id: int, *, device: Pool | None = None
               ) -> tools.ThinDelta:
    """How thin device `thin_id` differs from `base_id`: thin_delta alone, which is all an
    incremental export needs (its mapped total comes from the kernel's status of the device)."""
    return _reading(pool, device, lambda metadata: tools.thin_delta(metadata, base_id, thin_id))


def _reading(pool: LV, device: Pool | None, read: Callable[[str], T]) -> T:
    """`read(metadata device)` while holding the pool's metadata snapshot, waiting a while for
    another reader that holds it."""
    device = device or thinpool.kernel_pool(pool)
    if device is None:
        raise Refused(f"{pool.ref} is not active: activate it (`thinstack pool attach "
                      f"{pool.vg}`) first")
    metadata = device.metadata_path
    deadline = time.monotonic() + METADATA_SNAP_WAIT
    while True:
        try:
            with device.metadata_snap():
                return read(metadata)
        except (CommandError, DmError) as e:
            # Held after our attempt failed (ours is released however it ends): another reader
            # has it. Wait for it a while; a reader that died holding it never lets go.
            if device.status().held_metadata_root is None:
                raise ThinstackError(f"{pool.ref}: {e}") from None
            if time.monotonic() > deadline:
                raise Refused(str(e)) from None
        time.sleep(0.2)
