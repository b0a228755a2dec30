"""The growth policy: when a thin pool or a CoW store has crossed its threshold, how much to add
from the volume group, and what to do when the volume group has nothing left to give.

Pure functions on small dataclasses; thinstack/monitor.py reads the state and runs the commands.
All sizes are bytes; times are seconds; percentages are 0-100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from thinstack import tags
from thinstack.dm.status import ThinPoolStatus
from thinstack.sizes import format_size, round_down, round_up

MiB = 1 << 20

DEFAULT_THRESHOLD = 70.0
# Untagged pools and CoW stores grow by a quarter of their size, and never by less than this:
# small steps on a small store would be used up before the next reading.
DEFAULT_STEP_MIN = 64 * MiB
# The largest pool metadata device the kernel can use (DM_THIN_MAX_METADATA_SIZE, as LVM caps it).
METADATA_MAX = 16192 * MiB
# LVM's own estimate of metadata per mapped data block (thin_pool metadata sizing).
MAPPING_BYTES = 64
METADATA_BLOCK = 4096  # thin-pool status counts metadata in 4 KiB blocks
# A new thin device's share of metadata: its btree roots and a first leaf of mappings, generously.
DEVICE_BYTES = 64 << 10
# LVM refuses thin_pool_autoextend_threshold below 50 (it warns and uses 50).
LVM_THRESHOLD_MIN = 50


@dataclass(frozen=True)
class Settings:
    threshold: float  # grow when use reaches this percentage
    step: int | None  # bytes to add; None: a quarter of the current size, at least 64 MiB
    enabled: bool


def settings(lv_tags: frozenset[str]) -> Settings:
    """The growth settings a pool or CoW volume carries in its tags.

    A malformed value falls back to the default rather than switching growth off: a pool that
    grows by the default step is safer than one that fills because of a typo in a tag.
    """
    threshold = _number(tags.value(lv_tags, tags.GROW_THRESHOLD))
    step = _number(tags.value(lv_tags, tags.GROW_STEP))
    return Settings(
        threshold=threshold if threshold is not None and 0 < threshold < 100 else DEFAULT_THRESHOLD,
        step=int(step) if step is not None and step >= 1 else None,
        enabled=tags.NO_GROW not in lv_tags)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Space:
    """One thing that fills: a pool's data or metadata device, or a CoW store."""
    used: int
    size: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.size if self.size else 100.0


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic clock
    used: int


def write_rate(readings: Sequence[Reading]) -> float:
    """Bytes per second by which use grew from the oldest reading to the newest (0 if it shrank)."""
    if len(readings) < 2 or readings[-1].at <= readings[0].at:
        return 0.0
    return max(0.0, (readings[-1].used - readings[0].used) / (readings[-1].at - readings[0].at))


@dataclass(frozen=True)
class Growth:
    add: int  # bytes to add now (whole extents; 0: nothing)
    short: bool  # still at or over the threshold after adding: the VG (or a limit) ran out


def growth(space: Space, threshold: float, step: int, *, rate: float, reaction: float,
           extent: int, room: int, ceiling: int | None = None, enough: int | None = None) -> Growth:
    """How much to add to `space`, once its use has reached `threshold`.

    The step grows to cover `rate` bytes/s for `reaction` seconds (the writers must not use up the
    new space before the next growth can land), and to bring use back under the threshold after
    a burst. It is rounded up to extents and capped by `room` (the VG's free bytes) and by
    `ceiling` (the largest size the device may have). `enough` is a size at which the device can
    never fill (a CoW store that can hold every chunk of its origin).
    """
    if space.used * 100 < threshold * space.size or (enough is not None and space.size >= enough):
        return Growth(0, False)
    below = math.floor(space.used * 100 / threshold) + 1 - space.size
    if enough is not None:
        below = min(below, enough - space.size)
    want = round_up(max(step, math.ceil(rate * reaction), below), extent)
    limit = room if ceiling is None else min(room, ceiling - space.size)
    add = max(0, min(want, round_down(limit, extent)))
    return Growth(add, add < below)




