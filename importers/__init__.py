"""Image importers: one module per format, each exposing `probe(head, tail) -> bool` and
`open(source, policy) -> Image`, the way QEMU has one block driver per format.

An Image describes its content as extents (see thinstack.extents) from the format's own
allocation map, and reads only DATA extents. Parents and backing files are resolved inside the
driver, so the extents an Image yields are the merged view of its whole chain.

Every file is opened once, as a `Source`, and read only through that descriptor. The image the
operator names is opened as named; a file that an image names (a parent, a backing file, an
extent, a data file) is opened with `Source.named`: never through a symlink that the image
named, never as anything but a regular file or block device, and only where the policy allows,
checked on the open descriptor itself, so nothing swapped in after the check is ever read.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import importlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from thinstack.errors import BadImage
from thinstack.extents import Extent

# Order matters for detection: formats with a header magic first, then VHD (recognised by its
# footer, which any file could end with), raw last because it matches anything.
FORMATS = ("qcow2", "gow", "qemu", "vhd", "raw")
# A file an image names is never looked for here unless the operator allows it explicitly.
NEVER_IMPLICIT = (Path("/dev"), Path("/proc"), Path("/sys"))


class ImageError(BadImage):
    """An image that cannot be imported: malformed, hostile, unsupported, or missing a parent."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class MissingFile(ImageError):
    """A file that does not exist: a driver with several candidate names tries the next one."""


class ReferenceRefused(ImageError):
    """An image names another file, and the policy follows no reference (its format was
    detected, not named): `open_image` turns this into a line saying which format to name."""

    def __init__(self, path: str | os.PathLike, what: str, name: str):
        self.what = what
        self.name = name
        super().__init__(path, f"names {_a(what)} ({name!r}); an image whose format was detected "
                               f"follows no reference: name its format to import it with its "
                               f"{what}, or --format raw for its bytes as they are")


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
    # Whether an image may name other files at all (backing and parent images, VMDK extents,
    # data files). False for a format that was detected rather than named by the operator: a
    # guest can write any header into a raw disk, and must not make it read a neighbour's file.
    follow_references: bool = True

    def roots(self, child: Source) -> tuple[Path, ...]:
        """The folders a file named by `child` may lie in: the child's own folder (unless the
        child is a block device, or its folder lies under /dev, /proc or /sys), and those the
        operator allowed."""
        roots = [Path(os.path.realpath(d)) for d in self.allowed_dirs]
        own = child.real.parent
        if child.regular and not any(own.is_relative_to(p) for p in NEVER_IMPLICIT):
            roots.insert(0, own)
        return tuple(roots)


DEFAULT_POLICY = Policy()  # frozen: one instance serves every default


