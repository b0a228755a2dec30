"""The one copy loop: moves an extent stream from a reader into a sink, chunk by chunk.

    stats = copy_extents(extents, read, sink, size=..., chunk=...)

- `extents`: Extents in offset order covering [0, size) (gaps read as HOLE), e.g. Image.extents().
- `read(offset, length) -> bytes` (or bytearray): any range in [0, size); what lies outside
  DATA reads as zeros.
- `sink`: `write(offset, data)` and `mark_zero(offset, length)`, called in offset order (as
  exporters' Writers require). `data` is a memoryview into the read buffer, valid only during the
  call. `mark_zero` says the range reads as zeros (a ZERO extent, or DATA found all-zero); HOLE
  ranges get no call at all: whatever the sink holds there stands (zeros on a fresh volume, the
  parent's bytes in a differencing image).

DATA is widened to whole chunks of the destination (the thin pool's block size) and read whole,
so every chunk the sink gets is written in full: none is ever left partly written, so none can
show what the pool's disk held before, whether or not the pool zeroes new chunks. Chunks that
turn out all-zero are dropped (mark_zero, not write): a thin volume allocates nothing for them.
Consecutive non-zero chunks go out as one write of up to `batch` bytes.

`checkpoint(position)` is called every `checkpoint_every` bytes read, after the writes before
`position` have been issued; a caller syncs its sink there and journals the position. A later
`copy_extents(..., start=position)` continues from it: positions are whole chunks, so a resumed
copy rewrites nothing partially, and rewriting a chunk with the same bytes is harmless.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from thinstack.extents import Extent, Kind
from thinstack.sizes import round_down, round_up

# The most read and written in one piece. A sink keeps DEFAULT_DEPTH buffers of it, whose every
# page the process touches: in the lab (a page 0.34 ms) 8 MiB batches cost an import of 2 GiB
# 7,100 more pages and ~2 s more than 1 MiB ones, and 1 MiB is still a long I/O to any disk.
DEFAULT_BATCH = 1 << 20
DEFAULT_CHECKPOINT = 256 << 20
DEFAULT_DEPTH = 4
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
_TRACE = os.environ.get("THINSTACK_TRACE") == "1"


class Sink(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...

    def mark_zero(self, offset: int, length: int) -> None: ...


@dataclass
class CopyStats:
    bytes_read: int = 0  # read from the source (whole chunks around its DATA)
    bytes_written: int = 0  # handed to sink.write (the non-zero chunks)
    position: int = 0  # everything before it has been handed to the sink




def aligned(extents: Iterable[Extent], *, size: int, chunk: int, start: int = 0
            ) -> Iterator[Extent]:
    """The extents from `start` on, with every DATA extent widened to whole chunks (the last
    one ends at `size`) and merged with its neighbours; ZERO and HOLE keep what DATA leaves."""
    if start % chunk and start < size:
        raise ValueError(f"copy can only start at a chunk boundary, not at {start}")
    pos = start  # everything before pos has been yielded
    run: list[int] | None = None  # the widened DATA run being extended: [begin, end)
    held: list[Extent] = []  # ZERO/HOLE seen since the run's last extension
    for ext in extents:
        if ext.kind is not Kind.DATA:
            held.append(ext)
            continue
        begin = max(round_down(ext.offset, chunk), start)
        end = min(round_up(ext.end, chunk), size)
        if end <= begin:
            continue
        if run is not None and begin <= run[1]:
            # What was held lies in [run end, ext.offset), inside the widened run now.
            run[1] = max(run[1], end)
            held = []
            continue
        if run is not None:
            yield Extent(run[0], run[1] - run[0], Kind.DATA)
            pos = run[1]
        yield from _clip(held, pos, begin)
        held, pos, run = [], begin, [begin, end]
    if run is not None:
        yield Extent(run[0], run[1] - run[0], Kind.DATA)
        pos = run[1]
    yield from _clip(held, pos, size)


def _clip(extents: list[Extent], lo: int, hi: int) -> Iterator[Extent]:
    for ext in extents:
        begin, end = max(ext.offset, lo), min(ext.end, hi)
        if begin < end:
            yield Extent(begin, end - begin, ext.kind)


def data_bytes(extents: Iterable[Extent], *, size: int, chunk: int, start: int = 0) -> int:
    """Bytes the copy will read from `start` on: the DATA extents in whole chunks. It is also
    the most a fresh thin volume can allocate for them."""
    return sum(e.length for e in aligned(extents, size=size, chunk=chunk, start=start)
               if e.kind is Kind.DATA)


Read = Callable[[int, int], bytes | bytearray]


def copy_extents(extents: Iterable[Extent], read: Read, sink: Sink, *,
                 size: int, chunk: int, start: int = 0,
                 progress: Callable[[CopyStats], None] | None = None,
                 checkpoint: Callable[[int], None] | None = None,
                 batch: int = DEFAULT_BATCH,
                 checkpoint_every: int = DEFAULT_CHECKPOINT,
                 read_into: Callable[[int, memoryview], None] | None = None) -> CopyStats:
    """Copy [start, size) as described in the module's docstring; see CopyStats.

    read_into(offset, view): `read` into a buffer of the caller's, every byte of it written
    (zeros where the image holds none). Given it, a sink that lends its own buffers
    (Lending: BlockDeviceSink) gets the bytes with no copy between the image and the device."""
    started = time.monotonic()
    _reuse_freed_buffers()
    batch = max(chunk, round_down(batch, chunk))
    zeros = memoryview(bytes(chunk))  # compared against, never copied
    stats = CopyStats(position=start)
    lender = sink if read_into is not None and isinstance(sink, Lending) else None
    since_checkpoint = 0
    for ext in aligned(extents, size=size, chunk=chunk, start=start):
        if ext.kind is Kind.ZERO:
            sink.mark_zero(ext.offset, ext.length)
        if ext.kind is not Kind.DATA:
            continue
        for offset in range(ext.offset, ext.end, batch):
            length = min(batch, ext.end - offset)
            if lender is not None and read_into is not None:
                stats.bytes_written += _lent(lender, read_into, offset, length, chunk, zeros)
            else:
                data = read(offset, length)
                if len(data) != length:
                    raise ValueError(f"read of {length} bytes at {offset} returned {len(data)}")
                stats.bytes_written += _emit(sink, offset, data, chunk, zeros)
            stats.bytes_read += length
            stats.position = offset + length
            since_checkpoint += length
            if checkpoint is not None and since_checkpoint >= checkpoint_every \
                    and stats.position < size:
                checkpoint(stats.position)
                since_checkpoint = 0
            if progress is not None:
                progress(stats)
    stats.position = size
    if progress is not None:
        progress(stats)
    if _TRACE:  # beside the commands' times, so that a trace shows the whole operation
        print(f"thinstack: {time.monotonic() - started:6.3f}s copy {stats.bytes_read} bytes read, "
              f"{stats.bytes_written} written", file=sys.stderr)
    return stats


def _lent(sink: Lending, read_into: Callable[[int, memoryview], None], offset: int,
          length: int, chunk: int, zeros: memoryview) -> int:
    """One batch read straight into a buffer the sink lends, its non-zero runs written from
    there. Returns the bytes written."""
    buffer = sink.lend()
    try:
        with buffer.view[:length] as view:
            read_into(offset, view)
        written = 0
        for lo, hi, zero in _runs(buffer.raw, buffer.base, length, chunk, zeros):
            if zero:
                sink.mark_zero(offset + lo, hi - lo)
            else:
                sink.write_lent(offset + lo, buffer, lo, hi)
                written += hi - lo
    finally:
        sink.give_back(buffer)
    return written


@functools.cache
def _reuse_freed_buffers() -> None:
    """Have glibc keep freed multi-MiB blocks for reuse rather than hand them back to the
    kernel. Every batch a reader returns is a fresh allocation; memory the kernel hands out anew
    faults in page by page, which made the copy four times slower in the lab (User-Mode Linux,
    where a page fault is expensive) and costs a little everywhere."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: a batch comes from the heap
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)  # and the heap keeps that much free memory


