"""Microsoft VHD (Virtual PC, Virtual Server, Hyper-V): fixed, dynamic and differencing disks.

Layout from Microsoft's "Virtual Hard Disk Image Format Specification" (October 2006); where the
spec is silent or the world departs from it, we read images the way QEMU's block/vpc.c and
blktap's libvhd do. Every field is big-endian except the UTF-16LE Windows parent locators.

The footer and header structures and the checksum live here and are shared by exporters.vhd.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from thinstack.extents import Extent, Kind, coalesce
from thinstack.sizes import SECTOR

from . import DEFAULT_POLICY, ImageError, MissingFile, Policy, Source

FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
NO_OFFSET = 0xFFFFFFFFFFFFFFFF  # the spec says 0xFFFFFFFF, but Microsoft's tools write all 64 bits
UNALLOCATED = 0xFFFFFFFF
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
MAX_GEOMETRY = (65535, 16, 255)
# Timestamps count seconds from 2000-01-01 00:00 UTC.
EPOCH = 946684800
# The spec requires a power of two, and says Virtual PC and Virtual Server were only tested with
# 512 KiB and 2 MiB. The upper bound keeps a bitmap (block_size / 4096 bytes) small.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = SECTOR, 256 << 20
W2RU, W2KU = b"W2ru", b"W2ku"  # Windows relative / absolute UTF-16LE paths
# Virtual PC and QEMU's older writer size a disk by its CHS geometry, not current_size; every
# other creator (Hyper-V "win ", disk2vhd "d2v\0", QEMU force_size "qem2", XenServer...) uses
# current_size. This is the rule a 2024 QEMU patch adopts (QEMU 7.2 still applies CHS to every
# creator it does not know); the corpus README shows why it matters. Either way a disk whose
# geometry is at its maximum is sized by current_size, as CHS cannot describe it.
CHS_CREATORS = (b"vpc ", b"qemu")
# A locator longer than this is no path.
MAX_LOCATOR_BYTES = 64 << 10

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_FOOTER_CHECKSUM_AT = 64
_HEADER = struct.Struct(">8sQQIIII16sII512s192s256x")
_HEADER_CHECKSUM_AT = 36
_LOCATOR = struct.Struct(">4sIIIQ")
_LOCATOR_SLOTS = 8


def checksum(data: bytes, field_at: int) -> int:
    """One's complement of the byte sum, counting the 4-byte checksum field at `field_at` as 0."""
    return ~(sum(data) - sum(data[field_at:field_at + 4])) & 0xFFFFFFFF


