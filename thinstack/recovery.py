"""Deciding what an interrupted operation leaves to do, and doing it: the one registry of undo
actions (`UNDO`), run by `apply`.

Every operation rolls back unless it reached its commit point, and two facts make that simple.
Every volume an operation creates carries the operation's tag (`ts_op_<id>`) until the
operation commits by removing the tag, so a tagged volume is unfinished by definition, even if
the journal itself was lost. And every other change an operation makes before committing is
journalled as a step before it is made (`readonly:NAME`), so it can be undone.
Operations that are a single LVM command (resize, delete) need no undo: LVM commits them
atomically, and their journal entry only records the intent. A pool creation, which makes the VG
itself, is planned by its own module (PLANNERS); its actions run here all the same.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from graphlib import TopologicalSorter
from pathlib import Path

from thinstack import backing, extorigin, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import CommandError
from thinstack.errors import Refused, ThinstackError
from thinstack.exporters.atomic import remove_partial
from thinstack.journal import Entry, Journal, StepKind
from thinstack.lvm import LV, Lvm, default_lvm
from thinstack.tags import GOLD as TAG_GOLD


class Undo(StrEnum):
    """What an action does to its target (and what its `arg` is)."""
    RESUME = "resume"  # a dm device an operation suspended (arg: its dm uuid, checked)
    RELEASE = "release"  # an outside clone's device, VG/NAME, before LVM removes it (arg: uuid)
    REMOVE = "remove"  # VG/NAME (arg: an LVM selection it must still match, e.g. lv_uuid=U)
    DELTAG = "deltag"  # the tag `arg` off VG/NAME, or off the VG TARGET
    WRITABLE = "writable"
    ACTIVATE = "activate"
    TRY_ACTIVATE = "try-activate"  # VG/NAME, unless LVM refuses (its pool fails LVM's check)
    DEVICE_WRITABLE = "device-writable"  # a device outside the VG, by its path
    REMOVE_PARTIAL = "remove-partial"  # a writer's temporary file
    UNMOUNT_STALE = "unmount-stale"  # a `thinstack mount` whose daemon is dead, at TARGET
    UNREGISTER = "unregister"  # a VG's backing file from backing.py's registry
    REMOVE_VG = "vgremove"  # arg: an LVM selection it must still match (same uuid, empty)
    WIPE_PV = "pvremove"  # only while the PV belongs to no VG
    STOP_MD = "mdadm-stop"  # the array TARGET
    ZERO_MD = "mdadm-zero"  # a member's superblock, only if of the array `arg`
    DETACH_LOOP = "losetup-detach"  # every loop over the file of identity `arg` (DEV:INO)
    REMOVE_FILE = "remove-file"  # TARGET, only while it is still the file `arg` (DEV:INO)
    REMOVE_DEVICE = "dm-remove"  # a dm device made outside LVM (arg: its dm uuid, checked)


@dataclass(frozen=True)
class Action:
    kind: Undo
    target: str  # VG/NAME, a VG, a device's path or dm name, a file
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
            actions.append(Action(Undo.RELEASE, str(lv.ref), extorigin.uuid(lv)))
        actions.append(Action(Undo.REMOVE, str(lv.ref)))
    for lv in lvs:
        for tag in sorted(t for t in lv.tags if t in committed and t not in keep):
            actions.append(Action(Undo.DELTAG, str(lv.ref), tag))

    removed = {lv.name for lv in unfinished}
    for e in entries:
        if e.committed:
            continue
        for step in e.parsed():
            kind, name = step.kind, step.target
            target = by_name.get(name)
            # A gold master stays read-only whatever else happened: its tag is gold's commit.
            if kind is StepKind.INACTIVE and target is not None and not target.active:
                actions.append(Action(Undo.ACTIVATE, str(target.ref)))
            # A device outside the VG made read-only for a clone, unless a clone still reads it.
            if kind is StepKind.DEVRO and not any(
                    tags.value(o.tags, tags.EXT_ORIGIN) == name and o.name not in removed
                    for o in lvs):
                actions.append(Action(Undo.DEVICE_WRITABLE, name))
            if kind is StepKind.READONLY and target is not None and target.readonly \
                    and TAG_GOLD not in target.tags \
                    and not any(o.origin == name and o.name not in removed for o in lvs):
                actions.append(Action(Undo.WRITABLE, str(target.ref)))
        if "partial" in e.args:  # an export's image, half built beside its destination
            actions.append(Action(Undo.REMOVE_PARTIAL, e.args["partial"]))
        if "mountpoint" in e.args:  # the mount that served the snapshot, if it is dead
            actions.append(Action(Undo.UNMOUNT_STALE, e.args["mountpoint"]))
        if "private_device" in e.args:  # reclaim's second device on the volume's thin id
            actions.append(Action(Undo.REMOVE_DEVICE, e.args["private_device"],
                                  e.args["private_uuid"]))
    return actions


def resumes(entries: Iterable[Entry]) -> list[Action]:
    """The devices the entries suspended (`suspend:DM_NAME DM_UUID`) and did not record as
    resumed: undone before anything else, since LVM's scans would wait on them."""
    actions = []
    for e in entries:
        steps = e.parsed()
        resumed = {s.target for s in steps if s.kind is StepKind.RESUMED}
        for s in steps:
            name, _, uuid = s.target.partition(" ")
            if s.kind is StepKind.SUSPEND and name not in resumed:
                actions.append(Action(Undo.RESUME, name, uuid))
    return actions


