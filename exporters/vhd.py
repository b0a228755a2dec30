"""Write VHD images: dynamic (sparse, 2 MiB blocks), fixed, and differencing over an earlier
export. Structures and checksums are the importer's (importers.vhd)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from array import array
from pathlib import Path

from thinstack.extents import Extent, Kind
from thinstack.importers import ImageError
from thinstack.importers import vhd as fmt
from thinstack.sizes import SECTOR, round_up

from . import ExportError
from .atomic import FileWriter
from .layout import Layout, Piece, data_chunks

BLOCK_SIZE = 2 << 20
# The spec's limit (and QEMU's): 2040 GiB.
MAX_SIZE = 0xFF000000 * SECTOR
# QEMU (7.2, as Debian 12 ships it) sizes a disk by CHS unless its creator is one it knows to
# use current_size ("win ", "qem2", "d2v ", "CTXS", "tap\0"): with an own tag such as "tnst",
# qemu-img sees a smaller disk than we wrote (tested). Hyper-V's tag is the one every reader
# knows to mean current_size.
CREATOR_APP = b"win "
CREATOR_VERSION = 0x00000001  # thinstack 0.1
# The spec knows only Windows and Macintosh hosts; readers expect one of them.
CREATOR_OS = b"Wi2k"


def create(path: str | os.PathLike, virtual_size: int, *, format: str = "vhd",
           parent: str | os.PathLike | None = None, round_to_mib: bool = False,
           partial: str | None = None, **_):
    if round_to_mib:
        virtual_size = round_up(virtual_size, 1 << 20)
    if virtual_size % SECTOR or not 0 < virtual_size <= MAX_SIZE:
        raise ExportError(f"VHD size {virtual_size} is not a whole number of sectors up to "
                          f"{MAX_SIZE} bytes")
    if format == "vhd-fixed":
        if parent is not None:
            raise ExportError("a fixed VHD cannot have a parent")
        return FixedWriter(Path(path), virtual_size, partial)
    if format != "vhd":
        raise ExportError(f"not a VHD format: {format!r}")
    if parent is not None and Path(parent).resolve() == Path(path).resolve():
        raise ExportError(f"{path} cannot be its own parent")
    return DynamicWriter(Path(path), virtual_size, None if parent is None else Path(parent),
                         partial)


def geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track for `size` bytes: the spec's appendix algorithm,
    which rounds down, saturating at 65535/16/255."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cylinders_heads = total // sectors
    else:
        sectors = 17
        cylinders_heads = total // sectors
        heads = max(4, -(-cylinders_heads // 1024))
        if cylinders_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinders_heads = total // sectors
        if cylinders_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinders_heads = total // sectors
    return cylinders_heads // heads, heads, sectors


def _footer(disk_type: int, size: int, data_offset: int = fmt.NO_OFFSET) -> fmt.Footer:
    return fmt.Footer(disk_type=disk_type, current_size=size, geometry=geometry(size),
                      uuid=uuid.uuid4().bytes, data_offset=data_offset, original_size=size,
                      timestamp=_timestamp(time.time()), creator_app=CREATOR_APP,
                      creator_version=CREATOR_VERSION, creator_os=CREATOR_OS)


def _timestamp(unix: float) -> int:
    return max(0, int(unix) - fmt.EPOCH) & 0xFFFFFFFF


class FixedWriter(FileWriter):
    """The disk's bytes as they are, then the footer. Unwritten ranges stay holes of the
    (sparse) file and read as zeros."""

    def write(self, offset: int, data: bytes) -> None:
        self._advance(offset, len(data))
        self.file.pwrite(data, offset)

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)

    def _finish(self) -> None:
        self.file.truncate(self.size)
        self.file.pwrite(_footer(fmt.FIXED, self.size).pack(), self.size)


class DynamicWriter(FileWriter):
    """Footer copy, header, BAT, parent locators, then a block (bitmap + 2 MiB) for each block
    that receives a sector, allocated as the ordered writes reach it; the footer last.

    With a parent this is a differencing disk: a sector it holds hides the parent's, so a
    sector partly written takes the parent's bytes for the rest, and a range marked zero where
    the parent has data is stored as zeros."""

    parent: fmt.VhdImage | None

    def __init__(self, path: Path, size: int, parent: Path | None, partial: str | None = None):
        self.bitmap_bytes = fmt.bitmap_size(BLOCK_SIZE)
        self.bat = array("I", [fmt.UNALLOCATED]) * -(-size // BLOCK_SIZE)
        self.table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
        end = self.table_offset + round_up(len(self.bat) * 4, SECTOR)
        self.parent = None
        self.locators: tuple[fmt.Locator, ...] = ()
        self.locator_data: list[bytes] = []
        if parent is not None:
            for platform, name in _locator_paths(path, parent):
                data = name.encode("utf-16-le")
                space = round_up(len(data), SECTOR)
                self.locators += (fmt.Locator(platform, space // SECTOR, len(data), end),)
                self.locator_data.append(data)
                end += space
            self.parent = _open_parent(parent)
            self.parent_path = parent
        self.next_block = end
        self.block = -1  # the block whose bitmap is being filled
        self.bitmap = bytearray(self.bitmap_bytes)
        super().__init__(path, size, partial)

    def write(self, offset: int, data: bytes) -> None:
        self._advance(offset, len(data))
        self._store(offset, len(data), data)

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)
        if self.parent is None:
            return  # a range no block holds reads as zeros
        for ext in self.parent.extents(offset, offset + length):
            if ext.kind is Kind.DATA:
                self._store(ext.offset, ext.length, None)

    def _store(self, offset: int, length: int, data: bytes | None) -> None:
        """Make [offset, offset + length) hold `data`, or zeros when None."""
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // BLOCK_SIZE
            stop = min(end, (index + 1) * BLOCK_SIZE)
            base = self._enter(index) - index * BLOCK_SIZE  # file offset of disk offset 0
            if self.parent is not None:
                # Only the range's first and last sectors can be partly covered.
                for sector in {pos // SECTOR, (stop - 1) // SECTOR}:
                    partial = sector * SECTOR < pos or stop < (sector + 1) * SECTOR
                    if partial and not self._holds(sector):
                        self._copy_from_parent(self.parent, sector, base)
            if data is not None:
                self.file.pwrite(data[pos - offset:stop - offset], base + pos)
            else:
                # Whole sectors not written before are zeros already; the partial ones at the
                # edges may hold bytes from the parent.
                head = min(stop, round_up(pos, SECTOR))
                tail = max(head, stop - stop % SECTOR)
                self.file.pwrite(bytes(head - pos), base + pos)
                self.file.pwrite(bytes(stop - tail), base + tail)
            first = pos % BLOCK_SIZE // SECTOR
            _set_bits(self.bitmap, first, -(-(stop - index * BLOCK_SIZE) // SECTOR) - first)
            pos = stop

    def _holds(self, sector: int) -> bool:
        """Whether the current block already holds `sector` (ordered writes never go back to
        an earlier block)."""
        index, bit = divmod(sector, BLOCK_SIZE // SECTOR)
        return index == self.block and bool(self.bitmap[bit >> 3] & (0x80 >> (bit & 7)))

    def _copy_from_parent(self, parent: fmt.VhdImage, sector: int, base: int) -> None:
        offset = sector * SECTOR
        if offset < parent.virtual_size:  # past a smaller parent: zeros already
            self.file.pwrite(parent.read(offset, SECTOR), base + offset)

    def _enter(self, index: int) -> int:
        """File offset of block `index`'s data, allocating it when the writes first reach it."""
        if index != self.block:
            self._flush_bitmap()
            self.block = index
            self.bat[index] = self.next_block // SECTOR
            self.next_block += self.bitmap_bytes + BLOCK_SIZE
        return self.bat[index] * SECTOR + self.bitmap_bytes

    def _flush_bitmap(self) -> None:
        if self.block >= 0:
            self.file.pwrite(bytes(self.bitmap), self.bat[self.block] * SECTOR)
            self.bitmap = bytearray(self.bitmap_bytes)

    def _finish(self) -> None:
        self._flush_bitmap()
        disk_type = fmt.DYNAMIC if self.parent is None else fmt.DIFFERENCING
        footer = _footer(disk_type, self.size, data_offset=fmt.FOOTER_SIZE).pack()
        header = fmt.DynamicHeader(table_offset=self.table_offset, block_size=BLOCK_SIZE,
                                   max_table_entries=len(self.bat), locators=self.locators)
        if self.parent is not None:
            header = dataclasses.replace(
                header, parent_uuid=self.parent.uuid, parent_name=self.parent_path.name,
                parent_timestamp=_timestamp(os.stat(self.parent_path).st_mtime))
            for loc, data in zip(self.locators, self.locator_data, strict=True):
                self.file.pwrite(data, loc.data_offset)
        self.file.pwrite(footer, 0)
        self.file.pwrite(header.pack(), fmt.FOOTER_SIZE)
        self.file.pwrite(_bat_bytes(self.bat), self.table_offset)
        self.file.pwrite(footer, self.next_block)
        self.file.truncate(self.next_block + fmt.FOOTER_SIZE)


