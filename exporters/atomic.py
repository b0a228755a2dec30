"""Write a file beside its destination and move it into place only when complete.

The destination's folder may be writable by others (a backup agent's drop folder): nothing there
is trusted. The temporary file has a random name and is made with O_EXCL|O_NOFOLLOW, so neither
a file nor a symlink planted beforehand is ever written through; every name is looked up
relative to one descriptor of the folder, taken once. Images hold whole disks: they are made
0600, or keep the permissions of the destination they replace when that is our own file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from thinstack.errors import ThinstackError
from thinstack.importers import Image

PARTIAL = ".partial-"  # .DEST.partial-RANDOM
NEW_MODE = 0o600


def partial_name(dest: str | os.PathLike) -> str:
    """A fresh name for DEST's temporary file: random, so nobody can plant anything there first.
    (An export journals it before the file exists, to find it again after a kill.)"""
    return f".{Path(dest).name}{PARTIAL}{os.urandom(8).hex()}"


def kept_mode(st: os.stat_result | None, euid: int) -> int:
    """The permissions for an image replacing a file whose lstat is `st` (None: there is none).
    The replaced file's own, when it is a regular file of ours; otherwise 0600: a file someone
    else put at DEST (or a symlink) says nothing about who may read the disk."""
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_uid != euid:
        return NEW_MODE
    return stat.S_IMODE(st.st_mode) & 0o777


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open_dir(folder: Path) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class AtomicFile:
    """A temporary file `.DEST.partial-RANDOM` beside DEST (`partial`: that name, chosen by the
    caller beforehand). `commit()` fsyncs it, renames it over DEST and fsyncs the folder;
    `discard()` removes it. DEST is never seen half-written."""

    def __init__(self, dest: str | os.PathLike, partial: str | None = None):
        self.dest = Path(dest)
        self.name = partial or partial_name(self.dest)
        if "/" in self.name or not self.name.startswith("."):
            raise ThinstackError(f"bad temporary file name {self.name!r}")
        self.tmp = self.dest.with_name(self.name)
        self.fd = -1
        self.dirfd = _open_dir(self.dest.parent)
        try:
            self.fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, NEW_MODE, dir_fd=self.dirfd)
        except FileExistsError:
            os.close(self.dirfd)
            raise ThinstackError(f"{self.tmp} already exists, though its name was drawn at "
                                 "random: left alone; the export is abandoned") from None
        except BaseException:
            os.close(self.dirfd)
            raise
        st = os.fstat(self.fd)
        self.identity = st.st_ino, st.st_dev

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def set_xattr(self, name: str, value: str) -> None:
        """Best effort: not every file system keeps user attributes, and none is required."""
        try:
            os.setxattr(self.fd, name, value.encode())
        except OSError:
            pass

    def commit(self) -> Path:
        os.fchmod(self.fd, kept_mode(_lstat_at(self.dirfd, self.dest.name), os.geteuid()))
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.name, self.dest.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        os.fsync(self.dirfd)
        self._close_dir()
        return self.dest

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dirfd >= 0:
            # Only our own file: whatever was put at its name since is not ours to remove.
            st = _lstat_at(self.dirfd, self.name)
            if st is not None and (st.st_ino, st.st_dev) == self.identity:
                os.unlink(self.name, dir_fd=self.dirfd)
            self._close_dir()

    def _close_dir(self) -> None:
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1


def remove_partial(path: str | os.PathLike) -> None:
    """Recovery: remove a writer's temporary file left by a killed export. Only a regular file
    by a temporary file's name, looked up relative to its folder: a symlink there is not
    followed (nor removed), nor is anything else the journal entry might name."""
    path = Path(path)
    if not (path.name.startswith(".") and PARTIAL in path.name):
        return
    try:
        dirfd = _open_dir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        st = _lstat_at(dirfd, path.name)
        if st is not None and stat.S_ISREG(st.st_mode):
            os.unlink(path.name, dir_fd=dirfd)
    finally:
        os.close(dirfd)


class FileWriter:
    """What every writer shares: ranges arrive in offset order, inside the disk; `close()`
    finishes the format (`_finish`), fsyncs and renames; `abort()`, or any failure while
    closing, leaves the destination untouched. An open parent image is closed either way.
    Subclasses open their parent before calling __init__, so a bad parent leaves no file."""

    parent: Image | None = None

    def __init__(self, path: Path, size: int, partial: str | None = None):
        self.size = size
        self.pos = 0  # writes and zeroed ranges must not go back before this
        self.file = AtomicFile(path, partial)

    def _advance(self, offset: int, length: int) -> None:
        if offset < self.pos or length < 0 or offset + length > self.size:
            raise ThinstackError(f"range {offset}+{length} is out of order or outside the "
                                 f"disk ({self.size} bytes, next offset {self.pos})")
        self.pos = offset + length

    def _finish(self) -> None:
        """Write what the format keeps besides the data (tables, headers, footers)."""

    def close(self) -> None:
        try:
            self._finish()
            self.file.commit()
        except BaseException:
            self.file.discard()
            raise
        finally:
            self._close_parent()

    def abort(self) -> None:
        self.file.discard()
        self._close_parent()

    def _close_parent(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None