def _children_first(lvs: list[LV]) -> list[LV]:
    """A snapshot must go before its origin when both are being removed."""
    by_name = {lv.name: lv for lv in lvs}
    children = {lv.name: {o.name for o in lvs if o.origin == lv.name} for lv in lvs}
    return [by_name[name] for name in TopologicalSorter(children).static_order()]


# --- the undo actions --------------------------------------------------------------------------

def apply(actions: Iterable[Action], lvm: Lvm) -> None:
    """Run the actions in order, through `lvm` and its runner."""
    for a in actions:
        UNDO[a.kind](a, lvm)


def _resume(a: Action, lvm: Lvm) -> None:
    dm = DeviceMapper(lvm.runner)
    info = dm.info(a.target)
    if info is not None and info.suspended and info.uuid == a.arg:  # only the very device
        dm.resume(a.target)


def _remove_device(a: Action, lvm: Lvm) -> None:
    dm = DeviceMapper(lvm.runner)
    info = dm.info(a.target)
    if info is not None and info.uuid == a.arg:  # only the very device
        dm.remove(a.target)


def _release(a: Action, lvm: Lvm) -> None:
    vg, _, name = a.target.partition("/")
    extorigin.release_device(vg, name, a.arg, DeviceMapper(lvm.runner))


def _remove(a: Action, lvm: Lvm) -> None:
    if a.arg:  # LVM selects it, under its lock, only while it is still the one planned for
        lvm.run("lvremove", "-q", "-y", "-f", "-S", a.arg, a.target.partition("/")[0])
    else:
        lvm.run("lvremove", "-q", "-y", "-f", a.target)


def _wipe_pv(a: Action, lvm: Lvm) -> None:
    # Device names can change across a reboot, and a PV that is someone's must never be wiped.
    real = os.path.realpath(a.target)
    if any(os.path.realpath(pv.name) == real and not pv.vg for pv in lvm.pvs()):
        lvm.run("pvremove", "-q", "-y", "-ff", a.target)


def _stop_md(a: Action, lvm: Lvm) -> None:
    if os.path.exists(f"/dev/md/{a.target}"):
        lvm.runner.run(["mdadm", "--stop", f"/dev/md/{a.target}"])


def _zero_md(a: Action, lvm: Lvm) -> None:
    # Only a superblock of our array (by name), for the same reason as PVs.
    try:
        out = lvm.runner.run(["mdadm", "--examine", "--export", a.target])
    except CommandError:
        return  # no md superblock there
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if a.arg and fields.get("MD_NAME", "").rpartition(":")[2] == a.arg:
        lvm.runner.run(["mdadm", "--zero-superblock", a.target])


def _try_activate(a: Action, lvm: Lvm) -> None:
    try:
        lvm.run("lvchange", "-ay", "-K", a.target)
    except ThinstackError:  # LVM's failure, as Lvm.run reports it
        pass  # a damaged pool stays inactive, as it was, for `thinstack pool repair`


