"""Pool decisions on plain data (sizes, tags, validation, rollback plans), and the flows around
them over a fake LVM (FakeLvm: reports from objects, commands recorded by a FakeRunner)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fakes import FakeLvm
from thinstack import backing, pools, recovery
from thinstack.dm.status import Discards, PoolMode, ThinPoolStatus
from thinstack.errors import Exists, NoSpace, NotFound, ThinstackError
from thinstack.journal import Journal
from thinstack.lvm import LV, PV, VG, BadName
from thinstack.recovery import Action, Undo

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
EXTENT = 4 * MiB
CHUNK = 64 * KiB


def vg(name="vg0", size=1020 * MiB, free=1020 * MiB, tags=()):
    return VG(name=name, uuid="u", size=size, free=free, extent_size=EXTENT,
              extent_count=size // EXTENT, free_count=free // EXTENT, pv_count=1,
              tags=frozenset(tags))


def lv(name="pool", *, attr="twi-a-tz--", pool="", tags=("ts_pool",), size=1008 * MiB):
    return LV(vg="vg0", name=name, uuid=name, attr=attr, size=size, segtype="thin-pool",
              pool=pool, origin="", data_percent=None, metadata_percent=None,
              tags=frozenset(tags), path="", dm_path=f"/dev/mapper/vg0-{name}", thin_id=None,
              chunk_size=CHUNK, metadata_size=4 * MiB, skip_activation=False, when_full="")


def kernel(used=0, total=1008 * MiB // CHUNK, meta_used=100, meta_total=1024, *,
           mode=PoolMode.RW, error=False):
    return ThinPoolStatus(transaction_id=1, used_metadata_blocks=meta_used,
                          total_metadata_blocks=meta_total, used_data_blocks=used,
                          total_data_blocks=total, held_metadata_root=None, mode=mode,
                          discards=Discards.PASSDOWN, error_if_no_space=error, needs_check=False,
                          metadata_low_watermark=None)


# --- sizes -------------------------------------------------------------------------------------

def test_default_size_leaves_metadata_its_spare_and_room_to_grow():
    # A 1 GiB disk: metadata at its 4 MiB minimum, three times over.
    assert pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK) == \
        pools.Sizes(data=1008 * MiB, metadata=4 * MiB)


def test_metadata_scales_with_the_vg_and_shrinks_with_bigger_chunks():
    assert pools.metadata_size(TiB, CHUNK, EXTENT) == 2 * GiB  # 128 bytes per 64 KiB chunk
    assert pools.metadata_size(TiB, 1 * MiB, EXTENT) == 128 * MiB
    sizes = pools.plan_sizes(TiB, TiB, EXTENT, CHUNK)
    assert sizes.data == TiB - 3 * 2 * GiB


def test_metadata_never_exceeds_what_the_kernel_can_address():
    huge = pools.metadata_size(1 << 50, CHUNK, EXTENT)
    assert huge <= pools.growth.METADATA_MAX and huge % EXTENT == 0
    assert huge > pools.growth.METADATA_MAX - EXTENT


def test_metadata_is_whole_extents():
    assert pools.metadata_size(3 * TiB + 5 * MiB, CHUNK, EXTENT) % EXTENT == 0


def test_explicit_size_is_rounded_up_to_extents():
    sizes = pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK, data=100 * MiB + 1)
    assert sizes.data == 104 * MiB


def test_explicit_size_that_does_not_fit_is_no_space():
    with pytest.raises(NoSpace, match="needs"):
        pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK, data=1016 * MiB)
    # Up to the metadata and its spare, it fits (only the growth room is given up).
    assert pools.plan_sizes(1020 * MiB, 1020 * MiB, EXTENT, CHUNK, data=1012 * MiB).data == \
        1012 * MiB


def test_a_tiny_vg_is_no_space():
    with pytest.raises(NoSpace, match="too small"):
        pools.plan_sizes(12 * MiB, 12 * MiB, EXTENT, CHUNK)


# --- arguments ---------------------------------------------------------------------------------

def args(**over):
    base = dict(vg="vg0", devices=["/dev/sdb"], file=None, raid1=False, size=None, chunk=CHUNK,
                grow_threshold=70.0, grow_step=256 * MiB)
    return {**base, **over}


def test_good_arguments_pass():
    pools.check_create_args(**args())
    pools.check_create_args(**args(devices=["/dev/sdb", "/dev/sdc"], raid1=True))
    pools.check_create_args(**args(devices=[], file=Path("/var/lib/ts/p.img"), size=GiB))
    pools.check_create_args(**args(devices=[]))  # a pool in an existing VG


@pytest.mark.parametrize("over, message", [
    (dict(devices=[], raid1=True), "give them"),
    (dict(file=Path("/x.img"), size=GiB), "not both"),
    (dict(devices=[], file=Path("/x.img")), "needs --size"),
    (dict(devices=[], file=Path("/x.img"), size=GiB, raid1=True), "does not apply"),
    (dict(devices=[], file=Path("/my pools/x.img"), size=GiB), "may only contain"),
    (dict(devices=["/dev/sdb", "/dev/sdb"]), "named twice"),
    (dict(raid1=True), "exactly two devices, not 1"),
    (dict(devices=["/dev/a", "/dev/b", "/dev/c"], raid1=True), "exactly two"),
    (dict(vg="v" * 40, devices=["/dev/a", "/dev/b"], raid1=True), "too long"),
    (dict(size=0), "positive"),
    (dict(chunk=32 * KiB), "multiple of 64KiB"),
    (dict(chunk=96 * KiB), "multiple of 64KiB"),
    (dict(chunk=2 * GiB), "between 64KiB and 1GiB"),
    (dict(grow_threshold=100.0), "between 0 and 100"),
    (dict(grow_step=0), "positive"),
])
def test_bad_arguments_are_refused_with_the_reason(over, message):
    with pytest.raises(ThinstackError, match=message):
        pools.check_create_args(**args(**over))


def test_bad_vg_name_is_a_usage_error():
    with pytest.raises(BadName):
        pools.check_create_args(**args(vg="-vg"))


# --- tags --------------------------------------------------------------------------------------

def test_pool_tags_encode_the_growth_policy_the_monitor_reads():
    t = pools.pool_tags(72.5, 256 * MiB)
    assert t == ["ts_pool", "ts_grow_threshold=72.5", "ts_grow_step=268435456"]
    s = pools.growth.settings(frozenset(t))
    assert (s.threshold, s.step, s.enabled) == (72.5, 256 * MiB, True)
    assert pools.pool_tags(70.0, MiB)[1] == "ts_grow_threshold=70"


# --- rollback ----------------------------------------------------------------------------------

def test_creation_steps_on_disks_md_and_file():
    assert pools.creation_steps("vg0", ["/dev/sdb", "/dev/sdc"], [], None) == \
        ["pv:/dev/sdb", "pv:/dev/sdc", "vg:vg0"]
    assert pools.creation_steps("vg0", ["/dev/md/ts-vg0"], ["/dev/sdb", "/dev/sdc"], None) == \
        ["md-member:/dev/sdb", "md-member:/dev/sdc", "md:ts-vg0", "pv:/dev/md/ts-vg0", "vg:vg0"]
    # A loop device's name does not survive a reboot; its PV goes away with the file.
    assert pools.creation_steps("vg0", ["/dev/loop3"], [], Path("/p.img")) == ["vg:vg0"]


TAG = "ts_op_abc"


def ours(name="vg0", uuid="u"):
    return vg(name, tags=[TAG]) if uuid == "u" else dataclasses.replace(vg(name, tags=[TAG]),
                                                                        uuid=uuid)


def plan(steps, found=None, lvs=()):
    return pools.rollback_plan(steps, TAG, found, list(lvs))


def test_rollback_undoes_in_reverse_order_checking_each_target():
    steps = ["md-member:/dev/sdb", "md-member:/dev/sdc", "md:ts-vg0", "pv:/dev/md/ts-vg0",
             "vg:vg0", "vg-uuid:u", "pool:vg0/pool", "pool-uuid:p1"]
    pool = dataclasses.replace(lv(), uuid="p1")
    rollback = plan(steps, ours(), [pool])
    assert rollback.kept is None
    assert rollback.actions == [
        Action(Undo.REMOVE, "vg0/pool", "lv_uuid=p1"),
        Action(Undo.REMOVE_VG, "vg0", "vg_uuid=u && lv_count=0"),
        Action(Undo.WIPE_PV, "/dev/md/ts-vg0"), Action(Undo.STOP_MD, "ts-vg0"),
        Action(Undo.ZERO_MD, "/dev/sdc", "ts-vg0"), Action(Undo.ZERO_MD, "/dev/sdb", "ts-vg0")]
    # The VG already gone: what lay under it is still undone, each undo checking its target.
    assert [a.kind for a in plan(steps).actions] == [Undo.WIPE_PV, Undo.STOP_MD, Undo.ZERO_MD,
                                                     Undo.ZERO_MD]


def test_rollback_of_a_file_backed_pool_deletes_the_file_it_made_last():
    steps = ["file:/var/lib/p:1.img", "file-id:2049:77", "loop:/var/lib/p:1.img", "vg:vg0",
             "vg-uuid:u", "registry:vg0"]
    actions = plan(steps, ours()).actions
    assert [a.kind for a in actions] == [Undo.UNREGISTER, Undo.REMOVE_VG, Undo.DETACH_LOOP,
                                         Undo.REMOVE_FILE]
    assert (actions[-1].target, actions[-1].arg) == ("/var/lib/p:1.img", "2049:77")  # colons
    assert actions[-2].arg == "2049:77"  # loops by the file's identity, not its name
    # Killed before the file's identity was recorded: the file and its name are left alone.
    assert plan(["file:/p.img"]).actions == []


def test_committed_creation_is_kept():
    assert plan(["vg:vg0", "pool:vg0/pool", "committed"], ours(), [lv()]) == pools.Rollback([])


def test_a_vg_taken_into_use_is_adopted_never_removed():
    """Finding 8: killed after the VG existed, then used by hand: nothing of it is undone."""
    steps = ["pv:/dev/sdb", "vg:vg0", "vg-uuid:u"]
    data = lv("data", attr="-wi-a-----", tags=())
    for found, lvs, why in [
            (ours(), [data], "holds volumes the creation did not make (data)"),
            (vg(), [], "no longer carries the creation's tag ts_op_abc"),
            (ours(uuid="other"), [], "another volume group now"),
            # A pool of that name the creation never got to make, or another one than it made.
            (ours(), [lv()], "holds volumes the creation did not make (pool)"),
    ]:
        rollback = plan(steps, found, lvs)
        # Nothing undone; the creation's tag comes off where it is still on.
        tagged = [Action(Undo.DELTAG, "vg0", TAG)] if TAG in found.tags else []
        assert rollback.actions == tagged and why in rollback.kept, (found, lvs)
    rollback = plan([*steps, "pool:vg0/pool", "pool-uuid:p1"], ours(), [lv()])
    assert rollback.actions == [Action(Undo.DELTAG, "vg0", TAG)] and "(pool)" in rollback.kept
    assert "made by someone else" in plan(["pv:/dev/sdb"], ours()).kept


def test_killed_between_making_the_vg_and_tagging_it_removes_it_only_while_empty():
    steps = ["pv:/dev/sdb", "vg:vg0"]
    assert [a.kind for a in plan(steps, vg()).actions] == [Undo.REMOVE_VG, Undo.WIPE_PV]
    assert plan(steps, vg(), [lv("data", attr="-wi-a-----", tags=())]).actions == []
    # Tagged but its uuid not yet recorded: the tag is the creation's own.
    assert [a.kind for a in plan(steps, ours()).actions] == [Undo.REMOVE_VG, Undo.WIPE_PV]


def test_recover_adopts_a_vg_in_use_and_says_so(mocker, capsys):
    entry = Journal().begin("pool-create", "vg0")
    for step in ["pv:/dev/sdb", "vg:vg0", "vg-uuid:u"]:
        Journal().step(entry, step)
    fake = FakeLvm(vgs=[dataclasses.replace(vg(), tags=frozenset([entry.tag]))],
                   lvs=[lv("data", attr="-wi-a-----", tags=())])
    recovery.roll_back(entry, fake)
    assert fake.commands == [("vgchange", "-q", "--deltag", entry.tag, "vg0")]
    err = capsys.readouterr().err
    assert "kept as it is" in err and entry.id in err and "(data)" in err


def test_the_planner_is_registered_for_recovery():
    assert recovery._resolve(recovery.PLANNERS["pool-create"]) is pools.rollback


# --- flows, with the system mocked -------------------------------------------------------------

class FakePrepared:
    def __init__(self, vg, pvs):
        self.vg, self.pvs, self.created = vg, pvs, False

    def create(self):
        self.created = True


@pytest.fixture
def system(monkeypatch, mocker):
    """An LVM with no VG until blivet 'creates' one (the default Lvm, a fake)."""
    state = {"vgs": [], "lvm": []}
    state["fake"] = FakeLvm(vgs=state["vgs"])
    monkeypatch.setattr("thinstack.lvm.LVM", state["fake"])

    def prepare(name, devices, md_name=None):
        state["vgs"].append(vg(name))
        return FakePrepared(name, [f"/dev/md/{md_name}"] if md_name else devices)

    mocker.patch("thinstack.provision.prepare_vg", side_effect=prepare)
    mocker.patch("thinstack.provision.require_thin_pool")  # the host may have no dm-thin
    return state


def fake_lvm(system, fail=None):
    """FakeLvm.on_command: tags the fake VGs as vgchange would, raises `fail` on lvcreate."""
    def run(*argv):
        system["lvm"].append(argv)
        if argv[0] == "vgchange" and argv[2] in ("--addtag", "--deltag"):
            name = argv[-1]
            for i, v in enumerate(system["vgs"]):
                if v.name == name:
                    change = {argv[3]} if argv[2] == "--addtag" else set()
                    kept = v.tags - {argv[3]} if argv[2] == "--deltag" else v.tags
                    system["vgs"][i] = dataclasses.replace(v, tags=frozenset(kept | change))
        if argv[0] == "lvcreate" and fail:
            raise fail
    return run


def test_failed_creation_rolls_back_in_reverse_and_clears_the_journal(system, mocker):
    fake = system["fake"]
    fake.on_command = fake_lvm(system, ThinstackError("lvcreate failed"))
    fake.pv_list.append(PV("/dev/md/ts-vg0", "", GiB, GiB))
    fake.runner.on(["mdadm", "--examine"], "MD_NAME=host:ts-vg0\n")
    with pytest.raises(ThinstackError, match="lvcreate failed"):
        pools.create("vg0", devices=["/dev/sdb", "/dev/sdc"], raid1=True)
    # No pool was made, so none is removed; the VG still carries the creation's tag: it goes,
    # then what it was built on (the array is stopped only where /dev/md has it).
    undone = [argv for argv in fake.runner.argvs if argv[:2] in (
        ["lvm", "lvremove"], ["lvm", "vgremove"], ["lvm", "pvremove"], ["mdadm", "--stop"],
        ["mdadm", "--zero-superblock"])]
    assert undone == [["lvm", "vgremove", "-q", "-y", "-f", "-S", "vg_uuid=u && lv_count=0"],
                      ["lvm", "pvremove", "-q", "-y", "-ff", "/dev/md/ts-vg0"],
                      ["mdadm", "--zero-superblock", "/dev/sdc"],
                      ["mdadm", "--zero-superblock", "/dev/sdb"]]
    assert Journal().pending() == []


def test_pool_is_created_with_zeroing_chunk_and_tags(system, mocker):
    system["fake"].on_command = fake_lvm(system)
    system["fake"].lv_list.append(lv())
    mocker.patch("thinstack.pools.status", return_value=["status"])
    assert pools.create("vg0", devices=["/dev/sdb"], chunk=128 * KiB, grow_threshold=60,
                        grow_step=GiB) == "status"
    (lvcreate,) = [c for c in system["lvm"] if c[0] == "lvcreate"]
    # The VG carries the operation's tag from its creation to the commit.
    tag = [c for c in system["lvm"] if c[0] == "vgchange"][0][3]
    assert tag.startswith("ts_op_") and system["lvm"][-1] == ("vgchange", "-q", "--deltag", tag,
                                                             "vg0")
    assert system["vgs"][0].tags == frozenset()
    assert lvcreate[:4] == ("lvcreate", "-q", "-y", "--type")
    text = " ".join(lvcreate)
    assert "-L 1056964608b" in text  # 1020 MiB less 3 x 4 MiB of metadata
    assert "--chunksize 131072b --poolmetadatasize 4194304b -Zy" in text
    assert "--addtag ts_pool --addtag ts_grow_threshold=60 --addtag ts_grow_step=1073741824" in text
    # Never registered with dmeventd, and armed at the pool's own threshold (growth.arming).
    assert lvcreate[-5:] == ("-n", "pool", "--config",
                             "activation{thin_pool_autoextend_threshold=60 monitoring=0}", "vg0")
    assert not [c for c in system["lvm"] if c[0] in ("lvremove", "vgremove")]
    assert Journal().pending() == []


def test_existing_vg_is_refused_before_anything_is_journalled(system, mocker):
    system["vgs"].append(vg("vg0"))
    with pytest.raises(Exists, match="already exists"):
        pools.create("vg0", devices=["/dev/sdb"])
    assert Journal().pending() == [] and system["lvm"] == []


def test_an_existing_file_is_refused_unless_it_is_this_vgs_and_blank(system, tmp_path):
    path = tmp_path / "pool.img"
    path.write_bytes(b"someone's data")
    with pytest.raises(Exists, match="already exists"):
        pools.create("vg0", file=path, size=GiB)
    assert path.read_bytes() == b"someone's data"
    backing.register("vg0", path)
    runner = system["fake"].runner
    runner.on("blkid", "LVM2_member")
    with pytest.raises(Exists):
        pools.create("vg0", file=path, size=GiB)
    runner.fail("blkid", "", exit_status=2)  # nothing recognised
    assert backing.check_new_file("vg0", path, runner)  # ours, blank: an interrupted creation's


def test_attach_brings_up_every_registered_vg_and_reports_the_missing(system, tmp_path):
    present = tmp_path / "a.img"
    present.touch()
    backing.register("vga", present)
    backing.register("vgb", tmp_path / "gone.img")
    system["vgs"].append(vg("vga"))
    fake = system["fake"]
    with pytest.raises(ThinstackError, match="vgb: backing file .*gone.img is missing"):
        pools.attach(lvm=fake)
    losetup = [argv for argv in fake.runner.argvs if argv[0] == "losetup"]
    assert [argv[-1] for argv in losetup] == [str(present)] * 2  # looked for, then attached
    assert fake.commands == [("vgchange", "-q", "-ay", "vga")]


def test_attach_of_one_unknown_vg_is_not_found(system):
    with pytest.raises(NotFound):
        pools.attach("nope", lvm=system["fake"])


def test_extend_beyond_the_vg_is_no_space_without_running_lvm(system):
    system["vgs"].append(vg(free=8 * MiB))
    system["fake"].lv_list.append(lv())
    with pytest.raises(NoSpace, match="8MiB free"):
        pools.extend("vg0", 12 * MiB)
    assert system["fake"].commands == []


# --- a pool in an existing VG ------------------------------------------------------------------

@pytest.fixture
def existing(system):
    """A VG someone else made, holding one of their own LVs."""
    system["vgs"].append(vg(free=500 * MiB))
    system["fake"].lv_list.append(lv("root", attr="-wi-ao----", tags=()))
    return system


def test_a_pool_goes_into_an_existing_vgs_free_extents_tagged_until_its_commit(existing, mocker):
    existing["fake"].on_command = fake_lvm(existing)
    mocker.patch("thinstack.pools.status", return_value=["status"])
    assert pools.create("vg0", grow_step=GiB) == "status"
    (lvcreate,) = [c for c in existing["lvm"] if c[0] == "lvcreate"]
    text = " ".join(lvcreate)
    assert "-L 511705088b" in text  # 500 MiB free less 3 x 4 MiB of metadata, to extents: 488
    (tag,) = [a for a in lvcreate if a.startswith("ts_op_")]
    assert "--addtag ts_pool" in text and lvcreate[-5:-2] == ("-n", "pool", "--config")
    assert lvcreate[-1] == "vg0"
    # The commit removes the tag from the pool; the VG itself is never changed, nor removed.
    assert existing["lvm"][-1] == ("lvchange", "--deltag", tag, "vg0/pool")
    assert not [c for c in existing["lvm"] if c[0] in ("vgchange", "vgremove", "pvremove")]
    assert Journal().pending() == []


def test_a_failed_pool_in_an_existing_vg_removes_only_the_pool(existing):
    fake = existing["fake"]

    def run(*argv):  # lvcreate makes the tagged pool, then fails
        if argv[0] == "lvcreate":
            tag = next(a for a in argv if a.startswith("ts_op_"))
            fake.lv_list.append(lv(tags=("ts_pool", tag)))
            raise ThinstackError("lvcreate failed")
    fake.on_command = run
    with pytest.raises(ThinstackError, match="lvcreate failed"):
        pools.create("vg0")
    undone = [c for c in fake.commands if c[0] in ("lvremove", "vgremove", "pvremove")]
    assert undone == [("lvremove", "-q", "-y", "-f", "vg0/pool")]
    assert Journal().pending() == []


@pytest.mark.parametrize("lvs, free, error, message", [
    # A VG may hold several pools (tenants), but not two of one name.
    ([lv()], 500 * MiB, Exists, "already has a volume named pool"),
    ([lv(tags=(), attr="-wi-a-----")], 500 * MiB, Exists, "already has a volume named pool"),
    ([], 8 * MiB, NoSpace, "8MiB free"),
    ([], None, NotFound, "volume group vg0 not found"),
])
def test_an_existing_vg_is_refused_before_anything_is_journalled(system, lvs, free, error,
                                                                 message):
    if free is not None:
        system["vgs"].append(vg(free=free))
    system["fake"].lv_list.extend(lvs)
    with pytest.raises(error, match=message):
        pools.create("vg0", size=None)
    assert Journal().pending() == [] and system["fake"].commands == []


def test_an_interrupted_pool_in_an_existing_vg_is_no_adoption_and_no_vg_removal():
    entry = Journal().begin("pool-create", "vg0", existing_vg=True)
    assert pools.rollback(entry, FakeLvm(vgs=[vg()], lvs=[lv()])) == []


# --- blivet's failures, as thinstack's ---------------------------------------------------------

def test_a_blivet_failure_is_one_thinstack_line(monkeypatch):
    class DeviceError(Exception):  # as blivet.errors raises it, for a loop over a block device
        pass

    class Blivet:
        def reset(self):
            raise DeviceError("device is too small for new format\n  (more detail)")

    monkeypatch.setattr("thinstack.provision._blivet", lambda: type("M", (), {"Blivet": Blivet}))
    monkeypatch.setitem(__import__("sys").modules, "blivet.formats",
                        type("F", (), {"get_format": None}))
    with pytest.raises(ThinstackError) as e:
        pools.provision.prepare_vg("vg0", ["/dev/loop1"])
    assert type(e.value) is ThinstackError and "\n" not in str(e.value)
    assert str(e.value).startswith("preparing volume group vg0 on /dev/loop1: device is too "
                                   "small for new format (more detail); or make the volume group")
