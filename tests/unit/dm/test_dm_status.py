import pytest

from tests.unit.dm.dmfixtures import captured
from thinstack.dm.errors import ParseError
from thinstack.dm.status import (
    CloneStatus,
    Discards,
    Failed,
    OtherStatus,
    PoolMode,
    SnapshotState,
    SnapshotStatus,
    SnapshotUnusable,
    StatusLine,
    ThinPoolStatus,
    ThinStatus,
    parse_status,
    parse_status_lines,
)

STATUS = captured("status.txt")


def status(name):
    (line,) = parse_status_lines("\n".join(STATUS[name]))
    return line.status


@pytest.mark.parametrize("name", sorted(STATUS))
def test_every_captured_line_parses(name):
    lines = parse_status_lines("\n".join(STATUS[name]) + "\n")
    assert len(lines) == len(STATUS[name])


def test_fresh_pool():
    assert parse_status_lines(STATUS["pool_fresh"][0]) == [StatusLine(
        0, 32768, "thin-pool", ThinPoolStatus(
            transaction_id=0, used_metadata_blocks=4121, total_metadata_blocks=262144,
            used_data_blocks=0, total_data_blocks=256, held_metadata_root=None, mode=PoolMode.RW,
            discards=Discards.NO_PASSDOWN, error_if_no_space=False, needs_check=False,
            metadata_low_watermark=1024))]


def test_pool_states():
    held = status("pool_held_root")
    assert (held.transaction_id, held.held_metadata_root, held.used_data_blocks) == (2, 52, 5)
    assert held.free_data_blocks == 251
    assert held.free_metadata_blocks == 262144 - 4124
    assert status("pool_read_only").mode is PoolMode.RO
    full = status("pool_out_of_data_space")
    assert full.mode is PoolMode.OUT_OF_DATA_SPACE
    assert full.error_if_no_space and full.free_data_blocks == 0
    assert status("pool_2_ignore_discard_skip_block_zeroing").discards is Discards.IGNORED
    assert status("pool_metadata_failed") == Failed()


def test_documented_forms_not_captured():
    # needs_check and discard_passdown need a metadata failure and a discarding disk.
    s = parse_status("thin-pool", "7 10/100 3/50 - ro discard_passdown queue_if_no_space "
                                  "needs_check 25")
    assert s.needs_check and s.mode is PoolMode.RO and s.discards is Discards.PASSDOWN
    # Kernels before 4.19 print no metadata low water mark.
    old = parse_status("thin-pool", "1 10/100 3/50 - rw discard_passdown queue_if_no_space -")
    assert old.metadata_low_watermark is None
    assert parse_status("snapshot", "Merge failed") == SnapshotUnusable(
        SnapshotState.MERGE_FAILED)
    assert parse_status("clone", "Fail") == Failed()


def test_thin():
    assert status("thin_empty") == ThinStatus(0, None)
    assert status("thin_written") == ThinStatus(384, 1023)
    assert status("thin_full") == ThinStatus(8192, 8191)
    assert status("thin_pool_failed") == Failed()


def test_snapshot():
    assert status("snapshot") == SnapshotStatus(64, 1024, 32)
    assert status("snapshot_transient") == SnapshotStatus(0, 1024, 0)
    assert status("snapshot_invalid") == SnapshotUnusable(SnapshotState.INVALID)
    assert status("snapshot_overflow") == SnapshotUnusable(SnapshotState.OVERFLOW)


def test_clone():
    assert status("clone_no_hydration") == CloneStatus(
        metadata_block_size=8, used_metadata_blocks=6, total_metadata_blocks=1024,
        region_size=8, hydrated_regions=0, total_regions=2048, hydrating_regions=0,
        no_hydration=True, no_discard_passdown=False, hydration_threshold=1,
        hydration_batch_size=1, read_only=False)
    assert status("clone_hydrated").hydrated
    everything = status("clone_all")
    assert everything.no_discard_passdown and everything.hydration_batch_size == 4


def test_targets_without_a_status():
    assert status("linear") == OtherStatus(())
    assert status("flakey_none") == OtherStatus(())
    assert [line.status for line in parse_status_lines("\n".join(STATUS["multi"]))] == \
        [OtherStatus(())] * 3


@pytest.mark.parametrize("target_type, params", [
    ("thin-pool", "1 10/100 3/50 - rw"),
    ("thin-pool", "1 10/100 3/50 - sideways discard_passdown queue_if_no_space - 1"),
    ("thin-pool", "x 10/100 3/50 - rw discard_passdown queue_if_no_space - 1"),
    ("thin-pool", "1 10 3/50 - rw discard_passdown queue_if_no_space - 1"),
    ("thin", "12"),
    ("thin", "Error"),
    ("snapshot", "Unknown"),
    ("clone", "8 6/1024 8 0/2048 0 1 fast 0 rw"),
    ("clone", "8 6/1024 8 0/2048 0 0 0 maybe"),
])
def test_malformed_status_is_a_parse_error(target_type, params):
    with pytest.raises(ParseError):
        parse_status(target_type, params)


def test_malformed_status_lines():
    with pytest.raises(ParseError):
        parse_status_lines("0 thin-pool Fail")