UNDO: dict[Undo, Callable[[Action, Lvm], object]] = {
    Undo.RESUME: _resume,
    Undo.RELEASE: _release,
    Undo.REMOVE: _remove,
    Undo.DELTAG: lambda a, lvm: lvm.run("lvchange" if "/" in a.target else "vgchange", "-q",
                                        "--deltag", a.arg, a.target),
    Undo.WRITABLE: lambda a, lvm: lvm.run("lvchange", "-prw", a.target),
    Undo.ACTIVATE: lambda a, lvm: lvm.run("lvchange", "-ay", "-K", a.target),
    Undo.TRY_ACTIVATE: _try_activate,
    Undo.DEVICE_WRITABLE: lambda a, lvm: lvm.runner.run(["blockdev", "--setrw", a.target]),
    Undo.REMOVE_PARTIAL: lambda a, lvm: remove_partial(a.target),
    Undo.UNMOUNT_STALE: lambda a, lvm: _resolve("thinstack.mount_instants:unmount_stale")(
        Path(a.target)),
    Undo.UNREGISTER: lambda a, lvm: backing.unregister(a.target),
    Undo.REMOVE_VG: lambda a, lvm: lvm.run("vgremove", "-q", "-y", "-f", "-S", a.arg),
    Undo.WIPE_PV: _wipe_pv,
    Undo.STOP_MD: _stop_md,
    Undo.ZERO_MD: _zero_md,
    Undo.DETACH_LOOP: lambda a, lvm: backing.detach_loops(a.arg, lvm.runner),
    Undo.REMOVE_FILE: lambda a, lvm: backing.remove_file(Path(a.target), a.arg),
    Undo.REMOVE_DEVICE: _remove_device,
}


# --- recovering entries ------------------------------------------------------------------------

def _resolve(name: str) -> Callable:
    """`module:function`, imported when first needed (the module imports this one)."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


# Operations that plan their own rollback (entry, Lvm -> actions), instead of `plan`. Named
# here rather than registered on import, so no recovery misses a planner whose module happened
# not to be imported yet.
PLANNERS: dict[str, str] = {"pool-create": "thinstack.pools:rollback",
                             "live-import": "thinstack.live:rollback",
                             "pool-repair": "thinstack.repair:rollback"}

# Operations whose entries the recovery at the start of other commands leaves alone: an
# interrupted import may still be resumed (`import --resume`); an export copies outside the VG
# lock, and a mount's snapshot lives as long as its files are open, so their entries may belong
# to a live process. Only an explicit `thinstack recover` rolls back an import. The others are
# left alone only while LIVE says they may be running (their lock is held): a dead one is rolled
# back by any recovery of its VG, since it may have left a VM's device suspended; an explicit
# recovery refuses while one still runs.
DEFERRED = {"import", "export", "mount"}
LIVE: dict[str, str] = {"export": "thinstack.exports:running",
                        "mount": "thinstack.mount_instants:running"}


def deferred(entry: Entry, explicit: bool) -> bool:
    """Whether this recovery leaves the entry for later. Refused: the operator asked to
    recover an operation that is still running."""
    if entry.op not in DEFERRED or entry.committed:
        return False
    if entry.op not in LIVE:
        return not explicit
    if _resolve(LIVE[entry.op])(entry):
        if explicit:
            article = "an" if entry.op[0] in "aeiou" else "a"
            raise Refused(f"{article} {entry.op} of {entry.vg}/{entry.args['name']} is running; "
                          "recover when it has finished")
        return True
    return False


def _recover(entries: list[Entry], vg: str, lvm: Lvm, lvs: list[LV] | None,
             keep: frozenset[str]) -> list[Action]:
    done = resumes(entries)
    apply(done, lvm)
    for e in entries:
        if e.op in PLANNERS:
            actions = _resolve(PLANNERS[e.op])(e, lvm)
            apply(actions, lvm)
            done += actions
    if lvs is None or done:
        lvs = lvm.lvs(vg) if lvm.vgs(vg) else []
    actions = plan([e for e in entries if e.op not in PLANNERS], lvs, keep)
    apply(actions, lvm)
    return done + actions


def roll_back(entry: Entry, lvm: Lvm | None = None) -> None:
    """Undo one interrupted operation now, as `thinstack recover` would, leaving the VG's other
    unfinished operations as they are. The caller holds the VG lock and closes the entry."""
    lvm = lvm or default_lvm()
    lvs = lvm.lvs(entry.vg) if lvm.vgs(entry.vg) else []
    others = frozenset(t for lv in lvs for t in lv.op_tags if t != entry.tag)
    _recover([entry], entry.vg, lvm, lvs, others)


def recover_vg(vg: str, journal: Journal | None = None, *, explicit: bool = False,
               lvs: list[LV] | None = None, lvm: Lvm | None = None) -> list[Action]:
    """Complete or roll back everything interrupted in this VG; what was done. Caller holds the
    VG lock. `lvs`, when the caller has just read them, saves reading them again. The volumes of
    a damaged journal entry (Journal.damaged) are left alone: nothing says what they are."""
    journal = journal or Journal()
    pending = journal.pending(vg)
    later = [e for e in pending if deferred(e, explicit)]
    entries = [e for e in pending if e not in later]
    keep = frozenset(e.tag for e in later) | journal.damaged_tags(vg)
    done = _recover(entries, vg, lvm or default_lvm(), lvs, keep)
    for e in entries:
        journal.finish(e)
    return done
