"""Reading a pool: its status from LVM's and the kernel's view, the JSON schema docs/json.md
documents, the metadata check and per-volume usage (a FakeLvm and a DeviceMapper over a
FakeRunner handed in)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from tests.fakes import FakeLvm, FakeRunner
from tests.unit.test_pools import CHUNK, MiB, kernel, lv, vg
from thinstack import poolstatus
from thinstack.dm.client import DeviceMapper
from thinstack.dm.status import Failed, PoolMode
from thinstack.errors import Refused, ThinstackError
from thinstack.lock import LockTimeout
from thinstack.thinpool import reading_metadata


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
    ("## `pool repair --json`", "thinstack.repair:Repaired"),
    ("## `import --json`", "thinstack.imports:Summary"),
    ("## `export --json`", "thinstack.exports:Summary"),
    ("## `reclaim --json`", "thinstack.reclaim:Summary"),
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
    assert poolstatus.pool_status(in_vg(vg(), lv()), [], Failed()).mode == "fail"


# --- the kernel's side, through a FakeRunner: dmsetup, thin_check and thin_ls ------------------

TPOOL_INFO = "vg0-pool-tpool/254/3/1/0/L--w/LVM-pool-tpool\n"
TABLE = "0 2097152 thin-pool 254:1 254:2 128 16 0\n"
RESERVE = ["dmsetup", "message", "vg0-pool-tpool", "0", "reserve_metadata_snap"]
RELEASE = ["dmsetup", "message", "vg0-pool-tpool", "0", "release_metadata_snap"]


def status_line(held="-"):
    return (f"0 2097152 thin-pool 2 4124/262144 5/256 {held} rw no_discard_passdown "
            "queue_if_no_space - 1024\n")


@pytest.fixture
def one_pool(tmp_path, monkeypatch):
    """VG vg0 with its pool (a FakeLvm as the default Lvm), and the pool's kernel device as a
    FakeRunner answers for it: active, reservable, its metadata clean; tests change the answers."""
    fake = FakeLvm(vgs=[vg()], lvs=[lv(), thin("a", 1), thin("b", 2)])
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    runner = FakeRunner(default=None)  # any command not answered here fails the test
    runner.on(["dmsetup", "info"], TPOOL_INFO).on(["dmsetup", "table"], TABLE)
    runner.on(["dmsetup", "status"], status_line()).on(["dmsetup", "message"], "")
    runner.on("thin_check", "").on("thin_ls", "1 10 4 6\n2 6 0 6\n")
    return runner


def thin(name, thin_id):
    return dataclasses.replace(lv(name, attr="Vwi-a-tz--", pool="pool", tags=()),
                               segtype="thin", thin_id=thin_id)


def inactive(runner):
    runner.fail(["dmsetup", "info"], "Device does not exist.\nCommand failed.\n")


def busy(runner, held="-"):
    """Someone holds the metadata snapshot (its root: `held`), or the reservation failed."""
    runner.fail(RESERVE, "device-mapper: message ioctl on vg0-pool-tpool failed: Device or "
                         "resource busy\nCommand failed.\n")
    runner.on(["dmsetup", "status"], status_line(held))


def test_check_reads_a_metadata_snapshot_and_reports_damage_as_an_error(one_pool):
    dm = DeviceMapper(one_pool)
    assert poolstatus.check("vg0", dm=dm) == "vg0/pool: metadata clean"
    reads = [a for a in one_pool.argvs if a[1] in ("message", "-m", "--metadata-snap")]
    assert reads[:3] == [RESERVE, ["thin_check", "--metadata-snap", "/dev/block/254:1"], RELEASE]
    assert [reads[3], reads[4][0], reads[5]] == [RESERVE, "thin_ls", RELEASE]  # ids vs LVM's
    one_pool.fail("thin_check", "examining superblock\nbad checksum in superblock")
    with pytest.raises(ThinstackError, match="damaged .bad checksum in superblock."):
        poolstatus.check("vg0", dm=dm)
    assert one_pool.argvs[-1] == RELEASE  # let go however the read ends
    one_pool.on(["dmsetup", "status"], "0 2097152 thin-pool Fail\n")
    with pytest.raises(ThinstackError,
                       match="kernel failed the pool.*`thinstack pool repair vg0/pool`"):
        poolstatus.check("vg0", dm=dm)


def test_check_names_thin_ids_lvm_and_the_pool_disagree_on(one_pool):
    # After a power cut between LVM's commit and the pool's: a volume LVM lists that the pool
    # lost (b, id 2), and a thin id no volume has (7).
    one_pool.on("thin_ls", "1 10 4 6\n7 6 0 6\n")
    with pytest.raises(ThinstackError, match=r"^vg0/pool: metadata clean, but LVM and the pool "
                       r"disagree: it lost volumes, .*: b; it holds thin ids no volume has: 7$"):
        poolstatus.check("vg0", dm=DeviceMapper(one_pool))


def test_check_of_a_pool_the_kernel_no_longer_trusts_asks_for_repair(one_pool):
    one_pool.on(["dmsetup", "status"], status_line().replace(" rw ", " ro ").replace(
        " - 1024", " needs_check 1024"))
    with pytest.raises(ThinstackError, match=r"^vg0/pool: metadata damaged \(the kernel has the "
                       r"pool needs_check\); repair it with `thinstack pool repair vg0/pool`$"):
        poolstatus.check("vg0", dm=DeviceMapper(one_pool))
    assert RESERVE not in one_pool.argvs  # a read-only pool takes no messages


def test_check_of_an_inactive_or_busy_pool_is_refused(one_pool):
    busy(one_pool)
    with pytest.raises(Refused, match="another reader"):
        poolstatus.check("vg0", dm=DeviceMapper(one_pool))
    inactive(one_pool)
    with pytest.raises(Refused, match="not active"):
        poolstatus.check("vg0", dm=DeviceMapper(one_pool))


def test_thin_usage_in_bytes_or_none(one_pool):
    dm = DeviceMapper(one_pool)
    # Keyed by pool and thin id: thin ids are per pool, and a VG may hold several.
    assert poolstatus.thin_usage("vg0", dm=dm) == {("pool", 1): (10 * CHUNK, 4 * CHUNK, 6 * CHUNK),
                                                   ("pool", 2): (6 * CHUNK, 0, 6 * CHUNK)}
    assert poolstatus.thin_usage("vg0", [lv("a", attr="Vwi-a-tz--", tags=())], dm) is None
    assert poolstatus.thin_usage("other", dm=dm) is None
    busy(one_pool)
    assert poolstatus.thin_usage("vg0", dm=dm) is None
    inactive(one_pool)
    assert poolstatus.thin_usage("vg0", dm=dm) is None


def test_usage_falls_back_when_someone_holds_the_metadata_snapshot(one_pool):
    """The reproduced bug: `thinstack list` printed a traceback here. Someone else (dmsetup by
    hand, another tool) holds the pool's one metadata snapshot, root 52."""
    busy(one_pool, held="52")
    assert poolstatus.thin_usage("vg0", dm=DeviceMapper(one_pool)) is None
    with pytest.raises(Refused, match="vg0/pool: .*another reader"):
        poolstatus.check("vg0", dm=DeviceMapper(one_pool))
    assert RELEASE not in one_pool.argvs  # not ours to let go


