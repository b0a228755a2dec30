"""One instant per open file of `thinstack mount`: the snapshots its readers see.

A volume's first open takes a read-only thin snapshot, as an export does (a read-only volume,
such as a gold master, is read as it is); every file of that volume opened while it lives reads
the same snapshot, and the last close removes it. So a file stays one instant for as long as it
is open, whatever the VM writes, and a volume deleted meanwhile goes on being served until then.

Each snapshot is an operation of its own ("mount"): journalled, tagged with the entry's tag (so
hidden, and named NAME.export-ID, a name reserved for thinstack), and left open until the last
close removes it. While the mount lives, its flock (`lock`, held for the daemon's life) marks its
entries as live: other commands' recoveries leave them alone (recovery.LIVE). Once the daemon is
gone, killed or not, any recovery of the VG removes what its entries made, as for any operation
(the snapshot carries the entry's tag, whether its origin is still there or not), and detaches
the dead mount they name (recovery's UNMOUNT_STALE, unmount_stale here).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from thinstack import exports, extorigin, faults, lvm, mapping, thinpool
from thinstack.dm.command import RUNNER, CommandError
from thinstack.dm.pool import Pool
from thinstack.errors import NotFound, Refused
from thinstack.exporters import driver
from thinstack.exporters.layout import Layout
from thinstack.exports import SourceKind
from thinstack.extents import Extent
from thinstack.journal import Entry
from thinstack.lock import held
from thinstack.lvm import LV, VolumeRef
from thinstack.operation import KEEP_FOR_RESUME, operation
from thinstack.state import run_dir
from thinstack.tags import LAST_EXPORT

log = logging.getLogger("thinstack.mount")
FSTYPE = "fuse.thinstack"
MOUNTINFO = "/proc/self/mountinfo"


# --- what a volume holds, and which volumes are shown -----------------------------------------

@dataclass(frozen=True)
class Content:
    """A volume at one instant, as an export would read it."""
    size: int
    extents: list[Extent]
    chunk: int  # the pool's block size (the export's copy unit)

    def layout(self, format: str) -> Layout:
        return driver(format).layout(self.size, self.extents, self.chunk, format=format)


def shown(lvs: list[LV]) -> dict[str, LV]:
    """The volumes a mount shows, by name: every volume, snapshot and gold master an export
    could read; not LVM's internal volumes, pools, unfinished volumes or thinstack's own."""
    out = {}
    for lv in lvs:
        if lv.internal or lv.is_thin_pool or lv.op_tags or LAST_EXPORT in lv.tags \
                or lvm._OWN.fullmatch(lv.name):
            continue
        try:
            exports.source_kind(lv, lvs)
        except Refused:  # writable and outside the pool: no snapshot could freeze it
            continue
        out[lv.name] = lv
    return out


def content(lv: LV, kind: SourceKind, pool: LV | None, kernel: Pool | None = None) -> Content:
    """What `lv` holds now, from the pool's mapping (a plain read-only volume: all data)."""
    if kind == SourceKind.PLAIN:
        return Content(lv.size, exports.volume_extents(kind, lv.size, None, None),
                       exports.PLAIN_CHUNK)
    assert pool is not None and lv.thin_id is not None  # not PLAIN: a thin volume
    ranges, _ = mapping.read(pool, lv.thin_id, device=kernel)
    return Content(lv.size, exports.volume_extents(kind, lv.size, ranges, None),
                   mapping.block_size(ranges))


# --- the instants ------------------------------------------------------------------------------

@dataclass
class Instant:
    ref: VolumeRef
    read_from: LV  # the snapshot, or the read-only volume itself
    entry: Entry | None  # the snapshot's operation; None: nothing was made
    content: Content
    fd: int
    taken: int = field(default_factory=time.time_ns)  # the files' mtime
    opens: int = 0
    layouts: dict[str, Layout] = field(default_factory=dict)

    def layout(self, format: str) -> Layout:
        if format not in self.layouts:
            self.layouts[format] = self.content.layout(format)
        return self.layouts[format]

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


