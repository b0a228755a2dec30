"""`import --live --rate R`: the kernel's background copy held to R bytes/s, and the guest's own
I/O not held back at all.

dm-clone has no rate of its own. It copies as fast as source and destination allow, up to its
hydration threshold at once, and starts no copy while the guest has I/O in flight. A throttle on
the source (qemu-nbd's) would also slow what the guest needs from the source now: its reads of
regions not yet copied, and the region copied under each partial write (the live bench measured
those writes at 10x their latency). So a small process beside qemu-nbd turns the background copy
on and off (the target's `enable_hydration` and `disable_hydration` messages) as a token bucket
says: it copies while the bytes copied are below R x the time elapsed, with at most a tick's
worth saved up. Regions the guest's writes copied count too, so R also bounds those (on
average).

The process starts with the import (and again from `pool attach` and the monitor's pass, if it
died), keeps a pid file beside qemu-nbd's, and ends by itself when the copy is done or the clone
is gone. If it dies, the copy waits with hydration off until it is started again; nothing is
lost. `python -m thinstack.pacer VG NAME` forks and returns once the pacer runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

TICK = 0.1  # seconds between looks: a tick's worth is the most the copy runs ahead of R
MIN_PULSE = 0.005
ASSUMED_SPEED = float(1 << 30)


@dataclass
class Bucket:
    """A token bucket in bytes: `rate` a second come in, at most `burst` saved, what was copied
    goes out (it may go below zero: copies in flight when hydration was turned off)."""

    rate: float
    burst: float
    tokens: float = 0.0

    def copy(self, copied: int, elapsed: float) -> bool:
        """Account for `copied` bytes over `elapsed` seconds; whether to copy on."""
        self.tokens = min(self.burst, self.tokens + self.rate * elapsed - copied)
        return self.tokens > 0


def pulse(tokens: float, speed: float) -> float:
    """How long to let the kernel copy (seconds): what the bucket holds at the speed it copied
    at last, a tick at most, and a few milliseconds at least (a shorter turn is mostly the
    messages' own time)."""
    return min(TICK, max(MIN_PULSE, tokens / speed))


def pace(vg: str, name: str) -> None:
    """The loop: until the copy is done or the clone gone. Each tick the kernel copies for a
    pulse (hydration on, then off), long enough for what the bucket holds."""
    import time

    from thinstack import live, lvm
    from thinstack.dm.client import DeviceMapper

    record = live.read_record(vg, name)
    if record is None or record.rate is None:
        return
    dm = DeviceMapper()
    device = lvm.dm_name(vg, name)
    bucket = Bucket(record.rate, record.rate * TICK)
    # Bytes/s while on, learnt from each pulse; first assumed fast, so the first pulses are
    # short (the learnt speed comes down to the real one within a second or so).
    speed = max(float(record.rate), ASSUMED_SPEED)
    seen: int | None = None
    last = time.monotonic()
    on_for = 0.0
    while True:
        status = live.clone_status(dm, vg, name)
        if status is None or status.hydrated:
            return
        now = time.monotonic()
        hydrated = status.hydrated_regions * record.region
        copied = 0 if seen is None else max(0, hydrated - seen)
        if on_for and copied:  # (a look may come before a pulse's copies end: keep the best)
            speed = max(float(record.rate), copied / on_for, 0.9 * speed)
        elapsed = now - last
        seen, last = hydrated, now
        on_for = 0.0
        if bucket.copy(copied, elapsed):
            on_for = pulse(bucket.tokens, speed)
            try:
                dm.message(device, 0, "enable_hydration")
                time.sleep(on_for)
                dm.message(device, 0, "disable_hydration")
            except Exception:  # finished or torn down meanwhile: the next look ends it
                pass
        elif not status.no_hydration:  # a table loaded with hydration on (the source moved)
            try:
                dm.message(device, 0, "disable_hydration")
            except Exception:
                pass
        time.sleep(max(0.0, TICK - on_for))


def main(args: list[str]) -> int:
    if len(args) != 2:
        print("usage: python -m thinstack.pacer VG NAME", file=sys.stderr)
        return 2
    vg, name = args
    ready_r, ready_w = os.pipe()
    if os.fork():  # the caller waits for this one, which returns once the pacer runs
        os.close(ready_w)
        ok = os.read(ready_r, 1) == b"1"
        return 0 if ok else 1
    os.close(ready_r)
    os.setsid()
    from thinstack import live
    from thinstack.journal import write_atomically

    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(live.pacer_pid_file(vg, name).with_suffix(".log"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    for fd, to in ((0, null), (1, null), (2, log)):  # the caller's pipes must close, or it waits
        os.dup2(to, fd)

    write_atomically(live.pacer_pid_file(vg, name), str(os.getpid()).encode())
    os.write(ready_w, b"1")
    os.close(ready_w)
    try:
        pace(vg, name)
    finally:
        if live.pacer_pid(vg, name) == os.getpid():  # not a pacer started after this one
            live.pacer_pid_file(vg, name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
