"""The one skeleton of every operation that changes a VG: under the VG lock, refuse a pool that
is not writable (poolstatus.refusal; before anything, recovery included, fails halfway in LVM),
recover what earlier runs left, journal the intent before the first change, act, commit; and
when the act fails, roll back (as `thinstack recover` would) or keep the entry for a resume:
`on_failure` says which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from thinstack import faults, lvm, poolstatus, recovery
from thinstack.journal import Entry, Journal, Step, StepKind
from thinstack.lock import vg_lock
from thinstack.lvm import LV, VolumeRef


class OnFailure(Enum):
    ROLL_BACK = "roll back"  # undo everything the operation made, close its entry
    KEEP_FOR_RESUME = "keep"  # leave entry and volumes: a resume or a later recovery ends it


ROLL_BACK, KEEP_FOR_RESUME = OnFailure.ROLL_BACK, OnFailure.KEEP_FOR_RESUME

# What a failed operation does: always the same, or decided by the error and the entry.
Policy = OnFailure | Callable[[BaseException, Entry], OnFailure]
# An operation's arguments, or a function of the VG's volumes that checks what must hold before
# anything is made and returns them (or an interrupted entry to continue).
Args = dict | Callable[[list[LV]], "dict | Entry"]


@dataclass
class Op:
    entry: Entry
    lvs: list[LV]  # the VG's volumes as the operation found them, after recovery
    journal: Journal

    def step(self, step: str | Step) -> None:
        """Journal a change before making it, so a rollback knows to undo it."""
        self.journal.step(self.entry, step)

    def commit(self, *refs: VolumeRef) -> None:
        """The point of no return: the new volumes lose the operation's tag and become real."""
        if refs:
            lvm.lvm("lvchange", "--deltag", self.entry.tag, *map(str, refs))
        self.step(Step(StepKind.COMMITTED))


@contextmanager
def operation(kind: str, vg: str, args: Args | None = None, *, on_failure: Policy = ROLL_BACK,
              entry: Entry | None = None, journal: Journal | None = None, new_vg: bool = False,
              finish: bool = True, recover: bool = True, at: str | None = None
              ) -> Iterator[Op]:
    """Run the body as operation `kind` of `vg`. `entry`: continue that entry under the lock
    again (a later phase of the same operation: nothing to recover, nothing to journal first).
    `new_vg`: the operation makes the VG (there are no volumes to find yet). `finish=False`: on
    success the entry stays open for a later phase (an export's copy runs without the VG lock).
    `recover=False`: leave what earlier runs left to a later command (a pool repair: undoing it
    may need the pool it repairs). `at`: the LV (a pool, or a volume in one) the operation works
    in: only that pool must be writable (None: all of the VG's)."""
    journal = journal or Journal()
    with vg_lock(vg):
        lvs: list[LV] = []
        if entry is None:
            if new_vg:
                recovery.recover_vg(vg, journal)
            else:
                lvs = lvm.volumes_of(vg)
                poolstatus.refuse_unless_writable(vg, lvs, kind, at)
                if recover and recovery.recover_vg(vg, journal, lvs=lvs):
                    lvs = lvm.volumes_of(vg)
            found = args(lvs) if callable(args) else (args or {})
            if isinstance(found, Entry):
                entry = found
            else:
                entry = journal.begin(kind, vg, **found)
                faults.point(kind, "after-intent")
        try:
            yield Op(entry, lvs, journal)
        except BaseException as e:
            if (on_failure(e, entry) if callable(on_failure) else on_failure) is ROLL_BACK:
                # Roll back exactly as a later `thinstack recover` would, then report the cause.
                recovery.roll_back(entry)
                journal.finish(entry)
            raise
        if finish:
            journal.finish(entry)
