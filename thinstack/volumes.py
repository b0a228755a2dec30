"""VM disks: thin volumes, snapshots, gold masters, clones, CoW volumes.

Each mutating operation runs inside `operation.operation()`, which rolls it back if anything
fails, and returns the volume's path: what it knows is not read back (every LVM command is dear,
issue 10). Operations that are one LVM command (create, snapshot, gold clone, cow, resize, delete)
are atomic through LVM itself; those of several steps tag the volumes they create until the
last step commits them by dropping the tag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from thinstack import budget, extorigin, faults, growth, lvm, tags, thinpool
from thinstack.errors import Exists, NotFound, Refused
from thinstack.journal import Step, StepKind
from thinstack.lvm import LV, VolumeRef
from thinstack.operation import Op, operation
from thinstack.sizes import round_up


def _visible(lvs: list[LV]) -> list[LV]:
    """What the operator manages: not LVM's internal volumes, not unfinished ones, not the
    snapshots thinstack keeps as the base of the next incremental export."""
    return [lv for lv in lvs if not lv.internal and tags.LAST_EXPORT not in lv.tags
            and tags.LIVE_META not in lv.tags  # a live import's dm-clone metadata
            and not lv.op_tags]


def _get(ref: VolumeRef, lvs: list[LV]) -> LV:
    for lv in _visible(lvs):
        if lv.name == ref.name:
            return lv
    raise NotFound(f"{ref}: no such volume")


def _refuse_if_hydrating(lv: LV, doing: str) -> None:
    if tags.LIVE in lv.tags:  # only then is live.py needed: it loads every image reader
        from thinstack import live

        live.refuse_if_hydrating(lv, doing)


def _absent(ref: VolumeRef, lvs: list[LV]) -> None:
    if any(lv.name == ref.name for lv in lvs):
        raise Exists(f"{ref} already exists")


def dependants(lv: LV, lvs: list[LV]) -> list[LV]:
    """Volumes that read through this one: thin snapshots, external-origin clones (in any
    pool), CoW volumes. (An export base snapshot is no dependant: it goes with its volume.)"""
    by_name = {o.name: o for o in lvs}
    return [o for o in _visible(lvs) if origin_name(o, by_name) == lv.name and o is not lv]


def origin_name(lv: LV, by_name: dict[str, LV]) -> str:
    """The VG's LV that `lv` reads through: LVM's origin, or the gold master of another pool
    that a clone across pools reads as a device ('' for none)."""
    found = _in_vg(extorigin.recorded(lv), lv.vg, by_name)
    return lv.origin or (found.name if found is not None else "")


# --- operations --------------------------------------------------------------------------------

def create(ref: VolumeRef, size: int, pool_name: str | None = None) -> str:
    """A thin volume in pool `pool_name` (None: the VG's only pool)."""
    with operation("create", ref.vg, dict(name=ref.name, size=size), at=pool_name) as op:
        _absent(ref, op.lvs)
        pool = lvm.pool_of(ref.vg, op.lvs, pool_name)
        budget.refuse(pool, op.lvs, size, f"creating {ref}")
        lvm.lvm("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", pool.name, "-V", f"{size}b",
                "-n", ref.name, "--setactivationskip", "n", "--config", growth.arming(pool.tags),
                ref.vg)
        faults.point("create", "after-lvcreate")
    return ref.path


def snapshot(origin: VolumeRef, name: str, *, readonly: bool = False) -> str:
    ref = VolumeRef(origin.vg, lvm.check_user_name(name, "snapshot name"))
    with operation("snapshot", ref.vg, dict(name=name, origin=origin.name),
                   at=origin.name) as op:
        source = _get(origin, op.lvs)
        _refuse_if_hydrating(source, "snapshot")
        _absent(ref, op.lvs)
        if not source.is_thin:
            raise Refused(f"{origin} is not a thin volume; use `thinstack cow` for other volumes")
        if extorigin.is_outside_clone(source):
            raise Refused(_outside_refusal(source))
        _thin_snapshot(op, source, ref, readonly)
        faults.point("snapshot", "after-lvcreate")
    return ref.path


def _thin_snapshot(op: Op, source: LV, ref: VolumeRef, readonly: bool) -> None:
    """A snapshot lives in its origin's pool (dm-thin shares the blocks within one pool)."""
    pool = lvm.volume_pool(source, op.lvs)
    # Read-only or not, a snapshot's size is the pool's to count: its origin's writes can come
    # to make every one of its blocks its own.
    budget.refuse(pool, op.lvs, source.size, f"snapshotting {source.ref}")
    thinpool.refuse_if_metadata_would_run_out(pool)
    # LVM gives thin snapshots its activation-skip flag by default, so they would not come up
    # on activation or the next boot: -kn clears it, and the snapshot is active at once.
    lvm.lvm("lvcreate", "-q", "-y", "-s", str(source.ref), "-n", ref.name, "--setactivationskip",
            "n", "-p", "r" if readonly else "rw", "--config", growth.arming(pool.tags))


def gold(ref: VolumeRef) -> str:
    with operation("gold", ref.vg, dict(name=ref.name), at=ref.name) as op:
        lv = _get(ref, op.lvs)
        _refuse_if_hydrating(lv, "make a gold master of")
        if not lv.is_thin:
            raise Refused(f"{ref} is not a thin volume in the pool")
        if extorigin.is_outside_clone(lv):
            raise Refused(_outside_refusal(lv))
        if lv.open:
            raise Refused(f"{ref} is open (a VM or a mount is using it); close it first")
        # Read-only and tagged in one LVM command, so never one without the other: the commit
        # point. (Journalled first all the same: a rollback reads the steps.)
        pool = lvm.volume_pool(lv, op.lvs)  # -pr reloads the volume's table, and its pool's
        if not lv.readonly:
            op.step(Step(StepKind.READONLY, lv.name))
        lvm.lvm("lvchange", "-q", *([] if lv.readonly else ["-pr"]), "--addtag", tags.GOLD,
                "--config", growth.arming(pool.tags), str(ref))
        faults.point("gold", "after-readonly")
        op.commit()
    return ref.path


def clone(origin: VolumeRef | str, ref: VolumeRef, pool_name: str | None = None) -> str:
    """A writable clone at O(1) cost. A gold master gives a thin snapshot in its own pool, or,
    with `pool_name` another pool, a clone there that reads the gold master's device wherever
    it maps nothing (as a clone of a device outside the VG: LVM's own layering of a thin
    external origin cannot snapshot the clone, so no export could freeze it); a read-only LV of
    the same VG outside the pool becomes the clone's external origin, and so does a block device
    outside the VG (ORIGIN given as a /dev path; see extorigin)."""
    if isinstance(origin, str):
        return _clone_device(origin, ref, pool_name)
    if origin.vg != ref.vg:
        raise Refused(f"clone must be in the origin's volume group ({origin.vg}); "
                      f"give a volume of another VG as a device path (/dev/{origin})")
    with operation("clone", ref.vg, dict(name=ref.name, origin=origin.name),
                   at=pool_name or origin.name) as op:
        _clone_lv(op, _get(origin, op.lvs), ref, pool_name)
    return ref.path


def _clone_lv(op: Op, source: LV, ref: VolumeRef, pool_name: str | None) -> None:
    origin = source.ref
    _absent(ref, op.lvs)
    _refuse_if_hydrating(source, "clone")
    if extorigin.is_outside_clone(source):
        raise Refused(_outside_refusal(source))
    if source.is_thin:
        if tags.GOLD not in source.tags:
            raise Refused(f"{origin} is not a gold master: run `thinstack gold {origin}` "
                          "first, or take a `thinstack snapshot`")
        if pool_name is None or pool_name == source.pool:
            _thin_snapshot(op, source, ref, readonly=False)
            faults.point("clone", "after-snapshot")
        else:  # another tenant's pool: the gold master is read through, never copied
            _outside_clone(op, source.ref.path, ref, pool_name, shown=str(source.ref))
    elif source.is_thin_pool or source.is_cow_snapshot or source.internal:
        raise Refused(f"{origin} cannot be a clone origin")
    else:
        _external_clone(op, source, ref, pool_name)


def _clone_device(path: str, ref: VolumeRef, pool_name: str | None) -> str:
    with operation("clone", ref.vg, dict(name=ref.name, origin=path), at=pool_name) as op:
        real = os.path.realpath(path)
        same_vg = [lv for lv in _visible(op.lvs) if lv.active and real in
                   (os.path.realpath(lv.path), os.path.realpath(lv.dm_path))]
        if same_vg:  # a volume of this VG named by its path: LVM layers it itself
            _clone_lv(op, same_vg[0], ref, pool_name)
        else:
            _outside_clone(op, path, ref, pool_name)
    return ref.path


def _outside_clone(op: Op, path: str, ref: VolumeRef, pool_name: str | None,
                   shown: str | None = None) -> None:
    _absent(ref, op.lvs)
    origin = extorigin.probe(path)
    extorigin.check_usable(origin)
    origin_tags = extorigin.origin_tags(origin)
    pool = lvm.pool_of(ref.vg, op.lvs, pool_name)
    budget.refuse(pool, op.lvs, origin.size, f"cloning {shown or path}")
    if not origin.readonly:
        op.step(Step(StepKind.DEVRO, path))
        extorigin.set_readonly(origin)
    faults.point("clone", "after-origin-readonly")
    # Inactive, and skipped by LVM's activation: only extorigin brings it up, with its origin.
    lvm.lvm("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", pool.name,
            "-V", f"{origin.size}b", "-n", ref.name, "-an", "--setactivationskip", "y",
            "--addtag", op.entry.tag, *(a for t in origin_tags for a in ("--addtag", t)),
            "--config", growth.arming(pool.tags), ref.vg)
    extorigin.activate(lvm.lv(ref), pool)
    faults.point("clone", "after-snapshot")
    op.commit(ref)


def _outside_refusal(lv: LV) -> str:
    path = extorigin.origin_path(lv)
    return (f"{lv.ref} reads a device outside LVM ({path}), which LVM cannot give a snapshot; "
            f"clone {path} again instead")


def _external_clone(op: Op, source: LV, ref: VolumeRef, pool_name: str | None) -> None:
    if source.open and not source.readonly:
        raise Refused(f"{source.ref} is open read-write; an external origin must not change")
    pool = lvm.pool_of(ref.vg, op.lvs, pool_name)
    budget.refuse(pool, op.lvs, source.size, f"cloning {source.ref}")
    _make_readonly(op, source)
    if source.active:
        # LVM layers an external origin itself and refuses one that is already active.
        op.step(Step(StepKind.INACTIVE, source.name))
        lvm.lvm("lvchange", "-q", "-an", str(source.ref))
    faults.point("clone", "after-origin-readonly")
    lvm.lvm("lvcreate", "-q", "-y", "-s", "--thinpool", pool.name, str(source.ref), "-n", ref.name,
            "--addtag", op.entry.tag, "--setactivationskip", "n",
            "--config", growth.arming(pool.tags))
    faults.point("clone", "after-snapshot")
    if source.active:  # readable again, now through LVM's read-only layer
        lvm.lvm("lvchange", "-q", "-ay", str(source.ref))
    op.commit(ref)


def cow(origin: VolumeRef, ref: VolumeRef, store: int) -> str:
    """An old-style dm-snapshot volume over a read-only origin, its COW store grown by the
    monitor as it fills."""
    if origin.vg != ref.vg:
        raise Refused(f"a CoW volume must be in its origin's volume group ({origin.vg})")
    with operation("cow", ref.vg, dict(name=ref.name, origin=origin.name),
                   at=origin.name) as op:
        source = _get(origin, op.lvs)
        _absent(ref, op.lvs)
        if not source.readonly:
            raise Refused(f"{origin} is writable; a CoW volume needs a read-only origin "
                          f"(e.g. `thinstack gold {origin}`)")
        lvm.lvm("lvcreate", "-q", "-y", "-s", "-L", f"{store}b", "-n", ref.name, "-p", "rw",
             str(origin))
        faults.point("cow", "after-lvcreate")
    return ref.path


def resize(ref: VolumeRef, size: int, *, shrink_ok: bool = False) -> str:
    with operation("resize", ref.vg, dict(name=ref.name, size=size), at=ref.name) as op:
        lv = _get(ref, op.lvs)
        _refuse_if_hydrating(lv, "resize")
        if tags.GOLD in lv.tags:
            raise Refused(f"{ref} is a gold master; its clones depend on its content")
        if size != lv.size:
            _refuse_if_outside_origin(lv)
        if size > lv.size and lv.is_thin:
            budget.refuse(lvm.volume_pool(lv, op.lvs), op.lvs, size - lv.size,
                          f"growing {ref}")
        if size < lv.size and not shrink_ok:
            raise Refused(f"{ref} would shrink from {lv.size} to {size} bytes, discarding its "
                          "tail: pass --yes to do that")
        if size != lv.size and extorigin.is_outside_clone(lv):
            _resize_outside(lv, size)
        elif size != lv.size:
            if size < lv.size and lv.is_thin:
                # dm-thin keeps the mappings past a thin device's new end: grown again, the
                # volume would show its old tail. Unmapped first, as --yes promises.
                if not lv.active or lv.readonly:
                    raise Refused(f"{ref} is not active and writable: make it so to shrink it")
                kept = round_up(size, lvm.vgs(lv.vg)[0].extent_size)  # LVM rounds up to it
                if kept < lv.size:
                    # A discard unmaps whole chunks only: a chunk larger than the extent that
                    # straddles the new end keeps its tail, which is zeroed instead.
                    chunk = lvm.volume_pool(lv, op.lvs).chunk_size
                    straddling = min(round_up(kept, chunk), lv.size) - kept
                    if straddling:
                        extorigin.discard(lv, kept, straddling, zero=True)
                    extorigin.discard(lv, kept, lv.size - kept)
            lvm.lvm("lvresize", "-q", "-f", "-L", f"{size}b", str(ref))
    return ref.path


def _resize_outside(lv: LV, size: int) -> None:
    """LVM records the size of a volume it sees inactive; the device here follows. Each order
    leaves, after a crash, a device no bigger than LVM's record and no unmapped data inside it."""
    if not extorigin.active(lv):
        raise Refused(f"{lv.ref} is not active: `thinstack pool attach {lv.vg}` first")
    if size > lv.size:
        lvm.lvm("lvresize", "-q", "-f", "-L", f"{size}b", str(lv.ref))
        extorigin.reload(lv, lvm.lv(lv.ref).size)
    else:
        extent = lvm.vgs(lv.vg)[0].extent_size  # LVM rounds up to it: so must the device
        size = round_up(size, extent)
        extorigin.discard(lv, size, lv.size - size)
        extorigin.reload(lv, size)
        lvm.lvm("lvresize", "-q", "-f", "-L", f"{size}b", str(lv.ref))


def delete(ref: VolumeRef) -> None:
    with operation("delete", ref.vg, dict(name=ref.name), at=ref.name) as op:
        lv = _get(ref, op.lvs)
        _refuse_if_hydrating(lv, "delete (or abort it: `thinstack import --live --abort`)")
        if lv.is_thin_pool:
            raise Refused(f"{ref} is a thin pool; thinstack deletes volumes, not pools")
        deps = dependants(lv, op.lvs)
        if deps:
            raise Refused(f"{ref} has dependants: {', '.join(d.name for d in deps)}; "
                          "delete them first")
        _refuse_if_outside_origin(lv)
        if lv.open:  # (an open outside-origin clone: release below refuses)
            raise Refused(f"{ref} is open (a VM or a mount is using it)")
        extorigin.release(lv)  # an outside-origin clone's device, before LVM drops the LV
        # The base of its next incremental export goes with it, in the same LVM command.
        bases = [o for o in op.lvs if o.origin == lv.name and tags.LAST_EXPORT in o.tags]
        lvm.lvm("lvremove", "-q", "-y", *(str(b.ref) for b in bases), str(ref))


def _refuse_if_outside_origin(lv: LV) -> None:
    """A read-only LV that clones in other VGs read as their device origin must keep its size
    and content while they exist (they read it block for block, up to their recorded size)."""
    if lv.readonly and not lv.is_thin_pool:
        clones = extorigin.dependants(lv.path, lvm.lvs())
        if clones:
            raise Refused(f"{lv.ref} is the origin of "
                          f"{', '.join(str(c.ref) for c in clones)}; delete them first")


def _make_readonly(op: Op, lv: LV) -> None:
    """Journalled before it is done, so a rollback knows to make the volume writable again."""
    if not lv.readonly:
        op.step(Step(StepKind.READONLY, lv.name))
        lvm.lvm("lvchange", "-q", "-pr", str(lv.ref))


# --- reading -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VolumeInfo:
    vg: str
    name: str
    size: int
    path: str
    dm_path: str
    kind: str  # thin | snapshot | clone | gold | cow | volume
    origin: str | None  # the origin LV's name, or the path of a device outside the VG
    readonly: bool
    gold: bool
    active: bool
    dependants: list[str]
    mapped_bytes: int | None
    exclusive_bytes: int | None
    shared_bytes: int | None
    thin_id: int | None
    pool: str | None  # the pool that holds its own blocks (None: not a thin volume)
    # Where the blocks it has not written come from: the origin's pool (a clone of a gold
    # master of another tenant reads them there); None: no origin in a pool.
    origin_pool: str | None
    hydration: dict | None = None  # a live import still copying in: its progress

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _kind(lv: LV, origin: LV | None) -> str:
    """What `lv` is, given its origin LV (None if it has none in the VG)."""
    if tags.GOLD in lv.tags:
        return "gold"
    if lv.is_cow_snapshot:
        return "cow"
    if extorigin.is_outside_clone(lv):
        return "clone"
    if lv.is_thin and lv.origin:
        if origin is not None and tags.GOLD in origin.tags:
            return "clone"
        return "snapshot" if origin is not None and origin.is_thin else "clone"
    return "thin" if lv.is_thin else "volume"


def volume_infos(lvs: list[LV], usage: dict[tuple[str, int], tuple[int, int, int]] | None = None,
                 name: str | None = None, hydrations: dict[str, dict] | None = None
                 ) -> list[VolumeInfo]:
    """The volumes among `lvs` (one VG's), or the one called `name`. usage: (pool, thin device
    id) -> (mapped, exclusive, shared) bytes, from thin_ls; hydrations: VG/NAME -> the progress
    of a live import. Linear in the volumes: origins and
    dependants are looked up in maps made once (a VDI pool holds thousands)."""
    visible = _visible(lvs)
    by_name = {lv.name: lv for lv in lvs}
    deps: dict[str, list[str]] = {}
    for o in visible:  # as dependants() has them
        if read := origin_name(o, by_name):
            deps.setdefault(read, []).append(o.name)
    out = []
    for lv in visible:
        if (name is not None and lv.name != name) or lv.is_thin_pool:
            continue
        mapped = exclusive = shared = None
        key = (lv.pool, lv.thin_id or 0)
        if usage is not None and lv.thin_id is not None and key in usage:
            mapped, exclusive, shared = usage[key]
        elif lv.data_percent is not None and lv.is_thin:
            mapped = int(lv.size * lv.data_percent / 100)
        outside = extorigin.recorded(lv)
        origin = by_name.get(lv.origin) or _in_vg(outside, lv.vg, by_name)
        hydration = (hydrations or {}).get(str(lv.ref))
        # A live import's device is thinstack's, not LVM's: up while it copies in.
        up = extorigin.active(lv) or (hydration is not None
                                      and hydration["state"] in ("hydrating", "hydrated"))
        out.append(VolumeInfo(
            vg=lv.vg, name=lv.name, size=lv.size, path=lv.path, dm_path=lv.dm_path,
            kind=_kind(lv, by_name.get(lv.origin)),
            origin=origin.name if origin is not None else outside[0] if outside else None,
            readonly=lv.readonly, gold=tags.GOLD in lv.tags,
            active=up, dependants=deps.get(lv.name, []), mapped_bytes=mapped,
            exclusive_bytes=exclusive, shared_bytes=shared, thin_id=lv.thin_id,
            pool=lv.pool or None, origin_pool=origin.pool or None if origin else None,
            hydration=hydration))
    return out


def _in_vg(outside: tuple[str, int] | None, vg: str, by_name: dict[str, LV]) -> LV | None:
    """The LV of this VG that a clone of a device reads (a gold master of another pool), by
    its recorded path; None for a device outside the VG."""
    if outside is None:
        return None
    folder, _, name = outside[0].rpartition("/")
    return by_name.get(name) if folder == f"/dev/{vg}" else None


# The byte keys of `list --sort`, biggest first; a volume whose usage is unknown comes last.
SORT_KEYS = {"size": "size", "mapped": "mapped_bytes", "exclusive": "exclusive_bytes"}


def sort_infos(infos: list[VolumeInfo], key: str) -> list[VolumeInfo]:
    """`list --sort KEY`: by name (VG/NAME), or biggest first by size, mapped or exclusive."""
    if key == "name":
        return sorted(infos, key=lambda i: (i.vg, i.name))
    def order(i: VolumeInfo) -> tuple[bool, int, str, str]:
        value = getattr(i, SORT_KEYS[key])
        return value is None, -(value or 0), i.vg, i.name

    return sorted(infos, key=order)
