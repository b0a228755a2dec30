"""Disks that fail on purpose, and the fault workloads issue 13 measures, for tests/lab/
test_faults.py (small sizes, assertions) and bench/reliability_bench.py (long runs, figures).

A lab disk gets a device-mapper device stacked on it (linear while healthy; flakey, error or
delay when it misbehaves), the PV goes on that device, and thinstack's pool on the PV. Each
workload returns a dict of what it measured, so a test asserts on it and the bench records it.

Power cuts need two boots over the same `--state` disks: `cut_first` runs a workload in the
background, stops it at a random moment (SIGSTOP: the CPU halts), switches the disk to
drop_writes (nothing written from then on persists, not even the shutdown's metadata commits),
kills it and powers off; `cut_second`, in a new boot, brings the pool back as a boot would and
checks it. Run inside the lab: `python -m tests.faultdisks cut-first|cut-second STATE_DIR`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.labtools import assert_pool_consistent, lvs, sh, ts
from tests.patterns import blocks_match, pattern, write_blocks
from thinstack import growth
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import ThinPoolStatus
from thinstack.dm.targets import DelayTarget, FlakeyTarget, LinearTarget, Table, Target
from thinstack.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
DM = DeviceMapper()


def hide_raw_disks() -> None:
    """LVM sees PVs only on dm devices: the disk under a fault device carries the same PV label,
    and a duplicate PV makes LVM refuse changes. The lab's /etc is an overlay, gone at power-off,
    so the next boot finds the PV on the bare disk."""
    assert os.environ.get("THINSTACK_IN_LAB") == "1", "rewrites /etc/lvm/lvm.conf: lab only"
    Path("/etc/lvm/lvm.conf").write_text(
        'devices { global_filter = [ "a|^/dev/mapper/|", "a|^/dev/dm-|", "r|.*|" ] }\n')


def sectors(disk: str) -> int:
    return int(sh("blockdev", "--getsz", disk))


class FaultDisk:
    """A dm device over sectors [offset, offset + length) of `disk`, whose behaviour can be
    switched while it runs."""

    def __init__(self, name: str, disk: str, offset: int = 0, length: int | None = None):
        self.name, self.disk, self.offset = name, disk, offset
        self.length = length if length is not None else sectors(disk) - offset
        self.path = DM.create(name, Table.of(self.length, self.healthy())).path

    def healthy(self) -> Target:
        return LinearTarget(self.disk, self.offset)

    def switch(self, target: Target) -> None:
        """The new behaviour from the resume on; I/O in flight finishes under the old one.
        The resume does not wait for udev, whose LVM rules may wait for a lock that a stopped
        workload holds (a power cut)."""
        DM.load(self.name, Table.of(self.length, target))
        DM.suspend(self.name)
        sh("dmsetup", "resume", "--noudevsync", self.name)

    def error_writes(self) -> None:
        """Every write fails, reads still work (so the oracle can read what was there)."""
        self.switch(FlakeyTarget(self.disk, self.offset, 0, 86400, error_writes=True))

    def drop_writes(self) -> None:
        """Writes succeed but are never stored: a disk that lost power."""
        self.switch(FlakeyTarget(self.disk, self.offset, 0, 86400, drop_writes=True))

    def delay(self, ms: int) -> None:
        self.switch(DelayTarget(self.disk, self.offset, ms))

    def heal(self) -> None:
        self.switch(self.healthy())


def make_pool(vg: str, data_pv: str, meta_pv: str | None = None, size: str = "512M",
              options: tuple[str, ...] = ()) -> None:
    """vg on the PVs and thinstack's pool in it (`pool create VG`, a pool in an existing VG);
    with meta_pv, the pool's metadata alone on it (by LVM's hand: thinstack places no
    metadata), so data and metadata fail separately."""
    pvs = [data_pv, *([meta_pv] if meta_pv else [])]
    sh("pvcreate", "-q", *pvs)
    sh("vgcreate", "-q", vg, *pvs)
    if meta_pv is None:
        ts("pool", "create", vg, "--size", size, *options)
        return
    sh("lvcreate", "-q", "-L", "8M", "-n", "meta", vg, meta_pv)
    sh("lvcreate", "-q", "-L", size, "-n", "pool", "--addtag", "ts_pool", vg, data_pv)
    # The spare metadata LV (for repair) goes on the data PV, which stays healthy.
    sh("lvconvert", "-q", "-y", "--type", "thin-pool", "--poolmetadata", f"{vg}/meta", "-Zy",
       f"{vg}/pool", data_pv)


def pool_status(vg: str) -> ThinPoolStatus:
    status = DM.target_status(f"{vg}-pool-tpool")
    assert isinstance(status, ThinPoolStatus), status
    return status


def pool_mib(vg: str) -> int:
    return int(sh("lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size",
                  f"{vg}/pool")) // MiB


def pool_mode(vg: str) -> str:
    """The kernel's mode of the pool, with needs_check when the kernel flagged it."""
    if not DM.exists(f"{vg}-pool-tpool"):
        return "inactive"
    try:
        s = pool_status(vg)
    except Exception:  # noqa: BLE001  (a mode dm/status.py does not parse, e.g. Fail)
        return sh("dmsetup", "status", f"{vg}-pool-tpool").split(" thin-pool ")[-1].strip()
    return s.mode.value + (" needs_check" if s.needs_check else "")


