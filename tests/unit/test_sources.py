"""Which files an import opens: each once, the file an image names never through a symlink, only
in the folders the policy allows, and read only through the descriptor that was checked
(importers.Source). What --format raw and --format auto mean for an image that names another
file. Truncated images of every native format fail as bad images."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests import tripwire
from tests.imagetools import export, walk
from thinstack.exporters import gow as gow_out
from thinstack.exporters import qcow2 as qcow2_out
from thinstack.importers import ImageError, Policy, Source, detect, open_image, qcow2

MiB = 1 << 20

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qcow2_naming(path: Path, backing: str, backing_fmt: str | None = "raw",
                 size: str = "1M") -> Path:
    """A qcow2 image whose header names `backing` (which need not exist), and its format unless
    `backing_fmt` is None (qemu-img insists on one: its extension is renamed away after)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F",
                    backing_fmt or "raw", str(path), size], check=True, capture_output=True)
    if backing_fmt is None:
        raw = bytearray(path.read_bytes())
        at = raw.index(struct.pack(">I", qcow2.EXT_BACKING_FORMAT), 72)
        raw[at:at + 4] = struct.pack(">I", 0x7E57_0000)  # an extension nobody knows: ignored
        path.write_bytes(raw)
    return path


@pytest.fixture
def loop_device():
    """Attach a file as a read-only loop device (needs root and /dev/loop-control)."""
    attached = []

    def attach(path: Path) -> Path:
        out = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], capture_output=True,
                             text=True)
        if out.returncode:
            pytest.skip(f"no loop device: {out.stderr.strip()}")
        attached.append(out.stdout.strip())
        return Path(attached[-1])

    yield attach
    for device in attached:
        subprocess.run(["losetup", "-d", device], check=False)


# -- finding 3: --format raw means raw, --format auto follows nothing --------------------------

@needs_qemu
def test_raw_backup_holding_a_qcow2_header_imports_as_its_bytes(tmp_path):
    """A guest wrote a qcow2 header naming its neighbour's backup into its own disk: restoring
    that backup with --format raw gives back those bytes, and never opens the neighbour."""
    neighbour = tmp_path / "vm2.raw"
    neighbour.write_bytes(b"vm2's secrets " * 1000)
    backup = qcow2_naming(tmp_path / "vm1.raw", "vm2.raw", size="8M")
    on_disk = backup.read_bytes()
    with tripwire.watch([neighbour]) as wire:
        image = open_image(backup, Policy(), "raw")
        try:
            assert image.format == "raw"
            assert image.virtual_size == len(on_disk)
            assert image.read(0, len(on_disk)) == on_disk
        finally:
            image.close()
    assert wire.opened == []


@needs_qemu
@pytest.mark.parametrize("backing_fmt", ["raw", None])
def test_auto_refuses_a_qcow2_naming_a_backing_file(tmp_path, backing_fmt):
    neighbour = tmp_path / "vm2.raw"
    neighbour.write_bytes(bytes(MiB))
    image = qcow2_naming(tmp_path / "vm1.img", "vm2.raw", backing_fmt)
    with tripwire.watch([neighbour]) as wire:
        with pytest.raises(ImageError) as info:
            open_image(image)
    assert wire.opened == []
    message = str(info.value)
    assert "\n" not in message
    assert "vm2.raw" in message and "--format qcow2" in message and "--format raw" in message
    # Named, the format is the operator's word: the chain is followed.
    open_image(image, Policy(), "qcow2").close()


def test_auto_refuses_a_differencing_vhd(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    export(base, MiB, [("w", 0, b"b")])
    export(child, MiB, [("w", 512, b"c")], parent=base)
    with pytest.raises(ImageError, match=r"names a parent .*\(--format vhd\)"):
        open_image(child)
    image = open_image(child, Policy(), "vhd")
    assert image.read(0, 513) == b"b" + bytes(511) + b"c"
    image.close()


@needs_qemu
def test_auto_refuses_an_external_data_file(tmp_path):
    image = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=x.data",
                    image.name, "1M"], check=True, cwd=tmp_path)
    with pytest.raises(ImageError, match=r"names an external data file .*\(--format qcow2\)"):
        open_image(image, Policy(allow_external_data=True))
    open_image(image, Policy(allow_external_data=True), "qcow2").close()


