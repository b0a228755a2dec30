"""Reading a pool: its status (`pool status`/`pool list`; JSON fields in docs/json.md), its one
mode (`pool_mode`) and whether an operation may change a pool in that mode (`refusal`), the check
of its metadata (`pool check`), and per-volume usage from its metadata (`list`, `info`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from thinstack import budget, growth, lvm, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import Failed, ThinPoolStatus
from thinstack.errors import Refused, ThinstackError
from thinstack.lock import vg_lock
from thinstack.lvm import LV
from thinstack.thinpool import kernel_pool, reading_metadata


@dataclass(frozen=True)
class PoolStatus:
    vg: str
    name: str
    path: str
    data_size: int
    data_used: int | None
    data_percent: float | None
    metadata_size: int
    metadata_percent: float | None
    mode: str
    when_full: str
    zeroing: bool
    chunk_size: int
    grow_threshold: float | None
    grow_step: int | None
    vg_size: int
    vg_free: int
    backing_file: str | None
    thin_count: int
    limit: int | None  # the data never grows past this (`--limit`); None: the VG's free space
    provisioned: int  # the sum of its volumes' sizes: what the pool has promised
    overcommit: float | None  # the budget's ratio (`--overcommit`); None: no budget
    budget: int | None  # the most it may promise: overcommit x limit (or x the VG's size)

    def to_json(self) -> dict:
        return asdict(self)


# The modes a pool shows, from the kernel's status: rw, out_of_data_space, ro (as dm-thin says),
# needs_check (the kernel's flag: its metadata must be checked and repaired before use; the pool
# is then read-only too), fail (the kernel stopped all I/O); inactive when it has no device.
RW, OUT_OF_DATA_SPACE, NEEDS_CHECK, FAIL, INACTIVE = (
    "rw", "out_of_data_space", "needs_check", "fail", "inactive")
# What may still change a pool out of data space: what frees space in it (growing it is `pool
# extend`, which is no operation of a VG's volumes). Every mode is `pool repair`'s to mend.
ALLOWED = {OUT_OF_DATA_SPACE: frozenset({"delete", "reclaim", "pool-extend"})}
REPAIRS = frozenset({"pool-repair"})
# Operations that make a new pool beside the VG's others and touch none of them: a full or
# broken tenant does not stop a new one.
BESIDE = frozenset({"pool-create"})


def pool_mode(kernel: ThinPoolStatus | Failed | None) -> str:
    """The one mode a pool shows, given the kernel's status (None: the pool is not active). The
    worst wins: a failed pool, then one flagged for checking (whatever its mode), then dm-thin's
    own mode."""
    if kernel is None:
        return INACTIVE
    if isinstance(kernel, Failed):
        return FAIL
    return NEEDS_CHECK if kernel.needs_check else kernel.mode.value


def refusal(ref: str, mode: str, kind: str) -> str | None:
    """Why operation `kind` may not change pool `ref` in `mode` (None: it may): one line naming
    the mode and what brings the pool back."""
    if mode in (RW, INACTIVE) or kind in REPAIRS | BESIDE or kind in ALLOWED.get(mode, ()):
        return None
    if mode == OUT_OF_DATA_SPACE:
        return (f"pool {ref} is {mode}: grow it (`thinstack pool extend {ref} SIZE`, or raise "
                f"its limit: `thinstack pool set {ref} --limit SIZE`) or delete volumes first")
    return f"pool {ref} is {mode}: repair it first (`thinstack pool repair {ref}`)"


def refuse_unless_writable(vg: str, lvs: list[LV], kind: str, at: str | None = None,
                           dm: DeviceMapper | None = None) -> None:
    """Refused when a pool the operation works in is in a mode that operation `kind` may not
    change it in; read through the kernel's status ioctl, not LVM. `at`: the LV the operation
    works in (a pool, or a volume in one), so that a full or broken pool stops only its own
    tenants' operations; an LV in no pool: none; None, or a name no LV has: every pool of the
    VG. A VG without a pool is the operation's own business."""
    pools = lvm.pools_of(lvs)
    named = next((lv for lv in lvs if lv.name == at), None) if at is not None else None
    if named is not None and named.is_thin_pool:
        pools = [named]
    elif named is not None and named.is_thin:
        pools = [p for p in pools if p.name == named.pool] or pools
    elif named is not None:  # an LV in no pool (a CoW volume, a plain LV): no pool's mode counts
        pools = []
    dm = dm or DeviceMapper(lvm.default_lvm().runner)
    for pool in pools:
        why = refusal(str(pool.ref), pool_mode(_kernel_status(pool, dm)), kind)
        if why:
            raise Refused(why)


