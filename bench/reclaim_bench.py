"""Reclaim benchmark: `thinstack reclaim` against reading the same volume by hand, in the lab,
same run, same pool.

    thinstack lab run --disks 1 --disk-size 4G --mem 1536M -- \
        .venv/bin/python bench/reclaim_bench.py

A 2 GiB volume holds 512 MiB of random data and 512 MiB of zeros written plainly (mapped), in
4 MiB runs spread over it. Measured:

  reclaim           `thinstack reclaim` (scan of the mapped GiB, then the zero chunks re-read and
                    discarded batch by batch under suspension), and again with nothing left
  by hand           `dd iflag=direct bs=4M` of the whole volume, and of the mapped runs only:
                    the least any reclaim must read, with no decision and no discard
  a reader's wait   random 4 KiB O_DIRECT reads of the data while reclaim runs, and idle:
                    p50, p99 and the longest (what a VM sees of the suspensions)

Process start in UML is slow: compare ratios, not absolute times. The report goes to
bench/reports/reclaim.md and reclaim.json.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "reports"
VG, DISK = "bench", "/dev/ubdb"
VOL = f"/dev/{VG}/vm"
MiB, GiB = 1 << 20, 1 << 30
RUN, SIZE = 4 * MiB, 2 * GiB


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ts(*args: str) -> str:
    return sh(sys.executable, "-m", "thinstack.cli", *args)


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def write_runs(offsets: list[int], data: bool) -> None:
    fd = os.open(VOL, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, RUN)
    try:
        for off in offsets:
            buf[:] = os.urandom(RUN) if data else bytes(RUN)
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_runs(offsets: list[int]) -> None:
    fd = os.open(VOL, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, RUN)
    try:
        for off in offsets:
            os.preadv(fd, [buf], off)
    finally:
        os.close(fd)


def reader_waits(offsets: list[int], stop: threading.Event, out: list[float]) -> None:
    """4 KiB O_DIRECT reads at random places of the data runs until `stop`: each one's wait."""
    fd = os.open(VOL, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(1)
    try:
        while not stop.is_set():
            off = rng.choice(offsets) + rng.randrange(RUN // 4096) * 4096
            start = time.monotonic()
            os.preadv(fd, [buf], off)
            out.append(time.monotonic() - start)
            time.sleep(0.002)
    finally:
        os.close(fd)


def waits(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return dict(reads=len(ms), p50_ms=round(statistics.median(ms), 2),
                p99_ms=round(ms[int(len(ms) * 0.99) - 1], 2), max_ms=round(ms[-1], 1))


def while_reading(data: list[int], fn) -> tuple[float, dict]:
    stop, out = threading.Event(), []
    reader = threading.Thread(target=reader_waits, args=(data, stop, out))
    reader.start()
    try:
        seconds = timed(fn)
    finally:
        stop.set()
        reader.join()
    return seconds, waits(out)


def main() -> None:
    os.environ.setdefault("THINSTACK_STATE_DIR", "/tmp/reclaim-bench/state")
    os.environ.setdefault("THINSTACK_RUN_DIR", "/tmp/reclaim-bench/run")
    sh("pvcreate", "-q", DISK)
    sh("vgcreate", "-q", VG, DISK)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "3G", "-Zy", "-n", "pool", "--addtag",
       "ts_pool", VG)
    ts("create", f"{VG}/vm", "--size", "2G")
    slots = random.Random(0).sample(range(SIZE // RUN), 256)
    data, zeros = sorted(o * RUN for o in slots[:128]), sorted(o * RUN for o in slots[128:])
    write_runs(data, True)
    write_runs(zeros, False)
    mapped = sorted(data + zeros)

    idle: list[float] = []
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    reader_waits(data, stop, idle)
    whole = timed(lambda: sh("dd", f"if={VOL}", "of=/dev/null", "bs=4M", "iflag=direct"))
    runs = timed(lambda: read_runs(mapped))
    first: dict = {}
    seconds, busy = while_reading(data, lambda: first.update(
        json.loads(ts("reclaim", f"{VG}/vm", "--json"))))
    again = timed(lambda: ts("reclaim", f"{VG}/vm", "--json"))
    result = dict(reclaim=first, reclaim_seconds=round(seconds, 2),
                  reclaim_again_seconds=round(again, 2), dd_whole_seconds=round(whole, 2),
                  read_mapped_seconds=round(runs, 2), reader_idle=waits(idle),
                  reader_during_reclaim=busy,
                  pool=sh("dmsetup", "status", f"{VG}-pool-tpool").split()[8])
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "reclaim.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / "reclaim.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    c, idle, busy, dd = r["reclaim"], r["reader_idle"], r["reader_during_reclaim"], \
        r["dd_whole_seconds"]
    rows = [
        (f"`thinstack reclaim` (gave back {c['bytes_discarded'] >> 20} MiB, "
         f"{c['suspensions']} suspensions)", r["reclaim_seconds"]),
        ("`thinstack reclaim` again (nothing left: the scan alone)", r["reclaim_again_seconds"]),
        ("by hand: `dd iflag=direct bs=4M` of the whole 2 GiB", dd),
        ("by hand: O_DIRECT reads of the mapped 1 GiB only", r["read_mapped_seconds"]),
    ]
    table = "\n".join(f"| {what} | {s} | {s / dd:.2f}x |" for what, s in rows)
    readers = "\n".join(f"| {name} | {w['reads']} | {w['p50_ms']} | {w['p99_ms']} | "
                         f"{w['max_ms']} |" for name, w in (("idle", idle),
                                                            ("during reclaim", busy)))
    return f"""# reclaim benchmark (bench/reclaim_bench.py, one lab run)

A 2 GiB volume with 512 MiB of random data and 512 MiB of plainly written zeros in 4 MiB runs;
pool discards: {r["pool"]}. Process start in UML is slow: compare ratios.

| what | seconds | ratio to dd of the whole volume |
|---|---|---|
{table}

Longest suspension (suspend command to resume's return, as reclaim measured it):
{c["longest_suspension"]} s.

A reader's 4 KiB O_DIRECT reads of the data (ms):

| | reads | p50 | p99 | longest |
|---|---|---|---|---|
{readers}
"""


if __name__ == "__main__":
    main()
