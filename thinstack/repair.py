"""`thinstack pool repair VG`: fresh metadata for a pool whose metadata is damaged (LVM's check
fails at activation) or that the kernel stopped trusting (mode needs_check, ro or fail).

LVM's `lvconvert --repair` runs thin_repair from the pool's metadata into its spare metadata LV
(pmspare) and swaps the two in its own metadata, in one commit; the old metadata stays as the
LV `pool_metaN`, kept for analysis and named in the result. So a repair killed before that
commit leaves the pool as it was, and after it, repaired; the old metadata is kept either way.

The flow, journalled as operation `pool-repair`: refuse while any of the pool's volumes is open
(naming them); deactivate its active thin volumes and the pool (each journalled `inactive:NAME`
first, so recovering an interrupted repair activates them again, where LVM can); repair (the
commit); activate the pool alone (LVM's thin_check first, which clears the needs_check flag once
the check passes) and check it, thin_check clean and the pool's thin ids those LVM lists, before
the volumes that were active are activated again. A repair that loses volumes
says which: their data is gone from the new metadata (it may be in the old).

A pool whose metadata is sound but whose thin ids are not LVM's (a power cut between LVM's
commit and the pool's: `pool check` names them) needs no new metadata: `reconcile` deletes the
ids no volume has and makes the lost volumes again, empty, in place, with the volumes in use.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from thinstack import faults, lvm, poolstatus
from thinstack.dm.client import DeviceMapper
from thinstack.dm.errors import DmError
from thinstack.dm.status import ThinPoolStatus
from thinstack.errors import Refused, ThinstackError
from thinstack.journal import Entry, Step, StepKind
from thinstack.lvm import LV, Lvm
from thinstack.operation import Op, operation
from thinstack.recovery import Action, Undo
from thinstack.thinpool import kernel_pool, reading_metadata

OP = "pool-repair"
CLEAR_NEEDS_CHECK = 'global{thin_check_options=["-q","--clear-needs-check-flag"]}'


@dataclass(frozen=True)
class Repaired:
    pool: str  # VG/NAME
    old_metadata: str | None  # VG/NAME_metaN: LVM's copy of the metadata before the repair
    volumes: int  # the pool's thin volumes, all present in the repaired metadata
    # A pool with sound metadata whose thin ids are not LVM's (a power cut between LVM's
    # commit and the pool's) is reconciled instead of rebuilt:
    deleted_ids: tuple[int, ...] = ()  # thin ids no volume had, deleted from the pool
    emptied: tuple[str, ...] = ()  # volumes the pool had lost, made again as empty devices

    def to_json(self) -> dict:
        return asdict(self)


def old_metadata(pool: str, before: set[str], after: set[str]) -> str | None:
    """The LV that `lvconvert --repair` left the old metadata in: the new `POOL_metaN`."""
    made = sorted(n for n in after - before if re.fullmatch(rf"{re.escape(pool)}_meta\d+", n))
    return made[-1] if made else None


def problems(clean: bool, check_output: str, known: dict[str, int], found: set[int]) -> str | None:
    """What is wrong with a repaired pool, given its thin_check and the thin ids LVM knows
    (volume name -> id) and the repaired metadata holds; None when nothing is."""
    if not clean:
        last = check_output.splitlines()[-1] if check_output else "thin_check found errors"
        return f"its metadata still fails thin_check ({last})"
    return poolstatus.thin_id_problems(known, found)


def repair(vg: str, pool_name: str | None = None) -> Repaired:
    """Repair pool `pool_name` of `vg` (None: its only pool)."""
    def checked(lvs: list[LV]) -> dict:
        pool = lvm.pool_of(vg, lvs, pool_name)
        thins = [lv for lv in lvs if lv.is_thin and lv.pool == pool.name]
        return dict(pool=pool.name, active=sorted(lv.name for lv in thins if lv.active),
                    busy=sorted(str(lv.ref) for lv in thins if lv.open))

    # No recovery first: what earlier operations left may need a writable pool to be undone;
    # the next command recovers it, once the pool is repaired.
    with operation(OP, vg, checked, recover=False, at=pool_name) as op:
        name, active = op.entry.args["pool"], op.entry.args["active"]
        ref = lvm.VolumeRef(vg, name)
        pool = lvm.pool_of(vg, op.lvs, name)
        found = sound_thin_ids(pool)
        if found is not None and poolstatus.thin_id_problems(
                poolstatus.known_thin_ids(pool, op.lvs), found):
            return reconcile(op, pool, found)
        if op.entry.args["busy"]:
            raise Refused(f"{ref} has open volumes; close them first: "
                          f"{', '.join(op.entry.args['busy'])}")
        for volume in active:
            op.step(Step(StepKind.INACTIVE, volume))
        lvm.lvm("lvchange", "-q", "-an", *[f"{vg}/{v}" for v in active], str(ref))
        faults.point(OP, "after-deactivate")
        before = {lv.name for lv in op.lvs}
        lvm.lvm("lvconvert", "-q", "-y", "--repair", str(ref))
        op.commit()  # LVM has swapped the metadata: there is no going back
        faults.point(OP, "after-repair")
        # LVM checks the metadata before it activates the pool; told to, it also clears the
        # needs_check flag, which thin_repair copies from the old metadata.
        lvm.lvm("lvchange", "-q", "-ay", "-K", "--config", CLEAR_NEEDS_CHECK, str(ref))
        lvs = lvm.volumes_of(vg)
        pool = lvm.pool_of(vg, lvs, name)
        known = poolstatus.known_thin_ids(pool, lvs)
        wrong = check(pool, known)
        if wrong is None and active:
            lvm.lvm("lvchange", "-q", "-ay", "-K", *[f"{vg}/{v}" for v in active])
    old = old_metadata(name, before, {lv.name for lv in lvs})
    kept = f"; the old metadata is kept as {vg}/{old}" if old else ""
    if wrong:
        raise ThinstackError(f"{ref} was repaired, but {wrong}{kept}")
    return Repaired(str(ref), f"{vg}/{old}" if old else None, len(known))


def sound_thin_ids(pool: LV) -> set[int] | None:
    """The thin ids of a pool whose metadata is sound (active, trusted by the kernel, thin_check
    clean); None when it is not. A sound pool that agrees with LVM is still rebuilt: the
    operator asked for it."""
    device = kernel_pool(pool, DeviceMapper(lvm.default_lvm().runner))
    if device is None:
        return None
    status = device.dm.target_status(device.name)
    if not isinstance(status, ThinPoolStatus) or poolstatus.pool_mode(status) not in (
            poolstatus.RW, poolstatus.OUT_OF_DATA_SPACE):
        return None
    if not reading_metadata(pool, device.thin_check).clean:
        return None
    return {e.dev_id for e in reading_metadata(pool, device.thin_ls)}


def reconcile(op: Op, pool: LV, found: set[int]) -> Repaired:
    """Make the pool's thin ids LVM's: delete those no volume has (nobody can reach their
    data), and make the lost volumes again as empty devices (what they held was never flushed:
    a flush commits the pool's metadata, and with it the device), so LVM can activate, roll
    back or remove them. Both messages are idempotent: a killed run is simply run again."""
    known = poolstatus.known_thin_ids(pool, op.lvs)
    strays = tuple(sorted(found - set(known.values())))
    lost = tuple(sorted(name for name, i in known.items() if i not in found))
    device = kernel_pool(pool, DeviceMapper(lvm.default_lvm().runner))
    assert device is not None  # sound_thin_ids found it active, under the same VG lock
    try:
        for i in strays:
            device.dm.message(device.name, 0, f"delete {i}")
        for name in lost:
            device.dm.message(device.name, 0, f"create_thin {known[name]}")
    except DmError as e:
        raise ThinstackError(f"{pool.ref}: {e}") from None
    op.commit()
    wrong = check(pool, known)
    if wrong:
        raise ThinstackError(f"{pool.ref} was reconciled with LVM, but {wrong}")
    return Repaired(str(pool.ref), None, len(known), strays, tuple(f"{pool.vg}/{n}"
                                                                      for n in lost))


def check(pool: LV, known: dict[str, int]) -> str | None:
    """problems() of the active, repaired pool, read on a metadata snapshot."""
    device = kernel_pool(pool, DeviceMapper(lvm.default_lvm().runner))
    if device is None:
        return "it did not activate"
    result = reading_metadata(pool, device.thin_check)
    found = {e.dev_id for e in reading_metadata(pool, device.thin_ls)} if result.clean else set()
    return problems(result.clean, result.output, known, found)


def rollback(entry: Entry, lvm: Lvm) -> list[Action]:
    """recovery.PLANNERS["pool-repair"]: an interrupted repair that had not yet repaired
    activates the volumes it deactivated, where LVM can (a pool that fails LVM's check stays
    inactive, as it was, for the next `pool repair`). A repaired one leaves them to the next
    repair, which checks the pool before use."""
    inactive = [s.target for s in entry.parsed() if s.kind is StepKind.INACTIVE]
    # A VG removed since has nothing left to activate (and LVM would refuse to list it).
    if entry.committed or not inactive or not lvm.vgs(entry.vg):
        return []
    active = {lv.name for lv in lvm.lvs(entry.vg) if lv.active}
    return [Action(Undo.TRY_ACTIVATE, f"{entry.vg}/{name}") for name in inactive
            if name not in active]