def test_a_thinstack_reader_that_waited_too_long_is_refused():
    def held_for_long():
        raise LockTimeout("thin-pool vg0-pool-tpool: another reader has held its metadata "
                          "snapshot for over 30 s")

    with pytest.raises(Refused, match="vg0/pool: .*another reader.*try again"):
        reading_metadata(lv(), held_for_long)


def test_other_dm_and_command_failures_are_thinstack_errors(one_pool):
    one_pool.fail("thin_ls", "bad superblock")
    with pytest.raises(ThinstackError, match="^vg0/pool: .*bad superblock"):
        poolstatus.thin_usage("vg0", dm=DeviceMapper(one_pool))
    busy(one_pool)
    one_pool.on(["dmsetup", "status"], "0 2097152 thin-pool Fail\n")  # and then it failed
    with pytest.raises(ThinstackError, match="^vg0/pool: thin-pool vg0-pool-tpool has failed"):
        poolstatus.thin_usage("vg0", dm=DeviceMapper(one_pool))


# --- the one mode, and what may change a pool in it --------------------------------------------

@pytest.mark.parametrize("status, mode", [
    (None, "inactive"),
    (Failed(), "fail"),
    (kernel(), "rw"),
    (kernel(mode=PoolMode.OUT_OF_DATA_SPACE), "out_of_data_space"),
    (kernel(mode=PoolMode.RO), "ro"),
    (dataclasses.replace(kernel(mode=PoolMode.RO), needs_check=True), "needs_check"),
    (dataclasses.replace(kernel(), needs_check=True), "needs_check"),
])
def test_the_pool_shows_one_mode_the_worst(status, mode):
    assert poolstatus.pool_mode(status) == mode
    if status is not None:
        assert poolstatus.pool_status(in_vg(vg(), lv()), [lv()], status).mode == mode


