"""Images read through qemu-img never make it open a file thinstack did not pin: each attack
below is refused or reads only the pinned file, and a tripwire file outside the allowed folders
is never opened by anyone (inotify sees qemu-img's opens too)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests import tripwire
from thinstack.importers import DEFAULT_POLICY, ImageError, Policy, open_image, qemu

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")

MiB = 1 << 20
SECRET = b"\x5e" * MiB


def run(*args) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    """(the image's folder, a folder outside it holding the tripwire secret.bin)."""
    vm, outside = tmp_path / "vm", tmp_path / "outside"
    vm.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    return vm, outside


def content(path: Path, policy: Policy = DEFAULT_POLICY) -> bytes:
    image = open_image(path, policy, "qemu")
    try:
        return image.read(0, image.virtual_size)
    finally:
        image.close()


def refused(path: Path, outside: Path, words: str, policy: Policy = DEFAULT_POLICY) -> None:
    with tripwire.watch([outside]) as wire:
        with pytest.raises(ImageError, match=words):
            content(path, policy)
    assert wire.opened == []


def descriptor(extent_line: str) -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            "createType=\"monolithicFlat\"\n\n# Extent description\n"
            f"{extent_line}\n\n# The Disk Data Base\n#DDB\n")


def kdmv_embedded(path: Path, extent_line: str) -> Path:
    """A binary sparse VMDK with capacity 0 whose embedded descriptor names the extents."""
    header = struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 0, 128, 1, 20)
    text = descriptor(extent_line).encode()
    path.write_bytes(header.ljust(512, b"\0") + text.ljust(20 * 512, b"\0"))
    return path


# --- the attacks as they were reported ---------------------------------------------------------

def test_qemu_alone_would_read_the_secret(dirs):
    """The premise: qemu-img itself follows both hostile descriptors to the host file."""
    vm, outside = dirs
    secret = outside / "secret.bin"
    for path in (kdmv_embedded(vm / "bin.vmdk", f'RW 2048 FLAT "{secret}" 0'),
                 vm / "plus.vmdk"):
        if path.name == "plus.vmdk":
            path.write_text(descriptor(f'RW +2048 FLAT "{secret}" 0'))
        run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", path, vm / "out.raw")
        assert (vm / "out.raw").read_bytes() == SECRET


@pytest.mark.parametrize("kind", ["binary", "text"])
@pytest.mark.parametrize("name, words", [
    ("{secret}", "absolute"),
    ("../outside/secret.bin", r"'\.\.'"),
    ("sub/../../outside/secret.bin", r"'\.\.'"),
    ("link.bin", "symbolic link"),
    ("nbd:localhost:10809", "protocol"),
    ("x" * 600, "longer than 511"),
])
def test_extent_outside_refused(dirs, kind, name, words):
    vm, outside = dirs
    (vm / "link.bin").symlink_to(outside / "secret.bin")
    line = f'RW +2048 FLAT "{name.format(secret=outside / "secret.bin")}" 0'
    if kind == "binary":
        path = kdmv_embedded(vm / "disk.vmdk", line)
    else:
        path = vm / "disk.vmdk"
        path.write_text(descriptor(line))
    refused(path, outside, words)


@pytest.mark.parametrize("line", [
    'RW +2048 FLAT "flat.bin" 0',  # sector count as qemu's sscanf reads it
    'RW 2048 FLAT "./sub//flat.bin" 0',
])
def test_extent_inside_read_through_the_pin(dirs, line):
    vm, outside = dirs
    (vm / "sub").mkdir()
    (vm / "sub" / "flat.bin").write_bytes(b"\x42" * MiB)
    (vm / "flat.bin").write_bytes(b"\x42" * MiB)
    for path in (kdmv_embedded(vm / "bin.vmdk", line), vm / "text.vmdk"):
        if path.name == "text.vmdk":
            path.write_text(descriptor(line))
        with tripwire.watch([outside]) as wire:
            assert content(path) == b"\x42" * MiB
        assert wire.opened == []


def test_extent_swapped_after_check_reads_the_pinned_one(dirs):
    vm, outside = dirs
    (vm / "flat.bin").write_bytes(b"\x11" * MiB)
    path = vm / "disk.vmdk"
    path.write_text(descriptor('RW 2048 FLAT "flat.bin" 0'))
    image = open_image(path, Policy(), "qemu")
    try:
        (vm / "flat.bin").rename(vm / "old.bin")
        (vm / "flat.bin").symlink_to(outside / "secret.bin")
        with tripwire.watch([outside]) as wire:
            assert image.read(0, MiB) == b"\x11" * MiB
            assert [e.kind.name for e in image.extents()] == ["DATA"]
        assert wire.opened == []
    finally:
        image.close()


def test_extent_clashing_with_the_descriptor_link(dirs):
    vm, outside = dirs
    (vm / "image").write_bytes(bytes(MiB))
    path = vm / "disk.vmdk"
    path.write_text(descriptor('RW 2048 FLAT "image" 0'))
    refused(path, outside, "clashes")


# --- backing files -----------------------------------------------------------------------------

def child_of(vm: Path, fmt: str, backing: str, backing_fmt: str = "raw") -> Path:
    child = vm / f"child.{fmt}"
    run("qemu-img", "create", "-q", "-u", "-f", fmt, "-b", backing, "-F", backing_fmt, child, "1M")
    return child


