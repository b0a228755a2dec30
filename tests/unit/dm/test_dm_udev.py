import os
from types import SimpleNamespace

import pytest

from thinstack.dm import udev
from thinstack.dm.errors import UdevTimeout

DONE = {"DM_NAME": "vol", "DM_UDEV_PRIMARY_SOURCE_FLAG": "1"}


class FakeUdev:
    """pyudev as seen by udev.py: the database answers from `states`, one per look, and each
    poll of the monitor is one event."""

    DeviceNotFoundError = LookupError

    def __init__(self, states, node=True):
        self.states = list(states)
        self.node = node
        self.polls = 0
        self.Context = lambda: "context"
        self.Monitor = SimpleNamespace(from_netlink=lambda context: self)
        self.Devices = SimpleNamespace(from_device_number=self.lookup)

    def filter_by(self, subsystem, device_type):
        assert (subsystem, device_type) == ("block", "disk")

    def start(self):
        pass

    def poll(self, timeout):
        self.polls += 1
        return "event"

    def lookup(self, context, subsystem, devnum):
        assert (subsystem, devnum) == ("block", os.makedev(254, 3))
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if state is None:
            raise LookupError
        initialized, properties = state
        return SimpleNamespace(is_initialized=initialized, properties=properties)


@pytest.fixture
def fake(monkeypatch):
    def install(states, node=True):
        f = FakeUdev(states)
        monkeypatch.setattr(udev, "pyudev", f)
        monkeypatch.setattr(udev, "_node_is", lambda path, devnum: node)
        return f
    return install


def test_a_device_udev_has_finished_with_needs_no_wait(fake):
    f = fake([(True, DONE)])
    udev.wait_for_device("vol", 254, 3, timeout=1)
    assert f.polls == 0


def test_waits_through_events_until_the_rules_have_run(fake):
    f = fake([None, (False, {}), (True, {"DM_NAME": "vol"}), (True, DONE)])
    udev.wait_for_device("vol", 254, 3, timeout=1)
    assert f.polls == 3


def test_a_device_of_another_name_or_without_its_node_is_not_ready(fake):
    fake([(True, {**DONE, "DM_NAME": "other"})])
    with pytest.raises(UdevTimeout):
        udev.wait_for_device("vol", 254, 3, timeout=0.01)
    fake([(True, DONE)], node=False)
    with pytest.raises(UdevTimeout, match=r"vol \(254:3\) within 0.01s: is systemd-udevd"):
        udev.wait_for_device("vol", 254, 3, timeout=0.01)


def test_the_node_must_be_the_device(tmp_path):
    assert not udev._node_is(str(tmp_path / "missing"), os.makedev(254, 3))
    assert udev._node_is("/dev/null", os.stat("/dev/null").st_rdev)
    assert not udev._node_is("/dev/null", os.makedev(254, 3))
