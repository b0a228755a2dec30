import json
import os

import pytest

from tests.fakes import FakeLvm
from thinstack import journal as journal_module
from thinstack import recovery
from thinstack.journal import Journal, check, write_all
from thinstack.lvm import LV, VG


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    monkeypatch.setattr(journal_module, "_reported", set())


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
    assert j.pending() == [] and j.damaged() == []


def test_entries_come_back_oldest_first_and_interrupted_writes_are_ignored(tmp_path):
    j = Journal(tmp_path)
    first = j.begin("create", "vg0", name="a")
    second = j.begin("create", "vg0", name="b")
    (tmp_path / "vg0.x.tmp").write_text("{}")  # a write interrupted before its rename
    assert [e.id for e in j.pending()] == [first.id, second.id]
    assert j.damaged() == []


def test_missing_folder_means_nothing_pending(tmp_path):
    assert Journal(tmp_path / "absent").pending() == []
    assert Journal(tmp_path / "absent").damaged() == []


def test_the_folder_is_made_private(tmp_path):
    Journal(tmp_path / "state" / "journal").begin("create", "vg0", name="a")
    assert (tmp_path / "state" / "journal").stat().st_mode & 0o777 == 0o700


def torn(tmp_path, capsys):
    """An import entry cut short, as a disk that lied about a flush leaves it."""
    j = Journal(tmp_path)
    e = j.begin("import", "vg0", name="vm1", size=1 << 30, path="/img", source={"size": 1})
    path = tmp_path / f"vg0.{e.id}.json"
    path.write_bytes(path.read_bytes()[:40])
    return j, e, path


def test_a_torn_entry_is_reported_by_name_once_and_never_acted_on(tmp_path, capsys):
    j, e, path = torn(tmp_path, capsys)
    assert j.pending("vg0") == [] and j.pending("vg0") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "not valid JSON" in err[0]
    assert f"ts_op_{e.id}" in err[0]
    (d,) = j.damaged("vg0")
    assert (d.path, d.vg, d.id, d.tag) == (path, "vg0", e.id, f"ts_op_{e.id}")
    assert j.damaged("vg1") == [] and j.damaged_tags("vg0") == {f"ts_op_{e.id}"}
    assert f"delete {path}" in d.advice() and f"@ts_op_{e.id}" in d.advice()
    assert path.exists()  # never removed behind the operator's back


@pytest.mark.parametrize("field, value, reason", [
    ("steps", "committed", "steps: str where list belongs"),
    ("steps", [1], "steps: int where str belongs"),
    ("args", [], "args: list where dict belongs"),
    ("started", "yesterday", "started: str where int or float belongs"),
    ("pid", True, "pid: bool where int belongs"),
    ("op", None, "op: NoneType where str belongs"),
    ("vg", "vg1", "it names vg1"),
])
def test_a_field_of_the_wrong_type_is_damage_not_a_traceback(tmp_path, field, value, reason):
    j = Journal(tmp_path)
    e = j.begin("clone", "vg0", name="c")
    path = tmp_path / f"vg0.{e.id}.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    assert j.pending() == []
    (d,) = j.damaged()
    assert reason in d.reason


def test_args_that_recovery_reads_are_checked_too():
    good = {"id": "ab", "op": "import", "vg": "vg0", "steps": ["copied:4096"], "started": 1.0,
            "pid": 1, "args": {"name": "v", "size": 4096, "source": {}}}
    assert check(good, "vg0", "ab") is None
    assert "args.size" in check({**good, "args": {**good["args"], "size": "4096"}}, "vg0", "ab")
    assert "args.source is missing" in check({**good, "args": {"name": "v", "size": 1}},
                                             "vg0", "ab")
    assert "copied:NUMBER" in check({**good, "steps": ["copied:x"]}, "vg0", "ab")
    assert "missing pid" in check({k: v for k, v in good.items() if k != "pid"}, "vg0", "ab")
    assert "unknown field x" in check({**good, "x": 1}, "vg0", "ab")
    # Arguments of operations yet to come pass; those of pool-create may be null.
    assert check({**good, "op": "export", "args": {"name": "v", "partial": "/p", "new": [1]}},
                 "vg0", "ab") is None
    assert check({**good, "op": "pool-create", "args": {"size": None, "raid1": False}},
                 "vg0", "ab") is None
    # A mount's recovery reads its lock and unmounts its mountpoint, given as paths.
    mount = {**good, "op": "mount", "args": {"name": "v", "mountpoint": "/m", "lock": "/l"}}
    assert check(mount, "vg0", "ab") is None
    assert "args.lock is missing" in check({**mount, "args": {"name": "v", "mountpoint": "/m"}},
                                           "vg0", "ab")
    assert "args.mountpoint: list" in check(
        {**mount, "args": {**mount["args"], "mountpoint": ["/m"]}}, "vg0", "ab")


