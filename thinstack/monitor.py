"""The monitor: grows thinstack's thin pools and every CoW store before writers fill them, and
raises an alert (stderr, a metrics file, exit 7 with --once) when a volume group has no room left.

Each pass reads every pool (device-mapper status) and CoW volume (lvs), asks the policy in
thinstack/growth.py what to do, and runs the lvm commands it decides on. Passes run every
`interval` seconds and whenever a pool's table raises a device-mapper event: its low-water mark
(the threshold), out of space, a mode change. A thread per pool blocks in the event wait.

The monitor takes no VG lock: a thinstack operation may hold one for minutes (an import) while a
pool fills. LVM serialises its own commands, and growth commutes with every operation. Growth
itself is serialised per pool and CoW volume (a flock under the run folder), so two monitors
(the service and a `monitor --once`) never both decide on the same reading and both grow: the
one that finds the lock held leaves that device to the other for this pass.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from thinstack import budget, poolstatus, thinpool
from thinstack.dm.client import DeviceMapper
from thinstack.dm.errors import DmError
from thinstack.dm.pool import Pool
from thinstack.dm.status import Failed, ThinPoolStatus
from thinstack.dm.targets import Table, ThinPoolTarget
from thinstack.errors import Alert, ThinstackError
from thinstack.growth import (
    DMEVENTD_UNTOUCHED,
    CowView,
    PoolView,
    Reading,
    Space,
    arming,
    plan_cow,
    plan_pool,
    settings,
    spaces,
    write_rate,
)
from thinstack.lock import LockTimeout, flocked
from thinstack.lvm import LV, CommandError, Lvm, default_lvm
from thinstack.sizes import format_size
from thinstack.state import run_dir
from thinstack.tags import POOL as TAG_POOL

METRICS = "monitor.prom"
FIRST_COMMAND_SECONDS = 2.0  # how long a growth command takes, until one has been timed
TIMED_COMMANDS = 5  # the reaction time counts the slowest of the last few growth commands
# What a pass reads: thin pools, CoW snapshots (valid or not) and their origins (LVM's attrs).
WATCHED = 'lv_attr=~"^[tsSoO]"'
RATE_WINDOW = 10.0  # seconds of readings the write rate is measured over (at least two passes)
# Per-volume usage (metrics) is read this often, not every pass: thin_ls walks every mapping of
# the pool and the names come from an lvs of every thin volume, both growing with the volumes.
VOLUME_USAGE_EVERY = 60.0
GROWN_POLL = 0.01  # seconds between looks at a pool's size while it grows to its limit


@dataclass(frozen=True)
class Report:
    """One pool or CoW volume after a pass: what the metrics file and the alert show."""
    kind: str  # pool | cow
    vg: str
    name: str
    data_percent: float | None = None  # a CoW store's use is its data_percent
    metadata_percent: float | None = None
    mode: str | None = None
    error_if_no_space: bool | None = None
    growths: int = 0
    alert: str | None = None
    busy: bool = False  # another monitor was looking after it: nothing read or done this pass
    volumes: tuple[VolumeUsage, ...] = ()  # a pool's thin volumes, as last read
    # A pool's space, in bytes: its data size and use, its limit (None: none) and what its
    # volumes promise (as last read with them), and its budget's ratio (None: none).
    data_size: int | None = None
    data_used: int | None = None
    limit: int | None = None
    provisioned: int | None = None
    overcommit: float | None = None


@dataclass(frozen=True)
class VolumeUsage:
    name: str
    mapped: int  # bytes of the pool the volume maps
    exclusive: int  # of those, mapped by no other volume: what deleting it gives back


@dataclass
class History:
    data: deque[Reading] = field(default_factory=deque)
    metadata: deque[Reading] = field(default_factory=deque)
    growths: int = 0


class Monitor:
    def __init__(self, interval: float, dm: DeviceMapper | None = None, lvm: Lvm | None = None,
                 *, takes_over: bool = False):
        self.interval = interval
        # The service takes each pool over from dmeventd when it first sees it (growth.arming
        # says why); a one-off pass leaves the pool as it found it.
        self.taken_over: set[str] | None = set() if takes_over else None
        self.dm = dm or DeviceMapper()
        self.lvm = lvm or default_lvm()
        self.history: dict[str, History] = {}
        self.alerts: set[str] = set()  # the volumes in alert at the last pass
        self.modes: dict[str, str] = {}  # each pool's mode when last read
        self.command_times = deque([FIRST_COMMAND_SECONDS], maxlen=TIMED_COMMANDS)
        self.pool_devices: set[str] = set()  # device-mapper names of the pools seen last pass
        # pool VG/NAME -> when its volumes' usage was read, what it was, and their sizes' sum
        self.usage: dict[str, tuple[float, tuple[VolumeUsage, ...], int | None]] = {}

    @property
    def reaction(self) -> float:
        """How long the space added now must last: until the growth after it lands. That is the
        rest of this lvextend (measured in the lab: the new size is live after about half of
        it), a pass, and the next lvextend. An event starts the next pass at once, but it can
        be missed: an LVM command that reloads a pool's table (creating a thin volume does)
        resets its low-water mark to LVM's default until a pass re-arms it; so count a whole
        interval for the pass."""
        return self.interval + 2 * max(self.command_times)

    def check_all(self) -> list[Report]:
        """One pass over every VG's thinstack pools and CoW volumes: one `lvs` that reports
        only those and CoW origins (its rows carry their VG's free space and extent size), so
        a pass costs O(pools), not O(volumes); then the kernel's view of each pool."""
        lvs = self.lvm.lvs(select=WATCHED)
        reports: list[Report] = []
        self.pool_devices = set()
        for vg in sorted({lv.vg for lv in lvs}):
            in_vg = {lv.name: lv for lv in lvs if lv.vg == vg}
            room = next(iter(in_vg.values())).vg_free  # left for the next device to grow
            for lv in in_vg.values():
                if lv.is_thin_pool and TAG_POOL in lv.tags and lv.active:
                    report, used = self._guarded(lv, "pool", self.check_pool, lv,
                                                 lv.vg_extent_size, room)
                    volumes, provisioned = self._volume_usage(lv)
                    report = replace(report, volumes=volumes, provisioned=provisioned)
                elif lv.is_cow_snapshot and (lv.active or invalid(lv)):
                    report, used = self._guarded(lv, "cow", self.check_cow, lv,
                                                 in_vg[lv.origin], lv.vg_extent_size, room)
                else:
                    continue
                room -= used
                reports.append(report)
        from thinstack import live  # live imports: finished once copied, their source watched

        reports += [Report("live", c.vg, c.name, data_percent=c.percent, alert=c.alert)
                    for c in live.check_all(self.lvm)]
        self._log_alerts(reports)
        self._log_modes(reports)
        return reports

    def _volume_usage(self, pool: LV) -> tuple[tuple[VolumeUsage, ...], int | None]:
        """The pool's volumes' usage and what they promise (budget.provisioned): read anew
        every VOLUME_USAGE_EVERY seconds (one lvs, one thin_ls), else as last read. A failed
        read keeps the last figures: they are a view, no alert."""
        key = str(pool.ref)
        when, last, promised = self.usage.get(key, (None, (), None))
        if when is not None and time.monotonic() - when < VOLUME_USAGE_EVERY:
            return last, promised
        try:
            thins = [lv for lv in self.lvm.lvs(pool.vg, select="segtype=thin")
                     if lv.is_thin and lv.pool == pool.name]
            usage = poolstatus.thin_usage(pool.vg, [pool, *thins], self.dm) if thins else {}
        except (CommandError, DmError, ThinstackError):
            usage = None
        if usage is None:  # unreadable, or another reader holds the metadata snapshot
            return last, promised
        found = tuple(VolumeUsage(lv.name, *usage[(pool.name, lv.thin_id or 0)][:2])
                      for lv in thins if (pool.name, lv.thin_id or 0) in usage)
        promised = budget.provisioned(pool, thins)
        self.usage[key] = (time.monotonic(), found, promised)
        return found, promised

    def _guarded(self, lv: LV, kind: str, check, *args) -> tuple[Report, int]:
        """A failure on one device is that device's alert; the others are still looked after.
        A device another monitor is looking after now is skipped."""
        try:
            with flocked(growth_lock(lv), 0, "busy"):
                return check(*args)
        except LockTimeout:
            return Report(kind, lv.vg, lv.name, busy=True), 0
        except (CommandError, DmError, ThinstackError) as e:
            return Report(kind, lv.vg, lv.name, alert=f"cannot check or grow it: {e}"), 0

    def check_pool(self, lv: LV, extent: int, room: int) -> tuple[Report, int]:
        kernel = thinpool.kernel_pool(lv, self.dm)
        if kernel is None:
            raise DmError(f"the device of active pool {lv.ref} is missing")
        self.pool_devices.add(kernel.name)
        st = kernel.dm.target_status(kernel.name)
        if isinstance(st, Failed):
            return Report("pool", lv.vg, lv.name, mode=poolstatus.FAIL, alert=(
                f"the pool has failed: it needs `thinstack pool repair {lv.ref}`")), 0
        target = kernel.dm.table(kernel.name).target
        if not isinstance(st, ThinPoolStatus) or not isinstance(target, ThinPoolTarget):
            raise DmError(f"{kernel.name} is not a thin-pool device")
        if self.taken_over is not None and str(lv.ref) not in self.taken_over:
            # LVM's own activations (at boot, a vgchange -ay) register the pool again; this
            # does not reload its table. Should it fail, the pool is grown all the same.
            self.taken_over.add(str(lv.ref))
            try:
                self.lvm.run("lvchange", "-q", "--monitor", "n", str(lv.ref))
            except (CommandError, ThinstackError) as e:
                log(f"{lv.ref}: left registered with dmeventd: {e}")
        data, metadata = spaces(st, lv.chunk_size)
        view = PoolView(
            data=data, metadata=metadata, chunk=lv.chunk_size, mode=st.mode.value,
            error_if_no_space=st.error_if_no_space, needs_check=st.needs_check,
            low_water_mark=target.low_water_mark,
            settings=settings(lv.tags), limit=budget.of(lv).limit)
        h = self._history(lv, view.data.used, view.metadata.used)
        plan = plan_pool(view, room=room, extent=extent, data_rate=write_rate(h.data),
                         metadata_rate=write_rate(h.metadata), reaction=self.reaction,
                         name=str(lv.ref))
        # LVM writes the low-water mark into every pool table it loads, from
        # activation/thin_pool_autoextend_threshold: 0 (no event at all) at its default of 100.
        # So each lvm command here that reloads the pool carries our threshold, and the kernel
        # raises its event there. Through LVM rather than a table reload with dmsetup: LVM's
        # locks, metadata and view of the device stack stay its own. Not in lvm.conf: a global
        # threshold would also let dmeventd extend pools behind the policy's back. thinstack's
        # own commands that load the pool carry it too (growth.arming); others (LVM's by hand,
        # a boot's activation) reset the mark, so every pass compares it with ours and re-arms
        # it (plan.rearm: `lvchange --refresh`).
        config = ["--config", arming(lv.tags)]
        ref = str(lv.ref)
        def grow_data() -> None:
            self._grow(h, ref, view.data.size, plan.grow_data, "data", "-L", *config)

        if plan.grow_data and plan.error_if_no_space:  # to its limit
            _then_erroring(kernel, grow_data, st.total_data_blocks)
        elif plan.grow_data:
            grow_data()
        elif plan.error_if_no_space:
            _erroring(kernel)
        if plan.grow_metadata:
            self._grow(h, ref, view.metadata.size, plan.grow_metadata, "metadata",
                       "--poolmetadatasize", *config)
        if plan.error_if_no_space is not None:
            self.lvm.run("lvchange", "-q", "--errorwhenfull",
                         "y" if plan.error_if_no_space else "n", ref, *config)
            log(f"{ref}: {'errors' if plan.error_if_no_space else 'queues'} writes when full")
        if plan.rearm:
            self.lvm.run("lvchange", "-q", "--refresh", ref, *config)
        mode = plan.error_if_no_space if plan.error_if_no_space is not None \
            else view.error_if_no_space
        # A pool that is not rw needs the operator even when the policy has nothing to say;
        # unless it is only out of data space and has just been grown (the kernel resumes it).
        shown = poolstatus.pool_mode(st)
        full = shown == poolstatus.OUT_OF_DATA_SPACE
        why = None if full and plan.grow_data else poolstatus.refusal(ref, shown, "monitor")
        quota = budget.of(lv)
        return Report("pool", lv.vg, lv.name, data_percent=view.data.percent,
                      metadata_percent=view.metadata.percent, mode=shown,
                      error_if_no_space=mode, growths=h.growths,
                      data_size=view.data.size + plan.grow_data, data_used=view.data.used,
                      limit=quota.limit, overcommit=quota.overcommit,
                      alert=(plan.alert or why) if full else (why or plan.alert)
                      ), plan.grow_data + plan.grow_metadata

    def check_cow(self, lv: LV, origin: LV, extent: int, room: int) -> tuple[Report, int]:
        store = Space(round(lv.size * (lv.data_percent or 0) / 100), lv.size)
        view = CowView(store=store, origin_size=origin.size, chunk=lv.chunk_size,
                       invalid=invalid(lv), settings=settings(lv.tags))
        h = self._history(lv, store.used, 0)
        plan = plan_cow(view, room=room, extent=extent, rate=write_rate(h.data),
                        reaction=self.reaction)
        if plan.grow:
            self._grow(h, str(lv.ref), store.size, plan.grow, "CoW store", "-L", "--config",
                       DMEVENTD_UNTOUCHED)
        return Report("cow", lv.vg, lv.name, data_percent=store.percent, growths=h.growths,
                      alert=plan.alert), plan.grow

    def _history(self, lv: LV, data_used: int, metadata_used: int) -> History:
        h = self.history.setdefault(str(lv.ref), History())
        now = time.monotonic()
        window = max(RATE_WINDOW, 2 * self.interval)
        for readings, used in ((h.data, data_used), (h.metadata, metadata_used)):
            readings.append(Reading(now, used))
            while readings[0].at < now - window:
                readings.popleft()
        return h

    def _grow(self, h: History, ref: str, size: int, add: int, what: str, option: str,
              *config: str) -> None:
        start = time.monotonic()
        self.lvm.run("lvextend", "-q", option, f"+{add}b", ref, *config)
        self.command_times.append(time.monotonic() - start)
        h.growths += 1
        log(f"{ref}: grew {what} by {format_size(add)} to {format_size(size + add)} "
            f"in {self.command_times[-1]:.1f} s")

    def _log_alerts(self, reports: list[Report]) -> None:
        """Log each alert when it starts and when it clears, not on every pass."""
        now = {f"{r.vg}/{r.name}": r.alert for r in reports if r.alert}
        for ref in now.keys() - self.alerts:
            log(f"ALERT {ref}: {now[ref]}")
        for ref in self.alerts - now.keys():
            log(f"{ref}: alert cleared")
        self.alerts = set(now)

    def _log_modes(self, reports: list[Report]) -> None:
        """Every change of a pool's mode away from rw is an alert; the return to rw is logged.
        A monitor that starts on a pool that is not rw alerts at once."""
        now = {f"{r.vg}/{r.name}": r.mode for r in reports if r.kind == "pool" and r.mode}
        for ref, mode in now.items():
            was = self.modes.get(ref, poolstatus.RW)
            if mode != was:
                log(f"{'ALERT ' if mode != poolstatus.RW else ''}{ref}: mode {was} -> {mode}")
        self.modes.update(now)


def _erroring(kernel: Pool, tries: int = 40) -> None:
    """The pool errors writes when full, from now on: its kernel table first (one reload
    through the dm ioctl, noflush so queued writes fail rather than hold the suspend), LVM's
    record after (`lvchange --errorwhenfull y`, which reloads it again, a second and more
    later). A pool LVM still holds suspended (its lvextend finishing) is waited for; should the
    kernel refuse the reload all the same, LVM's record sets the mode a moment later."""
    for _ in range(tries):
        info = kernel.dm.info(kernel.name)
        if info is not None and not info.suspended:
            table = kernel.dm.table(kernel.name)
            if not isinstance(table.target, ThinPoolTarget):
                return
            try:
                kernel.dm.reload(kernel.name, Table.of(table.size, replace(
                    table.target, error_if_no_space=True)), noflush=True)
                return
            except DmError as e:
                log(f"{kernel.name}: error mode not set in the kernel yet ({e}); retrying")
        time.sleep(GROWN_POLL * 5)


def _then_erroring(kernel: Pool, grow: Callable[[], None], blocks_before: int) -> None:
    """Grow a pool to its limit and make it error when full the moment its larger table is
    live: lvextend goes on for about as long again after it resumed the pool (udev, LVM's
    metadata), and a writer that fills the pool in that time would wait in its queue."""
    done = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            grow()
        except BaseException as e:  # raised again below, in the pass
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="grow to limit", daemon=True).start()
    erroring = False
    while not done.wait(GROWN_POLL):
        st = kernel.dm.target_status(kernel.name)
        if isinstance(st, ThinPoolStatus) and st.total_data_blocks > blocks_before:
            _erroring(kernel)
            erroring = True
            break
    done.wait()
    if failed:
        raise failed[0]
    if not erroring:
        _erroring(kernel)


