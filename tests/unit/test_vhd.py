"""VHD import and export, checked against qemu-img, the real-world corpus, and hostile files.

The helpers up to the first section (content, walk, imported, export, patch, ordered_ops) serve
test_gow.py too."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.imagetools import content, export, ordered_ops, patch, walk
from thinstack.errors import ThinstackError
from thinstack.exporters import ExportError
from thinstack.exporters import vhd as vhd_out
from thinstack.extents import Extent, Kind
from thinstack.importers import DEFAULT_POLICY, ImageError, Policy, detect, open_image, vhd

MiB = 1 << 20
BLOCK = vhd_out.BLOCK_SIZE

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def imported(path: Path, policy: Policy = DEFAULT_POLICY) -> bytes:
    """The disk as `import --format vhd` reads it: with its parents (--format auto follows none)."""
    image = open_image(path, policy, "vhd")
    try:
        return content(image)
    finally:
        image.close()


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def scattered(size: int, seed: int = 1) -> list[tuple[str, int, bytes]]:
    """A few writes of odd lengths at odd offsets, in order, not overlapping."""
    rnd = random.Random(seed)
    ops, pos = [], rnd.randrange(0, 4096)
    while pos < size - 1:
        length = min(rnd.randrange(1, 300_000), size - pos)
        ops.append(("w", pos, rnd.randbytes(length)))
        pos += length + rnd.randrange(0, 3 * BLOCK)
    return ops


# ---------------------------------------------------------------- images qemu-img made


@needs_qemu
@pytest.mark.parametrize("options", ["subformat=dynamic", "subformat=fixed",
                                     "subformat=dynamic,force_size=on",
                                     "subformat=fixed,force_size=on"])
def test_reads_what_qemu_writes(tmp_path, options):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(7 * MiB + 4096)
        for _, offset, data in scattered(7 * MiB + 4096):
            f.seek(offset)
            f.write(data)
    image = tmp_path / "img.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", options, str(raw), str(image))
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(image), str(back))

    assert detect(image) == "vhd"
    assert imported(image) == back.read_bytes()
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(image)))
    assert vhd.open(image).virtual_size == info["virtual-size"]
    if "dynamic" in options:
        qemu_data = bytearray(info["virtual-size"] // 512)  # 1 where qemu-img map says data
        for e in json.loads(qemu_img("map", "-f", "vpc", "--output=json", str(image))):
            if e["data"]:
                qemu_data[e["start"] // 512:(e["start"] + e["length"]) // 512] = b"\1" * (
                    e["length"] // 512)
        for ext in vhd.open(image).extents():
            if ext.kind is Kind.DATA:
                assert all(qemu_data[ext.offset // 512:ext.end // 512]), ext


@needs_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_empty_qemu_image_has_qemus_size_and_no_data(tmp_path, subformat):
    image = tmp_path / "empty.vhd"
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", str(image), "10M")
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(image)))
    opened = vhd.open(image)
    assert opened.virtual_size == info["virtual-size"]  # rounded up to CHS: 10,514,432
    if subformat == "dynamic":
        assert [e.kind for e in opened.extents()] == [Kind.HOLE]
    assert content(opened) == bytes(opened.virtual_size)


# ---------------------------------------------------------------- the real-world corpus


@pytest.mark.parametrize("name, size", [("hyperv2012r2-dynamic.vhd", 136_365_211_648),
                                        ("virtualpc-dynamic.vhd", 136_363_130_880)])
def test_corpus_empty_disks_sized_by_their_creator(corpus, name, size):
    image = open_image(corpus(name))
    assert image.format == "vhd"
    assert image.virtual_size == size
    assert [e.kind for e in image.extents()] == [Kind.HOLE]


def test_corpus_disk2vhd_all_blocks_allocated(corpus):
    image = open_image(corpus("d2v-zerofilled.vhd"))
    assert image.virtual_size == 263_454_720
    extents = list(image.extents())
    assert extents == [Extent(0, 263_454_720, Kind.DATA)]
    assert image.read(100 * MiB, MiB) == bytes(MiB)


# ---------------------------------------------------------------- what the exporter writes


@needs_qemu
@pytest.mark.parametrize("format", ["vhd", "vhd-fixed"])
def test_export_is_read_by_qemu(tmp_path, format):
    size = 9 * MiB + 3 * 512  # not representable in CHS: the footer's size must be used
    out = tmp_path / "out.vhd"
    expected = export(out, size, scattered(size, seed=2), format=format)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)

    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(out)))
    assert info["virtual-size"] == size
    subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", str(out), str(raw)],
                   check=True, capture_output=True)
    assert imported(out) == expected


def test_dynamic_export_allocates_only_blocks_with_data(tmp_path):
    out = tmp_path / "out.vhd"
    export(out, 10 * MiB, [("w", 3 * BLOCK + 17, b"x"), ("z", 4 * BLOCK, BLOCK)])
    image = vhd.open(out)
    assert sum(e != vhd.UNALLOCATED for e in image.chain[0].bat) == 1
    assert [(e.offset, e.length, e.kind) for e in image.extents()] == [
        (0, 3 * BLOCK, Kind.HOLE), (3 * BLOCK, 512, Kind.DATA),
        (3 * BLOCK + 512, 10 * MiB - 3 * BLOCK - 512, Kind.HOLE)]


@needs_qemu
def test_fixed_export_rounds_to_mib_for_azure(tmp_path):
    out = tmp_path / "azure.vhd"
    export(out, 5 * MiB + 512, [("w", 0, b"boot")], format="vhd-fixed", round_to_mib=True)
    assert out.stat().st_size == 6 * MiB + 512
    info = json.loads(qemu_img("info", "-f", "vpc", "--output=json", str(out)))
    assert info["virtual-size"] == 6 * MiB


def test_footer_geometry_follows_the_spec():
    assert vhd_out.geometry(10 * MiB) == (301, 4, 17)
    assert vhd_out.geometry(136_365_211_648) == (65278, 16, 255)  # the Hyper-V corpus disk
    assert vhd_out.geometry(4 << 40) == (65535, 16, 255)


def test_export_refuses_bad_sizes_and_disorder(tmp_path):
    with pytest.raises(ExportError):
        vhd_out.create(tmp_path / "a.vhd", 1000)
    with pytest.raises(ExportError):
        vhd_out.create(tmp_path / "a.vhd", vhd_out.MAX_SIZE + 512)
    writer = vhd_out.create(tmp_path / "a.vhd", MiB)
    writer.write(4096, b"x")
    with pytest.raises(ThinstackError, match="out of order"):
        writer.write(0, b"y")
    writer.abort()


@pytest.mark.parametrize("format", ["vhd", "vhd-fixed"])
def test_abort_leaves_destination_untouched(tmp_path, format):
    dest = tmp_path / "keep.vhd"
    dest.write_bytes(b"old")
    writer = vhd_out.create(dest, MiB, format=format)
    writer.write(0, b"new" * 1000)
    writer.abort()
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.vhd"]


# ---------------------------------------------------------------- differencing chains


def child_ops(size: int) -> list:
    return [("w", 1000, b"c" * 3000), ("z", 5000, BLOCK), ("w", 3 * BLOCK + 7, b"d" * 11),
            ("z", size - 700, 600)]


def make_chain(tmp_path: Path, size: int = 8 * MiB) -> tuple[Path, Path, bytes]:
    base_content = random.Random(3).randbytes(size)
    base = tmp_path / "base.vhd"
    export(base, size, [("w", 0, base_content)])
    child = tmp_path / "child.vhd"
    expected = export(child, size, child_ops(size), parent=base, base=base_content)
    return base, child, expected


def test_differencing_child_reads_through_parent(tmp_path):
    base, child, expected = make_chain(tmp_path)
    image = vhd.open(child)
    assert [layer.path for layer in image.chain] == [child, base]
    assert content(image) == expected


@needs_qemu
def test_differencing_child_blocks_read_by_qemu(tmp_path):
    """qemu's vpc driver ignores parents and reads a child as a dynamic disk: what it sees must
    be our data in every sector the child holds, and zeros elsewhere."""
    size = 8 * MiB
    _, child, expected = make_chain(tmp_path, size)
    raw = tmp_path / "child.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(child), str(raw))
    held = set()  # every sector an op touched (the parent has data everywhere)
    for op, offset, arg in child_ops(size):
        held.update(range(offset // 512, -(-(offset + (len(arg) if op == "w" else arg)) // 512)))
    seen = raw.read_bytes()
    for sector in range(size // 512):
        window = slice(sector * 512, sector * 512 + 512)
        assert seen[window] == (expected[window] if sector in held else bytes(512)), sector


def test_chain_of_three_with_zeroing(tmp_path):
    base, child, expected = make_chain(tmp_path)
    grandchild = tmp_path / "grandchild.vhd"
    ops = [("z", 0, 2 * BLOCK), ("w", 2 * BLOCK + 1, b"g" * 100)]
    expected = export(grandchild, 8 * MiB, ops, parent=child, base=expected)
    assert imported(grandchild) == expected


def test_mark_zero_over_parent_hole_allocates_nothing(tmp_path):
    base = tmp_path / "base.vhd"
    export(base, 8 * MiB, [("w", 0, b"x" * 100)])
    child = tmp_path / "child.vhd"
    export(child, 8 * MiB, [("z", BLOCK, 3 * BLOCK)], parent=base)
    assert set(vhd.open(child).chain[0].bat) == {vhd.UNALLOCATED}


def test_child_larger_than_parent_reads_zeros_past_it(tmp_path):
    base = tmp_path / "base.vhd"
    export(base, 2 * MiB, [("w", 0, b"x" * 2 * MiB)])
    child = tmp_path / "child.vhd"
    expected = export(child, 6 * MiB, [("w", 5 * MiB, b"y")], parent=base,
                      base=b"x" * 2 * MiB)
    assert imported(child) == expected


def test_chain_moves_together(tmp_path):
    _, child, expected = make_chain(tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("base.vhd", "child.vhd"):
        os.rename(tmp_path / name, moved / name)
    assert imported(moved / "child.vhd") == expected


def test_missing_parent_is_named(tmp_path):
    base, child, _ = make_chain(tmp_path)
    base.unlink()
    with pytest.raises(ImageError, match="parent image base.vhd not found"):
        vhd.open(child)


def test_parent_outside_allowed_dirs(tmp_path):
    (tmp_path / "parents").mkdir()
    (tmp_path / "children").mkdir()
    base = tmp_path / "parents" / "base.vhd"
    export(base, MiB, [("w", 0, b"p")])
    child = tmp_path / "children" / "child.vhd"
    export(child, MiB, [("w", 512, b"c")], parent=base)
    with pytest.raises(ImageError, match="outside the folders an image may name"):
        vhd.open(child)
    assert imported(child, Policy(allowed_dirs=(tmp_path / "parents",)))[:513] == b"p" + bytes(
        511) + b"c"


def test_parent_uuid_mismatch(tmp_path):
    base, child, _ = make_chain(tmp_path)
    export(base, 8 * MiB, [])  # same name, new disk
    with pytest.raises(ImageError, match="UUID"):
        vhd.open(child)


def test_parent_loop(tmp_path):
    a, b = tmp_path / "a.vhd", tmp_path / "b.vhd"
    export(a, MiB, [])
    export(b, MiB, [], parent=a)
    export(tmp_path / "a2.vhd", MiB, [], parent=b)
    os.replace(tmp_path / "a2.vhd", a)  # now a -> b -> a
    with pytest.raises(ImageError, match="loop"):
        vhd.open(a)


def test_chain_depth_limit(tmp_path):
    parent = tmp_path / "d0.vhd"
    export(parent, MiB, [("w", 0, b"0")])
    for depth in range(1, 18):
        child = tmp_path / f"d{depth}.vhd"
        export(child, MiB, [("w", depth * 512, b"%d" % depth)], parent=parent)
        parent = child
    assert imported(tmp_path / "d16.vhd")[16 * 512:16 * 512 + 2] == b"16"  # 16 parents
    with pytest.raises(ImageError, match="more than 16 parents"):
        vhd.open(tmp_path / "d17.vhd")
    with pytest.raises(ImageError, match="more than 4 parents"):
        vhd.open(tmp_path / "d16.vhd", Policy(max_chain_depth=4))


def test_refuses_own_parent(tmp_path):
    out = tmp_path / "x.vhd"
    export(out, MiB, [])
    with pytest.raises(ExportError, match="own parent"):
        vhd_out.create(out, MiB, parent=out)


def _one_block_vhd(path: Path, block_size: int, bitmap: bytes, fill: bytes, disk_type: int,
                   parent_uuid: bytes = bytes(16), parent_name: str = "") -> bytes:
    """A dynamic or differencing VHD of one block of any size, every sector holding `fill`
    where `bitmap` says so; returns its UUID."""
    me = uuid.uuid4().bytes
    footer = vhd.Footer(disk_type, block_size, (1, 1, 1), me, data_offset=512).pack()
    header = vhd.DynamicHeader(1536, 1, block_size, parent_uuid, 0, parent_name).pack()
    bitmap = bitmap.ljust(vhd.bitmap_size(block_size), b"\0")
    with open(path, "wb") as f:
        f.write(footer + header + (2048 // 512).to_bytes(4, "big").ljust(512, b"\xff"))
        f.write(bitmap + fill * (block_size // len(fill)) + footer)
    return me


def test_differencing_walk_is_linear_in_the_block(tmp_path):
    """Finding 10: a child whose holes alternate with its parent's sectors, in a 16 MiB block.
    Each child hole used to rescan all the parent block's runs (32,768 of them): about 10^9
    steps. Counted here as lines of importers/vhd.py run, which must stay a small multiple of
    the sectors."""
    block = 16 * MiB
    sectors = block // 512
    parent = _one_block_vhd(tmp_path / "base.vhd", block, b"\xaa" * (sectors // 8), b"p" * 512,
                            vhd.DYNAMIC)
    child = tmp_path / "child.vhd"
    _one_block_vhd(child, block, b"\x55" * (sectors // 8), b"c" * 512, vhd.DIFFERENCING, parent,
                   "base.vhd")
    image = vhd.open(child)
    budget, lines = 300 * sectors, 0  # about 80 a sector now, 50,000 before

    class TooMuchWork(Exception):
        pass

    def count(frame, event, arg):
        nonlocal lines
        lines += 1
        if lines > budget:
            raise TooMuchWork(f"more than {budget} lines run for {sectors} sectors")
        return count

    sys.settrace(lambda frame, event, arg: count if frame.f_code.co_filename == vhd.__file__
                 else None)
    try:
        extents = list(image.extents())
        data = image.read(0, block)
    finally:
        sys.settrace(None)
        image.close()
    assert extents == [Extent(0, block, Kind.DATA)]
    assert data == (b"p" * 512 + b"c" * 512) * (sectors // 2)


# ---------------------------------------------------------------- damaged and hostile files


@pytest.fixture
def dynamic(tmp_path) -> Path:
    path = tmp_path / "d.vhd"
    export(path, 6 * MiB, [("w", 0, b"a" * 1000), ("w", 4 * MiB + 5, b"b" * 1000)])
    return path


def patch_header(path: Path, **fields) -> None:
    raw = path.read_bytes()[512:1536]
    patch(path, 512, dataclasses.replace(vhd.DynamicHeader.parse(raw), **fields).pack())


def test_end_footer_damaged_uses_copy(dynamic):
    expected = imported(dynamic)
    size = dynamic.stat().st_size
    patch(dynamic, size - 100, b"\xff")
    assert imported(dynamic) == expected


def test_both_footers_damaged(dynamic):
    patch(dynamic, dynamic.stat().st_size - 512 + 40, b"\x12")
    patch(dynamic, 40, b"\x12")
    with pytest.raises(ImageError, match="checksum"):
        vhd.open(dynamic)


def test_old_511_byte_footer(tmp_path):
    out = tmp_path / "f.vhd"
    expected = export(out, MiB, [("w", 10, b"old")], format="vhd-fixed")
    with open(out, "r+b") as f:
        f.truncate(MiB + 511)
    assert imported(out) == expected


@pytest.mark.parametrize("keep", [100, 600, 3 * MiB])
def test_truncated(dynamic, keep):
    with open(dynamic, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(ImageError):
        vhd.open(dynamic)


def test_truncated_fixed(tmp_path):
    out = tmp_path / "f.vhd"
    export(out, 2 * MiB, [], format="vhd-fixed")
    footer = out.read_bytes()[-512:]
    with open(out, "r+b") as f:
        f.truncate(MiB)
        f.seek(MiB)
        f.write(footer)
    with pytest.raises(ImageError, match="truncated"):
        vhd.open(out)


def test_bat_entry_past_end(dynamic):
    patch(dynamic, 1536, struct.pack(">I", 0x00FFFFFF))
    with pytest.raises(ImageError, match="past the end"):
        vhd.open(dynamic)


def test_bat_entry_overlapping_header(dynamic):
    patch(dynamic, 1536, struct.pack(">I", 1))
    with pytest.raises(ImageError, match="overlaps the dynamic disk header"):
        vhd.open(dynamic)


def test_bat_entries_sharing_a_block(dynamic):
    first = vhd.open(dynamic).chain[0].bat[0]
    patch(dynamic, 1536 + 8, struct.pack(">I", first))  # block 2 on top of block 0
    with pytest.raises(ImageError, match="overlap"):
        vhd.open(dynamic)


@pytest.mark.parametrize("block_size", [0, 3 << 20, 256, 512 << 20])
def test_bad_block_size(dynamic, block_size):
    patch_header(dynamic, block_size=block_size)
    with pytest.raises(ImageError, match="block size"):
        vhd.open(dynamic)


def test_huge_table(dynamic):
    patch_header(dynamic, max_table_entries=0xFFFFFFFF)
    with pytest.raises(ImageError, match="exceeds the limit"):
        vhd.open(dynamic)


def test_table_too_small_for_disk(dynamic):
    patch_header(dynamic, max_table_entries=1)
    with pytest.raises(ImageError, match="needs 3"):
        vhd.open(dynamic)


def test_header_checksum(dynamic):
    patch(dynamic, 512 + 100, b"\x01")
    with pytest.raises(ImageError, match="header checksum"):
        vhd.open(dynamic)


def test_virtual_size_over_policy(dynamic):
    with pytest.raises(ImageError, match="exceeds the limit"):
        vhd.open(dynamic, Policy(max_virtual_size=MiB))


# ---------------------------------------------------------------- properties

SIZES = st.integers(1, 3 * BLOCK // 512 + 3).map(lambda sectors: sectors * 512)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), size=SIZES, format=st.sampled_from(["vhd", "vhd-fixed"]),
       layered=st.booleans())
def test_random_images_round_trip(data, size, format, layered):
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base.vhd"
        expected = export(base, size, data.draw(ordered_ops(size, BLOCK)), format=format)
        assert imported(base) == expected
        if layered:
            child = Path(d) / "child.vhd"
            child_size = data.draw(SIZES)
            expected = export(child, child_size, data.draw(ordered_ops(child_size, BLOCK)),
                              parent=base, base=expected)
            assert imported(child) == expected


def _hostile_sample() -> tuple[bytes, bytes, list[tuple[int, int]]]:
    """A parent and a differencing child with data, and the child's metadata ranges."""
    with tempfile.TemporaryDirectory() as d:
        base, child = Path(d) / "base.vhd", Path(d) / "child.vhd"
        export(base, 3 * MiB, [("w", 0, b"b" * 5000), ("w", 2 * MiB + 512, b"c" * 512)])
        export(child, 3 * MiB, [("w", 700, b"x" * 300), ("w", 2 * MiB + 4096, b"y")],
               parent=base)
        image = vhd.open(child)
        layer = image.chain[0]
        bitmaps = [(e * 512, 512) for e in layer.bat if e != vhd.UNALLOCATED]
        locators = [(loc.data_offset, loc.data_length) for loc in layer.header.locators]
        image.close()
        raw = child.read_bytes()
        regions = [(0, 1536 + 512), (len(raw) - 512, 512), *bitmaps, *locators]
        return base.read_bytes(), raw, regions


