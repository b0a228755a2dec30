"""Errors of the device-mapper layer that are not a failed command (those are CommandError)."""


class DmError(Exception):
    """The device-mapper layer could not do what was asked."""


class ParseError(DmError, ValueError):
    """A table, status line or tool output was not in the form the kernel or tool documents."""


class UdevTimeout(DmError):
    """udev did not finish with a device in time."""


class MetadataSnapHeld(DmError):
    """A thin-pool's one metadata snapshot is held by another reader (alive, or not ours)."""
