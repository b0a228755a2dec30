"""The LVM layer over a fake runner: commands as LVM gets them, reports parsed, and LVM's failures
(its messages as lvm2 prints them) classified into thinstack's errors."""

from __future__ import annotations

import json

import pytest

from tests.fakes import FakeRunner
from thinstack.dm.command import CommandError
from thinstack.dm.errors import ParseError
from thinstack.errors import Exists, NoSpace, NotFound, Refused, ThinstackError, Usage
from thinstack.lvm import BadName, Lvm, VolumeRef, classify, dm_name, lv_uuid


def failure(*lines: str) -> CommandError:
    return CommandError(["lvm", "lvcreate"], 5, "".join(f"  {line}\n" for line in lines))


@pytest.mark.parametrize("stderr, kind", [
    (['Volume group "vg9" not found', 'Cannot process volume group vg9'], NotFound),
    (['Failed to find logical volume "vg0/nope"'], NotFound),
    (['Logical Volume "vm1" already exists in volume group "vg0"'], Exists),
    (['Logical volume "vm1" already exists in volume group "vg0"'], Exists),
    (["Insufficient free space: 256 extents needed, but only 10 available"], NoSpace),
    (['Volume group "vg0" has insufficient free space (10 extents): 256 required.'], NoSpace),
    (["Cannot create new thin volume, free space in thin pool vg0/pool reached threshold."],
     NoSpace),
    (["Logical volume vg0/vm1 in use."], Refused),
    (["Logical volume vg0/vm1 contains a filesystem in use."], Refused),
    (["Logical volume vg0/vm1 is used by another device."], Refused),
    (['Can\'t remove open logical volume "vm1"'], Refused),
    # LVM's warnings come first; the error that names the kind is what counts.
    (["WARNING: Sum of all thin volume sizes exceeds the size of thin pool.",
      "Logical volume vg0/vm1 in use."], Refused),
])
def test_lvm_failures_are_classified_by_lvms_own_messages(stderr, kind):
    error = classify(failure(*stderr))
    assert type(error) is kind
    assert str(error) == next(line for line in stderr if not line.startswith("WARNING"))


def test_a_word_in_a_name_is_no_class():
    # `"open" in text` took a VG named "openstack" for a volume in use.
    for text in ['Volume group "openstack" has no free extents left to allocate',
                 "Device /dev/sdb excluded: device is in use by openshift"]:
        error = classify(failure(text))
        assert type(error) is ThinstackError and str(error) == text


def test_an_empty_failure_keeps_the_command():
    error = classify(CommandError(["lvm", "lvs"], 5, ""))
    assert type(error) is ThinstackError and "lvm lvs" in str(error)


def test_a_bad_name_is_a_usage_error():
    with pytest.raises(BadName) as raised:
        VolumeRef.parse("vg0/-bad")
    assert isinstance(raised.value, Usage) and raised.value.exit_status == 2


def report(key: str, *rows: dict) -> str:
    return json.dumps({"report": [{key: list(rows)}]})


LV_ROW = {"lv_name": "vm1", "vg_name": "vg0", "lv_uuid": "u1", "lv_attr": "Vwi-a-tz--",
          "lv_size": "1073741824", "segtype": "thin", "pool_lv": "pool", "origin": "",
          "data_percent": "12.50", "metadata_percent": "", "lv_tags": "ts_gold,x",
          "lv_path": "/dev/vg0/vm1", "lv_dm_path": "/dev/mapper/vg0-vm1", "thin_id": "3",
          "chunk_size": "65536", "lv_metadata_size": "", "lv_skip_activation": "0",
          "lv_when_full": "", "lv_device_open": "1", "vg_free": "4194304",
          "vg_size": "8589934592", "vg_extent_size": "4194304", "vg_tags": "ts_file=/p.img",
          "vg_uuid": "abc-def"}


def test_reports_go_through_the_runner_and_are_parsed():
    runner = FakeRunner(default=None).on(["lvm", "lvs"], report("lv", LV_ROW))
    (lv,) = Lvm(runner).lvs("vg0")
    assert (lv.ref, lv.size, lv.thin_id, lv.data_percent, lv.tags, lv.vg_free) == \
        (VolumeRef("vg0", "vm1"), 1 << 30, 3, 12.5, frozenset({"ts_gold", "x"}), 4 << 20)
    assert lv.active and lv.is_thin and not lv.readonly and lv.open
    # The VG's fields come with each row: no `vgs` needed beside an `lvs`.
    assert (lv.vg_size, lv.vg_extent_size, lv.vg_tags, lv.vg_uuid) == \
        (8 << 30, 4 << 20, frozenset({"ts_file=/p.img"}), "abc-def")
    assert runner.argvs[0][:2] == ["lvm", "lvs"] and runner.argvs[0][-1] == "vg0"


def test_missing_things_are_none_empty_or_not_found():
    runner = FakeRunner(default=None)
    runner.fail(["lvm", "lvs"], '  Failed to find logical volume "vg0/nope"\n')
    runner.fail(["lvm", "vgs"], '  Volume group "vg9" not found\n  Cannot process volume '
                'group vg9\n')
    lvm = Lvm(runner)
    assert lvm.find_lv(VolumeRef("vg0", "nope")) is None
    with pytest.raises(NotFound, match="vg0/nope: no such volume"):
        lvm.lv(VolumeRef("vg0", "nope"))
    assert lvm.vgs("vg9") == []
    with pytest.raises(NotFound):
        lvm.vgs()  # every VG asked for, and LVM cannot say: not an empty answer


def test_commands_fail_as_thinstack_errors_and_keep_the_cause():
    runner = FakeRunner(default=None).fail(["lvm", "lvremove"], "  Logical volume vg0/vm1 in "
                                           "use.\n")
    with pytest.raises(Refused, match=r"^Logical volume vg0/vm1 in use\.$") as raised:
        Lvm(runner).run("lvremove", "-y", "vg0/vm1")
    assert isinstance(raised.value.__cause__, CommandError)


def test_dm_names_and_uuids_are_lvms_own():
    assert dm_name("vg-a", "my-vm") == "vg--a-my--vm" and dm_name("vg0", "vm") == "vg0-vm"
    # A pair read off the lab: lvs's lv_uuid, and the dm uuid of the LV's device.
    vg, lv = "Mb3Jz2bQfZ1o0wXGdPdGk9XrQ6V8nWcE", "Dq9TzS1fOa4LhW2kR8yP0cXvN3bJ7uGe"
    assert lv_uuid(f"LVM-{vg}{lv}") == "Dq9TzS-1fOa-4LhW-2kR8-yP0c-XvN3-bJ7uGe"
    for not_an_lv in (f"LVM-{vg}{lv}-tpool", f"TS-EXT-{vg}{lv}", f"LVM-{vg}", ""):
        with pytest.raises(ParseError):  # a DmError: one line and exit 1, not a traceback
            lv_uuid(not_an_lv)
