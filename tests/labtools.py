"""What lab tests share: running a command as root in the lab, and running thinstack's CLI as
an operator would (a separate process, its exit status and its one line of stderr), and what a
thin pool must look like after any thinstack command."""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

BLOCK = 4 << 20  # a direct-I/O writer's block
MONITOR = [sys.executable, "-m", "thinstack.cli", "monitor"]


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ts(*args: str, env: dict | None = None, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "thinstack.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"thinstack {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def lvs(vg: str) -> dict[str, dict]:
    out = json.loads(sh("lvs", "--reportformat", "json", "-a", "-o",
                        "lv_name,lv_attr,origin,lv_tags,thin_id,lv_skip_activation,pool_lv",
                        vg))
    return {r["lv_name"]: r for r in out["report"][0]["lv"]}


def assert_pool_consistent(vg: str, pools: tuple[str, ...] = ("pool",)) -> None:
    """For each of the VG's `pools`: thin_check is clean, and its thin devices are exactly
    those LVM knows in it (thin ids are per pool). No unfinished volume is left."""
    found = lvs(vg)
    for pool in pools:
        # A pool without thin volumes yet is its thin-pool device itself (LVM adds -tpool and
        # a linear top once it has one).
        tpool = f"{vg}-{pool}-tpool"
        if not os.path.exists(f"/dev/mapper/{tpool}"):
            tpool = f"{vg}-{pool}"
        sh("dmsetup", "message", tpool, "0", "reserve_metadata_snap")
        try:
            sh("thin_check", "-m", f"/dev/mapper/{vg}-{pool}_tmeta")
            devs = {int(line.split()[0]) for line in
                    sh("thin_ls", "-m", "--no-headers", "-o", "DEV",
                       f"/dev/mapper/{vg}-{pool}_tmeta").splitlines() if line.strip()}
        finally:
            sh("dmsetup", "message", tpool, "0", "release_metadata_snap")
        known = {int(r["thin_id"]) for r in found.values()
                 if r["thin_id"] and r["pool_lv"] == pool}
        assert devs == known, f"pool {pool} has thin ids {devs}, LVM knows {known}"
    leftovers = [n for n, r in found.items() if "ts_op_" in r["lv_tags"]]
    assert not leftovers, f"unfinished volumes left: {leftovers}"


# --- the monitor as a service, and writers that race it -------------------------------------

def metrics(state: Path) -> str:
    path = state / "run" / "monitor.prom"
    return path.read_text() if path.exists() else ""


def sample(text: str, name: str, labels: str) -> float | None:
    m = re.search(rf"^{name}{{{re.escape(labels)}[^}}]*}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_for(what, timeout: float = 60, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


class Daemon:
    """`thinstack monitor` as systemd runs it, stopped with SIGTERM."""

    def __init__(self, state: Path, interval: float):
        self.log = state / "monitor.log"
        self.proc = subprocess.Popen([*MONITOR, "--interval", str(interval)],
                                     stderr=open(self.log, "w"), stdout=subprocess.DEVNULL)
        wait_for(lambda: metrics(state) or self.proc.poll() is not None, timeout=60)
        assert self.proc.poll() is None, self.output()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.output()
        return self.output()

    def output(self) -> str:
        return self.log.read_text()


def pattern(offset: int, length: int) -> bytes:
    """Each 16 bytes name the 64 KiB they belong to: a misplaced or stale block shows. Cheaper
    than tests.patterns' hashes, which cannot keep up with these writers in the lab."""
    unit = 64 << 10
    return b"".join((o.to_bytes(8, "little") + b"thinstck") * (unit // 16)
                    for o in range(offset, offset + length, unit))


class Writer:
    """O_DIRECT writes of `block` bytes from an aligned buffer, from `start` on, paced to `rate`
    bytes/s."""

    def __init__(self, path: str, rate: float | None, start: int = 0, block: int = BLOCK):
        self.path, self.rate, self.start = path, rate, start
        self.buf = mmap.mmap(-1, block)
        self.written = start  # the offset up to which every write landed
        self.slowest = 0.0  # the longest single write: a queued (full) pool shows here
        self.elapsed = 0.0

    def write_until(self, end: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        began = time.monotonic()
        try:
            while self.written < end:
                self.buf[:] = pattern(self.written, len(self.buf))
                t = time.monotonic()
                os.pwrite(fd, self.buf, self.written)
                self.slowest = max(self.slowest, time.monotonic() - t)
                self.written += len(self.buf)
                if self.rate:
                    time.sleep(max(0.0, began + (self.written - self.start) / self.rate
                                   - time.monotonic()))
        finally:
            self.elapsed = time.monotonic() - began
            os.close(fd)
