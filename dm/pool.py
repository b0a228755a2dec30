"""A live thin-pool device as thinstack reads it: its table, its status, and its one metadata
snapshot, held for thin_ls/thin_dump/thin_delta/thin_check to read a live pool's metadata. LVM
makes and changes pools; raw pool transactions (for tests against the kernel) live in
tests/rawpool.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from thinstack.dm import tools
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError, MetadataSnapHeld
from thinstack.dm.ioctl import IoctlError
from thinstack.dm.status import Failed, ThinPoolStatus
from thinstack.dm.targets import Device as DeviceRef
from thinstack.dm.targets import ThinPoolTarget

SECTOR = 512


def device_path(dev: DeviceRef) -> str:
    """A path for a table's device reference, for tools that need a file ("major:minor" is how
    the kernel prints devices; udev links /dev/block/MAJOR:MINOR to each)."""
    return f"/dev/block/{dev}" if re.fullmatch(r"\d+:\d+", dev) else dev


class Pool:
    """An active thin-pool device `name`.

    `reader_lock`: how readers of the pool's one metadata snapshot coordinate. A reader killed
    while holding the snapshot never releases it, and the kernel keeps it (in the superblock)
    until someone does, so every later reader would be refused. With a reader_lock (a context
    manager a process holds exclusively, yielding a marker file's path), a reader holds it for
    as long as it holds the snapshot, and the marker says a reservation is in progress; a reader
    that gets the lock, finds the snapshot held and the marker present knows its holder was one
    of ours and is dead, and releases it. A snapshot held without the marker belongs to someone
    else (an operator's thin_dump) and is left."""

    def __init__(self, dm: DeviceMapper, name: str, *,
                 reader_lock: Callable[[], AbstractContextManager[Path]] | None = None):
        self.dm = dm
        self.name = name
        self.reader_lock = reader_lock

    @property
    def target(self) -> ThinPoolTarget:
        """The pool's table, read from the kernel on each use."""
        target = self.dm.table(self.name).target
        if not isinstance(target, ThinPoolTarget):
            raise DmError(f"{self.name} is a {target.type_name} device, not a thin-pool")
        return target

    @property
    def metadata_path(self) -> str:
        return device_path(self.target.metadata)

    def status(self) -> ThinPoolStatus:
        status = self.dm.target_status(self.name)
        if isinstance(status, Failed):
            raise DmError(f"thin-pool {self.name} has failed: its metadata needs thin_check "
                          "and thin_repair")
        if not isinstance(status, ThinPoolStatus):
            raise DmError(f"{self.name} is not a thin-pool")
        return status

    @contextmanager
    def metadata_snap(self) -> Iterator[None]:
        """Hold a metadata snapshot for the body, so tools can read a live pool's metadata;
        released however the body ends (the pool holds only one at a time)."""
        with self.reader_lock() if self.reader_lock else nullcontext() as marker:
            self._reserve(marker)
            try:
                yield
            finally:
                self.dm.message(self.name, 0, "release_metadata_snap")
                if marker is not None:
                    marker.unlink(missing_ok=True)

    def _reserve(self, marker: Path | None) -> None:
        stale = marker is not None and marker.exists()  # its writer died: we hold the lock
        if marker is not None:
            marker.touch()
        try:
            try:
                self.dm.message(self.name, 0, "reserve_metadata_snap")
            except (CommandError, IoctlError):  # dmsetup's failure, or the ioctl's
                held = self.status().held_metadata_root
                if held is None:
                    raise
                if not stale:
                    raise MetadataSnapHeld(
                        f"thin-pool {self.name} already holds a metadata snapshot (root {held}): "
                        "another reader has it, or one died holding it; once nothing reads it, "
                        f"`dmsetup message {self.name} 0 release_metadata_snap` frees it"
                    ) from None
                self.dm.message(self.name, 0, "release_metadata_snap")
                self.dm.message(self.name, 0, "reserve_metadata_snap")
        except BaseException:
            if marker is not None and not stale:
                marker.unlink(missing_ok=True)  # what is held, if anything, is not ours
            raise

    def thin_ls(self) -> list[tools.ThinLsEntry]:
        with self.metadata_snap():
            return tools.thin_ls(self.metadata_path, runner=self.dm.runner)

    def thin_check(self) -> tools.ThinCheckResult:
        """Check the live pool's metadata snapshot (a full check needs the pool inactive:
        tools.thin_check(..., metadata_snap=False))."""
        with self.metadata_snap():
            return tools.thin_check(self.metadata_path, metadata_snap=True,
                                    runner=self.dm.runner)
