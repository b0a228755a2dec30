"""One `lvm` process for all of a thinstack command's LVM commands: LVM's shell mode.

Every `lvm` process pays LVM's start-up (loading itself and its libraries, reading its
configuration), which in the lab costs more than a small command's own work: an `lvs` took 0.7 s
as a process and 0.23 s as a line to a running shell. lvmdbusd keeps such a shell for the same
reason, and lvm2 ships the profile it runs it with (`lvmdbusd.profile`): every report is JSON and
ends with a log of the command's status, written to the descriptor named by `LVM_REPORT_FD`.
That log is how a command's end and its outcome are known; a failed command's messages are read
with `lastlog`.

A command is sent as one line, which LVM splits at blanks, with a whole word quoted by ' or "
(nothing else is special but a '#' that starts a word, and readline reads the line, so control
and non-ASCII bytes would be taken as keys). `line()` says which commands can be sent so; the
rest, and every command when the profile is missing, run as processes (`Lvm` decides).

The shell lives as long as the thinstack command (the monitor ends it after each pass). It keeps
the devices it found at its start, so it is started again when a block device other than
device-mapper's came, went or changed size since (`block_devices`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence

from thinstack.dm.command import (
    DEFAULT_TIMEOUT,
    RUNNER,
    CommandError,
    CommandTimeout,
    Runner,
    traced,
)

PROFILE = "lvmdbusd"
PROFILE_PATH = "/etc/lvm/profile/lvmdbusd.profile"
SYS_BLOCK = "/sys/class/block"
_MAX_WORDS = 63  # LVM's shell takes at most 64 words, and refuses a line of that many
EXIT_WAIT = 10.0  # seconds a shell has to exit at the end of its input before it is killed


def line(args: Sequence[str]) -> str | None:
    """`args` as a line LVM's shell splits back into exactly these words, or None when no such
    line exists (a word with both quotes or a byte readline would take as a key).

    The line adds `-qq`: a question LVM would ask (none of thinstack's commands should) is
    answered "no" at once, as end of input answers a process. Asked in the shell, it would
    read the answer from the commands' own input."""
    args = [*args[:1], "-qq", *args[1:]]
    if len(args) >= _MAX_WORDS:
        return None
    words = []
    for arg in args:
        if any(not " " <= c <= "~" for c in arg):
            return None
        if arg and not any(c in arg for c in " '\"") and not arg.startswith("#"):
            words.append(arg)
        elif '"' not in arg:
            words.append(f'"{arg}"')
        elif "'" not in arg:
            words.append(f"'{arg}'")
        else:
            return None
    return " ".join(words)


def block_devices() -> frozenset[tuple[str, str]]:
    """The kernel's block devices and their sizes, but device-mapper's: a shell started before
    a loop, md or nbd device came or changed (thinstack attaches backing files, blivet makes
    arrays) would not see it, so it is started again. LVM's own volumes, which each lvcreate
    adds, are no PVs and need no new shell."""
    found = []
    for name in os.listdir(SYS_BLOCK):
        if not name.startswith("dm-"):
            try:
                with open(f"{SYS_BLOCK}/{name}/size") as f:
                    found.append((name, f.read()))
            except OSError:
                pass  # gone meanwhile: its absence is what counts
    return frozenset(found)


def status(doc: dict) -> int:
    """The exit status a process would have had, from the shell's log of the command (its last
    status record: LVM's return code 1 is success)."""
    records = [r for r in doc.get("log", []) if r.get("log_type") == "status"]
    if not records:
        return 5  # no status at all: LVM failed before it ran the command
    code = int(records[-1].get("log_ret_code") or 5)
    return 0 if code == 1 else code


def errors(doc: dict) -> list[str]:
    return [r["log_message"] for r in doc.get("log", [])
            if r.get("log_type") == "error" and r.get("log_message")]


class Unexplained(CommandError):
    """A command failed in the shell and LVM gave no reason: a report is run again as a
    process, which says why (`Lvm.run`)."""


class LvmShell:
    """A running `lvm` shell, started on first use. One command at a time (a lock: the monitor
    has threads); a command that outlives its time limit kills the shell, and the next command
    starts another."""

    def __init__(self, runner: Runner = RUNNER, default_timeout: float = DEFAULT_TIMEOUT):
        self.runner = runner
        self.default_timeout = default_timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._report = -1
        self._devices: frozenset[tuple[str, str]] = frozenset()

    @staticmethod
    def available() -> bool:
        return os.path.exists(PROFILE_PATH)

    def run(self, args: Sequence[str], text: str, timeout: float | None = None) -> str:
        """Run the command `args`, sent as `text` (its `line()`). Returns its JSON report (the
        log for a command that reports nothing); CommandError as a process would fail (a
        shell that ends mid-command fails it as a process killed would: it is not run again)."""
        argv = ["lvm", *args]
        limit = timeout or self.default_timeout
        with self._lock, traced(argv):
            # Checked once a command, not before its lastlog, which must ask the same shell.
            if self._process is not None and block_devices() != self._devices:
                self._stop(kill=False)  # LVM's shell keeps the devices it found at its start
            out, err = self._ask(text, argv, limit)
            doc = json.loads(out)
            code = status(doc)
            if code == 0:
                return out
            messages = errors(doc) or errors(json.loads(self._ask("lastlog", argv, limit)[0]))
            text = "\n".join([err, *messages]).strip()
            if not text:
                # Seen when a device under a VG went away: LVM logs no reason, even in lastlog.
                # A shell in that state is not kept.
                self._stop(kill=False)
                raise Unexplained(argv, code, "")
            raise CommandError(argv, code, text, "")

    def close(self) -> None:
        """End the shell (it exits at the end of its input); the next command starts another."""
        with self._lock:
            self._stop(kill=False)

    def forget(self) -> None:
        """Drop the shell without touching it: in a forked child, whose parent still uses it."""
        self._lock = threading.Lock()
        self._process = None
        self._report = -1

    def _start(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            self._devices = block_devices()
            report, child = os.pipe()
            try:
                # HOME: LVM's shell reads and writes $HOME/.lvm_history, the operator's own
                # shell history; under /dev/null there is none to read and none can be made.
                self._process = self.runner.start(
                    ["lvm"], env={"LVM_REPORT_FD": str(child), "LVM_COMMAND_PROFILE": PROFILE,
                                  "HOME": "/dev/null"}, pass_fds=(child,))
            except CommandError:
                os.close(report)
                raise
            finally:
                os.close(child)
            self._report = report
        return self._process

    def _ask(self, text: str, argv: list[str], limit: float) -> tuple[str, str]:
        """Send one line; the JSON document the shell reports for it, and its stderr."""
        process = self._start()
        assert process.stdin and process.stdout and process.stderr
        deadline = time.monotonic() + limit
        try:
            process.stdin.write(text.encode() + b"\n")
            process.stdin.flush()
        except OSError:
            self._stop(kill=True)
            raise CommandError(argv, None, "the lvm shell ended") from None
        report, err = bytearray(), bytearray()
        fds = {process.stdout.fileno(): None, process.stderr.fileno(): err, self._report: report}
        decoder = json.JSONDecoder()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._stop(kill=True)
                raise CommandTimeout(argv, limit, bytes(err).decode(), bytes(report).decode())
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    self._stop(kill=True)
                    raise CommandError(argv, None, err.decode("utf-8", "replace")
                                       or "the lvm shell ended")
                if fd == process.stdout.fileno():
                    continue  # what commands print for people; reports come on their own fd
                fds[fd] += data  # type: ignore[operator]
            if report.rstrip().endswith(b"}"):
                out = report.decode("utf-8", "replace").strip()
                try:
                    decoder.decode(out)
                except ValueError:
                    continue  # a report still being written
                return out, err.decode("utf-8", "replace")

    def _stop(self, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                stream and stream.close()
            except OSError:
                pass  # a shell gone with its input unread
        os.close(self._report)
        self._report = -1
        # A command ends when its LVM process has (a shell exits at the end of its input): none
        # is left behind to exit on its own.
        try:
            process.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
