"""Several pools (tenants) in one VG, decided without a kernel: naming a pool (VG/POOL), finding
a VG's pools and a volume's, the limit in the growth plan, refusals that stop only the pool an
operation works in, a new pool's sizes under its limit, and `pool set` on the command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fakes import FakeLvm, FakeRunner
from tests.unit.test_growth import plan
from tests.unit.test_growth import pool as view
from tests.unit.test_pools import CHUNK, EXTENT, TAG, GiB, MiB, TiB, args, kernel, lv, ours, vg
from tests.unit.test_poolstatus import in_vg, status_line
from thinstack import cli, lvm, pools, poolstatus, volumes
from thinstack.dm.client import DeviceMapper
from thinstack.errors import NoSpace, NotFound, Refused, ThinstackError, Usage
from thinstack.growth import PoolPlan, Settings
from thinstack.journal import Journal
from thinstack.lvm import BadName, PoolRef, VolumeRef
from thinstack.recovery import Action, Undo

A, B = lv("a"), lv("b")


def thin(name, in_pool="a"):
    return dataclasses.replace(lv(name, attr="Vwi-a-tz--", pool=in_pool, tags=()),
                               segtype="thin", thin_id=1)


def linear(name):
    return dataclasses.replace(lv(name, attr="-wi-a-----", tags=()), segtype="linear")


# --- naming and finding pools ------------------------------------------------------------------

def test_a_pool_is_named_vg_or_vg_slash_pool():
    assert PoolRef.parse("vg0") == PoolRef("vg0", None) and str(PoolRef.parse("vg0")) == "vg0"
    assert PoolRef.parse("vg0/t1") == PoolRef("vg0", "t1")
    assert str(PoolRef.parse("vg0/t1")) == "vg0/t1"


@pytest.mark.parametrize("text", ["", "vg0/", "/t1", "vg0/t1/x", "-vg0", "vg0/-t1", "vg 0",
                                  "vg0/t1.importing", "vg0/t1.export-abc", "vg0/t1_tdata"])
def test_a_bad_pool_name_is_a_usage_error(text):
    with pytest.raises(BadName) as e:
        PoolRef.parse(text)
    assert isinstance(e.value, Usage) and e.value.exit_status == 2 and "\n" not in str(e.value)


def test_a_vgs_pools_are_its_tagged_thin_pools_or_its_only_one():
    untagged = lv("lvm", tags=())
    assert lvm.pools_of([A, thin("vm"), B, linear("data")]) == [A, B]
    # Beside thinstack's pools, an untagged one is someone else's.
    assert lvm.pools_of([A, untagged]) == [A]
    # Alone, an untagged pool (one LVM made) is adopted as it is; of two, neither is.
    assert lvm.pools_of([untagged, linear("data")]) == [untagged]
    assert lvm.pools_of([untagged, lv("lvm2", tags=())]) == []
    assert lvm.pools_of([linear("data")]) == []


def test_a_pool_is_found_by_its_name_or_as_the_vgs_only_one():
    lvs = [A, B, thin("vm", "b")]
    assert lvm.pool_of("vg0", lvs, "b") is B
    assert lvm.pool_of("vg0", [A, thin("vm")]) is A
    untagged = lv("lvm", tags=())
    assert lvm.pool_of("vg0", [untagged]) is untagged
    assert lvm.pool_of("vg0", [untagged], "lvm") is untagged
    with pytest.raises(NotFound, match=r"^vg0/c: no such thin pool \(the volume group has a, b\)$"):
        lvm.pool_of("vg0", lvs, "c")
    with pytest.raises(NotFound, match="^vg0/vm: no such thin pool"):  # a volume is no pool
        lvm.pool_of("vg0", lvs, "vm")


def test_several_pools_and_no_name_is_a_usage_error_naming_them():
    with pytest.raises(Usage, match=r"^volume group vg0 has several pools \(a, b\)") as e:
        lvm.pool_of("vg0", [B, A, thin("vm")])
    assert e.value.exit_status == 2 and "\n" not in str(e.value)


def test_a_vg_without_a_pool_of_thinstacks_is_not_found():
    with pytest.raises(NotFound, match="has no thin pool; create one with `thinstack pool"):
        lvm.pool_of("vg0", [linear("data")])
    with pytest.raises(NotFound, match="several thin pools and none tagged ts_pool"):
        lvm.pool_of("vg0", [lv("x", tags=()), lv("y", tags=())])


def test_a_volume_is_in_the_pool_lvm_reports_for_it():
    lvs = [A, B, thin("va"), thin("vb", "b")]
    assert lvm.volume_pool(lvs[2], lvs) is A and lvm.volume_pool(lvs[3], lvs) is B
    with pytest.raises(NotFound, match="^vg0/data is in no thin pool$"):
        lvm.volume_pool(linear("data"), lvs)
    with pytest.raises(NotFound):  # its pool is not among the LVs read
        lvm.volume_pool(thin("vc", "c"), lvs)


# --- the limit in the growth plan ---------------------------------------------------------------

def limited(data_used, limit, data_size=256 * MiB, **kwargs):
    return dataclasses.replace(view(data_used, data_size, **kwargs), limit=limit)


def test_a_pool_grows_up_to_its_limit_and_no_further():
    # Over its threshold (78%): the step is 128 MiB, the limit leaves 64 MiB of it.
    p = plan(limited(200 * MiB, limit=320 * MiB), room=GiB)
    assert p.grow_data == 64 * MiB
    # That is enough to get under the threshold, and it puts the pool at its limit: error mode.
    assert p.error_if_no_space is True and p.alert is None
    # Far from its limit, the same pool grows by its step and keeps queueing.
    p = plan(limited(200 * MiB, limit=GiB), room=GiB)
    assert p.grow_data == 128 * MiB and p.error_if_no_space is None
    # At its limit, the VG's room is not for it.
    p = plan(limited(250 * MiB, limit=256 * MiB), room=GiB)
    assert (p.grow_data, p.error_if_no_space) == (0, True)


def test_at_its_limit_a_full_pool_says_so_and_names_the_limit():
    p = plan(limited(250 * MiB, limit=256 * MiB, error_if_no_space=True), room=GiB)
    assert p.grow_data == 0 and p.error_if_no_space is None  # in error mode already
    assert p.alert.startswith("data 97.7% full (threshold 70%) at its limit (256MiB)")
    assert "pool set VG/POOL --limit SIZE" in p.alert  # the monitor puts the pool's name in
    # Short of room in the VG, not of its limit: the other alert.
    p = plan(limited(250 * MiB, limit=GiB), room=0)
    assert "the volume group has no room" in p.alert and "limit" not in p.alert


def test_a_pool_at_its_limit_errors_even_below_its_threshold():
    """Its writers get ENOSPC as soon as it fills, with no monitor pass in between."""
    assert plan(limited(10 * MiB, limit=256 * MiB)) == PoolPlan(error_if_no_space=True)
    assert plan(limited(10 * MiB, limit=256 * MiB, error_if_no_space=True)) == PoolPlan()


def test_with_growth_off_a_pool_at_its_limit_still_errors():
    off = Settings(70.0, None, False)
    assert plan(limited(10 * MiB, limit=256 * MiB, settings=off)) == \
        PoolPlan(error_if_no_space=True)
    assert plan(limited(10 * MiB, limit=256 * MiB, settings=off, error_if_no_space=True)) == \
        PoolPlan()
    assert plan(limited(250 * MiB, limit=GiB, settings=off), room=0) == PoolPlan()


def test_a_raised_limit_brings_the_pool_back_to_queue_and_growing():
    # In error mode at its old limit (256 MiB); now the limit is 1 GiB.
    p = plan(limited(250 * MiB, limit=GiB, error_if_no_space=True), room=GiB)
    assert p.grow_data == 128 * MiB and p.error_if_no_space is False and p.alert is None
    assert plan(limited(10 * MiB, limit=GiB, error_if_no_space=True)) == \
        PoolPlan(error_if_no_space=False)
    # No limit at all any more: the same.
    assert plan(limited(10 * MiB, limit=None, error_if_no_space=True)) == \
        PoolPlan(error_if_no_space=False)


def test_a_limit_less_than_an_extent_away_is_reached():
    """LVM grows a pool in whole extents: a limit that is not (pool set --limit 1023M, 4 MiB
    extents) is as reached as it will ever be an extent short of it."""
    assert plan(limited(10 * MiB, limit=256 * MiB + MiB)) == PoolPlan(error_if_no_space=True)
    p = plan(limited(250 * MiB, limit=256 * MiB + EXTENT - 1, error_if_no_space=True), room=GiB)
    assert p.grow_data == 0 and "at its limit" in p.alert
    # A whole extent short of the limit, the pool can still grow by it.
    p = plan(limited(250 * MiB, limit=256 * MiB + EXTENT), room=GiB)
    assert p.grow_data == EXTENT and p.error_if_no_space is True


# --- a full pool stops only its own tenants ----------------------------------------------------

@pytest.fixture
def two_pools(tmp_path, monkeypatch):
    """Pools a and b of vg0 as the kernel shows them (a FakeRunner answers dmsetup), both rw;
    tests change a pool's status line."""
    runner = FakeRunner(default=None)
    runner.on(["dmsetup", "info"], lambda call: f"{call.argv[-1]}/254/3/1/0/L--w/LVM-x\n")
    for name in ("a", "b"):
        runner.on(["dmsetup", "status", f"vg0-{name}-tpool"], status_line())
    return runner


