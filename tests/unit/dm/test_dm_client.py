import pytest

from tests.fakes import FakeRunner
from tests.unit.dm.dmfixtures import captured, text
from thinstack.dm.client import Device, DeviceInfo, DeviceMapper
from thinstack.dm.command import CommandError, CommandTimeout
from thinstack.dm.errors import DmError, ParseError
from thinstack.dm.status import Failed, ThinStatus
from thinstack.dm.targets import LinearTarget, Table, TableLine, ThinTarget, ZeroTarget

INFO = "thin/254/1/2/5/L-sr/LVM-abc/def\n"


@pytest.fixture
def run():
    return FakeRunner()


@pytest.fixture
def wait_for_device(mocker):
    return mocker.patch("thinstack.dm.client.udev.wait_for_device")


def argv(run, i=-1):
    return run.calls[i].argv


def test_create_feeds_the_table_and_waits_for_udev(run, wait_for_device):
    run.on("dmsetup", "", INFO)
    table = Table.of(8, ZeroTarget())
    device = DeviceMapper(run, timeout=7, udev_timeout=3).create("thin", table, readonly=True,
                                                            uuid="TS-1")
    assert device == Device("thin", 254, 1)
    assert (device.path, device.devno) == ("/dev/mapper/thin", "254:1")
    assert argv(run, 0) == ["dmsetup", "create", "thin", "--readonly", "--uuid", "TS-1"]
    assert (run.calls[0].input, run.calls[0].timeout) == ("0 8 zero\n", 7)
    wait_for_device.assert_called_once_with("thin", 254, 1, timeout=3)


def test_create_fails_if_the_device_is_gone_at_once(run, wait_for_device):
    run.on("dmsetup", "", CommandError(["dmsetup"], 1, "Device does not exist.\n"))
    with pytest.raises(DmError):
        DeviceMapper(run).create("x", Table.of(8, ZeroTarget()))
    wait_for_device.assert_not_called()


def test_load_suspend_resume_remove_message(run):
    dm = DeviceMapper(run)
    table = Table((TableLine(0, 8, LinearTarget("8:1", 0)), TableLine(8, 8, ZeroTarget())))
    dm.load("x", table)
    assert argv(run) == ["dmsetup", "load", "x"]
    assert run.calls[-1].input == "0 8 linear 8:1 0\n8 8 zero\n"
    dm.suspend("x")
    assert argv(run) == ["dmsetup", "suspend", "x"]
    dm.suspend("x", noflush=True)
    assert argv(run) == ["dmsetup", "suspend", "--noflush", "x"]
    dm.resume("x")
    assert argv(run) == ["dmsetup", "resume", "x"]
    dm.remove("x")
    assert argv(run) == ["dmsetup", "remove", "--retry", "x"]
    dm.remove("x", retry=False, deferred=True)
    assert argv(run) == ["dmsetup", "remove", "--deferred", "x"]
    run.on("dmsetup", "ok\n")
    assert dm.message("pool", 0, "create_snap 2 1") == "ok"
    assert argv(run) == ["dmsetup", "message", "pool", "0", "create_snap", "2", "1"]


def test_suspended_resumes_when_the_body_fails(run):
    dm = DeviceMapper(run)
    with pytest.raises(RuntimeError):
        with dm.suspended("x", noflush=True):
            assert argv(run) == ["dmsetup", "suspend", "--noflush", "x"]
            raise RuntimeError("injected")
    assert argv(run) == ["dmsetup", "resume", "x"]


def test_suspended_resumes_after_the_body(run):
    with DeviceMapper(run).suspended("x"):
        pass
    assert [argv(run, i) for i in range(2)] == [["dmsetup", "suspend", "x"],
                                                ["dmsetup", "resume", "x"]]


def test_info(run):
    run.on("dmsetup", INFO)
    info = DeviceMapper(run).info("thin")
    assert argv(run) == ["dmsetup", "info", "-c", "--noheadings", "--separator", "/", "-o",
                         "name,major,minor,open,events,attr,uuid", "thin"]
    assert info == DeviceInfo(name="thin", major=254, minor=1, open_count=2, event_nr=5,
                              live_table=True, inactive_table=False, suspended=True,
                              readonly=True, uuid="LVM-abc/def")


def test_info_of_a_missing_device_is_none(run):
    run.fail("dmsetup", "Device does not exist.\nCommand failed.\n")
    assert DeviceMapper(run).info("nope") is None
    assert not DeviceMapper(run).exists("nope")


def test_info_passes_other_failures_on(run):
    run.fail("dmsetup", "Permission denied\n")
    with pytest.raises(CommandError):
        DeviceMapper(run).info("x")


def test_list_parses_what_dmsetup_prints(run):
    run.on("dmsetup", text("info.txt"))
    assert DeviceMapper(run).list() == [
        DeviceInfo("lin", 254, 0, 0, 0, True, False, False, False, None),
        DeviceInfo("multi", 254, 1, 0, 0, True, False, False, False, None)]
    run.on("dmsetup", "No devices found\n")
    assert DeviceMapper(run).list() == []
    run.on("dmsetup", "garbage\n")
    with pytest.raises(ParseError):
        DeviceMapper(run).list()


def test_table_and_status(run):
    dm = DeviceMapper(run)
    run.on("dmsetup", captured("tables.txt")["thin"][0] + "\n")
    assert dm.table("thin", inactive=True) == Table.of(65536, ThinTarget("254:0", 0))
    assert argv(run) == ["dmsetup", "table", "--inactive", "thin"]
    run.on("dmsetup", captured("status.txt")["thin_written"][0] + "\n")
    assert dm.target_status("thin") == ThinStatus(384, 1023)
    assert argv(run) == ["dmsetup", "status", "thin"]
    run.on("dmsetup", "0 8 thin Fail\n")
    assert dm.target_status("thin") == Failed()
    run.on("dmsetup", "".join(line + "\n" for line in captured("status.txt")["multi"]))
    assert len(dm.status("multi")) == 3
    with pytest.raises(DmError):
        dm.target_status("multi")


def test_lines_of_type(run):
    run.on("dmsetup", text("table_target_thin.txt") + "a: b: 0 8 thin 1:2 3\n")
    assert DeviceMapper(run).lines_of_type("thin") == [
        ("thin", TableLine(0, 65536, ThinTarget("254:0", 0))),
        ("a: b", TableLine(0, 8, ThinTarget("1:2", 3)))]
    assert argv(run) == ["dmsetup", "table", "--target", "thin"]
    run.on("dmsetup", "No devices found\n")
    assert DeviceMapper(run).lines_of_type("thin") == []


def test_wait_returns_the_new_event_number(run):
    run.on("dmsetup", "", INFO)
    assert DeviceMapper(run, timeout=5).wait("thin", 4, timeout=30) == 5
    assert argv(run, 0) == ["dmsetup", "wait", "thin", "4"]
    assert run.calls[0].timeout == 30


def test_wait_without_an_event_in_time(run):
    run.on("dmsetup", CommandTimeout(["dmsetup", "wait"], 1))
    assert DeviceMapper(run).wait("thin", 4, timeout=1) is None


def test_targets_the_kernel_has_loaded(run):
    run.on(["dmsetup", "targets"], "thin-pool        v1.23.0\nstriped          v1.6.0\n\n")
    assert DeviceMapper(run).targets() == {"thin-pool": "v1.23.0", "striped": "v1.6.0"}