def _with_checksum(raw: bytes, field_at: int) -> bytes:
    return raw[:field_at] + checksum(raw, field_at).to_bytes(4, "big") + raw[field_at + 4:]


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block: one bit a sector, padded to sectors."""
    return -(-block_size // (SECTOR * 8 * SECTOR)) * SECTOR


@dataclass(frozen=True)
class Footer:
    disk_type: int
    current_size: int
    geometry: tuple[int, int, int]  # cylinders, heads, sectors per track
    uuid: bytes
    data_offset: int = NO_OFFSET
    original_size: int = 0
    timestamp: int = 0
    creator_app: bytes = b"\0\0\0\0"
    creator_version: int = 0
    creator_os: bytes = b"Wi2k"
    features: int = 2  # bit 1 is "reserved, must be set"
    version: int = FORMAT_VERSION
    saved_state: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> Footer:
        """Raises ValueError saying what is wrong."""
        (cookie, features, version, data_offset, timestamp, creator_app, creator_version,
         creator_os, original_size, current_size, cylinders, heads, sectors, disk_type,
         stored_sum, uuid, saved_state) = _FOOTER.unpack(raw)
        if cookie != FOOTER_COOKIE:
            raise ValueError("no 'conectix' cookie")
        if stored_sum != checksum(raw, _FOOTER_CHECKSUM_AT):
            raise ValueError("footer checksum mismatch")
        if version >> 16 != FORMAT_VERSION >> 16:
            raise ValueError(f"unsupported file format version {version:#010x}")
        return cls(disk_type, current_size, (cylinders, heads, sectors), uuid, data_offset,
                   original_size, timestamp, creator_app, creator_version, creator_os, features,
                   version, saved_state)

    def pack(self) -> bytes:
        raw = _FOOTER.pack(FOOTER_COOKIE, self.features, self.version, self.data_offset,
                           self.timestamp, self.creator_app, self.creator_version,
                           self.creator_os, self.original_size, self.current_size,
                           *self.geometry, self.disk_type, 0, self.uuid, self.saved_state)
        return _with_checksum(raw, _FOOTER_CHECKSUM_AT)


@dataclass(frozen=True)
class Locator:
    platform: bytes
    data_space: int  # sectors by the spec; Windows writes bytes, so never rely on it
    data_length: int
    data_offset: int


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[Locator, ...] = ()
    data_offset: int = NO_OFFSET
    version: int = FORMAT_VERSION

    @classmethod
    def parse(cls, raw: bytes) -> DynamicHeader:
        """Raises ValueError saying what is wrong."""
        (cookie, data_offset, table_offset, version, entries, block_size, stored_sum,
         parent_uuid, parent_timestamp, _reserved, name, locators) = _HEADER.unpack(raw)
        if cookie != HEADER_COOKIE:
            raise ValueError("no 'cxsparse' cookie")
        if stored_sum != checksum(raw, _HEADER_CHECKSUM_AT):
            raise ValueError("dynamic disk header checksum mismatch")
        slots = (Locator(*_unpack_locator(locators, i)) for i in range(_LOCATOR_SLOTS))
        return cls(table_offset, entries, block_size, parent_uuid, parent_timestamp,
                   name.decode("utf-16-be").split("\0", 1)[0],
                   tuple(loc for loc in slots if loc.platform != bytes(4)), data_offset, version)

    def pack(self) -> bytes:
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 512:
            raise ValueError(f"parent name {self.parent_name!r} is longer than 256 UTF-16 units")
        slots = b"".join(_LOCATOR.pack(loc.platform, loc.data_space, loc.data_length, 0,
                                       loc.data_offset) for loc in self.locators)
        raw = _HEADER.pack(HEADER_COOKIE, self.data_offset, self.table_offset, self.version,
                           self.max_table_entries, self.block_size, 0, self.parent_uuid,
                           self.parent_timestamp, 0, name, slots)
        return _with_checksum(raw, _HEADER_CHECKSUM_AT)


def _unpack_locator(table: bytes, slot: int) -> tuple[bytes, int, int, int]:
    platform, space, length, _reserved, offset = _LOCATOR.unpack_from(table, slot * _LOCATOR.size)
    return platform, space, length, offset


def probe(head: bytes, tail: bytes) -> bool:
    # Dynamic disks start with a footer copy; fixed disks only end with one, of 512 or (before
    # Virtual PC 2004) 511 bytes, which must then be whole: any disk may end with "conectix".
    if head[:8] == FOOTER_COOKIE:
        return True
    for footer in (tail, tail[1:] + b"\0"):
        try:
            Footer.parse(footer)
            return True
        except (ValueError, struct.error):
            pass
    return False


def open(target: str | os.PathLike | Source, policy: Policy = DEFAULT_POLICY) -> VhdImage:
    source = Source.of(target)
    layers: list[_Layer] = []
    try:
        layer = _open_layer(source, policy)
        layers.append(layer)
        seen = {source.identity}
        # A differencing disk is a dynamic one: _open_layer has read its header.
        while layer.footer.disk_type == DIFFERENCING and (header := layer.header) is not None:
            if len(layers) > policy.max_chain_depth:  # counting parents, as qcow2 counts backings
                raise ImageError(source.path, f"differencing chain has more than "
                                              f"{policy.max_chain_depth} parents")
            found = _find_parent(layer, header, policy)
            if found.identity in seen:
                found.close()
                raise ImageError(layer.path, f"parent {found.path} is already in the chain "
                                             f"(a loop)")
            seen.add(found.identity)
            parent = _open_layer(found, policy)
            layers.append(parent)
            if parent.footer.uuid != header.parent_uuid:
                raise ImageError(layer.path, f"parent {found.path} has UUID "
                                             f"{parent.footer.uuid.hex()}, the child expects "
                                             f"{header.parent_uuid.hex()}")
            layer.parent = parent
            layer = parent
    except BaseException:
        source.close()
        for opened in layers:
            opened.source.close()
        raise
    return VhdImage(source.path, layers)


class VhdImage:
    format = "vhd"

    def __init__(self, path: Path, chain: list[_Layer]):
        self.path = path
        self.chain = chain  # the file itself first, then its parents
        self.virtual_size = chain[0].size
        self.uuid = chain[0].footer.uuid

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Extents covering [start, end) (default: the whole disk), from BATs and bitmaps only."""
        end = self.virtual_size if end is None else end
        return coalesce(Extent(offset, length, Kind.DATA if layer else Kind.HOLE)
                        for offset, length, layer, _ in _merged(self.chain[0], start, end))

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        with memoryview(out) as view:
            self.read_into(offset, view)
        return out

    def read_into(self, offset: int, view: memoryview) -> None:
        """The bytes of [offset, offset + len(view)) into `view`, from the files straight (the
        copy loop hands in the device's own buffer: no copy between)."""
        length = len(view)
        if offset < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the disk "
                                        f"({self.virtual_size} bytes)")
        for at, count, layer, file_offset in _merged(self.chain[0], offset, offset + length):
            piece = view[at - offset:at - offset + count]
            if layer is not None:
                layer.source.read_into(file_offset, piece, "data block")
            else:
                piece[:] = bytes(count)

    def close(self) -> None:
        for layer in self.chain:
            layer.source.close()