LVS = [A, B, thin("va"), thin("vb", "b")]


def statuses_read(runner):
    return [argv[2] for argv in runner.argvs if argv[1] == "status"]


def test_a_full_pool_refuses_its_own_tenants_operations_not_the_others(two_pools):
    two_pools.on(["dmsetup", "status", "vg0-a-tpool"],
                 status_line().replace(" rw ", " out_of_data_space "))
    dm = DeviceMapper(two_pools)
    poolstatus.refuse_unless_writable("vg0", LVS, "snapshot", "vb", dm)  # b's volume
    poolstatus.refuse_unless_writable("vg0", LVS, "create", "b", dm)  # in pool b
    assert statuses_read(two_pools) == ["vg0-b-tpool"] * 2  # a is not even read
    for at in ("va", "a"):
        with pytest.raises(Refused, match=r"^pool vg0/a is out_of_data_space: grow it "
                           r"\(`thinstack pool extend vg0/a SIZE`, or raise its limit: "
                           r"`thinstack pool set vg0/a --limit SIZE`\)"):
            poolstatus.refuse_unless_writable("vg0", LVS, "create", at, dm)
    poolstatus.refuse_unless_writable("vg0", LVS, "delete", "va", dm)  # frees space: allowed


def test_an_operation_at_no_pool_checks_every_pool(two_pools):
    two_pools.on(["dmsetup", "status", "vg0-b-tpool"], status_line().replace(" rw ", " ro "))
    dm = DeviceMapper(two_pools)
    for at in (None, "unknown"):  # None, or a name not (yet) in the VG: all pools
        with pytest.raises(Refused, match=r"^pool vg0/b is ro: repair it first "
                           r"\(`thinstack pool repair vg0/b`\)$"):
            poolstatus.refuse_unless_writable("vg0", LVS, "pool-extend", at, dm)
    poolstatus.refuse_unless_writable("vg0", LVS, "create", "va", dm)
    poolstatus.refuse_unless_writable("vg0", [linear("data")], "create", None, dm)  # no pool


