"""Fakes to hand in where the product takes a collaborator: `FakeRunner` for a command Runner,
`FakeLvm` for an Lvm."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from thinstack.dm.command import CommandError, Runner
from thinstack.lvm import Lvm


@dataclass(frozen=True)
class Call:
    argv: list[str]
    input: bytes | str | None = None
    timeout: float | None = None


# What a command answers: its stdout (a list: the pieces `stream` yields), an exception to
# raise, or a function of the call.
Reply = str | list[str] | BaseException | Callable[[Call], str]


class FakeRunner(Runner):
    """Records every command (`.calls`) and answers by argv prefix: `on(prefix, *replies)` gives
    the replies in turn, the last one for ever after; the longest matching prefix wins (the
    latest `on` among equals). A command no prefix matches gets `default` ("" by default), or
    fails the test if `default` is None."""

    def __init__(self, default: str | None = ""):
        super().__init__()
        self.default = default
        self.calls: list[Call] = []
        self._replies: list[tuple[tuple[str, ...], list[Reply]]] = []

    def on(self, prefix: Sequence[str] | str, *replies: Reply) -> FakeRunner:
        self._replies.append((tuple([prefix] if isinstance(prefix, str) else prefix),
                              list(replies) or [""]))
        return self

    def fail(self, prefix: Sequence[str] | str, stderr: str, exit_status: int = 1) -> FakeRunner:
        """Make commands with this prefix fail as a real program would (argv is the caller's)."""
        return self.on(prefix, lambda call: _raise(CommandError(call.argv, exit_status, stderr)))

    @property
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]

    def run(self, argv: list[str], *, input: bytes | str | None = None,
            timeout: float | None = None, pass_fds: Collection[int] = ()) -> str:
        return "".join(self._answer(Call(list(argv), input, timeout)))

    def stream(self, argv: list[str], *, timeout: float | None = None, piece: int = 1 << 20,
               pass_fds: Collection[int] = ()) -> Iterator[str]:
        out = self._answer(Call(list(argv), None, timeout))
        if isinstance(out, str):
            out = [out[i:i + piece] for i in range(0, len(out), piece)]
        yield from out

    def _answer(self, call: Call) -> str | list[str]:
        self.calls.append(call)
        matches = [(len(p), i) for i, (p, _) in enumerate(self._replies)
                   if tuple(call.argv[:len(p)]) == p]
        if not matches:
            if self.default is None:
                raise AssertionError(f"unexpected command: {call.argv}")
            return self.default
        replies = self._replies[max(matches)[1]][1]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply(call) if callable(reply) else reply


def _raise(e: BaseException) -> str:
    raise e


class FakeLvm(Lvm):
    """An Lvm whose reports are these objects; its commands are recorded by a FakeRunner
    (`commands`: without the leading `lvm`) and then handed to `on_command`."""

    def __init__(self, vgs=(), lvs=(), pvs=(), on_command=None):
        # No device-mapper device exists until a test says so (a later `on` wins over this).
        super().__init__(FakeRunner().fail(["dmsetup", "info"], "Device does not exist.\n"))
        # vgs: kept as given, so a test may grow the list the fake reads
        self.vg_list = vgs if isinstance(vgs, list) else list(vgs)
        self.lv_list, self.pv_list = list(lvs), list(pvs)
        self.on_command = on_command

    def run(self, *args, timeout=None):
        out = super().run(*args, timeout=timeout)
        if self.on_command:
            self.on_command(*args)
        return out

    def vgs(self, vg=None):
        return [v for v in self.vg_list if vg in (None, v.name)]

    def lvs(self, vg=None, *, all_=False, select=None):  # select: LVM's, not applied here
        return [x for x in self.lv_list if vg in (None, x.vg)]

    def find_lv(self, ref):
        return next((x for x in self.lv_list if x.ref == ref), None)

    def pvs(self):
        return self.pv_list

    @property
    def commands(self):
        return [tuple(c.argv[1:]) for c in self.runner.calls if c.argv[:1] == ["lvm"]]