def mode_of(pool: LV, dm: DeviceMapper | None = None) -> str:
    """The pool's one mode, read through the kernel's status ioctl."""
    return pool_mode(_kernel_status(pool, dm))


def pool_lv(vg: str, name: str | None = None) -> LV:
    """The VG's thin pool `name` (None: its only one); NotFound without the VG or the pool."""
    return lvm.pool_of(vg, lvm.volumes_of(vg), name)


def status(vg: str | None = None, name: str | None = None) -> list[PoolStatus]:
    """Pool `name` of `vg`, or every pool of `vg` (tagged, or the VG's only one), or every pool
    thinstack made: one `lvs` (its rows carry their VG's fields) and the kernel's status of
    each pool."""
    if vg is not None:
        lvs = lvm.volumes_of(vg)
        pools = [lvm.pool_of(vg, lvs, name)] if name is not None else lvm.pools_of(lvs)
        if not pools:
            lvm.pool_of(vg, lvs)  # raises why there is none
        return [pool_status(p, lvs, _kernel_status(p)) for p in pools]
    lvs = lvm.lvs()
    return [pool_status(lv, [o for o in lvs if o.vg == lv.vg], _kernel_status(lv)) for lv in lvs
            if lv.is_thin_pool and tags.POOL in lv.tags]


def pool_status(pool: LV, lvs: list[LV], kernel: ThinPoolStatus | Failed | None) -> PoolStatus:
    """The status of `pool` among its VG's `lvs`, given the kernel's thin-pool status (None
    when the pool is not active)."""
    policy = growth.settings(pool.tags)
    quota = budget.of(pool)
    used = data_pct = meta_pct = None
    when_full = pool.when_full or "queue"  # LVM's default when its profile sets nothing
    mode = pool_mode(kernel)
    if isinstance(kernel, ThinPoolStatus):
        used = kernel.used_data_blocks * pool.chunk_size
        data_pct = 100 * kernel.used_data_blocks / kernel.total_data_blocks
        meta_pct = 100 * kernel.used_metadata_blocks / kernel.total_metadata_blocks
        when_full = "error" if kernel.error_if_no_space else "queue"
    return PoolStatus(
        vg=pool.vg, name=pool.name, path=pool.dm_path, data_size=pool.size, data_used=used,
        data_percent=data_pct, metadata_size=pool.metadata_size, metadata_percent=meta_pct,
        mode=mode, when_full=when_full, zeroing=pool.attr[7] == "z", chunk_size=pool.chunk_size,
        grow_threshold=policy.threshold if policy.enabled else None,
        grow_step=(policy.step or growth.default_step(pool.size)) if policy.enabled else None,
        vg_size=pool.vg_size, vg_free=pool.vg_free,
        backing_file=tags.value(pool.vg_tags, tags.BACKING_FILE),
        thin_count=sum(1 for lv in lvs if lv.is_thin and lv.pool == pool.name),
        limit=quota.limit, provisioned=budget.provisioned(pool, lvs),
        overcommit=quota.overcommit, budget=budget.allowed(pool, quota))


