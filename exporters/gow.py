"""Write GOW v1/v2/v3 images (layout: importers.gow, docs/formats/gow.md).

Blocks are assembled one at a time as the ordered writes reach them and appended to the data
area in logical order; a block that ends up all zeros is left unallocated. A v3 image written
over a parent (the previous v3 export of the same disk) is a full image of the next session:
blocks this session wrote or zeroed carry the new session number, every other block is copied
from the parent with the parent's data and version.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

from thinstack.extents import Extent
from thinstack.importers import ImageError
from thinstack.importers import gow as fmt

from . import ExportError
from .atomic import FileWriter
from .layout import Layout, Piece, runs

FORMATS = {"gow1": 1, "gow2": 2, "gow3": 3}
_BLOCK = fmt.BLOCK_SIZE
_EMPTY = bytes(_BLOCK)


def create(path: str | os.PathLike, virtual_size: int, *, format: str = "gow3",
           parent: str | os.PathLike | None = None, partial: str | None = None, **_
           ) -> GowWriter:
    if format not in FORMATS:
        raise ExportError(f"not a GOW format: {format!r}")
    version = _check(format, virtual_size)
    if parent is not None and version != 3:
        raise ExportError(f"{format} has no sessions, so it cannot be written over a parent")
    return GowWriter(Path(path), virtual_size, version, None if parent is None else Path(parent),
                     partial)


def _check(format: str, size: int) -> int:
    """The version of `format`, which must hold `size` bytes."""
    version = FORMATS[format]
    limit = fmt.ENTRIES[version] * _BLOCK
    if not 0 < size <= limit:
        raise ExportError(f"{format} holds 1 to {limit} bytes, not {size}")
    return version


def fits(format: str, size: int) -> bool:
    return 0 < size <= fmt.ENTRIES[FORMATS[format]] * _BLOCK


def layout(size: int, extents: list[Extent], chunk: int, *, format: str = "gow3") -> Layout:
    """What GowWriter (no parent) writes for a disk whose data is `extents`: a data slot for
    every block the data touches, in disk order; a v3 image is session 1, every written block
    of that version."""
    version = _check(format, size)
    header = fmt.Header(version, size, 1 if version == 3 else 0)
    table = array("I", [0]) * header.blocks
    versions = array("I", [0]) * header.blocks
    pieces: list[Piece] = []
    slots = 0
    for first, stop in runs(extents, size, chunk, _BLOCK):
        table[first:stop] = array("I", range(slots + 1, slots + 1 + stop - first))
        versions[first:stop] = array("I", [header.session]) * (stop - first)
        pieces.append(Piece(header.data_offset + slots * _BLOCK,
                            min(stop * _BLOCK, size) - first * _BLOCK, first * _BLOCK))
        slots += stop - first
    meta = [Piece(0, fmt.HEADER_SIZE, None, header.pack()),
            Piece(fmt.HEADER_SIZE, 4 * header.blocks, None, fmt.table_bytes(table))]
    if version == 3:
        meta.append(Piece(header.versions_offset, 4 * header.blocks, None,
                          fmt.table_bytes(versions)))
    return Layout(header.data_offset + slots * _BLOCK, [*meta, *pieces])


class GowWriter(FileWriter):
    parent: fmt.GowImage | None

    def __init__(self, path: Path, size: int, version: int, parent: Path | None,
                 partial: str | None = None):
        self.parent = None if parent is None else _open_parent(parent)
        session = self.parent.session + 1 if self.parent else (1 if version == 3 else 0)
        self.header = fmt.Header(version, size, session)
        blocks = self.header.blocks
        self.map = array("I", [0]) * blocks
        self.versions = array("I", [0]) * blocks
        self.slots = 0  # data slots used so far
        self.block = -1  # the block being assembled in self.buffer
        self.buffer = bytearray()
        self.settled = 0  # blocks before this one are final
        super().__init__(path, size, partial)

    def write(self, offset: int, data: bytes) -> None:
        self._advance(offset, len(data))
        pos, end = offset, offset + len(data)
        while pos < end:
            index, within = divmod(pos, _BLOCK)
            stop = min(end, pos - within + _BLOCK)
            self._enter(index)[within:within + stop - pos] = data[pos - offset:stop - offset]
            pos = stop

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, _BLOCK)
            stop = min(end, pos - within + _BLOCK)
            if within == 0 and stop == min(self.header.size, pos + _BLOCK):
                self._zero_block(index)
            elif self.parent is not None:  # without a parent nothing written here is non-zero
                self._enter(index)[within:within + stop - pos] = bytes(stop - pos)
            pos = stop

    def _enter(self, index: int) -> bytearray:
        """The buffer of block `index`, starting from the parent's content."""
        if index != self.block:
            self._flush()
            self._settle(index)
            self.block = index
            self.buffer = bytearray(self._parent_block(index) or _EMPTY)
            self.settled = index + 1
        return self.buffer

    def _zero_block(self, index: int) -> None:
        """A whole block reads as zeros: unallocated, and changed if the parent had data."""
        self._flush()
        self._settle(index)
        if self._parent_block(index) is not None:
            self.versions[index] = self.header.session
        self.settled = index + 1

    def _flush(self) -> None:
        if self.block < 0:
            return
        if self.buffer != _EMPTY:
            self._store(self.block, self.buffer)
        self.versions[self.block] = self.header.session
        self.block = -1

    def _settle(self, upto: int) -> None:
        """Blocks this session did not touch, up to `upto`, stay as the parent has them."""
        if self.parent is not None:
            versions = self.parent.block_versions()  # a parent is v3: _open_parent checks
            for index in range(self.settled, min(upto, self.parent.header.blocks)):
                self.versions[index] = versions[index]
                data = self._parent_block(index)
                if data is not None:
                    self._store(index, data)
        self.settled = max(self.settled, upto)

    def _parent_block(self, index: int) -> bytes | bytearray | None:
        if self.parent is None or index >= self.parent.header.blocks:
            return None
        data = self.parent.block(index)
        return None if data is None else _past_end_zeroed(data, index, self.parent.virtual_size)

    def _store(self, index: int, data: bytes | bytearray) -> None:
        data = _past_end_zeroed(data, index, self.header.size)
        self.file.pwrite(data, self.header.data_offset + self.slots * _BLOCK)
        self.slots += 1
        self.map[index] = self.slots

    def _finish(self) -> None:
        self._flush()
        self._settle(self.header.blocks)
        header = self.header
        self.file.pwrite(header.pack(), 0)
        self.file.pwrite(fmt.table_bytes(self.map), fmt.HEADER_SIZE)
        if header.version == 3:
            self.file.pwrite(fmt.table_bytes(self.versions), header.versions_offset)
        self.file.truncate(header.data_offset + self.slots * _BLOCK)


def _past_end_zeroed(data: bytes | bytearray, index: int, size: int) -> bytes | bytearray:
    """The last block of a disk keeps zeros past the disk's end, so they read as zeros should a
    later session grow the disk."""
    used = size - index * _BLOCK
    return data if used >= _BLOCK else bytes(data[:used]).ljust(_BLOCK, b"\0")


def _open_parent(parent: Path) -> fmt.GowImage:
    try:
        image = fmt.open(parent)
    except ImageError as e:
        raise ExportError(f"cannot use {parent} as the parent: {e.message}") from None
    if image.version != 3 or image.session == 0xFFFFFFFF:
        image.close()
        raise ExportError(f"parent {parent} is GOW v{image.version} at session {image.session}; "
                          f"only v3 has sessions, and they end at 2^32 - 1")
    return image
