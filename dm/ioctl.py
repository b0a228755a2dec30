"""Device-mapper through the ioctls of /dev/mapper/control: what `dmsetup info`, `status`,
`table`, `message`, `ls` and `targets` answer, without starting a process (in the lab a
dmsetup run costs 0.2 s or more; an ioctl, microseconds).

Only requests that neither make nor remove a node are here: those need udev's cookies, which
dmsetup keeps (client.DeviceMapper). Status, table, info, list and messages need no udev.

The layout is linux/dm-ioctl.h's (interface version 4): a `struct dm_ioctl` header, then the
request's or the reply's data at `data_start`, the whole in one buffer the kernel writes back
into. A reply that does not fit sets DM_BUFFER_FULL_FLAG; the request is then made again with
a larger buffer, as libdevmapper does. Packing and parsing are pure functions, tested without a
kernel; `Control` only adds the system call.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from enum import IntEnum

from thinstack.dm.errors import DmError, ParseError

CONTROL = "/dev/mapper/control"
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]: 312 bytes, no implicit padding.
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
SPEC = struct.Struct("=QQiI16s")  # struct dm_target_spec; its parameters follow, NUL-ended
NAME_LIST = struct.Struct("=QI")  # struct dm_name_list: dev, next; the name follows
VERSIONS = struct.Struct("=I3I")  # struct dm_target_versions: next, version[3]; the name follows
MESSAGE = struct.Struct("=Q")  # struct dm_target_msg: sector; the message follows, NUL-ended
NAME_LEN, UUID_LEN = 128, 129
# The interface version we speak: the kernel refuses another major, or a minor newer than its
# own; 4.0 asks for nothing newer than what every request here needs.
VERSION = (4, 0, 0)
INITIAL_BUFFER = 16 << 10
MAX_BUFFER = 64 << 20
_TRACE = os.environ.get("THINSTACK_TRACE") == "1"


class Cmd(IntEnum):
    LIST_DEVICES = 2
    DEV_SUSPEND = 6
    DEV_STATUS = 7
    TABLE_LOAD = 9
    TABLE_STATUS = 12
    LIST_VERSIONS = 13
    TARGET_MSG = 14


class Flag(IntEnum):
    READONLY = 1 << 0
    SUSPEND = 1 << 1
    STATUS_TABLE = 1 << 4
    ACTIVE_PRESENT = 1 << 5
    INACTIVE_PRESENT = 1 << 6
    BUFFER_FULL = 1 << 8
    NOFLUSH = 1 << 11
    QUERY_INACTIVE_TABLE = 1 << 12
    DATA_OUT = 1 << 16


def request_code(cmd: Cmd) -> int:
    """_IOWR(0xfd, cmd, struct dm_ioctl): read and write, the header's size, dm's type."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def encode_dev(major: int, minor: int) -> int:
    """The kernel's huge_encode_dev: how dm_ioctl.dev carries a device number."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(dev: int) -> tuple[int, int]:
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


class IoctlError(DmError):
    """The kernel refused a request; `errno` says why (ENXIO: no such device)."""

    def __init__(self, what: str, errno: int):
        self.errno = errno
        super().__init__(f"{what}: {os.strerror(errno)}")


@dataclass(frozen=True)
class Reply:
    """The header the kernel wrote back, and its data (data_start to data_size)."""

    flags: int
    target_count: int
    open_count: int
    event_nr: int
    major: int
    minor: int
    name: str
    uuid: str
    data: bytes

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True)
class Spec:
    """One target's line: what `dmsetup table` or `status` prints for it."""

    start: int
    length: int
    type_name: str
    params: str

    def render(self) -> str:
        return f"{self.start} {self.length} {self.type_name} {self.params}".rstrip()


@dataclass(frozen=True)
class Listed:
    name: str
    major: int
    minor: int


