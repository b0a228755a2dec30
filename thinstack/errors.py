"""The errors an operator sees: each a one-line message and a documented exit status."""

from __future__ import annotations


class ThinstackError(Exception):
    exit_status = 1  # the operation failed; whatever it had begun was rolled back


class NotFound(ThinstackError):
    exit_status = 3


class Exists(ThinstackError):
    exit_status = 4


class Refused(ThinstackError):
    """Safe to retry later: dependants exist, the volume is open, a gold master is protected..."""
    exit_status = 5


class NoSpace(ThinstackError):
    exit_status = 6


class Alert(ThinstackError):
    """`monitor --once` found a pool it could not keep from running out of space."""
    exit_status = 7
