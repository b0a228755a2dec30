"""Raw images: the file system's map is the allocation map, and the exporter leaves holes."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from thinstack.errors import ThinstackError
from thinstack.exporters import raw as writer
from thinstack.extents import Extent, Kind
from thinstack.importers import ImageError, open_image, raw

KiB, MiB = 1 << 10, 1 << 20


def sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


def seek_data_works(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    except OSError:
        return False
    finally:
        os.close(fd)


def test_sparse_file_extents(tmp_path):
    path = sparse(tmp_path / "disk.img", 4 * MiB,
                  {64 * KiB: b"a" * 4096, 1 * MiB: b"b" * 100 * KiB, 4 * MiB - 10: b"c" * 10})
    if not seek_data_works(path):
        pytest.skip("this file system does not report holes")
    image = open_image(path)
    assert image.format == "raw" and image.virtual_size == 4 * MiB
    extents = list(image.extents())
    assert sum(e.length for e in extents) == 4 * MiB
    assert [e.offset for e in extents] == sorted(e.offset for e in extents)
    data = [e for e in extents if e.kind is Kind.DATA]
    # File systems allocate whole blocks: each piece is inside a DATA extent, which is small.
    for offset, length in ((64 * KiB, 4096), (MiB, 100 * KiB), (4 * MiB - 10, 10)):
        assert any(e.offset <= offset and offset + length <= e.end for e in data)
    assert sum(e.length for e in data) <= 200 * KiB
    assert image.read(MiB, 3) == b"bbb"
    assert image.read(4 * MiB - 10, 10) == b"c" * 10
    image.close()


def test_fully_sparse_and_empty(tmp_path):
    image = open_image(sparse(tmp_path / "hole.img", MiB, {}))
    if seek_data_works(tmp_path / "hole.img"):
        assert list(image.extents()) == [Extent(0, MiB, Kind.HOLE)]
    image.close()
    image = open_image(sparse(tmp_path / "empty.img", 0, {}))
    assert image.virtual_size == 0 and list(image.extents()) == []
    image.close()


def test_no_seek_data_means_all_data(tmp_path, monkeypatch):
    path = sparse(tmp_path / "disk.img", MiB, {0: b"x"})
    image = raw.open(path)

    def unsupported(fd, pos, how):
        raise OSError(errno.EINVAL, "no SEEK_DATA")

    monkeypatch.setattr(raw.os, "lseek", unsupported)
    assert list(image.extents()) == [Extent(0, MiB, Kind.DATA)]
    image.close()


def test_read_outside_refused(tmp_path):
    image = open_image(sparse(tmp_path / "disk.img", MiB, {}))
    with pytest.raises(ImageError):
        image.read(MiB - 1, 2)
    image.close()


@pytest.mark.parametrize("path", ["/dev/null", "dir"])
def test_not_a_file_refused(tmp_path, path):
    target = Path(path) if path.startswith("/") else tmp_path / path
    if not target.exists():
        target.mkdir()
    with pytest.raises(ImageError, match="not a regular file or block device"):
        open_image(target)


def test_anything_probes_as_raw():
    assert raw.probe(b"", b"") and raw.probe(os.urandom(4096), b"")


# -- the exporter --------------------------------------------------------------------------

def test_export_sparse(tmp_path):
    size = 8 * MiB + 100
    rng = random.Random(1)
    data = bytearray(size)
    data[100:5000] = rng.randbytes(4900)
    data[3 * MiB:3 * MiB + 200 * KiB] = rng.randbytes(200 * KiB)
    data[size - 50:] = b"e" * 50
    dst = tmp_path / "out.raw"
    w = writer.create(dst, size)
    w.write(0, bytes(data[:MiB]))  # a megabyte mostly of zeros: only the non-zero chunk lands
    w.mark_zero(MiB, 2 * MiB)
    w.write(3 * MiB, bytes(data[3 * MiB:4 * MiB]))
    w.write(size - 50, bytes(data[size - 50:]))
    assert not dst.exists()  # nothing at the destination before close
    w.close()
    assert dst.read_bytes() == bytes(data)
    assert dst.stat().st_blocks * 512 <= 512 * KiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.raw"]


def test_export_abort_keeps_destination(tmp_path):
    dst = tmp_path / "out.raw"
    dst.write_bytes(b"old")
    w = writer.create(dst, MiB)
    w.write(0, b"new")
    with pytest.raises(ThinstackError, match="outside the disk"):
        w.write(MiB - 1, b"xx")
    w.abort()
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.raw"]


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")
def test_round_trip_through_qcow2(tmp_path):
    """raw -> importer -> raw exporter gives what qemu-img reads."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(src), "2M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 512k 100k", str(src)],
                   check=True, capture_output=True)
    image = open_image(src)
    dst = tmp_path / "out.raw"
    w = writer.create(dst, image.virtual_size)
    for ext in image.extents():
        if ext.kind is Kind.DATA:
            w.write(ext.offset, image.read(ext.offset, ext.length))
        else:
            w.mark_zero(ext.offset, ext.length)
    w.close()
    image.close()
    expected = bytearray(2 * MiB)
    expected[512 * KiB:612 * KiB] = b"\x42" * 100 * KiB
    assert dst.read_bytes() == bytes(expected)