_WRITER = """
import errno, sys
from tests.patterns import write_blocks
try:
    write_blocks(sys.argv[1], sys.argv[2], [int(sys.argv[3])])
    print("ok")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def timed_write(dev: str, seed: str, offset: int, limit: float = 120) -> tuple[str, float]:
    """One 64 KiB O_DIRECT write and fsync in a child process: its outcome ("ok", "EIO",
    "ENOSPC", ... or "hang" when it did not end within `limit` s) and how long it took."""
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", _WRITER, dev, seed, str(offset)],
                              capture_output=True, text=True, timeout=limit, cwd=ROOT)
        outcome = done.stdout.strip() or f"exit {done.returncode}: {done.stderr.strip()[-200:]}"
    except subprocess.TimeoutExpired:
        outcome = "hang"
    return outcome, round(time.monotonic() - start, 3)


def cli(*args: str, timeout: float = 300) -> dict:
    """A thinstack command as an operator runs it: exit status, last line of stderr, seconds."""
    start = time.monotonic()
    done = ts(*args, check=False, timeout=timeout)
    lines = done.stderr.strip().splitlines()
    return {"exit": done.returncode, "stderr": lines[-1] if lines else "",
            "traceback": "Traceback" in done.stderr,
            "seconds": round(time.monotonic() - start, 2)}


def cli_like(argv: list[str]) -> dict:
    """What cli() reports, for a command that is not thinstack's."""
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return {"exit": done.returncode, "stderr": " ".join(done.stderr.split())[-300:],
            "seconds": round(time.monotonic() - start, 2)}


