"""The one way thinstack runs an external program, and the one exception family it raises.

Everything that shells out (dmsetup, thin_*, lvm, qemu-img, ...) goes through a `Runner`, so
callers handle a single error type, every command has a time limit, and every failure reads the
same way in logs. The dm client and the LVM layer receive a runner (default: `RUNNER`, the real
one), so tests hand in a fake instead of patching module globals.
"""

from __future__ import annotations

import codecs
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

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
    command gets `default_timeout` unless the caller gives its own (there is no "no limit").

    Plain subprocess, no helper library: in the lab (User-Mode Linux), where every process,
    thread and import is dear, `sh` cost 0.3 s to import and 0.1-0.2 s per command."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT):
        self.default_timeout = default_timeout

    def run(self, argv: list[str], *, input: bytes | str | None = None,
            timeout: float | None = None, pass_fds: Collection[int] = ()) -> str:
        """Run argv to completion and return its standard output; CommandError otherwise.
        `pass_fds`: descriptors of ours the program gets at the same numbers (e.g. files opened
        once and handed to qemu-img as /proc/self/fd/N)."""
        limit = timeout or self.default_timeout
        data = input.encode() if isinstance(input, str) else input
        with traced(argv):
            process = _start(argv, pass_fds, stdin=subprocess.DEVNULL if data is None
                             else subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = process.communicate(data, timeout=limit)
            except subprocess.TimeoutExpired:
                # What a killed process wrote is no help: the time limit is the whole story.
                _kill(process)
                raise CommandTimeout(argv, limit) from None
            except BaseException:
                _kill(process)
                raise
        if process.returncode != 0:
            raise CommandError(argv, process.returncode, _text(err), _text(out))
        return _text(out)

    def stream(self, argv: list[str], *, timeout: float | None = None, piece: int = 1 << 20,
               pass_fds: Collection[int] = ()) -> Iterator[str]:
        """Run argv and yield its standard output in pieces of at most `piece` characters as
        it comes, for output too large to hold at once; CommandError once it has ended, if it
        failed."""
        import tempfile  # only streams need it, and its imports are dear in the lab

        limit = timeout or self.default_timeout
        with traced(argv), tempfile.TemporaryFile() as errors:
            # stderr to a file: a pipe would need a reader of its own not to block the program.
            process = _start(argv, pass_fds, stdin=subprocess.DEVNULL, stderr=errors)
            # The read below blocks: a timer kills the program at its limit, which ends it.
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                process.kill()

            timer = threading.Timer(limit, expire)
            timer.start()
            try:
                assert process.stdout is not None
                out = process.stdout.fileno()
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                while chunk := os.read(out, piece):
                    if text := decoder.decode(chunk):
                        yield text
                if text := decoder.decode(b"", final=True):
                    yield text
                process.wait()  # (the timer still stands: an output closed early is no end)
            finally:
                timer.cancel()
                _kill(process)  # still running if the consumer stopped early
            if expired.is_set():
                raise CommandTimeout(argv, limit)
            if process.returncode != 0:
                errors.seek(0)
                raise CommandError(argv, process.returncode, _text(errors.read()))


    def start(self, argv: list[str], *, env: dict[str, str] | None = None,
              pass_fds: Collection[int] = ()) -> subprocess.Popen[bytes]:
        """Start a program that lives on and talks through pipes (stdin, stdout and stderr),
        such as LVM's shell; its owner reads it and ends it."""
        return _start(argv, pass_fds, env, stdin=subprocess.PIPE, stderr=subprocess.PIPE)


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
def traced(argv: list[str]) -> Iterator[None]:
    """THINSTACK_TRACE's line for a command: how long it took."""
    started = time.monotonic()
    try:
        yield
    finally:
        if _TRACE:
            print(f"thinstack: {time.monotonic() - started:6.3f}s {_shown(argv)}",
                  file=sys.stderr)


def _start(argv: list[str], pass_fds: Collection[int], env: dict[str, str] | None = None,
           **streams: Any) -> subprocess.Popen[bytes]:
    """Start argv with stdout piped, in the C locale, with `env` added to ours. `pass_fds`
    reach it at the same numbers (subprocess makes the child's copies inheritable; every other
    descriptor is closed)."""
    try:
        # Tool output is parsed, and error text matched: it must not depend on the locale.
        env = {**os.environ, **(env or {}), "LC_ALL": "C"}
        return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, close_fds=True,
                                pass_fds=tuple(pass_fds), **streams)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        raise CommandNotFound(argv) from None


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Kill the program if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


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
