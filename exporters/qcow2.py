"""Write QCOW2 v3 images (64 KiB clusters, 16-bit refcounts), optionally deflate-compressed, or
as an overlay over a parent image. Structures are the importer's (importers.qcow2).

The file grows by appending only: data clusters as the ordered writes complete them, each L2
table as soon as the writes move past the guest range it maps, then the L1 table, the refcount
table and blocks, and the header last into the cluster kept free for it. Memory holds one data
cluster, one L2 table, the L1 table and a refcount per host cluster (2 bytes per 64 KiB).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from array import array
from pathlib import Path

from thinstack.extents import Extent
from thinstack.importers import ImageError, detect, open_image
from thinstack.importers import qcow2 as fmt
from thinstack.sizes import SECTOR, round_up

from . import ExportError
from .atomic import FileWriter
from .layout import Layout, Piece, merge, runs

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
ZERO_CLUSTER = bytes(CLUSTER)
# Appended bytes gathered into one pwrite. Its buffer's pages are touched once: in the lab
# (0.34 ms a page) 8 MiB cost an export 2,060 more pages and ~0.5 s more than 1 MiB.
BATCH = 1 << 20
COMPRESSED_SECTOR_SHIFT = 62 - (CLUSTER_BITS - 8)


def create(path: str | os.PathLike, virtual_size: int, *, format: str = "qcow2",
           parent: str | os.PathLike | None = None, compress: bool = False,
           partial: str | None = None, **_) -> Qcow2Writer:
    if format != "qcow2":
        raise ExportError(f"not a qcow2 format: {format!r}")
    if virtual_size < 0:
        raise ExportError(f"negative virtual size {virtual_size}")
    return Qcow2Writer(Path(path), virtual_size, None if parent is None else Path(parent),
                       compress, partial)


class Qcow2Writer(FileWriter):
    """With a parent this is an overlay: a cluster it holds hides the parent's, so a cluster
    partly written takes the parent's bytes for the rest, and a whole cluster marked zero gets
    the zero flag instead of letting the parent show through."""

    def __init__(self, path: Path, virtual_size: int, parent: Path | None, compress: bool,
                 partial: str | None = None):
        self.compress = compress
        self.parent = None
        self.backing: tuple[bytes, bytes] | None = None  # name relative to the child, format
        if parent is not None:
            self.parent, self.backing = _open_parent(path, parent)
        # QEMU counts a disk in sectors; a size between sectors would lose its tail there.
        super().__init__(path, round_up(virtual_size, SECTOR), partial)
        self.end = CLUSTER  # where the next append lands; cluster 0 waits for the header
        self.packed_at = self.packed_end = 0  # free bytes for compressed clusters
        self.out = bytearray()  # appended bytes not yet written, from end - len(out)
        self.refcounts = array("H", [1])
        self.l1 = array("Q", bytes(8 * max(1, -(-self.size // (L2_ENTRIES * CLUSTER)))))
        self.l2: array | None = None
        self.l2_index = -1
        self.buf: bytearray | None = None  # the cluster being assembled from partial writes
        self.buf_index = -1
        self.covered: list[list[int]] = []  # [start, end) ranges of buf that writes reached

    # -- the Writer protocol --------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        self._advance(offset, len(data))
        view = memoryview(data).cast("B")
        while view:
            index, within = divmod(offset, CLUSTER)
            take = min(len(view), CLUSTER - within)
            if within == 0 and take == CLUSTER and self.buf is None:
                # As bytes: comparing a memoryview with zeros goes element by element.
                self._store(index, view[:take].tobytes())
            else:
                self._buffer(index)[within:within + take] = view[:take]
                self._cover(within, within + take)
            view, offset = view[take:], offset + take

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)
        end = offset + length
        while offset < end:
            index, within = divmod(offset, CLUSTER)
            take = min(end - offset, CLUSTER - within)
            if within == 0 and take >= self._limit(index) and self.buf is None:
                if self.parent is not None:
                    self._set_l2(index, fmt.OFLAG_ZERO)
            else:
                self._buffer(index)  # a fresh buffer is zeros already
                self._cover(within, within + take)
            offset += take

    # -- data clusters --------------------------------------------------------------------

    def _advance(self, offset: int, length: int) -> None:
        super()._advance(offset, length)
        if self.buf is not None and offset // CLUSTER != self.buf_index:
            self._flush_buffer()

    def _limit(self, index: int) -> int:
        """Bytes of cluster `index` inside the disk (less than a cluster only for the last)."""
        return min(CLUSTER, self.size - index * CLUSTER)

    def _buffer(self, index: int) -> bytearray:
        if self.buf is not None and self.buf_index != index:
            self._flush_buffer()
        if self.buf is None:
            self.buf, self.buf_index, self.covered = bytearray(CLUSTER), index, []
        return self.buf

    def _cover(self, start: int, end: int) -> None:
        if self.covered and self.covered[-1][1] == start:
            self.covered[-1][1] = end
        else:
            self.covered.append([start, end])

    def _flush_buffer(self) -> None:
        """Store the cluster being assembled, if any."""
        index, buf = self.buf_index, self.buf
        if buf is None:
            return
        self.buf = None
        if self.parent is not None:
            pos, base = 0, index * CLUSTER
            for start, end in [*self.covered, [self._limit(index), self._limit(index)]]:
                if start > pos:
                    buf[pos:start] = fmt.read_clipped(self.parent, base + pos, start - pos)
                pos = end
        self._store(index, buf)

    def _store(self, index: int, data) -> None:
        if data == ZERO_CLUSTER:
            if self.parent is not None:
                self._set_l2(index, fmt.OFLAG_ZERO)
            return
        if self.compress:
            packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                      fmt.DEFLATE_WBITS, 9)
            packed = packer.compress(data) + packer.flush()
            if len(packed) < CLUSTER:
                self._set_l2(index, self._store_packed(packed))
                return
        self._set_l2(index, fmt.OFLAG_COPIED | self._append_clusters(data))

    def _store_packed(self, packed: bytes) -> int:
        """Pack compressed clusters byte after byte into clusters of their own, so the raw
        clusters appended between them waste no space; returns the L2 entry."""
        if len(packed) > self.packed_end - self.packed_at:
            if self.packed_end != self.end:  # raw clusters came after: start afresh
                self.packed_at = self.packed_end = self.end
            self.packed_end = self._append_clusters(ZERO_CLUSTER, counted=False) + CLUSTER
        host = self.packed_at
        self._put(host, packed)
        self.packed_at += len(packed)
        extra_sectors = (host + len(packed) - 1) // SECTOR - host // SECTOR
        # Each compressed cluster counts one reference on each host cluster it touches.
        self._reference(host, len(packed))
        return fmt.OFLAG_COMPRESSED | extra_sectors << COMPRESSED_SECTOR_SHIFT | host

    # -- metadata -------------------------------------------------------------------------

    def _set_l2(self, index: int, entry: int) -> None:
        l1_index, i = divmod(index, L2_ENTRIES)
        if self.l2 is None or l1_index != self.l2_index:
            self._flush_l2()
            self.l2, self.l2_index = array("Q", bytes(CLUSTER)), l1_index
        self.l2[i] = entry

    def _flush_l2(self) -> None:
        if self.l2 is not None:
            self.l1[self.l2_index] = fmt.OFLAG_COPIED | self._append_clusters(_big_endian(self.l2))
            self.l2 = None

    def _finish(self) -> None:
        self._flush_buffer()
        self._flush_l2()
        l1_offset = self._append_clusters(_big_endian(self.l1))
        table_offset, table_clusters = self._append_refcounts()
        first = _first_cluster(self.size, len(self.l1), l1_offset, table_offset,
                               table_clusters, self.backing)
        self._flush_out()
        self.file.pwrite(first, 0)
        self.file.truncate(self.end)

    def _append_refcounts(self) -> tuple[int, int]:
        """Refcount table and blocks at the end, counting themselves; returns the table's offset
        and size in clusters."""
        blocks, table = _refcount_clusters(self.end // CLUSTER)
        table_offset = self.end
        blocks_offset = table_offset + table * CLUSTER
        self._reference(table_offset, (table + blocks) * CLUSTER)
        entries = array("Q", (blocks_offset + i * CLUSTER for i in range(blocks)))
        self._append_clusters(_big_endian(entries), counted=False)
        counts = self.refcounts
        counts.frombytes(bytes(2 * (blocks * REFCOUNTS_PER_BLOCK - len(counts))))
        self._append_clusters(_big_endian(counts), counted=False)
        return table_offset, table

    # -- appending ------------------------------------------------------------------------

    def _append_clusters(self, data, counted: bool = True) -> int:
        """Append `data` padded to whole clusters (so the end stays cluster-aligned); returns
        where it starts."""
        host = self.end
        self.out += data
        self.out += bytes(-len(data) % CLUSTER)
        self.end = host + round_up(len(data), CLUSTER)
        if counted:
            self._reference(host, self.end - host)
        if len(self.out) >= BATCH:
            self._flush_out()
        return host

    def _put(self, host: int, data: bytes) -> None:
        """Write inside clusters already appended: into the file up to where the bytes not yet
        written begin, into those from there (compressed data packed across two clusters can
        straddle the two, when the first was written out on its own)."""
        start = self.end - len(self.out)
        split = max(0, min(len(data), start - host))
        if split:
            self.file.pwrite(data[:split], host)
        if split < len(data):
            at = host + split - start
            self.out[at:at + len(data) - split] = data[split:]

    def _flush_out(self) -> None:
        if self.out:
            self.file.pwrite(self.out, self.end - len(self.out))
            self.out = bytearray()

    def _reference(self, start: int, length: int) -> None:
        first, last = start // CLUSTER, (start + length - 1) // CLUSTER
        counts = self.refcounts
        if last >= len(counts):
            counts.frombytes(bytes(2 * (last + 1 - len(counts))))
        for cluster in range(first, last + 1):
            counts[cluster] += 1


def _refcount_clusters(used: int) -> tuple[int, int]:
    """Refcount blocks and table clusters that count `used` clusters and themselves."""
    blocks = table = 0
    while True:
        need_blocks = -(-(used + blocks + table) // REFCOUNTS_PER_BLOCK)
        need_table = -(-need_blocks * 8 // CLUSTER)
        if (need_blocks, need_table) == (blocks, table):
            return blocks, table
        blocks, table = need_blocks, need_table


def _first_cluster(size: int, l1_size: int, l1_offset: int, table_offset: int,
                   table_clusters: int, backing: tuple[bytes, bytes] | None) -> bytes:
    """The header, its extensions and the backing file's name."""
    header = fmt.Header(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=CLUSTER_BITS,
        size=size, crypt_method=0, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=table_offset, refcount_table_clusters=table_clusters,
        nb_snapshots=0, snapshots_offset=0, refcount_order=REFCOUNT_ORDER,
        header_length=fmt.V3_HEADER_LENGTH)
    extensions = b""
    if backing is not None:
        name, backing_format = backing
        extensions = fmt.pack_extension(fmt.EXT_BACKING_FORMAT, backing_format)
        header = dataclasses.replace(
            header, backing_file_size=len(name),
            backing_file_offset=header.header_length + len(extensions) + fmt.EXTENSION.size)
    first = header.pack() + extensions + fmt.pack_extension(fmt.EXT_END, b"")
    return first + backing[0] if backing is not None else first


