"""What each volume operation asks of LVM, over a fake: one report and the one command it wraps
(issue 10: every LVM command is a process, and dear), and its refusals from that report."""

import dataclasses

import pytest

from tests.fakes import FakeLvm
from tests.unit.test_pools import lv as pool_lv
from tests.unit.test_pools import vg
from tests.unit.test_recovery import lv
from thinstack import volumes
from thinstack.errors import Refused
from thinstack.lvm import VolumeRef


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fake = FakeLvm(vgs=[vg("vg")], lvs=[dataclasses.replace(pool_lv(), vg="vg"), lv("vm")])
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    return fake


def test_create_is_one_lvcreate_after_the_report_and_reads_nothing_back(fake):
    assert volumes.create(VolumeRef("vg", "new"), 1 << 30) == "/dev/vg/new"
    assert [c[0] for c in fake.commands] == ["lvcreate"]


def test_gold_is_one_lvchange_that_makes_it_read_only_and_tags_it(fake):
    assert volumes.gold(VolumeRef("vg", "vm")) == "/dev/vg/vm"
    assert fake.commands == [("lvchange", "-q", "-pr", "--addtag", "ts_gold", "--config",
                              "activation{thin_pool_autoextend_threshold=70 monitoring=0}",
                              "vg/vm")]


def test_an_open_volume_is_refused_from_the_report_alone(fake):
    fake.lv_list[1] = dataclasses.replace(fake.lv_list[1], open=True)
    for act in (lambda: volumes.gold(VolumeRef("vg", "vm")),
                lambda: volumes.delete(VolumeRef("vg", "vm"))):
        with pytest.raises(Refused, match="is open"):
            act()
    assert fake.commands == []


def test_delete_is_one_lvremove_with_the_export_base(fake):
    base = lv("vm.last-export", tags={"ts_last_export"}, origin="vm")
    fake.lv_list.append(base)
    volumes.delete(VolumeRef("vg", "vm"))
    assert fake.commands == [("lvremove", "-q", "-y", "vg/vm.last-export", "vg/vm")]


def test_volume_infos_name_each_kind_and_its_dependants():
    lvs = [dataclasses.replace(pool_lv(), vg="vg"), lv("base", tags={"ts_gold"}, attr="Vri-a-tz--"),
           lv("c1", origin="base"), lv("c2", origin="base"), lv("vm"), lv("s", origin="vm"),
           lv("vm.last-export", tags={"ts_last_export"}, origin="vm")]
    infos = {i.name: i for i in volumes.volume_infos(lvs)}
    assert {n: (i.kind, i.dependants) for n, i in infos.items()} == {
        "base": ("gold", ["c1", "c2"]), "c1": ("clone", []), "c2": ("clone", []),
        "vm": ("thin", ["s"]), "s": ("snapshot", [])}
    assert [i.name for i in volumes.volume_infos(lvs, name="vm")] == ["vm"]


def test_list_sorts_by_name_or_biggest_first_with_unknown_usage_last():
    def info(name, size, exclusive):
        return volumes.VolumeInfo(
            vg="vg", name=name, size=size, path="", dm_path="", kind="thin", origin=None,
            readonly=False, gold=False, active=True, dependants=[], mapped_bytes=exclusive,
            exclusive_bytes=exclusive, shared_bytes=0, thin_id=1, pool="pool", origin_pool=None)

    infos = [info("b", 3, None), info("a", 1, 5), info("c", 2, 0)]
    names = {key: [i.name for i in volumes.sort_infos(infos, key)]
             for key in ("name", "size", "exclusive", "mapped")}
    assert names == {"name": ["a", "b", "c"], "size": ["b", "c", "a"],
                     "exclusive": ["a", "c", "b"], "mapped": ["a", "c", "b"]}
