"""The operation skeleton over a fake LVM: what a failure leaves, by `on_failure`."""

import pytest

from tests.fakes import FakeLvm
from tests.unit.test_pools import vg
from tests.unit.test_recovery import lv
from thinstack.journal import Journal, Step, StepKind
from thinstack.lvm import VolumeRef
from thinstack.operation import KEEP_FOR_RESUME, ROLL_BACK, operation


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fake = FakeLvm(vgs=[vg("vg")], lvs=[lv("a")])
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    return fake


def test_a_committed_operation_closes_its_entry(fake):
    with operation("create", "vg", {"name": "b"}) as op:
        assert [x.name for x in op.lvs] == ["a"]
        op.commit(VolumeRef("vg", "b"))
    assert ("lvchange", "--deltag", op.entry.tag, "vg/b") in fake.commands
    assert Journal().pending("vg") == []


def test_a_failure_rolls_back_as_recovery_would_and_closes_the_entry(fake):
    fake.lv_list[:] = [lv("a", attr="Vri-a-tz--")]
    with pytest.raises(OSError), operation("create", "vg", {"name": "b"}) as op:
        op.step(Step(StepKind.READONLY, "a"))
        fake.lv_list.append(lv("b", tags={op.entry.tag}, origin="a"))
        raise OSError("boom")
    assert fake.commands == [("lvremove", "-q", "-y", "-f", "vg/b"), ("lvchange", "-prw", "vg/a")]
    assert Journal().pending("vg") == []


def test_keep_for_resume_leaves_the_entry_and_a_policy_may_decide_by_the_error(fake):
    def policy(e, entry):
        return KEEP_FOR_RESUME if isinstance(e, OSError) else ROLL_BACK

    for error, kept in ((OSError, True), (ValueError, False)):
        with pytest.raises(error), operation("create", "vg", {"name": "b"},
                                              on_failure=policy) as op:
            raise error()
        assert [e.id for e in Journal().pending("vg")] == ([op.entry.id] if kept else [])
        if kept:
            Journal().finish(op.entry)


def test_args_may_refuse_before_anything_is_journalled_or_continue_an_entry(fake):
    def refuse(lvs):
        raise ValueError("no")

    with pytest.raises(ValueError), operation("create", "vg", refuse):
        pass
    assert Journal().pending("vg") == []
    old = Journal().begin("create", "vg", name="b")
    with operation("create", "vg", lambda lvs: old) as op:
        assert op.entry is old
    assert Journal().pending("vg") == []


def test_a_later_phase_continues_its_entry_without_recovery_and_may_leave_it_open(fake):
    with operation("create", "vg", {"name": "b"}, finish=False) as op:
        pass
    assert [e.id for e in Journal().pending("vg")] == [op.entry.id]
    # An interrupted operation's volume, which any recovery would remove: this phase leaves it.
    other = Journal().begin("create", "vg", name="c")
    fake.lv_list.append(lv("c", tags={other.tag}))
    with operation("create", "vg", entry=op.entry) as again:
        assert again.entry is op.entry and again.lvs == []
    assert [e.id for e in Journal().pending("vg")] == [other.id] and fake.commands == []
