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
