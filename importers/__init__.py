"""Image importers: one module per format, each exposing `probe(head, tail) -> bool` and
`open(path, policy) -> Image`, the way QEMU has one block driver per format.

An Image describes its content as extents (see thinstack.extents) from the format's own
allocation map, and reads only DATA extents. Parents and backing files are resolved inside the
driver, so the extents an Image yields are the merged view of its whole chain.
"""

from __future__ import annotations

import errno
import importlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from thinstack.extents import Extent

# Order matters for detection: formats with a header magic first, then VHD (recognised by its
# footer, which any file could end with), raw last because it matches anything.
FORMATS = ("qcow2", "gow", "qemu", "vhd", "raw")


class ImageError(Exception):
    """An image that cannot be imported: malformed, hostile, unsupported, or missing a parent."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class Policy:
    """What an import may touch and how large anything may be."""

    # Directories parents/backing files may live in, besides the child's own directory.
    allowed_dirs: tuple[Path, ...] = ()
    max_virtual_size: int = 64 << 40
    max_chain_depth: int = 16
    allow_external_data: bool = False
    # Upper bound on the bytes any single metadata table may occupy in memory.
    max_table_bytes: int = 256 << 20

    def may_open(self, candidate: Path, child: Path) -> bool:
        """A parent must sit in the child's directory or one explicitly allowed (after symlinks)."""
        real = candidate.resolve()
        roots = (child.resolve().parent, *(d.resolve() for d in self.allowed_dirs))
        return any(real.is_relative_to(root) for root in roots)


class Image(Protocol):
    path: Path
    format: str
    virtual_size: int

    def extents(self) -> Iterator[Extent]:
        """Extents covering [0, virtual_size) in order, from the allocation map."""

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of any range in [0, virtual_size); holes read as zeros."""

    def close(self) -> None: ...


def driver(name: str):
    if name not in FORMATS:
        raise ValueError(f"unknown image format {name!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(f"{__name__}.{name}")


def check_source(path: Path) -> None:
    """Refuse what is not a regular file or block device before any driver reads it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(path, "not a regular file or block device")


def detect(path: Path) -> str:
    check_source(path)
    with open(path, "rb") as f:
        head = f.read(4096)
        try:
            f.seek(-512, os.SEEK_END)
            tail = f.read(512)
        except OSError:
            tail = b""
    for name in FORMATS:
        if driver(name).probe(head, tail):
            return name
    return "raw"


def open_image(path: str | os.PathLike, policy: Policy = Policy(), format: str = "auto") -> Image:
    path = Path(path)
    found = detect(path)
    if format != "auto" and format != found:
        raise ImageError(path, f"claimed format {format!r} but the content is {found!r}")
    return driver(found).open(path, policy)


class Source:
    """An image file opened for bounded, checked reads: every read names what it reads, so a
    truncated or lying image fails with a message saying which structure ran past the end."""

    def __init__(self, path: Path):
        check_source(path)
        self.path = path
        self.file = open(path, "rb", buffering=0)
        self.size = self.file.seek(0, os.SEEK_END)

    def read_at(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(self.path, f"{what} at offset {offset} (+{length}) lies past the end "
                                        f"of the file ({self.size} bytes): truncated or corrupt")
        data = os.pread(self.file.fileno(), length, offset)
        if len(data) != length:
            raise ImageError(self.path, f"short read of {what} at offset {offset}")
        return data

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Split [start, end) of the file into (start, end, holds_data) runs, from the file
        system's own map (SEEK_DATA/SEEK_HOLE): holes of a sparse file read as zeros and need
        not be read at all. All data where the file system cannot tell, or on a block device."""
        fd = self.file.fileno()
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            yield start, end, True
            return
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no SEEK_DATA here
                    yield pos, end, True
                    return
                data = end  # ENXIO: nothing but hole from pos on
            if data > pos:
                yield pos, min(data, end), False
            if data >= end:
                return
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            yield data, min(hole, end), True
            pos = hole

    def close(self) -> None:
        self.file.close()
