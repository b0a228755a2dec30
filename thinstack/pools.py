"""Thin pools: creating one (on whole disks, an md raid1 of two disks, a sparse file on a loop
device, or in the free extents of an existing VG), rolling back a creation that did not finish,
and growing a pool's data.

A pool is an LV of its VG (`pool` unless named), tagged `ts_pool`, with its growth policy in two
more tags (`ts_grow_threshold=PCT`, `ts_grow_step=BYTES`) that the monitor reads, and its quota
and budget in two others (`ts_limit=BYTES`, `ts_overcommit=R`; budget.py). A VG may hold several
pools, each a tenant growing from the VG's shared free extents up to its limit. A file-backed VG
carries `ts_file=PATH`, and the file is also in backing.py's registry.

Creation is journalled (each resource before it is made, its identity once it exists) and the VG
carries the operation's tag until the commit; `rollback_plan` undoes only what is still what it
made, and adopts a VG that has become someone's (`foreign`). A pool made in an existing VG is
the only thing such a creation makes: it carries the operation's tag, and only it is rolled back.

`pool status`, `pool check` and usage: poolstatus.py; `pool attach`: attach.py; the backing file
and its loop device: backing.py; the kernel's side of a pool: thinpool.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinstack import backing, budget, faults, growth, lvm, poolstatus, provision, tags
from thinstack.attach import attach
from thinstack.errors import Exists, NoSpace, NotFound, Refused, ThinstackError
from thinstack.journal import Entry, Step, StepKind, last_target, parse_steps
from thinstack.lock import vg_lock
from thinstack.lvm import LV, Lvm, default_lvm
from thinstack.operation import Op, operation
from thinstack.poolstatus import PoolStatus, check, status, thin_usage
from thinstack.recovery import Action, Undo
from thinstack.sizes import format_size, round_down, round_up

# What the CLI calls by these names.
__all__ = ["attach", "check", "create", "extend", "set_pool", "status", "thin_usage"]

POOL_LV = "pool"
DEFAULT_CHUNK = 64 << 10
DEFAULT_GROW_STEP = 256 << 20

# dm-thin's limits on the data block size: 64 KiB to 1 GiB, in multiples of 64 KiB.
MIN_CHUNK, MAX_CHUNK = 64 << 10, 1 << 30
# Metadata: LVM's estimate is 64 bytes per data chunk; snapshots and clones that diverge map the
# same chunks again, so twice that, and never less than 4 MiB (nor more than the kernel can use).
METADATA_PER_CHUNK = 2 * growth.MAPPING_BYTES
MIN_METADATA = 4 << 20
MD_NAME_MAX = 32  # mdadm keeps "host:name" in 32 bytes; the host part may be dropped


# --- decisions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    data: int
    metadata: int


def metadata_size(vg_size: int, chunk: int, extent: int) -> int:
    """Metadata sized for the whole VG, since the pool's data grows into all of it."""
    wanted = max(MIN_METADATA, METADATA_PER_CHUNK * (vg_size // chunk))
    return min(round_up(wanted, extent), round_down(growth.METADATA_MAX, extent))


def plan_sizes(vg_size: int, vg_free: int, extent: int, chunk: int,
               data: int | None = None, limit: int | None = None) -> Sizes:
    """The pool's data and metadata sizes. Besides the metadata the VG keeps as much again for
    LVM's spare metadata LV (pmspare, used by repairs) and as much again for the metadata to
    grow; the default data size is everything else, up to the pool's `limit`, for which alone
    its metadata is sized then (the pool never grows past it)."""
    meta = metadata_size(vg_size if limit is None else min(vg_size, limit), chunk, extent)
    overhead = 2 * meta  # the metadata and its spare, allocated now
    if data is None:
        data = round_down(vg_free - overhead - meta, extent)
        if limit is not None:
            data = min(data, round_down(limit, extent))
        if data < chunk:
            raise NoSpace(f"the volume group ({format_size(vg_free)} free) is too small for a "
                          f"thin pool with {format_size(meta)} of metadata and its spare")
        return Sizes(data, meta)
    data = round_up(data, extent)
    if limit is not None and data > limit:  # a --size within an extent of the --limit
        data = round_down(limit, extent)
    if data + overhead > vg_free:
        raise NoSpace(f"a pool of {format_size(data)} needs {format_size(data + overhead)} with "
                      f"its metadata and spare; the volume group has {format_size(vg_free)} free")
    return Sizes(data, meta)


def md_name(vg: str) -> str:
    return f"ts-{vg}"


def check_create_args(vg: str, devices: list[str], file: Path | None, raid1: bool,
                      size: int | None, chunk: int, grow_threshold: float,
                      grow_step: int, name: str = POOL_LV, limit: int | None = None,
                      overcommit: float | None = None) -> None:
    """Every reason to refuse `pool create` that needs no look at the system."""
    lvm.check_name(vg, "volume group name")
    lvm.check_user_name(name, "pool name")
    check_budget(limit, overcommit)
    if limit is not None and size is not None and file is None and size > limit:
        raise ThinstackError(f"--size {format_size(size)} is over --limit {format_size(limit)}")
    if file is not None and devices:
        raise ThinstackError("give either devices or --file, not both")
    if file is not None:
        if raid1:
            raise ThinstackError("--raid1 mirrors two devices; it does not apply to --file")
        if size is None:
            raise ThinstackError("--file needs --size: the size of the sparse file to create")
        try:
            tags.kv(tags.BACKING_FILE, file)
        except ValueError:
            raise ThinstackError(f"{file}: a backing file's path may only contain letters, "
                                 "digits and _+.-/=!:&# (it is kept in an LVM tag)") from None
    if raid1 and not devices:
        raise ThinstackError("--raid1 mirrors two devices: give them")
    if len(set(map(os.path.realpath, devices))) != len(devices):
        raise ThinstackError("a device is named twice")
    if raid1 and len(devices) != 2:
        raise ThinstackError(f"--raid1 mirrors exactly two devices, not {len(devices)}")
    if raid1 and len(md_name(vg)) > MD_NAME_MAX:
        raise ThinstackError(f"volume group name {vg!r} is too long for --raid1: its md array "
                             f"{md_name(vg)!r} must fit in {MD_NAME_MAX} characters")
    if size is not None and size <= 0:
        raise ThinstackError("--size must be positive")
    if not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk % MIN_CHUNK == 0):
        raise ThinstackError(f"--chunk {format_size(chunk)}: a thin pool's chunk is a multiple "
                             "of 64KiB between 64KiB and 1GiB")
    if not 0 < grow_threshold < 100:
        raise ThinstackError(f"--grow-threshold {grow_threshold:g}: a percentage between 0 and 100")
    if grow_step <= 0:
        raise ThinstackError("--grow-step must be positive")


def check_budget(limit: int | None, overcommit: float | None) -> None:
    if limit is not None and limit <= 0:
        raise ThinstackError("--limit must be positive")
    if overcommit is not None and not (0 < overcommit < 1e6):
        raise ThinstackError(f"--overcommit {overcommit:g}: a positive ratio (1 promises no "
                             "more than the limit, 2 twice that)")


def pool_tags(grow_threshold: float, grow_step: int, limit: int | None = None,
              overcommit: float | None = None) -> list[str]:
    return [tags.POOL, tags.kv(tags.GROW_THRESHOLD, f"{grow_threshold:g}"),
            tags.kv(tags.GROW_STEP, grow_step), *budget_tags(limit, overcommit)]


def budget_tags(limit: int | None, overcommit: float | None) -> list[str]:
    return [*([tags.kv(tags.LIMIT, limit)] if limit is not None else []),
            *([tags.kv(tags.OVERCOMMIT, f"{overcommit:g}")] if overcommit is not None else [])]


@dataclass(frozen=True)
class Rollback:
    actions: list[Action]
    kept: str | None = None  # why the VG is left as it is: the creation is adopted


# How each resource a creation records is undone (the steps that record its identity, or the
# commit, have no undo).
_UNDO_OF = {StepKind.REGISTRY: Undo.UNREGISTER, StepKind.POOL: Undo.REMOVE,
            StepKind.VG: Undo.REMOVE_VG, StepKind.PV: Undo.WIPE_PV, StepKind.MD: Undo.STOP_MD,
            StepKind.MD_MEMBER: Undo.ZERO_MD, StepKind.LOOP: Undo.DETACH_LOOP,
            StepKind.FILE: Undo.REMOVE_FILE}


def foreign(steps: list[str], tag: str, vg: lvm.VG, lvs: Sequence[LV]) -> str | None:
    """Why the existing VG `vg` (with its visible volumes `lvs`) is not, or no longer only, what
    the creation that recorded `steps` made; None when it is. The creation tags the VG right
    after making it and then records its uuid: a VG without the tag is its own only if it was
    killed in between and the VG is still empty."""
    uuid = last_target(steps, StepKind.VG_UUID)
    pool_name = _made_pool(steps)
    if str(Step(StepKind.VG, vg.name)) not in steps:
        return f"{vg.name} was made by someone else while the creation had not yet made it"
    if uuid is not None and vg.uuid != uuid:
        return f"{vg.name} is another volume group now (uuid {vg.uuid}, not {uuid})"
    if tag not in vg.tags and (uuid is not None or lvs):
        return f"{vg.name} no longer carries the creation's tag {tag}"
    pool_uuid = last_target(steps, StepKind.POOL_UUID)
    others = [lv.name for lv in lvs if not (
        pool_name is not None and lv.name == pool_name and lv.is_thin_pool
        and pool_uuid in (None, lv.uuid))]
    if others:
        return f"{vg.name} holds volumes the creation did not make ({', '.join(sorted(others))})"
    return None


def _made_pool(steps: list[str]) -> str | None:
    """The name of the pool a creation journalled making (`pool:VG/NAME`), if it got that far."""
    made = last_target(steps, StepKind.POOL)
    return made.partition("/")[2] if made else None


def rollback_plan(steps: list[str], tag: str = "", vg: lvm.VG | None = None,
                  lvs: Sequence[LV] = ()) -> Rollback:
    """What undoes a creation that recorded `steps` (each before its resource was made), given
    the VG of its name as it is now (`vg`, or None) and its visible volumes: the reverse order,
    so each resource goes before what it was built on, each undo checking that its target is
    still what the creation made. A committed creation is kept whole, and so is one whose VG is
    now someone's (see `foreign`): it only loses the creation's tag."""
    if str(Step(StepKind.COMMITTED)) in steps:
        return Rollback([])
    if vg is not None:
        why = foreign(steps, tag, vg, lvs)
        if why:
            return Rollback([Action(Undo.DELTAG, vg.name, tag)] if tag in vg.tags else [], why)
    pool = next((lv for lv in lvs if lv.name == _made_pool(steps)), None)
    # What each undo checks that its target still is; unknown: the target is left alone. LVM
    # selects the pool by uuid and the VG by uuid and emptiness, under its lock. A file is known
    # by its identity, not its name: in a folder others can write, the name may have been given
    # to another file.
    file_id = last_target(steps, StepKind.FILE_ID)
    checks = {StepKind.POOL: f"lv_uuid={pool.uuid}" if pool else None,
              StepKind.VG: f"vg_uuid={vg.uuid} && lv_count=0" if vg else None,
              StepKind.LOOP: file_id, StepKind.FILE: file_id,
              StepKind.MD_MEMBER: last_target(steps, StepKind.MD)}
    actions = []
    for step in reversed(parse_steps(steps)):
        check = checks.get(step.kind, "")
        if step.kind in _UNDO_OF and check is not None:
            actions.append(Action(_UNDO_OF[step.kind], step.target, check))
    return Rollback(actions)


def creation_steps(vg: str, pvs: list[str], md_members: list[str], file: Path | None) -> list[str]:
    """The steps recorded before blivet writes the PVs and the VG (in the order it makes them).
    A loop device's PV goes with its file, and its name may differ after a reboot, so it is not
    recorded."""
    steps = [Step(StepKind.MD_MEMBER, d) for d in md_members]
    if md_members:
        steps.append(Step(StepKind.MD, md_name(vg)))
    if file is None:
        steps += [Step(StepKind.PV, pv) for pv in pvs]
    return [str(s) for s in [*steps, Step(StepKind.VG, vg)]]


# --- pool create -------------------------------------------------------------------------------

def create(vg: str, *, devices: Sequence[str] = (), file: Path | None = None, raid1: bool = False,
           size: int | None = None, chunk: int = DEFAULT_CHUNK,
           grow_threshold: float = growth.DEFAULT_THRESHOLD,
           grow_step: int = DEFAULT_GROW_STEP, name: str = POOL_LV, limit: int | None = None,
           overcommit: float | None = None) -> PoolStatus:
    """A new VG on `devices` (or on a new sparse file of `size` bytes) and a thin pool `name`
    in it; with neither, a pool in the free extents of the existing VG `vg` (which may hold
    other pools: tenants). The pool's data is `size` bytes on devices or in a VG, and by default
    most of the (free space of the) VG, up to `limit`, past which it never grows."""
    devices = list(devices)
    file = Path(os.path.abspath(file)) if file is not None else None
    check_create_args(vg, devices, file, raid1, size, chunk, grow_threshold, grow_step, name,
                      limit, overcommit)
    provision.require_thin_pool(default_lvm().runner)  # before anything is made
    tag_list = pool_tags(grow_threshold, grow_step, limit, overcommit)
    if not devices and file is None:
        _create_in_vg(vg, name, size, limit, chunk, tag_list)
        return status(vg, name)[0]
    reuse = False

    def checked(lvs: list[LV]) -> dict:
        nonlocal reuse
        if lvm.vgs(vg):
            raise Exists(f"volume group {vg} already exists")
        reuse = file is not None and backing.check_new_file(vg, file, default_lvm().runner)
        return dict(devices=devices, file=str(file or ""), raid1=raid1, size=size, chunk=chunk,
                    pool=name, limit=limit)

    with operation("pool-create", vg, checked, new_vg=True) as op:
        _create(op, devices, file, raid1, size, chunk, tag_list, reuse)
    return status(vg, name)[0]


def _create(op: Op, devices: list[str], file: Path | None, raid1: bool, size: int | None,
            chunk: int, pool_tag_list: list[str], reuse: bool = False) -> None:
    name, limit = op.entry.args.get("pool", POOL_LV), op.entry.args.get("limit")
    vg, entry = op.entry.vg, op.entry
    if file is not None:
        assert size is not None  # check_create_args: --file needs --size
        op.step(Step(StepKind.FILE, str(file)))
        op.step(Step(StepKind.FILE_ID, backing.make_sparse_file(file, size, reuse)))
        op.step(Step(StepKind.LOOP, str(file)))
        devices = [backing.attach_loop(file, default_lvm().runner)]
    prepared = provision.prepare_vg(vg, devices, md_name=md_name(vg) if raid1 else None)
    for step in creation_steps(vg, prepared.pvs, devices if raid1 else [], file):
        op.step(step)
    prepared.create()
    # The VG is the creation's until the commit, and a rollback checks it still is: by this tag,
    # and by its uuid.
    file_tag = ["--addtag", tags.kv(tags.BACKING_FILE, file)] if file is not None else []
    lvm.lvm("vgchange", "-q", "--addtag", entry.tag, *file_tag, vg)
    info = lvm.vgs(vg)[0]
    op.step(Step(StepKind.VG_UUID, info.uuid))
    if file is not None:
        op.step(Step(StepKind.REGISTRY, vg))
        backing.register(vg, file)
    faults.point("pool-create", "after-vg")

    sizes = plan_sizes(info.size, info.free, info.extent_size, chunk,
                       size if file is None else None, limit)
    op.step(Step(StepKind.POOL, f"{vg}/{name}"))
    _lvcreate_pool(vg, name, sizes, chunk, pool_tag_list)
    op.step(Step(StepKind.POOL_UUID, lvm.lv(lvm.VolumeRef(vg, name)).uuid))
    faults.point("pool-create", "after-pool")
    lvm.lvm("vgchange", "-q", "--deltag", entry.tag, vg)
    op.commit()


def _lvcreate_pool(vg: str, name: str, sizes: Sizes, chunk: int, tag_list: list[str]) -> None:
    # -Zy: a chunk is zeroed when first provisioned, so a partial write never exposes what the
    # disk held before (old data of deleted volumes, or of whoever owned the disk).
    lvm.lvm("lvcreate", "-q", "-y", "--type", "thin-pool", "-L", f"{sizes.data}b",
            "--chunksize", f"{chunk}b", "--poolmetadatasize", f"{sizes.metadata}b", "-Zy",
            *[a for t in tag_list for a in ("--addtag", t)], "-n", name,
            "--config", growth.arming(frozenset(tag_list)), vg)


def _create_in_vg(vg: str, name: str, size: int | None, limit: int | None, chunk: int,
                  pool_tag_list: list[str]) -> None:
    """The pool in the free extents of an existing VG: one of LVM's that is not thinstack's
    (its other LVs and its PVs are never touched), or thinstack's own, as one more tenant. Until
    the commit the pool carries the operation's tag, so a rollback (recovery's rule for tagged
    volumes) removes the pool and nothing else."""
    def checked(lvs: list[LV]) -> dict:
        if any(lv.name == name for lv in lvs):
            raise Exists(f"volume group {vg} already has a volume named {name}")
        # Sized on what is free: the pool may only ever grow into that. NoSpace before anything
        # is journalled.
        found = lvm.vgs(vg)
        if not found:
            raise NotFound(f"volume group {vg} not found")
        info = found[0]
        sizes = plan_sizes(info.free, info.free, info.extent_size, chunk, size, limit)
        return dict(existing_vg=True, pool=name, data=sizes.data, metadata=sizes.metadata,
                    chunk=chunk)

    with operation("pool-create", vg, checked, at=name) as op:
        sizes = Sizes(op.entry.args["data"], op.entry.args["metadata"])
        op.step(Step(StepKind.POOL, f"{vg}/{name}"))
        _lvcreate_pool(vg, name, sizes, chunk, [*pool_tag_list, op.entry.tag])
        faults.point("pool-create", "after-pool")
        op.commit(lvm.VolumeRef(vg, name))


# --- rollback ----------------------------------------------------------------------------------

def rollback(entry: Entry, lvm: Lvm) -> list[Action]:
    """recovery.PLANNERS["pool-create"]: what rolls back an uncommitted creation; nothing but its
    tag when its VG has become someone's (said on stderr: the creation is adopted). A pool made
    in an existing VG is undone by recovery's own rule: it still carries the operation's tag."""
    if entry.args.get("existing_vg"):
        return []
    found = lvm.vgs(entry.vg)
    vg = found[0] if found else None
    plan = rollback_plan(entry.steps, entry.tag, vg, lvm.lvs(entry.vg) if vg else [])
    if plan.kept:
        print(f"thinstack: pool create of {entry.vg} (journal entry {entry.id}) was interrupted; "
              f"{plan.kept}, so it is kept as it is", file=sys.stderr, flush=True)
    return plan.actions


# --- extend ------------------------------------------------------------------------------------

def extend(vg: str, size: int, name: str | None = None) -> PoolStatus:
    """Grow pool `name`'s data by `size` bytes (never past its limit)."""
    if size <= 0:
        raise ThinstackError("the size to add must be positive")
    with vg_lock(vg):
        lvs = lvm.volumes_of(vg)
        pool = lvm.pool_of(vg, lvs, name)
        poolstatus.refuse_unless_writable(vg, lvs, "pool-extend", pool.name)
        limit = budget.of(pool).limit
        grown = round_up(pool.size + size, pool.vg_extent_size or 1)  # LVM's whole extents
        if limit is not None and grown > limit:
            raise NoSpace(f"{pool.ref} would grow to {format_size(grown)}, past its "
                          f"limit {format_size(limit)}: raise it first (`thinstack pool set "
                          f"{pool.ref} --limit SIZE`)")
        free = lvm.vgs(vg)[0].free
        if size > free:
            raise NoSpace(f"volume group {vg} has {format_size(free)} free, less than "
                          f"{format_size(size)}: add a device to it first")
        lvm.lvm("lvextend", "-q", "-L", f"+{size}b", "--config", growth.arming(pool.tags),
                str(pool.ref))
    return status(vg, pool.name)[0]


# Leave a setting as it is (`pool set` changes only what it is given); None removes it.
KEEP = object()


def set_pool(vg: str, name: str | None, *, limit: Any = KEEP, overcommit: Any = KEEP
             ) -> PoolStatus:
    """`pool set VG/POOL`: change the pool's limit and budget, in one LVM command (the tags go
    and come together), then apply the limit at once: the pool grows toward a raised limit and
    leaves error mode if it had room again, or turns to error mode at a lowered one; it never
    shrinks. A budget already exceeded blocks only what would add to it."""
    with vg_lock(vg):
        lvs = lvm.volumes_of(vg)
        pool = lvm.pool_of(vg, lvs, name)
        old = budget.of(pool)
        new_limit = old.limit if limit is KEEP else limit
        new_overcommit = old.overcommit if overcommit is KEEP else overcommit
        check_budget(new_limit, new_overcommit)
        if new_limit is not None and new_limit < pool.size:
            raise Refused(f"{pool.ref} is {format_size(pool.size)} already; a pool cannot "
                          f"shrink, so its limit cannot be less")
        old_tags = {t for t in pool.tags if t.startswith((tags.LIMIT + "=",
                                                            tags.OVERCOMMIT + "="))}
        new_tags = set(budget_tags(new_limit, new_overcommit))
        # Only what changes: LVM adds before it deletes, so a tag both deleted and added in
        # one command would be lost.
        if old_tags != new_tags:
            lvm.lvm("lvchange", "-q", *[a for t in sorted(old_tags - new_tags)
                                        for a in ("--deltag", t)],
                    *[a for t in sorted(new_tags - old_tags) for a in ("--addtag", t)],
                    str(pool.ref))
    from thinstack import monitor  # a pass over this pool now, not at the service's next one

    monitor.apply(lvm.pool_of(vg, lvm.volumes_of(vg), pool.name))
    return status(vg, pool.name)[0]