def pack(*, name: str = "", dev: int = 0, flags: int = 0, payload: bytes = b"",
         size: int = INITIAL_BUFFER, target_count: int = 0) -> bytearray:
    """A request buffer of `size` bytes: the header, the payload at data_start, zeros after."""
    start = HEADER.size  # 312: already 8-byte aligned, as the payload's u64 wants
    raw = name.encode()
    if len(raw) >= NAME_LEN or "\0" in name:
        raise DmError(f"{name!r} is not a device-mapper name (at most {NAME_LEN - 1} bytes)")
    size = max(size, start + len(payload))
    buffer = bytearray(size)
    HEADER.pack_into(buffer, 0, *VERSION, size, start, target_count, 0, flags, 0, 0, dev, raw,
                     b"", b"")
    buffer[start:start + len(payload)] = payload
    return buffer


def unpack(buffer: bytes | bytearray) -> Reply:
    (_v0, _v1, _v2, data_size, data_start, target_count, open_count, flags, event_nr, _pad, dev,
     name, uuid, _data) = HEADER.unpack_from(buffer, 0)
    # A reply without data says data_size = 305 (the header up to its data field).
    if data_start < HEADER.size or data_size > len(buffer):
        raise ParseError(f"dm ioctl reply with data at {data_start}..{data_size} in a buffer of "
                         f"{len(buffer)} bytes")
    major, minor = decode_dev(dev)
    return Reply(flags=flags, target_count=target_count, open_count=open_count,
                 event_nr=event_nr, major=major, minor=minor, name=_cstr(name), uuid=_cstr(uuid),
                 data=bytes(buffer[data_start:data_size]))


def message_payload(sector: int, text: str) -> bytes:
    return MESSAGE.pack(sector) + text.encode() + b"\0"


def specs_payload(specs: list[Spec]) -> bytes:
    """DM_TABLE_LOAD's data: each spec with its NUL-ended parameters, padded to 8 bytes, its
    `next` the distance to the following one (as dm-ioctl's populate_table walks them)."""
    out = bytearray()
    for spec in specs:
        params = spec.params.encode() + b"\0"
        size = SPEC.size + len(params)
        size += -size % 8
        type_name = spec.type_name.encode()
        if len(type_name) >= 16:
            raise DmError(f"{spec.type_name!r} is not a target type name")
        out += SPEC.pack(spec.start, spec.length, 0, size, type_name)
        out += params.ljust(size - SPEC.size, b"\0")
    return bytes(out)


def parse_specs(data: bytes, count: int) -> list[Spec]:
    """DM_TABLE_STATUS's reply data: `count` specs, each `next` bytes from the first."""
    specs, at = [], 0
    for _ in range(count):
        if at + SPEC.size > len(data):
            raise ParseError(f"dm target spec at {at} runs past the reply's {len(data)} bytes")
        start, length, _status, following, type_name = SPEC.unpack_from(data, at)
        specs.append(Spec(start, length, _cstr(type_name), _cstr(data[at + SPEC.size:])))
        if following <= at and len(specs) < count:
            raise ParseError(f"dm target spec at {at} points back to {following}")
        at = following
    return specs


def parse_name_list(data: bytes) -> list[Listed]:
    """DM_LIST_DEVICES's reply data: records chained by `next` (bytes from the record itself);
    no data, or a first record with dev 0, means no devices."""
    found: list[Listed] = []
    at = 0
    while data:
        if at + NAME_LIST.size > len(data):
            raise ParseError(f"dm name list record at {at} runs past the reply's {len(data)} "
                             "bytes")
        dev, following = NAME_LIST.unpack_from(data, at)
        if dev == 0 and at == 0:
            return []
        found.append(Listed(_cstr(data[at + NAME_LIST.size:]), *decode_dev(dev)))
        if following == 0:
            break
        at += following
    return found