def _emit(sink: Sink, offset: int, data: bytes | bytearray, chunk: int, zeros: memoryview) -> int:
    """Hand `data` (read at `offset`, a chunk boundary) to the sink: runs of non-zero chunks as
    one write each, runs of all-zero chunks as one mark_zero each. Returns the bytes written."""
    view = memoryview(data)
    written = 0
    for lo, hi, zero in _runs(data, 0, len(data), chunk, zeros):
        if zero:
            sink.mark_zero(offset + lo, hi - lo)
        else:
            sink.write(offset + lo, view[lo:hi])
            written += hi - lo
    return written


def _runs(data: bytes | bytearray, base: int, length: int, chunk: int, zeros: memoryview
          ) -> Iterator[tuple[int, int, bool]]:
    """data[base:base + length] in runs of all-zero or non-zero chunks: (lo, hi, zero), from
    base. startswith compares in place (memcmp), without slicing a copy out of data."""
    run_start, run_zero = 0, None
    for at in range(0, length, chunk):
        n = min(chunk, length - at)
        is_zero = data.startswith(zeros[:n], base + at, base + at + n)
        if run_zero is not None and is_zero is not run_zero:
            yield run_start, at, run_zero
            run_start = at
        run_zero = is_zero
    if run_zero is not None:
        yield run_start, length, run_zero