def default_step(size: int) -> int:
    return max(size // 4, DEFAULT_STEP_MIN)


# --- thin pools --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolView:
    data: Space
    metadata: Space
    chunk: int  # the pool's data block size
    mode: str  # rw | ro | out_of_data_space (a failed pool has no numbers to decide on)
    error_if_no_space: bool
    needs_check: bool
    low_water_mark: int  # in data blocks, as the live table has it
    settings: Settings
    limit: int | None = None  # the data never grows past this (the pool's quota); None: the VG


@dataclass(frozen=True)
class PoolPlan:
    grow_data: int = 0
    grow_metadata: int = 0
    error_if_no_space: bool | None = None  # switch the pool to this mode; None: leave it
    rearm: bool = False  # reload the table so the low-water event fires at the threshold
    alert: str | None = None  # why the operator must act; None: all is well

    @property
    def reloads(self) -> bool:
        """Whether the plan runs an LVM command that reloads the pool's table."""
        return bool(self.grow_data or self.grow_metadata or self.error_if_no_space is not None
                    or self.rearm)


def plan_pool(pool: PoolView, *, room: int, extent: int, data_rate: float, metadata_rate: float,
              reaction: float, name: str = "VG/POOL") -> PoolPlan:
    """What to do for one pool (`name`, as alerts call it), given `room` free bytes in its
    VG."""
    s = pool.settings
    if pool.mode == "ro" or pool.needs_check:
        return PoolPlan(alert="the pool is read-only (metadata full or damaged): it needs "
                              "`thinstack pool check`")
    at_limit = reached(pool.data.size, pool.limit, extent)
    if not s.enabled:
        # No growth, but a quota all the same: at its limit the pool errors when full.
        return PoolPlan(error_if_no_space=True if at_limit and not pool.error_if_no_space
                        else None)
    data = growth(pool.data, s.threshold, s.step or default_step(pool.data.size),
                  rate=data_rate, reaction=reaction, extent=extent, room=room,
                  ceiling=pool.limit)
    at_limit = reached(pool.data.size + data.add, pool.limit, extent)
    # Metadata has no tag of its own: it crosses the same threshold and grows by a quarter.
    metadata = growth(pool.metadata, s.threshold, pool.metadata.size // 4, rate=metadata_rate,
                      reaction=reaction, extent=extent, room=room - data.add, ceiling=METADATA_MAX)
    alert = None
    if data.short and at_limit:
        alert = (f"data {pool.data.percent:.1f}% full (threshold {s.threshold:g}%) at its limit "
                 f"({format_size(pool.limit or 0)}): its writers get ENOSPC when it fills; raise "
                 f"the limit (`thinstack pool set {name} --limit SIZE`) or free space")
    elif data.short:
        alert = (f"data {pool.data.percent:.1f}% full (threshold {s.threshold:g}%) and the "
                 "volume group has no room to grow it: writers get ENOSPC when it fills")
    elif metadata.short:
        alert = (f"metadata {pool.metadata.percent:.1f}% full (threshold {s.threshold:g}%) and "
                 "it cannot grow: the pool turns read-only when it fills")
    # Out of room, a queueing pool would hang its writers for 60 s and then fail them anyway;
    # erroring at once lets them (and the filesystems on them) see ENOSPC and stay consistent.
    # With room again, queueing is better: a write that races the next growth waits for it.
    # A pool at its limit errors before it is full: no monitor pass stands between its filling
    # and its writers' ENOSPC, and its neighbours' growth never waits on it.
    errors = data.short or at_limit
    plan = PoolPlan(grow_data=data.add, grow_metadata=metadata.add, alert=alert,
                    error_if_no_space=None if errors == pool.error_if_no_space else errors)
    if plan.reloads:
        return plan  # each of these commands sets the low-water mark again
    armed = low_water_mark(pool.data.size // pool.chunk, s.threshold)
    return replace(plan, rearm=pool.low_water_mark != armed)


def reached(size: int, limit: int | None, extent: int) -> bool:
    """Whether a pool of `size` is at its `limit`: LVM grows it in whole extents, so a limit
    that is not a multiple of them is reached an extent short of it."""
    return limit is not None and size + extent > limit


def lvm_threshold(threshold: float) -> int:
    """The activation/thin_pool_autoextend_threshold to give LVM so that the pool's low-water
    event fires no later than `threshold` (LVM takes whole percents, from 50 up)."""
    return max(LVM_THRESHOLD_MIN, min(100, math.floor(threshold)))


# The `--config` of an lvextend of a CoW store: the command neither unregisters nor registers
# the volume with dmeventd (about a second of the lab's lvextend, where a CoW store has no event
# and the poll and that command are all the margin). A CoW volume stays registered, unlike a
# pool (arming): dmeventd unmounts a snapshot that went invalid, which thinstack does not.
DMEVENTD_UNTOUCHED = "activation{monitoring=0}"


def arming(pool_tags: frozenset[str]) -> str:
    """The `--config` for an LVM command that makes or loads a pool's table (making or
    activating a thin volume in it, growing or refreshing it): LVM writes a low-water mark into
    every pool table it loads, from its threshold, which at its default leaves the pool's event
    off until the monitor's next pass re-arms it with one more reload of the pool.

    And no dmeventd: LVM registers a pool it loads with dmeventd, whose thin plugin runs `lvm
    lvextend --use-policies` at every 5% of use above 50%. With LVM's threshold at its default
    that extends nothing, but each run takes the VG's lock in the seconds when the monitor's own
    lvextend is racing the writers (in the lab, with a 50 ms disk, that lvextend took 11-13 s
    instead of 3). thinstack's monitor is the pool's policy; registering and unregistering
    also cost each of these commands about a second there."""
    return ("activation{thin_pool_autoextend_threshold="
            f"{lvm_threshold(settings(pool_tags).threshold)} monitoring=0}}")


def low_water_mark(data_blocks: int, threshold: float) -> int:
    """The low-water mark (free data blocks) LVM writes into the pool's table for `threshold`."""
    t = lvm_threshold(threshold)
    return data_blocks * (100 - t) // 100 if t < 100 else 0


def spaces(status: ThinPoolStatus, chunk: int) -> tuple[Space, Space]:
    """A pool's data and metadata use in bytes, from its status and its data block size."""
    return (Space(status.used_data_blocks * chunk, status.total_data_blocks * chunk),
            Space(status.used_metadata_blocks * METADATA_BLOCK,
                  status.total_metadata_blocks * METADATA_BLOCK))


def metadata_projection_ok(status: ThinPoolStatus, *, chunk: int, room: int,
                           new_devices: int = 1) -> bool:
    """Whether the pool's metadata can still map every data block the pool has, after adding
    `new_devices` thin devices (a snapshot or clone), counting the metadata growth that the VG's
    free `room` allows. False: refuse the new device rather than let the pool turn read-only.

    A snapshot shares its origin's mappings until either is written, and each write then maps
    a block of its own; so every free data block may come to need a mapping.
    """
    data, metadata = spaces(status, chunk)
    free_blocks = max(0, data.size - data.used) // chunk
    need = metadata.used + new_devices * DEVICE_BYTES + free_blocks * MAPPING_BYTES
    return need <= min(METADATA_MAX, metadata.size + room)


# --- CoW stores --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CowView:
    store: Space
    origin_size: int
    chunk: int  # the snapshot's chunk size
    invalid: bool  # the store overflowed: the volume is lost
    settings: Settings


@dataclass(frozen=True)
class CowPlan:
    grow: int = 0
    alert: str | None = None


def cow_max_size(origin_size: int, chunk: int) -> int:
    """The store that holds a copy of every chunk of the origin, and so can never overflow:
    dm-snapshot's persistent store is a header chunk, the data chunks, and one chunk of
    16-byte exception records for every chunk/16 data chunks."""
    chunks = -(-origin_size // chunk)
    per_area = chunk // 16
    return (1 + chunks + -(-chunks // per_area)) * chunk


def plan_cow(cow: CowView, *, room: int, extent: int, rate: float, reaction: float) -> CowPlan:
    s = cow.settings
    if cow.invalid:
        return CowPlan(alert="the CoW store overflowed: the volume is invalid and its data lost")
    if not s.enabled:
        return CowPlan()
    most = cow_max_size(cow.origin_size, cow.chunk)
    g = growth(cow.store, s.threshold, s.step or default_step(cow.store.size), rate=rate,
               reaction=reaction, extent=extent, room=room, ceiling=round_up(most, extent),
               enough=most)
    if g.short:
        return CowPlan(grow=g.add, alert=(
            f"CoW store {cow.store.percent:.1f}% full (threshold {s.threshold:g}%) and the volume "
            "group has no room to grow it: the volume becomes invalid when it fills"))
    return CowPlan(grow=g.add)
