"""QCOW2 (versions 2 and 3), read natively from the header, the L1/L2 tables and the backing chain.

The on-disk structs and flags live here; the qcow2 exporter imports them, so both sides share one
description of the format. The refcount structures are validated for position only: an import
never needs a refcount, so a dirty image (refcounts possibly stale) reads correctly.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import logging
import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from thinstack.extents import Extent, Kind, coalesce
from thinstack.sizes import SECTOR, round_up

from . import (
    DEFAULT_POLICY,
    Image,
    ImageError,
    MissingFile,
    Policy,
    ReferenceRefused,
    Source,
    detect,
    driver,
)

log = logging.getLogger(__name__)

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # through snapshots_offset: 72 bytes
V3_FIELDS = struct.Struct(">QQQII")  # features, refcount_order, header_length: bytes 72-103
V3_HEADER_LENGTH = V2_HEADER.size + V3_FIELDS.size
COMPRESSION_TYPE_OFFSET = V3_HEADER_LENGTH  # one byte, present when header_length > 104
EXTENSION = struct.Struct(">II")  # type, length

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_DATA_FILE = 0x44415441
FEATURE_NAME = struct.Struct(">BB46s")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0x1F

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
DEFLATE_WBITS = -12  # raw deflate with a 4 KiB window, as QEMU writes it

OFLAG_COPIED = 1 << 63  # L1/L2: the cluster's refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # standard L2 descriptor, v3 without extended L2
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: a host offset
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61 of a standard descriptor
SUBCLUSTERS = 32  # per cluster, with extended L2 entries
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit; nothing larger exists in the wild
MIN_EXTENDED_L2_CLUSTER_BITS = 14
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_NAME = 1023
L2_CACHE_TABLES = 8

# qcow2 headers name formats as QEMU does; thinstack names its drivers.
QEMU_FORMAT_TO_DRIVER = {"raw": "raw", "qcow2": "qcow2", "vpc": "vhd"}
DRIVER_TO_QEMU_FORMAT = {v: k for k, v in QEMU_FORMAT_TO_DRIVER.items()}

# Identities (Source.identity) of the qcow2 images whose backing files are being opened right
# now, outermost first: a backing file that is already one of them closes a loop.
_opening: contextvars.ContextVar[tuple[tuple[int, int], ...]] = contextvars.ContextVar(
    "qcow2_opening", default=())
# Bytes of a table read at a time when it is only scanned, not kept.
SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class Header:
    """The fixed header, field for field (v2 stops at snapshots_offset)."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER.size
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Fields as stored; the caller checks magic, version and lengths first."""
        _magic, version, *v2 = V2_HEADER.unpack_from(data)
        if version < 3:
            return cls(version, *v2)
        v3 = V3_FIELDS.unpack_from(data, V2_HEADER.size)
        header_length = v3[-1]
        present = header_length > COMPRESSION_TYPE_OFFSET and len(data) > COMPRESSION_TYPE_OFFSET
        compression = data[COMPRESSION_TYPE_OFFSET] if present else COMPRESSION_ZLIB
        return dataclasses.replace(cls(version, *v2, *v3), compression_type=compression)

    def pack(self) -> bytes:
        fields = dataclasses.astuple(self)
        out = V2_HEADER.pack(MAGIC, *fields[:12])
        if self.version >= 3:
            out += V3_FIELDS.pack(*fields[12:17])
            if self.header_length > COMPRESSION_TYPE_OFFSET:
                out += bytes([self.compression_type])
            out = out.ljust(self.header_length, b"\0")
        return out

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entries(self) -> int:
        """Guest clusters one L2 table maps (extended entries are two words)."""
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def l1_entries_needed(self) -> int:
        return -(-self.size // (self.l2_entries * self.cluster_size))

    @property
    def extensions_offset(self) -> int:
        return V2_HEADER.size if self.version < 3 else self.header_length


def pack_extension(kind: int, payload: bytes) -> bytes:
    return EXTENSION.pack(kind, len(payload)) + payload.ljust(round_up(len(payload), 8), b"\0")


def parse_extensions(path: Path, first: bytes, start: int, end: int) -> dict[int, bytes]:
    """Header extensions from `start` to `end` (the backing file name, or the first cluster's
    end)."""
    found: dict[int, bytes] = {}
    pos = start
    while pos + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(first, pos)
        if kind == EXT_END:
            return found
        pos += EXTENSION.size
        if length > end - pos:
            raise ImageError(path, f"header extension {kind:#x} ({length} bytes) runs past the "
                                   f"header area")
        found[kind] = first[pos:pos + length]
        pos += round_up(length, 8)
    if pos != end:
        raise ImageError(path, "header extensions are not terminated")
    return found


def probe(head: bytes, tail: bytes) -> bool:
    # Version 1 (qcow) belongs to the qemu driver; any other version is claimed here so a bad one
    # gets a qcow2 error instead of an import as raw.
    return head[:4] == MAGIC and head[4:8] != b"\0\0\0\1"


def open(target: str | os.PathLike | Source, policy: Policy = DEFAULT_POLICY) -> Qcow2Image:
    source = Source.of(target)
    if source.identity in _opening.get():
        source.close()
        raise ImageError(source.path, "the backing chain loops back to this image")
    image = Qcow2Image(source)
    try:
        image.load(policy)
    except BaseException:
        image.close()
        raise
    return image


@dataclass(slots=True)
class _Run:
    """A guest range that reads one way: DATA from `host` on (or from one compressed cluster),
    ZERO, or HOLE (unallocated here: the backing file or zeros)."""

    offset: int
    length: int
    kind: Kind
    host: int = 0
    compressed: tuple[int, int] | None = None  # host offset and bytes of deflated data

    def clip(self, start: int, end: int) -> _Run:
        lo, hi = max(start, self.offset), min(end, self.offset + self.length)
        if lo == self.offset and hi == self.offset + self.length:
            return self
        moves_host = self.kind is Kind.DATA and self.compressed is None
        host = self.host + (lo - self.offset) if moves_host else 0
        return _Run(lo, hi - lo, self.kind, host, self.compressed)


class _Runs:
    """Collects runs in guest order, merging neighbours that read the same way (DATA only when
    the host ranges continue too, so one pread serves the whole run)."""

    def __init__(self) -> None:
        self.done: list[_Run] = []
        self.pending: _Run | None = None

    def add(self, offset: int, length: int, kind: Kind, host: int = 0,
            compressed: tuple[int, int] | None = None) -> None:
        p = self.pending
        if (p is not None and p.kind is kind and compressed is None and p.compressed is None
                and (kind is not Kind.DATA or p.host + p.length == host)):
            p.length += length
            return
        if p is not None:
            self.done.append(p)
        self.pending = _Run(offset, length, kind, host, compressed)

    def drain(self, final: bool = False) -> list[_Run]:
        out, self.done = self.done, []
        if final and self.pending is not None:
            out.append(self.pending)
            self.pending = None
        return out


class Qcow2Image:
    format = "qcow2"

    def __init__(self, source: Source):
        self.path = source.path
        self.src = source
        self.data = source  # where guest clusters live: this file, or its external data file
        self.backing: Image | None = None
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._inflated: tuple[int, bytes] | None = None

    # -- opening ---------------------------------------------------------------------------

    def load(self, policy: Policy) -> None:
        src = self.src
        fixed = src.read_at(0, min(src.size, V3_HEADER_LENGTH + 8), "header")
        if len(fixed) < V2_HEADER.size or fixed[:4] != MAGIC:
            raise ImageError(self.path, "not a qcow2 image (bad magic or too short)")
        version = struct.unpack_from(">I", fixed, 4)[0]
        if version not in (2, 3):
            raise ImageError(self.path, f"unsupported qcow2 version {version}")
        if version == 3 and len(fixed) < V3_HEADER_LENGTH:
            raise ImageError(self.path, "qcow2 v3 header is truncated")
        h = Header.unpack(fixed)
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise ImageError(self.path, f"cluster_bits {h.cluster_bits} outside "
                                        f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
        cs = h.cluster_size
        if version == 3 and not (V3_HEADER_LENGTH <= h.header_length <= cs
                                 and h.header_length % 8 == 0):
            raise ImageError(self.path, f"invalid header_length {h.header_length}")
        first = src.read_at(0, min(src.size, cs), "first cluster")
        if len(first) < h.header_length:
            raise ImageError(self.path, "qcow2 header is truncated")
        h = Header.unpack(first)
        self.header = h
        extensions = self._extensions(h, first)
        self._check_features(h, extensions, policy)
        self._check_tables(h, src.size, policy)

        self.cluster_size = cs
        self.virtual_size = h.size
        self.l2_entries = h.l2_entries
        self.extended = h.extended_l2
        self.external = bool(h.incompatible_features & INCOMPAT_DATA_FILE)
        self._bad_bits = L2_RESERVED | ((cs - 1) & ~1)  # reserved bits, or an unaligned offset
        if h.version < 3 or self.extended:
            self._bad_bits |= OFLAG_ZERO
        self._compressed_bits = 62 - (h.cluster_bits - 8)
        self._metadata = [(0, cs, "the header"),
                          (h.l1_table_offset, h.l1_table_offset + h.l1_size * 8, "the L1 table"),
                          (h.refcount_table_offset,
                           h.refcount_table_offset + h.refcount_table_clusters * cs,
                           "the refcount table")]
        self.l1 = _read_words(src, h.l1_table_offset, h.l1_entries_needed, "L1 table")
        self._taken = self._metadata_clusters(h, src.size, policy)

        if self.external:
            name = _text(self.path, extensions.get(EXT_DATA_FILE, b""),
                         "external data file name")
            if not name:
                raise ImageError(self.path, "uses an external data file but does not name it")
            self.data = Source.named(name, by=src, what="external data file", policy=policy)
            if self.data.identity == src.identity:
                raise ImageError(self.path, "names itself as its external data file: its guest "
                                            "data would be its own metadata")

        if h.backing_file_offset and h.backing_file_size:
            if h.backing_file_size > MAX_BACKING_NAME:
                raise ImageError(self.path, f"backing file name of {h.backing_file_size} bytes "
                                            f"(limit {MAX_BACKING_NAME})")
            raw_name = src.read_at(h.backing_file_offset, h.backing_file_size, "backing file name")
            named = extensions.get(EXT_BACKING_FORMAT)
            fmt = None if named is None else _text(self.path, named, "backing format")
            self.backing = self._open_backing(_text(self.path, raw_name, "backing file name"),
                                              fmt, policy)

    def _extensions(self, h: Header, first: bytes) -> dict[int, bytes]:
        end = len(first)
        if h.backing_file_offset and h.backing_file_size:
            end = min(end, h.backing_file_offset)
        if end < h.extensions_offset:
            return {}
        return parse_extensions(self.path, first, h.extensions_offset, end)

    def _check_features(self, h: Header, extensions: dict[int, bytes], policy: Policy) -> None:
        unknown = h.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            names = _feature_names(extensions.get(EXT_FEATURE_NAMES, b""), unknown)
            raise ImageError(self.path, f"unknown incompatible features {unknown:#x}{names}")
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise ImageError(self.path, "marked corrupt (repair it with qemu-img check -r all)")
        if h.incompatible_features & INCOMPAT_DIRTY:
            log.warning("%s: dirty (refcounts may be stale); importing reads only L1/L2", self.path)
        if h.incompatible_features & INCOMPAT_DATA_FILE and not policy.allow_external_data:
            raise ImageError(self.path, "uses an external data file, which the policy refuses")
        if h.extended_l2 and h.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
            raise ImageError(self.path, f"extended L2 entries need clusters of at least "
                                        f"{1 << MIN_EXTENDED_L2_CLUSTER_BITS} bytes")
        if h.incompatible_features & INCOMPAT_COMPRESSION:
            if h.compression_type != COMPRESSION_ZSTD:
                raise ImageError(self.path, f"unknown compression type {h.compression_type}")
            if importlib.util.find_spec("zstandard") is None:
                raise ImageError(self.path, "zstd-compressed, and the python zstandard module "
                                            "is not installed")
        elif h.compression_type != COMPRESSION_ZLIB:
            raise ImageError(self.path, "compression type set without its feature bit")
        if h.crypt_method:
            raise ImageError(self.path, "encrypted images are not supported")
        if h.version >= 3 and h.refcount_order > MAX_REFCOUNT_ORDER:
            raise ImageError(self.path, f"refcount_order {h.refcount_order} exceeds "
                                        f"{MAX_REFCOUNT_ORDER}")

    def _check_tables(self, h: Header, file_size: int, policy: Policy) -> None:
        cs = h.cluster_size
        if h.size > policy.max_virtual_size:
            raise ImageError(self.path, f"virtual size {h.size} exceeds the policy's "
                                        f"{policy.max_virtual_size}")
        if h.l1_size < h.l1_entries_needed:
            raise ImageError(self.path, f"L1 table of {h.l1_size} entries is too small for a "
                                        f"virtual size of {h.size} (needs "
                                        f"{h.l1_entries_needed})")
        tables = (("L1 table", h.l1_table_offset, h.l1_size * 8),
                  ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs))
        for what, offset, length in tables:
            if length > policy.max_table_bytes:
                raise ImageError(self.path, f"{what} of {length} bytes exceeds the policy's "
                                            f"{policy.max_table_bytes}")
            if length and offset % cs:
                raise ImageError(self.path, f"{what} offset {offset:#x} is not cluster-aligned")
            if length and offset < cs:
                raise ImageError(self.path, f"{what} overlaps the header")
            if offset + length > file_size:
                raise ImageError(self.path, f"{what} at {offset:#x} (+{length}) lies past the "
                                            f"end of the file ({file_size} bytes)")

    def _open_backing(self, name: str, fmt: str | None, policy: Policy) -> Image:
        """The backing file, opened once as a file this image names. A backing format in the
        header is taken as the operator's own naming of it (raw means raw, never probed);
        without one the format is detected, and a detected backing file names nothing further:
        a guest can write any header into a raw disk (QEMU's CVE-2008-2004)."""
        if policy.max_chain_depth < 1:
            raise ImageError(self.path, f"backing chain is deeper than the policy allows "
                                        f"(at backing file {name})")
        try:
            source = Source.named(name, by=self.src, what="backing file", policy=policy)
        except MissingFile:
            raise ImageError(self.path, f"backing file {name} not found "
                                        f"(needed by {self.path.name})") from None
        try:
            if source.identity == self.src.identity or source.identity in _opening.get():
                raise ImageError(self.path, f"backing file {name}: the backing chain loops "
                                            f"back to an image already in it")
            found = "raw" if fmt == "raw" else detect(source)
            if fmt is not None and QEMU_FORMAT_TO_DRIVER.get(fmt) != found:
                raise ImageError(self.path, f"backing file {name} is {found}, but the header "
                                            f"says {fmt}")
            if found not in QEMU_FORMAT_TO_DRIVER.values():
                raise ImageError(self.path, f"backing file {name} is {found}; a backing file "
                                            f"must be raw, qcow2 or vhd")
        except BaseException:
            source.close()
            raise
        below = dataclasses.replace(policy, max_chain_depth=policy.max_chain_depth - 1)
        if fmt is None:
            below = dataclasses.replace(below, follow_references=False)
        token = _opening.set((*_opening.get(), self.src.identity))
        try:
            return driver(found).open(source, below)
        except ReferenceRefused as e:
            if e.path != str(source.path) or not policy.follow_references:
                raise
            raise ImageError(self.path, f"backing file {name} is {found} by its content (the "
                                        f"header names no backing format) and names its own "
                                        f"{e.what} ({e.name!r}); a detected format follows no "
                                        f"reference: record the backing format (qemu-img "
                                        f"rebase -u -F "
                                        f"{DRIVER_TO_QEMU_FORMAT[found]} -b {name})") from None
        finally:
            _opening.reset(token)

    # -- the map ---------------------------------------------------------------------------

    def extents(self) -> Iterator[Extent]:
        own = coalesce(self._own_extents())
        if self.backing is None:
            return own
        return coalesce(_overlay(own, self.backing))

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        with memoryview(out) as view:
            self.read_into(offset, view)
        return out

    def read_into(self, offset: int, view: memoryview) -> None:
        """The bytes of [offset, offset + len(view)) into `view`, every byte written (the copy
        loop hands in the device's own buffer: no copy between)."""
        length = len(view)
        if offset < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the virtual "
                                        f"size {self.virtual_size}")
        for run in self._map(offset, offset + length) if length else ():
            at = run.offset - offset
            piece = view[at:at + run.length]
            if run.compressed is not None:
                within = run.offset % self.cluster_size
                cluster = self._inflate(*run.compressed)
                piece[:] = cluster[within:within + run.length]
            elif run.kind is Kind.DATA:
                _pread_into(self.data, piece, run.host)
            elif run.kind is Kind.HOLE and self.backing is not None:
                piece[:] = read_clipped(self.backing, run.offset, run.length)
            else:
                piece[:] = bytes(run.length)

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        if self.data is not self.src:
            self.data.close()
        self.src.close()  # closing a Source twice is harmless

    def _own_extents(self) -> Iterator[Extent]:
        """This image's map alone: HOLE where a cluster is unallocated here. An allocated range
        whose host bytes are a hole in the file (preallocation=metadata) reads as zeros."""
        for run in self._map(0, self.virtual_size):
            if run.kind is Kind.DATA and run.compressed is None:
                for start, end, data in self.data.segments(run.host, run.host + run.length):
                    yield Extent(run.offset + start - run.host, end - start,
                                 Kind.DATA if data else Kind.ZERO)
            else:
                yield Extent(run.offset, run.length, run.kind)

    def _map(self, start: int, end: int) -> Iterator[_Run]:
        """Runs covering [start, end), each checked before anyone reads through it."""
        cs, per_table = self.cluster_size, self.l2_entries
        first, last = start // cs, -(-end // cs)
        runs = _Runs()
        for l1_index in range(first // per_table, (last - 1) // per_table + 1):
            lo = max(first, l1_index * per_table)
            hi = min(last, (l1_index + 1) * per_table)
            self._table_runs(runs, l1_index, lo, hi)
            yield from self._clipped(runs.drain(), start, end)
        yield from self._clipped(runs.drain(final=True), start, end)

    def _clipped(self, runs: list[_Run], start: int, end: int) -> Iterator[_Run]:
        # The first and last clusters (or subclusters) may reach outside [start, end).
        for run in runs:
            if run.offset < end and run.offset + run.length > start:
                yield self._checked(run.clip(start, end))

    def _table_runs(self, runs: _Runs, l1_index: int, lo: int, hi: int) -> None:
        """Add the runs of guest clusters [lo, hi), all mapped by L2 table `l1_index`."""
        cs = self.cluster_size
        table = self._l2_table(l1_index)
        if table is None:
            runs.add(lo * cs, (hi - lo) * cs, Kind.HOLE)
            return
        base = l1_index * self.l2_entries
        if self.extended:
            self._extended_runs(runs, table, base, lo, hi)
            return
        bad, external = self._bad_bits, self.external
        for cluster in range(lo, hi):
            entry = table[cluster - base]
            guest = cluster * cs
            if entry == 0:
                runs.add(guest, cs, Kind.HOLE)
            elif entry & OFLAG_COMPRESSED:
                runs.add(guest, cs, Kind.DATA, compressed=self._compressed(entry, guest))
            elif entry & bad:
                raise ImageError(self.path, f"L2 entry {entry:#018x} for guest offset {guest} "
                                            f"is unaligned or has reserved bits set")
            elif entry & OFLAG_ZERO:
                runs.add(guest, cs, Kind.ZERO)
            elif entry & OFFSET_MASK or (external and entry & OFLAG_COPIED):
                runs.add(guest, cs, Kind.DATA, entry & OFFSET_MASK)
            else:
                runs.add(guest, cs, Kind.HOLE)

    def _extended_runs(self, runs: _Runs, table: array, base: int, lo: int, hi: int) -> None:
        cs = self.cluster_size
        sub = cs // SUBCLUSTERS
        bad, external = self._bad_bits, self.external
        for cluster in range(lo, hi):
            i = 2 * (cluster - base)
            entry, bitmap = table[i], table[i + 1]
            guest = cluster * cs
            if entry & OFLAG_COMPRESSED:
                runs.add(guest, cs, Kind.DATA, compressed=self._compressed(entry, guest))
                continue
            if entry & bad:
                raise ImageError(self.path, f"L2 entry {entry:#018x} for guest offset {guest} "
                                            f"is unaligned or has reserved bits set")
            host = entry & OFFSET_MASK
            alloc, zero = bitmap & ALL_SUBCLUSTERS, bitmap >> SUBCLUSTERS
            if alloc & zero:
                raise ImageError(self.path, f"subclusters at guest offset {guest} are both "
                                            f"allocated and zero")
            if alloc and not (host or (external and entry & OFLAG_COPIED)):
                raise ImageError(self.path, f"allocated subclusters at guest offset {guest} "
                                            f"have no host cluster")
            if alloc == ALL_SUBCLUSTERS:
                runs.add(guest, cs, Kind.DATA, host)
            elif zero == ALL_SUBCLUSTERS:
                runs.add(guest, cs, Kind.ZERO)
            elif not alloc and not zero:
                runs.add(guest, cs, Kind.HOLE)
            else:
                for s in range(SUBCLUSTERS):
                    bit = 1 << s
                    if alloc & bit:
                        runs.add(guest + s * sub, sub, Kind.DATA, host + s * sub)
                    else:
                        runs.add(guest + s * sub, sub, Kind.ZERO if zero & bit else Kind.HOLE)

    def _compressed(self, entry: int, guest: int) -> tuple[int, int]:
        if self.external:
            raise ImageError(self.path, f"compressed cluster at guest offset {guest} in an image "
                                        f"with an external data file")
        bits = self._compressed_bits
        offset = entry & ((1 << bits) - 1)
        sectors = ((entry & ~OFLAG_COMPRESSED & ~OFLAG_COPIED) >> bits) + 1
        return offset, sectors * SECTOR - offset % SECTOR

    def _checked(self, run: _Run) -> _Run:
        if run.compressed is not None:
            offset, length = run.compressed
            # The last sector of the last compressed cluster may end past EOF; QEMU reads zeros.
            self._check_host(offset, min(length, max(1, self.src.size - offset)),
                             "compressed cluster", run.offset)
        elif run.kind is Kind.DATA:
            self._check_host(run.host, run.length, "data cluster", run.offset)
        return run

    def _check_host(self, host: int, length: int, what: str, guest: int) -> None:
        if host + length > self.data.size:
            raise ImageError(self.path, f"{what} for guest offset {guest} at host offset "
                                        f"{host:#x} lies past the end of the file")
        if self.data is self.src:
            cs = self.cluster_size
            cluster = self._taken.first(host // cs, -(-(host + length) // cs))
            if cluster is not None:
                raise ImageError(self.path, f"{what} for guest offset {guest} at host offset "
                                            f"{host:#x} overlaps {self._name_of(cluster)}: "
                                            f"guest data placed on the image's own metadata")

    def _l2_table(self, l1_index: int) -> array | None:
        # Every L1 entry was checked when the image was opened (_metadata_clusters).
        offset = self.l1[l1_index] & OFFSET_MASK
        if offset == 0:
            return None
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        table = _words(self.src.read_at(offset, self.cluster_size, f"L2 table {l1_index}"))
        self._l2_cache[offset] = table
        if len(self._l2_cache) > L2_CACHE_TABLES:
            self._l2_cache.popitem(last=False)
        return table

    def _metadata_clusters(self, h: Header, file_size: int, policy: Policy) -> _ClusterMap:
        """The clusters of the file that hold metadata: the header, the L1 and refcount tables,
        every L2 table the L1 maps and every refcount block. Guest data placed on any of them
        is refused (qemu-img check calls such an image corrupt), and so is an L2 table or
        refcount block placed on other metadata, so every table is read from its own place.
        One bit a cluster of the file, within the policy's table budget."""
        cs = h.cluster_size
        clusters = -(-file_size // cs)
        if -(-clusters // 8) > policy.max_table_bytes:
            raise ImageError(self.path, f"a file of {file_size} bytes in {cs}-byte clusters needs "
                                        f"a cluster map of {-(-clusters // 8)} bytes to check, "
                                        f"over the policy's {policy.max_table_bytes}")
        taken = _ClusterMap(clusters)
        for start, end, name in self._metadata:
            if start < end:
                self._claim(taken, start // cs, -(-end // cs), name)
        # Each L2 table the active L1 maps is a cluster of its own: one mapped twice (only
        # snapshots share them) or placed on other metadata is refused, which also keeps a walk
        # of the map proportional to the file, whatever virtual size it claims.
        l1 = self.l1
        if len(l1) - l1.count(0) > clusters:
            raise ImageError(self.path, f"the L1 table maps {len(l1) - l1.count(0)} L2 tables, "
                                        f"more than the file's {clusters} clusters hold: the L1 "
                                        f"table maps one L2 table more than once")
        for index, entry in _nonzero(l1):
            offset = entry & OFFSET_MASK
            if entry & L1_RESERVED or offset % cs:
                raise ImageError(self.path, f"L1 entry {index} ({entry:#018x}) is unaligned or "
                                            f"has reserved bits set")
            if offset == 0:
                continue
            if offset + cs > file_size:
                raise ImageError(self.path, f"L2 table {index} at {offset:#x} lies past the end "
                                            f"of the file ({file_size} bytes)")
            if taken.claim(offset // cs):
                name = self._name_of(offset // cs, other="another L2 table")
                if name == "another L2 table":
                    raise ImageError(self.path, "the L1 table maps one L2 table more than once")
                raise ImageError(self.path, f"L2 table {index} at {offset:#x} overlaps {name}")
        # The refcount table is only scanned, a chunk at a time, never kept.
        per_chunk = SCAN_CHUNK // 8
        entries = h.refcount_table_clusters * cs // 8
        for base in range(0, entries, per_chunk):
            count = min(per_chunk, entries - base)
            chunk = _words(self.src.read_at(h.refcount_table_offset + base * 8, count * 8,
                                            "refcount table"))
            for index, entry in _nonzero(chunk, base):
                offset = entry & ~(cs - 1)  # bits 9-63; the cluster-offset bits must be clear
                if entry != offset:
                    raise ImageError(self.path, f"refcount table entry {index} ({entry:#018x}) "
                                                f"is unaligned or has reserved bits set")
                if offset + cs > file_size:
                    raise ImageError(self.path, f"refcount block {index} at {offset:#x} lies "
                                                f"past the end of the file ({file_size} bytes)")
                if taken.claim(offset // cs):
                    name = self._name_of(offset // cs, other="an L2 table or refcount block")
                    raise ImageError(self.path, f"refcount block {index} at {offset:#x} "
                                                f"overlaps {name}")
        return taken

    def _claim(self, taken: _ClusterMap, first: int, end: int, what: str) -> None:
        for cluster in range(first, end):
            if taken.claim(cluster):
                raise ImageError(self.path, f"{what} overlaps {self._name_of(cluster)}")

    def _name_of(self, cluster: int, other: str = "an L2 table or refcount block") -> str:
        """Which metadata a cluster holds, for a message (only the fixed tables are kept by
        name)."""
        cs = self.cluster_size
        for start, end, name in self._metadata:
            if start // cs <= cluster < -(-end // cs):
                return name
        return other

    def _inflate(self, offset: int, length: int) -> bytes:
        """One compressed cluster. Never more than a cluster (and one byte) is inflated, whatever
        the input says; a stream that holds more than a cluster is corrupt (QEMU never writes
        one) and refused."""
        if self._inflated is not None and self._inflated[0] == offset:
            return self._inflated[1]
        cs = self.cluster_size
        packed = self.src.read_at(offset, min(length, self.src.size - offset), "compressed cluster")
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                cluster = _unzstd(packed, cs + 1)
            else:
                inflater = zlib.decompressobj(DEFLATE_WBITS)
                cluster = inflater.decompress(packed, cs)
                if len(cluster) == cs and not inflater.eof:
                    cluster += inflater.decompress(inflater.unconsumed_tail, 1)
        except (zlib.error, ValueError) as e:
            raise ImageError(self.path,
                             f"compressed cluster at {offset:#x} is corrupt: {e}") from None
        if len(cluster) > cs:
            raise ImageError(self.path, f"compressed cluster at {offset:#x} inflates to more "
                                        f"than one cluster ({cs} bytes): corrupt")
        if len(cluster) != cs:
            raise ImageError(self.path, f"compressed cluster at {offset:#x} holds {len(cluster)} "
                                        f"bytes instead of {cs}")
        self._inflated = (offset, cluster)
        return cluster


class _ClusterMap:
    """A set of clusters of a file, one bit each."""

    def __init__(self, clusters: int):
        self.bits = bytearray(-(-clusters // 8))

    def claim(self, cluster: int) -> bool:
        """Add a cluster; whether it was there already."""
        byte, bit = divmod(cluster, 8)
        was = self.bits[byte] >> bit & 1
        self.bits[byte] |= 1 << bit
        return bool(was)

    def first(self, start: int, end: int) -> int | None:
        """The first cluster in [start, end) of the set, or None."""
        if start >= end:
            return None
        lo = start // 8
        word = int.from_bytes(self.bits[lo:-(-end // 8)], "little") >> (start - lo * 8)
        word &= (1 << (end - start)) - 1
        return start + (word & -word).bit_length() - 1 if word else None


def _nonzero(table: array, base: int = 0, chunk: int = 4096) -> Iterator[tuple[int, int]]:
    """(index, entry) of the non-zero entries, skipping runs of zeros at C speed."""
    for at in range(0, len(table), chunk):
        part = table[at:at + chunk]
        if part.count(0) != len(part):
            yield from ((base + at + i, entry) for i, entry in enumerate(part) if entry)


def _unzstd(packed: bytes, limit: int) -> bytes:
    """The first zstd frame of `packed` (the sectors a compressed cluster spans may hold the
    next cluster's frame), inflated up to `limit` bytes. Input goes in a few bytes at a time,
    so a frame that inflates to far more (a bomb) costs at most 2 MiB past the limit."""
    import zstandard  # optional: only zstd images need it, and open() checked it is there

    try:
        inflater = zstandard.ZstdDecompressor().decompressobj()
        out = bytearray()
        for at in range(0, len(packed), 64):  # 64 bytes inflate to 16 blocks (2 MiB) at most
            out += inflater.decompress(packed[at:at + 64])
            if inflater.eof or len(out) >= limit:
                break
        return bytes(out[:limit])
    except zstandard.ZstdError as e:
        raise ValueError(str(e)) from None


def _overlay(own: Iterable[Extent], backing: Image) -> Iterator[Extent]:
    """This image's extents with each HOLE replaced by what the backing file says there; past the
    backing file's end the image reads zeros."""
    below = iter(backing.extents())
    cur = next(below, None)
    for ext in own:
        if ext.kind is not Kind.HOLE:
            yield ext
            continue
        pos, end = ext.offset, ext.end
        while pos < end:
            while cur is not None and cur.end <= pos:
                cur = next(below, None)
            if cur is None or cur.offset >= end:
                yield Extent(pos, end - pos, Kind.HOLE)
                break
            if cur.offset > pos:
                yield Extent(pos, cur.offset - pos, Kind.HOLE)
                pos = cur.offset
            stop = min(end, cur.end)
            yield Extent(pos, stop - pos, cur.kind)
            pos = stop


def read_clipped(image: Image, offset: int, length: int) -> bytes | bytearray:
    """A parent's bytes, zeros past its end (a parent may be shorter than its child)."""
    inside = max(0, min(length, image.virtual_size - offset))
    data = image.read(offset, inside) if inside else b""
    return data + bytes(length - inside)


def _pread_into(src: Source, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(src.file.fileno(), [view], offset)
        if n <= 0:
            raise ImageError(src.path, f"short read of data at offset {offset}")
        view, offset = view[n:], offset + n


def _read_words(src: Source, offset: int, count: int, what: str) -> array:
    """`count` big-endian 64-bit words read straight into the table, so a large one is never
    held twice."""
    if offset + 8 * count > src.size:
        src.read_at(offset, 8 * count, what)  # raises, naming what runs past the end
    table = array("Q", bytes(8)) * count
    _pread_into(src, memoryview(table).cast("B"), offset)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _words(data: bytes) -> array:
    """Big-endian 64-bit words."""
    table = array("Q", data)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _text(path: Path, raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise ImageError(path, f"{what} contains a NUL byte")
    return os.fsdecode(raw)


def _feature_names(table: bytes, bits: int) -> str:
    names = []
    for pos in range(0, len(table) - FEATURE_NAME.size + 1, FEATURE_NAME.size):
        kind, bit, name = FEATURE_NAME.unpack_from(table, pos)
        if kind == 0 and bit < 64 and bits >> bit & 1:
            names.append(name.rstrip(b"\0").decode("ascii", "replace"))
    return f" ({', '.join(names)})" if names else ""
