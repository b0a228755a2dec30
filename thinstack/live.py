"""`thinstack import --live SOURCE VG/NAME`: the volume is usable at once, while the kernel copies
the image into it underneath (dm-clone "hydration"); when the copy is done the volume becomes an
ordinary thin volume.

While it hydrates, the stack under /dev/VG/NAME is:

  VG-NAME            thinstack's device (no dm uuid, so LVM sees the LV as inactive; the LV
                     has LVM's activation-skip flag, so nothing else activates it):
                     clone META DEST NBD REGION  [+ linear DEST past the image's end, when LVM
                     rounded the volume up to its extent size]
  VG-NAME-clonedest  thin POOL THIN_ID over the whole LV (uuid TS-LIVE-<lv uuid>)
  VG/NAME.clonemeta  dm-clone's metadata: a small thin LV, LVM's own
  /dev/nbdN          qemu-nbd serving the image read-only (--read-only --persistent, direct
                     I/O where the file system allows it), pid file under the run folder
  (--rate)           pacer.py's process, which turns the kernel's background copy on and off
                     to hold it to the rate; pid file beside qemu-nbd's

Every format qemu-nbd serves is given to it as importers/qemu.py gives images to qemu-img: each
file of the chain opened once and checked by us, qemu's view of each node checked, qemu reaching
them only through /proc/self/fd links. An NBD source (nbd://HOST[:PORT]/EXPORT,
nbd+unix:///EXPORT?socket=PATH) is re-served by a local qemu-nbd the same way.

Sparse: the regions the image does not allocate (holes, zero extents: qemu's own map) are
discarded on the clone before hydration starts, which marks them hydrated without copying or
allocating anything. The region is the largest power of two dividing the pool's chunk, so a
discarded region never shares a chunk with a copied one, and a copied region fills whole
chunks; the pool must zero new chunks (as for qemu-img imports), so a guest's partial write
into a region that was discarded never shows what the pool's disk held before.

Setting up runs as operation `live-import` (journal, fault points, rollback by any recovery of
the VG: `rollback` below tears down the devices and the server, recovery removes the volumes
still tagged with the operation). Once committed, the live state is the LVM tag ts_live on the
volume plus a record under the state folder (source, format, region). `finish` (the monitor's
poll, `import --live --wait`) reloads VG-NAME with the thin table once every region is
hydrated, which open readers and writers do not notice, gives the device LVM's uuid, and removes
the rest. Reads of regions not yet copied while the source is gone fail with EIO.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from thinstack import budget, extorigin, faults, growth, poolstatus, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import RUNNER, CommandError, summary
from thinstack.dm.status import CloneStatus
from thinstack.dm.targets import (
    CloneTarget,
    ErrorTarget,
    LinearTarget,
    Table,
    TableLine,
    ThinTarget,
)
from thinstack.errors import Exists, NotFound, Refused, ThinstackError, Usage
from thinstack.extents import Extent, Kind
from thinstack.hidden import DEST_SUFFIX, nbd_of, server_dir
from thinstack.journal import Journal, Step, StepKind, write_atomically
from thinstack.lock import vg_lock
from thinstack.lvm import (
    LV,
    Lvm,
    VolumeRef,
    check_name,
    default_lvm,
    dm_name,
    holding_pool,
    pool_of,
    volume_pool,
)
from thinstack.operation import Op, operation
from thinstack.progress import Bar
from thinstack.sizes import SECTOR, format_size, round_up
from thinstack.state import state_dir

if TYPE_CHECKING:  # the importers are imported when a source is opened: refusals stay cheap
    from thinstack.importers.qemu import QemuImage

OP = "live-import"
META_SUFFIX = ".clonemeta"
UUID_PREFIX = "TS-LIVE-"
MAX_REGION = 1 << 30  # dm-clone's limit
# thinstack's format names -> qemu's driver for the top file (None: qemu's own formats, probed)
QEMU_DRIVERS = {"qcow2": "qcow2", "vhd": "vpc", "raw": "raw", "qemu": None}
# dm-clone copies this many regions at once by default (kernel: 1); a batch of contiguous
# regions is one copy, so 1 MiB batches keep the copy near the disk's sequential speed.
BATCH_BYTES = 1 << 20
BATCHES_IN_FLIGHT = 4  # the kernel's default (1 region) copies at a fraction of the disk's speed
BLKDISCARD = 0x1277  # _IO(0x12, 119)
SERVER_START_SECONDS = 30


# --- decisions (pure) --------------------------------------------------------------------------

def region_size(chunk: int) -> int:
    """The clone's region (bytes): the largest power of two dividing the pool's chunk, so regions
    tile chunks (a discarded region never shares a chunk with a copied one)."""
    return min(chunk & -chunk, MAX_REGION)


def metadata_size(regions: int, extent: int) -> int:
    """dm-clone's metadata: a superblock, space maps and one bit a region, in 4 KiB blocks.
    4 MiB plus two bits a region is ample; LVM rounds to its extent."""
    return round_up((4 << 20) + regions // 4, extent)


def discard_plan(extents: Iterable[Extent], size: int, region: int) -> list[tuple[int, int]]:
    """(offset, length) byte ranges of whole regions that no DATA extent touches: discarded
    before hydration, they are marked hydrated and never read nor allocated. The last region
    may be short (it ends with the image)."""
    ranges: list[tuple[int, int]] = []
    start = None  # where the current run of non-data began
    for e in [*extents, Extent(size, 0, Kind.DATA)]:
        if e.kind is not Kind.DATA:
            start = e.offset if start is None else start
            continue
        if start is not None:
            first = round_up(start, region)
            end = e.offset if e.offset == size else e.offset - e.offset % region
            if end > first:
                if ranges and ranges[-1][0] + ranges[-1][1] == first:
                    first = ranges.pop()[0]
                ranges.append((first, end - first))
            start = None
    return ranges


def batch_regions(region: int) -> int:
    return max(1, BATCH_BYTES // region)


@dataclass(frozen=True)
class Record:
    """What a live import needs to be restarted (boot) and reported: kept under the state
    folder from its commit until it is finished."""

    vg: str
    name: str
    source: str
    format: str  # qemu's driver for the top file, or "nbd"
    requested: str  # the operator's --format: what reopens the source at the next boot
    allow_dirs: tuple[str, ...]
    virtual_size: int
    region: int
    discarded: int  # regions marked hydrated by discards before the copy began
    to_copy: int  # bytes the kernel copies
    started: float  # wall clock, when hydration was enabled
    rate: int | None = None  # `--rate`: bytes/s read from the source at most; None: unbounded


@dataclass(frozen=True)
class Progress:
    """What `import --status` shows of one live import."""

    volume: str
    state: str  # hydrating | hydrated | inactive (no device: `pool attach`) | failed
    copied: int
    total: int
    rate: float  # bytes/s since hydration began
    eta: float | None  # seconds
    source_up: bool
    waiting: str | None = None  # why the copy cannot go on (its pool is full, or broken)
    limit: int | None = None  # `--rate`: bytes/s the background copy reads at most

    def to_json(self) -> dict:
        return asdict(self)


def progress(record: Record, status: CloneStatus | None, source_up: bool, now: float,
             failed: bool = False, waiting: str | None = None) -> Progress:
    ref = f"{record.vg}/{record.name}"
    if status is None:
        return Progress(ref, "failed" if failed else "inactive", 0, record.to_copy, 0.0, None,
                        source_up, limit=record.rate)
    copied = min(record.to_copy, max(0, status.hydrated_regions - record.discarded)
                 * status.region_size * SECTOR)
    if status.hydrated:
        copied = record.to_copy
    elapsed = max(now - record.started, 1e-3)
    rate = copied / elapsed
    eta = (record.to_copy - copied) / rate if rate > 0 else None
    return Progress(ref, "hydrated" if status.hydrated else "hydrating", copied, record.to_copy,
                    round(rate), None if eta is None else round(eta, 1), source_up,
                    None if status.hydrated else waiting, record.rate)


def waiting_for(lv: LV | None, lvs: list[LV], dm: DeviceMapper) -> str | None:
    """Why a live import's copy cannot go on, if its pool can take no more: the kernel's
    hydration writes fail (the pool errors when full) or wait (it queues), and it goes on by
    itself, nothing copied lost, once the pool has room again."""
    pool = holding_pool(lv, lvs) if lv is not None else None
    if pool is None:
        return None
    mode = poolstatus.mode_of(pool, dm)
    if mode in (poolstatus.RW, poolstatus.INACTIVE):
        return None
    if mode == poolstatus.OUT_OF_DATA_SPACE:
        return (f"its pool {pool.ref} is full: the copy waits (nothing copied is lost) until it "
                f"has room: `thinstack pool set {pool.ref} --limit SIZE`, `pool extend`, or "
                "delete volumes")
    return f"its pool {pool.ref} is {mode}: `thinstack pool repair {pool.ref}`"


def nbd_spec(url: str) -> dict:
    """qemu's json spec of an NBD source: nbd://HOST[:PORT]/EXPORT or
    nbd+unix:///EXPORT?socket=PATH (read as raw bytes)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    export = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.scheme == "nbd":
        if not parts.hostname or parts.query:
            raise Usage(f"{url}: an NBD source is nbd://HOST[:PORT]/EXPORT")
        try:
            port = parts.port or 10809
        except ValueError:
            raise Usage(f"{url}: the port must be a number") from None
        server = {"type": "inet", "host": parts.hostname, "port": str(port)}
    elif parts.scheme == "nbd+unix":
        socket = parse_qs(parts.query).get("socket", [])
        if parts.netloc or len(socket) != 1 or not socket[0].startswith("/") \
                or set(parse_qs(parts.query)) != {"socket"}:
            raise Usage(f"{url}: a unix-socket NBD source is nbd+unix:///EXPORT?socket=PATH "
                        "(an absolute PATH)")
        server = {"type": "unix", "path": socket[0]}
    else:
        raise Usage(f"{url}: not an NBD URL")
    return {"driver": "raw", "file": {"driver": "nbd", "server": server,
                                      **({"export": export} if export else {})}}


