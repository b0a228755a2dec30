"""GOW v1/v2/v3: round trips, size limits, v3 sessions and versions, hostile files."""

from __future__ import annotations

import functools
import os
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.imagetools import content, export, imported, ordered_ops, patch, walk
from thinstack.errors import ThinstackError
from thinstack.exporters import ExportError
from thinstack.exporters import gow as gow_out
from thinstack.extents import Extent, Kind
from thinstack.importers import ImageError, Policy, detect, gow, open_image

MiB, GiB = 1 << 20, 1 << 30
BLOCK = gow.BLOCK_SIZE
export = functools.partial(export, create=gow_out.create)  # format defaults to gow3

OPS = [("w", 100, b"a" * 70_000), ("z", 70_100, 200_000), ("w", 300_000, b"b" * 5),
       ("w", 5 * BLOCK, b"c" * BLOCK)]


@pytest.mark.parametrize("format", ["gow1", "gow2", "gow3"])
def test_round_trip(tmp_path, format):
    out = tmp_path / "disk.gow"
    expected = export(out, MiB + 512, OPS, format=format)
    assert detect(out) == "gow"
    assert content(open_image(out)) == expected
    image = gow.open(out)
    assert image.version == int(format[-1])
    assert [(e.offset, e.length, e.kind) for e in image.extents()] == [
        (0, 2 * BLOCK, Kind.DATA), (2 * BLOCK, 2 * BLOCK, Kind.HOLE),
        (4 * BLOCK, 2 * BLOCK, Kind.DATA), (6 * BLOCK, MiB + 512 - 6 * BLOCK, Kind.HOLE)]


@pytest.mark.parametrize("format, data_offset", [("gow1", 64 + 4 * MiB),
                                                 ("gow2", 16 * MiB + 512),
                                                 ("gow3", 32 * MiB + 512)])
def test_layout(tmp_path, format, data_offset):
    """Block 0 right after the map (v1) or at the next 512-byte boundary (v2, v3)."""
    out = tmp_path / "disk.gow"
    export(out, MiB, [("w", 0, b"first")], format=format)
    assert out.stat().st_size == data_offset + BLOCK
    with open(out, "rb") as f:
        f.seek(data_offset)
        assert f.read(5) == b"first"


def test_zero_block_is_not_stored(tmp_path):
    out = tmp_path / "disk.gow"
    export(out, MiB, [("w", 0, bytes(BLOCK)), ("w", BLOCK, b"x")])
    assert list(gow.open(out).map[:3]) == [0, 1, 0]


@pytest.mark.parametrize("format, limit", [("gow1", 64 * GiB), ("gow2", 256 * GiB),
                                           ("gow3", 256 * GiB)])
def test_size_limits(tmp_path, format, limit):
    out = tmp_path / "big.gow"
    writer = gow_out.create(out, limit, format=format)
    writer.write(limit - 10, b"end of dis")
    writer.close()
    image = gow.open(out)
    assert image.virtual_size == limit
    assert image.read(limit - 10, 10) == b"end of dis"
    with pytest.raises(ExportError, match="holds 1 to"):
        gow_out.create(tmp_path / "too-big.gow", limit + 1, format=format)


def test_policy_limits(tmp_path):
    out = tmp_path / "disk.gow"
    export(out, 10 * MiB, [], format="gow2")
    with pytest.raises(ImageError, match="exceeds the limit of 1048576 bytes"):
        gow.open(out, Policy(max_virtual_size=MiB))
    with pytest.raises(ImageError, match="block map of 640 bytes"):
        gow.open(out, Policy(max_table_bytes=600))


@pytest.mark.parametrize("format", ["gow1", "gow3"])
def test_abort_leaves_destination_untouched(tmp_path, format):
    dest = tmp_path / "keep.gow"
    dest.write_bytes(b"old")
    writer = gow_out.create(dest, MiB, format=format)
    writer.write(0, b"new")
    writer.abort()
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.gow"]


def test_writes_must_be_ordered(tmp_path):
    writer = gow_out.create(tmp_path / "x.gow", MiB, format="gow1")
    writer.write(BLOCK, b"x")
    # A caller's bug, not the operator's: exit 1, not usage's 2.
    with pytest.raises(ThinstackError, match="out of order") as raised:
        writer.write(0, b"y")
    assert raised.value.exit_status == 1
    writer.abort()


# ---------------------------------------------------------------- v3 sessions


def test_fresh_v3_is_session_one(tmp_path):
    out = tmp_path / "s1.gow"
    export(out, MiB, OPS)
    image = gow.open(out)
    assert image.session == 1
    assert list(image.block_versions()) == [1, 1, 0, 0, 1, 1] + [0] * 10


def test_v1_has_no_versions(tmp_path):
    out = tmp_path / "v1.gow"
    export(out, MiB, OPS, format="gow1")
    with pytest.raises(ValueError, match="no block versions"):
        gow.open(out).block_versions()


