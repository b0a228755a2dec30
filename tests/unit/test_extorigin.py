"""Clones of devices outside the VG: what is recorded, what the kernel is given, what is refused
(the kernel side is tested in tests/lab/test_volumes.py)."""

import dataclasses

import pytest

from thinstack import extorigin
from thinstack.cli import _origin
from thinstack.errors import NotFound, Refused
from thinstack.lvm import LV, VolumeRef


def lv(name="c", *, vg="vg0", tags=(), size=92 << 20):
    return LV(vg=vg, name=name, uuid="u-1", attr="Vwi---tz-k", size=size, segtype="thin",
              pool="pool", origin="", data_percent=None, metadata_percent=None,
              tags=frozenset(tags), path=f"/dev/{vg}/{name}", dm_path="", thin_id=7,
              chunk_size=0, metadata_size=0, skip_activation=True, when_full="")


ORIGIN = extorigin.Origin(path="/dev/disk/by-id/ata-X_1", devno="8:16", size=90 << 20,
                          readonly=False, is_dm=False, holders=(), mounted=False)


def test_origin_is_recorded_in_tags_and_read_back():
    clone = lv(tags=extorigin.origin_tags(ORIGIN))
    assert extorigin.is_outside_clone(clone)
    assert extorigin.recorded(clone) == ("/dev/disk/by-id/ata-X_1", 90 << 20)
    assert extorigin.recorded(lv()) is None and not extorigin.is_outside_clone(lv())


def test_a_path_lvm_cannot_store_as_a_tag_is_refused_with_advice():
    with pytest.raises(Refused, match="by-id"):
        extorigin.origin_tags(dataclasses.replace(ORIGIN, path="/dev/disk/by-label/my disk"))


def test_table_is_the_thin_target_with_the_origin_over_the_whole_volume():
    table = extorigin.table(lv(), "253:2", "8:16")
    assert table.render() == "0 188416 thin 253:2 7 8:16\n"


def test_dm_names_follow_lvms_dash_escaping_and_the_uuid_is_not_lvms():
    assert extorigin.dm_name(lv("my-vm", vg="vg-a")) == "vg--a-my--vm"
    assert extorigin.tpool_name(lv("pool")) == "vg0-pool-tpool"
    assert extorigin.uuid(lv()) == "TS-EXT-u-1" and not extorigin.uuid(lv()).startswith("LVM-")


@pytest.mark.parametrize("change, message", [
    (dict(mounted=True), "is mounted"),
    (dict(holders=("md0",)), "in use by md0"),
    (dict(is_dm=True), "make it read-only first"),
])
def test_an_origin_something_else_may_write_is_refused(change, message):
    with pytest.raises(Refused, match=message):
        extorigin.check_usable(dataclasses.replace(ORIGIN, **change))


def test_a_read_only_dm_device_and_a_plain_disk_are_usable():
    extorigin.check_usable(ORIGIN)
    extorigin.check_usable(dataclasses.replace(ORIGIN, is_dm=True, readonly=True))


def test_probe_names_what_is_wrong_with_the_path(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotFound, match="no such device"):
        extorigin.probe(str(tmp_path / "missing"))
    with pytest.raises(Refused, match="not a block device"):
        extorigin.probe(str(tmp_path / "file"))
    with pytest.raises(Refused, match="absolute path"):
        extorigin.probe("sdb")


def test_dependants_are_committed_clones_of_that_device(tmp_path):
    target = tmp_path / "dev"
    target.write_bytes(b"")
    (tmp_path / "link").symlink_to(target)
    recorded = {"ts_ext_origin=" + str(tmp_path / "link"), "ts_ext_size=0"}
    clones = [lv("a", tags=recorded), lv("b", tags={*recorded, "ts_op_x"}), lv("c")]
    assert [c.name for c in extorigin.dependants(str(target), clones)] == ["a"]


def test_cli_takes_a_device_path_or_a_volume_as_origin():
    assert _origin("/dev/sdb") == "/dev/sdb"
    assert _origin("vg0/gold") == VolumeRef("vg0", "gold")
