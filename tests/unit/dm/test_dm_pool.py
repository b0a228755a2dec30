import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import rawpool as pool_module
from tests.fakes import FakeRunner
from tests.rawpool import (
    MAX_DEVICE_ID,
    CreateSnap,
    CreateThin,
    Delete,
    Plan,
    RawPool,
    Transaction,
    TransactionConflict,
    create_pool,
    next_device_id,
    parse_message,
    plan,
)
from thinstack.dm.client import DeviceInfo
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError, MetadataSnapHeld, ParseError
from thinstack.dm.pool import device_path
from thinstack.dm.status import Discards, Failed, PoolMode, ThinPoolStatus
from thinstack.dm.targets import Table, TableLine, ThinPoolTarget, ThinTarget

# --- device ids -------------------------------------------------------------------------------


def test_next_device_id_goes_past_the_highest():
    assert next_device_id([]) == 0
    assert next_device_id([0, 1, 2]) == 3
    assert next_device_id([7]) == 8  # 0..6 were deleted: not handed out again yet


def test_next_device_id_wraps_to_the_lowest_free_id():
    assert next_device_id([MAX_DEVICE_ID, 0, 1, 3]) == 2


def test_next_device_id_when_none_is_left(monkeypatch):
    monkeypatch.setattr(pool_module, "MAX_DEVICE_ID", 3)
    assert next_device_id([3, 0, 2]) == 1
    with pytest.raises(DmError):
        next_device_id(range(4))


@given(st.sets(st.integers(0, MAX_DEVICE_ID), max_size=50))
def test_next_device_id_is_free_and_in_range(used):
    new = next_device_id(used)
    assert new not in used and 0 <= new <= MAX_DEVICE_ID


# --- transactions as data ---------------------------------------------------------------------


def test_messages_render_and_parse():
    for message, text in [(CreateThin(3), "create_thin 3"), (CreateSnap(4, 3), "create_snap 4 3"),
                          (Delete(9), "delete 9")]:
        assert message.text == text
        assert parse_message(text) == message
    for bad in ["create_thin", "create_thin x", "create_snap 1", "remove 1", ""]:
        with pytest.raises(ParseError):
            parse_message(bad)


def test_a_transaction_persists_as_plain_data():
    txn = Transaction(41, (CreateThin(5), CreateSnap(6, 5), Delete(2)))
    assert txn.new_id == 42
    data = txn.to_dict()
    assert data == {"old_id": 41, "messages": ["create_thin 5", "create_snap 6 5", "delete 2"]}
    assert Transaction.from_dict(data) == txn


def test_a_transaction_names_each_device_once():
    with pytest.raises(ValueError):
        Transaction(1, (Delete(5), CreateThin(5)))
    with pytest.raises(ValueError):
        Transaction(1, (CreateThin(MAX_DEVICE_ID + 1),))


# --- the decision -----------------------------------------------------------------------------

TXN = Transaction(10, (CreateThin(5), CreateSnap(6, 5), Delete(2)))


@pytest.mark.parametrize("transaction_id, ids, expected", [
    # Nothing done yet: the swap, then everything.
    (10, {1, 2}, Plan(True, TXN.messages)),
    # Crashed after the swap.
    (11, {1, 2}, Plan(False, TXN.messages)),
    # ... after create_thin.
    (11, {1, 2, 5}, Plan(False, (CreateSnap(6, 5), Delete(2)))),
    # ... after create_snap.
    (11, {1, 2, 5, 6}, Plan(False, (Delete(2),))),
    # All done.
    (11, {1, 5, 6}, Plan(False, ())),
])
def test_plan(transaction_id, ids, expected):
    assert plan(TXN, transaction_id, ids) == expected
    assert plan(TXN, transaction_id, ids).done == (expected.messages == ())


@pytest.mark.parametrize("transaction_id, ids", [
    (9, {1, 2}),       # someone rolled the pool back, or txn was made from a stale status
    (12, {1, 5, 6}),   # someone moved on after us
    (10, {1, 2, 5}),   # not swapped yet, yet device 5 exists: not ours
    (10, {1}),         # not swapped yet, yet device 2 is gone
])
def test_plan_refuses_a_pool_someone_else_changed(transaction_id, ids):
    with pytest.raises(TransactionConflict):
        plan(TXN, transaction_id, ids)


