"""Formats that QEMU reads and thinstack does not parse itself (VMDK, VHDX, VDI, QED, qcow v1,
Parallels), read through qemu-img: `info` for the header, `map` for the allocation, and one
`convert` to a sparse temporary raw file for the bytes.

qemu-img opens whatever files an image names, so every name is checked before qemu-img sees the
image: a VMDK descriptor's extent files are read from the descriptor by us, and the backing
chain is walked one `qemu-img info` at a time (info never opens a backing file).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import sh

from thinstack.extents import Extent, Kind, coalesce

from . import ImageError, Policy, Source, check_source
from .qcow2 import reference

INFO_TIMEOUT = 60
MAP_TIMEOUT = 600
# A convert writes every allocated byte; allow for a slow disk (32 MiB/s) on top of a minimum.
CONVERT_TIMEOUT = 300
CONVERT_BYTES_PER_SECOND = 32 << 20
MAX_DESCRIPTOR = 64 << 10

_MAGICS = (
    (0, b"KDMV", "vmdk"),  # VMDK4 sparse extent (monolithic or stream-optimized)
    (0, b"COWD", "vmdk"),  # VMDK3 (ESX) sparse extent
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"QED\0", "qed"),
    (0, b"QFI\xfb\0\0\0\1", "qcow"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)
# ACCESS SECTORS TYPE "FILE" [OFFSET]; ZERO extents name no file.
_EXTENT_LINE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]*)"', re.M)
_PARENT_HINT = re.compile(rb'^\s*parentFileNameHint\s*=\s*"([^"]*)"', re.M)


def qemu_format(head: bytes) -> str | None:
    for offset, magic, name in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def probe(head: bytes, tail: bytes) -> bool:
    return qemu_format(head) is not None


def open(path: str | os.PathLike, policy: Policy = Policy()) -> QemuImage:
    path = Path(path)
    check_source(path)
    with path.open("rb") as f:
        fmt = qemu_format(f.read(4096))
    if fmt is None:
        raise ImageError(path, "not a format this driver hands to qemu-img")
    info = _inspect(path, fmt, policy, ())
    if info["virtual-size"] > policy.max_virtual_size:
        raise ImageError(path, f"virtual size {info['virtual-size']} exceeds the policy's "
                               f"{policy.max_virtual_size}")
    return QemuImage(path, fmt, info["virtual-size"])


class QemuImage:
    format = "qemu"

    def __init__(self, path: Path, qemu_format: str, virtual_size: int):
        self.path = path
        self.qemu_format = qemu_format
        self.virtual_size = virtual_size
        self._raw: Source | None = None

    def extents(self) -> Iterator[Extent]:
        with tempfile.TemporaryFile() as out:
            _qemu_img(self.path, MAP_TIMEOUT, "map", "--output=json", "-f", self.qemu_format,
                      str(self.path), _out=out)
            out.seek(0)
            # One JSON object a line, inside a list: '[{...},' ... '{...}]'.
            found = [_extent(json.loads(line.strip().lstrip(b"[").rstrip(b"]").rstrip(b",")))
                     for line in out if line.strip() not in (b"", b"[", b"]")]
        return coalesce(found)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the virtual "
                                        f"size {self.virtual_size}")
        if self._raw is None:
            self._raw = self._convert()
        return self._raw.read_at(offset, length, "converted data")

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def _convert(self) -> Source:
        """The whole image as a sparse raw file that exists only as an open descriptor: one
        convert is far faster than a qemu-img run per read, and nothing is left behind."""
        with tempfile.TemporaryDirectory(prefix="thinstack-qemu-") as tmp:
            target = Path(tmp) / "image.raw"
            timeout = CONVERT_TIMEOUT + self.virtual_size // CONVERT_BYTES_PER_SECOND
            _qemu_img(self.path, timeout, "convert", "-f", self.qemu_format, "-O", "raw",
                      str(self.path), str(target))
            raw = Source(target)
        if raw.size < self.virtual_size:
            raw.close()
            raise ImageError(self.path, f"qemu-img convert produced {raw.size} bytes, expected "
                                        f"{self.virtual_size}")
        return raw


def _extent(entry: dict) -> Extent:
    if entry.get("zero"):
        kind = Kind.ZERO if entry.get("present") else Kind.HOLE
    elif entry.get("data"):
        kind = Kind.DATA
    else:
        kind = Kind.HOLE
    return Extent(entry["start"], entry["length"], kind)


def _inspect(path: Path, fmt: str | None, policy: Policy, chain: tuple[Path, ...]) -> dict:
    """`qemu-img info` of one image after checking the files it names, then the same for its
    backing file, so qemu-img never opens a file the policy refuses."""
    real = path.resolve()
    if real in chain:
        raise ImageError(path, "the backing chain loops back to this image")
    _check_descriptor(path, policy)
    args = ("-f", fmt) if fmt else ()
    info = json.loads(_qemu_img(path, INFO_TIMEOUT, "info", "--output=json", *args, str(path)))
    specific = info.get("format-specific", {}).get("data", {})
    if "data-file" in specific and not policy.allow_external_data:
        raise ImageError(path, f"uses an external data file ({specific['data-file']}), which "
                               f"the policy refuses")
    backing = info.get("backing-filename")
    if backing:
        target = reference(path, backing, "backing file", policy)
        if len(chain) >= policy.max_chain_depth:
            raise ImageError(path, f"backing chain is deeper than the policy allows (at backing "
                                   f"file {backing})")
        if not target.exists():
            raise ImageError(path, f"backing file {backing} not found (needed by {path.name})")
        _inspect(target, info.get("backing-filename-format"), policy, (*chain, real))
    return info


def _check_descriptor(path: Path, policy: Policy) -> None:
    """A VMDK descriptor names its extent files and maybe a parent; check them all."""
    with path.open("rb") as f:
        text = f.read(MAX_DESCRIPTOR + 1)
    if not text.startswith(b"# Disk DescriptorFile"):
        return
    if len(text) > MAX_DESCRIPTOR:
        raise ImageError(path, f"VMDK descriptor larger than {MAX_DESCRIPTOR} bytes")
    for name in _EXTENT_LINE.findall(text):
        target = reference(path, os.fsdecode(name), "VMDK extent", policy)
        check_source(target)
    for name in _PARENT_HINT.findall(text):
        reference(path, os.fsdecode(name), "VMDK parent", policy)


def _qemu_img(path: Path, timeout: float, *args: str, **options) -> str:
    """Run qemu-img (messages in English whatever the locale); any failure is an ImageError."""
    try:
        return str(sh.Command("qemu-img")(*args, _timeout=timeout,
                                             _env={**os.environ, "LC_ALL": "C"}, **options))
    except sh.CommandNotFound:
        raise ImageError(path, "qemu-img is not installed (Debian: qemu-utils)") from None
    except sh.TimeoutException:
        raise ImageError(path, f"qemu-img {args[0]} took longer than {timeout} s") from None
    except sh.ErrorReturnCode as e:
        message = e.stderr.decode(errors="replace").strip() or f"exit status {e.exit_code}"
        raise ImageError(path, f"qemu-img {args[0]} failed: {message}") from None
