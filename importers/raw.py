"""Raw images: the file is the disk. Its allocation map is the file system's (SEEK_DATA/SEEK_HOLE);
a block device, or a file system that cannot tell, is all data."""

from __future__ import annotations

import os
from collections.abc import Iterator

from thinstack.extents import Extent, Kind

from . import DEFAULT_POLICY, ImageError, Policy, Source


def probe(head: bytes, tail: bytes) -> bool:
    # Anything is a raw image; FORMATS asks every other driver first.
    return True


def open(target: str | os.PathLike | Source, policy: Policy = DEFAULT_POLICY) -> RawImage:
    source = Source.of(target)
    if source.size > policy.max_virtual_size:
        source.close()
        raise ImageError(source.path, f"size {source.size} exceeds the policy's "
                                      f"{policy.max_virtual_size}")
    return RawImage(source)


class RawImage:
    format = "raw"

    def __init__(self, source: Source):
        self.source = source
        self.path = source.path
        self.virtual_size = source.size

    def extents(self) -> Iterator[Extent]:
        for start, end, data in self.source.segments(0, self.virtual_size):
            yield Extent(start, end - start, Kind.DATA if data else Kind.HOLE)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the virtual "
                                        f"size {self.virtual_size}")
        return self.source.read_at(offset, length, "data")

    def close(self) -> None:
        self.source.close()
