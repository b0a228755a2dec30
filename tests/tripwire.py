"""A tripwire for tests: which of some files (or files in some folders) were opened, by any
process, while a block ran. The kernel reports each open (inotify IN_OPEN) as it happens, so an
open by qemu-img or any other child counts too, and one that failed before the file was opened
does not.

    with tripwire.watch([secret_file, outside_folder]) as wire:
        ...
    assert wire.opened == []
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Wire:
    def __init__(self):
        self.opened: list[Path] = []


@contextmanager
def watch(paths: Iterable[str | os.PathLike]) -> Iterator[Wire]:
    """Watch each path (a file, or a folder: then every file directly in it, and the folder
    itself) for opens; `.opened` lists what was opened, in order, once the block has ended."""
    fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    wire = Wire()
    try:
        watched = {}
        for path in paths:
            wd = _libc.inotify_add_watch(fd, os.fsencode(path), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            watched[wd] = Path(path)
        yield wire
        wire.opened.extend(_drain(fd, watched))
    finally:
        os.close(fd)


def _drain(fd: int, watched: dict[int, Path]) -> Iterator[Path]:
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        pos = 0
        while pos < len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size:pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & IN_OPEN and wd in watched:
                yield watched[wd] / os.fsdecode(name) if name else watched[wd]
