"""Raw dm-thin pools, without LVM, for tests against the kernel: make a pool from a metadata and
a data device, create, snapshot and delete thin devices in it, activate them (optionally over an
external read-only origin). thinstack itself leaves this to LVM; the tests keep it as a model of
what LVM does and as a check of dm/'s tables, statuses and tools against the kernel.

Changes to the pool go through transactions the way LVM makes them. The pool stores a 64-bit
transaction id that only a compare-and-swap message (`set_transaction_id OLD NEW`) changes, and
the kernel commits the metadata after every message. A change is a `Transaction`: the id it
starts from and the messages (create_thin, create_snap, delete) that make the change. The caller
may persist it before `RawPool.apply` runs it. apply sends the compare-and-swap first, then the
messages. So after a crash anywhere in between, the pool says how far it got: transaction id
still OLD means nothing was done; NEW means the swap was done and each message's effect (a
device id present or absent) shows whether it was. `plan` turns that into what is left to send,
and running apply again with the same Transaction finishes the job, however often it is
interrupted.

As with LVM, a pool has at most one transaction in flight: finish (apply) or drop a persisted
transaction before beginning the next. A transaction begun from id OLD cannot be told from
another begun from OLD once either has moved the pool to OLD + 1, so applying a stale one then
would send its messages; one from further back is refused (TransactionConflict).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Collection, Iterable
from contextlib import ExitStack
from dataclasses import dataclass

from tests import thindump
from thinstack.dm import tools
from thinstack.dm.client import Device, DeviceMapper
from thinstack.dm.errors import DmError, ParseError
from thinstack.dm.pool import SECTOR, Pool, device_path
from thinstack.dm.status import Failed, ThinStatus
from thinstack.dm.targets import Device as DeviceRef
from thinstack.dm.targets import Table, ThinPoolTarget, ThinTarget


class TransactionConflict(DmError):
    """The pool's transaction id is neither the one a transaction started from nor the one it
    moves to: something else changed the pool."""


MAX_DEVICE_ID = (1 << 24) - 1  # thin device ids are 24-bit
METADATA_BLOCK = 4096  # an all-zero first metadata block makes the kernel format a new pool


def next_device_id(used: Iterable[int]) -> int:
    """The id for a new thin device: one past the highest in use, so that an id just deleted is
    not handed out again at once (a stale record naming it must not find a new volume); the
    lowest free id once the top of the 24-bit range is reached."""
    used = set(used)
    candidate = max(used, default=-1) + 1
    if candidate <= MAX_DEVICE_ID:
        return candidate
    for candidate in range(MAX_DEVICE_ID + 1):
        if candidate not in used:
            return candidate
    raise DmError("the pool has no free thin device id left")


@dataclass(frozen=True)
class CreateThin:
    dev_id: int

    @property
    def text(self) -> str:
        return f"create_thin {self.dev_id}"

    def applied(self, device_ids: Collection[int]) -> bool:
        return self.dev_id in device_ids


@dataclass(frozen=True)
class CreateSnap:
    """A new thin device `dev_id` sharing all of `origin_id`'s blocks."""

    dev_id: int
    origin_id: int

    @property
    def text(self) -> str:
        return f"create_snap {self.dev_id} {self.origin_id}"

    def applied(self, device_ids: Collection[int]) -> bool:
        return self.dev_id in device_ids


@dataclass(frozen=True)
class Delete:
    dev_id: int

    @property
    def text(self) -> str:
        return f"delete {self.dev_id}"

    def applied(self, device_ids: Collection[int]) -> bool:
        return self.dev_id not in device_ids


PoolMessage = CreateThin | CreateSnap | Delete


def parse_message(text: str) -> PoolMessage:
    match text.split():
        case ["create_thin", dev_id] if dev_id.isdigit():
            return CreateThin(int(dev_id))
        case ["create_snap", dev_id, origin_id] if dev_id.isdigit() and origin_id.isdigit():
            return CreateSnap(int(dev_id), int(origin_id))
        case ["delete", dev_id] if dev_id.isdigit():
            return Delete(int(dev_id))
    raise ParseError(f"not a thin-pool transaction message: {text!r}")


