"""The recovery decisions: what an interrupted operation leaves to do."""

from thinstack.journal import Entry
from thinstack.lvm import LV
from thinstack.recovery import Action, plan


def lv(name, *, tags=(), origin="", attr="Vwi-a-tz--"):
    return LV(vg="vg", name=name, uuid=name, attr=attr, size=1 << 30, segtype="thin",
              pool="pool", origin=origin, data_percent=0.0, metadata_percent=None,
              tags=frozenset(tags), path=f"/dev/vg/{name}", dm_path=f"/dev/mapper/vg-{name}",
              thin_id=1, chunk_size=0, metadata_size=0, skip_activation=False, when_full="")


RO = "Vri-a-tz--"


def entry(op, steps=(), id="abc", **args):
    return Entry(id=id, op=op, vg="vg", args=args, steps=list(steps))


def test_uncommitted_volume_is_removed_even_without_a_journal():
    assert plan([], [lv("a"), lv("b", tags={"ts_op_zzz"})]) == [Action("remove", "vg/b")]


def test_committed_operation_keeps_its_volume_and_drops_the_leftover_tag():
    e = entry("clone", steps=["committed"], name="c")
    assert plan([e], [lv("c", tags={e.tag})]) == [Action("deltag", "vg/c", e.tag)]


def test_snapshots_go_before_their_origins():
    tag = "ts_op_abc"
    lvs = [lv("base", tags={tag}), lv("snap", tags={tag}, origin="base"),
           lv("snap2", tags={tag}, origin="snap")]
    assert [a.target for a in plan([entry("import")], lvs)] == ["vg/snap2", "vg/snap", "vg/base"]


def test_interrupted_gold_is_made_writable_again():
    e = entry("gold", steps=["readonly:g"], name="g")
    assert plan([e], [lv("g", attr=RO)]) == [Action("writable", "vg/g")]


def test_gold_that_reached_its_tag_stays_read_only():
    e = entry("gold", steps=["readonly:g"], name="g")  # killed after the tag, before the journal
    assert plan([e], [lv("g", attr=RO, tags={"ts_gold"})]) == []


def test_clone_rolled_back_restores_a_writable_external_origin():
    e = entry("clone", steps=["readonly:base"], name="c", origin="base")
    lvs = [lv("base", attr=RO), lv("c", tags={e.tag}, origin="base")]
    assert plan([e], lvs) == [Action("remove", "vg/c"), Action("writable", "vg/base")]


def test_origin_stays_read_only_while_another_clone_depends_on_it():
    e = entry("clone", steps=["readonly:base"], name="c2", origin="base")
    lvs = [lv("base", attr=RO), lv("c1", origin="base"), lv("c2", tags={e.tag}, origin="base")]
    assert plan([e], lvs) == [Action("remove", "vg/c2")]


def test_single_command_operations_need_nothing():
    assert plan([entry("delete", name="x"), entry("resize", name="y", size=5)], [lv("y")]) == []


def test_resumable_import_is_kept_until_explicitly_recovered():
    e = entry("import", name="vm1")
    assert plan([], [lv("vm1.importing", tags={e.tag})], keep=frozenset({e.tag})) == []
    assert plan([e], [lv("vm1.importing", tags={e.tag})]) == [Action("remove", "vg/vm1.importing")]


OUTSIDE = {"ts_ext_origin=/dev/sdb", "ts_ext_size=1048576"}


def test_an_unfinished_clone_of_an_outside_device_is_taken_down_before_lvm_removes_it():
    e = entry("clone", steps=["devro:/dev/sdb"], name="c", origin="/dev/sdb")
    lvs = [lv("c", tags={e.tag, *OUTSIDE})]
    assert plan([e], lvs) == [Action("release", "vg/c", "TS-EXT-c"), Action("remove", "vg/c"),
                              Action("device-writable", "/dev/sdb")]


def test_an_outside_device_stays_read_only_while_a_committed_clone_reads_it():
    e = entry("clone", steps=["devro:/dev/sdb"], name="c2", origin="/dev/sdb")
    lvs = [lv("c1", tags=OUTSIDE), lv("c2", tags={e.tag, *OUTSIDE})]
    assert plan([e], lvs) == [Action("release", "vg/c2", "TS-EXT-c2"), Action("remove", "vg/c2")]


def test_a_committed_outside_clone_keeps_its_device_read_only():
    e = entry("clone", steps=["devro:/dev/sdb", "committed"], name="c", origin="/dev/sdb")
    assert plan([e], [lv("c", tags={e.tag, *OUTSIDE})]) == [Action("deltag", "vg/c", e.tag)]