def consistency(vg: str) -> str:
    """'clean', or why not (thin_check, thin ids against LVM's, unfinished volumes)."""
    try:
        assert_pool_consistent(vg)
        return "clean"
    except (AssertionError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return " ".join(str(detail).split())[:300]


# --- I/O errors on data and on metadata --------------------------------------------------------

OFFSETS = [0, 4 * MiB, 40 * MiB]


def data_errors(disk: str) -> dict:
    """Two volumes written and flushed; then every write to the pool's data PV fails. Writers
    of either volume (new and overwritten blocks) get an error, in bounded time; what was
    flushed reads back intact during the fault and after it heals."""
    hide_raw_disks()
    data = FaultDisk("fdata", disk)
    make_pool("dvg", data.path)
    for name in ("a", "b"):
        ts("create", f"dvg/{name}", "--size", "64M")
        write_blocks(f"/dev/dvg/{name}", name, OFFSETS)
    data.error_writes()
    out: dict = {"writes": {
        "new block": timed_write("/dev/dvg/b", "late", 20 * MiB),
        "overwrite": timed_write("/dev/dvg/a", "late", OFFSETS[1])}}
    out["mode during"] = pool_mode("dvg")
    out["intact during"] = all(blocks_match(f"/dev/dvg/{n}", n, OFFSETS) for n in "ab")
    out["create during"] = cli("create", "dvg/c", "--size", "64M")
    data.heal()
    out["mode after heal"] = pool_mode("dvg")
    out["intact after heal"] = all(blocks_match(f"/dev/dvg/{n}", n, OFFSETS) for n in "ab")
    out["write after heal"] = timed_write("/dev/dvg/b", "healed", 24 * MiB)
    out.update(repair("dvg", ["a", "b"]))
    out["intact after repair"] = all(blocks_match(f"/dev/dvg/{n}", n, OFFSETS) for n in "ab")
    return out


def missing_thin_device(vg: str, others: list[str]) -> dict:
    """A volume whose thin device the pool lacks, as a power cut between the pool's commit and
    LVM's can leave one: `pool attach` must name it and leave `others` up."""
    ts("create", f"{vg}/gone", "--size", "16M")
    thin_id = lvs(vg)["gone"]["thin_id"]
    sh("lvchange", "-an", f"{vg}/gone")
    DM.message(f"{vg}-pool-tpool", 0, f"delete {thin_id}")
    out = {"attach": cli("pool", "attach", vg)}
    out["others active"] = all(lvs(vg)[n]["lv_attr"][4] == "a" for n in others)
    return out


def slow_fsync(dev: str, seed: str, offset: int) -> tuple[str, float]:
    """timed_write's write with 2 s between the write and its fsync: dm-thin's periodic commit
    (every second) runs in between."""
    start = time.monotonic()
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 64 << 10)
        buf[:] = pattern(seed, offset)
        os.pwritev(fd, [buf], offset)
        time.sleep(2)
        os.fsync(fd)
        outcome = "ok"
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        os.close(fd)
    return outcome, round(time.monotonic() - start, 3)


def metadata_errors(disk: str, race: bool = False) -> dict:
    """A volume written and flushed; then every write to the PV holding only the pool's
    metadata fails. A writer that needs a new block (with `race`, one whose fsync comes after
    the pool's periodic commit) should get an error; the kernel takes the pool out of
    read-write; once the disk heals, `pool repair` brings it back with the data."""
    hide_raw_disks()
    half = sectors(disk) // 2
    data = FaultDisk("mdata", disk, 0, half)
    meta = FaultDisk("mmeta", disk, half, half)
    make_pool("mvg", data.path, meta.path, size="256M")
    ts("create", "mvg/a", "--size", "64M")
    write_blocks("/dev/mvg/a", "a", OFFSETS)
    meta.error_writes()
    first = slow_fsync("/dev/mvg/a", "late", 20 * MiB) if race else \
        timed_write("/dev/mvg/a", "late", 20 * MiB)
    out: dict = {"writes": {"new block": first,
                            "overwrite": timed_write("/dev/mvg/a", "late", OFFSETS[1])}}
    out["mode reached"] = pool_mode("mvg")
    out["intact during"] = blocks_match("/dev/mvg/a", "a", [OFFSETS[0], OFFSETS[2]])
    out["create during"] = cli("create", "mvg/c", "--size", "64M")
    meta.heal()
    out["mode after heal"] = pool_mode("mvg")
    if first[0] == "ok":  # the kernel acknowledged it: is it there?
        out["acknowledged new block kept"] = blocks_match("/dev/mvg/a", "late", [20 * MiB])
    out.update(repair("mvg", ["a"]))
    # the overwrite may have reached the disk: only the other two blocks are known
    out["intact after repair"] = blocks_match("/dev/mvg/a", "a", [OFFSETS[0], OFFSETS[2]])
    return out


