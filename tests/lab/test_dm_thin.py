"""Raw dm-thin pools (thinstack.dm.pool and .tools) against the real kernel."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from tests.lab.test_dm_devices import same_as_dmsetup
from tests.patterns import (
    BLOCK,
    blocks_match,
    digest,
    is_zero,
    pattern,
    read_direct,
    write_blocks,
)
from tests.rawpool import (
    CreateSnap,
    CreateThin,
    Delete,
    RawPool,
    Transaction,
    TransactionConflict,
    create_pool,
)
from thinstack.dm import tools
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import PoolMode
from thinstack.dm.targets import LinearTarget, Table, ThinPoolTarget
from thinstack.dm.tools import BlockRange, DeltaKind, DeltaRange

BLOCK_SECTORS = BLOCK // 512  # pool blocks of 64 KiB, the size the patterns are written in
VOLUME = 64 << 20


def at(*blocks: int) -> list[int]:
    return [b * BLOCK for b in blocks]


def ranges(*blocks: int) -> list[BlockRange]:
    return tools.coalesce(BlockRange(b, 1) for b in blocks)


def new_pool(dm: DeviceMapper, metadata: str, data: str, **features) -> RawPool:
    return create_pool(dm, "pool", ThinPoolTarget(metadata, data, BLOCK_SECTORS, **features),
                       fresh=True)


@pytest.mark.lab(disks=2, disk_size="512M")
def test_thin_volumes_snapshots_and_their_mappings(lab_disks):
    dm = DeviceMapper()
    pool = new_pool(dm, *lab_disks)
    status = pool.status()
    assert (status.transaction_id, status.used_data_blocks, status.mode) == (0, 0, PoolMode.RW)
    assert status.total_data_blocks == (512 << 20) // BLOCK

    origin_id = pool.new_device_id()
    pool.create_thin(origin_id)
    origin = pool.activate("vol", origin_id, VOLUME // 512)
    assert pool.thin_status("vol").highest_mapped_sector is None
    write_blocks(origin.path, "before", at(5, 6, 7, 20))
    assert blocks_match(origin.path, "before", at(5, 6, 7, 20))
    assert is_zero(origin.path, at(0, 8, 19, 21))
    assert pool.thin_status("vol").mapped_sectors == 4 * BLOCK_SECTORS
    same_as_dmsetup("pool")
    same_as_dmsetup("vol")

    # A snapshot of the active origin (create_snap suspends it), then both written.
    snap_id = pool.new_device_id()
    pool.create_snap(snap_id, origin_id)
    assert not dm.info("vol").suspended
    snap = pool.activate("snap", snap_id, VOLUME // 512)
    write_blocks(origin.path, "after", at(6, 30))
    write_blocks(snap.path, "snap", at(40))
    assert blocks_match(snap.path, "before", at(5, 6, 7, 20))
    assert is_zero(snap.path, at(30))
    assert blocks_match(origin.path, "after", at(6, 30))
    assert blocks_match(origin.path, "before", at(5, 7, 20))
    assert is_zero(origin.path, at(40))

    # The metadata says exactly which blocks were written, and which changed since the snap.
    dump = pool.thin_dump()
    assert dump.data_block_size == BLOCK_SECTORS
    assert dump.devices[origin_id].virtual_ranges() == ranges(5, 6, 7, 20, 30)
    assert dump.devices[snap_id].virtual_ranges() == ranges(5, 6, 7, 20, 40)
    delta = pool.thin_delta(snap_id, origin_id)
    assert [r for r in delta.ranges if r.kind is not DeltaKind.SAME] == [
        DeltaRange(DeltaKind.DIFFERENT, 6, 1), DeltaRange(DeltaKind.RIGHT_ONLY, 30, 1),
        DeltaRange(DeltaKind.LEFT_ONLY, 40, 1)]
    assert delta.changed() == ranges(6, 30, 40)
    usage = {e.dev_id: e for e in pool.thin_ls()}
    assert (usage[origin_id].mapped_blocks, usage[origin_id].exclusive_blocks,
            usage[origin_id].shared_blocks) == (5, 2, 3)
    assert pool.thin_check().clean

    # Delete the snapshot: its blocks return to the pool, the origin is untouched.
    dm.remove("snap")
    pool.delete(snap_id)
    assert pool.device_ids() == {origin_id}
    assert pool.status().used_data_blocks == 5
    assert pool.status().transaction_id == 3  # one per change: create, snap, delete
    assert blocks_match(origin.path, "after", at(6, 30))

    dm.remove("vol")
    dm.remove("pool")
    check = tools.thin_check(lab_disks[0], metadata_snap=False)
    assert check.clean, check.output

    # The pool comes back from its metadata as it was.
    pool = create_pool(dm, "pool", ThinPoolTarget(*lab_disks, BLOCK_SECTORS), fresh=False)
    assert pool.device_ids() == {origin_id} and pool.status().transaction_id == 3
    origin = pool.activate("vol", origin_id, VOLUME // 512)
    assert blocks_match(origin.path, "after", at(6, 30))


@pytest.mark.lab(disks=2, disk_size="512M")
def test_an_external_origin_is_read_but_never_written(lab_disks):
    dm = DeviceMapper()
    gold_sectors = 16 << 11  # 16 MiB
    gold_rw = dm.create("gold-rw", Table.of(gold_sectors, LinearTarget(lab_disks[1], 0)))
    write_blocks(gold_rw.path, "gold", at(*range(gold_sectors * 512 // BLOCK)))
    dm.remove("gold-rw")
    gold = dm.create("gold", Table.of(gold_sectors, LinearTarget(lab_disks[1], 0)),
                     readonly=True)
    before = digest(gold.path, gold_sectors * 512)
    data = dm.create("data", Table.of(2 * gold_sectors, LinearTarget(lab_disks[1],
                                                                       gold_sectors)))
    pool = new_pool(dm, lab_disks[0], data.path)

    pool.create_thin(0)
    vm = pool.activate("vm", 0, gold_sectors, origin=gold.devno)
    assert blocks_match(vm.path, "gold", at(0, 1, 100, 255))
    write_blocks(vm.path, "vm", at(1, 100))
    # A write smaller than a pool block: the rest of the block is copied from the origin.
    with open(vm.path, "r+b", buffering=0) as f:
        f.seek(2 * BLOCK + 4096)
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    block = read_direct(vm.path, 2 * BLOCK)
    expected = bytearray(pattern("gold", 2 * BLOCK))
    expected[4096:8192] = b"x" * 4096
    assert block == bytes(expected)
    assert blocks_match(vm.path, "vm", at(1, 100))
    assert blocks_match(vm.path, "gold", at(0, 3, 99, 101, 255))
    # Its snapshot needs the origin too, and sees the same picture.
    pool.create_snap(1, 0)
    snap = pool.activate("vm-snap", 1, gold_sectors, origin=gold.devno)
    assert blocks_match(snap.path, "vm", at(1, 100))
    assert blocks_match(snap.path, "gold", at(0, 255))
    assert pool.thin_dump().devices[0].virtual_ranges() == ranges(1, 2, 100)

    assert digest(gold.path, gold_sectors * 512) == before
    for name in ("vm-snap", "vm", "pool", "data", "gold"):
        dm.remove(name)


@pytest.mark.lab(disks=2, disk_size="256M")
def test_a_full_pool_that_errors_when_out_of_space(lab_disks):
    dm = DeviceMapper()
    data = dm.create("data", Table.of(4 << 11, LinearTarget(lab_disks[1], 0)))  # 64 blocks
    pool = new_pool(dm, lab_disks[0], data.path, error_if_no_space=True)
    pool_events = dm.info("pool").event_nr
    pool.create_thin(0)
    vm = pool.activate("vm", 0, 16 << 11)

    fd = os.open(vm.path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    written = 0
    try:
        with pytest.raises(OSError) as caught:
            for offset in range(0, 16 << 20, BLOCK):
                buf[:] = pattern("fill", offset)
                os.pwritev(fd, [buf], offset)
                written += 1
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
    assert written == 64
    status = pool.status()
    assert status.mode is PoolMode.OUT_OF_DATA_SPACE and status.error_if_no_space
    assert (status.used_data_blocks, status.free_data_blocks) == (64, 0)
    # Running out raised a dm event: a waiter that last saw the old count returns at once.
    assert dm.wait("pool", pool_events, timeout=10) > pool_events
    # What was written before the pool filled is intact.
    assert blocks_match(vm.path, "fill", at(*range(64)))
    dm.remove("vm")
    dm.remove("pool")
    assert tools.thin_check(lab_disks[0], metadata_snap=False).clean


class Crash(Exception):
    pass


@pytest.mark.lab(disks=2, disk_size="256M")
def test_a_transaction_finishes_after_a_crash_at_any_step(lab_disks, monkeypatch):
    dm = DeviceMapper()
    pool = new_pool(dm, *lab_disks)
    pool.create_thin(0)
    vol = pool.activate("vol", 0, VOLUME // 512)
    write_blocks(vol.path, "v", at(3))
    send = dm.message

    for step in ("set_transaction_id", "create_thin", "create_snap"):
        txn = pool.begin(CreateThin(1), CreateSnap(2, 0))
        persisted = txn.to_dict()  # what a journal holds across the crash

        def crash_after_step(name, sector, text, step=step):
            out = send(name, sector, text)
            if text.startswith(step):
                raise Crash(text)
            return out

        monkeypatch.setattr(dm, "message", crash_after_step)
        with pytest.raises(Crash):
            pool.apply(txn)
        monkeypatch.setattr(dm, "message", send)
        assert not dm.info("vol").suspended  # even when create_snap was the step
        assert pool.status().transaction_id == txn.new_id

        pool.apply(Transaction.from_dict(persisted))
        assert pool.device_ids() == {0, 1, 2}
        assert pool.status().transaction_id == txn.new_id
        pool.apply(Transaction.from_dict(persisted))  # nothing left to do
        assert pool.status().transaction_id == txn.new_id
        assert pool.thin_dump().devices[2].virtual_ranges() == ranges(3)
        pool.apply(pool.begin(Delete(1), Delete(2)))  # back to the start for the next step

    # A transaction made from a stale view of the pool is refused, and changes nothing. (One
    # exactly one behind would pass for a crashed one: a pool has one transaction in flight.)
    stale = Transaction(pool.status().transaction_id - 2, (CreateThin(5),))
    with pytest.raises(TransactionConflict):
        pool.apply(stale)
    assert pool.device_ids() == {0}
    dm.remove("vol")
    dm.remove("pool")
    assert tools.thin_check(lab_disks[0], metadata_snap=False).clean