def parse_versions(data: bytes) -> dict[str, str]:
    """DM_LIST_VERSIONS's reply data: target types and versions, as `dmsetup targets` prints."""
    found, at = {}, 0
    while at + VERSIONS.size <= len(data):
        following, major, minor, patch = VERSIONS.unpack_from(data, at)
        found[_cstr(data[at + VERSIONS.size:])] = f"v{major}.{minor}.{patch}"
        if following == 0:
            break
        at += following
    return found


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class Control:
    """The control node, opened on first use and kept open (one descriptor per process)."""

    def __init__(self, path: str = CONTROL):
        self.path = path
        self._fd: int | None = None
        self._opening = threading.Lock()

    def fd(self) -> int:
        with self._opening:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise DmError(f"{self.path}: {e.strerror} (is device-mapper loaded?)"
                                  ) from None
            return self._fd

    def call(self, cmd: Cmd, device: str = "", *, flags: int = 0, payload: bytes = b"",
             what: str = "", target_count: int = 0) -> Reply:
        """Issue `cmd` for `device` (a dm name, or a path to its node), growing the buffer
        until the reply fits. `what`: the request as an error names it."""
        name, dev = _target(device)
        size = INITIAL_BUFFER
        started = time.monotonic()
        while True:
            buffer = pack(name=name, dev=dev, flags=flags, payload=payload, size=size,
                          target_count=target_count)
            try:
                fcntl.ioctl(self.fd(), request_code(cmd), buffer, True)
            except OSError as e:
                raise IoctlError(what or f"{cmd.name} {device}".rstrip(),
                                 e.errno or errno.EIO) from None
            reply = unpack(buffer)
            if not reply.has(Flag.BUFFER_FULL) or size >= MAX_BUFFER:
                break
            size *= 4
        if _TRACE:
            print(f"thinstack: {time.monotonic() - started:6.3f}s ioctl DM_{cmd.name} {device}",
                  file=sys.stderr)
        return reply

    def status(self, device: str) -> Reply:
        return self.call(Cmd.DEV_STATUS, device)

    def table_status(self, device: str, *, table: bool = False, inactive: bool = False,
                     noflush: bool = False) -> list[Spec]:
        """noflush: the target does not commit its metadata first (a status otherwise does)."""
        flags = (Flag.STATUS_TABLE if table else 0) | \
            (Flag.QUERY_INACTIVE_TABLE if inactive else 0) | (Flag.NOFLUSH if noflush else 0)
        reply = self.call(Cmd.TABLE_STATUS, device, flags=flags)
        return parse_specs(reply.data, reply.target_count)

    def message(self, device: str, sector: int, text: str) -> str:
        reply = self.call(Cmd.TARGET_MSG, device, payload=message_payload(sector, text),
                          what=f"message {device} {sector} {text}")
        return _cstr(reply.data) if reply.has(Flag.DATA_OUT) else ""

    def load(self, device: str, specs: list[Spec]) -> None:
        """Load `specs` as the device's inactive table."""
        self.call(Cmd.TABLE_LOAD, device, payload=specs_payload(specs),
                  target_count=len(specs), what=f"load {device}")

    def resume(self, device: str, *, noflush: bool = False) -> None:
        """Resume the device, making a loaded inactive table live (the kernel suspends it
        first; with noflush, I/O a target queued stays queued across the swap)."""
        self.call(Cmd.DEV_SUSPEND, device, flags=Flag.NOFLUSH if noflush else 0,
                  what=f"resume {device}")

    def list(self) -> list[Listed]:
        return parse_name_list(self.call(Cmd.LIST_DEVICES).data)

    def versions(self) -> dict[str, str]:
        return parse_versions(self.call(Cmd.LIST_VERSIONS).data)


def _target(device: str) -> tuple[str, int]:
    """A request names its device by name, or, given a path, by device number (the kernel
    looks a device up by its number when the name and uuid are empty), as dmsetup does."""
    if not device.startswith("/"):
        return device, 0
    try:
        st = os.stat(device)
    except OSError as e:
        raise IoctlError(device, e.errno or errno.ENOENT) from None
    if not stat.S_ISBLK(st.st_mode):
        raise DmError(f"{device} is not a block device")
    return "", encode_dev(os.major(st.st_rdev), os.minor(st.st_rdev))