class _Layer:
    """One file of a chain: where each of its sectors lives in the file, or that it has none."""

    def __init__(self, source: Source, footer: Footer, size: int,
                 header: DynamicHeader | None = None, bat: array | None = None):
        self.source = source
        self.path = source.path
        self.footer = footer
        self.size = size
        self.header = header
        self.bat = array("I") if bat is None else bat  # a fixed disk has none
        self.parent: _Layer | None = None
        if header is not None:
            self.block_size = header.block_size
            self.bitmap_size = bitmap_size(header.block_size)
        self._runs_of: tuple[int, array, bool] = (-1, array("I"), False)

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """(offset, length, file offset or None when this file does not hold it) covering
        [start, end) in order; end <= size. Costs O(log runs + runs yielded) per block, so a
        child's many holes each find their place in the parent's block without rescanning it."""
        if self.header is None:
            yield from self._fixed_runs(start, end)
            return
        bs = self.block_size
        pos = start
        while pos < end:
            index = pos // bs
            block_start = index * bs
            if self.bat[index] == UNALLOCATED:
                stop = min(block_start + bs, end)
                while stop < end and self.bat[stop // bs] == UNALLOCATED:
                    stop = min(stop + bs, end)
                yield pos, stop - pos, None
                pos = stop
                continue
            block_end = min(block_start + bs, end)
            data_at = self.bat[index] * SECTOR + self.bitmap_size
            bounds, first_present = self._bitmap_runs(index)
            # Run i covers sectors [bounds[i], bounds[i + 1]); runs alternate present/absent.
            i = bisect.bisect_right(bounds, (pos - block_start) // SECTOR) - 1
            while i < len(bounds) - 1:
                lo = max(pos, block_start + bounds[i] * SECTOR)
                if lo >= block_end:
                    break
                hi = min(block_end, block_start + bounds[i + 1] * SECTOR)
                present = first_present ^ bool(i & 1)
                yield lo, hi - lo, (data_at + lo - block_start) if present else None
                i += 1
            pos = block_end

    def _bitmap_runs(self, index: int) -> tuple[array, bool]:
        """One block's bitmap as run boundaries (in sectors, from 0 to the block's sector count)
        and whether the first run is present; 4 bytes a run, so at most 2 MiB for the largest
        block. The last block's runs are cached because a block is read in several pieces."""
        cached_index, bounds, first_present = self._runs_of
        if cached_index != index:
            sectors = min(self.block_size, self.size - index * self.block_size) // SECTOR
            bitmap = self.source.read_at(self.bat[index] * SECTOR, self.bitmap_size,
                                         "sector bitmap")[:-(-sectors // 8)]
            # Sector 0 is the most significant bit of byte 0 (as blktap reads and writes it).
            bits = format(int.from_bytes(bitmap, "big"), f"0{len(bitmap) * 8}b")[:sectors]
            bounds = array("I", (m.start() for m in re.finditer("1+|0+", bits)))
            bounds.append(sectors)
            first_present = bits[:1] == "1"
            self._runs_of = (index, bounds, first_present)
        return bounds, first_present

    def _fixed_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int | None]]:
        """A fixed disk holds every sector, but holes of a sparse host file read as zeros and
        need not be copied: ask the file system where its data is."""
        for first, stop, data in self.source.segments(start, end):
            yield first, stop - first, first if data else None


def _merged(layer: _Layer, start: int, end: int) -> Iterator[tuple[int, int, _Layer | None, int]]:
    """(offset, length, layer holding the bytes or None for zeros, offset in its file) covering
    [start, end): a child's sector wins, a sector it lacks comes from its parent, and past the
    end of a (smaller) parent, from nowhere: zeros."""
    stop = min(end, layer.size)
    for offset, length, file_offset in (layer.runs(start, stop) if start < stop else ()):
        if file_offset is not None:
            yield offset, length, layer, file_offset
        elif layer.parent is None:
            yield offset, length, None, 0
        else:
            yield from _merged(layer.parent, offset, offset + length)
    if end > max(start, layer.size):
        tail = max(start, layer.size)
        yield tail, end - tail, None, 0


def _open_layer(source: Source, policy: Policy) -> _Layer:
    """One file of a chain, parsed; `source` is closed if it is no VHD the policy accepts."""
    path = source.path
    try:
        footer, footer_at = _read_footer(source)
        size = _virtual_size(footer)
        if size % SECTOR:
            raise ImageError(path, f"virtual size {size} is not a whole number of sectors")
        if size > policy.max_virtual_size:
            raise ImageError(path, f"virtual size {size} exceeds the limit of "
                                   f"{policy.max_virtual_size} bytes")
        if footer.disk_type == FIXED:
            if size > footer_at:
                raise ImageError(path, f"fixed disk holds {footer_at} bytes of data but claims "
                                       f"{size}: truncated")
            return _Layer(source, footer, size)
        if footer.disk_type not in (DYNAMIC, DIFFERENCING):
            raise ImageError(path, f"unsupported disk type {footer.disk_type}")
        header, bat = _read_dynamic(source, footer, footer_at, size, policy)
        return _Layer(source, footer, size, header, bat)
    except BaseException:
        source.close()
        raise


def _read_footer(source: Source) -> tuple[Footer, int]:
    """The footer and where it starts (where the data area ends). The end of the file holds it
    (511 bytes long in images older than Virtual PC 2004); if that one is damaged, dynamic disks
    keep a copy at offset 0."""
    problems = []
    end = source.size - FOOTER_SIZE
    for at, length, at_end in ((end, FOOTER_SIZE, True), (end + 1, FOOTER_SIZE - 1, True),
                               (0, FOOTER_SIZE, False)):
        if at < 0:
            continue
        try:
            footer = Footer.parse(source.read_at(at, length, "footer").ljust(FOOTER_SIZE, b"\0"))
        except ValueError as e:
            problems.append(f"{e} at offset {at}")
            continue
        if at_end:
            return footer, at
        if footer.disk_type in (DYNAMIC, DIFFERENCING):
            return footer, source.size
    raise ImageError(source.path,
                     "no valid VHD footer: " + ("; ".join(problems) or "file too small"))


def _virtual_size(footer: Footer) -> int:
    cylinders, heads, sectors = footer.geometry
    if footer.creator_app in CHS_CREATORS and footer.geometry != MAX_GEOMETRY:
        return cylinders * heads * sectors * SECTOR
    return footer.current_size


def _read_dynamic(source: Source, footer: Footer, footer_at: int, size: int,
                  policy: Policy) -> tuple[DynamicHeader, array]:
    path = source.path
    header_at = footer.data_offset
    try:
        header = DynamicHeader.parse(source.read_at(header_at, HEADER_SIZE, "dynamic disk header"))
    except ValueError as e:
        raise ImageError(path, f"dynamic disk header at offset {header_at}: {e}") from None
    bs = header.block_size
    if not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
        raise ImageError(path, f"block size {bs} is not a power of two between "
                               f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")
    needed = -(-size // bs)
    entries = header.max_table_entries
    if entries < needed:
        raise ImageError(path, f"block allocation table has {entries} entries, the disk needs "
                               f"{needed}")
    if entries * 4 > policy.max_table_bytes:
        raise ImageError(path, f"block allocation table of {entries} entries exceeds the limit "
                               f"of {policy.max_table_bytes} bytes")
    table = (header.table_offset, header.table_offset + entries * 4)
    if table[1] > footer_at:
        raise ImageError(path, f"block allocation table at offset {table[0]} (+{entries * 4}) "
                               f"runs past the end of the file: truncated or corrupt")
    # Entries past the last block of the disk are never used, so never read.
    bat = array("I", source.read_at(table[0], needed * 4, "block allocation table"))
    if sys.byteorder == "little":
        bat.byteswap()
    reserved = {"footer copy": (0, FOOTER_SIZE),
                "dynamic disk header": (header_at, header_at + HEADER_SIZE),
                "block allocation table": table, "footer": (footer_at, source.size)}
    if footer.disk_type == DIFFERENCING:
        for n, loc in enumerate(header.locators):
            reserved[f"parent locator {n}"] = (loc.data_offset, loc.data_offset + loc.data_length)
    _check_blocks(path, bat, bitmap_size(bs) + bs, footer_at, reserved)
    return header, bat


def _check_blocks(path: Path, bat: array, block_bytes: int, data_end: int,
                  reserved: dict[str, tuple[int, int]]) -> None:
    """Every allocated block lies inside the file, apart from the metadata and from every other
    block: so no part of the file is read twice, and the data an image yields is bounded by
    its size."""
    allocated = len(bat) - bat.count(UNALLOCATED)
    if allocated * block_bytes > data_end:
        raise ImageError(path, f"{allocated} blocks are allocated but the file holds at most "
                               f"{data_end // block_bytes}: truncated or corrupt")
    starts = sorted(entry * SECTOR for entry in bat if entry != UNALLOCATED)
    previous_end = 0
    for start in starts:
        if start < previous_end:
            raise ImageError(path, f"data blocks overlap at offset {start}")
        previous_end = start + block_bytes
        if previous_end > data_end:
            raise ImageError(path, f"data block at offset {start} (+{block_bytes}) lies past the "
                                   f"end of the data area ({data_end}): truncated or corrupt")
    for name, (lo, hi) in reserved.items():
        first = bisect.bisect_right(starts, lo - block_bytes)
        if lo < hi and first < len(starts) and starts[first] < hi:
            raise ImageError(path, f"data block at offset {starts[first]} overlaps the {name}")


def _find_parent(layer: _Layer, header: DynamicHeader, policy: Policy) -> Source:
    """The parent, opened, from the locators (relative first, then absolute; Mac aliases are not
    followed), falling back to the parent's file name beside the child. Each name is opened as
    a file the image names (Source.named): one that does not exist is passed over, any other
    refusal (a symlink, a folder the policy does not allow) is final."""
    tried: list[str] = []
    for platform in (W2RU, W2KU):
        for loc in header.locators:
            if loc.platform != platform:
                continue
            if loc.data_length > MAX_LOCATOR_BYTES:
                raise ImageError(layer.path, f"parent locator of {loc.data_length} bytes")
            raw = layer.source.read_at(loc.data_offset, loc.data_length, "parent locator")
            try:
                name = raw.decode("utf-16-le").split("\0", 1)[0].replace("\\", "/")
            except UnicodeDecodeError:
                raise ImageError(layer.path, "parent locator is not UTF-16") from None
            if not name or re.match("[A-Za-z]:", name):  # a Windows drive means nothing here
                continue
            tried.append(name)
    if header.parent_name:
        tried.append(Path(header.parent_name.replace("\\", "/")).name)
    here = layer.source.real.parent
    for name in tried:
        try:
            return Source.named(name, by=layer.source, what="parent", policy=policy)
        except MissingFile:
            continue
    places = ", ".join(str(here / n) for n in tried) or "no locator"
    raise ImageError(layer.path, f"parent image {header.parent_name or '(unnamed)'} not found "
                                 f"(tried {places})")
