"""Reading a pool: its status (`pool status`/`pool list`; JSON fields in docs/json.md), the check
of its metadata (`pool check`), and per-volume usage from its metadata (`list`, `info`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from thinstack import growth, lvm, tags
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import Failed, ThinPoolStatus
from thinstack.errors import NotFound, Refused, ThinstackError
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

    def to_json(self) -> dict:
        return asdict(self)


def pool_lv(vg: str) -> LV:
    """The VG's thin pool; NotFound without the VG or a pool in it."""
    return lvm.pool_of(vg, lvm.volumes_of(vg))


def status(vg: str | None = None) -> list[PoolStatus]:
    """The pool of `vg` (tagged, or the VG's only one), or every pool thinstack made: one `lvs`
    (its rows carry their VG's fields) and the kernel's status of each pool."""
    if vg is not None:
        lvs = lvm.volumes_of(vg)
        pool = lvm.pool_of(vg, lvs)
        return [pool_status(pool, lvs, _kernel_status(pool))]
    lvs = lvm.lvs()
    return [pool_status(lv, [o for o in lvs if o.vg == lv.vg], _kernel_status(lv)) for lv in lvs
            if lv.is_thin_pool and tags.POOL in lv.tags]


def pool_status(pool: LV, lvs: list[LV], kernel: ThinPoolStatus | Failed | None) -> PoolStatus:
    """The status of `pool` among its VG's `lvs`, given the kernel's thin-pool status (None
    when the pool is not active)."""
    policy = growth.settings(pool.tags)
    used = data_pct = meta_pct = None
    when_full = pool.when_full or "queue"  # LVM's default when its profile sets nothing
    if kernel is None:
        mode = "inactive"
    elif isinstance(kernel, Failed):
        mode = "failed"
    else:
        mode = kernel.mode.value
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
        thin_count=sum(1 for lv in lvs if lv.is_thin and lv.pool == pool.name))


def _kernel_status(pool: LV) -> ThinPoolStatus | Failed | None:
    device = kernel_pool(pool)
    if device is None:
        return None
    status = device.dm.target_status(device.name)
    if not isinstance(status, ThinPoolStatus | Failed):
        raise ThinstackError(f"{pool.ref}: {device.name} is not a thin-pool device")
    return status


def check(vg: str, dm: DeviceMapper | None = None) -> str:
    """thin_check the pool's metadata, read through a metadata snapshot so the live pool is never
    touched: one line when clean; ThinstackError when damaged."""
    pool = pool_lv(vg)
    device = kernel_pool(pool, dm)
    if device is None:
        raise Refused(f"{pool.ref} is not active: activate it (`thinstack pool attach {vg}`) "
                      "to check it")
    if isinstance(device.dm.target_status(device.name), Failed):
        detail = "the kernel failed the pool"
    else:
        result = reading_metadata(pool, device.thin_check)
        if result.clean:
            return f"{pool.ref}: metadata clean"
        detail = result.output.splitlines()[-1] if result.output else "thin_check found errors"
    raise ThinstackError(f"{pool.ref}: metadata damaged ({detail}); deactivate the pool and "
                         f"repair it with `lvconvert --repair {pool.ref}`")


def thin_usage(vg: str, lvs: list[LV] | None = None, dm: DeviceMapper | None = None
               ) -> dict[int, tuple[int, int, int]] | None:
    """thin device id -> (mapped, exclusive, shared) bytes, from thin_ls on a metadata snapshot
    of the pool among the VG's `lvs` (read if not given); None when the VG has no active pool,
    or another reader holds the metadata snapshot (callers then fall back to LVM's coarser
    percentages)."""
    try:
        pool = lvm.pool_of(vg, lvm.volumes_of(vg) if lvs is None else lvs)
    except NotFound:
        return None
    device = kernel_pool(pool, dm)
    if device is None:
        return None
    try:
        entries = reading_metadata(pool, device.thin_ls)
    except Refused:
        return None
    chunk = pool.chunk_size
    return {e.dev_id: (e.mapped_blocks * chunk, e.exclusive_blocks * chunk,
                       e.shared_blocks * chunk) for e in entries}
