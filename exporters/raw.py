"""Write raw images: the disk's bytes at their offsets in a sparse file. Zeros are never written,
so holes and zero ranges stay holes of the file system."""

from __future__ import annotations

import os
from pathlib import Path

from thinstack.extents import Extent

from . import ExportError
from .atomic import FileWriter
from .layout import Layout, Piece, data_chunks

# Zero runs at least this long become holes; a file system allocates in blocks of 4 KiB at most.
ZERO_CHUNK = 64 << 10
_ZEROS = bytes(ZERO_CHUNK)


def create(path: str | os.PathLike, virtual_size: int, *, partial: str | None = None, **_
           ) -> RawWriter:
    if virtual_size < 0:
        raise ExportError(f"negative virtual size {virtual_size}")
    return RawWriter(Path(path), virtual_size, partial)


class RawWriter(FileWriter):
    def write(self, offset: int, data: bytes) -> None:
        self._advance(offset, len(data))
        view = memoryview(data).cast("B")
        # Write the stretches between all-zero chunks; the chunks stay holes.
        start = pos = 0
        while pos < len(view):
            # Compared as bytes: comparing memoryviews goes element by element, 50 times slower.
            chunk = view[pos:pos + ZERO_CHUNK].tobytes()
            if chunk == _ZEROS[:len(chunk)]:
                if pos > start:
                    self.file.pwrite(view[start:pos], offset + start)
                start = pos + len(chunk)
            pos += len(chunk)
        if pos > start:
            self.file.pwrite(view[start:pos], offset + start)

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)  # the file is new: what is never written is a hole

    def _finish(self) -> None:
        self.file.truncate(self.size)


def layout(size: int, extents: list[Extent], chunk: int, **_) -> Layout:
    """The disk's bytes at their offsets: the mapped chunks are the data, the rest holes."""
    return Layout(size, (Piece(e.offset, e.length, e.offset)
                         for e in data_chunks(extents, size, chunk)))
