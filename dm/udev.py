"""Knowing when udev is done with a device-mapper device, from udev's own database."""

from __future__ import annotations

import os
import time
from typing import Any

from thinstack.dm.errors import UdevTimeout

# Imported at the first wait, not with the dm client: most commands create no device, and the
# import is dear where process start-up is (0.25 s in the lab).
pyudev: Any = None


def wait_for_device(name: str, major: int, minor: int, *, timeout: float) -> None:
    """Return once udev has run the dm rules for device `name` (major:minor) and
    /dev/mapper/NAME leads to it; raise UdevTimeout after `timeout` seconds."""
    global pyudev
    if pyudev is None:
        import pyudev
    context = pyudev.Context()
    devnum = os.makedev(major, minor)
    # Listening starts before the first look, so an event that lands in between still wakes us.
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block", "disk")
    monitor.start()
    deadline = time.monotonic() + timeout
    while not _ready(context, name, devnum):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UdevTimeout(
                f"udev did not finish with dm device {name} ({major}:{minor}) within "
                f"{timeout:g}s: is systemd-udevd running with the device-mapper rules?")
        monitor.poll(timeout=remaining)


def _ready(context: Any, name: str, devnum: int) -> bool:
    try:
        device = pyudev.Devices.from_device_number(context, "block", devnum)
    except pyudev.DeviceNotFoundError:
        return False
    properties = device.properties
    # The dm rules set DM_UDEV_PRIMARY_SOURCE_FLAG once they have handled the device's
    # activation (its first resume), which is when they make the /dev/mapper link.
    return (device.is_initialized
            and properties.get("DM_NAME") == name
            and properties.get("DM_UDEV_PRIMARY_SOURCE_FLAG") == "1"
            and _node_is(f"/dev/mapper/{name}", devnum))


def _node_is(path: str, devnum: int) -> bool:
    try:
        return os.stat(path).st_rdev == devnum
    except FileNotFoundError:
        return False
