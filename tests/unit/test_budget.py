"""A pool's quota and budget (budget.py), decided on LVM's report alone: the tags read back,
what a pool has promised, the most it may promise, and the refusal at the boundary."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.test_pools import EXTENT, GiB, MiB, lv
from thinstack import budget
from thinstack.budget import Budget
from thinstack.errors import NoSpace

VG_SIZE = 10 * GiB


def pool(name="a", *tags):
    """A pool as `lvs` reports it: tagged thinstack's, with its VG's size and extent."""
    return dataclasses.replace(lv(name, tags=("ts_pool", *tags)), vg_size=VG_SIZE,
                               vg_extent_size=EXTENT)


def thin(name, in_pool="a", size=GiB, tags=(), attr="Vwi-a-tz--"):
    return dataclasses.replace(lv(name, attr=attr, pool=in_pool, tags=tags, size=size),
                               segtype="thin", thin_id=1)


def test_the_limit_and_ratio_are_read_from_the_pools_tags():
    assert budget.of(pool("a", "ts_limit=1073741824", "ts_overcommit=1.5")) == \
        Budget(GiB, 1.5)
    assert budget.of(pool()) == Budget(None, None)


@pytest.mark.parametrize("tag", [
    "ts_limit=abc", "ts_limit=0", "ts_limit=-4096", "ts_limit=1.5", "ts_limit=1G", "ts_limit=",
    "ts_overcommit=x", "ts_overcommit=0", "ts_overcommit=-2", "ts_overcommit=nan",
])
def test_a_malformed_tag_counts_as_absent(tag):
    """Not an error: `pool status` shows the pool without it (null), and every command still
    works on the pool."""
    assert budget.of(pool("a", tag)) == Budget(None, None)


def test_an_infinite_ratio_counts_as_absent():
    """Kept, it would make the budget int(inf): an OverflowError where a number is due."""
    p = pool("a", "ts_overcommit=inf")
    assert budget.of(p) == Budget(None, None) and budget.allowed(p, budget.of(p)) is None


def test_what_a_pool_promised_is_its_thin_volumes_sizes():
    lvs = [pool("a"), pool("b"), thin("vm", size=GiB), thin("snap", size=GiB),
           thin("gold", size=2 * GiB, attr="Vri-a-tz--"),
           thin("other", "b", size=5 * GiB),  # another tenant's
           dataclasses.replace(lv("data", attr="-wi-a-----", tags=(), size=3 * GiB),
                               segtype="linear"),  # no thin volume
           # The bases of incremental exports never take a write: they promise nothing.
           thin("vm.last-export", tags={"ts_last_export"}, attr="Vri---tz-k"),
           thin("vm.export-abc", tags={"ts_op_abc"}, attr="Vri-a-tz-k")]
    assert budget.provisioned(lvs[0], lvs) == 4 * GiB
    assert budget.provisioned(lvs[1], lvs) == 5 * GiB
    assert budget.provisioned(pool("c"), lvs) == 0


def test_the_most_a_pool_may_promise():
    assert budget.allowed(pool(), Budget(None, None)) is None  # no budget
    assert budget.allowed(pool(), Budget(GiB, None)) is None  # a limit alone is no budget
    assert budget.allowed(pool(), Budget(4 * GiB, 1.5)) == 6 * GiB
    assert budget.allowed(pool(), Budget(None, 2.0)) == 2 * VG_SIZE  # without a limit: the VG


BUDGETED = pool("a", "ts_limit=1073741824", "ts_overcommit=2")  # may promise 2 GiB


def test_a_volume_that_fills_the_budget_exactly_is_allowed_one_byte_more_is_not():
    lvs = [BUDGETED, thin("vm", size=GiB)]
    assert budget.refusal(BUDGETED, lvs, GiB, "creating vg0/new") is None
    # LVM rounds a size up to whole extents: one byte over is an extent over.
    why = budget.refusal(BUDGETED, lvs, GiB + 1, "creating vg0/new")
    assert why == ("creating vg0/new would promise 2.004GiB in pool vg0/a, over its budget of "
                   "2GiB (2 x its limit 1GiB); 1GiB is left")


def test_just_under_the_budget_is_refused_when_lvm_would_round_it_over():
    lvs = [BUDGETED, thin("vm", size=2 * GiB - 2 * MiB)]  # 2 MiB left: half an extent
    assert budget.refusal(BUDGETED, lvs, 2 * MiB, "growing vg0/vm") is not None
    assert budget.refusal(BUDGETED, lvs, MiB, "growing vg0/vm") is not None
    lvs = [BUDGETED, thin("vm", size=2 * GiB - EXTENT)]  # one extent left
    assert budget.refusal(BUDGETED, lvs, EXTENT - 1, "growing vg0/vm") is None  # rounds to it
    assert budget.refusal(BUDGETED, lvs, EXTENT, "growing vg0/vm") is None
    assert budget.refusal(BUDGETED, lvs, EXTENT + 1, "growing vg0/vm") is not None


def test_without_a_budget_or_adding_nothing_nothing_is_refused():
    unbudgeted = pool("a", "ts_limit=1073741824")
    assert budget.refusal(unbudgeted, [thin("vm", size=100 * GiB)], GiB, "x") is None
    over = [BUDGETED, thin("vm", size=3 * GiB)]  # over already (the ratio was lowered since)
    assert budget.refusal(BUDGETED, over, 0, "shrinking") is None
    assert budget.refusal(BUDGETED, over, -GiB, "shrinking") is None
    assert budget.refusal(BUDGETED, over, 1, "x").endswith("; 0B is left")


def test_a_budget_without_a_limit_is_a_share_of_the_vg():
    p = pool("a", "ts_overcommit=0.5")  # may promise 5 GiB
    assert budget.refusal(p, [p], 5 * GiB, "x") is None
    assert "the volume group's 10GiB" in budget.refusal(p, [p], 5 * GiB + 1, "x")


def test_refuse_raises_no_space_exit_status_6():
    budget.refuse(BUDGETED, [BUDGETED], GiB, "creating vg0/new")  # fits: no error
    with pytest.raises(NoSpace, match=r"^creating vg0/new would promise .* in pool vg0/a") as e:
        budget.refuse(BUDGETED, [BUDGETED], 3 * GiB, "creating vg0/new")
    assert e.value.exit_status == 6
