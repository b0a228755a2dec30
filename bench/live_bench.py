"""Live import benchmark: `thinstack import --live` against `thinstack import` of the same
images, in the lab, same run, same pool.

    thinstack lab run --disks 1 --disk-size 8G --mem 2G -- .venv/bin/python bench/live_bench.py

Two qcow2 images hold the same 512 MiB of random data in 4 MiB runs: one of 2 GiB virtual, one of
32 GiB. For each:

  time to a usable volume   `import --live` until it returns, against the plain `import`
                            (which returns when everything is copied)
  total copy                from the start of `import --live` until the kernel reports every
                            region hydrated, against the plain import's whole run
  guest reads               random 4 KiB O_DIRECT reads of the volume (data regions), latency and
                            throughput while it hydrates, and again once it is an ordinary
                            thin volume
  guest writes              random 4 KiB O_DIRECT writes (with their flush) the same way
  --rate                    the 2 GiB image again with `import --live --rate` at a quarter of
                            the unbounded copy's rate: the copy's time, and the guest's reads
                            and writes during it

Process start in UML is slow: compare ratios, not absolute times. The report goes to
bench/reports/live-import.md and live-import.json.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "reports"
THINSTACK = [sys.executable, "-m", "thinstack.cli"]
VG, DISK = "bench", "/dev/ubdb"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DATA, RUN = 512 * MiB, 4 * MiB
READS = 200


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ts(*args: str) -> str:
    return subprocess.run([*THINSTACK, *args], check=True, capture_output=True, text=True,
                          cwd="/tmp").stdout


def make_image(folder: Path, virtual: int, seed: int) -> tuple[Path, list[int]]:
    """A qcow2 of `virtual` bytes with DATA bytes of random data in RUN-sized runs spread over
    it; returns it and the runs' offsets."""
    rng = random.Random(seed)
    slots = virtual // RUN
    offsets = sorted(rng.sample(range(slots), DATA // RUN))
    raw = folder / f"src{seed}.raw"
    with open(raw, "wb") as f:
        f.truncate(virtual)
        for slot in offsets:
            f.seek(slot * RUN)
            f.write(os.urandom(RUN))
    image = folder / f"src{seed}.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    return image, [slot * RUN for slot in offsets]


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def clone_hydrated(name: str) -> bool:
    words = sh("dmsetup", "status", f"{VG}-{name}").split()
    if words[2] != "clone":
        return True
    done, total = words[6].split("/")
    return done == total


def reads(path: str, runs: list[int], count: int, write: bool = False) -> dict:
    """Random 4 KiB O_DIRECT reads (or writes, each with its flush) inside the data runs:
    latency (ms) and throughput."""
    rng = random.Random(7)
    buf = mmap.mmap(-1, 4 * KiB)
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    lat = []
    try:
        for _ in range(count):
            offset = rng.choice(runs) + rng.randrange(RUN // (4 * KiB)) * 4 * KiB
            start = time.monotonic()
            if write:
                os.pwritev(fd, [buf], offset)
                os.fdatasync(fd)
            else:
                os.preadv(fd, [buf], offset)
            lat.append((time.monotonic() - start) * 1000)
    finally:
        os.close(fd)
    return {"median_ms": round(statistics.median(lat), 3),
            "p99_ms": round(sorted(lat)[int(len(lat) * 0.99) - 1], 3),
            "mib_per_s": round(count * 4 * KiB / MiB / (sum(lat) / 1000), 2)}


def bench(image: Path, runs: list[int], label: str) -> dict:
    plain = timed(lambda: ts("import", "--format", "qcow2", str(image), f"{VG}/p{label}"))
    sh("lvremove", "-q", "-y", f"{VG}/p{label}")
    return {"image": label, "plain_import_s": round(plain, 2), **live(image, runs, label)}


def live(image: Path, runs: list[int], label: str, rate: int | None = None) -> dict:
    name = f"l{label}" if rate is None else f"r{label}"
    start = time.monotonic()
    ts("import", "--live", "--format", "qcow2", str(image), f"{VG}/{name}",
       *(["--rate", str(rate)] if rate else []))
    usable = time.monotonic() - start
    during = reads(f"/dev/{VG}/{name}", runs, READS)
    writes = reads(f"/dev/{VG}/{name}", runs, READS // 4, write=True)
    while not clone_hydrated(name):
        time.sleep(0.2)
    hydrated = time.monotonic() - start
    ts("import", "--live", "--wait", f"{VG}/{name}")
    after = reads(f"/dev/{VG}/{name}", runs, READS)
    writes_after = reads(f"/dev/{VG}/{name}", runs, READS // 4, write=True)
    sh("lvremove", "-q", "-y", f"{VG}/{name}")
    return {"rate": rate, "live_usable_s": round(usable, 2), "live_hydrated_s": round(hydrated, 2),
            "reads_during": during, "reads_after": after, "writes_during": writes,
            "writes_after": writes_after}


def report(results: list[dict]) -> str:
    lines = ["# Live import", "",
             f"{platform()} — {DATA // MiB} MiB of random data in {RUN // MiB} MiB runs, "
             "qcow2, pool chunk 64 KiB, region 64 KiB, batches of 1 MiB. UML: compare ratios.",
             "", "| image | plain import | live: usable | ratio | live: all copied | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r["rate"] is None:
            plain = r["plain_import_s"]
            lines.append(f"| {r['image']} | {plain} s | {r['live_usable_s']} s | "
                         f"{round(r['live_usable_s'] / plain, 3)} | {r['live_hydrated_s']} s | "
                         f"{round(r['live_hydrated_s'] / plain, 3)} |")
    for what in ("reads", "writes"):
        lines += ["", f"Guest {what}, random 4 KiB O_DIRECT in the data"
                  f"{' (each with its flush)' if what == 'writes' else ''} (median / p99 "
                  "latency, throughput); `--rate`: the copy bounded to a quarter of the "
                  "unbounded copy's rate:", "",
                  "| image | copy | copied in (at) | during the copy | after |",
                  "|---|---|---|---|---|"]
        for r in results:
            d, a = r[f"{what}_during"], r[f"{what}_after"]
            copy = "unbounded" if r["rate"] is None else f"--rate {r['rate'] // MiB}M"
            at = DATA / MiB / max(r["live_hydrated_s"] - r["live_usable_s"], 0.01)
            lines.append(f"| {r['image']} | {copy} | {r['live_hydrated_s']} s ({at:.0f} MiB/s) | "
                         f"{d['median_ms']} / {d['p99_ms']} ms, {d['mib_per_s']} MiB/s | "
                         f"{a['median_ms']} / {a['p99_ms']} ms, {a['mib_per_s']} MiB/s |")
    return "\n".join(lines) + "\n"


def platform() -> str:
    return f"lab kernel {os.uname().release}, {os.cpu_count()} CPU"


def main() -> None:
    os.environ.setdefault("THINSTACK_STATE_DIR", tempfile.mkdtemp(prefix="live-bench-state-"))
    sh("pvcreate", "-q", DISK)
    sh("vgcreate", "-q", VG, DISK)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "3G", "-Zy", "--chunksize", "64k", "-n",
       "pool", "--addtag", "ts_pool", VG)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        results = []
        # LVM's first thin volume in a VG costs it 1.5 s more than the next (UML): paid here,
        # not by whichever import comes first.
        sh("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", "pool", "-V", "1G", "-n",
           "warm", VG)
        sh("lvremove", "-q", "-y", f"{VG}/warm")
        for virtual, label in ((2 * GiB, "2GiB"), (32 * GiB, "32GiB")):
            image, runs = make_image(Path(tmp), virtual, virtual // GiB)
            image.read_bytes()  # both imports read it from the page cache
            results.append(bench(image, runs, label))
            if virtual == 2 * GiB:  # the same copy bounded: a quarter of its unbounded rate
                took = results[-1]["live_hydrated_s"] - results[-1]["live_usable_s"]
                rate = max(MiB, int(DATA / max(took, 0.1) / 4) // MiB * MiB)
                results.append({"image": label, **live(image, runs, label, rate)})
            image.unlink()
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "live-import.json").write_text(json.dumps(results, indent=1) + "\n")
    (REPORTS / "live-import.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
