"""File locks (flock: released by the kernel when the holder dies, so a killed run never leaves a
stale lock): the per-VG lock serialising thinstack's own changes, and the primitive under it."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from thinstack.errors import Refused
from thinstack.state import run_dir


class LockTimeout(Refused):
    """Another process kept the lock for longer than the caller would wait."""


@contextmanager
def flocked(path: Path, timeout: float, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (made if missing); LockTimeout(busy) if another
    process keeps it for `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(busy) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def held(path: Path) -> bool:
    """Whether a live process holds `path`'s flock now (a missing file: nobody)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def vg_lock(vg: str, timeout: float = 120.0):
    return flocked(run_dir() / "locks" / f"{vg}.lock", timeout,
                   f"volume group {vg} is locked by another thinstack process for more than "
                   f"{timeout:g} s")