@pytest.mark.parametrize("fmt", ["qed", "qcow", "vmdk"])
@pytest.mark.parametrize("backing, words", [
    ("../outside/secret.bin", "outside the folders"),
    ("{secret}", "outside the folders"),
    ("link.bin", "symbolic link"),
    ('json:{"driver": "raw", "file": {"driver": "file", "filename": "{secret}"}}', "protocol"),
    ("nbd:localhost:10809", "protocol"),
])
def test_backing_outside_refused(dirs, fmt, backing, words):
    vm, outside = dirs
    (vm / "link.bin").symlink_to(outside / "secret.bin")
    secret = str(outside / "secret.bin")
    name = backing.replace("{secret}", secret)
    if fmt == "vmdk":  # qemu-img rebase cannot write a VMDK's parent: rewrite its descriptor
        child = vm / "child.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", vm / "base.vmdk", "1M")
        run("qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
        data = bytearray(child.read_bytes())
        desc_at, desc_size = (v * 512 for v in struct.unpack_from("<QQ", data, 28))
        text = bytes(data[desc_at:desc_at + desc_size]).rstrip(b"\0")
        hint = b'parentFileNameHint="base.vmdk"'
        assert hint in text
        text = text.replace(hint, f'parentFileNameHint="{name}"'.encode())
        data[desc_at:desc_at + desc_size] = text.ljust(desc_size, b"\0")
        child.write_bytes(data)
    else:
        child = child_of(vm, fmt, name)
    refused(child, outside, words)


def test_backing_swapped_after_check_reads_the_pinned_one(dirs):
    vm, outside = dirs
    (vm / "base.raw").write_bytes(b"\x22" * MiB)
    child = child_of(vm, "qed", "base.raw")
    image = open_image(child, Policy(), "qemu")
    try:
        (vm / "base.raw").rename(vm / "old.raw")
        (vm / "base.raw").symlink_to(outside / "secret.bin")
        with tripwire.watch([outside]) as wire:
            assert image.read(0, MiB) == b"\x22" * MiB
        assert wire.opened == []
    finally:
        image.close()


def test_backing_named_like_an_option(dirs, monkeypatch):
    """13e: a relative backing name starting with '-' never reaches qemu-img as an argument."""
    vm, outside = dirs
    (vm / "-U").write_bytes(b"\x33" * MiB)
    child_of(vm, "qed", "-U")
    monkeypatch.chdir(vm)
    with tripwire.watch([outside]) as wire:
        assert content(Path("child.qed")) == b"\x33" * MiB
    assert wire.opened == []


def test_backing_in_the_private_folder_is_not_followed(dirs):
    """A header naming our own link folder layout gains nothing: names resolve from the
    image's real folder, and the link folder holds only what was pinned."""
    vm, outside = dirs
    child = child_of(vm, "qed", "1/image")
    refused(child, outside, "no such file")


def test_qcow2_backing_with_data_file_refused(dirs):
    vm, outside = dirs
    base = vm / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"data_file={outside / 'secret.bin'},data_file_raw=on", base, "1M")
    child = child_of(vm, "qed", "base.qcow2", "qcow2")
    refused(child, outside, "external data file")


# --- the pure parts ------------------------------------------------------------------------------

def test_descriptor_extents_lenient():
    text = (b'# "not.me"\nRW +8 FLAT "a.bin" 0\n  RDONLY 0x10 SPARSE "b\r.bin"\n'
            b'ddb.adapterType = "ide"\nparentFileNameHint="p.vmdk"\nNOACCESS 8 ZERO\n'
            b'RW 8 VMFS "c.bin\n')
    assert qemu.descriptor_extents(text) == ["a.bin", "b", "c.bin"]


def test_opened_files():
    info = {"filename": "/p/0/image", "backing-filename": "/etc/x",
            "full-backing-filename": "/etc/x",
            "format-specific": {"data": {"extents": [{"filename": "/p/0/a"}],
                                         "data-file": "/etc/y"}},
            "children": [{"filename": 'json:{"file": {"filename": "/etc/z"}}'}]}
    assert qemu.opened_files(info) == {"/p/0/image", "/p/0/a", "/etc/y", "/etc/z"}


@pytest.mark.parametrize("name, ok", [("a", True), ("./a//b", True), ("/a", False),
                                      ("a/../b", False), ("image", False), (".", False)])
def test_link_name(name, ok):
    if ok:
        assert str(qemu.link_name(name, Path("d"))) in ("a", "a/b")
    else:
        with pytest.raises(ImageError):
            qemu.link_name(name, Path("d"))


def test_corrupt_tables_refused_by_qemu_img_check(dirs):
    """Finding 14 for formats read through qemu: qemu-img check (on the pinned spec) decides."""
    vm, outside = dirs
    path = vm / "disk.vdi"
    run("qemu-img", "create", "-q", "-f", "vdi", path, "1M")
    data = bytearray(path.read_bytes())
    bmap = struct.unpack_from("<I", data, 0x154)[0]  # offset of the block map
    struct.pack_into("<I", data, bmap, 0x00FFFFFF)  # block 0 mapped far past the end
    path.write_bytes(data)
    refused(path, outside, "qemu-img check finds the image corrupt")