# --- the pool against a model of the kernel ---------------------------------------------------

POOL_DEVNO = "254:0"


class Crash(Exception):
    pass


class FakeKernel:
    """dm-thin's message semantics, as DeviceMapper's methods the pool uses would see them:
    each message is committed at once; `crash_after` changes are made, then the next change
    is made and the caller dies before hearing of it."""

    def __init__(self, ids=(), transaction_id=0, crash_after=None):
        self.ids = set(ids)
        self.transaction_id = transaction_id
        self.crash_after = crash_after
        self.changes = 0
        self.held = False
        self.now_suspended = set()
        self.snapped_while_suspended = []
        self.thins = [("vol0", ThinTarget(POOL_DEVNO, 0)), ("vol0-copy", ThinTarget(POOL_DEVNO, 0)),
                      ("elsewhere", ThinTarget("254:9", 0)), ("vol1", ThinTarget(POOL_DEVNO, 1))]
        self.runner = FakeRunner(default=None).on("thin_ls", self.thin_ls)

    def fail(self, why):
        raise CommandError(["dmsetup", "message"], 1, f"device-mapper: message ioctl: {why}")

    def message(self, name, sector, text):
        assert (name, sector) == ("pool", 0)
        words = text.split()
        if words[0] == "reserve_metadata_snap":
            if self.held:
                self.fail("Device or resource busy")
            self.held = True
            return ""
        if words[0] == "release_metadata_snap":
            self.held = False
            return ""
        verb, args = words[0], [int(w) for w in words[1:]]
        if verb == "set_transaction_id":
            if args[0] != self.transaction_id:
                self.fail("Invalid argument")
            self.transaction_id = args[1]
        elif verb == "create_thin":
            if args[0] in self.ids:
                self.fail("File exists")
            self.ids.add(args[0])
        elif verb == "create_snap":
            if args[0] in self.ids:
                self.fail("File exists")
            if args[1] not in self.ids:
                self.fail("No data available")
            self.ids.add(args[0])
            self.snapped_while_suspended.append(set(self.now_suspended))
        elif verb == "delete":
            if args[0] not in self.ids:
                self.fail("No data available")
            self.ids.remove(args[0])
        self.changes += 1
        if self.changes == self.crash_after:
            raise Crash
        return ""

    def target_status(self, name):
        assert name == "pool"
        return ThinPoolStatus(self.transaction_id, 10, 100, 0, 100, None, PoolMode.RW,
                              Discards.PASSDOWN, False, False, 25)

    def table(self, name):
        return Table.of(1024, ThinPoolTarget("98:16", "98:32", 128))

    def info(self, name):
        return DeviceInfo(name, 254, 0, 1, 0, True, False, False, False, None)

    def lines_of_type(self, target_type):
        assert target_type == "thin"
        return [(name, TableLine(0, 8, target)) for name, target in self.thins]

    @contextmanager
    def suspended(self, name):
        self.now_suspended.add(name)
        try:
            yield
        finally:
            self.now_suspended.remove(name)

    def thin_ls(self, call):
        """The thin_ls command, as the pool's runner runs it."""
        assert self.held, "thin_ls must read a reserved metadata snapshot"
        assert call.argv[-1] == "/dev/block/98:16" and "--metadata-snap" in call.argv
        return "".join(f"{i} 0 0 0\n" for i in sorted(self.ids))


@pytest.fixture
def kernel():
    return FakeKernel


def test_create_thin_swaps_the_transaction_id_first(kernel):
    k = kernel(ids={0}, transaction_id=3)
    sent = []
    real = k.message
    k.message = lambda name, sector, text: sent.append(text) or real(name, sector, text)
    RawPool(k, "pool").create_thin(1)
    assert [t for t in sent if "metadata_snap" not in t] == ["set_transaction_id 3 4",
                                                             "create_thin 1"]
    assert (k.ids, k.transaction_id, k.held) == ({0, 1}, 4, False)