def test_pool_status_shows_the_limit_and_what_is_promised():
    p = in_vg(vg(size=10 * GiB, free=8 * GiB),
              lv("a", tags=("ts_pool", "ts_limit=2147483648", "ts_overcommit=1.5")))
    big = dataclasses.replace(thin("vm"), size=3 * GiB)
    s = poolstatus.pool_status(p, [p, big, thin("vb", "b")], kernel())
    assert (s.limit, s.provisioned, s.overcommit, s.budget, s.thin_count) == \
        (2 * GiB, 3 * GiB, 1.5, 3 * GiB, 1)
    s = poolstatus.pool_status(in_vg(vg(), B), [B], kernel())
    assert (s.limit, s.provisioned, s.overcommit, s.budget) == (None, 0, None, None)


# --- pool create: sizes, arguments, rollback ---------------------------------------------------

def test_a_limited_pools_metadata_is_sized_for_its_limit_and_its_data_capped_by_it():
    whole = pools.plan_sizes(TiB, TiB, EXTENT, CHUNK)
    capped = pools.plan_sizes(TiB, TiB, EXTENT, CHUNK, limit=100 * GiB)
    assert capped == pools.Sizes(data=100 * GiB,
                                 metadata=pools.metadata_size(100 * GiB, CHUNK, EXTENT))
    assert capped.metadata == 200 * MiB < whole.metadata
    # A limit that is not whole extents: the data stops at the last whole extent under it.
    assert pools.plan_sizes(TiB, TiB, EXTENT, CHUNK, limit=100 * GiB + MiB).data == 100 * GiB
    # A limit larger than the VG changes nothing; an explicit size is taken as it is.
    assert pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK, limit=TiB) == \
        pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK)
    assert pools.plan_sizes(TiB, TiB, EXTENT, CHUNK, data=8 * GiB, limit=100 * GiB).data == \
        8 * GiB


