"""Formats read through qemu-img (VMDK, VHDX, VDI, QED, qcow, Parallels): the same bytes as
`qemu-img convert`, and no file the policy refuses ever handed to qemu-img."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from thinstack.dm import command
from thinstack.extents import Kind
from thinstack.importers import DEFAULT_POLICY, ImageError, Policy, detect, open_image, qemu

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")

KiB, MiB = 1 << 10, 1 << 20


def run(*args) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def source(tmp_path) -> Path:
    """A raw disk with data, zeros and holes."""
    path = tmp_path / "src.raw"
    rng = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        for offset in (0, 700 * KiB, 3 * MiB + 512):
            f.seek(offset)
            f.write(rng.randbytes(150 * KiB))
    return path


def convert(source: Path, fmt: str, options: str = "", name: str | None = None) -> Path:
    out = source.with_name(name or f"img.{fmt}")
    run("qemu-img", "convert", "-O", fmt, *(["-o", options] if options else []), source, out)
    return out


def assert_like_qemu(path: Path, policy: Policy = DEFAULT_POLICY) -> None:
    ref = path.with_name("ref.raw")
    run("qemu-img", "convert", "-O", "raw", path, ref)
    expected = ref.read_bytes()
    image = open_image(path, policy, "qemu")
    try:
        assert image.format == "qemu" and image.virtual_size == len(expected)
        got = bytearray(image.virtual_size)
        pos = 0
        extents = list(image.extents())
        for ext in extents:
            assert ext.offset == pos
            if ext.kind is Kind.DATA:
                got[ext.offset:ext.end] = image.read(ext.offset, ext.length)
            pos = ext.end
        assert pos == image.virtual_size and bytes(got) == expected
        mapped = json.loads(run("qemu-img", "map", "--output=json", path))
        assert (sum(e.length for e in extents if e.kind is Kind.DATA)
                <= sum(e["length"] for e in mapped if e["data"]))
    finally:
        image.close()


@pytest.mark.parametrize("fmt, options", [
    ("vmdk", ""),
    ("vmdk", "subformat=streamOptimized"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"),
    ("vmdk", "subformat=monolithicFlat"),
    ("vhdx", ""),
    ("vdi", ""),
    ("qed", ""),
    ("qcow", ""),
    ("parallels", ""),
])
def test_formats(source, fmt, options):
    path = convert(source, fmt, options)
    assert detect(path) == "qemu"
    assert_like_qemu(path)


def test_qcow_v1_is_not_qcow2(source):
    head = convert(source, "qcow").read_bytes()[:4096]
    assert qemu.qemu_format(head) == "qcow"
    from thinstack.importers import qcow2
    assert not qcow2.probe(head, b"")


def test_qemu_img_runs_through_the_one_runner(source, monkeypatch):
    """So it has the runner's time limits and shows in THINSTACK_TRACE like every command."""
    real, seen = command.RUNNER, []

    class Recording(command.Runner):
        def run(self, argv, **options):
            seen.append(argv[1])
            return real.run(argv, **options)

        def stream(self, argv, **options):
            seen.append(argv[1])
            return real.stream(argv, **options)

    monkeypatch.setattr(command, "RUNNER", Recording())
    image = open_image(convert(source, "vdi"), DEFAULT_POLICY, "qemu")
    try:
        list(image.extents())
    finally:
        image.close()
    assert {"info", "check", "map"} <= set(seen)


def test_temporary_copy_left_nowhere(source, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    image = open_image(convert(source, "vdi"))
    assert image.read(0, 10) == source.read_bytes()[:10]
    # The converted copy lives only as an open descriptor; the private folder holds symlinks.
    assert all(p.is_symlink() or p.is_dir() for p in scratch.rglob("*"))
    image.close()
    assert list(scratch.iterdir()) == []


def _descriptor(tmp_path: Path, extent: str) -> Path:
    path = tmp_path / "desc.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        "createType=\"monolithicFlat\"\n\n# Extent description\n"
        f"RW 2048 FLAT \"{extent}\" 0\n\n# The Disk Data Base\n#DDB\n")
    return path


def test_descriptor_extent_in_dir(tmp_path):
    (tmp_path / "flat.bin").write_bytes(b"\x99" * MiB)
    path = _descriptor(tmp_path, "flat.bin")
    assert_like_qemu(path)