def repair(vg: str, volumes: list[str]) -> dict:
    """Bring a pool that left read-write back, as the README's runbook says: volumes down,
    `thinstack pool repair`; then the volumes up again. The result, the mode, consistency."""
    for name in volumes:
        sh("lvchange", "-an", f"{vg}/{name}")
    out = {"repair": cli("pool", "repair", vg)}
    for name in volumes:
        ts_ok = subprocess.run(["lvchange", "-ay", "-K", f"{vg}/{name}"], capture_output=True)
        out.setdefault("reactivated", []).append(ts_ok.returncode == 0)
    out["mode after repair"] = pool_mode(vg)
    out["consistency"] = consistency(vg)
    return out


# --- Power cuts ---------------------------------------------------------------------------------

CUT_VG, IMAGE_OFFSETS = "pvg", [0, MiB, 5 * MiB]


def _ack(log, **record) -> None:
    """Record what the disk acknowledged (an fsync or a command that returned): this must
    survive any later cut. The log is on the host's disk, which the cut does not touch."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def workload(state: Path) -> None:
    """Until killed: create, write, clone a gold master, import, export, write again."""
    with open(state / "acked.jsonl", "a") as log:
        for i in range(10**6):
            ts("create", f"{CUT_VG}/v{i}", "--size", "32M")
            write_blocks(f"/dev/{CUT_VG}/v{i}", f"v{i}", [0, 8 * MiB])
            _ack(log, name=f"v{i}", seed=f"v{i}", offsets=[0, 8 * MiB])
            ts("clone", f"{CUT_VG}/gold", f"{CUT_VG}/c{i}")
            write_blocks(f"/dev/{CUT_VG}/c{i}", f"c{i}", [MiB])
            _ack(log, name=f"c{i}", seed=f"c{i}", offsets=[MiB])
            ts("import", str(state / "image.raw"), f"{CUT_VG}/i{i}", "--format", "raw")
            _ack(log, name=f"i{i}", seed="image", offsets=IMAGE_OFFSETS)
            ts("export", f"{CUT_VG}/v{i}", str(state / f"v{i}.raw"), "--format", "raw")
            write_blocks(f"/dev/{CUT_VG}/v{i}", f"v{i}+", [16 * MiB])
            _ack(log, name=f"v{i}", seed=f"v{i}+", offsets=[16 * MiB])


def cut_first(state: Path, seed: int, latest: float) -> None:
    """Boot 1: a pool, a gold master, the workload; at a random moment within `latest` s the
    power goes (see the module's docstring)."""
    hide_raw_disks()
    disk = FaultDisk("cut", "/dev/ubdb")
    make_pool(CUT_VG, disk.path)
    with open(state / "image.raw", "wb") as f:
        f.truncate(8 * MiB)
        for off in IMAGE_OFFSETS:
            f.seek(off)
            f.write(pattern("image", off))
    ts("create", f"{CUT_VG}/gold", "--size", "32M")
    write_blocks(f"/dev/{CUT_VG}/gold", "gold", [0, MiB])
    ts("gold", f"{CUT_VG}/gold")
    with open(state / "acked.jsonl", "w") as log:
        _ack(log, name="gold", seed="gold", offsets=[0, MiB])
    moment = random.Random(seed).uniform(0.2, latest)
    with open(state / "workload.err", "w") as err:
        worker = subprocess.Popen([sys.executable, "-m", "tests.faultdisks", "workload",
                                   str(state)], cwd=ROOT, start_new_session=True, stderr=err)
    time.sleep(moment)
    ended = worker.poll()  # the workload failed on its own: a finding, reported
    if ended is None:
        os.killpg(worker.pid, signal.SIGSTOP)  # the CPU stops: nothing more is acknowledged
    disk.drop_writes()  # and nothing more reaches the disk, not even at power-off
    if ended is None:
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    cut = {"seed": seed, "moment": round(moment, 2)}
    if ended is not None:
        cut["workload failed"] = (state / "workload.err").read_text()[-1500:]
    (state / "cut.json").write_text(json.dumps(cut))


def stray_devices() -> list[str]:
    """dm devices LVM does not own, and any left suspended."""
    return [d.name for d in DM.list()
            if d.suspended or not (d.uuid or "").startswith("LVM-")]


def cut_second(state: Path) -> dict:
    """Boot 2, over the same disk: what a boot does (activation, `pool attach`), `recover`,
    then the checks: acknowledged writes, thin_check, leftovers."""
    out = {**json.loads((state / "cut.json").read_text()), "kernel": os.uname().release}
    out["activate"] = cli_like(["vgchange", "-ay", CUT_VG])
    out["attach"] = cli("pool", "attach", CUT_VG)
    out["recover"] = cli("recover", CUT_VG)
    if pool_mode(CUT_VG) != "rw":
        out.update(repair(CUT_VG, [n for n, r in lvs(CUT_VG).items() if r["thin_id"]]))
    differ = consistency(CUT_VG)
    if " has thin ids " in differ:  # a cut between LVM's commit and the pool's
        out["thin ids differed"] = differ
        out["check"] = cli("pool", "check", CUT_VG)  # names them
        out["reconcile"] = cli("pool", "repair", CUT_VG)  # in place: the metadata is sound
        out["recover again"] = cli("recover", CUT_VG)  # what the lost volumes held up
    acked = [json.loads(line) for line in (state / "acked.jsonl").read_text().splitlines()]
    exists = lvs(CUT_VG)
    lost = [a for a in acked if a["name"] not in exists or not os.path.exists(
        f"/dev/{CUT_VG}/{a['name']}") or not blocks_match(f"/dev/{CUT_VG}/{a['name']}",
                                                          a["seed"], a["offsets"])]
    out["acknowledged"], out["lost"] = len(acked), lost
    out["consistency"] = consistency(CUT_VG)
    journal = Journal(state / "ts")
    out["leftovers"] = {
        "ts_op_ volumes": [n for n, r in lvs(CUT_VG).items() if "ts_op_" in r["lv_tags"]],
        "journal entries": [e.op for e in journal.pending(CUT_VG)] +
        [str(d) for d in journal.damaged(CUT_VG)],
        "dm devices": stray_devices()}
    out["volumes"] = sorted(exists)
    return out


def power_cut(state: Path, seed: int, latest: float = 12) -> dict:
    """On the host: the two boots of one cut over the disks in `state`; what cut_second found."""
    state.mkdir(parents=True, exist_ok=True)
    for step in (["cut-first", str(seed), str(latest)], ["cut-second"]):
        done = subprocess.run(
            [sys.executable, "-m", "thinstack.cli", "lab", "run", "--disks", "1", "--disk-size",
             "1G", "--state", str(state), "--timeout", "600", "--", sys.executable, "-m",
             "tests.faultdisks", step[0], str(state), *step[1:]],
            capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "THINSTACK_STATE_DIR": str(state / "ts"),
                 "THINSTACK_RUN_DIR": str(state / "run")})
        if done.returncode != 0:
            return {"seed": seed, "failed": step[0], "exit": done.returncode,
                    "output": (done.stdout + done.stderr)[-2000:]}
    return json.loads((state / "result.json").read_text())


