"""reclaim against the real kernel: all-zero chunks go back to the pool while a reader and
writers use the volume, no acknowledged write is lost (one writer rewrites the zero region
between the scan and the discards: the race reclaim must win), delete returns space at once,
and a kill at each of reclaim's fault points leaves what `recover` puts right."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.labtools import assert_pool_consistent, sh, ts
from tests.patterns import (
    BLOCK,
    blocks_match,
    digest,
    is_zero,
    pattern,
    read_direct,
    write_blocks,
)
from thinstack import faults

MiB = 1 << 20
VOL = "/dev/vg0/vm"
ZEROS = range(0, 64 * MiB, BLOCK)  # written as zeros, plainly: mapped, all zero
LATE = range(32 * MiB, 48 * MiB, BLOCK)  # part of ZEROS a writer rewrites during the reclaim
DATA = range(64 * MiB, 128 * MiB, BLOCK)  # pattern data a reader checks throughout
BUSY = range(160 * MiB, 192 * MiB, BLOCK)  # mapped data a second writer keeps rewriting
PRIVATE = "/dev/mapper/vg0-vm-reclaim"


def used() -> int:
    return json.loads(ts("pool", "status", "vg0", "--json").stdout)[0]["data_used"]


def write_zeros(offsets) -> None:
    """Plain writes of zeros (no discard): the pool maps every chunk."""
    write_blocks_raw(VOL, {o: bytes(BLOCK) for o in offsets})


def write_blocks_raw(dev: str, blocks: dict[int, bytes]) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BLOCK)
        for off, data in blocks.items():
            buf[:] = data
            assert os.pwritev(fd, [buf], off) == BLOCK
        os.fsync(fd)
    finally:
        os.close(fd)


def reclaim(*, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return ts("reclaim", "vg0/vm", "--json", env=env, check=check)


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_reclaim_returns_zero_chunks_live_and_recovers_from_kills(vg):
    ts("create", "vg0/vm", "--size", "256M")
    write_zeros(ZEROS)
    write_blocks(VOL, "data", list(DATA))
    write_blocks(VOL, "busy0", list(BUSY))
    before = used()
    status = sh("dmsetup", "status", "vg0-pool-tpool")
    print("pool:", status.strip())  # discard_passdown or no_discard_passdown, for the report

    stop, errors = threading.Event(), []
    last: dict[int, str] = {o: "busy0" for o in BUSY}  # each chunk's last acknowledged write
    late_done: list[int] = []

    def reader() -> None:  # what readers see never changes: data stays, zeros stay zeros
        while not stop.is_set():
            for o in (DATA[0], DATA[-1], ZEROS[0], ZEROS[-1]):
                want = pattern("data", o) if o in DATA else bytes(BLOCK)
                if read_direct(VOL, o) != want:
                    errors.append(f"reader saw changed bytes at {o}")

    def busy_writer() -> None:
        round_ = 0
        while not stop.is_set():
            round_ += 1
            for o in BUSY[round_ % 8::8]:
                write_blocks(VOL, f"busy{round_}", [o])
                last[o] = f"busy{round_}"

    def late_writer() -> None:
        # Starts once reclaim has scanned (its private device is up): these chunks were zero
        # when scanned and are written before or between its batches.
        deadline = time.monotonic() + 120
        while not os.path.exists(PRIVATE):
            if time.monotonic() > deadline or stop.is_set():
                errors.append("reclaim's private device never appeared")
                return
            time.sleep(0.005)
        for o in LATE:
            write_blocks(VOL, "late", [o])
            late_done.append(o)

    threads = [threading.Thread(target=f) for f in (reader, busy_writer, late_writer)]
    for t in threads:
        t.start()
    try:
        summary = json.loads(reclaim().stdout)
    finally:
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    print("reclaim:", summary)
    assert not errors, errors[:5]
    assert len(late_done) == len(LATE)
    # Every acknowledged write is there, and the data byte for byte.
    assert blocks_match(VOL, "late", list(LATE))
    assert blocks_match(VOL, "data", list(DATA))
    for o, seed in last.items():
        assert blocks_match(VOL, seed, [o]), f"lost the write {seed} at {o}"
    assert is_zero(VOL, [o for o in ZEROS if o not in LATE])
    # The whole zero region was a candidate; the pool gave back exactly what holds only zeros.
    chunk = summary["chunk_size"]
    assert summary["candidate_chunks"] == len(ZEROS) * BLOCK // chunk
    assert summary["bytes_discarded"] == summary["discarded_chunks"] * chunk
    assert 48 * MiB <= summary["bytes_discarded"] <= 64 * MiB
    assert summary["pool_used_before"] == before
    assert used() == before - 48 * MiB
    assert not os.path.exists(PRIVATE)
    assert sh("dmsetup", "info", "-c", "--noheadings", "-o", "suspended", "vg0-vm").strip() \
        == "Active"
    # Nothing left to give back: a second run discards nothing and changes nothing.
    again = json.loads(reclaim().stdout)
    assert again["discarded_chunks"] == 0 and again["suspensions"] == 0
    assert used() == before - 48 * MiB

    # Who uses the space: list biggest first, and the monitor's per-volume metrics.
    ts("create", "vg0/other", "--size", "64M")
    write_blocks("/dev/vg0/other", "other", list(range(0, 32 * MiB, BLOCK)))
    listed = json.loads(ts("list", "vg0", "--sort", "exclusive", "--json").stdout)
    assert [(v["name"], v["exclusive_bytes"]) for v in listed] == [("vm", 112 * MiB),
                                                                   ("other", 32 * MiB)]
    ts("monitor", "--once")
    prom = (Path(os.environ["THINSTACK_RUN_DIR"]) / "monitor.prom").read_text().splitlines()
    for name, size in (("vm", 112 * MiB), ("other", 32 * MiB)):
        for metric in ("mapped", "exclusive"):
            assert f'thinstack_volume_{metric}_bytes{{vg="vg0",pool="pool",volume="{name}"}} ' \
                f"{size}" in prom, prom
    # Deleting a volume returns its space at once.
    full = used()
    ts("delete", "vg0/other")
    assert used() == full - 32 * MiB

    # Killed at each point (mid-batch: the volume suspended, the private device up), `recover`
    # resumes the volume, removes the device, and the data is as it was.
    for point in faults.POINTS["reclaim"]:
        write_zeros([o for o in ZEROS if o not in LATE])
        killed = reclaim(env={"THINSTACK_FAULT": f"reclaim:{point}"}, check=False)
        assert killed.returncode == -9, (point, killed.stderr)
        if point == "mid-batch":
            assert "Suspended" in sh("dmsetup", "info", "-c", "--noheadings", "-o", "suspended",
                                     "vg0-vm")
            assert os.path.exists(PRIVATE)
        ts("recover", "vg0")
        assert not os.path.exists(PRIVATE), point
        write_blocks(VOL, "after", [LATE[0]])  # would hang on a volume left suspended
        assert blocks_match(VOL, "after", [LATE[0]])
        write_blocks(VOL, "late", [LATE[0]])
        assert blocks_match(VOL, "data", list(DATA))
        assert blocks_match(VOL, "late", list(LATE))
        assert is_zero(VOL, [o for o in ZEROS if o not in LATE])
        assert_pool_consistent("vg0")
    # What a snapshot shares stays its own: reclaim unmaps the chunks from the volume only, the
    # snapshot's bytes do not change, and deleting the snapshot gives the rest back.
    ts("snapshot", "vg0/vm", "snap")
    snap = digest("/dev/vg0/snap", 256 * MiB)
    assert json.loads(reclaim().stdout)["discarded_chunks"] > 0
    assert digest("/dev/vg0/snap", 256 * MiB) == snap
    assert is_zero(VOL, [o for o in ZEROS if o not in LATE])
    ts("delete", "vg0/snap")
    assert used() == before - 48 * MiB
    # A pool that ran out of space (failing writes at once) takes writes again after a reclaim.
    sh("lvchange", "-q", "--errorwhenfull", "y", "vg0/pool")
    ts("create", "vg0/fill", "--size", "1G")
    filled = subprocess.run(["dd", "if=/dev/zero", "of=/dev/vg0/fill", "bs=4M", "oflag=direct",
                             "status=none"], capture_output=True, text=True)
    assert "No space left" in filled.stderr, filled.stderr
    assert "out_of_data_space" in sh("dmsetup", "status", "vg0-pool-tpool")
    freed = json.loads(ts("reclaim", "vg0/fill", "--json").stdout)
    assert freed["pool_used_after"] == freed["pool_used_before"] - freed["bytes_discarded"]
    assert " rw " in sh("dmsetup", "status", "vg0-pool-tpool")
    write_blocks("/dev/vg0/fill", "fill", [0])
    assert blocks_match("/dev/vg0/fill", "fill", [0])
    ts("delete", "vg0/fill")
    assert used() == before - 48 * MiB
    # Nothing may write a gold master: refused in one line; an unknown volume is not found.
    ts("create", "vg0/gold", "--size", "8M")
    ts("gold", "vg0/gold")
    for ref, status, text in (("vg0/gold", 5, "gold master"), ("vg0/nosuch", 3, "no such")):
        done = ts("reclaim", ref, check=False)
        assert done.returncode == status and text in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