def is_nbd(source: str) -> bool:
    return source.startswith(("nbd://", "nbd+unix://"))


def refuse_if_hydrating(lv: LV, doing: str) -> None:
    """One line for what dm-clone cannot do while it copies (resize, snapshot, ...)."""
    if tags.LIVE in lv.tags:
        raise Refused(f"{lv.ref} is still being imported live; {doing} it once the copy has "
                      f"finished (`thinstack import --status {lv.ref}`), or import with --wait")


# --- the source and its server -----------------------------------------------------------------

@dataclass
class Opened:
    """A checked source: what qemu-nbd is given (a json: name and the descriptors it names)."""

    image: QemuImage
    format: str

    def close(self) -> None:
        self.image.close()


def open_source(source: str, format: str, allow_dirs: tuple[str, ...]) -> Opened:
    """The source, checked as `thinstack import` checks it (importers/qemu.py), opened once."""
    from thinstack import imports
    from thinstack.importers import ImageError, Source, detect
    from thinstack.importers import qemu as qemu_driver

    if is_nbd(source):
        spec = nbd_spec(source)
        info = _qemu_img_json(source, "info", "--output=json", "json:" + json.dumps(spec))
        image = qemu_driver.QemuImage(Path(source), "raw", int(info["virtual-size"]),
                                      qemu_driver.Pins(), spec)
        return Opened(image, "nbd")
    policy = imports.policy(tuple(Path(d) for d in allow_dirs))
    top = Source.open(source)
    try:
        found = detect(top)
        if format == "auto":
            policy = dataclasses.replace(policy, follow_references=False)
        elif format not in ("raw", found):
            raise ImageError(source, f"claimed format {format!r} but the content is {found!r}")
        name = "raw" if format == "raw" else found
        if name not in QEMU_DRIVERS:
            raise Refused(f"{source}: qemu-nbd cannot serve a {name} image; import it with "
                          f"`thinstack import` (without --live)")
        driver = QEMU_DRIVERS[name]
        image = qemu_driver.open(top, policy, driver)
    except BaseException:
        top.close()
        raise
    if image.virtual_size % SECTOR:
        image.close()
        raise Refused(f"{source}: its size ({image.virtual_size} bytes) is not a whole number "
                      f"of sectors, which an NBD device cannot show; use `thinstack import`")
    return Opened(image, driver or image.qemu_format)