def apply(pool: LV, interval: float = 5.0) -> Report | None:
    """One pass over one active pool, now: what `pool set` changed (its limit) takes effect
    without waiting for the service's next pass. None: the pool is not active (the service
    applies it once it is); a busy report: the service is on it this instant."""
    if not pool.active:
        return None
    m = Monitor(interval)
    report, _ = m._guarded(pool, "pool", m.check_pool, pool, pool.vg_extent_size, pool.vg_free)
    return report


def growth_lock(lv: LV) -> Path:
    """The lock a monitor holds while it reads, decides on and grows `lv`."""
    return run_dir() / "locks" / "grow" / lv.vg / f"{lv.name}.lock"


def invalid(cow: LV) -> bool:
    """An overflowed CoW volume: LVM shows it in the state column, in place of active."""
    return cow.attr[4] == "I"


def log(message: str) -> None:
    print(f"thinstack monitor: {message}", file=sys.stderr, flush=True)


# --- metrics -----------------------------------------------------------------------------------

_METRICS = (
    ("thinstack_pool_data_percent", "gauge", "Pool data space in use, percent."),
    ("thinstack_pool_metadata_percent", "gauge", "Pool metadata space in use, percent."),
    ("thinstack_pool_mode", "gauge", "1 for the pool's current mode (rw, out_of_data_space, ro, "
                                     "needs_check, fail)."),
    ("thinstack_pool_error_if_no_space", "gauge", "1 if the pool fails writes when full, 0 if it "
                                                  "queues them."),
    ("thinstack_pool_data_bytes", "gauge", "Pool data size, bytes."),
    ("thinstack_pool_used_bytes", "gauge", "Pool data in use, bytes."),
    ("thinstack_pool_limit_bytes", "gauge", "The size past which the pool never grows (its "
                                            "--limit), bytes; absent: none."),
    ("thinstack_pool_provisioned_bytes", "gauge", "The sum of the pool's volume sizes, bytes."),
    ("thinstack_pool_overcommit_ratio", "gauge", "The pool's budget (--overcommit): its volume "
                                                 "sizes may add up to this times its limit."),
    ("thinstack_cow_percent", "gauge", "CoW store in use, percent."),
    ("thinstack_growths_total", "counter", "Growths by this monitor process."),
    ("thinstack_alert", "gauge", "1 if the pool or CoW volume needs the operator."),
    ("thinstack_volume_mapped_bytes", "gauge", "Pool space a thin volume maps, bytes."),
    ("thinstack_volume_exclusive_bytes", "gauge", "Pool space only this thin volume maps (what "
                                                  "deleting it gives back), bytes."),
)


