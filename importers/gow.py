"""GOW ("Grow on Write", after Virtual Bridges' format) v1, v2 and v3 images.

No specification of the original format is public, so this is thinstack's own clean-room layout,
consistent with what is public about it; docs/formats/gow.md describes it and says which parts
are public and which are invented. In short, little-endian throughout:

    header (64 bytes) | map: u32 per 64 KiB block | v3: u32 version per block | data area

A map entry of 0 means unallocated; entry N places the block at data area offset (N-1) * 64 KiB.

The header structure and layout live here and are shared by exporters.gow.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from thinstack.extents import Extent, Kind, coalesce
from thinstack.sizes import SECTOR, round_up

from . import DEFAULT_POLICY, ImageError, Policy, Source

MAGIC = b"GOWDISK\0"
BLOCK_SIZE = 64 << 10
HEADER_SIZE = 64
# Map entries (logical blocks) per format version: v1 64 GiB, v2 and v3 256 GiB.
ENTRIES = {1: 1 << 20, 2: 1 << 22, 3: 1 << 22}

_HEADER = struct.Struct("<8sIIQII28xI")
_CRC_AT = HEADER_SIZE - 4


@dataclass(frozen=True)
class Header:
    version: int
    size: int  # logical (virtual) size in bytes
    session: int = 0  # v3: the session that wrote this image; 0 in v1 and v2

    @property
    def entries(self) -> int:
        return ENTRIES[self.version]

    @property
    def blocks(self) -> int:
        """Blocks the logical size spans; entries past them are written as 0, never read."""
        return -(-self.size // BLOCK_SIZE)

    @property
    def versions_offset(self) -> int:
        return HEADER_SIZE + 4 * self.entries

    @property
    def data_offset(self) -> int:
        """v1 data follows the map directly; v2 and v3 start it at a 512-byte boundary."""
        end = HEADER_SIZE + 4 * self.entries * (2 if self.version == 3 else 1)
        return end if self.version == 1 else round_up(end, SECTOR)

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        """Raises ValueError saying what is wrong."""
        magic, version, block_size, size, entries, session, crc = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise ValueError("no GOW magic")
        if crc != zlib.crc32(raw[:_CRC_AT]):
            raise ValueError("header checksum mismatch")
        if version not in ENTRIES:
            raise ValueError(f"unknown GOW version {version}")
        if block_size != BLOCK_SIZE:
            raise ValueError(f"block size {block_size}, not {BLOCK_SIZE}")
        if entries != ENTRIES[version]:
            raise ValueError(f"{entries} map entries, GOW v{version} has {ENTRIES[version]}")
        if size > entries * BLOCK_SIZE:
            raise ValueError(f"logical size {size} exceeds the GOW v{version} limit of "
                             f"{entries * BLOCK_SIZE}")
        if (version == 3) != (session > 0):
            raise ValueError(f"session {session} in a GOW v{version} header (v3 counts from 1, "
                             f"v1 and v2 have none)")
        return cls(version, size, session)

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, BLOCK_SIZE, self.size, self.entries,
                           self.session, 0)
        return raw[:_CRC_AT] + zlib.crc32(raw[:_CRC_AT]).to_bytes(4, "little")


def table_bytes(table: array) -> bytes:
    """A u32 table as stored: little-endian."""
    if sys.byteorder == "big":
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def probe(head: bytes, tail: bytes) -> bool:
    return head[:8] == MAGIC


def open(target: str | os.PathLike | Source, policy: Policy = DEFAULT_POLICY) -> GowImage:
    source = Source.of(target)
    try:
        return GowImage(source, policy)
    except BaseException:
        source.close()
        raise


class GowImage:
    format = "gow"

    def __init__(self, source: Source, policy: Policy):
        self.source = source
        self.path = path = source.path
        try:
            self.header = header = Header.parse(source.read_at(0, HEADER_SIZE, "header"))
        except ValueError as e:
            raise ImageError(path, str(e)) from None
        if header.size > policy.max_virtual_size:
            raise ImageError(path, f"logical size {header.size} exceeds the limit of "
                                   f"{policy.max_virtual_size} bytes")
        if 4 * header.blocks > policy.max_table_bytes:
            raise ImageError(path, f"block map of {4 * header.blocks} bytes exceeds the limit "
                                   f"of {policy.max_table_bytes} bytes")
        self.virtual_size = header.size
        self.version = header.version
        self.session = header.session
        self.data_offset = header.data_offset
        if source.size < self.data_offset:
            raise ImageError(path, f"file of {source.size} bytes ends inside the block map "
                                   f"(data starts at {self.data_offset}): truncated")
        self.map = self._table(HEADER_SIZE, "block map")
        self.versions = self._table(header.versions_offset, "block versions") \
            if header.version == 3 else None
        self._check()

    def _table(self, offset: int, what: str) -> array:
        """The entries of a table for the blocks of the disk; those past its end are never
        used, so never read."""
        table = array("I", self.source.read_at(offset, 4 * self.header.blocks, what))
        if sys.byteorder == "big":
            table.byteswap()
        return table

    def _check(self) -> None:
        """Every block lies in the data area inside the file, no two blocks share a place, and
        no block is newer than the image: a hostile map can neither make reads leave the data
        nor multiply its data."""
        path, blocks = self.path, self.header.blocks
        slots = (self.source.size - self.data_offset) // BLOCK_SIZE
        taken = bytearray(slots)
        for index, _, entry in _runs(self.map, blocks):
            if not entry:
                continue
            if entry > slots:
                raise ImageError(path, f"block {index} at data slot {entry - 1} lies past the "
                                       f"end of the file ({slots} slots): truncated or corrupt")
            if taken[entry - 1]:
                raise ImageError(path, f"block {index} shares data slot {entry - 1} with "
                                       f"another block")
            taken[entry - 1] = 1
        if self.versions is not None:
            newest = max(self.versions, default=0)
            if newest > self.session:
                raise ImageError(path, f"a block has version {newest}, newer than the image's "
                                       f"session {self.session}")

    def extents(self) -> Iterator[Extent]:
        return coalesce(self._extent(first, count, Kind.DATA if entry else Kind.HOLE)
                        for first, count, entry in _runs(self.map, self.header.blocks))

    def changed_extents(self, since_version: int) -> Iterator[Extent]:
        """v3: only the blocks changed in sessions after `since_version`, so a copy made at that
        version can catch up: DATA where the block has data, ZERO where it was emptied."""
        versions = self.block_versions()
        return coalesce(self._extent(first, count, Kind.DATA if self.map[first] else Kind.ZERO)
                        for first, count, version in _runs(versions, len(versions))
                        if version > since_version)

    def block_versions(self) -> array:
        """v3: the session in which each block last changed (0: never), one per block."""
        if self.versions is None:
            raise ValueError(f"GOW v{self.version} has no block versions")
        return self.versions

    def block(self, index: int) -> bytes | None:
        """The stored 64 KiB of a block, or None when unallocated."""
        entry = self.map[index]
        if not entry:
            return None
        return self.source.read_at(self.data_offset + (entry - 1) * BLOCK_SIZE, BLOCK_SIZE,
                                   "data block")

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the disk "
                                        f"({self.virtual_size} bytes)")
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, BLOCK_SIZE)
            stop = min(end, pos - within + BLOCK_SIZE)
            entry = self.map[index]
            if entry:
                out[pos - offset:stop - offset] = self.source.read_at(
                    self.data_offset + (entry - 1) * BLOCK_SIZE + within, stop - pos, "data block")
            pos = stop
        return bytes(out)

    def _extent(self, first: int, count: int, kind: Kind) -> Extent:
        start = first * BLOCK_SIZE
        return Extent(start, min(count * BLOCK_SIZE, self.virtual_size - start), kind)

    def close(self) -> None:
        self.source.close()


def _runs(table: array, blocks: int, chunk: int = 4096) -> Iterator[tuple[int, int, int]]:
    """(first block, count, value) over table[:blocks]: one per block, except that a whole chunk
    of zeros comes as one (maps of large disks are mostly zeros; this keeps them fast)."""
    for base in range(0, blocks, chunk):
        part = table[base:min(base + chunk, blocks)]
        if part.count(0) == len(part):
            yield base, len(part), 0
        else:
            yield from ((base + i, 1, value) for i, value in enumerate(part))