def _qemu_img_json(source: str, *args: str) -> dict:
    try:
        return json.loads(RUNNER.run(["qemu-img", *args], timeout=60))
    except CommandError as e:
        reason = summary(e.stderr).rpartition("': ")[2]  # qemu repeats the json: name first
        raise ThinstackError(f"{source}: cannot read it: {reason}") from None


def pid_file(vg: str, name: str) -> Path:
    return server_dir() / f"{dm_name(vg, name)}.pid"


def _running(path: Path) -> tuple[int, list[bytes]] | None:
    """The pid a pid file names and that process's argv, if it still runs."""
    try:
        pid = int(path.read_text().strip())
        return pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None


def server_pid(vg: str, name: str) -> int | None:
    """The running qemu-nbd of this live import (its pid file, checked against the process)."""
    path = pid_file(vg, name)
    found = _running(path)
    if found is None:
        return None
    pid, argv = found
    return pid if os.fsencode(str(path)) in argv and b"qemu-nbd" in argv[0] else None


def _load_modules(dm: DeviceMapper) -> None:
    if not Path("/sys/module/nbd").exists():
        RUNNER.run(["modprobe", "nbd", "nbds_max=16"])
    if "clone" not in dm.targets():
        RUNNER.run(["modprobe", "dm-clone"])


def _direct_io(fds: tuple[int, ...]) -> bool:
    """Whether every file qemu-nbd reads can be opened with O_DIRECT (tmpfs, overlayfs cannot)."""
    for fd in fds:
        try:
            os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
        except OSError:
            return False
    return True