def metrics_text(reports: list[Report]) -> str:
    """The reports in Prometheus' text exposition format."""
    samples: dict[str, list[str]] = {name: [] for name, _, _ in _METRICS}
    for r in reports:
        labels = f'vg="{r.vg}",{r.kind}="{r.name}"'
        if r.kind == "pool" and r.mode is not None:  # a failed pool has a mode, no usage
            samples["thinstack_pool_mode"].append(f'{{{labels},mode="{r.mode}"}} 1')
        if r.kind == "pool" and r.data_percent is not None:
            samples["thinstack_pool_data_percent"].append(f"{{{labels}}} {r.data_percent:.2f}")
            samples["thinstack_pool_metadata_percent"].append(
                f"{{{labels}}} {r.metadata_percent:.2f}")
            samples["thinstack_pool_error_if_no_space"].append(
                f"{{{labels}}} {int(bool(r.error_if_no_space))}")
            for name, value in (("data_bytes", r.data_size), ("used_bytes", r.data_used),
                                ("limit_bytes", r.limit), ("provisioned_bytes", r.provisioned),
                                ("overcommit_ratio", r.overcommit)):
                if value is not None:
                    samples[f"thinstack_pool_{name}"].append(f"{{{labels}}} {value:g}"
                                                             if isinstance(value, float)
                                                             else f"{{{labels}}} {value}")
        elif r.kind == "cow" and r.data_percent is not None:
            samples["thinstack_cow_percent"].append(f"{{{labels}}} {r.data_percent:.2f}")
        samples["thinstack_growths_total"].append(f"{{{labels}}} {r.growths}")
        samples["thinstack_alert"].append(f"{{{labels}}} {int(r.alert is not None)}")
        for v in r.volumes:
            where = f'vg="{r.vg}",pool="{r.name}",volume="{v.name}"'
            samples["thinstack_volume_mapped_bytes"].append(f"{{{where}}} {v.mapped}")
            samples["thinstack_volume_exclusive_bytes"].append(f"{{{where}}} {v.exclusive}")
    lines = []
    for name, kind, help_ in _METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [name + s for s in samples[name]]
    return "\n".join(lines) + "\n"


