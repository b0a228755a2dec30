"""An image file computed from a volume's mapping instead of written: the `Layout` of a format.

A layout lists the pieces of the file an exporter would write for a volume whose data lies in
the given extents: metadata (headers, tables, bitmaps) as bytes, data as "the volume's bytes at
this offset". Whatever no piece covers reads as zeros. Reading any range of the file is then a
few slices and preads, at any offset and size, with nothing written anywhere: what the FUSE
mount (thinstack.mount) serves. Each format module computes its own: `layout(size, extents,
chunk)`, beside its streaming writer and from the same header and table code.

The extents are the export's (exports.volume_extents): DATA where the thin pool maps blocks.
The writers also leave out chunks the copy finds all zeros, which a layout cannot know without
reading them; so a layout is byte for byte the export when no mapped chunk holds only zeros,
and otherwise the same disk with such chunks stored as data.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from thinstack.copy import aligned
from thinstack.extents import Extent, Kind

Read = Callable[[int, int], bytes]  # pread of the volume: (offset, length) -> bytes


@dataclass(frozen=True, slots=True)
class Piece:
    offset: int  # in the image file
    length: int
    source: int | None  # the volume's offset it reads from; None: `data` holds its bytes
    data: bytes = b""

    @property
    def end(self) -> int:
        return self.offset + self.length


class Layout:
    """An image file of `size` bytes made of `pieces` (in file order, not overlapping)."""

    def __init__(self, size: int, pieces: Iterable[Piece]):
        self.size = size
        self.pieces = [p for p in pieces if p.length > 0]
        self.ends = [p.end for p in self.pieces]
        self.stored = sum(p.length for p in self.pieces)  # bytes not in holes: for st_blocks
        for before, after in zip(self.pieces, self.pieces[1:], strict=False):
            if after.offset < before.end:
                raise ValueError(f"pieces overlap at file offset {after.offset}")
        if self.pieces and self.pieces[-1].end > size:
            raise ValueError(f"a piece ends past the file's {size} bytes")

    def read(self, offset: int, length: int, volume: Read) -> bytes:
        """The file's bytes in [offset, offset + length), short past the end."""
        end = min(self.size, offset + length)
        if end <= offset:
            return b""
        i = bisect.bisect_right(self.ends, offset)
        # The common case, a read inside one data run: the volume's bytes as they come.
        if i < len(self.pieces):
            p = self.pieces[i]
            if p.source is not None and p.offset <= offset and end <= p.end:
                return volume(p.source + offset - p.offset, end - offset)
        out = bytearray(end - offset)
        while i < len(self.pieces) and self.pieces[i].offset < end:
            p = self.pieces[i]
            lo, hi = max(p.offset, offset), min(p.end, end)
            if p.source is None:
                out[lo - offset:hi - offset] = p.data[lo - p.offset:hi - p.offset]
            else:
                out[lo - offset:hi - offset] = volume(p.source + lo - p.offset, hi - lo)
            i += 1
        return bytes(out)

    def seek(self, offset: int, data: bool) -> int:
        """lseek's SEEK_DATA (data=True) or SEEK_HOLE from `offset`: the pieces are the data,
        everything else a hole. OSError(ENXIO) at or past the end, or when no data follows."""
        if not 0 <= offset < self.size:
            raise OSError(errno.ENXIO, "offset past the end")
        i = bisect.bisect_right(self.ends, offset)
        if data:
            if i == len(self.pieces):
                raise OSError(errno.ENXIO, "no data past the offset")
            return max(offset, self.pieces[i].offset)
        pos = offset
        while i < len(self.pieces) and self.pieces[i].offset <= pos:
            pos = self.pieces[i].end
            i += 1
        return min(pos, self.size)


def data_chunks(extents: Iterable[Extent], size: int, chunk: int) -> list[Extent]:
    """The DATA an export copies: widened to whole chunks of the pool, as copy.aligned does."""
    return [e for e in aligned(extents, size=size, chunk=chunk) if e.kind is Kind.DATA]


def runs(extents: Iterable[Extent], size: int, chunk: int, unit: int) -> list[tuple[int, int]]:
    """Ranges [first, last + 1) of `unit`-sized units (clusters, blocks) the DATA touches."""
    out: list[tuple[int, int]] = []
    for e in data_chunks(extents, size, chunk):
        first, stop = e.offset // unit, -(-e.end // unit)
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((first, stop))
    return out


def merge(pieces: Iterable[Piece]) -> list[Piece]:
    """Join data pieces that continue each other in the file and in the volume."""
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.source is not None and p.source is not None \
                and last.end == p.offset and last.source + last.length == p.source:
            out[-1] = Piece(last.offset, last.length + p.length, last.source)
        else:
            out.append(p)
    return out
