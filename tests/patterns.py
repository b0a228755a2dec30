"""Pattern oracles for block devices: write recognisable blocks with direct I/O (bypassing the
page cache, so what is read back is what the kernel stored) and check them later."""

from __future__ import annotations

import hashlib
import mmap
import os

BLOCK = 64 << 10


def pattern(seed: str, offset: int, length: int = BLOCK) -> bytes:
    """Deterministic, position-dependent bytes: a block found at the wrong offset won't match."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{offset}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def _aligned(length: int) -> mmap.mmap:
    return mmap.mmap(-1, length)  # page-aligned, as O_DIRECT requires


def write_blocks(dev: str, seed: str, offsets: list[int], length: int = BLOCK) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = _aligned(length)
        for off in offsets:
            buf[:] = pattern(seed, off, length)
            assert os.pwritev(fd, [buf], off) == length
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(dev: str, offset: int, length: int = BLOCK) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned(length)
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)


def blocks_match(dev: str, seed: str, offsets: list[int], length: int = BLOCK) -> bool:
    return all(read_direct(dev, off, length) == pattern(seed, off, length) for off in offsets)


def is_zero(dev: str, offsets: list[int], length: int = BLOCK) -> bool:
    return all(read_direct(dev, off, length) == bytes(length) for off in offsets)


def digest(dev: str, size: int, chunk: int = 4 << 20) -> str:
    """SHA-256 of a device's first `size` bytes, read directly."""
    h = hashlib.sha256()
    for off in range(0, size, chunk):
        h.update(read_direct(dev, off, min(chunk, size - off)))
    return h.hexdigest()