def _kernel_status(pool: LV, dm: DeviceMapper | None = None) -> ThinPoolStatus | Failed | None:
    device = kernel_pool(pool, dm)
    if device is None:
        return None
    status = device.dm.target_status(device.name)
    if not isinstance(status, ThinPoolStatus | Failed):
        raise ThinstackError(f"{pool.ref}: {device.name} is not a thin-pool device")
    return status


def thin_id_problems(known: dict[str, int], found: set[int]) -> str | None:
    """What differs between the thin ids LVM knows (volume name -> id) and those the pool's
    metadata holds; None when they agree. A power cut between LVM's two commits (its VG
    metadata, the pool's transaction) can leave either kind behind."""
    lost = sorted(name for name, i in known.items() if i not in found)
    strays = sorted(found - set(known.values()))
    said = []
    if lost:
        said.append(f"it lost volumes, whose data is not in the pool's metadata: "
                    f"{', '.join(lost)}")
    if strays:
        said.append(f"it holds thin ids no volume has: {', '.join(map(str, strays))}")
    return "; ".join(said) or None


def known_thin_ids(pool: LV, lvs: list[LV]) -> dict[str, int]:
    return {lv.name: lv.thin_id for lv in lvs
            if lv.is_thin and lv.pool == pool.name and lv.thin_id is not None}


def check(vg: str, name: str | None = None, dm: DeviceMapper | None = None) -> str:
    """thin_check the pool's metadata, and compare its thin ids with LVM's, read through a
    metadata snapshot so the live pool is never touched, under the VG lock so no operation is
    halfway: one line when clean; ThinstackError when damaged."""
    with vg_lock(vg):
        lvs = lvm.volumes_of(vg)
        pool = lvm.pool_of(vg, lvs, name)
        device = kernel_pool(pool, dm)
        if device is None:
            raise Refused(f"{pool.ref} is not active: activate it (`thinstack pool attach {vg}`) "
                          "to check it")
        mode = pool_mode(_kernel_status(pool, device.dm))
        if mode == FAIL:
            detail = "the kernel failed the pool"
        elif mode not in (RW, OUT_OF_DATA_SPACE):  # the kernel lends no metadata snapshot then
            detail = f"the kernel has the pool {mode}"
        else:
            result = reading_metadata(pool, device.thin_check)
            if result.clean:
                found = {e.dev_id for e in reading_metadata(pool, device.thin_ls)}
                wrong = thin_id_problems(known_thin_ids(pool, lvs), found)
                if wrong is None:
                    return f"{pool.ref}: metadata clean"
                raise ThinstackError(f"{pool.ref}: metadata clean, but LVM and the pool "
                                     f"disagree: {wrong}")
            detail = (result.output.splitlines()[-1] if result.output
                      else "thin_check found errors")
    raise ThinstackError(f"{pool.ref}: metadata damaged ({detail}); repair it with "
                         f"`thinstack pool repair {pool.ref}`")


# (pool name, thin device id) -> (mapped, exclusive, shared) bytes: thin ids are per pool.
Usage = dict[tuple[str, int], tuple[int, int, int]]


def thin_usage(vg: str, lvs: list[LV] | None = None, dm: DeviceMapper | None = None
               ) -> Usage | None:
    """Every volume's usage, from thin_ls on a metadata snapshot of each pool among the VG's
    `lvs` (read if not given); None when no pool could be read: none active, or another reader
    holds the metadata snapshot (callers then fall back to LVM's coarser percentages)."""
    usage: Usage = {}
    read = False
    for pool in lvm.pools_of(lvm.volumes_of(vg) if lvs is None else lvs):
        device = kernel_pool(pool, dm)
        if device is None:
            continue
        try:
            entries = reading_metadata(pool, device.thin_ls)
        except Refused:
            continue
        read = True
        chunk = pool.chunk_size
        usage.update({(pool.name, e.dev_id): (e.mapped_blocks * chunk, e.exclusive_blocks * chunk,
                                              e.shared_blocks * chunk) for e in entries})
    return usage if read else None
