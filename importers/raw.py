"""Raw images: the file is the disk. Its allocation map is the file system's (SEEK_DATA/SEEK_HOLE);
a block device, or a file system that cannot tell, is all data."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from thinstack.extents import Extent, Kind

from . import ImageError, Policy, Source


def probe(head: bytes, tail: bytes) -> bool:
    # Anything is a raw image; FORMATS asks every other driver first.
    return True


def open(path: str | os.PathLike, policy: Policy = Policy()) -> RawImage:
    path = Path(path)
    source = Source(path)
    if source.size > policy.max_virtual_size:
        source.close()
        raise ImageError(path, f"size {source.size} exceeds the policy's {policy.max_virtual_size}")
    return RawImage(source)


class RawImage:
    format = "raw"

    def __init__(self, source: Source):
        self.source = source
        self.path = source.path
        self.virtual_size = source.size
        self.block_device = stat.S_ISBLK(os.fstat(source.file.fileno()).st_mode)

    def extents(self) -> Iterator[Extent]:
        size, fd = self.virtual_size, self.source.file.fileno()
        pos = 0
        while pos < size:
            if self.block_device:
                data, hole = pos, size
            else:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:  # no SEEK_DATA here: all of it is data
                        yield Extent(pos, size - pos, Kind.DATA)
                        return
                    data = size  # only a hole from pos to the end
                hole = os.lseek(fd, data, os.SEEK_HOLE) if data < size else size
            if data > pos:
                yield Extent(pos, min(data, size) - pos, Kind.HOLE)
            if data < size:
                yield Extent(data, min(hole, size) - data, Kind.DATA)
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the virtual "
                                        f"size {self.virtual_size}")
        return self.source.read_at(offset, length, "data")

    def close(self) -> None:
        self.source.close()