def test_good_pool_names_limits_and_ratios_pass():
    pools.check_create_args(**args(devices=[], name="t1", limit=GiB, overcommit=1.5))
    pools.check_create_args(**args(devices=[], name="t1", size=GiB, limit=GiB))
    # A file's size is the VG's, not the pool's: it may exceed the pool's limit.
    pools.check_create_args(**args(devices=[], file=Path("/p.img"), size=4 * GiB,
                                   limit=GiB))
    pools.check_budget(None, None)


@pytest.mark.parametrize("over, message", [
    (dict(limit=0), "--limit must be positive"),
    (dict(limit=-GiB), "--limit must be positive"),
    (dict(overcommit=0.0), "--overcommit 0: a positive ratio"),
    (dict(overcommit=-1.0), "a positive ratio"),
    (dict(overcommit=1e6), "a positive ratio"),
    (dict(overcommit=float("nan")), "a positive ratio"),
    (dict(devices=[], size=2 * GiB, limit=GiB), "^--size 2GiB is over --limit 1GiB$"),
])
def test_bad_limits_and_ratios_are_refused_before_anything_is_made(over, message):
    with pytest.raises(ThinstackError, match=message):
        pools.check_create_args(**args(**over))


@pytest.mark.parametrize("name", ["-t1", "t1.importing", "t1_tmeta", "a/b"])
def test_a_bad_pool_name_is_refused(name):
    with pytest.raises(BadName):
        pools.check_create_args(**args(devices=[], name=name))


def test_rollback_removes_the_pool_the_creation_made_by_its_name():
    steps = ["pv:/dev/sdb", "vg:vg0", "vg-uuid:u", "pool:vg0/t1", "pool-uuid:p1"]
    t1 = dataclasses.replace(lv("t1"), uuid="p1")
    rollback = pools.rollback_plan(steps, TAG, ours(), [t1])
    assert rollback.kept is None
    assert rollback.actions == [Action(Undo.REMOVE, "vg0/t1", "lv_uuid=p1"),
                                Action(Undo.REMOVE_VG, "vg0", "vg_uuid=u && lv_count=0"),
                                Action(Undo.WIPE_PV, "/dev/sdb")]
    # A pool called `pool` beside it is not the creation's: the VG is kept, nothing removed.
    rollback = pools.rollback_plan(steps, TAG, ours(), [t1, lv()])
    assert rollback.actions == [Action(Undo.DELTAG, "vg0", TAG)] and "(pool)" in rollback.kept


# --- pool set on the command line --------------------------------------------------------------

def parse(*argv):
    return cli.build_parser().parse_args(["pool", "set", *argv])


def test_pool_set_parses_sizes_ratios_and_none():
    a = parse("vg0/t1", "--limit", "none")
    assert (a.pool, a.limit, hasattr(a, "overcommit")) == (PoolRef("vg0", "t1"), None, False)
    a = parse("vg0", "--limit", "2G", "--overcommit", "1.5")
    assert (a.pool, a.limit, a.overcommit) == (PoolRef("vg0"), 2 * GiB, 1.5)
    a = parse("vg0/t1", "--overcommit", "none")
    assert a.overcommit is None and not hasattr(a, "limit")


def test_pool_set_passes_only_what_was_given(tmp_path, monkeypatch, capsys):
    calls = []
    shown = poolstatus.pool_status(in_vg(vg(), lv("t1")), [], kernel())

    def set_pool(vg_name, name, **changes):
        calls.append((vg_name, name, changes))
        return shown
    monkeypatch.setattr("thinstack.pools.set_pool", set_pool)
    assert cli.main(["pool", "set", "vg0/t1", "--limit", "none", "--json"]) == 0
    assert cli.main(["pool", "set", "vg0", "--overcommit", "2"]) == 0
    assert calls == [("vg0", "t1", {"limit": None}), ("vg0", None, {"overcommit": 2.0})]
    out = capsys.readouterr().out
    assert '"name": "t1"' in out and "LIMIT" in out and "OVERCOMMIT" in out


