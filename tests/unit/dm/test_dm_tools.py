import pytest

from tests import thindump
from tests.fakes import FakeRunner
from tests.thindump import Mapping
from tests.unit.dm.dmfixtures import text
from thinstack.dm import tools
from thinstack.dm.command import CommandError, CommandNotFound
from thinstack.dm.errors import ParseError
from thinstack.dm.tools import (
    BlockRange,
    DeltaKind,
    DeltaRange,
    ThinCheckResult,
    ThinLsEntry,
    coalesce,
)


@pytest.fixture
def run():
    return FakeRunner()


def test_thin_dump_of_a_thin_and_its_snapshot(run):
    run.on([], text("thin_dump.xml"))
    dump = thindump.thin_dump("/dev/block/98:16", runner=run)
    assert run.calls[-1].argv == ["thin_dump", "--metadata-snap", "/dev/block/98:16"]
    assert (dump.data_block_size, dump.transaction) == (128, 2)
    origin, snap = dump.devices[0], dump.devices[1]
    assert origin.mappings == (Mapping(5, 0, 1, 0), Mapping(6, 3, 1, 1), Mapping(7, 2, 1, 0),
                               Mapping(20, 4, 1, 1))
    assert (origin.mapped_blocks, origin.snap_time) == (4, 1)
    assert origin.virtual_ranges() == [BlockRange(5, 3), BlockRange(20, 1)]
    assert snap.mappings == (Mapping(5, 0, 3, 0),)
    assert snap.virtual_ranges() == [BlockRange(5, 3)]


def test_thin_dump_of_one_device_of_an_inactive_pool(run):
    run.on([], text("thin_dump.xml"))
    thindump.thin_dump("/dev/md1", metadata_snap=False, dev_id=1, runner=run)
    assert run.calls[-1].argv == ["thin_dump", "--dev-id", "1", "/dev/md1"]


def test_thin_delta_between_a_snapshot_and_its_origin(run, mocker):
    output = text("thin_delta.xml")
    run.on("thin_delta", [output[i:i + 5] for i in range(0, len(output), 5)])
    stream = mocker.spy(run, "stream")
    delta = tools.thin_delta("/dev/m", 1, 0, runner=run)
    assert stream.call_count == 1  # read as it streams
    assert run.calls[-1].argv == ["thin_delta", "--metadata-snap", "--snap1", "1",
                                     "--snap2", "0", "/dev/m"]
    assert (delta.data_block_size, delta.left, delta.right) == (128, 1, 0)
    assert delta.ranges == (DeltaRange(DeltaKind.SAME, 5, 1), DeltaRange(DeltaKind.DIFFERENT, 6, 1),
                            DeltaRange(DeltaKind.SAME, 7, 1),
                            DeltaRange(DeltaKind.RIGHT_ONLY, 20, 1))
    assert delta.changed() == [BlockRange(6, 1), BlockRange(20, 1)]


def test_thin_ranges_of_one_device_read_as_thin_dump_streams(run, mocker):
    run.on("thin_dump", text("thin_dump.xml"))
    stream = mocker.spy(run, "stream")
    mapped = tools.thin_ranges("/dev/block/98:16", 0, runner=run)
    assert stream.call_count == 1
    assert run.calls[-1].argv == ["thin_dump", "--metadata-snap", "--dev-id", "0",
                                        "/dev/block/98:16"]
    assert (mapped.data_block_size, mapped.mapped_blocks) == (128, 4)
    assert mapped.ranges == (BlockRange(5, 3), BlockRange(20, 1))


def test_thin_ls(run):
    run.on([], text("thin_ls.txt"))
    assert tools.thin_ls("/dev/m", runner=run) == [ThinLsEntry(0, 4, 2, 2), ThinLsEntry(1, 3, 1, 2)]
    assert run.calls[-1].argv == [
        "thin_ls", "--metadata-snap", "--no-headers", "-o",
        "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", "/dev/m"]


def test_thin_check_clean(run):
    run.on([], text("thin_check_clean.txt"))
    result = tools.thin_check("/dev/m", metadata_snap=True, skip_mappings=True,
                              clear_needs_check=True, runner=run)
    assert result.clean and "TRANSACTION_ID=2" in result.output
    assert run.calls[-1].argv == ["thin_check", "--metadata-snap", "--skip-mappings",
                                     "--clear-needs-check-flag", "/dev/m"]


def test_thin_check_finding_damage_is_a_result(run):
    run.on("thin_check", CommandError(["thin_check"], 1, "bad checksum in superblock\n"))
    assert tools.thin_check("/dev/m", runner=run) == ThinCheckResult(
        False, "bad checksum in superblock")
    assert run.calls[-1].argv == ["thin_check", "/dev/m"]


def test_thin_check_missing_is_an_error(run):
    run.on("thin_check", CommandNotFound(["thin_check"]))
    with pytest.raises(CommandNotFound):
        tools.thin_check("/dev/m", runner=run)


@pytest.mark.parametrize("parse, output", [
    (thindump.parse_thin_dump, "<superblock"),
    (thindump.parse_thin_dump, '<superblock data_block_size="128"/>'),
    (thindump.parse_thin_dump, '<superblock data_block_size="128" transaction="1"><device '
                            'dev_id="0" mapped_blocks="1" transaction="0" creation_time="0" '
                            'snap_time="0"><block_mapping/></device></superblock>'),
    (tools.parse_thin_delta, '<superblock data_block_size="128" transaction="1"/>'),
    (tools.parse_thin_delta, '<superblock data_block_size="128"><diff left="0" right="1">'
                             '<moved begin="1" length="1"/></diff></superblock>'),
    (tools.parse_thin_ls, "0 1 2\n"),
    (tools.parse_thin_ls, "DEV MAPPED EXCLUSIVE SHARED\n"),
])
def test_unexpected_output_is_a_parse_error(parse, output):
    with pytest.raises(ParseError):
        parse(output)


def test_coalesce():
    assert coalesce([]) == []
    assert coalesce([BlockRange(10, 2), BlockRange(0, 3), BlockRange(3, 2), BlockRange(11, 5),
                     BlockRange(30, 1)]) == [BlockRange(0, 5), BlockRange(10, 6),
                                             BlockRange(30, 1)]


def test_every_tool_runs_with_a_time_limit(run):
    run.on("thin_dump", text("thin_dump.xml"))
    run.on("thin_delta", text("thin_delta.xml"))
    thindump.thin_dump("/dev/m", runner=run)
    tools.thin_ranges("/dev/m", 0, runner=run)
    tools.thin_delta("/dev/m", 1, 0, runner=run)
    tools.thin_ls("/dev/m", runner=run)
    tools.thin_check("/dev/m", runner=run)
    assert [c.timeout for c in run.calls] == [tools.TIMEOUT] * 5