@dataclass(frozen=True)
class Transaction:
    """Move the pool from transaction id `old_id` to `old_id + 1` by sending `messages`."""

    old_id: int
    messages: tuple[PoolMessage, ...]

    def __post_init__(self):
        # Whether a message was applied is read from its device id's presence; two messages
        # about one id would make that ambiguous.
        ids = [m.dev_id for m in self.messages]
        if len(ids) != len(set(ids)):
            raise ValueError("a transaction may create or delete each device id only once")
        if any(not 0 <= i <= MAX_DEVICE_ID for i in ids):
            raise ValueError("thin device ids are 24-bit")

    @property
    def new_id(self) -> int:
        return self.old_id + 1

    def to_dict(self) -> dict:
        return {"old_id": self.old_id, "messages": [m.text for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict) -> Transaction:
        return cls(int(data["old_id"]), tuple(parse_message(m) for m in data["messages"]))


@dataclass(frozen=True)
class Plan:
    """What is left of a transaction: the compare-and-swap (if not done yet), then messages."""

    set_transaction_id: bool
    messages: tuple[PoolMessage, ...]

    @property
    def done(self) -> bool:
        return not self.set_transaction_id and not self.messages


def plan(txn: Transaction, transaction_id: int, device_ids: Collection[int]) -> Plan:
    """What remains of `txn` on a pool whose status says `transaction_id` and whose metadata
    holds `device_ids`."""
    if transaction_id == txn.old_id:
        # The swap goes first, so nothing of txn can have happened yet. If an effect shows
        # anyway, someone else changed the pool and running txn could do harm.
        if any(m.applied(device_ids) for m in txn.messages):
            raise TransactionConflict(
                f"pool is at transaction {transaction_id}, but some of {txn.to_dict()} "
                "already shows in its metadata")
        return Plan(True, txn.messages)
    if transaction_id == txn.new_id:
        return Plan(False, tuple(m for m in txn.messages if not m.applied(device_ids)))
    raise TransactionConflict(f"pool is at transaction {transaction_id}; transaction "
                              f"{txn.to_dict()} expected {txn.old_id} or {txn.new_id}")


def create_pool(dm: DeviceMapper, name: str, target: ThinPoolTarget, *, fresh: bool,
                size: int | None = None) -> RawPool:
    """Activate a thin-pool `name`. fresh: format new, empty metadata (destroys whatever the
    metadata device held). size (sectors) defaults to the whole data device, which sets how
    many data blocks the pool has."""
    if fresh:
        _zero_first_block(device_path(target.metadata))
    if size is None:
        size = _size_sectors(device_path(target.data)) // target.block_size * target.block_size
    dm.create(name, Table.of(size, target))
    return RawPool(dm, name)


class RawPool(Pool):
    """A pool changed by messages, as LVM changes it."""

    def thin_dump(self, dev_id: int | None = None) -> thindump.ThinDump:
        with self.metadata_snap():
            return thindump.thin_dump(self.metadata_path, dev_id=dev_id, runner=self.dm.runner)

    def thin_delta(self, snap1: int, snap2: int) -> tools.ThinDelta:
        with self.metadata_snap():
            return tools.thin_delta(self.metadata_path, snap1, snap2, runner=self.dm.runner)

    def device_ids(self) -> set[int]:
        return {entry.dev_id for entry in self.thin_ls()}

    def new_device_id(self) -> int:
        return next_device_id(self.device_ids())

    def begin(self, *messages: PoolMessage) -> Transaction:
        """A transaction from the pool's current transaction id, for the caller to persist
        before `apply`."""
        return Transaction(self.status().transaction_id, messages)

    def apply(self, txn: Transaction) -> None:
        """Bring the pool to the end of `txn`, from wherever an earlier apply stopped."""
        todo = plan(txn, self.status().transaction_id, self.device_ids())
        if todo.set_transaction_id:
            self.dm.message(self.name, 0, f"set_transaction_id {txn.old_id} {txn.new_id}")
        for message in todo.messages:
            with ExitStack() as stack:
                if isinstance(message, CreateSnap):
                    # An origin written to while its btree is copied would corrupt the snapshot.
                    for name in self.active_devices(message.origin_id):
                        stack.enter_context(self.dm.suspended(name))
                self.dm.message(self.name, 0, message.text)

    def create_thin(self, dev_id: int) -> None:
        self.apply(self.begin(CreateThin(dev_id)))

    def create_snap(self, dev_id: int, origin_id: int) -> None:
        self.apply(self.begin(CreateSnap(dev_id, origin_id)))

    def delete(self, dev_id: int) -> None:
        """Delete thin device `dev_id` (it must not be active)."""
        self.apply(self.begin(Delete(dev_id)))

    def activate(self, name: str, dev_id: int, size: int, *, origin: DeviceRef | None = None,
                 readonly: bool = False) -> Device:
        """Activate thin device `dev_id` as dm device `name` of `size` sectors. With `origin`,
        reads of blocks never written come from that device, which must stay unchanged while
        any thin uses it (an external origin: a gold image, say)."""
        return self.dm.create(name, Table.of(size, ThinTarget(self._devno(), dev_id, origin)),
                              readonly=readonly)

    def active_devices(self, dev_id: int) -> list[str]:
        """Names of the dm devices that map thin device `dev_id` of this pool."""
        devno = self._devno()
        return [name for name, line in self.dm.lines_of_type("thin")
                if isinstance(line.target, ThinTarget) and line.target.dev_id == dev_id
                and line.target.pool == devno]

    def _devno(self) -> str:
        info = self.dm.info(self.name)
        if info is None:
            raise DmError(f"thin-pool {self.name} is not active")
        return info.device.devno

    def thin_status(self, name: str) -> ThinStatus:
        status = self.dm.target_status(name)
        if isinstance(status, Failed):
            raise DmError(f"thin device {name} has failed with its pool {self.name}")
        if not isinstance(status, ThinStatus):
            raise DmError(f"{name} is not a thin device")
        return status


def _zero_first_block(path: str) -> None:
    # O_DIRECT: the kernel reads metadata around the page cache, which must hold no stale copy.
    buffer = mmap.mmap(-1, METADATA_BLOCK)  # page-aligned and zero-filled
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [buffer], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def _size_sectors(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)