def test_create_snap_suspends_every_active_device_of_the_origin(kernel):
    k = kernel(ids={0, 1})
    RawPool(k, "pool").create_snap(2, 0)
    assert k.snapped_while_suspended == [{"vol0", "vol0-copy"}]
    assert k.now_suspended == set()


def test_delete_and_device_ids(kernel):
    k = kernel(ids={0, 1, 4})
    p = RawPool(k, "pool")
    p.delete(1)
    assert p.device_ids() == {0, 4}
    assert p.new_device_id() == 5
    assert not k.held


def test_a_failed_message_still_releases_the_metadata_snapshot(kernel):
    k = kernel(ids={0})
    k.runner.fail("thin_ls", "Input/output error")
    with pytest.raises(CommandError):
        RawPool(k, "pool").create_thin(1)
    assert not k.held


def test_the_origin_is_resumed_when_create_snap_fails(kernel):
    k = kernel(ids={0})
    with pytest.raises(CommandError):
        RawPool(k, "pool").apply(Transaction(0, (CreateSnap(1, 7),)))  # no device 7
    assert k.now_suspended == set()


def test_a_failed_pool_is_an_error(kernel):
    k = kernel()
    k.target_status = lambda name: Failed()
    with pytest.raises(DmError, match="has failed"):
        RawPool(k, "pool").status()


def test_activate_names_the_pool_by_device_number(kernel, mocker):
    k = kernel()
    k.create = mocker.Mock(return_value="device")
    assert RawPool(k, "pool").activate("vm1", 3, 2048, origin="/dev/mapper/gold",
                                    readonly=True) == "device"
    k.create.assert_called_once_with(
        "vm1", Table.of(2048, ThinTarget(POOL_DEVNO, 3, "/dev/mapper/gold")), readonly=True)


ops = st.lists(st.tuples(st.sampled_from(["create", "snap", "delete"]), st.integers(0, 30)),
               min_size=1, max_size=6)


def valid_messages(ids, wanted):
    """Turn random wishes into a transaction that is valid against `ids`."""
    ids, messages, named = set(ids), [], set()
    for op, n in wanted:
        free = next_device_id(ids | named)
        if op == "create":
            messages.append(CreateThin(free))
            ids.add(free)
        elif op == "snap" and ids:
            messages.append(CreateSnap(free, sorted(ids)[n % len(ids)]))
            ids.add(free)
        elif op == "delete" and ids - named:
            victim = sorted(ids - named)[n % len(ids - named)]
            messages.append(Delete(victim))
            ids.remove(victim)
        named |= {m.dev_id for m in messages}
    return tuple(messages), ids


@given(initial=st.sets(st.integers(0, 20), max_size=6), wanted=ops,
       crashes=st.lists(st.integers(1, 8), max_size=3))
def test_apply_converges_however_often_it_is_interrupted(initial, wanted, crashes):
    messages, expected_ids = valid_messages(initial, wanted)
    k = FakeKernel(ids=initial, transaction_id=7)
    pool = RawPool(k, "pool")
    txn = pool.begin(*messages)
    persisted = txn.to_dict()  # what a journal would hold across the crash
    for crash in crashes:
        k.crash_after, k.changes = crash, 0
        try:
            pool.apply(Transaction.from_dict(persisted))
        except Crash:
            pass
    k.crash_after, k.held = None, False
    pool.apply(Transaction.from_dict(persisted))
    assert (k.ids, k.transaction_id) == (expected_ids, 8)
    # Once done, applying again changes nothing.
    changes = k.changes
    pool.apply(Transaction.from_dict(persisted))
    assert k.changes == changes


# --- making a pool ----------------------------------------------------------------------------


def test_device_path():
    assert device_path("98:16") == "/dev/block/98:16"
    assert device_path("/dev/md0") == "/dev/md0"