def test_a_file_whose_name_is_not_ours_is_reported_for_every_vg(tmp_path):
    (tmp_path / "junk.json").write_text("{}")
    (d,) = Journal(tmp_path).damaged("vg0")
    assert (d.vg, d.id, d.tag) == ("", "", "") and "not VG.ID.json" in d.reason
    assert Journal(tmp_path).damaged_tags("vg0") == frozenset()


def test_writes_loop_until_every_byte_is_written(tmp_path, monkeypatch):
    real_write, sizes = os.write, []

    def short(fd, data):  # the kernel may write less than asked
        sizes.append(len(data))
        return real_write(fd, bytes(data[:7]))
    monkeypatch.setattr(os, "write", short)
    with open(tmp_path / "f", "wb") as f:
        write_all(f.fileno(), b"x" * 20)
    assert (tmp_path / "f").read_bytes() == b"x" * 20 and sizes == [20, 13, 6]
    j = Journal(tmp_path / "j")
    e = j.begin("create", "vg0", name="a" * 100)
    monkeypatch.setattr(os, "write", real_write)
    assert j.pending()[0].args == {"name": "a" * 100} and e.id


def lv(name, tags=()):
    return LV(vg="vg0", name=name, uuid=name, attr="Vwi-a-tz--", size=1 << 30, segtype="thin",
              pool="pool", origin="", data_percent=0.0, metadata_percent=None,
              tags=frozenset(tags), path=f"/dev/vg0/{name}", dm_path=f"/dev/mapper/vg0-{name}",
              thin_id=1, chunk_size=0, metadata_size=0, skip_activation=False, when_full="")


@pytest.mark.parametrize("explicit", [False, True])
def test_recovery_leaves_the_volumes_of_a_damaged_entry_alone(tmp_path, capsys, explicit):
    j, e, path = torn(tmp_path, capsys)
    other = j.begin("create", "vg0", name="x")
    volumes = [lv("vm1.importing", {e.tag}), lv("x", {other.tag})]
    fake = FakeLvm(vgs=[VG("vg0", "u", 0, 0, 0, 0, 0, 1, frozenset())], lvs=volumes)
    actions = recovery.recover_vg("vg0", j, explicit=explicit, lvs=volumes, lvm=fake)
    # The readable entry is rolled back; the damaged one's volume stays, and so does its file.
    assert [(a.kind, a.target) for a in actions] == [("remove", "vg0/x")]
    assert all("vm1.importing" not in " ".join(c) for c in fake.commands)
    assert path.exists() and j.pending() == []


def test_recover_tells_the_operator_what_to_do_with_a_damaged_entry(tmp_path, capsys, mocker,
                                                                     monkeypatch):
    from thinstack import cli
    j, e, path = torn(tmp_path / "state" / "journal", capsys)
    monkeypatch.setattr("thinstack.lvm.LVM", FakeLvm())
    assert cli.main(["recover"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert str(path) in line and f"delete {path}" in line and f"@ts_op_{e.id}" in line
    assert path.exists()
    path.unlink()
    assert cli.main(["recover"]) == 0


def test_write_atomically_replaces_whole_files_0600_in_a_new_folder(tmp_path):
    from thinstack.journal import write_atomically

    path = tmp_path / "new" / "record.json"
    write_atomically(path, b"one")
    write_atomically(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temporary left
