"""`thinstack mount MOUNTPOINT [VG...]`: every volume as image files, read-only, through FUSE.

MOUNTPOINT/VG/NAME.raw, NAME.vhd and NAME.qcow2 hold what `thinstack export --format F` would
write for the instant the file was opened, computed rather than written: a format's layout
(exporters/<format>.py `layout`) lists headers and tables as bytes and data as offsets in the
volume, so opening a file costs one thin snapshot and one read of the pool's mapping
(mount_instants), and reading it costs reads of the snapshot. Files are root's, 0600, and the
mount is read-only (EROFS for writes, truncation, renames); `--allow-other` lets others in, under
`default_permissions`. `.raw` answers SEEK_DATA/SEEK_HOLE from the mapping.

The binding is mfusepy (ctypes over libfuse 3): its threads serve reads in parallel (a pread
lets go of the GIL), and it passes FUSE's lseek through; see the README's "Mount" section for
the figures that chose it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mfusepy

from thinstack import exports, lvm, mount_instants
from thinstack.dm.command import RUNNER, CommandError
from thinstack.errors import Exists, NotFound, Refused, ThinstackError, Usage
from thinstack.exporters import gow, vhd
from thinstack.exporters.layout import Layout
from thinstack.lvm import LV, VolumeRef
from thinstack.mount_instants import Content, Instant, Instants

log = logging.getLogger("thinstack.mount")

# Every export format has a layout, so a file (a compressed qcow2 has none: its offsets depend
# on compressing all that comes before). Formats of one suffix exclude each other.
SUFFIXES = {"raw": ".raw", "vhd": ".vhd", "vhd-fixed": ".vhd", "qcow2": ".qcow2",
            "gow1": ".gow", "gow2": ".gow", "gow3": ".gow"}
DEFAULT_FORMATS = ("raw", "vhd", "qcow2")
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # libfuse 3's fuse_common.h
# How long a look at the VGs, or at an unopened volume's mapping, serves stat and readdir.
LIST_TTL = 1.0
WAIT_FOR_DAEMON = 120.0


def check_formats(formats: list[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(formats))
    for f in chosen:
        if f not in SUFFIXES:
            raise Usage(f"unknown format {f!r} (a mount shows {', '.join(SUFFIXES)})")
        same = [o for o in chosen if SUFFIXES[o] == SUFFIXES[f]]
        if len(same) > 1:
            raise Usage(f"{' and '.join(same)} share NAME{SUFFIXES[f]}: choose one")
    return chosen


def fits(format: str, size: int) -> bool:
    """Whether the format holds a disk of `size` bytes (VHD: 2040 GiB; GOW: 64 or 256 GiB)."""
    if format.startswith("vhd"):
        return vhd.fits(size)
    return gow.fits(format, size) if format.startswith("gow") else True


def file_names(name: str, size: int, formats: tuple[str, ...]) -> dict[str, str]:
    """A volume's files: file name -> format (none in a format too small for the disk)."""
    return {name + SUFFIXES[f]: f for f in formats if fits(f, size)}


@dataclass
class _Handle:
    instant: Instant
    format: str

    @property
    def layout(self) -> Layout:
        return self.instant.layout(self.format)


class _Cache:
    """Values that serve for LIST_TTL seconds."""

    def __init__(self) -> None:
        self._values: dict[object, tuple[float, object]] = {}
        self._mutex = threading.Lock()

    def get(self, key: object, make):
        now = time.monotonic()
        with self._mutex:
            found = self._values.get(key)
        if found is not None and now - found[0] < LIST_TTL:
            return found[1]
        value = make()
        with self._mutex:
            self._values[key] = (now, value)
        return value


def _errors(method):
    """thinstack's errors as the errno a reader sees; every one logged."""
    def wrapped(self, *args):
        try:
            return method(self, *args)
        except OSError:
            raise
        except NotFound as e:
            log.info("%s", e)
            raise OSError(errno.ENOENT, str(e)) from None
        except Refused as e:
            log.warning("%s", e)
            raise OSError(errno.EBUSY, str(e)) from None
        except ThinstackError as e:
            log.error("%s", e)
            raise OSError(errno.EIO, str(e)) from None
    wrapped.__name__ = method.__name__
    return wrapped


class MountFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, instants: Instants, vgs: list[str], formats: tuple[str, ...],
                 lock_fd: int):
        self.instants = instants
        self.vgs = vgs
        self.formats = formats
        self.lock_fd = lock_fd
        self.handles: dict[int, _Handle] = {}
        self.numbers = itertools.count(1)
        self.cache = _Cache()
        self.started = time.time_ns()

    # -- names ----------------------------------------------------------------------------

    def _vgs(self) -> list[str]:
        return self.vgs or self.cache.get("vgs", lambda: sorted(v.name for v in lvm.vgs()))

    def _lvs(self, vg: str) -> list[LV]:
        return self.cache.get(("lvs", vg), lambda: lvm.volumes_of(vg))

    def _volumes(self, vg: str) -> dict[str, LV]:
        return mount_instants.shown(self._lvs(vg))

    def _files(self, vg: str) -> dict[str, tuple[str, str]]:
        """File name -> (volume name, format)."""
        return {file: (lv.name, f) for lv in self._volumes(vg).values()
                for file, f in file_names(lv.name, lv.size, self.formats).items()}

    def _resolve(self, path: str) -> tuple[str, str | None, str | None]:
        """(VG, volume, format) of a path; ENOENT when nothing is there."""
        parts = [p for p in path.split("/") if p]
        if not parts or len(parts) > 2 or parts[0] not in self._vgs():
            raise OSError(errno.ENOENT, path)
        if len(parts) == 1:
            return parts[0], None, None
        found = self._files(parts[0]).get(parts[1])
        if found is None:
            raise OSError(errno.ENOENT, path)
        return parts[0], *found

    def _unopened(self, vg: str, name: str, format: str) -> Layout:
        """What opening the file now would show: from the live volume's mapping."""
        def make() -> Content:
            lvs = self._lvs(vg)
            lv = mount_instants.shown(lvs)[name]
            kind = exports.source_kind(lv, lvs)
            return mount_instants.content(lv, kind, lvm.holding_pool(lv, lvs))
        content = self.cache.get(("content", vg, name), make)
        return self.cache.get(("layout", vg, name, format), lambda: content.layout(format))

    # -- the operations -------------------------------------------------------------------

    def init_with_config(self, conn, config):
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)  # the daemon's, after the fork
        # With it, the kernel asks for the attributes at every read (attr_timeout is 0, so that
        # a new instant's size shows at once) and drops the cached pages when they change. An
        # open file's instant never changes; and every open drops them anyway (no keep_cache).
        conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA

    def destroy(self, path):
        self.instants.close_all()

    def _open_file(self, path: str) -> tuple[Layout, int] | None:
        """The layout an open file of this path shows, its volume gone or not (fstat comes
        without the file's handle)."""
        parts = [p for p in path.split("/") if p]
        if len(parts) != 2:
            return None
        for format in self.formats:
            name = parts[1].removesuffix(SUFFIXES[format])
            if name != parts[1]:
                instant = self.instants.current(VolumeRef(parts[0], name))
                if instant is not None:
                    return instant.layout(format), instant.taken
        return None

    @_errors
    def getattr(self, path, fh=None):
        if fh in self.handles:  # an open file: the instant it shows, its volume gone or not
            return self._file_attrs(self.handles[fh].layout, self.handles[fh].instant.taken)
        found = self._open_file(path)
        if found is not None:
            return self._file_attrs(*found)
        vg, name, format = self._resolve(path) if path != "/" else (None, None, None)
        if name is None or format is None:
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_mtime=self.started,
                        st_ctime=self.started, st_atime=self.started)
        assert vg is not None
        return self._file_attrs(self._unopened(vg, name, format), time.time_ns())

    @staticmethod
    def _file_attrs(layout: Layout, mtime: int) -> dict:
        """mtime: the instant's (now, for a file not open: opening it takes a new one)."""
        return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_uid=0, st_gid=0,
                    st_size=layout.size, st_blocks=-(-layout.stored // 512), st_blksize=1 << 16,
                    st_mtime=mtime, st_ctime=mtime, st_atime=mtime)

    @_errors
    def readdir(self, path, fh):
        if path == "/":
            return [".", "..", *self._vgs()]
        vg, name, _ = self._resolve(path)
        if name is not None:
            raise OSError(errno.ENOTDIR, path)
        return [".", "..", *sorted(self._files(vg))]

    @_errors
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, path)
        vg, name, format = self._resolve(path)
        if name is None or format is None:
            raise OSError(errno.EISDIR, path)
        instant = self.instants.acquire(VolumeRef(vg, name))
        number = next(self.numbers)
        self.handles[number] = _Handle(instant, format)
        return number

    @_errors
    def release(self, path, fh):
        handle = self.handles.pop(fh, None)
        if handle is not None:
            self.instants.release(handle.instant)
        return 0

    def read(self, path, size, offset, fh):
        handle = self.handles[fh]
        return handle.layout.read(offset, size, handle.instant.pread)

    def lseek(self, path, offset, whence, fh):
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE come here")
        return self.handles[fh].layout.seek(offset, data=whence == os.SEEK_DATA)

    def statfs(self, path):
        return dict(f_bsize=1 << 16, f_frsize=1 << 16, f_namemax=255)


