"""thinstack.dm.client and the typed tables against the real kernel and udev."""

from __future__ import annotations

import os

import pytest
import pyudev

from tests.patterns import blocks_match, is_zero, write_blocks
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import CommandError, Runner
from thinstack.dm.errors import DmError
from thinstack.dm.status import CloneStatus, OtherStatus, SnapshotStatus
from thinstack.dm.targets import (
    CloneTarget,
    CorruptBioByte,
    ErrorTarget,
    FlakeyTarget,
    LinearTarget,
    SnapshotOriginTarget,
    SnapshotTarget,
    Table,
    TableLine,
    ZeroTarget,
)

MiB = 1 << 20


def zero_first_block(path: str) -> None:
    with open(path, "r+b", buffering=0) as f:
        f.write(bytes(4096))
        os.fsync(f.fileno())


def same_as_dmsetup(name: str) -> None:
    """What the ioctls answer for device `name` is what dmsetup prints, line for line."""
    by_ioctl, by_dmsetup = DeviceMapper(), DeviceMapper(Runner())  # another runner: dmsetup
    assert by_ioctl.control is not None and by_dmsetup.control is None
    control, dmsetup = by_ioctl.control, Runner()
    for args, table in [(["status"], False), (["table"], True)]:
        printed = dmsetup.run(["dmsetup", *args, name]).splitlines()
        assert [s.render() for s in control.table_status(name, table=table)] == \
            [line.rstrip() for line in printed]
    assert by_ioctl.info(name) == by_dmsetup.info(name)
    assert by_ioctl.table(name) == by_dmsetup.table(name)
    assert by_ioctl.status(name) == by_dmsetup.status(name)
    # A device named by its node's path, as dmsetup allows.
    assert by_ioctl.status(f"/dev/mapper/{name}") == by_dmsetup.status(name)


@pytest.mark.lab(disks=1, disk_size="256M")
def test_create_returns_a_device_udev_has_finished_with(lab_disks):
    dm = DeviceMapper()
    disk = os.stat(lab_disks[0]).st_rdev
    devno = f"{os.major(disk)}:{os.minor(disk)}"
    device = dm.create("lin", Table.of(8192, LinearTarget(lab_disks[0], 2048)), uuid="TS-lin")
    assert os.stat(device.path).st_rdev == os.makedev(device.major, device.minor)
    udev = pyudev.Devices.from_device_file(pyudev.Context(), device.path)
    assert udev.properties["DM_NAME"] == "lin"
    assert udev.properties["DM_UDEV_PRIMARY_SOURCE_FLAG"] == "1"
    # The kernel prints devices as major:minor.
    assert dm.table("lin") == Table.of(8192, LinearTarget(devno, 2048))
    info = dm.info("lin")
    assert (info.uuid, info.open_count, info.suspended, info.readonly, info.live_table) == \
        ("TS-lin", 0, False, False, True)
    assert [i.name for i in dm.list()] == ["lin"]
    assert dm.list() == DeviceMapper(Runner()).list()
    assert dm.lines_of_type("linear") == DeviceMapper(Runner()).lines_of_type("linear")
    assert dm.targets() == DeviceMapper(Runner()).targets()
    dm.remove("lin")
    assert dm.info("lin") is None and not os.path.exists(device.path)
    assert dm.list() == [] == DeviceMapper(Runner()).list()
    with pytest.raises(DmError, match="No such device or address"):
        dm.status("lin")


@pytest.mark.lab(disks=1, disk_size="256M")
def test_a_rejected_table_is_one_command_error_and_leaves_nothing(lab_disks):
    dm = DeviceMapper()
    with pytest.raises(CommandError) as caught:
        dm.create("bad", Table.of(8, LinearTarget("/dev/no-such-disk", 0)))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("dmsetup create bad: exit 1: device-mapper: reload ioctl")
    assert not dm.exists("bad")


@pytest.mark.lab(disks=1, disk_size="256M")
def test_suspended_resumes_the_device_when_a_step_inside_fails(lab_disks):
    dm = DeviceMapper()
    device = dm.create("vol", Table.of(16384, LinearTarget(lab_disks[0], 0)))
    with pytest.raises(RuntimeError, match="injected"):
        with dm.suspended("vol"):
            assert dm.info("vol").suspended
            dm.load("vol", Table.of(16384, ZeroTarget()))
            raise RuntimeError("injected")
    info = dm.info("vol")
    assert not info.suspended
    # The resume made the loaded table live, and I/O flows.
    assert not info.inactive_table
    assert dm.table("vol") == Table.of(16384, ZeroTarget())
    assert is_zero(device.path, [0])
    dm.remove("vol")


@pytest.mark.lab(disks=2, disk_size="256M")
def test_every_target_type_loads_as_rendered_and_reads_back(lab_disks):
    """The tables we render are accepted by the kernel, which prints them back unchanged; the
    status of each parses into its type."""
    dm = DeviceMapper()
    spare = dm.create("spare", Table.of(262144, LinearTarget(lab_disks[1], 0)))

    def part(name, start, length):
        return dm.create(name, Table.of(length, LinearTarget(spare.devno, start))).devno

    def roundtrip(name, table):
        device = dm.create(name, table)
        assert dm.table(name) == table
        same_as_dmsetup(name)
        return device

    real, cow = part("real", 0, 16384), part("cow", 16384, 4096)
    write_blocks("/dev/mapper/real", "real", [0, 64 << 10])
    zero_first_block("/dev/mapper/cow")
    multi = Table((TableLine(0, 100, LinearTarget(real, 8)), TableLine(100, 28, ZeroTarget()),
                   TableLine(128, 8, ErrorTarget())))
    roundtrip("multi", multi)
    assert [line.status for line in dm.status("multi")] == [OtherStatus(())] * 3

    origin = roundtrip("origin", Table.of(16384, SnapshotOriginTarget(real)))
    # The origin learns the snapshots' chunk size when it resumes: a snapshot made while the
    # origin runs misses all but the first chunk of each larger write (snapshot.rst).
    with dm.suspended("origin"):
        snap = roundtrip("snap", Table.of(16384, SnapshotTarget(real, cow, "P", 16)))
    write_blocks(origin.path, "changed", [0])
    assert blocks_match(snap.path, "real", [0])
    same_as_dmsetup("snap")  # with a chunk in use
    status = dm.target_status("snap")
    assert isinstance(status, SnapshotStatus) and status.sectors_allocated > status.metadata_sectors
    dm.remove("snap")
    dm.remove("origin")

    meta, dest = part("cmeta", 20480, 4096), part("cdest", 32768, 16384)
    zero_first_block("/dev/mapper/cmeta")
    roundtrip("clone", Table.of(16384, CloneTarget(meta, dest, real, 8, no_hydration=True,
                                                   hydration_threshold=8)))
    clone = dm.target_status("clone")
    assert isinstance(clone, CloneStatus)
    assert (clone.no_hydration, clone.hydration_threshold, clone.total_regions) == (True, 8, 2048)
    dm.remove("clone")

    flakey = FlakeyTarget(real, 0, 60, 0, error_reads=True,
                          corrupt_bio_byte=CorruptBioByte(32, "w", 1, 0))
    roundtrip("flakey", Table.of(16384, flakey))
    assert blocks_match("/dev/mapper/flakey", "changed", [0])  # up: behaves like linear
    for name in ("flakey", "multi", "cmeta", "cdest", "real", "cow", "spare"):
        dm.remove(name)
