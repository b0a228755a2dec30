"""QCOW2 against QEMU's own tools: every kind of image qemu-img makes reads back byte for byte as
`qemu-img convert -O raw` does, every image the exporter writes passes `qemu-img check`, and
hostile headers fail with ImageError and nothing else."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.imagetools import content
from thinstack.errors import ThinstackError
from thinstack.exporters import ExportError
from thinstack.exporters import qcow2 as writer
from thinstack.extents import Extent, Kind
from thinstack.importers import DEFAULT_POLICY, ImageError, Policy, open_image, qcow2

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img") or not shutil.which("qemu-io"),
                                reason="needs qemu-img and qemu-io (Debian: qemu-utils)")

KiB, MiB = 1 << 10, 1 << 20


# -- helpers -------------------------------------------------------------------------------

def run(*args) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def create(path: Path, size: str, options: str = "", backing: Path | None = None,
           backing_fmt: str = "qcow2") -> Path:
    args = ["qemu-img", "create", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    run(*args, path, size)
    return path


def reference(path: Path) -> bytes:
    out = path.with_name(path.name + ".ref")
    run("qemu-img", "convert", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_data_bytes(path: Path) -> int:
    return sum(e["length"] for e in json.loads(run("qemu-img", "map", "--output=json", path))
               if e["data"])


def contents(image) -> tuple[bytes, list[Extent]]:
    """The image rebuilt from its extents: DATA read, everything else zeros."""
    extents = list(image.extents())
    return content(image, extents), extents


def assert_like_qemu(path: Path, policy: Policy = DEFAULT_POLICY) -> list[Extent]:
    """The importer reproduces qemu-img convert byte for byte, claims no more DATA than
    qemu-img map, and reads arbitrary ranges right (as --format qcow2, which follows backing
    files)."""
    expected = reference(path)
    image = open_image(path, policy, "qcow2")
    try:
        assert image.format == "qcow2" and image.virtual_size == len(expected)
        got, extents = contents(image)
        assert got == expected
        assert sum(e.length for e in extents if e.kind is Kind.DATA) <= qemu_data_bytes(path)
        rng = random.Random(len(expected))
        for _ in range(20):
            offset = rng.randrange(len(expected))
            length = rng.randrange(min(len(expected) - offset, 3 * MiB) + 1)
            assert image.read(offset, length) == expected[offset:offset + length]
    finally:
        image.close()
    return extents


def scribble(path: Path, cluster: int, size: int, fmt: str = "qcow2") -> None:
    """Writes of every shape: unaligned to clusters, across cluster and L2 boundaries, and a
    last partial cluster."""
    l2_span = cluster * cluster // 8
    writes = [(0, 4 * KiB), (cluster - 512, cluster + 1024), (3 * cluster + 512, 512),
              (l2_span - 1024, 2048), (size // 2, 3 * cluster // 2), (size - 1024, 1024)]
    qemu_io(path, *(f"write -P {0x11 + i} {off} {length}"
                    for i, (off, length) in enumerate(writes) if off + length <= size), fmt=fmt)


def patch(path: Path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def header(path: Path) -> qcow2.Header:
    return qcow2.Header.unpack(path.read_bytes()[:4096])


def l2_offset(path: Path, index: int = 0) -> int:
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h.l1_table_offset + 8 * index)
        return struct.unpack(">Q", f.read(8))[0] & qcow2.OFFSET_MASK


def l2_entry(path: Path, index: int) -> int:
    with open(path, "rb") as f:
        f.seek(l2_offset(path) + 8 * index)
        return struct.unpack(">Q", f.read(8))[0]


def refused(path: Path, *words: str, policy: Policy = DEFAULT_POLICY) -> ImageError:
    """Opening (as --format qcow2) and walking the image raises ImageError whose message has all
    `words`."""
    with pytest.raises(ImageError) as info:
        image = open_image(path, policy, "qcow2")
        try:
            contents(image)
        finally:
            image.close()
    for word in words:
        assert word in str(info.value)
    return info.value


# -- images qemu-img makes -----------------------------------------------------------------

@pytest.mark.parametrize("options, cluster", [
    ("compat=0.10,cluster_size=512", 512),
    ("compat=0.10", 64 * KiB),
    ("compat=1.1,cluster_size=4k", 4 * KiB),
    ("compat=1.1", 64 * KiB),
    ("compat=1.1,cluster_size=2M", 2 * MiB),
    ("extended_l2=on,cluster_size=16k", 16 * KiB),
    ("extended_l2=on", 64 * KiB),
    ("refcount_bits=1", 64 * KiB),
    ("refcount_bits=64,lazy_refcounts=on", 64 * KiB),
    ("preallocation=metadata", 64 * KiB),
])
def test_qemu_images(tmp_path, options, cluster):
    size = 6 * MiB + 1536  # not a whole number of clusters
    path = create(tmp_path / "img.qcow2", str(size), options)
    scribble(path, cluster, size)
    assert_like_qemu(path)


def test_zero_clusters(tmp_path):
    path = create(tmp_path / "z.qcow2", "8M")
    qemu_io(path, "write -P 0x33 0 2M", "write -z 64k 128k", "write -z 4M 1M",
            "write -z 1M 4k", "write -z -u 512k 64k")
    extents = assert_like_qemu(path)
    zero = [e for e in extents if e.kind is Kind.ZERO]
    assert Extent(64 * KiB, 128 * KiB, Kind.ZERO) in zero


def test_extended_l2_subclusters(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(3 * MiB))
    path = create(tmp_path / "x.qcow2", "4M", "extended_l2=on,cluster_size=64k", base, "raw")
    qemu_io(path, "write -P 0x44 4k 2k", "write -z 10k 4k", "write -P 0x45 70k 100k",
            "write -z 2M 64k", "write -P 0x46 3M 6k")
    extents = assert_like_qemu(path)
    assert Extent(10 * KiB, 4 * KiB, Kind.ZERO) in extents  # two zero subclusters over the base


@pytest.mark.parametrize("options", ["", "compression_type=zstd", "cluster_size=4k",
                                     "cluster_size=2M"])
def test_compressed(tmp_path, options):
    if "zstd" in options:
        pytest.importorskip("zstandard")
    raw = tmp_path / "src.raw"
    rng = random.Random(2)
    with open(raw, "wb") as f:
        f.truncate(5 * MiB)
        for i in range(40):
            f.seek(rng.randrange(5 * MiB - 70 * KiB))
            f.write(bytes([i]) * 1000 + rng.randbytes(300) * 50)
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", *(["-o", options] if options else []),
        raw, path)
    assert_like_qemu(path)
    assert reference(path) == raw.read_bytes()


def test_zstd_without_the_module_refused(tmp_path, monkeypatch):
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"squeeze " * (MiB // 8))
    path = tmp_path / "z.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "zstandard" else find_spec(name, *a))
    refused(path, "zstandard module is not installed")


def test_dirty_image_imports(tmp_path):
    path = create(tmp_path / "d.qcow2", "1M", "lazy_refcounts=on")
    scribble(path, 64 * KiB, MiB)
    patch(path, 72, ">Q", qcow2.INCOMPAT_DIRTY)
    assert_like_qemu(path)


# -- backing chains ------------------------------------------------------------------------

def test_chain_of_three_mixed(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(3).randbytes(3 * MiB + 512))  # shorter than its children
    mid = create(tmp_path / "mid.qcow2", "6M", "compat=0.10", base, "raw")
    qemu_io(mid, "write -P 0x55 1M 100k", "write -P 0x56 4M 64k")
    top = create(tmp_path / "top.qcow2", "8M", "cluster_size=4k", mid)
    qemu_io(top, "write -z 0 8k", "write -P 0x57 1040k 3k", "write -z 2M 512k",
            "write -P 0x58 7M 4k")
    extents = assert_like_qemu(top)
    assert extents[0] == Extent(0, 8 * KiB, Kind.ZERO)  # the zero flag hides the base's data
    assert extents[-1].kind is Kind.HOLE  # past the base and unwritten


@pytest.mark.parametrize("top_options", ["cluster_size=2M", "extended_l2=on"])
def test_chain_cluster_sizes(tmp_path, top_options):
    base = create(tmp_path / "base.qcow2", "4M", "cluster_size=512")
    qemu_io(base, "write -P 0x61 0 3M")
    top = create(tmp_path / "top.qcow2", "4M", top_options, base)
    qemu_io(top, "write -P 0x62 1M 3k", "write -z 2052k 8k")
    assert_like_qemu(top)


def test_vhd_backing(tmp_path):
    base = tmp_path / "base.vhd"
    run("qemu-img", "create", "-f", "vpc", "-o", "force_size=on", base, "4M")
    qemu_io(base, "write -P 0x71 512k 1M", fmt="vpc")
    top = create(tmp_path / "top.qcow2", "4M", "", base, "vpc")
    qemu_io(top, "write -P 0x72 1M 64k")
    assert_like_qemu(top)


def test_backing_format_raw_reads_bytes_as_they_are(tmp_path):
    """A raw backing file holds what its guest wrote: a qcow2 header in it is data, never a
    reference to follow (QEMU's CVE-2008-2004)."""
    (tmp_path / "neighbour.raw").write_bytes(b"secret" * 1000)
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    top = create(tmp_path / "top.qcow2", "1M", "", base, "raw")
    fake = create(tmp_path / "fake.qcow2", "1M", "", tmp_path / "neighbour.raw", "raw")
    base.write_bytes(fake.read_bytes().ljust(MiB, b"\0"))
    image = open_image(top, Policy(), "qcow2")
    assert image.read(0, MiB) == base.read_bytes()
    image.close()


def test_backing_format_mismatch(tmp_path):
    base = tmp_path / "base.qcow2"
    base.write_bytes(bytes(MiB))
    top = create(tmp_path / "top.qcow2", "1M", "", base, "raw")
    run("qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
    refused(top, "base.qcow2 is raw", "says qcow2")


def test_missing_backing_names_it(tmp_path):
    base = create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", "1M", "", base)
    base.unlink()
    refused(top, "backing file base.qcow2 not found", "needed by top.qcow2")


def test_backing_loop(tmp_path):
    a = create(tmp_path / "a.qcow2", "1M")
    b = create(tmp_path / "b.qcow2", "1M", "", a)
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    refused(b, "loops")
    run("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a)
    refused(a, "loops")


def test_chain_depth(tmp_path):
    images = [create(tmp_path / "0.qcow2", "1M")]
    for i in range(1, 18):
        images.append(create(tmp_path / f"{i}.qcow2", "1M", "", images[-1]))
    qemu_io(images[0], "write -P 0x7f 0 4k")
    image = open_image(images[16], Policy(), "qcow2")  # 16 backing files: the policy's limit
    assert image.read(0, 4096) == b"\x7f" * 4096
    image.close()
    refused(images[17], "deeper than the policy allows")
    refused(images[3], "deeper", policy=Policy(max_chain_depth=2))


@pytest.mark.parametrize("name, words", [
    ("json:{\"file.filename\": \"base.raw\"}", ("protocol or json:",)),
    ("nbd:localhost:10809", ("protocol or json:",)),
    ("http://example.com/base.raw", ("protocol or json:",)),
    ("../elsewhere/base.raw", ("outside",)),
    ("/etc/passwd", ("outside",)),
])
def test_backing_names_refused(tmp_path, name, words):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "base.raw").write_bytes(bytes(MiB))
    (tmp_path / "vm").mkdir()
    top = create(tmp_path / "vm" / "top.qcow2", "1M")
    run("qemu-img", "rebase", "-u", "-b", name, "-F", "raw", top)
    refused(top, *words)


def test_backing_in_allowed_dir(tmp_path):
    (tmp_path / "gold").mkdir()
    (tmp_path / "vm").mkdir()
    base = tmp_path / "gold" / "base.raw"
    base.write_bytes(b"\x5a" * MiB)
    top = create(tmp_path / "vm" / "top.qcow2", "1M")
    run("qemu-img", "rebase", "-u", "-b", "../gold/base.raw", "-F", "raw", top)
    refused(top, "outside")
    assert_like_qemu(top, Policy(allowed_dirs=(tmp_path / "gold",)))


def test_external_data_file(tmp_path):
    path = create(tmp_path / "e.qcow2", "2M", f"data_file={tmp_path / 'e.data'}")
    qemu_io(path, "write -P 0x66 64k 200k")
    refused(path, "external data file")
    assert_like_qemu(path, Policy(allow_external_data=True))
    (tmp_path / "e.data").unlink()
    refused(path, "e.data", policy=Policy(allow_external_data=True))


# -- the corpus ----------------------------------------------------------------------------

def test_corpus_fs_overhead(corpus):
    image = open_image(corpus("fs-overhead.qcow2"))
    assert image.virtual_size == 858993664
    assert list(image.extents()) == [Extent(0, 858993664, Kind.HOLE)]
    image.close()


def test_corpus_snapshot1_missing_base(corpus):
    refused(corpus("cirros-snapshot1.qcow2"), "backing file cirros.raw not found",
            "cirros-snapshot1.qcow2")


def test_corpus_snapshot2_missing_link(corpus):
    refused(corpus("cirros-snapshot2.qcow2"), "backing file cirros-snapshot1.qcow2 not found")


def test_corpus_chain_missing_base(corpus):
    corpus("cirros-snapshot1.qcow2")
    refused(corpus("cirros-snapshot2.qcow2"), "backing file cirros.raw not found",
            "needed by cirros-snapshot1.qcow2")


def test_corpus_chain_with_a_base(corpus):
    corpus("cirros-snapshot1.qcow2")
    top = corpus("cirros-snapshot2.qcow2")
    (top.parent / "cirros.raw").write_bytes(random.Random(4).randbytes(5 * MiB))
    assert_like_qemu(top)


# -- hostile images ------------------------------------------------------------------------

@pytest.fixture
def plain(tmp_path) -> Path:
    """A valid v3 image with data in clusters 0-2 and 40."""
    path = create(tmp_path / "h.qcow2", "4M")
    qemu_io(path, "write -P 0x21 0 192k", "write -P 0x22 2560k 64k")
    return path


@pytest.mark.parametrize("offset, fmt, value, words", [
    (4, ">I", 4, ("unsupported qcow2 version 4",)),
    (20, ">I", 8, ("cluster_bits 8",)),
    (20, ">I", 22, ("cluster_bits 22",)),
    (20, ">I", 64, ("cluster_bits 64",)),
    (24, ">Q", 1 << 60, ("exceeds the policy",)),
    (32, ">I", 2, ("encrypted",)),
    (36, ">I", 0, ("too small",)),
    (36, ">I", 1 << 30, ("L1 table",)),
    (40, ">Q", 0x30001, ("not cluster-aligned",)),
    (40, ">Q", 1 << 40, ("past the end",)),
    (40, ">Q", 0, ("overlaps the header",)),
    (48, ">Q", 1 << 40, ("refcount table", "past the end")),
    (48, ">Q", 0x10200, ("refcount table", "not cluster-aligned")),
    (56, ">I", 1 << 20, ("refcount table",)),
    (72, ">Q", 1 << 5, ("unknown incompatible features 0x20",)),
    (72, ">Q", qcow2.INCOMPAT_CORRUPT, ("corrupt",)),
    (72, ">Q", qcow2.INCOMPAT_COMPRESSION, ("compression type",)),
    (96, ">I", 7, ("refcount_order",)),
    (100, ">I", 100, ("header_length",)),
    (100, ">I", 1 << 20, ("header_length",)),
])
def test_hostile_header(plain, offset, fmt, value, words):
    patch(plain, offset, fmt, value)
    refused(plain, *words)


def test_bad_magic_is_no_qcow2(plain):
    patch(plain, 0, ">4s", b"QFI\xfa")
    with pytest.raises(ImageError, match="not a qcow2 image"):
        qcow2.open(plain)
    assert open_image(plain).format == "raw"


def test_hostile_l2_points_at_header(plain):
    patch(plain, l2_offset(plain) + 8, ">Q", 1 << 63 | 1 << 62 | 16)  # compressed, at byte 16
    refused(plain, "overlaps the header")


def test_hostile_extended_l2_small_clusters(tmp_path):
    path = create(tmp_path / "x.qcow2", "1M", "cluster_size=4k")
    patch(path, 72, ">Q", qcow2.INCOMPAT_EXTENDED_L2)
    refused(path, "extended L2")


def test_unknown_feature_named(plain):
    patch(plain, 72, ">Q", 1 << 9)
    h = header(plain)
    # Put a feature name table where the header extensions start.
    table = qcow2.FEATURE_NAME.pack(0, 9, b"teleport")
    ext = qcow2.pack_extension(qcow2.EXT_FEATURE_NAMES, table) + qcow2.pack_extension(0, b"")
    patch(plain, h.header_length, f">{len(ext)}s", ext)
    refused(plain, "teleport")


def test_extension_overflow(plain):
    h = header(plain)
    patch(plain, h.header_length, ">II", 0x12345678, 1 << 20)
    refused(plain, "runs past the header area")


def test_backing_name_too_long(plain):
    patch(plain, 8, ">QI", 1024, 2000)
    refused(plain, "backing file name of 2000 bytes")


@pytest.mark.parametrize("entry, words", [
    (0x8000_0100_0000_0000 | 1 << 20, ("past the end",)),
    (0x8000_0000_0003_0200, ("unaligned or has reserved bits",)),
    (0x8000_0000_0000_0000, None),  # offset 0 without a data file: unallocated
    (0x8000_0000_0000_0000 | 0x10000, ("overlaps the refcount table",)),
])
def test_hostile_l1_entry(plain, entry, words):
    h = header(plain)
    patch(plain, h.l1_table_offset, ">Q", entry)
    if words is None:
        image = open_image(plain)
        assert list(image.extents()) == [Extent(0, 4 * MiB, Kind.HOLE)]
        image.close()
    else:
        refused(plain, *words)


def test_hostile_l1_sharing_an_l2_table(tmp_path):
    path = create(tmp_path / "s.qcow2", "2G", "cluster_size=4k")  # 4 L1 entries
    qemu_io(path, "write -P 1 0 4k")
    h = header(path)
    patch(path, h.l1_table_offset + 8, ">Q", l2_offset(path) | qcow2.OFLAG_COPIED)
    refused(path, "more than once")


@pytest.mark.parametrize("entry, words", [
    (0x8000_0100_0000_0000, ("past the end",)),
    (0x8000_0000_0001_0200, ("unaligned",)),
    (0x8000_0000_0000_0000 | 0x10002, ("reserved bits",)),
    (0x8000_0000_0000_0000 | 1 << 57 | 0x10000, ("reserved bits",)),
    (0x8000_0000_0000_0000 | 0x200, ("unaligned",)),
    (0x8000_0000_0000_0000 | 0x10000, ("overlaps the refcount table",)),
    (qcow2.OFLAG_COMPRESSED | 1 << 40, ("past the end",)),
])
def test_hostile_l2_entry(plain, entry, words):
    patch(plain, l2_offset(plain) + 8, ">Q", entry)
    refused(plain, *words)


def test_hostile_l2_points_at_l1(plain):
    h = header(plain)
    patch(plain, l2_offset(plain) + 8, ">Q", qcow2.OFLAG_COPIED | h.l1_table_offset)
    refused(plain, "overlaps the L1 table")


def refcount_block(path: Path, index: int = 0) -> int:
    h = header(path)
    with open(path, "rb") as f:
        f.seek(h.refcount_table_offset + 8 * index)
        return struct.unpack(">Q", f.read(8))[0]


# Finding 14: guest data, an L2 table or a refcount block placed on the image's own metadata.
@pytest.mark.parametrize("where", ["l2 table", "refcount block"])
def test_guest_data_on_metadata_refused(plain, where):
    target = l2_offset(plain) if where == "l2 table" else refcount_block(plain)
    patch(plain, l2_offset(plain) + 8, ">Q", qcow2.OFLAG_COPIED | target)
    refused(plain, "overlaps an L2 table or refcount block", "own metadata")


def test_compressed_cluster_on_an_l2_table_refused(plain):
    sectors_bits = 62 - (header(plain).cluster_bits - 8)
    patch(plain, l2_offset(plain) + 8, ">Q",
          qcow2.OFLAG_COMPRESSED | 1 << sectors_bits | l2_offset(plain) + 100)
    refused(plain, "compressed cluster", "overlaps an L2 table")


def test_l2_table_on_a_refcount_block_refused(plain):
    h = header(plain)
    patch(plain, h.l1_table_offset, ">Q", qcow2.OFLAG_COPIED | refcount_block(plain))
    refused(plain, "overlaps an L2 table or refcount block")


@pytest.mark.parametrize("entry, words", [
    ("l2", ("refcount block 1", "overlaps")),
    (0x10000 | 0x200, ("refcount table entry 1", "reserved bits")),
    (1 << 40, ("refcount block 1", "past the end")),
])
def test_hostile_refcount_table_entry(plain, entry, words):
    h = header(plain)
    patch(plain, h.refcount_table_offset + 8, ">Q", l2_offset(plain) if entry == "l2" else entry)
    refused(plain, *words)


def test_large_l1_table_costs_its_own_size_in_memory(tmp_path):
    """Finding 13a: an L1 table of 4 Mi entries (32 MiB) all mapping one L2 table. It used to
    become a list and a set of Python ints (~7 times its size); now it is refused from a count
    of its entries, holding the table once."""
    entries, cs = 4 << 20, 512
    l1_at, l2_at = 2 * cs, 2 * cs + 8 * entries
    h = qcow2.Header(version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=9,
                     size=entries * (cs // 8) * cs, crypt_method=0, l1_size=entries,
                     l1_table_offset=l1_at, refcount_table_offset=cs,
                     refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0,
                     header_length=qcow2.V3_HEADER_LENGTH)
    path = tmp_path / "big-l1.qcow2"
    with open(path, "wb") as f:
        f.write(h.pack().ljust(2 * cs, b"\0"))
        f.write(struct.pack(">Q", qcow2.OFLAG_COPIED | l2_at) * entries)
        f.write(bytes(cs))
    tracemalloc.start()
    try:
        refused(path, "maps one L2 table more than once", policy=Policy(max_virtual_size=1 << 50))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 8 * entries, f"peak {peak >> 20} MiB for a {8 * entries >> 20} MiB table"


def test_zero_flag_in_v2_refused(tmp_path):
    path = create(tmp_path / "v2.qcow2", "1M", "compat=0.10")
    qemu_io(path, "write -P 1 0 64k")
    patch(path, l2_offset(path), ">Q", l2_entry(path, 0) | qcow2.OFLAG_ZERO)
    refused(path, "reserved bits")


def test_subcluster_both_allocated_and_zero(tmp_path):
    path = create(tmp_path / "x.qcow2", "1M", "extended_l2=on")
    qemu_io(path, "write -P 1 0 4k")
    patch(path, l2_offset(path) + 8, ">Q", 1 | 1 << 32)
    refused(path, "both allocated and zero")


def _compressed_image(tmp_path) -> Path:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"compress me " * (MiB // 12))
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", raw, path)
    return path


def _point_compressed(path: Path, packed: bytes) -> None:
    """Make guest cluster 0 a compressed cluster holding `packed`, appended to the file."""
    host = path.stat().st_size
    with open(path, "ab") as f:
        f.write(packed)
    sectors = (host + len(packed) - 1) // 512 - host // 512
    patch(path, l2_offset(path), ">Q", qcow2.OFLAG_COMPRESSED | sectors << 54 | host)


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -12)
    return packer.compress(data) + packer.flush()


def test_compression_bomb_is_bounded(tmp_path):
    path = _compressed_image(tmp_path)
    _point_compressed(path, _deflate(bytes(16 * MiB)))  # 16 KiB of stream, 16 MiB inflated
    image = open_image(path)
    with pytest.raises(ImageError, match="more than one cluster"):
        image.read(0, 64 * KiB)  # one cluster's worth and a byte inflated, no more
    image.close()


@pytest.mark.parametrize("packed, words", [
    (_deflate(b"short"), ("holds 5 bytes",)),
    (b"\xff" * 600, ("is corrupt",)),
])
def test_compressed_cluster_broken(tmp_path, packed, words):
    path = _compressed_image(tmp_path)
    _point_compressed(path, packed)
    refused(path, *words)


def test_compressed_size_field_is_bounded(tmp_path):
    path = _compressed_image(tmp_path)
    entry = l2_entry(path, 0)
    patch(path, l2_offset(path), ">Q", entry | 0xFF << 54)  # the most sectors the field holds
    image = open_image(path)
    assert image.read(0, 12) == b"compress me "
    image.close()


def _mutants():
    return st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1,
                    max_size=8)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> bytes:
    """A small image whose header, L1 and L2 sit in the first few KiB."""
    path = tmp_path_factory.mktemp("small") / "s.qcow2"
    create(path, "256k", "cluster_size=512")
    qemu_io(path, "write -P 0x31 0 1k", "write -z 2k 1k", "write -P 0x32 100k 3k")
    return path.read_bytes()


def _walk(path: Path) -> None:
    try:
        image = qcow2.open(path)
    except ImageError:
        return
    try:
        for ext in image.extents():
            if ext.kind is Kind.DATA:
                image.read(ext.offset, min(ext.length, 1 * MiB))
    except ImageError:
        pass
    finally:
        image.close()


@settings(max_examples=300, deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutants())
def test_mutated_images_fail_cleanly(tmp_path, small_image, mutations):
    data = bytearray(small_image)
    for pos, byte in mutations:
        data[pos % len(data)] = byte
    path = tmp_path / "m.qcow2"
    path.write_bytes(data)
    _walk(path)


@settings(max_examples=300, deadline=2000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.tuples(
    st.sampled_from([2, 3]), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 40), st.integers(0, 2**64 - 1), st.integers(0, 3), st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    features=st.integers(0, 63), tail=st.binary(max_size=2048))
def test_random_headers_fail_cleanly(tmp_path, fields, features, tail):
    version, bfo, bfs, bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters = fields
    h = qcow2.Header(version, bfo, bfs, bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
                     0, 0, incompatible_features=features if version == 3 else 0,
                     header_length=qcow2.V3_HEADER_LENGTH if version == 3 else 72)
    path = tmp_path / "r.qcow2"
    path.write_bytes(h.pack() + tail)
    _walk(path)


# -- speed ---------------------------------------------------------------------------------

def test_extents_of_a_large_scattered_image_reads_only_its_map(tmp_path, monkeypatch):
    """2 GiB, a quarter of its 64 KiB clusters allocated at random: the map alone decides."""
    cs, clusters = 64 * KiB, 32768
    rng = random.Random(5)
    allocated = sorted(rng.sample(range(clusters), clusters // 4))
    l1_at, l2_at, data_at = 2 * cs, 3 * cs, 7 * cs
    l2 = [0] * clusters
    for n, cluster in enumerate(allocated):
        l2[cluster] = qcow2.OFLAG_COPIED | (data_at + n * cs)
    l1 = [qcow2.OFLAG_COPIED | (l2_at + i * cs) for i in range(4)]
    h = qcow2.Header(3, 0, 0, 16, 2 << 30, 0, 4, l1_at, cs, 1, 0, 0,
                     header_length=qcow2.V3_HEADER_LENGTH)
    path = tmp_path / "big.qcow2"
    with open(path, "wb") as f:
        f.write(h.pack() + qcow2.pack_extension(0, b""))
        f.seek(l1_at)
        f.write(struct.pack(">4Q", *l1))
        f.seek(l2_at)
        f.write(struct.pack(f">{clusters}Q", *l2))
        for n in range(len(allocated)):  # a byte in each data cluster: real data, sparse file
            f.seek(data_at + n * cs)
            f.write(b"\1")
        f.truncate(data_at + len(allocated) * cs)
    image = open_image(path)
    # The map alone decides: extents() reads the L2 tables and not one data cluster.
    reads: list[int] = []
    for name in ("pread", "preadv", "read", "readv"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real: reads.append(1) or real(*a))
    extents = list(image.extents())
    monkeypatch.undo()
    data = [e for e in extents if e.kind is Kind.DATA]
    assert sum(e.length for e in extents) == 2 << 30
    assert len({e.offset // cs for e in data}) == len(allocated)
    assert len(reads) <= 4 + 1, f"extents() made {len(reads)} reads for 4 L2 tables"
    # Reads coalesce host-contiguous clusters: one preadv per run of allocated clusters.
    preadv, calls = os.preadv, []
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(1) or preadv(*a))
    first = {c for c in allocated if c < 4096}
    assert image.read(0, 4096 * cs).count(1) == len(first)
    assert len(calls) == sum(1 for c in first if c - 1 not in first)
    image.close()


# -- the exporter --------------------------------------------------------------------------

def _source(path: Path, size: int, seed: int) -> bytes:
    """A raw disk with random, repetitive and zero stretches, and holes."""
    rng = random.Random(seed)
    data = bytearray(size)
    for i in range(60):
        offset, length = rng.randrange(size), rng.randrange(1, 200 * KiB)
        chunk = rng.randbytes(length) if i % 3 else bytes([i]) * length
        data[offset:offset + length] = chunk[:size - offset]
    path.write_bytes(data)
    return bytes(data)


def _feed(w, data: bytes, rng: random.Random, zero_gaps: bool = True) -> None:
    """Ordered writes of random lengths and alignments; zero stretches as mark_zero."""
    pos = 0
    while pos < len(data):
        length = min(len(data) - pos, rng.choice([1, 511, 4096, 65536, 70000, 300000]))
        chunk = data[pos:pos + length]
        if zero_gaps and chunk == bytes(length):
            w.mark_zero(pos, length)
        else:
            w.write(pos, chunk)
        pos += length


def _check_clean(path: Path) -> None:
    out = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert not report.get("leaks") and not report.get("corruptions"), report


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("size", [5 * MiB, 5 * MiB + 1000])
def test_export(tmp_path, compress, size):
    src = tmp_path / "src.raw"
    data = _source(src, size, seed=size)
    dst = tmp_path / "out.qcow2"
    w = writer.create(dst, size, compress=compress)
    _feed(w, data, random.Random(size))
    w.close()
    _check_clean(dst)
    padded = -(-size // 512) * 512  # QEMU's disks are whole sectors
    assert json.loads(run("qemu-img", "info", "--output=json", dst))["virtual-size"] == padded
    assert reference(dst) == data + bytes(padded - size)
    report = json.loads(run("qemu-img", "check", "--output=json", dst))
    assert (report.get("compressed-clusters", 0) > 0) == compress
    assert_like_qemu(dst)  # the round trip through the importer
    theirs = tmp_path / "theirs.qcow2"
    run("qemu-img", "convert", *(["-c"] if compress else []), "-O", "qcow2", src, theirs)
    theirs_report = json.loads(run("qemu-img", "check", "--output=json", theirs))
    assert report["image-end-offset"] <= theirs_report["image-end-offset"]  # packed as tight


@pytest.mark.parametrize("batch", [writer.CLUSTER, 3 * writer.CLUSTER])
def test_compressed_data_packed_across_a_write_out_lands_whole(tmp_path, monkeypatch, batch):
    """Appended bytes are written out in batches; a compressed cluster packed across two host
    clusters, the first written out alone, had its second half overwritten by the zeros the
    second still held (a corrupt image once output passed a batch at the wrong moment)."""
    monkeypatch.setattr(writer, "BATCH", batch)
    test_export(tmp_path, True, 5 * MiB)


@pytest.mark.parametrize("compress", [False, True])
def test_export_spans_l2_tables(tmp_path, compress):
    """One L2 table maps 512 MiB: data on both sides of the boundary, mostly zeros between."""
    size = 600 * MiB
    pieces = {0: b"a" * 70 * KiB, 512 * MiB - 10 * KiB: random.Random(7).randbytes(80 * KiB),
              size - 70 * KiB: b"z" * 70 * KiB}
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for offset, chunk in pieces.items():
            f.seek(offset)
            f.write(chunk)
    dst = tmp_path / "out.qcow2"
    w = writer.create(dst, size, compress=compress)
    pos = 0
    for offset, chunk in pieces.items():
        w.mark_zero(pos, offset - pos)
        w.write(offset, chunk)
        pos = offset + len(chunk)
    w.close()
    _check_clean(dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
    image = open_image(dst)
    data = [e for e in image.extents() if e.kind is Kind.DATA]
    assert sum(e.length for e in data) == 7 * 64 * KiB  # the clusters the pieces touch
    for offset, chunk in pieces.items():
        assert image.read(offset, len(chunk)) == chunk
    image.close()


@pytest.mark.parametrize("with_parent", [False, True])
def test_export_long_writes(tmp_path, with_parent):
    """Writes of many clusters at once (the copy loop hands over up to 8 MiB), one across the
    512 MiB boundary of an L2 table, with all-zero clusters inside: those allocate nothing (over
    a parent, they carry the zero flag), and the image equals the disk."""
    size, cluster = 600 * MiB, 64 * KiB
    rng = random.Random(11)
    long = bytearray(rng.randbytes(12 * MiB + 1000))
    zero_clusters = (0, 3, 4, 100, 192)  # inside the run, its first and last (partial) too
    for c in zero_clusters:
        long[c * cluster:(c + 1) * cluster] = bytes(cluster)
    pieces = {cluster + 700: rng.randbytes(2 * cluster)}  # unaligned
    parent = None
    if with_parent:  # the long run inside the parent's 16 MiB
        parent = tmp_path / "base.raw"
        parent.write_bytes(b"\xee" * (16 * MiB))
        start = MiB
    else:  # the long run across the first L2 table's end
        start = 512 * MiB - 5 * MiB
        pieces[MiB] = rng.randbytes(9 * MiB)
    pieces[start] = bytes(long)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        if parent is not None:
            f.write(parent.read_bytes())
        f.truncate(size)
        for offset, chunk in pieces.items():
            f.seek(offset)
            f.write(chunk)
    (tmp_path / "vm").mkdir()
    dst = tmp_path / "vm" / "out.qcow2"
    w = writer.create(dst, size, parent=parent)
    for offset, chunk in pieces.items():
        w.write(offset, chunk)
    w.close()
    _check_clean(dst)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, dst)
    if with_parent:
        entries = json.loads(run("qemu-img", "map", "--output=json", dst))
        for c in zero_clusters[:-1]:  # the last one is partial: the parent's bytes past it
            at = start + c * cluster
            (e,) = [e for e in entries if e["start"] <= at < e["start"] + e["length"]]
            assert (e["depth"], e["zero"], e["data"]) == (0, True, False), (c, e)
    else:
        data_clusters = 3 + 9 * MiB // cluster + 193 - len(zero_clusters)
        assert qemu_data_bytes(dst) == data_clusters * cluster


def test_export_allocates_only_data(tmp_path):
    dst = tmp_path / "z.qcow2"
    w = writer.create(dst, 4 * MiB)
    w.write(0, bytes(MiB))  # zeros written are still no data
    w.mark_zero(MiB, MiB)
    w.write(3 * MiB, b"x" * 100)
    w.close()
    _check_clean(dst)
    assert qemu_data_bytes(dst) == 64 * KiB
    assert dst.stat().st_size == 6 * 64 * KiB  # header, data, L2, L1, refcount table and block


@pytest.mark.parametrize("size", [0, 1, 512])
def test_export_tiny_disks(tmp_path, size):
    dst = tmp_path / "t.qcow2"
    w = writer.create(dst, size)
    if size:
        w.write(0, b"\x01" * size)
    w.close()
    _check_clean(dst)
    assert reference(dst) == b"\x01" * size + bytes(-size % 512)


def test_export_refuses_disorder_and_keeps_nothing(tmp_path):
    dst = tmp_path / "o.qcow2"
    dst.write_bytes(b"old")
    w = writer.create(dst, MiB)
    w.write(4096, b"a" * 10)
    with pytest.raises(ThinstackError, match="out of order"):
        w.write(0, b"b")
    with pytest.raises(ThinstackError, match="outside the disk"):
        w.write(MiB - 1, b"bb")
    w.abort()
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.qcow2"]


@pytest.mark.parametrize("parent_kind, compress", [("qcow2", False), ("raw", False),
                                                   ("vpc", False), ("qcow2", True)])
def test_export_overlay(tmp_path, parent_kind, compress):
    size = 3 * MiB
    base_data = random.Random(6).randbytes(size - 64 * KiB)  # the parent is a little shorter
    base = tmp_path / f"base.{parent_kind}"
    if parent_kind == "raw":
        base.write_bytes(base_data)
    else:
        (tmp_path / "b.raw").write_bytes(base_data)
        run("qemu-img", "convert", "-O", parent_kind, *(["-o", "force_size=on"]
                                                        if parent_kind == "vpc" else []),
            tmp_path / "b.raw", base)
    (tmp_path / "vm").mkdir()
    child = tmp_path / "vm" / "child.qcow2"
    expected = bytearray(base_data + bytes(64 * KiB))
    w = writer.create(child, size, parent=base, compress=compress)
    changes = [("w", 1000, 3000), ("z", 70 * KiB, 10 * KiB), ("z", 128 * KiB, 128 * KiB),
               ("w", 300 * KiB, 64 * KiB), ("z", 2 * MiB - 100, 200),
               ("w", size - 70 * KiB, 3), ("w", size - 5, 5)]
    for i, (op, offset, length) in enumerate(changes):
        if op == "w":
            chunk = bytes([0x80 + i]) * length
            w.write(offset, chunk)
        else:
            chunk = bytes(length)
            w.mark_zero(offset, length)
        expected[offset:offset + length] = chunk
    w.close()
    _check_clean(child)
    info = json.loads(run("qemu-img", "info", "--output=json", child))
    assert info["backing-filename"] == f"../base.{parent_kind}"
    assert info["backing-filename-format"] == parent_kind
    assert reference(child) == bytes(expected)
    # A whole cluster marked zero carries the zero flag rather than allocating zeros.
    assert {"start": 128 * KiB, "length": 128 * KiB, "depth": 0, "present": True, "zero": True,
            "data": False} in json.loads(run("qemu-img", "map", "--output=json", child))
    assert_like_qemu(child, Policy(allowed_dirs=(tmp_path,)))


def test_export_overlay_missing_parent(tmp_path):
    with pytest.raises(ExportError):
        writer.create(tmp_path / "c.qcow2", MiB, parent=tmp_path / "missing.qcow2")