def two_sessions(tmp_path: Path) -> tuple[Path, bytes, Path, bytes]:
    first = tmp_path / "s1.gow"
    first_content = export(first, MiB, OPS)
    second = tmp_path / "s2.gow"
    ops = [("z", 0, 10),  # part of a block the parent had
           ("w", 3 * BLOCK + 10, b"new"),  # a block the parent lacked
           ("z", 5 * BLOCK, BLOCK)]  # a whole block the parent had
    second_content = export(second, MiB, ops, parent=first, base=first_content)
    return first, first_content, second, second_content


def test_next_session_copies_unchanged_blocks(tmp_path):
    first, first_content, second, second_content = two_sessions(tmp_path)
    first.unlink()  # the new image stands alone
    image = gow.open(second)
    assert image.session == 2
    assert list(image.block_versions()[:6]) == [2, 1, 0, 2, 1, 2]
    assert content(image) == second_content


def test_changed_extents_catch_a_copy_up(tmp_path):
    _, first_content, second, second_content = two_sessions(tmp_path)
    image = gow.open(second)
    assert list(image.changed_extents(1)) == [
        Extent(0, BLOCK, Kind.DATA), Extent(3 * BLOCK, BLOCK, Kind.DATA),
        Extent(5 * BLOCK, BLOCK, Kind.ZERO)]
    assert list(image.changed_extents(2)) == []
    copy = bytearray(first_content)
    for ext in image.changed_extents(1):
        copy[ext.offset:ext.end] = (image.read(ext.offset, ext.length) if ext.kind is Kind.DATA
                                    else bytes(ext.length))
    assert copy == second_content


def test_next_session_in_place(tmp_path):
    """The writer reads the parent before the new file replaces it, so both may be one path."""
    path = tmp_path / "disk.gow"
    first_content = export(path, MiB, OPS)
    expected = export(path, MiB, [("w", 7 * BLOCK, b"z")], parent=path, base=first_content)
    assert gow.open(path).session == 2
    assert imported(path) == expected


def test_sessions_chain_on(tmp_path):
    path = tmp_path / "disk.gow"
    expected = export(path, MiB, [])
    for session in range(2, 6):
        expected = export(path, MiB, [("w", session * BLOCK, b"s%d" % session)], parent=path,
                          base=expected)
    image = gow.open(path)
    assert image.session == 5
    assert list(image.block_versions()[:6]) == [0, 0, 2, 3, 4, 5]
    assert content(image) == expected


def test_disk_grows_between_sessions(tmp_path):
    first = tmp_path / "s1.gow"
    first_content = export(first, MiB, [("w", MiB - 1, b"e")])
    second = tmp_path / "s2.gow"
    expected = export(second, 2 * MiB, [("w", MiB + 5, b"g")], parent=first,
                      base=first_content)
    assert imported(second) == expected


@pytest.mark.parametrize("format", ["gow1", "gow2"])
def test_parent_only_for_v3(tmp_path, format):
    parent = tmp_path / "p.gow"
    export(parent, MiB, [], format=format)
    with pytest.raises(ExportError, match="no sessions"):
        gow_out.create(tmp_path / "c.gow", MiB, format=format, parent=parent)
    with pytest.raises(ExportError, match="only v3 has sessions"):
        gow_out.create(tmp_path / "c.gow", MiB, format="gow3", parent=parent)


def test_unreadable_parent(tmp_path):
    with pytest.raises(ExportError, match="cannot use"):
        gow_out.create(tmp_path / "c.gow", MiB, parent=tmp_path / "missing.gow")


# ---------------------------------------------------------------- hostile files


@pytest.fixture
def v3(tmp_path) -> Path:
    path = tmp_path / "d.gow"
    export(path, MiB, OPS)
    return path


def patch_header(path: Path, **fields) -> None:
    """Rewrite header fields, with a valid checksum; the layout as docs/formats/gow.md has it."""
    header = dict(zip(("magic", "version", "block_size", "size", "entries", "session"),
                      struct.unpack_from("<8sIIQII", path.read_bytes()), strict=True), **fields)
    raw = struct.pack("<8sIIQII28x", *header.values())
    patch(path, 0, raw + zlib.crc32(raw).to_bytes(4, "little"))


def test_bad_magic_is_not_gow(v3):
    patch(v3, 0, b"NOTGOW!!")
    assert detect(v3) == "raw"
    with pytest.raises(ImageError, match="no GOW magic"):
        gow.open(v3)


def test_bad_checksum(v3):
    patch(v3, 16, b"\x01")
    with pytest.raises(ImageError, match="checksum"):
        gow.open(v3)


@pytest.mark.parametrize("field, value, message", [
    ("version", 4, "unknown GOW version 4"),
    ("size", 256 * GiB + 1, "exceeds the GOW v3 limit"),
    ("session", 0, "session 0 in a GOW v3 header")])