@pytest.mark.parametrize("extent, words", [
    ("/etc/passwd", "absolute"),
    ("../secret.bin", r"'\.\.'"),
    ("nbd:localhost:10809", "protocol"),
    ("json:{\"driver\": \"file\"}", "protocol"),
])
def test_descriptor_extent_refused(tmp_path, monkeypatch, extent, words):
    (tmp_path / "vm").mkdir()
    (tmp_path / "secret.bin").write_bytes(bytes(MiB))
    path = _descriptor(tmp_path / "vm", extent)
    monkeypatch.setattr(qemu, "_qemu_img", lambda *a, **k: pytest.fail("qemu-img ran"))
    with pytest.raises(ImageError, match=words):
        open_image(path, Policy(), "qemu")


def test_backing_in_dir(source, tmp_path):
    child = tmp_path / "child.qed"
    run("qemu-img", "create", "-f", "qed", "-b", "src.raw", "-F", "raw", child, "4M")
    run("qemu-io", "-f", "qed", "-c", "write -P 0x33 1M 64k", child)
    assert_like_qemu(child)


@pytest.mark.parametrize("backing, words", [
    ("../elsewhere/base.raw", "outside"),
    ("json:{\"file.filename\": \"src.raw\"}", "protocol"),
    ("nbd:localhost:10809", "protocol"),
    ("gone.raw", "backing file gone.raw.*no such file"),
])
def test_backing_refused(tmp_path, monkeypatch, backing, words):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "base.raw").write_bytes(bytes(MiB))
    (tmp_path / "vm").mkdir()
    child = tmp_path / "vm" / "child.qed"
    run("qemu-img", "create", "-f", "qed", child, "1M")
    run("qemu-img", "rebase", "-u", "-f", "qed", "-b", backing, "-F", "raw", child)
    with pytest.raises(ImageError, match=words):
        open_image(child, Policy(), "qemu")


def test_backing_allowed_dir(tmp_path):
    (tmp_path / "gold").mkdir()
    (tmp_path / "gold" / "base.raw").write_bytes(b"\x11" * MiB)
    (tmp_path / "vm").mkdir()
    child = tmp_path / "vm" / "child.qed"
    run("qemu-img", "create", "-f", "qed", "-b", "../gold/base.raw", "-F", "raw", child, "1M")
    assert_like_qemu(child, Policy(allowed_dirs=(tmp_path / "gold",)))


def test_backing_loop(tmp_path):
    a, b = tmp_path / "a.qed", tmp_path / "b.qed"
    run("qemu-img", "create", "-f", "qed", a, "1M")
    run("qemu-img", "create", "-f", "qed", "-b", "a.qed", "-F", "qed", b, "1M")
    run("qemu-img", "rebase", "-u", "-f", "qed", "-b", "b.qed", "-F", "qed", a)
    with pytest.raises(ImageError, match="loops"):
        open_image(b, Policy(), "qemu")


def test_chain_depth(tmp_path):
    run("qemu-img", "create", "-f", "qed", tmp_path / "0.qed", "1M")
    for i in range(1, 4):
        run("qemu-img", "create", "-f", "qed", "-b", f"{i - 1}.qed", "-F", "qed",
            tmp_path / f"{i}.qed", "1M")
    open_image(tmp_path / "3.qed", Policy(max_chain_depth=3), "qemu").close()
    with pytest.raises(ImageError, match="deeper"):
        open_image(tmp_path / "3.qed", Policy(max_chain_depth=2), "qemu")


def test_size_limit(source):
    with pytest.raises(ImageError, match="exceeds"):
        open_image(convert(source, "vdi"), Policy(max_virtual_size=MiB))


def test_qemu_img_failure_carries_stderr(source):
    path = convert(source, "vhdx")
    path.write_bytes(path.read_bytes()[:200 * KiB])  # the log and metadata regions cut off
    with pytest.raises(ImageError, match="qemu-img info failed: .+"):
        open_image(path)


def test_qemu_img_timeout(source, tmp_path, monkeypatch):
    path = convert(source, "vdi")
    stuck = tmp_path / "bin" / "qemu-img"
    stuck.parent.mkdir()
    stuck.write_text("#!/bin/sh\nexec sleep 30\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stuck.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(qemu, "INFO_TIMEOUT", 0.5)
    with pytest.raises(ImageError, match="took longer"):
        open_image(path)


def test_qemu_img_missing(source, monkeypatch):
    path = convert(source, "vdi")
    monkeypatch.setenv("PATH", str(source.parent))
    with pytest.raises(ImageError, match="not installed"):
        open_image(path)
