"""`thinstack import --live` against the real kernel (dm-clone, nbd, qemu-nbd): the volume is
usable at once and reads as the source while the copy runs, a writer's bytes survive, the end is
an ordinary thin volume holding exactly the image's chunks plus the writes; refusals while it
copies; a kill at every fault point leaves nothing after `recover`; a dead source is served
again by the monitor and the copy completes."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labtools import assert_pool_consistent, lvs, sh, ts, wait_for
from thinstack import faults

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB
SIZE = 64 * MiB
# Data (offset, length, byte), a zero extent and holes between: regions the plan discards.
DATA = [(0, 1 * MiB, 0xab), (10 * MiB, 3 * MiB, 0xcd), (30 * MiB + 8 * KiB, 4 * KiB, 0x5a),
        (44 * MiB, 12 * MiB, 0x77), (60 * MiB, 4 * MiB, 0x99)]
ZERO = (20 * MiB, 2 * MiB)


def make_vg(disk: str) -> None:
    # The disk holds non-zero bytes first: a chunk that ever showed them would be caught.
    sh("sh", "-c", f"tr '\\0' '\\377' < /dev/zero | dd of={disk} bs=1M count=400 2>/dev/null")
    sh("pvcreate", "-q", disk)
    sh("vgcreate", "-q", "vg0", disk)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "300M", "-Zy", "--chunksize", "64k", "-n",
       "pool", "--addtag", "ts_pool", "vg0")


def make_source(folder: Path) -> tuple[Path, bytearray]:
    """A qcow2 image and its bytes as qemu reads them."""
    image = folder / "src.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    ops = [f"write -P {b} {o} {n}" for o, n, b in DATA] + [f"write -z {ZERO[0]} {ZERO[1]}"]
    sh("qemu-io", *(a for op in ops for a in ("-c", op)), str(image))
    expect = bytearray(SIZE)
    for o, n, b in DATA:
        expect[o:o + n] = bytes([b]) * n
    return image, expect


def nonzero_chunks(data: bytes | bytearray) -> int:
    zero = bytes(CHUNK)
    return sum(data[i:i + CHUNK] != zero for i in range(0, len(data), CHUNK))


def read(path: str, size: int = SIZE) -> bytes:
    """The device's bytes, a MiB at a time: a failed read raises (one large read would return
    what came before the failure instead)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, MiB, offset) for offset in range(0, size, MiB))
    finally:
        os.close(fd)


def write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def mapped_chunks(name: str) -> int:
    words = sh("dmsetup", "status", f"vg0-{name}").split()  # 0 LEN thin MAPPED HIGHEST
    assert words[2] == "thin", words
    return int(words[3]) * 512 // CHUNK


def nothing_left(name: str) -> None:
    """No volume, dm device, server, nbd connection or record of a live import of `name`."""
    assert not {name, f"{name}.clonemeta"} & set(lvs("vg0")), lvs("vg0")
    assert not [d for d in sh("dmsetup", "ls").split() if d.startswith(f"vg0-{name}")]
    assert not [p for p in Path("/sys/block").glob("nbd*") if (p / "pid").exists()]
    assert not live_servers()
    assert not list(Path(os.environ["THINSTACK_STATE_DIR"]).glob("live/*.json"))
    assert not list(Path(os.environ["THINSTACK_STATE_DIR"]).glob("journal/*.json"))


def live_servers() -> list[int]:
    """The processes a live import runs: the qemu-nbd processes thinstack started (their pid
    file is under its run folder) and the pacers of `--rate`."""
    run = os.environ["THINSTACK_RUN_DIR"].encode()
    return [pid for pid, argv in processes()
            if argv[0].endswith(b"qemu-nbd") and any(a.startswith(run) for a in argv)] + pacers()


def pacers() -> list[int]:
    return [pid for pid, argv in processes() if b"thinstack.pacer" in argv]


def processes() -> list[tuple[int, list[bytes]]]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0]:  # (not a kernel thread, nor a zombie)
            found.append((int(proc.name), argv))
    return found


def ordinary(name: str) -> None:
    """What a finished live import leaves: LVM's own active thin volume, nothing else."""
    row = lvs("vg0")[name]
    assert row["lv_attr"][4] == "a" and "ts_live" not in row["lv_tags"], row
    assert row["lv_skip_activation"] in ("", "0", "false"), row
    assert f"{name}.clonemeta" not in lvs("vg0")
    assert sh("dmsetup", "table", f"vg0-{name}").split()[2] == "thin"
    assert not [d for d in sh("dmsetup", "ls").split() if d.startswith(f"vg0-{name}-")]
    assert not [p for p in Path("/sys/block").glob("nbd*") if (p / "pid").exists()]
    assert not live_servers()


