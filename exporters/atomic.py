"""Write a file beside its destination and move it into place only when complete."""

from __future__ import annotations

import os
from pathlib import Path


class AtomicFile:
    """A temporary file `.DEST.partial-PID` beside DEST. `commit()` fsyncs it, renames it over
    DEST and fsyncs the directory; `discard()` removes it. DEST is never seen half-written."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        self.tmp = self.dest.with_name(f".{self.dest.name}.partial-{os.getpid()}")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def commit(self) -> Path:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.dest)
        dirfd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return self.dest

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class FileWriter:
    """What every writer shares: ranges arrive in offset order, inside the disk; `close()`
    finishes the format (`_finish`), fsyncs and renames; `abort()`, or any failure while
    closing, leaves the destination untouched. An open parent image is closed either way.
    Subclasses open their parent before calling __init__, so a bad parent leaves no file."""

    parent = None

    def __init__(self, path: Path, size: int):
        self.size = size
        self.pos = 0  # writes and zeroed ranges must not go back before this
        self.file = AtomicFile(path)

    def _advance(self, offset: int, length: int) -> None:
        from thinstack.exporters import ExportError

        if offset < self.pos or length < 0 or offset + length > self.size:
            raise ExportError(f"range {offset}+{length} is out of order or outside the disk "
                              f"({self.size} bytes, next offset {self.pos})")
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