@pytest.mark.parametrize("mode, kind, allowed", [
    ("rw", "create", True), ("inactive", "snapshot", True),
    ("out_of_data_space", "delete", True), ("out_of_data_space", "pool-extend", True),
    ("out_of_data_space", "reclaim", True), ("out_of_data_space", "create", False),
    ("out_of_data_space", "import", False), ("ro", "delete", False),
    ("needs_check", "pool-extend", False), ("fail", "clone", False),
    ("needs_check", "pool-repair", True), ("fail", "pool-repair", True),
])
def test_what_may_change_a_pool_in_each_mode(mode, kind, allowed):
    why = poolstatus.refusal("vg0/pool", mode, kind)
    assert (why is None) == allowed
    if why:
        assert why.startswith(f"pool vg0/pool is {mode}: ") and "\n" not in why
        fix = "thinstack pool extend vg0/pool" if mode == "out_of_data_space" else \
            "thinstack pool repair vg0/pool"
        assert fix in why


def test_every_operation_refuses_a_pool_not_writable_before_recovery_or_journal(
        one_pool, tmp_path, monkeypatch, mocker):
    from thinstack import recovery, volumes
    from thinstack.journal import Journal
    from thinstack.lvm import VolumeRef
    fake = FakeLvm(vgs=[vg()], lvs=[lv()])
    fake.runner = one_pool  # the pool's device, as the kernel shows it
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    recover = mocker.spy(recovery, "recover_vg")
    one_pool.on(["dmsetup", "status"], status_line().replace(" rw ", " ro "))
    with pytest.raises(Refused, match=r"^pool vg0/pool is ro: .*`thinstack pool repair vg0/pool`"):
        volumes.create(VolumeRef("vg0", "new"), 1 << 30)
    one_pool.on(["dmsetup", "status"], status_line().replace(" - 1024", " needs_check 1024"))
    with pytest.raises(Refused, match="is needs_check"):
        volumes.delete(VolumeRef("vg0", "new"))
    assert recover.call_count == 0 and Journal().pending() == [] and fake.commands == []
    one_pool.on(["dmsetup", "status"], status_line().replace(" rw ", " out_of_data_space "))
    with pytest.raises(Refused, match="is out_of_data_space: grow it"):
        volumes.create(VolumeRef("vg0", "new"), 1 << 30)
    fake.lv_list.append(lv("vm", attr="Vwi-a-tz--", pool="pool", tags=()))
    one_pool.on(["lvm", "lvremove"], "")
    volumes.delete(VolumeRef("vg0", "vm"))  # frees space: allowed
    assert [c[0] for c in fake.commands] == ["lvremove"]