class Buffer:
    """`size` bytes aligned to a page (as O_DIRECT needs) inside a bytearray: `view` is them;
    `raw` and `base` let bytes.startswith look at them in place."""

    def __init__(self, size: int, align: int = mmap.PAGESIZE):
        self.raw = bytearray(size + align)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.raw))
        self.base = -address % align
        self.view = memoryview(self.raw)[self.base:self.base + size]


@runtime_checkable
class Lending(Protocol):
    """A sink that lends the copy loop its buffers to read into and writes from them."""

    def lend(self) -> Buffer: ...

    def write_lent(self, offset: int, buffer: Buffer, lo: int, hi: int) -> None: ...

    def give_back(self, buffer: Buffer) -> None: ...

    def mark_zero(self, offset: int, length: int) -> None: ...


class BlockDeviceSink:
    """A fresh thin volume as a sink. Writes bypass the page cache (O_DIRECT, from aligned
    buffers): in the lab that is faster than buffered writes plus fdatasync, and a multi-GiB
    import does not evict everything else's cache. Up to `depth` writes are in flight on worker
    threads, so the device is busy while the copy loop reads and checks the next batch (a
    device, like qemu-img's parallel requests, also serves several writes faster than one at a
    time). mark_zero does nothing: a fresh thin volume reads zeros wherever nothing was
    written, and writing zeros would allocate chunks."""

    # O_DIRECT needs offsets, lengths and memory aligned to the logical block size; a page is a
    # multiple of every logical block size Linux supports.
    ALIGN = mmap.PAGESIZE

    def __init__(self, path: str, *, batch: int = DEFAULT_BATCH, depth: int = DEFAULT_DEPTH):
        """batch: the largest write taken in one piece (the copy loop's batch); depth: how many
        buffers the writes in flight may fill."""
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        self.buffer_size = round_up(batch, self.ALIGN)
        self.free = [Buffer(self.buffer_size, self.ALIGN) for _ in range(depth)]
        # Writes in order, each with the buffer it frees once done (None: another write of the
        # same buffer follows); a lent buffer comes back as (None, buffer) behind its writes.
        self.in_flight: deque[tuple[Future | None, Buffer | None]] = deque()
        self.workers = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="sink")

    def write(self, offset: int, data: memoryview) -> None:
        """Copy `data` into buffers of ours and write it from there."""
        for at in range(0, len(data), self.buffer_size):
            piece = data[at:at + self.buffer_size]
            buffer = self._buffer()
            buffer.view[:len(piece)] = piece
            self._submit(offset + at, buffer, 0, len(piece), frees=True)

    def lend(self) -> Buffer:
        """A buffer for the copy loop to read into (Lending): no copy on the way out."""
        return self._buffer()

    def write_lent(self, offset: int, buffer: Buffer, lo: int, hi: int) -> None:
        self._submit(offset, buffer, lo, hi, frees=False)

    def give_back(self, buffer: Buffer) -> None:
        """The copy loop is done with a lent buffer: free once the writes from it are done."""
        self.in_flight.append((None, buffer))

    def _submit(self, offset: int, buffer: Buffer, lo: int, hi: int, *, frees: bool) -> None:
        if offset % self.ALIGN:
            raise ValueError(f"{self.path}: unaligned write at {offset}")
        # A tail that is not a whole block is padded with zeros: it lies past the image's end,
        # inside the volume (sized in whole extents), which reads zeros there anyway.
        padded = round_up(hi - lo, self.ALIGN)
        buffer.view[hi:lo + padded] = bytes(lo + padded - hi)
        future = self.workers.submit(self._pwrite, buffer.view[lo:lo + padded], offset)
        self.in_flight.append((future, buffer if frees else None))

    def mark_zero(self, offset: int, length: int) -> None:
        pass

    def sync(self) -> None:
        """Wait for every write (raising the first one's error) and make them durable: the
        flush also commits the thin pool's metadata."""
        while self.in_flight:
            self._complete()
        os.fsync(self.fd)

    def close(self) -> None:
        self.workers.shutdown(wait=True)  # never close the descriptor under a write
        os.close(self.fd)

    def _buffer(self) -> Buffer:
        while not self.free:
            self._complete()
        return self.free.pop()

    def _complete(self) -> None:
        """Wait for the oldest write; free the buffer it was the last user of."""
        future, buffer = self.in_flight.popleft()
        if future is not None:
            future.result()
        if buffer is not None:
            self.free.append(buffer)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)
