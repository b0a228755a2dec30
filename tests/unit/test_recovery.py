"""Recovery: what an interrupted operation leaves to do (plain data), and the one registry of
undo actions run over a FakeLvm and its FakeRunner."""

import pytest

from tests.fakes import FakeLvm
from thinstack import exports, recovery
from thinstack.errors import Refused
from thinstack.journal import Entry
from thinstack.lvm import LV, PV, VG, VolumeRef
from thinstack.recovery import Action, Undo, apply, plan


def lv(name, *, tags=(), origin="", attr="Vwi-a-tz--"):
    return LV(vg="vg", name=name, uuid=name, attr=attr, size=1 << 30, segtype="thin",
              pool="pool", origin=origin, data_percent=0.0, metadata_percent=None,
              tags=frozenset(tags), path=f"/dev/vg/{name}", dm_path=f"/dev/mapper/vg-{name}",
              thin_id=1, chunk_size=0, metadata_size=0, skip_activation=False, when_full="")


RO = "Vri-a-tz--"


def entry(op, steps=(), id="abc", **args):
    return Entry(id=id, op=op, vg="vg", args=args, steps=list(steps))


def test_uncommitted_volume_is_removed_even_without_a_journal():
    assert plan([], [lv("a"), lv("b", tags={"ts_op_zzz"})]) == [Action(Undo.REMOVE, "vg/b")]


def test_committed_operation_keeps_its_volume_and_drops_the_leftover_tag():
    e = entry("clone", steps=["committed"], name="c")
    assert plan([e], [lv("c", tags={e.tag})]) == [Action(Undo.DELTAG, "vg/c", e.tag)]


def test_snapshots_go_before_their_origins():
    tag = "ts_op_abc"
    lvs = [lv("base", tags={tag}), lv("snap", tags={tag}, origin="base"),
           lv("snap2", tags={tag}, origin="snap")]
    assert [a.target for a in plan([entry("import")], lvs)] == ["vg/snap2", "vg/snap", "vg/base"]


def test_interrupted_gold_is_made_writable_again():
    e = entry("gold", steps=["readonly:g"], name="g")
    assert plan([e], [lv("g", attr=RO)]) == [Action(Undo.WRITABLE, "vg/g")]


def test_gold_that_reached_its_tag_stays_read_only():
    e = entry("gold", steps=["readonly:g"], name="g")  # killed after the tag, before the journal
    assert plan([e], [lv("g", attr=RO, tags={"ts_gold"})]) == []


def test_clone_rolled_back_restores_a_writable_external_origin():
    e = entry("clone", steps=["readonly:base"], name="c", origin="base")
    lvs = [lv("base", attr=RO), lv("c", tags={e.tag}, origin="base")]
    assert plan([e], lvs) == [Action(Undo.REMOVE, "vg/c"), Action(Undo.WRITABLE, "vg/base")]


def test_origin_stays_read_only_while_another_clone_depends_on_it():
    e = entry("clone", steps=["readonly:base"], name="c2", origin="base")
    lvs = [lv("base", attr=RO), lv("c1", origin="base"), lv("c2", tags={e.tag}, origin="base")]
    assert plan([e], lvs) == [Action(Undo.REMOVE, "vg/c2")]


def test_single_command_operations_need_nothing():
    assert plan([entry("delete", name="x"), entry("resize", name="y", size=5)], [lv("y")]) == []


def test_resumable_import_is_kept_until_explicitly_recovered():
    e = entry("import", name="vm1")
    assert plan([], [lv("vm1.importing", tags={e.tag})], keep=frozenset({e.tag})) == []
    assert plan([e], [lv("vm1.importing", tags={e.tag})]) == \
        [Action(Undo.REMOVE, "vg/vm1.importing")]


OUTSIDE = {"ts_ext_origin=/dev/sdb", "ts_ext_size=1048576"}


def test_an_unfinished_clone_of_an_outside_device_is_taken_down_before_lvm_removes_it():
    e = entry("clone", steps=["devro:/dev/sdb"], name="c", origin="/dev/sdb")
    lvs = [lv("c", tags={e.tag, *OUTSIDE})]
    assert plan([e], lvs) == [Action(Undo.RELEASE, "vg/c", "TS-EXT-c"), Action(Undo.REMOVE, "vg/c"),
                              Action(Undo.DEVICE_WRITABLE, "/dev/sdb")]


