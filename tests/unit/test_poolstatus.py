"""Reading a pool: its status from LVM's and the kernel's view, the JSON schema docs/json.md
documents, the metadata check and per-volume usage (a fake kernel device handed in)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from tests.unit.test_pools import CHUNK, MiB, kernel, lv, vg
from thinstack import poolstatus
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError, MetadataSnapHeld
from thinstack.dm.status import Failed, PoolMode
from thinstack.dm.tools import ThinCheckResult, ThinLsEntry
from thinstack.errors import NotFound, Refused, ThinstackError
from thinstack.lock import LockTimeout


def schema_keys(section: str = "## `pool status --json`") -> list[str]:
    doc = (Path(__file__).parents[2] / "docs" / "json.md").read_text()
    block = doc.split(section)[1].split("\n## ")[0]
    return re.findall(r"^\| `(\w+)` \|", block, re.MULTILINE)


def in_vg(vg, pool):
    """The pool as `lvs` reports it: its VG's fields on its row."""
    return dataclasses.replace(pool, vg_size=vg.size, vg_free=vg.free, vg_tags=vg.tags)


def test_documented_schema_is_the_json():
    status = poolstatus.pool_status(in_vg(vg(), lv()), [lv()], kernel())
    assert schema_keys() == list(status.to_json()) == \
        [f.name for f in dataclasses.fields(poolstatus.PoolStatus)]


@pytest.mark.parametrize("section, cls", [
    ("## `list --json`", "thinstack.volumes:VolumeInfo"),
    ("## `import --json`", "thinstack.imports:Summary"),
    ("## `export --json`", "thinstack.exports:Summary"),
])
def test_every_documented_json_is_its_class(section, cls):
    module, _, name = cls.partition(":")
    fields = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]
    assert schema_keys(section) == fields


def test_status_of_an_active_pool():
    thins = [lv("a", attr="Vwi-a-tz--", pool="pool", tags=()),
             lv("b", attr="Vwi-a-tz--", pool="pool", tags=())]
    s = poolstatus.pool_status(in_vg(vg(free=4 * MiB, tags=["ts_file=/p.img"]), lv()),
                               [lv(), *thins], kernel(used=4032, meta_used=256))
    assert (s.data_size, s.data_used, s.data_percent) == (1008 * MiB, 4032 * CHUNK, 25.0)
    assert s.metadata_percent == 25.0 and s.metadata_size == 4 * MiB
    assert (s.mode, s.when_full, s.zeroing, s.chunk_size) == ("rw", "queue", True, CHUNK)
    assert (s.grow_threshold, s.grow_step) == (70.0, 252 * MiB)  # untagged: a quarter
    assert (s.vg_size, s.vg_free, s.backing_file, s.thin_count) == \
        (1020 * MiB, 4 * MiB, "/p.img", 2)
    assert s.path == "/dev/mapper/vg0-pool"


def test_status_reads_mode_and_policy_from_kernel_and_tags():
    pool = lv(attr="twi-a-t---", tags=("ts_pool", "ts_grow_threshold=80", "ts_grow_step=1048576"))
    s = poolstatus.pool_status(in_vg(vg(), pool), [pool],
                               kernel(mode=PoolMode.OUT_OF_DATA_SPACE, error=True))
    assert (s.mode, s.when_full, s.zeroing) == ("out_of_data_space", "error", False)
    assert (s.grow_threshold, s.grow_step) == (80.0, MiB)
    off = lv(tags=("ts_pool", "ts_no_grow"))
    s = poolstatus.pool_status(in_vg(vg(), off), [off], kernel())
    assert (s.grow_threshold, s.grow_step) == (None, None)


def test_status_of_inactive_and_failed_pools():
    s = poolstatus.pool_status(in_vg(vg(), lv(attr="twi---tz--")), [], None)
    assert (s.mode, s.data_used, s.data_percent, s.metadata_percent) == \
        ("inactive", None, None, None)
    assert poolstatus.pool_status(in_vg(vg(), lv()), [], Failed()).mode == "failed"