def throttled_server(folder: Path, image: Path, bytes_per_second: int) -> tuple[str, int]:
    """A qemu-nbd on a unix socket reading `image` at a bounded rate: an NBD source slow enough
    that the live import is still copying while the test reads and writes."""
    sock, pidf = folder / "src.sock", folder / "src.pid"
    sock.unlink(missing_ok=True)  # left by a server that was killed
    spec = {"driver": "throttle", "throttle-group": "tg",
            "file": {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}}
    sh("qemu-nbd", "--fork", "--persistent", "--read-only", "-x", "disk", "-k", str(sock),
       "--pid-file", str(pidf), "--object", f"throttle-group,id=tg,x-bps-read={bytes_per_second}",
       "json:" + json.dumps(spec))
    return f"nbd+unix:///disk?socket={sock}", int(pidf.read_text())


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_live_import_oracle(lab_disks, tmp_path):
    make_vg(lab_disks[0])
    image, expect = make_source(tmp_path)

    # A file source, to the end: identical, exactly the image's chunks, an ordinary volume.
    done = json.loads(ts("import", "--live", "--wait", "--json", str(image), "vg0/a").stdout)
    assert done["finished"] and done["to_copy"] == sum(n for _, n, _ in DATA) + 60 * KiB
    assert read("/dev/vg0/a") == expect
    assert "identical" in sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "/dev/vg0/a",
                             str(image))
    assert mapped_chunks("a") == nonzero_chunks(expect)
    ordinary("a")

    # An NBD source at 4 MiB/s: the volume is usable while the kernel is still copying.
    url, server = throttled_server(tmp_path, image, 4 * MiB)
    ts("import", "--live", url, "vg0/v")
    # The copy paused while the test looks (UML's slow processes would let it finish): which
    # regions are copied is then known (a partial write copies its region first).
    sh("dmsetup", "message", "vg0-v", "0", "disable_hydration")
    (st,) = json.loads(ts("import", "--status", "--json", "vg0/v").stdout)
    assert st["state"] == "hydrating" and st["copied"] < st["total"] and st["source_up"]
    for argv in (["snapshot", "vg0/v", "s"], ["resize", "vg0/v", "128M"], ["gold", "vg0/v"],
                 ["export", "vg0/v", str(tmp_path / "e.raw")], ["delete", "vg0/v"]):
        r = ts(*argv, check=False)
        assert r.returncode == 5 and "still being imported live" in r.stderr \
            and "--wait" in r.stderr, (argv, r.stderr)
    assert "v.clonemeta" not in ts("list", "vg0").stdout
    # list and info show how far the copy is, as --status does.
    (shown,) = [i for i in json.loads(ts("list", "vg0", "--json").stdout) if i["name"] == "v"]
    copying = shown["hydration"]
    assert shown["active"] and copying["state"] == "hydrating", shown
    assert (copying["total"], copying["source_up"]) == (st["total"], True), shown
    assert st["copied"] <= copying["copied"] < copying["total"], shown  # (copies in flight end)
    assert json.loads(ts("info", "vg0/v", "--json").stdout)["hydration"]["total"] == st["total"]
    assert "(copying in " in ts("list", "vg0").stdout
    assert json.loads(ts("info", "vg0/a", "--json").stdout)["hydration"] is None

    # Reads during the copy equal the source. Writes: half a region inside a data region not
    # yet copied, then into that region again (copied now), half a region inside a discarded
    # hole (the pool zeroes the rest of its chunk), a whole region not yet copied.
    assert read("/dev/vg0/v") == expect
    writes = [(50 * MiB + 16 * KiB, b"\x22" * 32 * KiB), (50 * MiB + 56 * KiB, b"\x11" * 4 * KiB),
              (40 * MiB + 16 * KiB, b"\x33" * 32 * KiB), (63 * MiB, b"\x44" * 64 * KiB)]
    for offset, data in writes:
        write("/dev/vg0/v", offset, data)
        expect[offset:offset + len(data)] = data
    assert read("/dev/vg0/v") == expect
    (st,) = json.loads(ts("import", "--status", "--json", "vg0/v").stdout)
    assert st["state"] == "hydrating", st
    sh("dmsetup", "message", "vg0-v", "0", "enable_hydration")

    # A reader and a writer hold the device open across the finish.
    holder = os.open("/dev/vg0/v", os.O_RDWR)
    try:
        ts("import", "--live", "--wait", "vg0/v", timeout=600)
        os.pwrite(holder, b"\x55" * 4 * KiB, 5 * MiB)
        os.fsync(holder)
        expect[5 * MiB:5 * MiB + 4 * KiB] = b"\x55" * 4 * KiB
        assert os.pread(holder, SIZE, 0) == expect
    finally:
        os.close(holder)
    ordinary("v")
    assert read("/dev/vg0/v") == expect
    (tmp_path / "expect.raw").write_bytes(expect)
    assert "identical" in sh("qemu-img", "compare", "-f", "raw", "-F", "raw", "/dev/vg0/v",
                             str(tmp_path / "expect.raw"))
    assert mapped_chunks("v") == nonzero_chunks(expect)
    assert json.loads(ts("import", "--status", "--json").stdout) == []

    # Abort while copying: nothing is left.
    ts("import", "--live", url, "vg0/w")
    ts("import", "--live", "--abort", "vg0/w")
    nothing_left("w")
    os.kill(server, signal.SIGTERM)
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_a_guest_vg_named_as_the_hosts_is_never_seen(lab_disks, tmp_path):
    """An image holding the guest's own LVM, its VG named as the host's (installers name them
    alike): while it is copied in, its PV shows on the nbd device, the clone and its
    destination. LVM would then refuse every command naming the host's VG (two VGs, one name),
    and the import could not even finish. thinstack's LVM commands never see those devices."""
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    loop = sh("losetup", "-f", "--show", str(raw)).strip()
    only_loop = f'devices{{filter=["a|^{loop}$|","r|.*|"]}}'
    try:
        sh("pvcreate", "-q", "--config", only_loop, loop)
        # No LV inside: the name alone is the hazard, and an LV would be activated on the loop
        # device by udev's 69-lvm rules (without systemd they run vgchange -aay), holding it.
        sh("vgcreate", "-q", "--config", only_loop, "vg0", loop)
    finally:
        sh("losetup", "-d", loop)
    # The kernel lets go of a loop device at its last close (udev's probe may still hold it):
    # until then the host's vgcreate below would find a vg0 already.
    sh("udevadm", "settle")
    wait_for(lambda: not sh("losetup", "-j", str(raw)).strip(), timeout=120)
    image = tmp_path / "guest.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    make_vg(lab_disks[0])  # after the guest's vg0: LVM refuses a second VG of one name

    ts("import", "--live", str(image), "vg0/g")
    assert sh("dmsetup", "info", "-c", "--noheadings", "-o", "name", "vg0-g-clonedest")
    # LVM unfiltered sees the guest's VG: the hazard is real in this lab.
    seen = subprocess.run(["vgs", "--noheadings", "-o", "vg_name"], capture_output=True,
                          text=True).stdout.split()
    assert seen.count("vg0") == 2, seen
    # thinstack's commands on the host's vg0 work, the import included.
    assert "vg0/g" in ts("list", "vg0").stdout
    ts("create", "vg0/other", "--size", "8M")
    assert json.loads(ts("pool", "status", "vg0", "--json").stdout)
    ts("import", "--live", "--wait", "vg0/g")
    ordinary("g")
    assert read("/dev/vg0/g") == raw.read_bytes()
    # Now an LV, which LVM does not scan: one vg0 again, for LVM itself too.
    assert sh("vgs", "--noheadings", "-o", "vg_name").split() == ["vg0"]
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_live_import_waits_for_a_full_pool_and_goes_on(lab_disks, tmp_path):
    """A pool at its limit fills mid-copy: the kernel's copy writes fail, the copy says it
    waits for its pool (status, list, an alert), reads still equal the image, and once the
    limit is raised the copy finishes by itself, nothing copied lost. And --rate bounds a
    copy."""
    image = tmp_path / "big.raw"
    image.write_bytes(os.urandom(96 * MiB))
    ts("pool", "create", "vg0", lab_disks[0], "--name", "t1", "--size", "48M", "--limit", "48M")
    ts("monitor", "--once")  # at its limit: it errors when full
    ts("import", "--live", "--format", "raw", str(image), "vg0/v", "--pool", "t1")

    def waiting():
        (st,) = json.loads(ts("import", "--status", "--json", "vg0/v").stdout)
        return st if st["waiting"] else None

    st = wait_for(waiting, timeout=120, step=1)
    assert st["state"] == "hydrating" and st["copied"] < st["total"], st
    assert "its pool vg0/t1 is full" in st["waiting"], st
    assert "WAITING: its pool vg0/t1 is full" in ts("import", "--status", "vg0/v").stdout
    alert = ts("monitor", "--once", check=False)
    assert alert.returncode == 7 and "ALERT vg0/v: its pool vg0/t1 is full" in alert.stderr, \
        alert.stderr
    assert read("/dev/vg0/v", 96 * MiB) == image.read_bytes()  # uncopied regions: the image
    ts("pool", "set", "vg0/t1", "--limit", "256M")
    ts("import", "--live", "--wait", "vg0/v", timeout=600)
    ordinary("v")
    assert read("/dev/vg0/v", 96 * MiB) == image.read_bytes()

    # --rate bounds the background copy, not the guest: the pacer turns the kernel's copy on
    # and off, so 16 MiB at 512 KiB/s take about 32 s to copy (about 1 s unbounded here), while
    # the guest reads what is not copied yet at the source's own speed (a throttle on the
    # source, as before, made it wait 16 s for the second half; a loaded CI host reads it in
    # about 5).
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(16 * MiB))
    ts("import", "--live", "--rate", "512K", "--format", "raw", str(small), "vg0/r",
       "--pool", "t1")
    started = time.monotonic()
    (pacer,) = wait_for(pacers, timeout=30)
    fd = os.open("/dev/vg0/r", os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, MiB)  # (O_DIRECT wants an aligned buffer)
        second_half = b""
        for offset in range(8 * MiB, 16 * MiB, MiB):
            os.preadv(fd, [buffer], offset)
            second_half += buffer[:]
    finally:
        os.close(fd)
    read_in = time.monotonic() - started
    assert second_half == small.read_bytes()[8 * MiB:]
    assert read_in < 12, read_in  # 8 MiB: faster than the copy's 512 KiB/s would allow
    (st,) = json.loads(ts("import", "--status", "--json", "vg0/r").stdout)
    assert st["copied"] <= 512 * 1024 * (time.monotonic() - started + 1) + 4 * MiB, st
    # Killed, the pacer is started again by the monitor's pass (the copy waits meanwhile).
    os.kill(pacer, signal.SIGKILL)
    r = ts("monitor", "--once", check=False)
    assert "vg0/r: its pacer is started again" in r.stderr, r.stderr
    ts("import", "--live", "--wait", "vg0/r", timeout=600)
    assert time.monotonic() - started > 0.5 * 16 * 2
    assert read("/dev/vg0/r", 16 * MiB) == small.read_bytes()
    ordinary("r")  # (and no pacer left)
    assert_pool_consistent("vg0", ("t1",))


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_live_import_faults_and_source_failure(lab_disks, tmp_path):
    make_vg(lab_disks[0])
    image, expect = make_source(tmp_path)

    # Killed at every fault point: `recover` removes everything.
    for point in faults.POINTS["live-import"]:
        r = ts("import", "--live", "--rate", "64M", str(image), "vg0/v", check=False,
               env={"THINSTACK_FAULT": f"live-import:{point}"})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
        ts("recover", "vg0")
        nothing_left("v")
    assert_pool_consistent("vg0")

    # The source's server dies mid-copy: unhydrated reads fail with EIO, `monitor --once`
    # alerts (exit 7) and serves it again, and the copy completes from where it was.
    url, server = throttled_server(tmp_path, image, 2 * MiB)
    ts("import", "--live", url, "vg0/v")
    sh("dmsetup", "message", "vg0-v", "0", "disable_hydration")  # regions surely left to copy
    pid = int(next(Path(os.environ["THINSTACK_RUN_DIR"]).glob("live/vg0-v.pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(OSError) as failed:
        read("/dev/vg0/v")
    assert failed.value.errno == 5  # EIO
    (st,) = json.loads(ts("import", "--status", "--json", "vg0/v").stdout)
    assert not st["source_up"]
    # thinstack's server is started again over the same NBD source while that is up...
    r = ts("monitor", "--once", check=False)
    assert r.returncode == 0 and "served again" in r.stderr, r.stderr
    # The server came back on another nbd device (the clone held the old one open), and the
    # clone's reload turned the copy on: paused again, or the copy may end before the next
    # pass looks (it did, once the monitor's pass took a second more).
    sh("dmsetup", "message", "vg0-v", "0", "disable_hydration")
    (st,) = json.loads(ts("import", "--status", "--json", "vg0/v").stdout)
    assert st["source_up"], st
    # ... and while the NBD server itself is gone, the monitor alerts until it is back.
    pid = int(next(Path(os.environ["THINSTACK_RUN_DIR"]).glob("live/vg0-v.pid")).read_text())
    os.kill(pid, signal.SIGKILL)
    os.kill(server, signal.SIGKILL)
    r = ts("monitor", "--once", check=False)
    assert r.returncode == 7 and "source is down" in r.stderr, (r.returncode, r.stderr)
    metrics = (Path(os.environ["THINSTACK_RUN_DIR"]) / "monitor.prom").read_text()
    assert 'thinstack_alert{vg="vg0",live="v"} 1' in metrics, metrics
    url, server = throttled_server(tmp_path, image, 4 * MiB)
    assert ts("monitor", "--once", check=False).returncode == 0
    sh("dmsetup", "message", "vg0-v", "0", "enable_hydration")
    # Killed after the table reload of the finish: the next finish completes it.
    r = ts("import", "--live", "--wait", "vg0/v", check=False, timeout=600,
           env={"THINSTACK_FAULT": "live-finish:after-reload"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    ts("import", "--live", "--wait", "vg0/v")
    ordinary("v")
    assert read("/dev/vg0/v") == expect
    assert mapped_chunks("v") == nonzero_chunks(expect)
    os.kill(server, signal.SIGTERM)
    assert_pool_consistent("vg0")


REBOOT_FIRST = """
set -e
export THINSTACK_STATE_DIR=$S/ts
tr '\\0' '\\377' < /dev/zero | dd of=/dev/ubdb bs=1M count=300 2>/dev/null
pvcreate -q /dev/ubdb; vgcreate -q vg0 /dev/ubdb
lvcreate -q --type thin-pool -L 200M -Zy --chunksize 64k -n pool --addtag ts_pool vg0
qemu-img create -q -f qcow2 $S/src.qcow2 64M
qemu-io -c 'write -P 0xcd 4M 40M' -c 'write -P 0x99 60M 4M' $S/src.qcow2 >/dev/null
serve() {
  rm -f $S/s.sock
  qemu-nbd --fork --persistent --read-only -x disk -k $S/s.sock --object \\
    throttle-group,id=tg,x-bps-read=2097152 'json:{"driver":"throttle","throttle-group":"tg",
    "file":{"driver":"qcow2","file":{"driver":"file","filename":"'$S'/src.qcow2"}}}'
}
serve
$PY -m thinstack.cli import --live "nbd+unix:///disk?socket=$S/s.sock" vg0/v
sleep 3
dmsetup message vg0-v 0 disable_hydration
printf '\\042%.0s' $(seq 4096) | dd of=/dev/vg0/v bs=4096 seek=$((50 * 256 + 4)) \\
  conv=fsync,notrunc 2>/dev/null
dmsetup status vg0-v
"""

REBOOT_SECOND = """
set -e
export THINSTACK_STATE_DIR=$S/ts
rm -f $S/s.sock
qemu-nbd --fork --persistent --read-only -x disk -k $S/s.sock --object \\
  throttle-group,id=tg,x-bps-read=2097152 'json:{"driver":"throttle","throttle-group":"tg",
  "file":{"driver":"qcow2","file":{"driver":"file","filename":"'$S'/src.qcow2"}}}'
$PY -m thinstack.cli pool attach
dmsetup status vg0-v
$PY -m thinstack.cli import --live --wait vg0/v
qemu-img convert -O raw $S/src.qcow2 $S/expect.raw
printf '\\042%.0s' $(seq 4096) | dd of=$S/expect.raw bs=4096 seek=$((50 * 256 + 4)) conv=notrunc \\
  2>/dev/null
cmp /dev/vg0/v $S/expect.raw && echo SAME
lvs --noheadings -o lv_name,lv_attr,lv_tags vg0
"""


@pytest.mark.skipif(os.environ.get("THINSTACK_IN_LAB") == "1", reason="boots its own labs")
def test_live_import_survives_a_reboot(tmp_path):
    """Powered off mid-copy (a write flushed before): `pool attach` at the next boot serves the
    source again and restores the clone from its metadata; nothing copied is lost, the write
    is there, and the copy finishes."""
    state = tmp_path / "state"

    def boot(script: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "thinstack.cli", "lab", "run", "--disks", "1", "--disk-size",
             "1G", "--state", str(state), "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "S": str(state), "PY": sys.executable}, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def hydrated(out: str) -> int:
        line = next(line for line in out.splitlines() if " clone " in line)
        return int(line.split()[6].split("/")[0])  # 0 LEN clone MB USED/TOTAL REGION H/T ...

    before = hydrated(boot(REBOOT_FIRST))
    out = boot(REBOOT_SECOND)
    assert hydrated(out) >= before > 0
    assert "SAME" in out
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["v"]]
    assert row[1][4] == "a" and len(row) == 2, row  # active, no ts_live tag: ordinary