def test_an_outside_device_stays_read_only_while_a_committed_clone_reads_it():
    e = entry("clone", steps=["devro:/dev/sdb"], name="c2", origin="/dev/sdb")
    lvs = [lv("c1", tags=OUTSIDE), lv("c2", tags={e.tag, *OUTSIDE})]
    assert plan([e], lvs) == [Action(Undo.RELEASE, "vg/c2", "TS-EXT-c2"),
                              Action(Undo.REMOVE, "vg/c2")]


def test_a_committed_outside_clone_keeps_its_device_read_only():
    e = entry("clone", steps=["devro:/dev/sdb", "committed"], name="c", origin="/dev/sdb")
    assert plan([e], [lv("c", tags={e.tag, *OUTSIDE})]) == [Action(Undo.DELTAG, "vg/c", e.tag)]


# --- exports: a device suspended, a snapshot, a temporary file ----------------------------------

@pytest.fixture
def dirs(tmp_path):
    return tmp_path


def export_entry(folder, steps=()):
    return entry("export", steps, name="vm1", dest=str(folder / "d.vhd"),
                 partial=str(folder / ".d.vhd.partial-1"))


def test_a_device_suspended_and_not_resumed_is_resumed_first():
    steps = ["suspend:vg-c1 TS-EXT-u1"]
    assert recovery.resumes([entry("export", steps)]) == [Action(Undo.RESUME, "vg-c1", "TS-EXT-u1")]
    assert recovery.resumes([entry("export", [*steps, "resumed:vg-c1"])]) == []


def test_only_the_very_device_suspended_is_resumed():
    fake = FakeLvm()
    info = "dmsetup info -c --noheadings --separator / -o name,major,minor,open,events,attr,uuid"
    for attr, uuid, resumed in (("L-sw", "TS-EXT-u1", True), ("L--w", "TS-EXT-u1", False),
                                ("L-sw", "TS-EXT-u2", False)):
        fake.runner.on(info.split(), f"vg-c1/253/4/0/0/{attr}/{uuid}\n")
        apply([Action(Undo.RESUME, "vg-c1", "TS-EXT-u1")], fake)
        assert (fake.runner.argvs[-1][:2] == ["dmsetup", "resume"]) == resumed, (attr, uuid)


def test_a_dead_export_loses_its_snapshot_and_temporary_file(dirs):
    e = export_entry(dirs)
    partial = dirs / ".d.vhd.partial-1"
    partial.write_bytes(b"half an image")
    fake = FakeLvm(vgs=[VG("vg", "u", 0, 0, 0, 0, 0, 1, frozenset())],
                   lvs=[lv("vm1"), lv("vm1.export-abc", origin="vm1", tags={e.tag}),
                        lv("vm1.last-export", origin="vm1", attr=RO, tags={"ts_last_export"})])
    recovery.roll_back(e, fake)
    assert fake.commands == [("lvremove", "-q", "-y", "-f", "vg/vm1.export-abc")]
    assert not partial.exists()


def test_an_explicit_recovery_refuses_a_running_export(dirs):
    e = export_entry(dirs)
    with exports.export_lock(VolumeRef("vg", "vm1")):
        assert recovery.deferred(e, explicit=False)
        with pytest.raises(Refused, match="an export of vg/vm1 is running"):
            recovery.deferred(e, explicit=True)
    assert not recovery.deferred(e, explicit=True)


# --- a pool creation's resources ----------------------------------------------------------------

def test_a_pv_is_wiped_only_while_it_belongs_to_no_vg():
    fake = FakeLvm(pvs=[PV("/dev/sdb", "", 1 << 30, 1 << 30), PV("/dev/sdc", "theirs", 0, 0)])
    apply([Action(Undo.WIPE_PV, "/dev/sdc")], fake)
    assert fake.commands == []
    apply([Action(Undo.WIPE_PV, "/dev/sdb")], fake)
    assert fake.commands == [("pvremove", "-q", "-y", "-ff", "/dev/sdb")]


def test_only_our_arrays_superblock_is_zeroed():
    fake = FakeLvm()
    fake.runner.on(["mdadm", "--examine"], "MD_LEVEL=raid1\nMD_NAME=host:other\n")
    apply([Action(Undo.ZERO_MD, "/dev/sdb", "ts-vg0")], fake)
    assert len(fake.runner.calls) == 1
    fake.runner.on(["mdadm", "--examine"], "MD_LEVEL=raid1\nMD_NAME=(none):ts-vg0\n")
    apply([Action(Undo.ZERO_MD, "/dev/sdb", "ts-vg0")], fake)
    assert fake.runner.argvs[-1] == ["mdadm", "--zero-superblock", "/dev/sdb"]


def test_every_kind_of_action_has_its_undo():
    assert set(recovery.UNDO) == set(Undo)
