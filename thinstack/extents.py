"""The one seam between image formats and volumes: a stream of extents.

Importers describe an image as extents taken from the format's allocation map; the volume side
describes a thin device the same way from its thin mapping. One copy loop moves them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class Kind(enum.Enum):
    DATA = "data"  # bytes are stored; read them
    ZERO = "zero"  # known to read as zeros (a qcow2 zero cluster, VHD bits clear in a bitmap...)
    HOLE = "hole"  # nothing allocated: reads as zeros, or from a parent the importer already merged


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.offset + self.length


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge adjacent extents of the same kind; drop empty ones. Input must be in offset order."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if pending is not None and pending.kind is ext.kind and pending.end == ext.offset:
            pending = Extent(pending.offset, pending.length + ext.length, ext.kind)
            continue
        if pending is not None:
            if ext.offset < pending.end:
                raise ValueError(f"extents overlap or go backwards at offset {ext.offset}")
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def fill_gaps(extents: Iterable[Extent], size: int) -> Iterator[Extent]:
    """Yield extents covering [0, size) exactly, with HOLE wherever the input says nothing."""
    pos = 0
    for ext in extents:
        if ext.offset < pos:
            raise ValueError(f"extents overlap or go backwards at offset {ext.offset}")
        if ext.offset > pos:
            yield Extent(pos, ext.offset - pos, Kind.HOLE)
        end = min(ext.end, size)
        if end > ext.offset:
            yield Extent(ext.offset, end - ext.offset, ext.kind)
        pos = max(pos, end)
        if pos >= size:
            return
    if pos < size:
        yield Extent(pos, size - pos, Kind.HOLE)
