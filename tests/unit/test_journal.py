from thinstack.journal import Journal


def test_entry_lifecycle(tmp_path):
    j = Journal(tmp_path)
    e = j.begin("clone", "vg0", name="c", origin="g")
    j.step(e, "readonly:g")
    (pending,) = j.pending("vg0")
    assert (pending.op, pending.args, pending.steps) == ("clone", {"name": "c", "origin": "g"},
                                                        ["readonly:g"])
    assert pending.tag == f"ts_op_{e.id}"
    assert j.pending("other") == []
    j.finish(e)
    assert j.pending() == []


def test_entries_come_back_oldest_first_and_strays_are_ignored(tmp_path):
    j = Journal(tmp_path)
    first = j.begin("create", "vg0", name="a")
    second = j.begin("create", "vg0", name="b")
    (tmp_path / "vg0.junk.json").write_text("{not json")
    (tmp_path / "vg0.x.tmp").write_text("{}")  # a write interrupted before its rename
    assert [e.id for e in j.pending()] == [first.id, second.id]


def test_missing_folder_means_nothing_pending(tmp_path):
    assert Journal(tmp_path / "absent").pending() == []