class Image(Protocol):
    path: Path
    format: str
    virtual_size: int

    def extents(self) -> Iterator[Extent]:
        """Extents covering [0, virtual_size) in order, from the allocation map."""

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Bytes of any range in [0, virtual_size); holes read as zeros."""

    def close(self) -> None: ...


@runtime_checkable
class Converting(Image, Protocol):
    """An image that writes itself into a device (qemu-img convert), rather than being read."""

    def convert_into(self, path: str) -> None: ...


def driver(name: str):
    if name not in FORMATS:
        raise ValueError(f"unknown image format {name!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(f"{__name__}.{name}")


class Source:
    """A file opened once, for bounded, checked reads: every read names what it reads, so a
    truncated or lying image fails with a message saying which structure ran past the end.

    `Source.open(path)` opens what the operator named; `Source.named(...)` what an image names.
    `real` is the path of the open descriptor as the kernel has it (not the name it was opened
    by), and `identity` its (device, inode): what loop detection and policy checks compare."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(path, "not a regular file or block device")
            # Opened without blocking (a FIFO swapped in must not hang us); reads may block.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            self.regular = stat.S_ISREG(st.st_mode)
            self.identity = (st.st_dev, st.st_ino) if self.regular else (st.st_rdev, 0)
            self.real = Path(os.readlink(f"/proc/self/fd/{fd}"))
            self.size = os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        self.file = os.fdopen(fd, "rb", buffering=0, closefd=True)
        self._known_data = (0, 0)  # the last range SEEK_DATA/SEEK_HOLE found to hold data

    @classmethod
    def open(cls, path: str | os.PathLike) -> Source:
        """The image the operator named (a trusted argument: a symlink there is followed)."""
        path = Path(path)
        return cls(path, _open(path, 0))

    @classmethod
    def of(cls, target: str | os.PathLike | Source) -> Source:
        return target if isinstance(target, Source) else cls.open(target)

    @classmethod
    def named(cls, name: str, by: Source, what: str, policy: Policy) -> Source:
        """The file `by` names as its `what` (e.g. "backing file"): relative to `by`'s folder,
        not through a symlink, a regular file or block device, inside policy.roots(by)."""
        if not policy.follow_references:
            raise ReferenceRefused(by.path, what, name)
        if not name:
            raise ImageError(by.path, f"names an empty {what}")
        if "\0" in name:
            raise ImageError(by.path, f"{what} name contains a NUL byte")
        # A colon before the first slash is how QEMU spells a protocol (nbd:, http://,
        # json:{...}); thinstack never follows one.
        if ":" in name.split("/", 1)[0]:
            raise ImageError(by.path, f"{what} {name!r} is a protocol or json: name, not a file")
        path = Path(name) if os.path.isabs(name) else by.real.parent / name
        if path.name in ("", ".", ".."):
            raise ImageError(by.path, f"{what} {name!r} names a folder, not a file")
        roots = policy.roots(by)
        where = ", ".join(map(str, roots)) or ("none: an image on a block device or under "
                                                "/dev, /proc or /sys has no folder of its own")

        def outside(real: Path) -> ImageError:
            return ImageError(by.path, f"{what} {name} is {real}, outside the folders an image "
                                       f"may name files in ({where}); allow its folder with "
                                       f"--allow-dir if it is trusted")

        # The folder is pinned and checked first, and the file opened inside it without
        # following a symlink: so no file outside the allowed folders is ever opened, even by a
        # race, and what is checked is what is read.
        try:
            folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingFile(by.path, f"{what} {name}: no such file") from None
        except OSError as e:
            raise ImageError(by.path, f"{what} {name}: cannot open its folder: "
                                      f"{e.strerror}") from None
        try:
            real_folder = Path(os.readlink(f"/proc/self/fd/{folder}"))
            if not _inside(real_folder, roots):
                raise outside(real_folder / path.name)
            try:
                fd = _open(Path(path.name), os.O_NOFOLLOW, folder)
            except ImageError as e:
                raise type(e)(by.path, f"{what} {name}: {e.message}") from None
        finally:
            os.close(folder)
        source = cls(path, fd)
        if not _inside(source.real.parent, roots):  # cannot happen; checked again all the same
            source.close()
            raise outside(source.real)
        return source

    def read_at(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageError(self.path, f"{what} at offset {offset} (+{length}) lies past the end "
                                        f"of the file ({self.size} bytes): truncated or corrupt")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ImageError(self.path, f"short read of {what} at offset {offset}")
        return data

    def read_into(self, offset: int, view: memoryview, what: str) -> None:
        """read_at straight into `view` (a slice of the caller's buffer): no bytes object made
        and copied again, which a copy loop would pay for every byte of an image."""
        if offset < 0 or offset + len(view) > self.size:
            raise ImageError(self.path, f"{what} at offset {offset} (+{len(view)}) lies past the "
                                        f"end of the file ({self.size} bytes): truncated or "
                                        "corrupt")
        while view:
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise ImageError(self.path, f"short read of {what} at offset {offset}")
            view, offset = view[n:], offset + n

    def head_and_tail(self) -> tuple[bytes, bytes]:
        """The first 4 KiB and the last 512 bytes, for format detection."""
        head = os.pread(self.fd, 4096, 0)
        tail = os.pread(self.fd, 512, self.size - 512) if self.size >= 512 else b""
        return head, tail

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Split [start, end) of the file into (start, end, holds_data) runs, from the file
        system's own map (SEEK_DATA/SEEK_HOLE): holes of a sparse file read as zeros and need
        not be read at all. All data where the file system cannot tell, or on a block device."""
        fd = self.fd
        if not self.regular:
            yield start, end, True
            return
        pos = start
        while pos < end:
            known_start, known_end = self._known_data
            if known_start <= pos < known_end:  # asked already: no syscall (each is dear in UML)
                yield pos, min(known_end, end), True
                pos = known_end
                continue
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no SEEK_DATA here
                    yield pos, end, True
                    return
                # ENXIO: nothing but hole from pos on, or the file ended there.
                if os.fstat(fd).st_size < self.size:
                    raise ImageError(self.path, f"the file shrank while being read (from "
                                                f"{self.size} bytes)") from None
                data = end
            if data > pos:
                yield pos, min(data, end), False
            if data >= end:
                return
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            self._known_data = (data, hole)
            yield data, min(hole, end), True
            pos = hole

    def close(self) -> None:
        self.file.close()


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _inside(folder: Path, roots: tuple[Path, ...]) -> bool:
    return any(folder.is_relative_to(root) for root in roots)


def _open(path: Path, flags: int, folder: int | None = None) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | flags,
                       dir_fd=folder)
    except FileNotFoundError:
        raise MissingFile(path, "no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
            raise ImageError(path, "is a symbolic link, which thinstack never follows when an "
                                   "image names it") from None
        raise ImageError(path, f"cannot open: {e.strerror}") from None


def detect(target: str | os.PathLike | Source) -> str:
    """The format of an image, from its content."""
    source = Source.of(target)
    try:
        head, tail = source.head_and_tail()
    finally:
        if source is not target:
            source.close()
    for name in FORMATS:
        if driver(name).probe(head, tail):
            return name
    return "raw"


def open_image(path: str | os.PathLike, policy: Policy = DEFAULT_POLICY,
               format: str = "auto") -> Image:
    """The image at `path`. `format="raw"` reads the bytes as they are, whatever they look like
    (a raw backup holds whatever its guest wrote); "auto" detects the format but follows no
    reference to another file; any other format must match the content."""
    source = Source.open(path)
    try:
        if format == "raw":
            return driver("raw").open(source, policy)
        found = detect(source)
        if format == "auto":
            policy = dataclasses.replace(policy, follow_references=False)
        elif format != found:
            raise ImageError(path, f"claimed format {format!r} but the content is {found!r}")
        try:
            return driver(found).open(source, policy)
        except ReferenceRefused as e:
            if format != "auto" or e.path != str(source.path):
                raise
            named = f"--format {found}" if found != "qemu" else "its format (--format qemu)"
            raise ImageError(path, f"is {found} and names {_a(e.what)} ({e.name!r}); --format auto "
                                   f"never follows one: name the format ({named}) to import it "
                                   f"with its {e.what}, or --format raw for the file's bytes as "
                                   f"they are") from None
    except BaseException:
        source.close()
        raise