class FakeDevice:
    """A kernel thin-pool device as pools sees it (dm.pool.Pool)."""

    name = "vg0-pool-tpool"

    def __init__(self, check=None, ls=None, busy=False, failed=False, raises=None):
        self._check, self._ls, self._busy, self._raises = check, ls, busy, raises
        self.dm = type("FakeDm", (), {"target_status": lambda _, name: Failed() if failed
                                      else kernel()})()

    def _read(self, value):
        if self._raises is not None:
            raise self._raises
        if self._busy:
            from thinstack.dm.command import CommandError
            raise CommandError(["dmsetup", "message", "vg0-pool-tpool", "0",
                                "reserve_metadata_snap"], 1, "Device or resource busy")
        return value

    def thin_check(self):
        return self._read(self._check)

    def thin_ls(self):
        return self._read(self._ls)


@pytest.fixture
def one_pool(mocker):
    def volumes_of(name):
        if name != "vg0":
            raise NotFound(f"volume group {name} not found")
        return [lv()]

    mocker.patch("thinstack.lvm.volumes_of", side_effect=volumes_of)


def test_check_reports_damage_as_an_error(one_pool, mocker):
    mocker.patch("thinstack.poolstatus.kernel_pool",
                 return_value=FakeDevice(check=ThinCheckResult(True, "")))
    assert poolstatus.check("vg0") == "vg0/pool: metadata clean"
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(
        check=ThinCheckResult(False, "examining superblock\nbad checksum in superblock")))
    with pytest.raises(ThinstackError, match="damaged .bad checksum in superblock."):
        poolstatus.check("vg0")
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(failed=True))
    with pytest.raises(ThinstackError, match="kernel failed the pool.*lvconvert --repair"):
        poolstatus.check("vg0")


def test_check_of_an_inactive_or_busy_pool_is_refused(one_pool, mocker):
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=None)
    with pytest.raises(Refused, match="not active"):
        poolstatus.check("vg0")
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(busy=True))
    with pytest.raises(Refused, match="another reader"):
        poolstatus.check("vg0")


def test_thin_usage_in_bytes_or_none(one_pool, mocker):
    mocker.patch("thinstack.poolstatus.kernel_pool",
                 return_value=FakeDevice(ls=[ThinLsEntry(1, 10, 4, 6), ThinLsEntry(2, 6, 0, 6)]))
    assert poolstatus.thin_usage("vg0") == {1: (10 * CHUNK, 4 * CHUNK, 6 * CHUNK),
                                       2: (6 * CHUNK, 0, 6 * CHUNK)}
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(busy=True))
    assert poolstatus.thin_usage("vg0") is None
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=None)
    assert poolstatus.thin_usage("vg0") is None
    assert poolstatus.thin_usage("other") is None


@pytest.mark.parametrize("error", [
    # Someone else (dmsetup by hand, another tool) holds the pool's one metadata snapshot.
    MetadataSnapHeld("thin-pool vg0-pool-tpool already holds a metadata snapshot (root 52)"),
    # Another thinstack reader has held it for longer than we wait.
    LockTimeout("thin-pool vg0-pool-tpool: another reader has held its metadata snapshot"),
])
def test_usage_falls_back_when_the_metadata_snapshot_is_held(one_pool, mocker, error):
    """The reproduced bug: `thinstack list` printed a traceback here."""
    mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(raises=error))
    assert poolstatus.thin_usage("vg0") is None
    with pytest.raises(Refused, match="vg0/pool: .*another reader"):
        poolstatus.check("vg0")


def test_other_dm_and_command_failures_are_thinstack_errors(one_pool, mocker):
    for error in (DmError("thin-pool vg0-pool-tpool has failed"),
                  CommandError(["thin_ls", "/dev/mapper/x"], 1, "bad superblock")):
        mocker.patch("thinstack.poolstatus.kernel_pool", return_value=FakeDevice(raises=error))
        with pytest.raises(ThinstackError, match="^vg0/pool: "):
            poolstatus.thin_usage("vg0")
