import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.dm.dmfixtures import captured
from thinstack.dm.errors import DmError, ParseError
from thinstack.dm.targets import (
    CloneTarget,
    CorruptBioByte,
    DelayTarget,
    ErrorTarget,
    FlakeyTarget,
    LinearTarget,
    OtherTarget,
    SnapshotMergeTarget,
    SnapshotOriginTarget,
    SnapshotTarget,
    Table,
    TableLine,
    ThinPoolTarget,
    ThinTarget,
    ZeroTarget,
)

TABLES = captured("tables.txt")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_what_the_kernel_prints_round_trips(name):
    text = "".join(line + "\n" for line in TABLES[name])
    table = Table.parse(text)
    assert table.render() == "".join(line.rstrip() + "\n" for line in TABLES[name])
    assert Table.parse(table.render()) == table
    assert not any(isinstance(line.target, OtherTarget) for line in table.lines)


def one(name):
    return Table.parse(TABLES[name][0]).lines[0]


def test_kernel_tables_parse_to_the_documented_parameters():
    assert one("linear") == TableLine(0, 8192, LinearTarget("98:32", 2048))
    assert one("pool_default").target == ThinPoolTarget("98:16", "98:32", 128, 16)
    assert one("pool_features").target == ThinPoolTarget(
        "98:16", "98:32", 128, 4, skip_block_zeroing=True, error_if_no_space=True)
    assert one("pool_2_ignore_discard_skip_block_zeroing").target == ThinPoolTarget(
        "98:16", "98:32", 128, 0, skip_block_zeroing=True, ignore_discard=True)
    assert one("pool_read_only").target.read_only
    assert one("thin").target == ThinTarget("254:0", 0)
    assert one("thin_external_origin").target == ThinTarget("254:0", 7, "254:1")
    assert one("snapshot").target == SnapshotTarget("254:0", "254:2", "P", 16)
    assert one("snapshot_po").target.persistence == "PO"
    assert one("snapshot_origin").target == SnapshotOriginTarget("254:0")
    assert one("clone_plain").target == CloneTarget("254:2", "254:3", "254:0", 8)
    assert one("clone_all").target == CloneTarget(
        "254:2", "254:3", "254:0", 8, no_hydration=True, no_discard_passdown=True,
        hydration_threshold=8, hydration_batch_size=4)
    assert one("flakey_none").target == FlakeyTarget(
        "98:32", 0, 0, 60, error_reads=True, error_writes=True)
    assert one("flakey_6_error_reads_corrupt_bio_byte_224_w_0_32").target == FlakeyTarget(
        "98:32", 0, 0, 60, error_reads=True, corrupt_bio_byte=CorruptBioByte(224, "w", 0, 32))


def test_a_multi_line_table():
    table = Table.parse("".join(line + "\n" for line in TABLES["multi"]))
    assert [line.target for line in table.lines] == [LinearTarget("98:32", 0), ZeroTarget(),
                                                      ErrorTarget()]
    assert table.size == 350
    with pytest.raises(DmError):
        _ = table.target


def test_rendering_what_dmsetup_is_given():
    assert Table.of(2097152, ThinPoolTarget("/dev/md0", "/dev/md1", 1024, 10)).render() == \
        "0 2097152 thin-pool /dev/md0 /dev/md1 1024 10 0\n"
    assert Table.of(100, ThinTarget("/dev/mapper/pool", 3, "/dev/mapper/gold")).render() == \
        "0 100 thin /dev/mapper/pool 3 /dev/mapper/gold\n"
    assert Table.of(8, SnapshotTarget("8:1", "8:2", "N", 8, discard_zeroes_cow=True)).render() \
        == "0 8 snapshot 8:1 8:2 N 8 1 discard_zeroes_cow\n"
    assert Table.of(8, CloneTarget("1:1", "1:2", "1:3", 8, hydration_threshold=4)).render() == \
        "0 8 clone 1:1 1:2 1:3 8 0 2 hydration_threshold 4\n"
    assert Table.of(8, FlakeyTarget("1:1", 0, 1, 2)).render() == "0 8 flakey 1:1 0 1 2\n"