def test_pool_set_without_a_change_is_a_usage_error_on_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("thinstack.pools.set_pool", lambda *a, **k: pytest.fail("called"))
    assert cli.main(["pool", "set", "vg0/t1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --limit or --overcommit" in err


@pytest.mark.parametrize("argv", [["--limit", "lots"], ["--overcommit", "0"],
                                  ["--overcommit", "x"], ["--limit"]])
def test_pool_set_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["pool", "set", "vg0/t1", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err


# --- the volume operations: their pool, its budget (over a FakeLvm) ----------------------------

def row(x, free=4 * GiB):
    """An LV as `lvs` reports it: its VG's fields on its row."""
    return dataclasses.replace(x, vg_size=10 * GiB, vg_free=free, vg_extent_size=EXTENT)


def sized(x, size, **changes):
    return dataclasses.replace(x, size=size, **changes)


@pytest.fixture
def tenants(tmp_path, monkeypatch):
    """vg0 with pool a (limit 1 GiB, overcommit 1: it may promise 1 GiB, 512 MiB of which its
    volume va has) and pool b (no budget), a volume in each."""
    a = lv("a", tags=("ts_pool", "ts_limit=1073741824", "ts_overcommit=1"))
    fake = FakeLvm(vgs=[vg(size=10 * GiB, free=4 * GiB)],
                   lvs=[row(x) for x in (a, B, sized(thin("va"), 512 * MiB), thin("vb", "b"))])
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    # The pools' kernel devices are not up (a snapshot's metadata check reads them when they are).
    monkeypatch.setattr("thinstack.thinpool.kernel_pool", lambda pool, dm=None: None)
    return fake


def lvcreates(fake):
    return [c for c in fake.commands if c[0] == "lvcreate"]


def test_create_over_the_pools_budget_is_refused_and_runs_nothing(tenants):
    with pytest.raises(NoSpace, match=r"^creating vg0/new would promise 1.004GiB in pool vg0/a"):
        volumes.create(VolumeRef("vg0", "new"), 512 * MiB + 1, "a")
    assert tenants.commands == [] and Journal().pending() == []
    volumes.create(VolumeRef("vg0", "new"), 512 * MiB, "a")  # the budget exactly
    (cmd,) = lvcreates(tenants)
    assert cmd[cmd.index("--thinpool") + 1] == "a"


def test_a_new_volume_goes_in_the_pool_named_which_a_vg_of_several_needs(tenants):
    volumes.create(VolumeRef("vg0", "nb"), 5 * GiB, "b")  # b has no budget
    (cmd,) = lvcreates(tenants)
    assert cmd[cmd.index("--thinpool") + 1] == "b"
    with pytest.raises(Usage, match=r"several pools \(a, b\)"):
        volumes.create(VolumeRef("vg0", "x"), GiB)
    with pytest.raises(NotFound, match="^vg0/c: no such thin pool"):
        volumes.create(VolumeRef("vg0", "x"), GiB, "c")
    assert len(lvcreates(tenants)) == 1 and Journal().pending() == []


def test_growing_a_volume_or_a_writable_snapshot_counts_against_its_pools_budget(tenants):
    va = VolumeRef("vg0", "va")
    with pytest.raises(NoSpace, match="^growing vg0/va would promise 1.004GiB in pool vg0/a"):
        volumes.resize(va, GiB + EXTENT)
    assert tenants.commands == []
    volumes.snapshot(va, "s")  # 512 MiB more: the budget exactly
    tenants.lv_list.append(row(sized(thin("s"), 512 * MiB, origin="va")))
    with pytest.raises(NoSpace, match="^snapshotting vg0/va would promise 1.5GiB in pool vg0/a"):
        volumes.snapshot(va, "s2")
    volumes.snapshot(VolumeRef("vg0", "vb"), "s3")  # pool b has no budget
    assert [c[c.index("-n") + 1] for c in lvcreates(tenants)] == ["s", "s3"]


def test_a_clone_of_a_gold_master_in_another_pool_is_budgeted_there(tenants, monkeypatch):
    from thinstack import extorigin

    gold = row(sized(thin("gold", "b"), GiB, attr="Vri-a-tz--", tags=frozenset({"ts_gold"})))
    tenants.lv_list.append(gold)
    # The gold master's device, as the kernel shows it: read-only, nothing stacked on it.
    size = {"now": GiB}
    monkeypatch.setattr(extorigin, "probe", lambda path: extorigin.Origin(
        path, "254:9", size["now"], True, True, (), False))
    activated = []
    monkeypatch.setattr(extorigin, "activate", lambda lv, pool: activated.append(pool.name))
    monkeypatch.setattr("thinstack.lvm.lv", lambda ref: thin(ref.name, "a"))  # as LVM made it
    with pytest.raises(NoSpace, match="^cloning vg0/gold would promise 1.5GiB in pool vg0/a"):
        volumes.clone(VolumeRef("vg0", "gold"), VolumeRef("vg0", "c"), "a")
    assert tenants.commands == []
    tenants.lv_list[-1] = sized(gold, 512 * MiB)
    size["now"] = 512 * MiB
    volumes.clone(VolumeRef("vg0", "gold"), VolumeRef("vg0", "c"), "a")
    # A thin volume of a, reading the gold master's device (in b) wherever it maps nothing,
    # brought up by thinstack (LVM cannot snapshot its own layering of a thin external origin,
    # so exports could not freeze it).
    (cmd,) = lvcreates(tenants)
    assert cmd[cmd.index("--thinpool") + 1] == "a" and "ts_ext_origin=/dev/vg0/gold" in cmd
    assert activated == ["a"]


def test_each_volume_gets_its_own_pools_usage_and_says_where_its_blocks_live():
    """Thin ids are per pool: a and b both have a volume 1."""
    gold = sized(thin("gold", "b"), GiB, attr="Vri-a-tz--", tags=frozenset({"ts_gold"}))
    clone = sized(thin("c"), GiB, origin="gold", thin_id=2)
    lvs = [A, B, thin("va"), gold, clone]
    usage = {("a", 1): (1, 1, 0), ("b", 1): (2, 2, 0), ("a", 2): (3, 3, 0)}
    infos = {i.name: i for i in volumes.volume_infos(lvs, usage)}
    assert [infos[n].mapped_bytes for n in ("va", "gold", "c")] == [1, 2, 3]
    assert [(infos[n].pool, infos[n].origin_pool) for n in ("va", "gold", "c")] == \
        [("a", None), ("b", None), ("a", "b")]
    assert infos["gold"].dependants == ["c"]


# --- pool set: the tags it changes ------------------------------------------------------------

@pytest.fixture
def setting(tenants, monkeypatch):
    """pool set over the tenants' FakeLvm; its monitor pass and the status it shows after are
    not what these tests look at."""
    monkeypatch.setattr("thinstack.monitor.apply", lambda pool: None)
    monkeypatch.setattr("thinstack.pools.status", lambda vg_name, name: ["status"])
    return tenants


def tag_changes(fake):
    (cmd,) = [c for c in fake.commands if c[0] == "lvchange"]
    assert cmd[-1] == "vg0/a"
    return ({cmd[i + 1] for i, a in enumerate(cmd) if a == "--deltag"},
            {cmd[i + 1] for i, a in enumerate(cmd) if a == "--addtag"})


def test_pool_set_changes_the_tags_in_one_command_and_refuses_a_limit_under_the_size(setting):
    assert pools.set_pool("vg0", "a", limit=2 * GiB, overcommit=2.5) == "status"
    deleted, added = tag_changes(setting)
    assert "ts_limit=1073741824" in deleted and "ts_overcommit=1" in deleted
    assert {"ts_limit=2147483648", "ts_overcommit=2.5"} <= added
    setting.runner.calls.clear()
    pools.set_pool("vg0", "a", limit=GiB, overcommit=1.0)  # as it is: no command
    assert setting.commands == []
    with pytest.raises(Refused, match=r"^vg0/a is 1008MiB already; a pool cannot shrink"):
        pools.set_pool("vg0", "a", limit=512 * MiB)
    with pytest.raises(ThinstackError, match="a positive ratio"):
        pools.set_pool("vg0", "a", overcommit=0.0)
    assert setting.commands == []


def test_pool_set_never_deletes_a_tag_it_keeps(setting):
    pools.set_pool("vg0", "a", limit=2 * GiB)
    deleted, added = tag_changes(setting)
    assert not deleted & added


# --- pool extend: never past the limit ---------------------------------------------------------

def test_pool_extend_past_the_limit_is_no_space_and_runs_nothing(setting):
    a = VolumeRef("vg0", "a")
    with pytest.raises(NoSpace, match=r"^vg0/a would grow to 1.008GiB, past its limit 1GiB: "
                       r"raise it first \(`thinstack pool set vg0/a --limit SIZE`\)$"):
        pools.extend("vg0", 24 * MiB, "a")  # 1008 MiB + 24 MiB, over 1 GiB
    assert setting.commands == []
    pools.extend("vg0", 16 * MiB, "a")  # up to the limit exactly
    # With the pool's threshold, so that the reload keeps its low-water event armed.
    assert setting.commands == [("lvextend", "-q", "-L", f"+{16 * MiB}b", "--config",
                                 "activation{thin_pool_autoextend_threshold=70 monitoring=0}",
                                 str(a))]


def test_pool_extend_counts_the_extent_lvm_rounds_up_to(setting):
    setting.lv_list[0] = dataclasses.replace(
        setting.lv_list[0], tags=frozenset({"ts_pool", f"ts_limit={1022 * MiB}"}))
    with pytest.raises(NoSpace):
        pools.extend("vg0", 14 * MiB, "a")  # LVM adds 16 MiB: 1024 MiB, over 1022


def test_a_full_tenant_does_not_stop_a_new_pool_beside_it(tenants, monkeypatch, mocker):
    mocker.patch("thinstack.provision.require_thin_pool")  # the host may have no dm-thin
    monkeypatch.setattr("thinstack.pools.status", lambda vg_name, name: ["status"])
    runner = tenants.runner  # the pools' devices, as the kernel shows them: a is full
    runner.on(["dmsetup", "info"], lambda call: f"{call.argv[-1]}/254/3/1/0/L--w/LVM-x\n")
    runner.on(["dmsetup", "status", "vg0-a-tpool"],
              status_line().replace(" rw ", " out_of_data_space "))
    runner.on(["dmsetup", "status", "vg0-b-tpool"], status_line())
    pools.create("vg0", name="t3", size=64 * MiB)
    (cmd,) = lvcreates(tenants)
    assert cmd[cmd.index("-n") + 1] == "t3"


# --- clones across pools read their gold master's blocks ------------------------------------

def test_a_clone_in_another_pool_reads_an_external_origin_a_snapshot_in_its_own_does_not():
    from thinstack import exports, reclaim

    gold = dataclasses.replace(thin("gold", "a"), attr="ori-a-tz--", tags=frozenset({"ts_gold"}))
    here = dataclasses.replace(thin("here", "a"), origin="gold")
    there = dataclasses.replace(thin("there", "b"), origin="gold")
    plain = dataclasses.replace(thin("plain", "b"), origin="")
    lvs = [A, B, gold, here, there, plain]
    assert gold.is_thin  # LVM shows an external origin 'o'; it is still a thin volume
    assert lvm.external_origin(here, lvs) is None and lvm.external_origin(plain, lvs) is None
    assert lvm.external_origin(there, lvs) == gold
    # What `there` does not map is the gold master's: exported whole, never reclaimed.
    assert exports.source_kind(here, lvs) is exports.SourceKind.THIN
    assert exports.source_kind(there, lvs) is exports.SourceKind.EXTERNAL
    assert reclaim.refusal(here, lvs) is None
    assert "external origin" in (reclaim.refusal(there, lvs) or "")


def test_an_operation_on_an_lv_in_no_pool_minds_no_pools_mode(two_pools):
    two_pools.on(["dmsetup", "status", "vg0-b-tpool"], status_line().replace(" rw ", " ro "))
    dm = DeviceMapper(two_pools)
    poolstatus.refuse_unless_writable("vg0", [*LVS, linear("data")], "cow", "data", dm)
    with pytest.raises(Refused):
        poolstatus.refuse_unless_writable("vg0", [*LVS, linear("data")], "cow", None, dm)


def test_list_shows_one_pools_volumes_when_named(tenants, capsys, monkeypatch):
    import json as json_

    monkeypatch.setattr(poolstatus, "thin_usage", lambda vg, lvs: None)  # no kernel here

    assert cli.main(["list", "vg0/a", "--json"]) == 0
    assert [i["name"] for i in json_.loads(capsys.readouterr().out)] == ["va"]
    assert cli.main(["list", "vg0", "--json"]) == 0
    assert sorted(i["name"] for i in json_.loads(capsys.readouterr().out)) == ["va", "vb"]
    assert cli.main(["list", "vg0/nope"]) == 3
    assert capsys.readouterr().err.startswith("thinstack: vg0/nope: no such thin pool")
