"""The monitor against a real kernel: pools and CoW stores grow ahead of direct-I/O writers, and a
volume group without room turns into ENOSPC and an alert instead of a hang."""

from __future__ import annotations

import errno
import re
import subprocess

import pytest

from tests import patterns
from tests.labtools import BLOCK, MONITOR, Daemon, Writer, metrics, pattern, sample, wait_for
from tests.patterns import read_direct

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(autouse=True)
def state(tmp_path):
    """The test's folder (state/ and run/ under it), with the kernel log cleared."""
    subprocess.run(["dmesg", "-C"], check=True)
    return tmp_path


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def pool_vg(disk: str, *, size: str, step: int) -> None:
    sh("pvcreate", "-q", disk)
    sh("vgcreate", "-q", "vg", disk)
    sh("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", size, "-n", "pool", "vg")
    sh("lvchange", "-q", "--addtag", "ts_pool", "--addtag", "ts_grow_threshold=70",
       "--addtag", f"ts_grow_step={step}", "vg/pool")


def lv_field(ref: str, field: str) -> str:
    return sh("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", field, ref).strip()


def vg_free() -> int:
    return int(sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", "vg"))


def pool_status() -> str:
    return sh("dmsetup", "status", "vg-pool-tpool")


def dmesg() -> str:
    return sh("dmesg")


@pytest.mark.lab(disks=1, disk_size="2G", timeout=600)
def test_pool_grows_ahead_of_a_direct_io_writer(lab_disks, state):
    pool_vg(lab_disks[0], size="256M", step=32 * MiB)
    sh("lvcreate", "-q", "-y", "-V", "4G", "-n", "disk", "--thinpool", "pool", "vg")
    assert lv_field("vg/pool", "seg_monitor") == "monitored"  # LVM's lvcreate registered it
    daemon = Daemon(state, interval=1)
    # Measured in the lab: the first growth is live 2-3 s after the pool crosses its threshold
    # (the whole lvextend takes 1.5-5 s), so the 30% above it (77 MiB) lasts a writer of
    # 16 MiB/s until then; later steps grow with the measured rate.
    writer = Writer("/dev/vg/disk", rate=16 * MiB)
    writer.write_until(GiB)  # no OSError: every write landed
    log = daemon.stop()
    print(f"wrote 1 GiB in {writer.elapsed:.1f} s, slowest write {writer.slowest:.2f} s\n{log}")
    assert int(lv_field("vg/pool", "lv_size")) > GiB
    # The service took the pool over from dmeventd, whose lvextend at every 5% over 50% would
    # take the VG's lock while the monitor's own lvextend races the writer.
    assert lv_field("vg/pool", "seg_monitor") == "not monitored"
    assert "out-of-data-space" not in dmesg(), dmesg()
    assert "queue_if_no_space" in pool_status()
    assert writer.slowest < 5
    steps = [float(m) for m in re.findall(r"grew data by ([\d.]+)MiB", log)]
    assert len(steps) >= 3, log
    assert max(steps) > 32, log  # the step grew with the measured write rate
    assert read_direct("/dev/vg/disk", GiB - BLOCK, BLOCK) == pattern(GiB - BLOCK, BLOCK)


@pytest.mark.lab(disks=2, disk_size="512M", timeout=600)
def test_full_vg_fails_writers_fast_and_recovers_after_vgextend(lab_disks, state):
    pool_vg(lab_disks[0], size="256M", step=64 * MiB)
    sh("lvcreate", "-q", "-y", "-V", "64M", "-n", "keep", "--thinpool", "pool", "vg")
    sh("lvcreate", "-q", "-y", "-V", "4G", "-n", "big", "--thinpool", "pool", "vg")
    kept = range(0, 64 * MiB, patterns.BLOCK)
    patterns.write_blocks("/dev/vg/keep", "keep", list(kept))
    daemon = Daemon(state, interval=1)
    writer = Writer("/dev/vg/big", rate=32 * MiB)
    with pytest.raises(OSError) as failed:
        writer.write_until(4 * GiB)
    print(f"ENOSPC after {writer.written / MiB:.0f} MiB in {writer.elapsed:.1f} s, slowest write "
          f"{writer.slowest:.2f} s")
    assert failed.value.errno == errno.ENOSPC
    # The kernel would fail queued writes itself after 60 s; the monitor must be far quicker.
    assert writer.slowest < 10, f"a write waited {writer.slowest:.1f} s"
    assert "error_if_no_space" in pool_status()
    wait_for(lambda: sample(metrics(state), "thinstack_alert", 'vg="vg",pool="pool"') == 1)
    log = daemon.stop()
    print(log)
    assert "ALERT vg/pool" in log, log
    assert vg_free() < 4 * MiB  # the pool took all the VG had

    once = subprocess.run(MONITOR + ["--once"], capture_output=True, text=True, timeout=120)
    assert once.returncode == 7, once.stderr
    assert "ALERT vg/pool" in once.stderr
    assert patterns.blocks_match("/dev/vg/keep", "keep", list(kept))

    sh("pvcreate", "-q", lab_disks[1])
    sh("vgextend", "-q", "vg", lab_disks[1])
    before = int(lv_field("vg/pool", "lv_size"))
    once = subprocess.run(MONITOR + ["--once"], capture_output=True, text=True, timeout=120)
    assert once.returncode == 0, once.stderr
    assert "queues writes when full" in once.stderr
    assert int(lv_field("vg/pool", "lv_size")) > before
    assert "queue_if_no_space" in pool_status()
    assert lv_field("vg/pool", "lv_when_full") == "queue"
    text = metrics(state)
    assert sample(text, "thinstack_alert", 'vg="vg",pool="pool"') == 0
    assert sample(text, "thinstack_pool_error_if_no_space", 'vg="vg",pool="pool"') == 0
    # Writers go on where they stopped.
    Writer("/dev/vg/big", rate=None, start=writer.written).write_until(writer.written + 16 * MiB)


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_cow_store_grows_under_writes(lab_disks, state):
    sh("pvcreate", "-q", lab_disks[0])
    sh("vgcreate", "-q", "vg", lab_disks[0])
    sh("lvcreate", "-q", "-y", "-L", "256M", "-n", "base", "vg")
    Writer("/dev/vg/base", rate=None).write_until(256 * MiB)
    sh("lvchange", "-q", "-pr", "vg/base")
    sh("lvcreate", "-q", "-y", "-s", "-L", "8M", "-n", "cow", "-p", "rw", "vg/base")
    sh("lvchange", "-q", "--addtag", f"ts_grow_step={8 * MiB}", "vg/cow")
    daemon = Daemon(state, interval=0.5)
    # CoW stores raise no event before they overflow: the poll is all there is, so the writer
    # must leave the monitor a poll and a command (~1.5 s) to use 30% of an 8 MiB store.
    writer = Writer("/dev/vg/cow", rate=1 * MiB, block=256 << 10)
    writer.write_until(40 * MiB)
    log = daemon.stop()
    print(f"CoW: wrote 40 MiB in {writer.elapsed:.1f} s\n{log}")
    attr = lv_field("vg/cow", "lv_attr")
    assert attr[4] != "I", f"the CoW volume became invalid: {attr}\n{log}"
    assert int(lv_field("vg/cow", "lv_size")) > 40 * MiB
    assert len(re.findall(r"grew CoW store", log)) >= 3, log
    assert read_direct("/dev/vg/cow", 36 * MiB, BLOCK) == pattern(36 * MiB, BLOCK)
    assert read_direct("/dev/vg/cow", 200 * MiB, BLOCK) == pattern(200 * MiB, BLOCK)


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_thinstacks_own_commands_leave_the_pools_event_armed(vg, tmp_path):
    """LVM writes a low-water mark into every pool table it loads: making or activating a thin
    volume reloads the pool. thinstack's commands carry the pool's threshold, so the kernel's
    event stays armed and the monitor has no pool to reload after them."""
    from tests.labtools import ts
    from thinstack.growth import DEFAULT_THRESHOLD, low_water_mark

    def mark() -> tuple[int, int]:
        table = sh("dmsetup", "table", "vg0-pool-tpool").split()
        data_blocks = int(sh("dmsetup", "status", "vg0-pool-tpool").split()[5].split("/")[1])
        return int(table[6]), low_water_mark(data_blocks, DEFAULT_THRESHOLD)

    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    for command in (("create", "vg0/a", "--size", "16M"), ("snapshot", "vg0/a", "s"),
                    ("gold", "vg0/a"), ("clone", "vg0/a", "vg0/c"),
                    ("import", str(image), "vg0/i"),
                    ("export", "--incremental", "--format", "qcow2", "vg0/i",
                     str(tmp_path / "i.qcow2")), ("pool", "extend", "vg0", "64M")):
        ts(*command)
        now, armed = mark()
        assert now == armed > 0, (command, now, armed)