def serve(vg: str, name: str, opened: Opened, prefer: str | None = None) -> str:
    """Start qemu-nbd on a free nbd device (`prefer` first: the one a clone already reads); its
    path once the kernel has connected it."""
    path = pid_file(vg, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fds = opened.image.fds
    cache = "none" if opened.format != "nbd" and _direct_io(fds) else "writeback"
    devices = sorted(Path("/sys/block").glob("nbd*"), key=lambda d: int(d.name[3:]))
    for dev in sorted(devices, key=lambda d: f"/dev/{d.name}" != prefer):
        if (dev / "pid").exists() or int((dev / "size").read_text()) != 0:
            continue
        try:
            RUNNER.run(["qemu-nbd", "--fork", "--read-only", "--persistent", f"--cache={cache}",
                        "--pid-file", str(path), "-c", f"/dev/{dev.name}",
                        opened.image.spec],
                       pass_fds=fds, timeout=SERVER_START_SECONDS)
        except CommandError as e:
            if "busy" in e.stderr.lower():
                continue  # taken by another process since we looked
            raise ThinstackError(f"qemu-nbd could not serve {opened.image.path}: "
                                 f"{' '.join(e.stderr.split())[:300]}") from None
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            pid = server_pid(vg, name)
            if pid is not None and nbd_of(pid) == f"/dev/{dev.name}":
                return f"/dev/{dev.name}"
            time.sleep(0.05)
        stop_server(vg, name)
        raise ThinstackError(f"qemu-nbd did not connect /dev/{dev.name} in "
                             f"{SERVER_START_SECONDS} s")
    raise Refused("no free nbd device (load the module with more: `modprobe nbd nbds_max=64`)")


def stop_server(vg: str, name: str) -> None:
    pid = server_pid(vg, name)
    if pid is not None:
        dev = nbd_of(pid)
        if dev is not None:
            RUNNER.run(["qemu-nbd", "-d", dev])
        _terminate(pid)
    pid_file(vg, name).unlink(missing_ok=True)


def _terminate(pid: int) -> None:
    """SIGTERM, and wait (10 s at most) until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def pacer_pid_file(vg: str, name: str) -> Path:
    return server_dir() / f"{dm_name(vg, name)}.pacer.pid"


def pacer_pid(vg: str, name: str) -> int | None:
    """The running pacer of this live import (`--rate`: pacer.py), checked against the process."""
    found = _running(pacer_pid_file(vg, name))
    ours = [b"thinstack.pacer", os.fsencode(vg), os.fsencode(name), b""]
    return found[0] if found is not None and found[1][-4:] == ours else None


def start_pacer(vg: str, name: str) -> None:
    """Start the pacer that holds the copy to the record's rate (it turns hydration on)."""
    if pacer_pid(vg, name) is None:
        try:
            RUNNER.run([sys.executable, "-m", "thinstack.pacer", vg, name],
                       timeout=SERVER_START_SECONDS)
        except CommandError as e:  # what went wrong is in its log, not on its stderr
            raise ThinstackError(f"{vg}/{name}: the pacer of its --rate did not start "
                                 f"({e.exit_status}); see "
                                 f"{pacer_pid_file(vg, name).with_suffix('.log')}") from None


def stop_pacer(vg: str, name: str) -> None:
    pid = pacer_pid(vg, name)
    if pid is not None:
        _terminate(pid)
    pacer_pid_file(vg, name).unlink(missing_ok=True)


# --- the devices -------------------------------------------------------------------------------

def dest_uuid(lv: LV) -> str:
    return f"{UUID_PREFIX}{lv.uuid}"


def _tpool(dm: DeviceMapper, pool: LV) -> str:
    info = dm.info(extorigin.tpool_name(pool))
    if info is None:
        raise Refused(f"{pool.ref}: the thin pool is not active")
    return info.device.devno


def top_table(lv: LV, record: Record, meta: str, dest: str, nbd: str,
              hydrate: bool) -> Table:
    sectors = record.virtual_size // SECTOR
    batch = batch_regions(record.region)
    # Bounded by --rate, one batch at a time: what lands after the pacer turns the copy off.
    in_flight = BATCHES_IN_FLIGHT * batch if record.rate is None else batch
    clone = CloneTarget(meta, dest, nbd, record.region // SECTOR, no_hydration=not hydrate,
                        hydration_threshold=in_flight, hydration_batch_size=batch)
    lines = [TableLine(0, sectors, clone)]
    if lv.size > record.virtual_size:  # LVM rounded the volume up: its tail is plain thin
        lines.append(TableLine(sectors, lv.size // SECTOR - sectors, LinearTarget(dest, sectors)))
    return Table(tuple(lines))


def _devno(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def activate(lv: LV, meta: LV, pool: LV, record: Record, nbd: str, hydrate: bool) -> str:
    """Bring up DEST and VG-NAME over `nbd` (what is up already is kept); /dev/VG/NAME."""
    dm = DeviceMapper()
    dest_name = dm_name(lv.vg, lv.name) + DEST_SUFFIX
    found = dm.info(dest_name)
    if found is not None:
        dest = found.device
    else:
        thin = ThinTarget(_tpool(dm, pool), lv.thin_id or 0)
        dest = dm.create(dest_name, Table.of(lv.size // SECTOR, thin), uuid=dest_uuid(lv))
    meta_info = dm.info(dm_name(meta.vg, meta.name))
    if meta_info is None:
        raise Refused(f"{meta.ref} is not active")
    top = dm.info(dm_name(lv.vg, lv.name))
    if top is None:
        table = top_table(lv, record, meta_info.device.devno, dest.devno, _devno(nbd), hydrate)
        minor = dm.create(dm_name(lv.vg, lv.name), table).minor
    else:
        minor = top.minor
    extorigin._link(lv, f"../dm-{minor}")
    return f"/dev/{lv.vg}/{lv.name}"


def discard(path: str, ranges: list[tuple[int, int]]) -> None:
    """BLKDISCARD each range: on the clone, a whole unhydrated region discarded is marked
    hydrated (nothing read, nothing allocated). In-process: one ioctl per range."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, length in ranges:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
    finally:
        os.close(fd)


def clone_status(dm: DeviceMapper, vg: str, name: str) -> CloneStatus | None:
    """The clone's status, or None when VG-NAME is not (or no longer) a clone device. Its
    counts are the kernel's in-core ones: no metadata commit (and flush) for each look."""
    try:
        lines = dm.status(dm_name(vg, name), noflush=True)
    except CommandError:
        return None
    except Exception as e:  # the ioctl layer's "no such device"
        if getattr(e, "errno", None) == errno.ENXIO:
            return None
        raise
    status = lines[0].status if lines and lines[0].target_type == "clone" else None
    return status if isinstance(status, CloneStatus) else None


def _remove_device(dm: DeviceMapper, name: str, *, force: bool = False) -> None:
    info = dm.info(name)
    if info is None:
        return
    if info.open_count and force:
        # An open device cannot go: its table becomes an error target, removed on last close.
        dm.load(name, Table.of(dm.table(name).size, ErrorTarget()))
        dm.resume(name)
        dm.remove(name, deferred=True)
        return
    dm.remove(name)


def teardown(vg: str, name: str, *, force: bool = False) -> None:
    """Take down what a live import of VG/NAME runs (VG-NAME while it is thinstack's clone,
    DEST, the server), whatever state it was left in; LVM's volumes are the caller's."""
    dm = DeviceMapper()
    top = dm.info(dm_name(vg, name))
    if top is not None and top.uuid is None:  # ours: LVM's own device has its uuid
        if top.open_count and not force:
            raise Refused(f"{vg}/{name} is open (a VM or a mount is using it); close it, or "
                          f"abort with --force (its users then get I/O errors)")
        _remove_device(dm, top.name, force=force)
        link = Path("/dev", vg, name)
        if link.is_symlink():
            link.unlink()
    _remove_device(dm, dm_name(vg, name) + DEST_SUFFIX)
    stop_pacer(vg, name)
    stop_server(vg, name)


# --- the record --------------------------------------------------------------------------------

def record_path(vg: str, name: str) -> Path:
    return state_dir() / "live" / f"{vg}.{name}.json"


def write_record(record: Record) -> None:
    write_atomically(record_path(record.vg, record.name), json.dumps(asdict(record)).encode())


def read_record(vg: str, name: str) -> Record | None:
    try:
        data = json.loads(record_path(vg, name).read_bytes())
        return Record(**{**data, "allow_dirs": tuple(data["allow_dirs"])})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ThinstackError(f"{record_path(vg, name)}: cannot be read ({e})") from None


def records() -> list[Record]:
    folder = state_dir() / "live"
    found = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        vg, _, name = f.name[:-len(".json")].partition(".")
        record = read_record(vg, name)
        if record is not None:
            found.append(record)
    return found


# --- the commands ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """What `thinstack import --live --json` prints."""

    path: str
    format: str
    virtual_size: int
    region: int
    to_copy: int  # bytes the kernel copies; the rest was discarded (holes, zeros)
    seconds: float  # until the volume was usable
    finished: bool  # --wait: hydrated and turned into an ordinary thin volume

    def to_json(self) -> dict:
        return asdict(self)


def import_live(source: str, ref: VolumeRef, *, format: str = "auto",
                allow_dirs: tuple[str, ...] = (), wait: bool = False,
                show_progress: bool = False, pool_name: str | None = None,
                rate: int | None = None) -> Summary:
    started = time.monotonic()
    check_name(ref.name + META_SUFFIX, "volume name")
    opened = open_source(source, format, allow_dirs)
    try:
        extents = list(opened.image.extents())
        journal = Journal()
        with operation(OP, ref.vg, lambda lvs: _args(ref, lvs, source, pool_name, rate),
                       journal=journal, at=pool_name) as op:
            record = _setup(op, ref, opened, extents, source, format, allow_dirs)
    finally:
        opened.close()
    usable = round(time.monotonic() - started, 3)
    finished = wait and wait_and_finish(ref, show_progress)
    return Summary(f"/dev/{ref.vg}/{ref.name}", record.format, record.virtual_size,
                   record.region, record.to_copy, usable, finished)


def _args(ref: VolumeRef, lvs: list[LV], source: str, pool_name: str | None,
          rate: int | None = None) -> dict:
    for name in (ref.name, ref.name + META_SUFFIX):
        if any(lv.name == name for lv in lvs):
            raise Exists(f"{ref.vg}/{name} already exists")
    return dict(name=ref.name, path=source, pool=pool_name, rate=rate)


def _setup(op: Op, ref: VolumeRef, opened: Opened, extents: list[Extent], source: str,
           requested: str, allow_dirs: tuple[str, ...]) -> Record:
    pool = pool_of(ref.vg, op.lvs, op.entry.args.get("pool"))
    if pool.attr[7:8] != "z":
        raise Refused(f"a live import needs a pool that zeroes new chunks; pool {pool.ref} does "
                      f"not (turn zeroing on with `lvchange -Zy {pool.ref}`)")
    size = opened.image.virtual_size
    budget.refuse(pool, op.lvs, size, f"importing into {ref}")
    region = region_size(pool.chunk_size)
    regions = -(-size // region)
    ranges = discard_plan(extents, size, region)
    discarded = sum(-(-length // region) for _, length in ranges)
    meta_name = ref.name + META_SUFFIX
    dm = DeviceMapper()
    _load_modules(dm)
    extent = op.lvs[0].vg_extent_size if op.lvs else 4 << 20
    lvm = default_lvm()
    op.step(Step(StepKind.CREATED, ref.name))
    lvm.run("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", pool.name, "-V", f"{size}b",
            "-n", ref.name, "--addtag", op.entry.tag, "--addtag", tags.LIVE,
            "--setactivationskip", "y", "--config", growth.arming(pool.tags), ref.vg)
    op.step(Step(StepKind.CREATED, meta_name))
    lvm.run("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", pool.name,
            "-V", f"{metadata_size(regions, extent)}b", "-n", meta_name, "--addtag",
            op.entry.tag, "--addtag", tags.LIVE_META, "--setactivationskip", "n",
            "--config", growth.arming(pool.tags), ref.vg)
    faults.point(OP, "after-lvcreate")
    made = {lv.name: lv for lv in lvm.lvs(ref.vg)}  # one report for both
    lv, meta = made[ref.name], made[meta_name]
    rate = op.entry.args.get("rate")
    nbd = serve(ref.vg, ref.name, opened)
    faults.point(OP, "after-nbd")
    record = Record(ref.vg, ref.name, source, opened.format, requested, tuple(allow_dirs),
                    size, region, discarded, size - sum(length for _, length in ranges), 0.0,
                    rate)
    path = activate(lv, meta, pool, record, nbd, hydrate=False)
    faults.point(OP, "after-clone")
    discard(path, ranges)
    faults.point(OP, "after-discard")
    record = dataclasses.replace(record, started=time.time())
    write_record(record)
    if rate is None:
        dm.message(dm_name(ref.vg, ref.name), 0, "enable_hydration")
    else:
        start_pacer(ref.vg, ref.name)  # it turns the copy on, and off while it is ahead of rate
    faults.point(OP, "after-hydration")
    op.commit(ref, VolumeRef(ref.vg, meta_name))
    return record


def rollback(entry, lvm: Lvm) -> list:
    """Recovery's planner for an interrupted set-up: the devices and the server go here; the
    volumes still tagged with the operation are removed by recovery's plan."""
    name = entry.args.get("name", "")
    teardown(entry.vg, name, force=True)
    lv = lvm.find_lv(VolumeRef(entry.vg, name))
    if lv is None or entry.tag in lv.tags:
        record_path(entry.vg, name).unlink(missing_ok=True)
    return []


def finish(ref: VolumeRef, lvm: Lvm | None = None) -> bool:
    """Turn a fully hydrated live import into an ordinary thin volume (idempotent: a finish
    interrupted anywhere is completed by the next). False while it is still copying."""
    lvm = lvm or default_lvm()
    dm = DeviceMapper()
    lvs = {lv.name: lv for lv in lvm.lvs(ref.vg)}  # one report: the volume, its pool and meta
    lv = lvs.get(ref.name)
    if lv is None or tags.LIVE not in lv.tags:
        return False
    top = dm.info(dm_name(ref.vg, ref.name))
    if top is None:
        return False  # not active (after a reboot, before `pool attach`)
    if top.uuid is None:
        status = clone_status(dm, ref.vg, ref.name)
        if status is not None:
            if not status.hydrated:
                return False
            pool = volume_pool(lv, list(lvs.values()))
            thin = ThinTarget(_tpool(dm, pool), lv.thin_id or 0)
            dm.load(top.name, Table.of(lv.size // SECTOR, thin))
            dm.resume(top.name)  # suspends (the clone stops), swaps the table, resumes
            faults.point("live-finish", "after-reload")
        RUNNER.run(["dmsetup", "rename", top.name, "--setuuid",
                    "LVM-" + lv.vg_uuid.replace("-", "") + lv.uuid.replace("-", "")])
    _remove_device(dm, dm_name(ref.vg, ref.name) + DEST_SUFFIX)
    stop_pacer(ref.vg, ref.name)
    stop_server(ref.vg, ref.name)
    meta = lvs.get(ref.name + META_SUFFIX)
    if meta is not None:
        lvm.run("lvremove", "-q", "-y", "-f", str(meta.ref))
    lvm.run("lvchange", "-q", "--setactivationskip", "n", "--deltag", tags.LIVE, str(ref))
    record_path(ref.vg, ref.name).unlink(missing_ok=True)
    return True


def wait_and_finish(ref: VolumeRef, show_progress: bool, poll: float = 0.5) -> bool:
    record = read_record(ref.vg, ref.name)
    if record is None:
        raise NotFound(f"{ref}: no live import")
    bar = Bar(f"hydrate {ref}", record.to_copy) if show_progress else None
    dm = DeviceMapper()
    while True:
        status = clone_status(dm, ref.vg, ref.name)
        if bar is not None and status is not None:
            bar.update(progress(record, status, True, time.time()).copied)
        if status is None or status.hydrated:
            with vg_lock(ref.vg):
                if finish(ref):
                    if bar is not None:
                        bar.finish(record.to_copy)
                    return True
            if status is None:
                raise ThinstackError(f"{ref}: the live import's device is not active; "
                                     f"`thinstack pool attach {ref.vg}` first")
        time.sleep(poll)


def status(ref: VolumeRef | None = None, lvs: list[LV] | None = None) -> list[Progress]:
    """Every live import (of `ref`, if given), as `import --status` shows it. `lvs`: the
    volumes as the caller already read them (every VG of a live import among them)."""
    dm = DeviceMapper()
    found = [r for r in records() if ref is None or (r.vg, r.name) == (ref.vg, ref.name)]
    if ref is not None and not found:
        raise NotFound(f"{ref}: no live import")
    now = time.time()
    lvm = default_lvm()
    in_vg = {vg: [lv for lv in lvs if lv.vg == vg] if lvs is not None else lvm.lvs(vg)
             for vg in {r.vg for r in found}}
    return [progress(r, clone_status(dm, r.vg, r.name), server_pid(r.vg, r.name) is not None,
                     now, waiting=waiting_for(_lv_of(r, in_vg[r.vg]), in_vg[r.vg], dm))
            for r in found]


def _lv_of(record: Record, lvs: list[LV]) -> LV | None:
    return next((lv for lv in lvs if lv.name == record.name), None)


def abort(ref: VolumeRef, *, force: bool = False) -> None:
    """Remove a live import's volume and everything it runs (`import --live --abort`)."""
    lvm = default_lvm()
    with vg_lock(ref.vg):
        lv = lvm.find_lv(ref)
        if lv is None or tags.LIVE not in lv.tags:
            raise NotFound(f"{ref}: no live import")
        teardown(ref.vg, ref.name, force=force)
        for name in (ref.name + META_SUFFIX, ref.name):
            if lvm.find_lv(VolumeRef(ref.vg, name)) is not None:
                lvm.run("lvremove", "-q", "-y", "-f", f"{ref.vg}/{name}")
        record_path(ref.vg, ref.name).unlink(missing_ok=True)


def restart(vg: str, lvm: Lvm | None = None) -> list[str]:
    """`pool attach`'s part: the server and the clone of every live import of `vg` up again
    (the clone's metadata says what is hydrated already). The failures, one line each."""
    lvm = lvm or default_lvm()
    lvs = lvm.lvs(vg)
    failed = []
    for lv in lvs:
        if tags.LIVE not in lv.tags or lv.op_tags:
            continue
        try:
            _restart(lv, lvs)
        except (ThinstackError, CommandError) as e:
            failed.append(f"{lv.ref}: {e}")
    return failed


def _restart(lv: LV, lvs: list[LV]) -> None:
    record = read_record(lv.vg, lv.name)
    if record is None:
        raise NotFound("its live import record is missing; remove it with `thinstack import "
                       "--live --abort`")
    meta = next((m for m in lvs if m.name == lv.name + META_SUFFIX), None)
    if meta is None:
        raise NotFound(f"{lv.vg}/{lv.name}{META_SUFFIX} is missing")
    dm = DeviceMapper()
    pid = server_pid(lv.vg, lv.name)
    nbd = nbd_of(pid) if pid else None
    top = dm.info(dm_name(lv.vg, lv.name))
    table = dm.table(top.name) if top is not None and top.uuid is None else None
    clone = table.lines[0].target if table is not None else None
    if nbd is None:
        _load_modules(dm)
        stop_server(lv.vg, lv.name)
        opened = open_source(record.source, record.requested, record.allow_dirs)
        try:
            source = clone.source if isinstance(clone, CloneTarget) else None
            nbd = serve(lv.vg, lv.name, opened, prefer=_nbd_path(source))
        finally:
            opened.close()
    if isinstance(clone, CloneTarget) and top is not None and table is not None \
            and clone.source != _devno(nbd):
        # The server came back on another nbd device: the clone reads from that one now (its
        # metadata says what is hydrated already, so nothing is copied twice).
        lines = (dataclasses.replace(table.lines[0], target=dataclasses.replace(
            clone, source=_devno(nbd), no_hydration=record.rate is not None)), *table.lines[1:])
        dm.load(top.name, Table(lines))
        dm.resume(top.name)
    elif top is None:
        activate(lv, meta, volume_pool(lv, lvs), record, nbd, hydrate=record.rate is None)
    if record.rate is not None:
        start_pacer(lv.vg, lv.name)


def _nbd_path(devno: str | None) -> str | None:
    """/dev/nbdN of a device number a table names, if it is an nbd device."""
    if devno is None:
        return None
    link = Path(f"/sys/dev/block/{devno}")
    return f"/dev/{link.resolve().name}" if link.exists() else None


@dataclass(frozen=True)
class Check:
    """One live import after a monitor pass (the monitor reports it as kind "live")."""

    vg: str
    name: str
    percent: float  # of the bytes to copy
    alert: str | None


def check_all(lvm: Lvm) -> list[Check]:
    """The monitor's part: finish what is hydrated, serve again a source whose server died,
    and one check each (alert: not active, or its source is down)."""
    from thinstack.lock import LockTimeout

    dm = DeviceMapper()
    reports = []
    for record in records():
        ref = VolumeRef(record.vg, record.name)
        status = clone_status(dm, record.vg, record.name)
        alert = pacer = None
        try:
            with vg_lock(record.vg, timeout=0):
                if status is not None and status.hydrated:
                    if finish(ref, lvm):
                        log(f"{ref}: copied in; now an ordinary thin volume")
                    continue
                if status is not None and server_pid(record.vg, record.name) is None:
                    _restart(lvm.lv(ref), lvm.lvs(record.vg))
                    log(f"{ref}: its source is served again; the copy continues")
                elif status is not None and record.rate is not None \
                        and pacer_pid(record.vg, record.name) is None:
                    try:
                        start_pacer(record.vg, record.name)
                    except ThinstackError as e:  # not the source's fault: said as it is
                        pacer = f"{e}: the copy waits until it runs"
                    else:
                        log(f"{ref}: its pacer is started again; the copy continues")
        except LockTimeout:
            pass  # an operation holds the VG: next pass
        except (ThinstackError, CommandError) as e:
            alert = (f"its source is down ({e}): reads of regions not yet copied fail with EIO "
                     f"until it is back")
        if status is None:
            alert = f"not active: `thinstack pool attach {record.vg}`"
        done = progress(record, status, alert is None, time.time())
        alert = alert or pacer
        if alert is None:
            lvs = lvm.lvs(record.vg)
            alert = waiting_for(_lv_of(record, lvs), lvs, dm)
        reports.append(Check(record.vg, record.name,
                             100 * done.copied / done.total if done.total else 100.0, alert))
    return reports


def progress_lines(found: list[Progress]) -> str:
    rows = []
    for p in found:
        eta = "-" if p.eta is None else f"{p.eta:.0f}s"
        source = "" if p.source_up or p.state == "hydrated" else "  SOURCE DOWN (unhydrated " \
            "reads fail with EIO)"
        waiting = f"  WAITING: {p.waiting}" if p.waiting else ""
        limit = f" (at most {format_size(p.limit)}/s)" if p.limit else ""
        rows.append(f"{p.volume}  {p.state}  {format_size(p.copied)}/{format_size(p.total)}  "
                    f"{format_size(int(p.rate))}/s{limit}  ETA {eta}{source}{waiting}")
    return "\n".join(rows) or "no live imports"


def log(message: str) -> None:
    print(f"thinstack: {message}", file=sys.stderr, flush=True)
