"""The copy loop against an in-memory image and a recording sink: what it reads, what it writes,
what it drops, and where a resumed copy starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinstack.copy import BlockDeviceSink, CopyStats, aligned, copy_extents, data_bytes
from thinstack.extents import Extent, Kind
from thinstack.sizes import round_up

CHUNK = 4096


class MemImage:
    """An image whose bytes are `content`, described by `extents`; it records every read."""

    def __init__(self, content: bytes, extents: list[Extent]):
        self.content = content
        self.extents = extents
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= len(self.content)
        self.reads.append((offset, length))
        return self.content[offset:offset + length]

    def read_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.read(offset, len(view))


class RecordingSink:
    """Records calls, keeps the bytes written, and checks they come in offset order."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.calls: list[tuple[str, int, int]] = []
        self.pos = 0

    def write(self, offset: int, data: memoryview) -> None:
        self._advance(offset, len(data))
        self.data[offset:offset + len(data)] = data
        self.calls.append(("write", offset, len(data)))

    def mark_zero(self, offset: int, length: int) -> None:
        self._advance(offset, length)
        self.calls.append(("zero", offset, length))

    def _advance(self, offset: int, length: int) -> None:
        assert offset >= self.pos, f"out of order: {offset} after {self.pos}"
        self.pos = offset + length

    def writes(self) -> list[tuple[int, int]]:
        return [(o, n) for kind, o, n in self.calls if kind == "write"]

    def zeros(self) -> list[tuple[int, int]]:
        return [(o, n) for kind, o, n in self.calls if kind == "zero"]


def image(size: int, pieces: dict[int, bytes], extents: list[tuple[int, int, Kind]]) -> MemImage:
    content = bytearray(size)
    for offset, data in pieces.items():
        content[offset:offset + len(data)] = data
    return MemImage(bytes(content), [Extent(o, n, k) for o, n, k in extents])


def run(img: MemImage, **options) -> tuple[RecordingSink, CopyStats]:
    sink = RecordingSink(len(img.content))
    stats = copy_extents(img.extents, img.read, sink, size=len(img.content),
                         chunk=options.pop("chunk", CHUNK), **options)
    return sink, stats


def test_data_is_read_and_written_in_whole_chunks_around_an_unaligned_extent():
    img = image(8 * CHUNK, {5000: b"x" * 100},
                [(0, 5000, Kind.HOLE), (5000, 100, Kind.DATA), (5100, 8 * CHUNK - 5100, Kind.HOLE)])
    sink, stats = run(img)
    assert img.reads == [(CHUNK, CHUNK)]
    assert sink.writes() == [(CHUNK, CHUNK)]
    assert bytes(sink.data) == img.content
    assert (stats.bytes_read, stats.bytes_written, stats.position) == (CHUNK, CHUNK, 8 * CHUNK)


def test_all_zero_chunks_of_data_are_marked_zero_not_written():
    # Three chunks of DATA: the middle one is all zeros (an allocated but zero-filled block).
    img = image(3 * CHUNK, {0: b"a" * CHUNK, 2 * CHUNK: b"c"}, [(0, 3 * CHUNK, Kind.DATA)])
    sink, stats = run(img)
    assert sink.calls == [("write", 0, CHUNK), ("zero", CHUNK, CHUNK), ("write", 2 * CHUNK, CHUNK)]
    assert stats.bytes_written == 2 * CHUNK and stats.bytes_read == 3 * CHUNK


def test_an_all_zero_data_image_writes_nothing():
    img = image(64 * CHUNK, {}, [(0, 64 * CHUNK, Kind.DATA)])
    sink, stats = run(img)
    assert sink.writes() == [] and stats.bytes_written == 0
    assert sink.zeros() == [(0, 64 * CHUNK)]


def test_zero_extents_are_marked_and_holes_get_no_call():
    img = image(4 * CHUNK, {}, [(0, CHUNK, Kind.HOLE), (CHUNK, 2 * CHUNK, Kind.ZERO),
                                (3 * CHUNK, CHUNK, Kind.HOLE)])
    sink, stats = run(img)
    assert sink.calls == [("zero", CHUNK, 2 * CHUNK)]
    assert img.reads == [] and stats.bytes_read == 0


def test_a_zero_extent_sharing_a_chunk_with_data_is_read_with_it():
    img = image(4 * CHUNK, {0: b"d" * 1000},
                [(0, 1000, Kind.DATA), (1000, 4 * CHUNK - 1000, Kind.ZERO)])
    sink, _ = run(img)
    assert sink.calls == [("write", 0, CHUNK), ("zero", CHUNK, 3 * CHUNK)]


def test_the_last_chunk_stops_at_the_image_end():
    size = 2 * CHUNK + 512
    img = image(size, {size - 10: b"z" * 10}, [(0, size - 512, Kind.HOLE),
                                               (size - 512, 512, Kind.DATA)])
    sink, stats = run(img)
    assert img.reads == [(2 * CHUNK, 512)]
    assert sink.writes() == [(2 * CHUNK, 512)]
    assert stats.position == size