def test_create_pool_zeroes_fresh_metadata_and_sizes_the_pool_to_the_data(tmp_path, mocker):
    metadata, data = tmp_path / "meta", tmp_path / "data"
    metadata.write_bytes(b"\xff" * 8192)
    data.write_bytes(b"\0" * (1000 * 512))
    dm = mocker.Mock()
    target = ThinPoolTarget(str(metadata), str(data), 128)
    try:
        pool = create_pool(dm, "pool", target, fresh=True)
    except OSError as e:  # a file system without O_DIRECT (tmpfs)
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    assert metadata.read_bytes() == b"\0" * 4096 + b"\xff" * 4096
    dm.create.assert_called_once_with("pool", Table.of(896, target))
    assert (pool.dm, pool.name) == (dm, "pool")


def test_create_pool_keeps_existing_metadata(tmp_path, mocker):
    metadata = tmp_path / "meta"
    metadata.write_bytes(b"\xff" * 4096)
    dm = mocker.Mock()
    create_pool(dm, "pool", ThinPoolTarget(str(metadata), "/dev/null", 128), fresh=False,
                size=1024)
    assert metadata.read_bytes() == b"\xff" * 4096
    assert os.path.exists(metadata)
    dm.create.assert_called_once()


def test_a_metadata_snapshot_already_held_is_a_clear_error(kernel):
    k = kernel()
    k.held = True
    real = k.target_status
    k.target_status = lambda name: replace(real(name), held_metadata_root=52)
    with pytest.raises(MetadataSnapHeld, match=r"already holds a metadata snapshot \(root 52\)"):
        RawPool(k, "pool").device_ids()
    assert k.held  # someone else's: left alone


def test_a_pool_must_be_a_thin_pool(kernel):
    k = kernel()
    k.table = lambda name: Table.of(8, ThinTarget(POOL_DEVNO, 1))
    with pytest.raises(DmError, match="is a thin device, not a thin-pool"):
        _ = RawPool(k, "pool").target
    k.target_status = lambda name: Failed()
    with pytest.raises(DmError, match="has failed with its pool"):
        RawPool(k, "pool").thin_status("vol")


READER_WAIT = 0.2


@pytest.fixture
def reader_lock(tmp_path):
    """A reader lock as thinstack makes one (thinpool.metadata_reader): a flock under
    tmp_path/locks, yielding the marker's path."""
    from thinstack.lock import flocked

    @contextmanager
    def lock():
        path = tmp_path / "locks" / "pool.metasnap"
        with flocked(path, READER_WAIT, "thin-pool pool: another reader has held its metadata "
                     f"snapshot for over {READER_WAIT:g} s"):
            yield path.with_name("pool.metasnap-held")
    return lock


def held_at(k, root=52):
    real = k.target_status
    k.target_status = lambda name: replace(real(name), held_metadata_root=root if k.held else None)


def test_a_snapshot_left_by_a_dead_reader_of_ours_is_released_and_taken(kernel, tmp_path,
                                                                         reader_lock):
    k = kernel(ids={0, 3})
    k.held = True
    held_at(k)
    marker = tmp_path / "locks" / "pool.metasnap-held"
    marker.parent.mkdir()
    marker.touch()  # a reader of ours was reserving, then died
    assert RawPool(k, "pool", reader_lock=reader_lock).device_ids() == {0, 3}
    assert not k.held and not marker.exists()


def test_someone_elses_snapshot_is_left_and_leaves_no_marker(kernel, tmp_path, reader_lock):
    k = kernel()
    k.held = True
    held_at(k)
    with pytest.raises(DmError, match="already holds"):
        RawPool(k, "pool", reader_lock=reader_lock).device_ids()
    assert k.held and not (tmp_path / "locks" / "pool.metasnap-held").exists()


def test_a_live_reader_holding_the_lock_is_waited_for_then_reported(kernel, tmp_path,
                                                                     reader_lock):
    import fcntl

    from thinstack.lock import LockTimeout

    (tmp_path / "locks").mkdir()
    fd = os.open(tmp_path / "locks" / "pool.metasnap", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockTimeout, match="another reader"):
            RawPool(kernel(), "pool", reader_lock=reader_lock).device_ids()
    finally:
        os.close(fd)
    assert RawPool(kernel(ids={1}), "pool", reader_lock=reader_lock).device_ids() == {1}