def layout(size: int, extents: list[Extent], chunk: int, **_) -> Layout:
    """What Qcow2Writer (no parent, uncompressed) writes for a disk whose data is `extents`:
    the same appends in the same order. A data cluster for every cluster the data touches;
    each L2 table appended right after the first data cluster of the next table's range (as
    the writer's _store does); then L1, refcount table and blocks, every count one."""
    size = round_up(size, SECTOR)
    l1 = array("Q", bytes(8 * max(1, -(-size // (L2_ENTRIES * CLUSTER)))))
    pieces: list[Piece] = []
    end = CLUSTER
    l2: array | None = None
    l2_index = -1

    def append_l2() -> None:
        nonlocal end
        if l2 is not None:
            l1[l2_index] = fmt.OFLAG_COPIED | end
            pieces.append(Piece(end, CLUSTER, None, _big_endian(l2)))
            end += CLUSTER

    for first, stop in runs(extents, size, chunk, CLUSTER):
        index = first
        while index < stop:  # one L2 table's range at a time
            table, i = divmod(index, L2_ENTRIES)
            count = min(stop - index, L2_ENTRIES - i)
            # A run entering a new table: its first cluster, then the previous table.
            take = 1 if table != l2_index and l2 is not None else count
            host = end
            pieces.append(Piece(host, min(take * CLUSTER, size - index * CLUSTER),
                                index * CLUSTER))
            end += take * CLUSTER
            if table != l2_index:
                append_l2()
                l2, l2_index = array("Q", bytes(CLUSTER)), table
            assert l2 is not None
            l2[i:i + take] = array("Q", range(fmt.OFLAG_COPIED | host,
                                              fmt.OFLAG_COPIED | host + take * CLUSTER, CLUSTER))
            index += take
    append_l2()
    l1_offset = end
    pieces.append(Piece(end, len(l1) * 8, None, _big_endian(l1)))
    end += round_up(len(l1) * 8, CLUSTER)
    blocks, table_clusters = _refcount_clusters(end // CLUSTER)
    table_offset, blocks_offset = end, end + table_clusters * CLUSTER
    total = blocks_offset // CLUSTER + blocks
    entries = array("Q", range(blocks_offset, blocks_offset + blocks * CLUSTER, CLUSTER))
    counts = array("H", [1]) * total
    pieces += [Piece(table_offset, len(entries) * 8, None, _big_endian(entries)),
               Piece(blocks_offset, total * 2, None, _big_endian(counts))]
    first_cluster = _first_cluster(size, len(l1), l1_offset, table_offset, table_clusters, None)
    return Layout(total * CLUSTER, [Piece(0, len(first_cluster), None, first_cluster),
                                    *merge(pieces)])


def _open_parent(child: Path, parent: Path):
    """The parent image (for the bytes a partly written cluster keeps) and how the header names
    it: relative to the child's directory, with QEMU's name for its format."""
    try:
        driver = detect(parent)
        image = open_image(parent, format=driver)  # named, so its own backing file is followed
    except ImageError as e:
        raise ExportError(f"cannot use {parent} as the parent: {e.message}") from None
    qemu_format = getattr(image, "qemu_format", None) or fmt.DRIVER_TO_QEMU_FORMAT.get(driver)
    if qemu_format is None:
        image.close()
        raise ExportError(f"parent {parent} is {driver}, which QEMU cannot read")
    name = os.fsencode(os.path.relpath(parent.resolve(), child.resolve().parent))
    if len(name) > fmt.MAX_BACKING_NAME:
        image.close()
        raise ExportError(f"parent path {parent} is longer than {fmt.MAX_BACKING_NAME} bytes")
    return image, (name, qemu_format.encode())


def _big_endian(words: array) -> bytes:
    if sys.byteorder == "little":
        words = array(words.typecode, words)
        words.byteswap()
    return words.tobytes()