def test_features_in_any_order_and_targets_not_modelled():
    line = TableLine.parse("0 8 thin-pool 1:1 1:2 128 0 2 error_if_no_space read_only")
    assert line.target == ThinPoolTarget("1:1", "1:2", 128, 0, read_only=True,
                                         error_if_no_space=True)
    # Older kernels print no feature count for a flakey device without features.
    assert TableLine.parse("0 8 flakey 1:1 0 1 2").target == FlakeyTarget("1:1", 0, 1, 2)
    striped = TableLine.parse("0 16 striped 2 128 8:1 0 8:2 0")
    assert striped.target == OtherTarget("striped", ("2", "128", "8:1", "0", "8:2", "0"))
    assert striped.render() == "0 16 striped 2 128 8:1 0 8:2 0"
    merge = TableLine.parse("0 8 snapshot-merge 1:1 1:2 P 16")
    assert merge.target == SnapshotMergeTarget("1:1", "1:2", "P", 16)
    assert merge.render() == "0 8 snapshot-merge 1:1 1:2 P 16"


@pytest.mark.parametrize("line", [
    "0 8 thin-pool 1:1 1:2 128",                      # no low water mark
    "0 8 thin-pool 1:1 1:2 128 0 1 zero_everything",  # unknown feature
    "0 8 thin-pool 1:1 1:2 128 0 2 read_only",        # count says more than there is
    "0 8 thin 1:1 x",                                 # dev id not a number
    "0 8 thin 1:1 1 1:2 extra",
    "0 8 linear 1:1",
    "0 8 zero 1",
    "0 8 snapshot 1:1 1:2 Q 8",
    "0 8 clone 1:1 1:2 1:3 8 0 2 hydration_threshold",
    "0 8 clone 1:1 1:2 1:3 8 0 2 speed 4",
    "0 8 flakey 1:1 0 1 2 5 corrupt_bio_byte 1 x 0 0",
    "x 8 zero",
    "0 8",
])
def test_malformed_lines_are_parse_errors(line):
    with pytest.raises(ParseError):
        Table.parse(line)


def test_a_table_must_be_contiguous_from_sector_zero():
    with pytest.raises(ParseError):
        Table.parse("0 8 zero\n9 8 zero\n")
    with pytest.raises(ValueError):
        Table((TableLine(1, 8, ZeroTarget()),))
    with pytest.raises(ParseError):
        Table.parse("\n")


devices = st.one_of(
    st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 2**20)),
    st.from_regex(r"/dev/[a-z][a-z0-9/_-]{0,20}", fullmatch=True))
n = st.integers(0, 2**63)
flag = st.booleans()

targets = st.one_of(
    st.builds(LinearTarget, devices, n),
    st.just(ZeroTarget()),
    st.just(ErrorTarget()),
    st.builds(ThinPoolTarget, devices, devices, n, n, flag, flag, flag, flag, flag),
    st.builds(ThinTarget, devices, st.integers(0, 2**24 - 1), st.none() | devices),
    st.builds(SnapshotTarget, devices, devices, st.sampled_from(["P", "PO", "N"]), n, flag, flag),
    st.builds(SnapshotMergeTarget, devices, devices, st.sampled_from(["P", "PO"]), n),
    st.builds(SnapshotOriginTarget, devices),
    st.builds(CloneTarget, devices, devices, devices, n, flag, flag, st.none() | n,
              st.none() | n),
    st.builds(FlakeyTarget, devices, n, n, n, flag, flag, flag,
              st.none() | st.builds(CorruptBioByte, n, st.sampled_from("rw"), n, n)),
)


@given(st.lists(st.tuples(st.integers(1, 2**40), targets), min_size=1, max_size=4))
def test_render_parse_round_trip(pieces):
    lines, start = [], 0
    for length, target in pieces:
        lines.append(TableLine(start, length, target))
        start += length
    table = Table(tuple(lines))
    assert Table.parse(table.render()) == table


def test_delay_with_read_write_and_flush_paths():
    for text, target in [
            ("0 8 delay 1:1 0 100\n", DelayTarget("1:1", 0, 100)),
            ("0 8 delay 1:1 0 100 1:2 8 50\n", DelayTarget("1:1", 0, 100, ("1:2", 8, 50))),
            ("0 8 delay 1:1 0 0 1:1 0 20 1:1 0 300\n",
             DelayTarget("1:1", 0, 0, ("1:1", 0, 20), ("1:1", 0, 300)))]:
        assert Table.parse(text).target == target
        assert Table.of(8, target).render() == text
    for bad in ("1:1 0", "1:1 0 100 1:2", "1:1 0 x"):
        with pytest.raises(ParseError, match="delay"):
            TableLine.parse(f"0 8 delay {bad}")
    with pytest.raises(ValueError, match="write path"):
        DelayTarget("1:1", 0, 1, None, ("1:1", 0, 1))
