"""The one way thinstack runs an external program, and the one exception family it raises.

Everything that shells out (dmsetup, thin_*, lvm, qemu-img, ...) goes through a `Runner`, so
callers handle a single error type, every command has a time limit, and every failure reads the
same way in logs. The dm client and the LVM layer receive a runner (default: `RUNNER`, the real
one), so tests hand in a fake instead of patching module globals.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import sh

# Tool output is parsed, and error text is matched by callers: it must not depend on the locale.
_ENV = {**os.environ, "LC_ALL": "C"}
_ARGV_SHOWN = 120  # characters of the command line kept in an error message
# THINSTACK_TRACE=1: each command and its time on stderr, to see where an operation spends it.
_TRACE = os.environ.get("THINSTACK_TRACE") == "1"


class CommandError(Exception):
    """A program failed: it exited non-zero, was not found, or ran out of time."""

    def __init__(self, argv: list[str], exit_status: int | None, stderr: str, stdout: str = ""):
        self.argv = list(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        self.stdout = stdout
        super().__init__(f"{_shown(self.argv)}: {self._reason()}")

    def _reason(self) -> str:
        return f"exit {self.exit_status}: {summary(self.stderr or self.stdout)}"


class CommandNotFound(CommandError):
    def __init__(self, argv: list[str]):
        super().__init__(argv, 127, f"{argv[0]}: command not found")

    def _reason(self) -> str:
        return f"program not found: {self.argv[0]}"


class CommandTimeout(CommandError):
    def __init__(self, argv: list[str], timeout: float, stderr: str = "", stdout: str = ""):
        self.timeout = timeout
        super().__init__(argv, None, stderr, stdout)

    def _reason(self) -> str:
        return f"timed out after {self.timeout:g}s"


DEFAULT_TIMEOUT = 300.0  # seconds; no command thinstack runs may hang for ever


class Runner:
    """Runs programs: `run` waits for the whole output, `stream` yields it as it comes. Every
    command gets `default_timeout` unless the caller gives its own (there is no "no limit")."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT):
        self.default_timeout = default_timeout

    def run(self, argv: list[str], *, input: bytes | str | None = None,
            timeout: float | None = None, pass_fds: Collection[int] = ()) -> str:
        """Run argv to completion and return its standard output; CommandError otherwise.
        `pass_fds`: descriptors of ours the program gets at the same numbers (e.g. files opened
        once and handed to qemu-img as /proc/self/fd/N)."""
        limit = timeout or self.default_timeout
        with _traced(argv):
            program = _program(argv)
            try:
                return str(program(*argv[1:], _in=input, _timeout=limit, _env=_ENV,
                                   _tty_out=False, _decode_errors="replace",
                                   **_passing(pass_fds)))
            except sh.TimeoutException as e:
                # sh keeps no output of a killed process; the time limit is the whole story.
                raise CommandTimeout(argv, limit) from e
            except sh.ErrorReturnCode as e:
                raise CommandError(argv, e.exit_code, _text(e.stderr), _text(e.stdout)) from None

    def stream(self, argv: list[str], *, timeout: float | None = None, piece: int = 1 << 20,
               pass_fds: Collection[int] = ()) -> Iterator[str]:
        """Run argv and yield its standard output in pieces of about `piece` characters as it
        comes, for output too large to hold at once; CommandError once it has ended, if it
        failed."""
        limit = timeout or self.default_timeout
        with _traced(argv):
            program = _program(argv)
            # Every exit status is accepted here and checked below: sh would otherwise raise
            # the failure in its reader thread too, and print it there.
            process = program(*argv[1:], _iter=True, _out_bufsize=piece, _timeout=limit,
                              _env=_ENV, _tty_out=False, _decode_errors="replace",
                              _ok_code=list(range(-64, 256)), **_passing(pass_fds))
            try:
                yield from process
                process.wait()
            except sh.TimeoutException as e:
                raise CommandTimeout(argv, limit) from e
        if process.exit_code != 0:
            raise CommandError(argv, process.exit_code, _text(process.stderr))


RUNNER = Runner()  # the real one; the dm client and the LVM layer take it unless handed another


def run(argv: list[str], *, input: bytes | str | None = None, timeout: float | None = None,
        pass_fds: Collection[int] = ()) -> str:
    """RUNNER.run, for callers not yet handed a runner."""
    return RUNNER.run(argv, input=input, timeout=timeout, pass_fds=pass_fds)


def stream(argv: list[str], *, timeout: float | None = None, piece: int = 1 << 20,
           pass_fds: Collection[int] = ()) -> Iterator[str]:
    """RUNNER.stream, for callers not yet handed a runner."""
    return RUNNER.stream(argv, timeout=timeout, piece=piece, pass_fds=pass_fds)


@contextmanager
def _traced(argv: list[str]) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        if _TRACE:
            print(f"thinstack: {time.monotonic() - started:6.3f}s {_shown(argv)}",
                  file=sys.stderr)


def _program(argv: list[str]) -> sh.Command:
    try:
        return sh.Command(argv[0])
    except sh.CommandNotFound:
        raise CommandNotFound(argv) from None


def _passing(fds: Collection[int]) -> dict[str, Any]:
    """sh's options to hand `fds` to the child: ours are close-on-exec (as every descriptor
    thinstack opens), so the child makes its copies inheritable before it execs."""
    if not fds:
        return {}
    kept = tuple(fds)

    def inherit() -> None:
        for fd in kept:
            os.set_inheritable(fd, True)

    preexec: Callable[[], None] = inherit
    return {"_pass_fds": set(kept), "_preexec_fn": preexec}


def summary(output: str) -> str:
    """The line of a tool's error output worth showing on one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # dmsetup ends every failure with this; lvm prefixes warnings to the real error.
    useful = [line for line in lines
              if line != "Command failed." and not line.startswith("WARNING:")]
    return (useful or lines or ["(no error output)"])[0]


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


def _shown(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= _ARGV_SHOWN else text[:_ARGV_SHOWN - 1] + "…"
