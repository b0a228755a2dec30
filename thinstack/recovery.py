"""Deciding what an interrupted operation leaves to do, and doing it.

Every operation rolls back unless it reached its commit point, and two facts make that simple.
Every volume an operation creates carries the operation's tag (`ts_op_<id>`) until the
operation commits by removing the tag, so a tagged volume is unfinished by definition, even if
the journal itself was lost. And every other change an operation makes before committing is
journalled as a step before it is made (`readonly:NAME`), so it can be undone.
Operations that are a single LVM command (resize, delete) need no undo: LVM commits them
atomically, and their journal entry only records the intent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from thinstack import extorigin, lvm, tags
from thinstack.journal import Entry, Journal, StepKind
from thinstack.lvm import LV
from thinstack.tags import GOLD as TAG_GOLD


@dataclass(frozen=True)
class Action:
    kind: str  # release | remove | deltag | writable | activate | device-writable; undo (done
    # by the operation's own handler: reported, not applied)
    target: str  # VG/NAME, or a device's path
    arg: str = ""


def plan(entries: Iterable[Entry], lvs: list[LV], keep: frozenset[str] = frozenset()
         ) -> list[Action]:
    """What to run so that every interrupted operation is completed or rolled back. Volumes
    tagged with a tag in `keep` belong to interrupted operations that may still resume."""
    entries = list(entries)
    committed = {e.tag for e in entries if e.committed} | set(keep)
    by_name = {lv.name: lv for lv in lvs}
    actions: list[Action] = []

    unfinished = [lv for lv in lvs if lv.op_tags - committed]
    for lv in _children_first(unfinished):
        if extorigin.is_outside_clone(lv):
            # LVM sees such a clone as inactive: its device must go before LVM removes it.
            actions.append(Action("release", str(lv.ref), extorigin.uuid(lv)))
        actions.append(Action("remove", str(lv.ref)))
    for lv in lvs:
        for tag in sorted(t for t in lv.tags if t in committed and t not in keep):
            actions.append(Action("deltag", str(lv.ref), tag))

    removed = {lv.name for lv in unfinished}
    for e in entries:
        if e.committed:
            continue
        for step in e.parsed():
            kind, name = step.kind, step.target
            target = by_name.get(name)
            # A gold master stays read-only whatever else happened: its tag is gold's commit.
            if kind is StepKind.INACTIVE and target is not None and not target.active:
                actions.append(Action("activate", str(target.ref)))
            # A device outside the VG made read-only for a clone, unless a clone still reads it.
            if kind is StepKind.DEVRO and not any(
                    tags.value(o.tags, tags.EXT_ORIGIN) == name and o.name not in removed
                    for o in lvs):
                actions.append(Action("device-writable", name))
            if kind is StepKind.READONLY and target is not None and target.readonly \
                    and TAG_GOLD not in target.tags \
                    and not any(o.origin == name and o.name not in removed for o in lvs):
                actions.append(Action("writable", str(target.ref)))
    return actions


def _children_first(lvs: list[LV]) -> list[LV]:
    """A snapshot must go before its origin when both are being removed."""
    remaining = list(lvs)
    ordered: list[LV] = []
    while remaining:
        leaves = [lv for lv in remaining if not any(o.origin == lv.name for o in remaining
                                                    if o is not lv)]
        if not leaves:  # cannot happen with LVM's acyclic origins; never loop forever
            leaves = remaining
        ordered += leaves
        remaining = [lv for lv in remaining if lv not in leaves]
    return ordered


def apply(actions: list[Action]) -> None:
    for a in actions:
        _EXECUTORS[a.kind](a)


def _remove(a: Action) -> None:
    lvm.lvm("lvremove", "-y", "-f", a.target)


def _release(a: Action) -> None:
    vg, _, name = a.target.partition("/")
    extorigin.release_device(vg, name, a.arg)


_EXECUTORS: dict[str, Callable[[Action], object]] = {
    "remove": _remove,
    "deltag": lambda a: lvm.lvm("lvchange", "--deltag", a.arg, a.target),
    "writable": lambda a: lvm.lvm("lvchange", "-prw", a.target),
    "activate": lambda a: lvm.lvm("lvchange", "-ay", "-K", a.target),
    "device-writable": lambda a: extorigin.set_writable(a.target),
    "release": _release,
}

# Operations outside this module recover their own entries, before the generic volume plan.
# Named here rather than registered on import, so no recovery misses a handler whose module
# happened not to be imported yet.
HANDLERS: dict[str, str | Callable[[Entry], None]] = {
    "pool-create": "thinstack.pools:recover",
    "export": "thinstack.exports:recover",
}


def _resolve(found):
    if isinstance(found, str):
        module, _, name = found.partition(":")
        found = getattr(importlib.import_module(module), name)
    return found


def _handler(op: str) -> Callable[[Entry], None] | None:
    return _resolve(HANDLERS.get(op))


# Operations whose entries the recovery at the start of other commands leaves alone: an
# interrupted import may still be resumed (`import --resume`), and an export copies outside the
# VG lock, so its entry may belong to a live process. Only an explicit `thinstack recover`
# rolls back an import. An export's entry is left alone only while LIVE says it may be running
# (its export lock is held): a dead export is rolled back by any recovery of its VG, since it
# may have left a VM's device suspended (and its handler refuses while it still runs).
DEFERRED = {"import", "export"}
LIVE: dict[str, str | Callable[[Entry], bool]] = {"export": "thinstack.exports:running"}


def deferred(entry: Entry, explicit: bool) -> bool:
    """Whether this recovery leaves the entry for later."""
    if explicit or entry.op not in DEFERRED or entry.committed:
        return False
    live = _resolve(LIVE.get(entry.op))
    return live is None or live(entry)


def roll_back(entry: Entry) -> None:
    """Undo one interrupted operation now, as `thinstack recover` would, leaving the VG's other
    unfinished operations as they are. The caller holds the VG lock and closes the entry."""
    handler = _handler(entry.op)
    if handler is not None:
        handler(entry)
        return
    lvs = lvm.lvs(entry.vg)
    others = frozenset(t for lv in lvs for t in lv.op_tags if t != entry.tag)
    apply(plan([entry], lvs, keep=others))


def recover_vg(vg: str, journal: Journal | None = None, *, explicit: bool = False,
               lvs: list[LV] | None = None) -> list[Action]:
    """Complete or roll back everything interrupted in this VG. Caller holds the VG lock.
    `lvs`, when the caller has just read them, saves reading them again. The volumes of a
    damaged journal entry (Journal.damaged) are left alone: nothing says what they are."""
    journal = journal or Journal()
    pending = journal.pending(vg)
    later = [e for e in pending if deferred(e, explicit)]
    entries = [e for e in pending if e not in later]
    for e in entries:
        handler = _handler(e.op)
        if handler is not None:
            handler(e)
    if lvs is None or any(e.op in HANDLERS for e in entries):
        lvs = lvm.lvs(vg) if lvm.vgs(vg) else []
    actions = plan([e for e in entries if e.op not in HANDLERS], lvs,
                   keep=frozenset(e.tag for e in later) | journal.damaged_tags(vg))
    apply(actions)
    for e in entries:
        journal.finish(e)
    # What the handlers did shows too: callers re-read the volumes when anything was done.
    return actions + [Action("undo", e.op, e.id) for e in entries if e.op in HANDLERS]