# --- Slow disks ---------------------------------------------------------------------------------

def slow_disk(disk: str, delay_ms: int, write_mib: int, pool: str, image_mib: int,
              threshold: int | None = None) -> dict:
    """dm-delay of `delay_ms` under the PV; a small pool (growing at `threshold`%, or the
    default) the monitor must grow while a writer writes `write_mib` MiB with O_DIRECT; then an
    import and an export of `image_mib` MiB, and create, snapshot, delete. The writer notes
    when the pool crossed its threshold and when it saw it larger: the monitor's reaction."""
    hide_raw_disks()
    slow = FaultDisk("slow", disk)
    slow.delay(delay_ms)
    make_pool("svg", slow.path, size=pool,
              options=("--grow-threshold", str(threshold)) if threshold is not None else ())
    out: dict = {"delay ms": delay_ms, "pool before MiB": pool_mib("svg"),
                 "dmeventd": sh("lvs", "--noheadings", "-o", "seg_monitor", "svg/pool").strip()}
    crossing = (threshold or growth.DEFAULT_THRESHOLD) / 100
    ts("create", "svg/w", "--size", f"{write_mib + 32}M")
    monitor = subprocess.Popen([sys.executable, "-m", "thinstack.cli", "monitor", "--interval",
                                "1"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    # The writer starts once the monitor is watching: its own start-up (seconds in the lab)
    # is not the reaction under test, and on a loaded host it ate the pool's margin.
    first = monitor.stderr.readline() if monitor.stderr else ""
    errors, fullest, start = [], 0.0, time.monotonic()
    crossed = grown = None
    fd = os.open("/dev/svg/w", os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        for i in range(write_mib):
            buf[:] = pattern("w", i * MiB, MiB)
            try:
                os.pwritev(fd, [buf], i * MiB)
            except OSError as e:
                errors.append(errno.errorcode.get(e.errno, str(e.errno)))
            s = pool_status("svg")
            fullest = max(fullest, s.used_data_blocks / s.total_data_blocks)
            if crossed is None and s.used_data_blocks >= crossing * s.total_data_blocks:
                crossed, blocks = time.monotonic() - start, s.total_data_blocks
            if crossed is not None and grown is None and s.total_data_blocks > blocks:
                grown = time.monotonic() - start
        os.fsync(fd)
    finally:
        os.close(fd)
    out["write s"] = round(time.monotonic() - start, 2)
    out["io errors"] = errors
    out["fullest %"] = round(100 * fullest, 1)
    out["threshold crossed s"] = crossed and round(crossed, 2)
    out["grown s"] = grown and round(grown, 2)
    out["intact"] = blocks_match("/dev/svg/w", "w", [i * MiB for i in range(write_mib)], MiB)
    monitor.terminate()
    out["monitor stderr"] = (first + monitor.communicate(timeout=60)[1]).strip().splitlines()[-3:]
    out["pool after MiB"] = pool_mib("svg")
    folder = Path(tempfile.mkdtemp(prefix="slow-disk-"))  # the lab's /tmp is the host's
    image, export = folder / "image.raw", folder / "export.raw"
    with open(image, "wb") as f:
        for off in range(0, image_mib * MiB, MiB):
            f.write(pattern("img", off, MiB))
    out["import"] = cli("import", str(image), "svg/img", "--format", "raw")
    out["export"] = cli("export", "svg/img", str(export), "--format", "raw")
    out["export same"] = export.exists() and export.read_bytes() == image.read_bytes()
    out["create"] = cli("create", "svg/c", "--size", "64M")
    out["snapshot"] = cli("snapshot", "svg/c", "s")
    out["delete"] = cli("delete", "svg/s")
    return out


ROWS = {"data-errors": lambda: data_errors("/dev/ubdb"),
        "metadata-errors": lambda: metadata_errors("/dev/ubdb"),
        "metadata-errors-race": lambda: metadata_errors("/dev/ubdb", race=True)}


def main(argv: list[str]) -> None:
    """workload|cut-first|cut-second STATE_DIR ...: the power cut's parts; run ROW OUT.json
    [DELAY_MS WRITE_MIB POOL IMAGE_MIB]: one of the other rows, its figures into OUT."""
    command, state = argv[0], Path(argv[1])
    if command == "run":
        run = ROWS.get(state.name) or (lambda: slow_disk(
            "/dev/ubdb", int(argv[3]), int(argv[4]), argv[5], int(argv[6])))
        Path(argv[2]).write_text(json.dumps({**run(), "kernel": os.uname().release}, indent=1))
    elif command == "workload":
        workload(state)
    elif command == "cut-first":
        cut_first(state, int(argv[2]), float(argv[3]))
    elif command == "cut-second":
        (state / "result.json").write_text(json.dumps(cut_second(state), indent=1))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