HOSTILE_BASE, HOSTILE_CHILD, HOSTILE_REGIONS = _hostile_sample()


# (offset, width) of the fields that steer a reader: footer data offset, sizes, geometry, type;
# header table offset, entries, block size; the first two locators; the first BAT entries.
HOSTILE_FIELDS = [(16, 8), (48, 8), (56, 4), (60, 4), (512 + 16, 8), (512 + 28, 4), (512 + 32, 4),
                  *((512 + 576 + 24 * i + f, w)
                    for i in (0, 1) for f, w in ((0, 4), (8, 4), (16, 8))),
                  *((1536 + 4 * i, 4) for i in range(4))]
byte_mutations = st.tuples(st.sampled_from(HOSTILE_REGIONS), st.integers(0, 2047),
                           st.integers(0, 255)).map(
    lambda m: (m[0][0] + m[1] % m[0][1], bytes([m[2]])))
field_mutations = st.tuples(st.sampled_from(HOSTILE_FIELDS), st.one_of(
    st.sampled_from([0, 1, 4, 511, 512, 1536, 2 * MiB, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF]),
    st.integers(0, (1 << 64) - 1))).map(
    lambda m: (m[0][0], (m[1] % (1 << 8 * m[0][1])).to_bytes(m[0][1], "big")))


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(byte_mutations, field_mutations), min_size=1, max_size=6),
       st.booleans())
def test_mutated_metadata_fails_cleanly(mutations, fix_checksums):
    raw = bytearray(HOSTILE_CHILD)
    for at, data in mutations:
        raw[at:at + len(data)] = data
    if fix_checksums:  # so the mutation reaches the checks behind the checksums
        for at, size, field in ((0, 512, 64), (len(raw) - 512, 512, 64), (512, 1024, 36)):
            raw[at + field:at + field + 4] = vhd.checksum(raw[at:at + size], field).to_bytes(
                4, "big")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "base.vhd").write_bytes(HOSTILE_BASE)
        (Path(d) / "child.vhd").write_bytes(raw)
        try:
            image = vhd.open(Path(d) / "child.vhd")
        except ImageError:
            return
        try:
            walk(image)
        except ImageError:
            pass
        finally:
            image.close()