def write_metrics(reports: list[Report]) -> Path:
    """Replace the metrics file at once, so a scraper never reads half of it. The units run
    with UMask=0077; the metrics (pool usage, no secret) stay readable by an exporter that does
    not run as root, and so does the folder they are in (its locks are 0600 each)."""
    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    path = folder / METRICS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(metrics_text(reports))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# --- the loop ----------------------------------------------------------------------------------

class Watcher(threading.Thread):
    """Blocks in one pool's device-mapper event wait and wakes the monitor on each event, until
    stopped or until the device goes away."""

    def __init__(self, dm: DeviceMapper, device: str, wake: threading.Event, timeout: float):
        super().__init__(name=f"watch {device}", daemon=True)
        self.dm, self.device, self.wake, self.timeout = dm, device, wake, timeout
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            info = self.dm.info(self.device)
            event_nr = info.event_nr if info else 0
            while info and not self.stopped.is_set():
                # Bounded, so that stopping never waits for an event that may not come.
                new = self.dm.wait(self.device, event_nr, timeout=self.timeout)
                if new is not None:
                    event_nr = new
                    self.wake.set()
        except (CommandError, DmError):
            self.wake.set()  # the device went away or changed: look again


def run(*, once: bool, interval: float, dm: DeviceMapper | None = None,
        lvm: Lvm | None = None) -> int:
    monitor = Monitor(interval, dm, lvm, takes_over=not once)
    if once:
        reports = monitor.check_all()
        write_metrics(reports)
        alerts = [f"{r.vg}/{r.name}" for r in reports if r.alert]
        if alerts:
            raise Alert(f"in alert: {', '.join(alerts)} (details above; metrics in "
                        f"{run_dir() / METRICS})")
        return 0

    stopping, wake = threading.Event(), threading.Event()

    def stop(signum, frame):
        stopping.set()
        wake.set()

    # A stop ends the loop between passes, so no growth is left half done.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watchers: dict[str, Watcher] = {}
    log(f"watching pools and CoW stores (poll every {interval:g} s, and on pool events)")
    while not stopping.is_set():
        wake.clear()
        try:
            write_metrics(monitor.check_all())
        except (CommandError, DmError, ThinstackError) as e:
            log(f"pass failed, retrying in {interval:g} s: {e}")
        finally:
            monitor.lvm.close()  # one LVM shell a pass, not one for the service's lifetime
        # A pool's device changes name when it gets its first thin volume (NAME -> NAME-tpool).
        for device in watchers.keys() - monitor.pool_devices:
            watchers.pop(device).stopped.set()
        for device in monitor.pool_devices:
            if device not in watchers or not watchers[device].is_alive():
                watchers[device] = Watcher(monitor.dm, device, wake, timeout=interval)
                watchers[device].start()
        wake.wait(interval)
    for w in watchers.values():
        w.stopped.set()
    for w in watchers.values():
        w.join()
    log("stopped")
    return 0
