"""Image exporters: one module per format, each exposing `create(path, virtual_size, **options)
-> Writer`. The caller feeds extents in offset order; the writer produces a complete, valid file
only at `close()` (written to a temporary beside the path, fsynced, renamed) and `abort()` leaves
the destination as it was. Every `create` takes `partial=NAME`, the temporary file's name (see
atomic.partial_name; a fresh random one when not given), and makes it 0600 with O_EXCL.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from thinstack.errors import Usage

FORMATS = ("raw", "vhd", "vhd-fixed", "qcow2", "gow1", "gow2", "gow3")
_MODULES = {"raw": "raw", "vhd": "vhd", "vhd-fixed": "vhd", "qcow2": "qcow2",
            "gow1": "gow", "gow2": "gow", "gow3": "gow"}


class ExportError(Usage):
    """An export that cannot be made as asked: an unknown format, options that do not go
    together."""


class Writer(Protocol):
    def write(self, offset: int, data: bytes) -> None:
        """Store data at offset (offset order; may be called for any alignment)."""

    def mark_zero(self, offset: int, length: int) -> None:
        """The range reads as zeros in the result (a hole, or an explicit zero in a diff image)."""

    def close(self) -> None:
        """Finish metadata, fsync, and rename into place atomically."""

    def abort(self) -> None:
        """Drop the temporary file; the destination is untouched."""


def driver(format: str):
    if format not in _MODULES:
        raise ExportError(f"unknown export format {format!r} (known: {', '.join(FORMATS)})")
    return importlib.import_module(f"{__name__}.{_MODULES[format]}")