def test_neighbouring_non_zero_chunks_go_out_as_one_write_up_to_the_batch():
    size = 10 * CHUNK
    img = image(size, {0: b"q" * size}, [(0, size, Kind.DATA)])
    sink, _ = run(img, batch=4 * CHUNK)
    assert sink.writes() == [(0, 4 * CHUNK), (4 * CHUNK, 4 * CHUNK), (8 * CHUNK, 2 * CHUNK)]
    assert img.reads == sink.writes()


def test_a_batch_is_rounded_to_whole_chunks():
    img = image(4 * CHUNK, {0: b"q" * 4 * CHUNK}, [(0, 4 * CHUNK, Kind.DATA)])
    sink, _ = run(img, batch=CHUNK + 1)
    assert sink.writes() == [(i * CHUNK, CHUNK) for i in range(4)]


def test_checkpoints_come_at_chunk_boundaries_every_so_many_bytes_and_never_at_the_end():
    size = 16 * CHUNK
    img = image(size, {0: b"p" * size}, [(0, size, Kind.DATA)])
    seen: list[int] = []
    run(img, batch=2 * CHUNK, checkpoint=seen.append, checkpoint_every=5 * CHUNK)
    # Batches end at 2, 4, 6, ... chunks; a checkpoint once 5 chunks have gone by since the last.
    assert seen == [6 * CHUNK, 12 * CHUNK]


def test_a_checkpoint_is_called_after_the_bytes_before_it_reached_the_sink():
    size = 8 * CHUNK
    img = image(size, {0: b"p" * size}, [(0, size, Kind.DATA)])
    sink = RecordingSink(size)

    def checkpoint(position: int) -> None:
        assert sink.pos == position

    copy_extents(img.extents, img.read, sink, size=size, chunk=CHUNK, batch=CHUNK,
                 checkpoint=checkpoint, checkpoint_every=CHUNK)


def test_a_resumed_copy_reads_only_from_its_start_and_completes_the_content():
    size = 12 * CHUNK
    pieces = {i * CHUNK + 7: bytes([i + 1]) * 100 for i in range(12) if i % 3}
    img = image(size, pieces, [(0, size, Kind.DATA)])
    first = RecordingSink(size)
    positions: list[int] = []
    copy_extents(img.extents, img.read, first, size=size, chunk=CHUNK, batch=CHUNK,
                 checkpoint=positions.append, checkpoint_every=4 * CHUNK)
    assert positions == [4 * CHUNK, 8 * CHUNK]

    # Pretend the first run died right after its first checkpoint: keep only what was before it.
    resumed = RecordingSink(size)
    resumed.data[:positions[0]] = first.data[:positions[0]]
    img.reads.clear()
    stats = copy_extents(img.extents, img.read, resumed, size=size, chunk=CHUNK, batch=CHUNK,
                         start=positions[0])
    assert min(o for o, _ in img.reads) == positions[0]
    assert stats.bytes_read == size - positions[0]
    assert bytes(resumed.data) == img.content


def test_a_copy_resumed_at_the_end_does_nothing():
    size = CHUNK + 100
    img = image(size, {0: b"x"}, [(0, size, Kind.DATA)])
    sink, stats = run(img, start=size)
    assert sink.calls == [] and stats.position == size and stats.bytes_read == 0


def test_a_copy_cannot_start_inside_a_chunk():
    img = image(2 * CHUNK, {}, [(0, 2 * CHUNK, Kind.DATA)])
    with pytest.raises(ValueError, match="chunk boundary"):
        run(img, start=100)


def test_a_short_read_is_an_error_not_a_silent_hole():
    img = image(CHUNK, {}, [(0, CHUNK, Kind.DATA)])
    sink = RecordingSink(CHUNK)
    with pytest.raises(ValueError, match="returned 10"):
        copy_extents(img.extents, lambda o, n: b"x" * 10, sink, size=CHUNK, chunk=CHUNK)


def test_progress_reports_bytes_read_as_the_copy_goes():
    size = 4 * CHUNK
    img = image(size, {0: b"r" * size}, [(0, size, Kind.DATA)])
    seen: list[int] = []
    run(img, batch=CHUNK, progress=lambda s: seen.append(s.bytes_read))
    assert seen == [CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK, 4 * CHUNK]


def test_aligned_merges_data_extents_that_meet_in_a_chunk_and_keeps_the_gaps():
    extents = [Extent(0, 100, Kind.DATA), Extent(100, 5000, Kind.HOLE),
               Extent(5100, 10, Kind.DATA), Extent(5110, 3 * CHUNK, Kind.ZERO),
               Extent(5110 + 3 * CHUNK, 10, Kind.DATA),
               Extent(5120 + 3 * CHUNK, 20 * CHUNK - 5120 - 3 * CHUNK, Kind.HOLE)]
    assert list(aligned(extents, size=20 * CHUNK, chunk=CHUNK)) == [
        Extent(0, 2 * CHUNK, Kind.DATA),
        Extent(2 * CHUNK, 2 * CHUNK, Kind.ZERO),
        Extent(4 * CHUNK, CHUNK, Kind.DATA),
        Extent(5 * CHUNK, 15 * CHUNK, Kind.HOLE),
    ]