def _bat_bytes(bat: array) -> bytes:
    """The BAT as stored: big-endian; unused entries and the padding to the sector are all
    ones, as the spec asks."""
    bat = array("I", bat)
    if sys.byteorder == "little":
        bat.byteswap()
    return bat.tobytes().ljust(round_up(len(bat) * 4, SECTOR), b"\xff")


def fits(size: int) -> bool:
    """Whether a VHD can hold a disk of `size` bytes as it is."""
    return size % SECTOR == 0 and 0 < size <= MAX_SIZE


def layout(size: int, extents: list[Extent], chunk: int, *, format: str = "vhd") -> Layout:
    """What DynamicWriter (or FixedWriter, format="vhd-fixed") writes for a disk whose data is
    `extents`: blocks allocated in disk order for every block the data touches, each bitmap
    marking the sectors the data covers."""
    if not fits(size):
        raise ExportError(f"VHD size {size} is not a whole number of sectors up to {MAX_SIZE} "
                          "bytes")
    chunks = data_chunks(extents, size, chunk)
    if format == "vhd-fixed":
        footer = _footer(fmt.FIXED, size).pack()
        return Layout(size + fmt.FOOTER_SIZE,
                      [*(Piece(e.offset, e.length, e.offset) for e in chunks),
                       Piece(size, fmt.FOOTER_SIZE, None, footer)])
    bitmap_bytes = fmt.bitmap_size(BLOCK_SIZE)
    bat = array("I", [fmt.UNALLOCATED]) * -(-size // BLOCK_SIZE)
    table_offset = fmt.FOOTER_SIZE + fmt.HEADER_SIZE
    next_block = table_offset + round_up(len(bat) * 4, SECTOR)
    full = b"\xff" * bitmap_bytes  # one object for every fully written block's bitmap
    blocks: list[tuple[int, bytearray, list[Piece]]] = []  # file offset, bitmap, data pieces
    for e in chunks:
        pos = e.offset
        while pos < e.end:
            index = pos // BLOCK_SIZE
            stop = min(e.end, (index + 1) * BLOCK_SIZE)
            if bat[index] == fmt.UNALLOCATED:
                bat[index] = next_block // SECTOR
                blocks.append((next_block, bytearray(bitmap_bytes), []))
                next_block += bitmap_bytes + BLOCK_SIZE
            at, bitmap, data = blocks[-1]
            data.append(Piece(at + bitmap_bytes + pos - index * BLOCK_SIZE, stop - pos, pos))
            first = pos % BLOCK_SIZE // SECTOR
            _set_bits(bitmap, first, -(-(stop - index * BLOCK_SIZE) // SECTOR) - first)
            pos = stop
    pieces = [p for at, bitmap, data in blocks
              for p in (Piece(at, bitmap_bytes, None, full if bitmap == full else bytes(bitmap)),
                        *data)]
    footer = _footer(fmt.DYNAMIC, size, data_offset=fmt.FOOTER_SIZE).pack()
    header = fmt.DynamicHeader(table_offset=table_offset, block_size=BLOCK_SIZE,
                               max_table_entries=len(bat))
    return Layout(next_block + fmt.FOOTER_SIZE, [
        Piece(0, fmt.FOOTER_SIZE, None, footer),
        Piece(fmt.FOOTER_SIZE, fmt.HEADER_SIZE, None, header.pack()),
        Piece(table_offset, round_up(len(bat) * 4, SECTOR), None, _bat_bytes(bat)),
        *pieces, Piece(next_block, fmt.FOOTER_SIZE, None, footer)])


def _open_parent(parent: Path) -> fmt.VhdImage:
    try:
        return fmt.open(parent)
    except ImageError as e:
        raise ExportError(f"cannot use {parent} as the parent: {e.message}") from None


def _locator_paths(child: Path, parent: Path) -> list[tuple[bytes, str]]:
    """W2ru (relative to the child's directory, ".\\" first as Windows writes it) and W2ku
    (absolute), with Windows separators; a reader on Linux turns them back."""
    absolute = str(parent.resolve())
    if "\\" in absolute:
        raise ExportError(f"parent path {absolute!r} has a backslash, which a locator cannot carry")
    relative = os.path.relpath(absolute, child.resolve().parent)
    return [(fmt.W2RU, ".\\" + relative.replace("/", "\\")),
            (fmt.W2KU, absolute.replace("/", "\\"))]


def _set_bits(bitmap: bytearray, first: int, count: int) -> None:
    """Set bits [first, first + count), most significant bit of byte 0 first."""
    end = first + count
    while first < end and first & 7:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1
    whole = end & ~7
    if first < whole:
        bitmap[first >> 3:whole >> 3] = b"\xff" * ((whole - first) >> 3)
        first = whole
    while first < end:
        bitmap[first >> 3] |= 0x80 >> (first & 7)
        first += 1