class _Fuse(mfusepy.FUSE):
    """mfusepy knows FUSE's lseek only as a field of libfuse's table: this passes it on."""

    def lseek(self, path, offset, whence, fip):
        return self.operations.lseek(None if path is None else path.decode(), offset, whence,
                                     fip.contents.fh)


# --- the commands -------------------------------------------------------------------------------

def fuse_options(allow_other: bool) -> dict[str, object]:
    """Read-only; attributes never cached, so a new instant's size shows at once; only root
    may enter, unless allow_other, and then the kernel checks the files' 0600 itself."""
    options: dict[str, object] = dict(
        ro=True, fsname="thinstack", subtype="thinstack", attr_timeout=0, entry_timeout=0,
        negative_timeout=0, max_threads=16)
    if allow_other:
        options.update(allow_other=True, default_permissions=True)
    return options


def mount(mountpoint: Path, vgs: list[str], formats: list[str], *, allow_other: bool = False,
          foreground: bool = False) -> None:
    """Mount, and serve until unmounted (in the background unless `foreground`)."""
    chosen = check_formats(formats)
    mountpoint = mountpoint.absolute()
    if not mountpoint.is_dir():
        raise NotFound(f"{mountpoint}: no such directory")
    for vg in vgs:
        if not lvm.vgs(lvm.check_name(vg, "volume group name")):
            raise NotFound(f"volume group {vg} not found")
    if not os.path.exists("/dev/fuse"):
        raise ThinstackError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    mount_instants.unmount_stale(mountpoint)  # a killed mount's, before ours goes on top
    if mount_instants.mounted(mountpoint):
        raise Exists(f"{mountpoint}: a thinstack mount is already there")
    lock = mount_instants.new_lock(mountpoint)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    instants = Instants(mountpoint, lock)
    # libfuse ends its loop on these only where nobody has taken them (thinstack's CLI has).
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)
    try:
        _Fuse(MountFS(instants, vgs, chosen, fd), str(mountpoint), foreground=foreground,
              **fuse_options(allow_other))
    except RuntimeError as e:
        raise ThinstackError(f"cannot mount at {mountpoint} (libfuse: {e})") from None
    finally:
        instants.close_all()
        lock.unlink(missing_ok=True)
        os.close(fd)


def umount(mountpoint: Path) -> None:
    """Unmount; refused while files are open. Returns once the daemon has removed its
    snapshots and ended."""
    mountpoint = mountpoint.absolute()
    if not mount_instants.mounted(mountpoint):
        raise NotFound(f"{mountpoint}: no thinstack mount there")
    if mount_instants.unmount_stale(mountpoint):
        return
    try:
        RUNNER.run(["umount", str(mountpoint)])
    except CommandError as e:
        if "busy" in e.stderr:
            raise Refused(f"{mountpoint} is in use: files in it are open (or a process works "
                          "in it); close them and try again") from None
        raise ThinstackError(f"cannot unmount {mountpoint}: {e.stderr.strip()}") from None
    deadline = time.monotonic() + WAIT_FOR_DAEMON
    while mount_instants.live(mountpoint):
        if time.monotonic() > deadline:
            raise ThinstackError(f"{mountpoint} is unmounted, but its process has not ended "
                                 f"in {WAIT_FOR_DAEMON:g} s")
        time.sleep(0.1)
