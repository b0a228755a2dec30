"""A per-VG lock serialising thinstack's own changes (flock: released by the kernel when the
holder dies, so a killed run never leaves a stale lock)."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

from thinstack.state import run_dir


class LockTimeout(Exception):
    pass


@contextmanager
def vg_lock(vg: str, timeout: float = 120.0):
    folder = run_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{vg}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"volume group {vg} is locked by another thinstack "
                                      f"process for more than {timeout:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
