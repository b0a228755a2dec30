"""Device-mapper devices: create, load, suspend, resume, remove, message, and read back info,
tables and status as types.

Reads and messages (info, list, table, status, message, targets) go through the control node's
ioctls (dm/ioctl.py): no process, no udev involved. What makes, changes or removes a node
(create, load, suspend, resume, remove) and waiting for events run `dmsetup`, for its udev
synchronisation below.

udev: dmsetup keeps its default udev synchronisation (cookies): each command that adds, changes
or removes a node waits until the dm udev rules have run `dmsetup udevcomplete`. That is what
LVM does, so devices made here and by LVM get their /dev/mapper links from one place (udev) and
never from libdevmapper's fallback racing udev; with --noudevsync we would have to wait for
each kind of event ourselves and would still not know when a removal is finished. The lab runs
systemd-udevd with those rules. A cookie only says "udev finished", not "udev exists": if udevd
is not running libdevmapper silently skips the wait. So `create` also confirms in udev's
database (udev.wait_for_device) that the device was processed and /dev/mapper/NAME is its node,
with a bounded wait and a clear error; and every dmsetup call has a time limit, so a cookie that
is never completed (rules missing) fails instead of hanging.
"""

from __future__ import annotations

import builtins
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from thinstack.dm import ioctl, udev
from thinstack.dm.command import RUNNER, CommandError, CommandTimeout, Runner
from thinstack.dm.errors import DmError, ParseError
from thinstack.dm.status import StatusLine, TargetStatus, parse_status_lines
from thinstack.dm.targets import Table, TableLine

_NO_DEVICES = "No devices found"
# One control node descriptor per process, shared by every DeviceMapper on the real runner.
CONTROL = ioctl.Control()
_INFO_FIELDS = "name,major,minor,open,events,attr,uuid"
# Device names cannot contain "/"; the uuid, which might, comes last and is split off whole.
_SEPARATOR = "/"


@dataclass(frozen=True)
class Device:
    """An active dm device whose /dev/mapper node udev has made."""

    name: str
    major: int
    minor: int

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"

    @property
    def devno(self) -> str:
        """How tables name this device: what the kernel prints back."""
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    major: int
    minor: int
    open_count: int
    event_nr: int
    live_table: bool
    inactive_table: bool
    suspended: bool
    readonly: bool
    uuid: str | None

    @property
    def device(self) -> Device:
        return Device(self.name, self.major, self.minor)


