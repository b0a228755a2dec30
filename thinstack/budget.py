"""A pool's quota and budget, kept in its tags: `--limit` (its data never grows past it) and
`--overcommit R` (its volumes' sizes may add up to R times the limit; without a limit, R times
the VG's size). Pure decisions on what LVM reports; growth.plan_pool enforces the limit, the
operations that add provisioned size ask `refusal` first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from thinstack import tags
from thinstack.errors import NoSpace
from thinstack.lvm import LV
from thinstack.sizes import format_size, round_up


@dataclass(frozen=True)
class Budget:
    limit: int | None  # bytes of data; None: the VG's free extents are the bound
    overcommit: float | None  # None: no budget on what is promised


def of(pool: LV) -> Budget:
    """The pool's quota and budget. A malformed tag counts as absent: the operator sees it in
    `pool status` (limit null) rather than a pool no command can use."""
    return Budget(_positive(tags.value(pool.tags, tags.LIMIT), int),
                  _positive(tags.value(pool.tags, tags.OVERCOMMIT), float))


def _positive(text: str | None, kind):
    try:
        value = kind(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < math.inf else None


def provisioned(pool: LV, lvs: list[LV]) -> int:
    """What the pool has promised: the virtual sizes of its thin volumes. The read-only bases
    thinstack keeps for incremental exports promise nothing (they never take a write)."""
    return sum(lv.size for lv in lvs if lv.is_thin and lv.pool == pool.name
               and tags.LAST_EXPORT not in lv.tags and ".export-" not in lv.name)


def allowed(pool: LV, budget: Budget) -> int | None:
    """The most the pool may promise; None: no budget."""
    if budget.overcommit is None:
        return None
    return int(budget.overcommit * (budget.limit if budget.limit is not None else pool.vg_size))


def refusal(pool: LV, lvs: list[LV], adding: int, what: str) -> str | None:
    """Why `what` may not add `adding` bytes (as LVM will round them) to what the pool has
    promised; None when it may."""
    most = allowed(pool, of(pool))
    if most is None or adding <= 0:
        return None
    adding = round_up(adding, pool.vg_extent_size or 1)
    now = provisioned(pool, lvs)
    if now + adding <= most:
        return None
    b = of(pool)
    base = (f"its limit {format_size(b.limit)}" if b.limit is not None
            else f"the volume group's {format_size(pool.vg_size)}")
    return (f"{what} would promise {format_size(now + adding)} in pool {pool.ref}, over its "
            f"budget of {format_size(most)} ({b.overcommit:g} x {base}); "
            f"{format_size(max(0, most - now))} is left")


def refuse(pool: LV, lvs: list[LV], adding: int, what: str) -> None:
    why = refusal(pool, lvs, adding, what)
    if why:
        raise NoSpace(why)