class Instants:
    """The instants of one mount, by volume: taken at a volume's first open, shared by every
    open file of it, let go at its last close."""

    def __init__(self, mountpoint: Path, lock: Path):
        self.mountpoint = mountpoint
        self.lock = lock
        self._mutex = threading.Lock()
        self._open: dict[VolumeRef, Instant] = {}
        self._taking: defaultdict[VolumeRef, threading.Lock] = defaultdict(threading.Lock)

    def current(self, ref: VolumeRef) -> Instant | None:
        with self._mutex:
            return self._open.get(ref)

    def acquire(self, ref: VolumeRef) -> Instant:
        with self._mutex:
            taking = self._taking[ref]
        with taking:  # one snapshot per volume, however many open it at once
            with self._mutex:
                instant = self._open.get(ref)
                if instant is not None:
                    instant.opens += 1
                    return instant
            instant = self._take(ref)
            instant.opens = 1
            with self._mutex:
                self._open[ref] = instant
            return instant

    def release(self, instant: Instant) -> None:
        with self._mutex:
            instant.opens -= 1
            if instant.opens > 0:
                return
            del self._open[instant.ref]
        os.close(instant.fd)
        if instant.entry is not None:
            _remove(instant.entry, instant.read_from)

    def close_all(self) -> None:
        with self._mutex:
            left, self._open = list(self._open.values()), {}
        for instant in left:
            instant.opens = 1
            self.release(instant)

    def _take(self, ref: VolumeRef) -> Instant:
        lvs = lvm.volumes_of(ref.vg)
        source = shown(lvs).get(ref.name)
        if source is None:
            raise NotFound(f"{ref}: no such volume")
        kind = exports.source_kind(source, lvs)
        pool = lvm.holding_pool(source, lvs)
        if source.readonly:  # cannot change while it is read
            return self._open_instant(ref, source, None, kind, pool, None)
        assert pool is not None  # source_kind: a writable volume is a thin one
        args = dict(name=ref.name, mountpoint=str(self.mountpoint), lock=str(self.lock))
        with operation("mount", ref.vg, args, finish=False, at=ref.name) as op:
            kernel = thinpool.kernel_pool(pool)
            thinpool.refuse_if_metadata_would_run_out(pool, kernel)
            snapshot = exports._snapshot(op, source, active=extorigin.active(source), pool=pool)
            faults.point("mount", "after-snapshot")
        try:
            return self._open_instant(ref, snapshot, op.entry, kind, pool, kernel)
        except BaseException:
            _remove(op.entry, snapshot)
            raise

    @staticmethod
    def _open_instant(ref: VolumeRef, lv: LV, entry: Entry | None, kind: SourceKind,
                      pool: LV | None, kernel: Pool | None) -> Instant:
        found = content(lv, kind, pool, kernel)
        fd = os.open(lv.path, os.O_RDONLY | os.O_CLOEXEC)
        return Instant(ref, lv, entry, found, fd)


def _remove(entry: Entry, snapshot: LV) -> None:
    """The second phase of a mount's snapshot: remove it and close the entry. A failure keeps
    the entry for the recovery that runs once the mount is gone."""
    with operation("mount", snapshot.vg, entry=entry, on_failure=KEEP_FOR_RESUME):
        extorigin.release(snapshot)
        lvm.lvm("lvremove", "-q", "-y", "-f", str(snapshot.ref))


# --- the mount's lock, and recovery ------------------------------------------------------------

def lock_dir() -> Path:
    return run_dir() / "mounts"


def _key(mountpoint: Path) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


def new_lock(mountpoint: Path) -> Path:
    """A lock of its own for each mount process, found by its mountpoint: a mount started
    again at the same place must not keep a killed one's entries looking alive."""
    return lock_dir() / f"{_key(mountpoint)}.{secrets.token_hex(4)}.lock"


def live(mountpoint: Path) -> list[Path]:
    """The locks of the live mount processes at `mountpoint`."""
    return [p for p in lock_dir().glob(f"{_key(mountpoint)}.*.lock") if held(p)]


def mounted(mountpoint: Path) -> bool:
    """Whether a thinstack mount sits at `mountpoint` (its daemon alive or not)."""
    with open(MOUNTINFO, "rb") as f:
        for line in f:
            fields, _, rest = line.partition(b" - ")
            point = fields.split(b" ")[4].decode("unicode_escape").encode("latin-1")
            if point == os.fsencode(mountpoint) and rest.split(b" ")[0] == FSTYPE.encode():
                return True
    return False


def unmount_stale(mountpoint: Path) -> bool:
    """Detach a thinstack mount whose daemon is dead (its files then fail with ENOTCONN, and
    nothing can open more). Returns whether there was one."""
    if not mounted(mountpoint) or live(mountpoint):
        return False
    try:
        RUNNER.run(["umount", "-l", str(mountpoint)])
    except CommandError as e:
        log.warning("cannot detach the dead mount at %s: %s", mountpoint, e)
    for p in lock_dir().glob(f"{_key(mountpoint)}.*.lock"):
        p.unlink(missing_ok=True)
    return True


def running(entry: Entry) -> bool:
    """recovery.LIVE["mount"]: whether the mount that took this snapshot is alive."""
    return held(Path(entry.args["lock"]))