class DeviceMapper:
    """dmsetup through `runner`, ioctls through `control`. `timeout` bounds every dmsetup call;
    `udev_timeout` bounds the wait for udev after a create.

    `control` defaults to the real control node when the runner is the real one. A runner
    handed in without a control (a test's fake) stands for the whole system: every request then
    runs as the dmsetup command that answers it."""

    def __init__(self, runner: Runner = RUNNER, *, control: ioctl.Control | None = None,
                 timeout: float = 60, udev_timeout: float = 30):
        self.runner = runner
        self.control = control if control is not None or runner is not RUNNER else CONTROL
        self.timeout = timeout
        self.udev_timeout = udev_timeout

    def _dmsetup(self, *args: str, input: str | None = None) -> str:
        return self.runner.run(["dmsetup", *args], input=input, timeout=self.timeout)

    def create(self, name: str, table: Table, *, readonly: bool = False,
               uuid: str | None = None) -> Device:
        """Create and activate `name`; return it once udev has made /dev/mapper/NAME. If udev
        does not finish in time (UdevTimeout) the device is left in place, active."""
        options = [*(["--readonly"] if readonly else []), *(["--uuid", uuid] if uuid else [])]
        self._dmsetup("create", name, *options, input=table.render())
        info = self.info(name)
        if info is None:
            raise DmError(f"dm device {name} vanished right after it was created")
        udev.wait_for_device(name, info.major, info.minor, timeout=self.udev_timeout)
        return info.device

    def load(self, name: str, table: Table) -> None:
        """Load `table` as the inactive table of `name`; the next resume makes it live."""
        self._dmsetup("load", name, input=table.render())

    def reload(self, name: str, table: Table, *, noflush: bool = False) -> None:
        """Swap `table` in as `name`'s live one, now: through the control node (no process and
        no wait for udev: a device that stays, whose nodes udev has made already), else
        dmsetup load and resume."""
        if self.control is None:
            self.load(name, table)
            self.resume(name)
            return
        self.control.load(name, [ioctl.Spec(line.start, line.length, line.target.type_name,
                                            " ".join(line.target.args()))
                                 for line in table.lines])
        self.control.resume(name, noflush=noflush)

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        """Suspend `name`; with noflush, I/O the target queued stays queued instead of being
        completed first (needed for a thin-pool that is out of space)."""
        self._dmsetup("suspend", *(["--noflush"] if noflush else []), name)

    def resume(self, name: str) -> None:
        self._dmsetup("resume", name)

    @contextmanager
    def suspended(self, name: str, *, noflush: bool = False) -> Iterator[None]:
        """Keep `name` suspended for the body, and resume it however the body ends."""
        self.suspend(name, noflush=noflush)
        try:
            yield
        finally:
            self.resume(name)

    def remove(self, name: str, *, retry: bool = True, deferred: bool = False) -> None:
        """Remove `name`. retry: try again for a few seconds while it is open, which it is for a
        moment after any writer closes it (udev's watch rule probes it again). deferred: if it is
        still open, remove it on its last close."""
        options = [*(["--retry"] if retry else []), *(["--deferred"] if deferred else [])]
        self._dmsetup("remove", *options, name)

    def message(self, name: str, sector: int, text: str) -> str:
        """Send a target message (`create_thin 1`, ...) and return what the target answers."""
        if self.control is not None:
            return self.control.message(name, sector, text).strip()
        return self._dmsetup("message", name, str(sector), *text.split()).strip()

    def info(self, name: str) -> DeviceInfo | None:
        """The device's state, or None if there is no device by that name."""
        if self.control is not None:
            try:
                return _info_of(self.control.status(name))
            except ioctl.IoctlError as e:
                if e.errno == errno.ENXIO:
                    return None
                raise
        try:
            out = self._dmsetup("info", "-c", "--noheadings", "--separator", _SEPARATOR,
                                "-o", _INFO_FIELDS, name)
        except CommandError as e:
            if "Device does not exist" in e.stderr:
                return None
            raise
        return _parse_info(out.strip())

    def exists(self, name: str) -> bool:
        return self.info(name) is not None

    def list(self) -> builtins.list[DeviceInfo]:
        if self.control is not None:
            # A device removed between the list and its status is gone: left out.
            found = (self.info(d.name) for d in self.control.list())
            return [info for info in found if info is not None]
        out = self._dmsetup("info", "-c", "--noheadings", "--separator", _SEPARATOR,
                            "-o", _INFO_FIELDS)
        return [_parse_info(line) for line in out.splitlines()
                if line.strip() and line.strip() != _NO_DEVICES]

    def table(self, name: str, *, inactive: bool = False) -> Table:
        if self.control is not None:
            return Table.parse("".join(spec.render() + "\n" for spec in self.control.table_status(
                name, table=True, inactive=inactive)))
        return Table.parse(self._dmsetup("table", *(["--inactive"] if inactive else []), name))

    def lines_of_type(self, target_type: str) -> builtins.list[tuple[str, TableLine]]:
        """Every table line of every device that uses `target_type`, with the device's name."""
        if self.control is not None:
            found = []
            for device in self.control.list():
                try:
                    specs = self.control.table_status(device.name, table=True)
                except ioctl.IoctlError as e:
                    if e.errno == errno.ENXIO:
                        continue  # removed since the list
                    raise
                found += [(device.name, TableLine.parse(spec.render())) for spec in specs
                          if spec.type_name == target_type]
            return found
        out = self._dmsetup("table", "--target", target_type)
        found = []
        for line in out.splitlines():
            if not line.strip() or line.strip() == _NO_DEVICES:
                continue
            # A name may contain ": ", a table line never does.
            name, sep, rest = line.rpartition(": ")
            if not sep:
                raise ParseError(f"not a `dmsetup table` line: {line!r}")
            found.append((name, TableLine.parse(rest)))
        return found

    def status(self, name: str, *, noflush: bool = False) -> builtins.list[StatusLine]:
        """noflush: no metadata commit first (dm-thin, dm-clone and dm-cache flush their disks
        for each status otherwise), for a poll that needs only the in-core counts."""
        if self.control is not None:
            specs = self.control.table_status(name, noflush=noflush)
            return parse_status_lines("".join(spec.render() + "\n" for spec in specs))
        return parse_status_lines(self._dmsetup("status", *(["--noflush"] if noflush else []),
                                                name))

    def target_status(self, name: str) -> TargetStatus:
        """The status of a device that has a single target (pools and thin volumes do)."""
        lines = self.status(name)
        if len(lines) != 1:
            raise DmError(f"{name} has {len(lines)} targets, expected one")
        return lines[0].status

    def targets(self) -> dict[str, str]:
        """The target types the kernel has loaded, with their versions (`thin-pool`: `v1.23.0`).
        A type whose module is not loaded yet is missing here until a table needs it."""
        if self.control is not None:
            return self.control.versions()
        found = {}
        for line in self._dmsetup("targets").splitlines():
            words = line.split()
            if len(words) == 2:
                found[words[0]] = words[1]
        return found

    def wait(self, name: str, event_nr: int, *, timeout: float | None = None) -> int | None:
        """Wait until `name`'s event counter passes `event_nr` (a thin-pool crossing its low
        water mark, say) and return the new count, or None if `timeout` seconds (by default the
        runner's) pass first."""
        try:
            # Not _dmsetup: its time limit must not cut short a wait meant to be long.
            self.runner.run(["dmsetup", "wait", name, str(event_nr)], timeout=timeout)
        except CommandTimeout:
            return None
        info = self.info(name)
        if info is None:
            raise DmError(f"dm device {name} was removed while waiting for an event")
        return info.event_nr


def _info_of(reply: ioctl.Reply) -> DeviceInfo:
    flag = ioctl.Flag
    return DeviceInfo(name=reply.name, major=reply.major, minor=reply.minor,
                      open_count=reply.open_count, event_nr=reply.event_nr,
                      live_table=reply.has(flag.ACTIVE_PRESENT),
                      inactive_table=reply.has(flag.INACTIVE_PRESENT),
                      suspended=reply.has(flag.SUSPEND), readonly=reply.has(flag.READONLY),
                      uuid=reply.uuid or None)


def _parse_info(line: str) -> DeviceInfo:
    fields = line.split(_SEPARATOR, _INFO_FIELDS.count(","))
    try:
        name, major, minor, open_count, events, attr, uuid = fields
        if len(attr) != 4:
            raise ValueError(attr)
        return DeviceInfo(name=name, major=int(major), minor=int(minor),
                          open_count=int(open_count), event_nr=int(events),
                          live_table=attr[0] == "L", inactive_table=attr[1] == "I",
                          suspended=attr[2] == "s", readonly=attr[3] == "r",
                          uuid=uuid or None)
    except ValueError:
        raise ParseError(f"unexpected `dmsetup info` line: {line!r}") from None