@needs_qemu
def test_detected_backing_file_follows_no_reference(tmp_path):
    """A backing file whose format the header does not name is detected; a detected image names
    nothing further, or a guest's disk could name its neighbour's."""
    (tmp_path / "neighbour.raw").write_bytes(bytes(MiB))
    qcow2_naming(tmp_path / "guest.img", "neighbour.raw")  # what a guest wrote into its disk
    top = qcow2_naming(tmp_path / "top.qcow2", "guest.img", backing_fmt=None)
    with tripwire.watch([tmp_path / "neighbour.raw"]) as wire:
        with pytest.raises(ImageError, match="names no backing format.*rebase"):
            open_image(top, Policy(), "qcow2")
    assert wire.opened == []


def test_raw_is_never_probed(tmp_path):
    path = tmp_path / "g.img"
    writer = gow_out.create(path, MiB, format="gow3")
    writer.write(0, b"gow")
    writer.close()
    assert detect(path) == "gow"
    image = open_image(path, Policy(), "raw")
    assert image.format == "raw" and image.read(0, 8) == b"GOWDISK\0"
    image.close()


# -- finding 2: opened once, no symlink the image named, read through the checked descriptor --

@needs_qemu
def test_symlink_named_as_backing_is_refused(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    os.symlink("base.raw", tmp_path / "link.raw")  # even one pointing inside the folder
    top = qcow2_naming(tmp_path / "top.qcow2", "link.raw")
    with pytest.raises(ImageError, match="symbolic link"):
        open_image(top, Policy(), "qcow2")


def test_symlink_named_as_vhd_parent_is_refused(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    export(base, MiB, [("w", 0, b"b")])
    export(child, MiB, [("w", 512, b"c")], parent=base)
    os.rename(base, tmp_path / "real.vhd")
    os.symlink("real.vhd", base)
    with pytest.raises(ImageError, match="symbolic link"):
        open_image(child, Policy(), "vhd")


def test_operator_may_name_a_symlink(tmp_path):
    """The operator's own argument is trusted: a symlink there is followed."""
    base = tmp_path / "base.vhd"
    export(base, MiB, [("w", 0, b"b")])
    os.symlink(base, tmp_path / "named.vhd")
    image = open_image(tmp_path / "named.vhd", Policy(), "vhd")
    assert image.read(0, 1) == b"b"
    image.close()


@needs_qemu
def test_backing_file_swapped_after_opening_is_never_read(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(b"old!" * (MiB // 4))
    top = qcow2_naming(tmp_path / "top.qcow2", "base.raw")
    image = open_image(top, Policy(), "qcow2")
    try:
        (tmp_path / "evil.raw").write_bytes(b"new!" * (MiB // 4))
        os.replace(tmp_path / "evil.raw", base)
        assert image.read(0, MiB) == b"old!" * (MiB // 4)
    finally:
        image.close()


def test_vhd_parent_swapped_after_opening_is_never_read(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    export(base, MiB, [("w", 0, b"old!" * 128)])
    export(child, MiB, [("w", 4096, b"c")], parent=base)
    image = open_image(child, Policy(), "vhd")
    try:
        export(tmp_path / "evil.vhd", MiB, [("w", 0, b"new!" * 128)])
        os.replace(tmp_path / "evil.vhd", base)
        assert image.read(0, 512) == b"old!" * 128
    finally:
        image.close()


@needs_qemu
def test_file_outside_the_folder_is_never_opened(tmp_path):
    (tmp_path / "vm").mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(MiB))
    top = qcow2_naming(tmp_path / "vm" / "top.qcow2", "../secret.raw")
    with tripwire.watch([secret, tmp_path]) as wire:
        with pytest.raises(ImageError, match="outside the folders"):
            open_image(top, Policy(), "qcow2")
    assert wire.opened == []
    image = open_image(top, Policy(allowed_dirs=(tmp_path,)), "qcow2")
    image.close()


@needs_qemu
def test_loop_found_by_identity_not_by_name(tmp_path):
    """A chain back to itself through a hard link is a loop, though no two names match."""
    top = qcow2_naming(tmp_path / "a.qcow2", "b.qcow2", "qcow2")
    os.link(top, tmp_path / "b.qcow2")
    with pytest.raises(ImageError, match="loops"):
        open_image(top, Policy(), "qcow2")


# -- finding 4: no implicit folder for a block device, nor under /dev, /proc, /sys -------------

@needs_qemu
def test_block_device_source_names_nothing_implicitly(tmp_path, loop_device):
    image = qcow2_naming(tmp_path / "upload.qcow2", "null")  # /dev/null beside the device
    os.truncate(image, MiB)  # whole sectors
    device = loop_device(image)
    with pytest.raises(ImageError, match="outside the folders .*none: an image on a block device"):
        open_image(device, Policy(), "qcow2")
    source = Source.open(device)
    assert not source.regular and Policy().roots(source) == ()
    assert Policy(allowed_dirs=(tmp_path,)).roots(source) == (tmp_path.resolve(),)
    source.close()


@needs_qemu
@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="needs a writable /dev/shm")
def test_file_under_dev_names_nothing_beside_it(tmp_path):
    folder = Path(os.path.realpath("/dev/shm"))
    name = f"thinstack-test-{os.getpid()}"
    base, top = folder / f"{name}.raw", folder / f"{name}.qcow2"
    try:
        base.write_bytes(bytes(MiB))
        qcow2_naming(top, base.name)
        with pytest.raises(ImageError, match="outside the folders"):
            open_image(top, Policy(), "qcow2")
        open_image(top, Policy(allowed_dirs=(folder,)), "qcow2").close()
    finally:
        base.unlink(missing_ok=True)
        top.unlink(missing_ok=True)


def test_block_device_source_is_all_data(tmp_path, loop_device):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(MiB)  # all hole as a file
    image = open_image(loop_device(path), Policy(), "raw")
    assert [(e.offset, e.length, e.kind.value) for e in image.extents()] == [(0, MiB, "data")]
    image.close()


# -- finding 13d: truncated images of every native format are bad images --------------------

def _samples(tmp_path: Path) -> list[tuple[Path, str]]:
    out = []
    for name, create, fmt, options in (("d.vhd", None, "vhd", {}),
                                       ("f.vhd", None, "vhd", {"format": "vhd-fixed"}),
                                       ("g.gow", gow_out.create, "gow", {"format": "gow3"}),
                                       ("q.qcow2", qcow2_out.create, "qcow2", {})):
        path = tmp_path / name
        kwargs = dict(options)
        if create is not None:
            kwargs["create"] = create
        export(path, 3 * MiB, [("w", 1000, b"x" * 70000), ("w", 2 * MiB + 5, b"y" * 9000)],
               **kwargs)
        out.append((path, fmt))
    return out


def test_truncated_images_are_bad_images(tmp_path):
    for path, fmt in _samples(tmp_path):
        whole = path.read_bytes()
        cut = tmp_path / f"cut-{path.name}"
        for keep in sorted({0, 1, 63, 64, 511, 512, 513, 1024, 1536, 4096, 65536, 70000,
                            len(whole) // 2, len(whole) - 513, len(whole) - 512,
                            len(whole) - 511, len(whole) - 1}):
            cut.write_bytes(whole[:keep])
            try:
                image = open_image(cut, Policy(), fmt)
            except ImageError:
                continue
            try:
                walk(image)
                image.read(0, image.virtual_size)
            except ImageError:
                pass
            finally:
                image.close()


def test_read_outside_the_disk_is_a_bad_image(tmp_path):
    for path, fmt in _samples(tmp_path):
        image = open_image(path, Policy(), fmt)
        try:
            with pytest.raises(ImageError, match="outside"):
                image.read(image.virtual_size - 1, 2)
        finally:
            image.close()


def test_image_shrunk_while_open_is_a_bad_image(tmp_path):
    for path, fmt in _samples(tmp_path):
        image = open_image(path, Policy(), fmt)
        try:
            os.truncate(path, 4096)
            with pytest.raises(ImageError):
                walk(image)
        finally:
            image.close()
