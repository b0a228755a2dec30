"""Sizes: as operators write them (512, 4K, 1.5G, 10GiB, 100M: binary units, as LVM uses), the
sector the kernel counts in, and rounding to a unit (extents, chunks, blocks)."""

from __future__ import annotations

import re

SECTOR = 512  # the unit of device-mapper tables and of the kernel's block counts

_UNITS = {"": 1, "b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bskmgtp]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512, 64K, 1.5G, 10GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Human-readable, for messages and tables (never parsed back: JSON carries bytes)."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit.lower()]
        if n >= scale:
            return f"{n / scale:.4g}{unit}iB"
    return f"{n}B"


def round_up(n: int, unit: int) -> int:
    """The least multiple of `unit` not below `n`."""
    return -(-n // unit) * unit


def round_down(n: int, unit: int) -> int:
    """The greatest multiple of `unit` not above `n`."""
    return n // unit * unit