def test_data_bytes_counts_whole_chunks_from_the_start():
    extents = [Extent(0, 1, Kind.DATA), Extent(1, 3 * CHUNK - 1, Kind.HOLE),
               Extent(3 * CHUNK, 2 * CHUNK + 1, Kind.DATA), Extent(5 * CHUNK + 1, 99, Kind.HOLE)]
    size = 5 * CHUNK + 100
    assert data_bytes(extents, size=size, chunk=CHUNK) == 3 * CHUNK + 100
    assert data_bytes(extents, size=size, chunk=CHUNK, start=4 * CHUNK) == CHUNK + 100


_KINDS = st.sampled_from([Kind.DATA, Kind.ZERO, Kind.HOLE])


@st.composite
def images(draw, chunk=512):
    """An image of a few chunks: random extents, DATA holding random bytes or zeros."""
    lengths = draw(st.lists(st.integers(1, 3 * chunk), min_size=1, max_size=12))
    content = bytearray()
    extents = []
    for length in lengths:
        kind = draw(_KINDS)
        fill = draw(st.sampled_from([b"\0", b"\x01", b"\xff"])) if kind is Kind.DATA else b"\0"
        extents.append(Extent(len(content), length, kind))
        content += fill * length
    return MemImage(bytes(content), extents), chunk


@settings(max_examples=300, deadline=None)
@given(images(), st.integers(1, 4))
def test_any_image_copies_exactly_in_whole_non_zero_chunks(case, batch_chunks):
    img, chunk = case
    size = len(img.content)
    sink, stats = run(img, chunk=chunk, batch=batch_chunks * chunk)
    assert bytes(sink.data) == img.content
    for offset, length in sink.writes():
        assert offset % chunk == 0
        assert length % chunk == 0 or offset + length == size
        for at in range(offset, offset + length, chunk):
            assert any(img.content[at:at + chunk]), "an all-zero chunk was written"
    written = {at // chunk for o, n in sink.writes() for at in range(o, o + n, chunk)}
    nonzero = {i for i in range(-(-size // chunk)) if any(img.content[i * chunk:(i + 1) * chunk])}
    assert written == nonzero
    assert stats.bytes_written == sum(n for _, n in sink.writes())
    assert stats.bytes_read == data_bytes(img.extents, size=size, chunk=chunk)


def test_block_device_sink_writes_through_an_aligned_buffer_and_pads_the_tail(tmp_path):
    path = tmp_path / "volume"
    path.write_bytes(b"\xee" * (3 * 4096))
    sink = BlockDeviceSink(str(path), batch=4096)
    try:
        sink.write(0, memoryview(b"a" * 5000))  # spans two buffer loads, the last padded
        sink.mark_zero(8192, 4096)  # a fresh volume reads zeros already: nothing to do
        sink.sync()
    finally:
        sink.close()
    assert path.read_bytes() == b"a" * 5000 + bytes(8192 - 5000) + b"\xee" * 4096


def test_block_device_sink_refuses_an_unaligned_offset(tmp_path):
    path = tmp_path / "volume"
    path.write_bytes(bytes(8192))
    sink = BlockDeviceSink(str(path))
    try:
        with pytest.raises(ValueError, match="unaligned"):
            sink.write(100, memoryview(b"x"))
    finally:
        sink.close()


@settings(max_examples=60, deadline=None)
@given(images(chunk=4096), st.integers(1, 3), st.integers(1, 3))
def test_reading_into_the_sinks_own_buffers_writes_exactly_the_non_zero_chunks(case, batch_chunks,
                                                                             depth):
    """The image reads straight into buffers BlockDeviceSink lends, reused batch after batch,
    several writes from one buffer in flight at once."""
    img, chunk = case
    size = len(img.content)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume"
        path.write_bytes(b"\xee" * round_up(size, 4096))  # what the volume held before
        sink = BlockDeviceSink(str(path), batch=batch_chunks * chunk, depth=depth)
        try:
            stats = copy_extents(img.extents, img.read, sink, size=size, chunk=chunk,
                                 batch=batch_chunks * chunk, read_into=img.read_into)
            sink.sync()
        finally:
            sink.close()
        volume = path.read_bytes()
    for at in range(0, size, chunk):
        piece = img.content[at:at + chunk]
        # A non-zero chunk written whole (the image's last, padded to a block with zeros); an
        # all-zero one never written at all.
        expected = piece + bytes(-len(piece) % 4096) if any(piece) else b"\xee" * chunk
        assert volume[at:at + len(expected)] == expected[:len(volume) - at]
    assert stats.bytes_read == data_bytes(img.extents, size=size, chunk=chunk)