def test_bad_header_fields(v3, field, value, message):
    patch_header(v3, **{field: value})
    with pytest.raises(ImageError, match=message):
        gow.open(v3)


def test_v1_size_limit_in_header(tmp_path):
    path = tmp_path / "v1.gow"
    export(path, MiB, [], format="gow1")
    patch_header(path, size=64 * GiB + 512)
    with pytest.raises(ImageError, match="exceeds the GOW v1 limit"):
        gow.open(path)


def test_truncated_map(v3):
    with open(v3, "r+b") as f:
        f.truncate(10 * MiB)
    with pytest.raises(ImageError, match="ends inside the block map"):
        gow.open(v3)


def test_entry_past_end_of_file(v3):
    patch(v3, gow.HEADER_SIZE, struct.pack("<I", 1000))
    with pytest.raises(ImageError, match="past the end of the file"):
        gow.open(v3)


def test_two_blocks_one_slot(v3):
    patch(v3, gow.HEADER_SIZE + 4 * 4, struct.pack("<I", 1))
    with pytest.raises(ImageError, match="shares data slot 0"):
        gow.open(v3)


def test_version_newer_than_session(v3):
    patch(v3, gow.Header(3, MiB, 1).versions_offset, struct.pack("<I", 7))
    with pytest.raises(ImageError, match="version 7, newer than the image's session 1"):
        gow.open(v3)


def _hostile_sample() -> tuple[int, list[tuple[int, bytes]]]:
    """A v3 image as its size and its non-sparse pieces: header and the start of the map, the
    start of the versions, and the data area (writing 32 MiB per example would be slow)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.gow"
        export(path, 20 * BLOCK + 512, OPS)
        raw = path.read_bytes()
        header = gow.Header.parse(raw[:gow.HEADER_SIZE])
        return len(raw), [(at, raw[at:end]) for at, end in (
            (0, 4096), (header.versions_offset, header.versions_offset + 4096),
            (header.data_offset, len(raw)))]


HOSTILE_SIZE, HOSTILE_PIECES = _hostile_sample()
_VERSIONS_AT = gow.Header(3, 1, 1).versions_offset
# (offset, width) of the fields: header fields, the first map entries, the first versions.
FIELDS = [(8, 4), (12, 4), (16, 8), (24, 4), (28, 4),
          *((gow.HEADER_SIZE + 4 * i, 4) for i in range(24)),
          *((_VERSIONS_AT + 4 * i, 4) for i in range(24))]


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 20, 0xFFFFFFFF]), st.integers(0, (1 << 64) - 1))),
    min_size=1, max_size=5), st.booleans())
def test_mutated_metadata_fails_cleanly(mutations, fix_checksum):
    pieces = [(at, bytearray(data)) for at, data in HOSTILE_PIECES]
    for (at, width), value in mutations:
        piece_at, piece = next((p_at, p) for p_at, p in pieces if p_at <= at < p_at + len(p))
        piece[at - piece_at:at - piece_at + width] = (value % (1 << 8 * width)).to_bytes(
            width, "little")
    header = pieces[0][1]
    if fix_checksum:  # so the mutation reaches the checks behind the checksum
        header[60:64] = zlib.crc32(header[:60]).to_bytes(4, "little")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.gow"
        with open(path, "wb") as f:
            f.truncate(HOSTILE_SIZE)
            for at, data in pieces:
                f.seek(at)
                f.write(data)
        try:
            image = gow.open(path)
        except ImageError:
            return
        try:
            walk(image)
            if image.version == 3:
                list(image.changed_extents(0))
        finally:
            image.close()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), blocks=st.integers(1, 40), tail=st.integers(0, BLOCK - 1),
       format=st.sampled_from(["gow1", "gow2", "gow3"]))
def test_random_images_round_trip(data, blocks, tail, format):
    size = (blocks - 1) * BLOCK + tail + 1
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.gow"
        expected = export(out, size, data.draw(ordered_ops(size, BLOCK)), format=format)
        assert imported(out) == expected
        if format == "gow3":
            child = Path(d) / "r2.gow"
            child_size = data.draw(st.integers(1, 40 * BLOCK))
            expected = export(child, child_size, data.draw(ordered_ops(child_size, BLOCK)),
                              parent=out, base=expected)
            assert imported(child) == expected


def test_disk_shrinks_then_grows(tmp_path):
    """Bytes cut off by a shrink must not come back when the disk grows again."""
    path = tmp_path / "disk.gow"
    export(path, 2 * BLOCK, [("w", 0, b"x" * 2 * BLOCK)])
    export(path, BLOCK + 10, [], parent=path)
    expected = export(path, 3 * BLOCK, [], parent=path, base=b"x" * (BLOCK + 10))
    assert imported(path) == expected
