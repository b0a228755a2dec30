"""`pool repair`: its decisions on plain data (which LV holds the old metadata, what is wrong with
a repaired pool), and its flow over a fake LVM whose runner answers for the pool's device."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.fakes import FakeLvm
from tests.unit.test_pools import lv, vg
from tests.unit.test_poolstatus import status_line
from thinstack import recovery, repair
from thinstack.errors import Refused, ThinstackError
from thinstack.journal import Journal, Step, StepKind
from thinstack.recovery import Action, Undo


def test_the_old_metadata_is_the_new_pool_meta_lv():
    assert repair.old_metadata("pool", {"pool", "vm", "pool_meta0"},
                               {"pool", "vm", "pool_meta0", "pool_meta1"}) == "pool_meta1"
    assert repair.old_metadata("pool", {"pool"}, {"pool", "pool_metadata", "x"}) is None


@pytest.mark.parametrize("clean, output, known, found, said", [
    (True, "", {"a": 1, "b": 2}, {1, 2}, None),
    (True, "", {}, set(), None),
    (False, "examining superblock\nbad checksum in btree node", {"a": 1}, set(),
     r"still fails thin_check \(bad checksum in btree node\)$"),
    (True, "", {"a": 1, "b": 2, "c": 3}, {2}, "lost volumes, .*: a, c$"),
    (True, "", {"a": 1}, {1, 7}, "thin ids no volume has: 7"),
])
def test_what_is_wrong_with_a_repaired_pool(clean, output, known, found, said):
    got = repair.problems(clean, output, known, found)
    assert got is None if said is None else re.search(said, got)


def thin(name, thin_id, **over):
    return dataclasses.replace(lv(name, attr="Vwi-a-tz--", pool="pool", tags=()),
                               thin_id=thin_id, **over)


NEEDS_CHECK = status_line().replace(" rw ", " ro ").replace(" - 1024", " needs_check 1024")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """VG vg0: a pool with an active volume `a` (id 1) and an inactive `b` (id 2); the pool's
    device answers as an active pool the kernel flagged needs_check, whose metadata (once
    repaired) is clean and holds both."""
    fake = FakeLvm(vgs=[vg()], lvs=[lv(), thin("a", 1), thin("b", 2, attr="Vwi---tz--")])

    def lvconvert(*argv):
        if argv[0] == "lvconvert":
            fake.lv_list.append(lv("pool_meta0", attr="-wi-------", tags=()))
    fake.on_command = lvconvert
    r = fake.runner
    r.on(["dmsetup", "info"], "vg0-pool-tpool/254/3/1/0/L--w/LVM-pool-tpool\n")
    r.on(["dmsetup", "table"], "0 2097152 thin-pool 254:1 254:2 128 16 0\n")
    r.on(["dmsetup", "status"], NEEDS_CHECK).on(["dmsetup", "message"], "")
    r.on("thin_check", "").on("thin_ls", "1 10 4 6\n2 6 0 6\n")
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    return fake


def test_repair_deactivates_repairs_checks_then_reactivates_what_was_active(fake):
    done = repair.repair("vg0")
    assert done == repair.Repaired("vg0/pool", "vg0/pool_meta0", 2)
    assert fake.commands == [("lvchange", "-q", "-an", "vg0/a", "vg0/pool"),
                             ("lvconvert", "-q", "-y", "--repair", "vg0/pool"),
                             ("lvchange", "-q", "-ay", "-K", "--config",
                              repair.CLEAR_NEEDS_CHECK, "vg0/pool"),
                             ("lvchange", "-q", "-ay", "-K", "vg0/a")]
    # Checked on a metadata snapshot, before any volume was activated again.
    assert [a[0] for a in fake.runner.argvs if a[0] in ("thin_check", "thin_ls")] == \
        ["thin_check", "thin_ls"]
    assert Journal().pending() == []


def test_a_repair_that_lost_volumes_names_them_and_activates_none(fake):
    fake.runner.on("thin_ls", "2 6 0 6\n")
    with pytest.raises(ThinstackError, match=r"^vg0/pool was repaired, but it lost volumes, .*: "
                       r"a; the old metadata is kept as vg0/pool_meta0$"):
        repair.repair("vg0")
    assert fake.commands[-1][-1] == "vg0/pool"  # the pool only
    assert Journal().pending() == []


def test_open_volumes_are_refused_by_name_before_anything_is_done(fake):
    fake.lv_list[1] = dataclasses.replace(fake.lv_list[1], open=True)
    with pytest.raises(Refused, match="open volumes; close them first: vg0/a$"):
        repair.repair("vg0")
    assert fake.commands == [] and Journal().pending() == []


def test_a_sound_pool_that_disagrees_with_lvm_is_reconciled_in_place(fake):
    # A power cut between LVM's commit and the pool's: the pool lost b (id 2) and kept an id 7
    # no volume has. Its metadata is sound, so nothing is deactivated and open volumes stay.
    fake.lv_list[1] = dataclasses.replace(fake.lv_list[1], open=True)
    fake.runner.on(["dmsetup", "status"], status_line())
    fake.runner.on("thin_ls", "1 10 4 6\n7 6 0 6\n", "1 10 4 6\n2 0 0 0\n")
    done = repair.repair("vg0")
    assert done == repair.Repaired("vg0/pool", None, 2, (7,), ("vg0/b",))
    messages = [a[2:] for a in fake.runner.argvs if a[:2] == ["dmsetup", "message"]]
    assert ["vg0-pool-tpool", "0", "delete", "7"] in messages
    assert ["vg0-pool-tpool", "0", "create_thin", "2"] in messages
    assert fake.commands == [] and Journal().pending() == []


def test_a_repair_runs_in_any_mode_and_leaves_others_leftovers_for_later(fake, mocker):
    fake.runner.on(["dmsetup", "status"], "0 2097152 thin-pool Fail\n", status_line())
    recover = mocker.spy(recovery, "recover_vg")
    repair.repair("vg0")
    assert recover.call_count == 0


def test_an_interrupted_repair_activates_again_what_it_deactivated_if_it_can():
    entry = Journal().begin("pool-repair", "vg0", pool="pool", active=["a", "b"])
    entry.steps += [str(Step(StepKind.INACTIVE, "a")), str(Step(StepKind.INACTIVE, "b"))]
    lvm = FakeLvm(vgs=[vg()], lvs=[lv(), thin("a", 1, attr="Vwi---tz--"), thin("b", 2)])
    assert repair.rollback(entry, lvm) == [Action(Undo.TRY_ACTIVATE, "vg0/a")]
    lvm.runner.fail(["lvm", "lvchange"], "Check of pool vg0/pool failed (status:1).")
    recovery.apply(repair.rollback(entry, lvm), lvm)  # a damaged pool: stays as it was
    entry.steps.append(str(Step(StepKind.COMMITTED)))
    assert repair.rollback(entry, lvm) == []
    assert recovery._resolve(recovery.PLANNERS["pool-repair"]) is repair.rollback


def test_an_interrupted_repair_of_a_vg_removed_since_leaves_nothing_to_do():
    entry = Journal().begin("pool-repair", "vg0", pool="pool", active=["a"])
    entry.steps.append(str(Step(StepKind.INACTIVE, "a")))
    assert repair.rollback(entry, FakeLvm(vgs=[], lvs=[])) == []
    # Nor one that had deactivated nothing yet: it reads nothing.
    entry.steps.clear()
    assert repair.rollback(entry, FakeLvm(vgs=[vg()], lvs=[thin("a", 1)])) == []
