"""The errors an operator sees: each a one-line message and the exit status the README documents.
Every failure a user can meet is a ThinstackError; the dm layer's own errors are translated where
thinstack calls it, and the CLI prints any that still escape as one line with status 1."""

from __future__ import annotations


class ThinstackError(Exception):
    exit_status = 1  # the operation failed; whatever it had begun was rolled back


class Usage(ThinstackError):
    """A bad argument or name."""
    exit_status = 2


class NotFound(ThinstackError):
    exit_status = 3


class Exists(ThinstackError):
    exit_status = 4


class Refused(ThinstackError):
    """Safe to retry later: dependants exist, the volume is open, a gold master is protected,
    another thinstack holds the lock..."""
    exit_status = 5


class NoSpace(ThinstackError):
    exit_status = 6


class Alert(ThinstackError):
    """`monitor --once` found a pool it could not keep from running out of space."""
    exit_status = 7


class BadImage(ThinstackError):
    """An image that is malformed, hostile, unsupported, or misses a parent/backing file."""
    exit_status = 8
