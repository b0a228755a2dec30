"""The mount's decisions without a kernel: which formats and files a volume shows, which volumes
are shown, and which mounts are thinstack's. (FUSE and snapshots: tests/lab/test_mount.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from thinstack import mount, mount_instants
from thinstack.errors import Usage
from thinstack.exporters import vhd
from thinstack.lvm import LV

GiB = 1 << 30


def lv(name: str, attr: str = "Vwi-a-tz--", *, origin: str = "", tags=(), size: int = GiB,
       pool: str = "pool") -> LV:
    # The segment type LVM reports with each attr (a thin pool's own rows are no thin volumes).
    segtype = {"V": "thin", "t": "thin-pool", "T": "linear"}.get(attr[0], "linear")
    return LV(vg="vg0", name=name, uuid=name, attr=attr, size=size, segtype=segtype, pool=pool,
              origin=origin, data_percent=None, metadata_percent=None, tags=frozenset(tags),
              path=f"/dev/vg0/{name}", dm_path="", thin_id=1, chunk_size=0, metadata_size=0,
              skip_activation=False, when_full="")


def test_formats_are_checked_and_those_of_one_suffix_exclude_each_other():
    assert mount.check_formats(["raw", "qcow2", "raw"]) == ("raw", "qcow2")
    for bad, says in [(["iso"], "unknown"), (["vhd", "vhd-fixed"], "choose one"),
                      (["gow1", "gow3"], "choose one")]:
        with pytest.raises(Usage, match=says):
            mount.check_formats(bad)


def test_a_volume_shows_one_file_per_format_and_no_vhd_past_its_limit():
    assert mount.file_names("vm1", GiB, mount.DEFAULT_FORMATS) == {
        "vm1.raw": "raw", "vm1.vhd": "vhd", "vm1.qcow2": "qcow2"}
    assert mount.file_names("vm1", GiB, ("vhd-fixed",)) == {"vm1.vhd": "vhd-fixed"}
    assert mount.file_names("vm1", GiB, ("gow3",)) == {"vm1.gow": "gow3"}
    assert mount.file_names("vm1", 128 * GiB, ("gow1",)) == {}  # v1 holds 64 GiB
    huge = vhd.MAX_SIZE + (1 << 20)
    assert mount.file_names("big", huge, mount.DEFAULT_FORMATS) == {"big.raw": "raw",
                                                                  "big.qcow2": "qcow2"}


def test_shown_volumes_are_the_operators_own():
    lvs = [lv("pool", "twi-aotz--", pool=""), lv("[pool_tdata]", "Twi-ao----", pool=""),
           lv("vm1"), lv("snap", origin="vm1"), lv("gold", "Vri-a-tz--"),
           lv("vm1.export-abc", "Vri-a-tz-k", origin="vm1", tags={"ts_op_abc"}),
           lv("vm1.last-export", "Vri---tz-k", origin="vm1", tags={"ts_last_export"}),
           lv("new.importing", tags={"ts_op_def"}),
           lv("ro", "-ri-a-----", pool=""), lv("rw", "-wi-a-----", pool="")]
    assert sorted(mount_instants.shown(lvs)) == ["gold", "ro", "snap", "vm1"]


def test_only_a_thinstack_fuse_mount_counts(tmp_path, monkeypatch):
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /srv/a\\040b rw,relatime shared:1 - fuse.thinstack thinstack ro\n"
        "37 35 98:0 / /srv/c rw,relatime shared:1 - fuse.sshfs host: rw\n")
    monkeypatch.setattr(mount_instants, "MOUNTINFO", str(info))
    assert mount_instants.mounted(Path("/srv/a b"))
    assert not mount_instants.mounted(Path("/srv/c"))
    assert not mount_instants.mounted(Path("/srv"))


def test_a_mounts_lock_is_its_own_and_found_by_its_mountpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("THINSTACK_RUN_DIR", str(tmp_path))
    first, second = (mount_instants.new_lock(Path("/srv/x")) for _ in range(2))
    assert first != second and first.parent == second.parent
    assert mount_instants.live(Path("/srv/x")) == []  # nobody holds them


def test_private_and_read_only_unless_others_are_let_in_under_the_kernels_checks():
    private = mount.fuse_options(False)
    assert private["ro"] and "allow_other" not in private
    assert "default_permissions" not in private
    shared = mount.fuse_options(True)
    assert shared["allow_other"] and shared["default_permissions"] and shared["ro"]
