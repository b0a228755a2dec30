"""Every CLI command, through every kind of error its library call can raise: one line on stderr,
the README's exit status, never a traceback. And bad arguments: status 2, one line."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.fakes import FakeRunner
from thinstack import cli
from thinstack.dm import command
from thinstack.dm.command import CommandError, CommandNotFound, CommandTimeout
from thinstack.dm.errors import DmError, MetadataSnapHeld, ParseError
from thinstack.errors import (
    Alert,
    BadImage,
    Exists,
    NoSpace,
    NotFound,
    Refused,
    ThinstackError,
    Usage,
)
from thinstack.exporters import ExportError
from thinstack.importers import ImageError
from thinstack.lab import LabError
from thinstack.lock import LockTimeout
from thinstack.lvm import Lvm

# Each command as a user types it, and the library function it hands the work to.
COMMANDS = {
    ("pool", "create"): (["pool", "create", "vg0", "/dev/sdb"], "thinstack.pools.create"),
    ("pool", "attach"): (["pool", "attach"], "thinstack.pools.attach"),
    ("pool", "status"): (["pool", "status", "vg0"], "thinstack.poolstatus.status"),
    ("pool", "list"): (["pool", "list", "--json"], "thinstack.poolstatus.status"),
    ("pool", "check"): (["pool", "check", "vg0"], "thinstack.pools.check"),
    ("pool", "extend"): (["pool", "extend", "vg0", "1G"], "thinstack.pools.extend"),
    ("pool", "repair"): (["pool", "repair", "vg0"], "thinstack.repair.repair"),
    ("pool", "set"): (["pool", "set", "vg0/t1", "--limit", "1G"], "thinstack.pools.set_pool"),
    ("create",): (["create", "vg0/vm", "--size", "1G"], "thinstack.volumes.create"),
    ("snapshot",): (["snapshot", "vg0/vm", "snap"], "thinstack.volumes.snapshot"),
    ("gold",): (["gold", "vg0/vm"], "thinstack.volumes.gold"),
    ("clone",): (["clone", "vg0/gold", "vg0/vm"], "thinstack.volumes.clone"),
    ("cow",): (["cow", "vg0/gold", "vg0/vm", "--store", "1G"], "thinstack.volumes.cow"),
    ("resize",): (["resize", "vg0/vm", "2G"], "thinstack.volumes.resize"),
    ("delete",): (["delete", "vg0/vm"], "thinstack.volumes.delete"),
    ("list",): (["list", "vg0"], "thinstack.poolstatus.thin_usage"),
    ("info",): (["info", "vg0/vm"], "thinstack.poolstatus.thin_usage"),
    ("reclaim",): (["reclaim", "vg0/vm"], "thinstack.reclaim.reclaim"),
    ("recover",): (["recover", "vg0"], "thinstack.recovery.recover_vg"),
    ("monitor",): (["monitor", "--once"], "thinstack.monitor.run"),
    ("import",): (["import", "disk.vhd", "vg0/vm"], "thinstack.imports.import_image"),
    ("export",): (["export", "vg0/vm", "out.vhd"], "thinstack.exports.export_volume"),
    ("mount",): (["mount", "/mnt"], "thinstack.mount.mount"),
    ("umount",): (["umount", "/mnt"], "thinstack.mount.umount"),
    ("lab", "setup"): (["lab", "setup"], "thinstack.lab.setup"),
    ("lab", "run"): (["lab", "run", "--", "true"], "thinstack.lab.run_lab"),
}

ERRORS = [
    (ThinstackError("the operation failed"), 1),
    (Usage("bad size"), 2),
    (NotFound("vg0/vm: no such volume"), 3),
    (Exists("vg0/vm exists"), 4),
    (Refused("vg0/gold has clones"), 5),
    (LockTimeout("volume group vg0 is locked"), 5),
    (NoSpace("vg0 has no room"), 6),
    (Alert("pool in alert"), 7),
    (BadImage("bad image"), 8),
    (ImageError("disk.vhd", "footer checksum mismatch"), 8),
    (ExportError("a fixed VHD cannot have a parent"), 2),
    (LabError("lab: boot failed: no console", 125), 125),
    # The dm layer's own errors, should one escape untranslated.
    (DmError("thin-pool vg0-pool-tpool has failed"), 1),
    (MetadataSnapHeld("thin-pool vg0-pool-tpool already holds a metadata snapshot"), 1),
    (ParseError("unexpected `dmsetup info` line"), 1),
    (CommandError(["dmsetup", "message"], 1, "device-mapper: message ioctl failed\n"), 1),
    (CommandNotFound(["thin_check"]), 1),
    (CommandTimeout(["lvm", "lvs"], 300), 1),
]


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every runnable command path of the parser, e.g. ("pool", "create")."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield path
        return
    for name, child in actions[0].choices.items():
        yield from subcommands(child, (*path, name))


def test_the_table_covers_every_command():
    assert set(subcommands(cli.build_parser())) == set(COMMANDS)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_failure(capsys, status: int, expected: int) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("thinstack"), err
    assert status == expected, err
    return err


@pytest.mark.parametrize("error, expected", ERRORS, ids=lambda v: type(v).__name__
                         if isinstance(v, Exception) else str(v))
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_error_of_every_command_is_one_line_and_its_status(command, error, expected,
                                                                 state, monkeypatch, capsys):
    argv, entry = COMMANDS[command]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(entry, fail)
    if command == ("recover",):
        monkeypatch.setattr("thinstack.lvm.vgs", lambda *a, **k: [], raising=False)
    if command in (("list",), ("info",)):
        monkeypatch.setattr("thinstack.lvm.volumes_of", lambda *a, **k: [], raising=False)
    one_line_failure(capsys, cli.main(argv), expected)


@pytest.mark.parametrize("argv", [
    ["no-such-command"],
    ["create", "vg0/vm"],  # --size is required
    ["create", "vg0", "--size", "1G"],  # not VG/NAME
    ["create", "vg0/vm.importing", "--size", "1G"],  # thinstack's own suffix
    ["create", "vg0/vm", "--size", "12Q"],
    ["pool", "create", "vg0", "--grow-threshold", "120"],
    ["import", "disk.vhd", "vg0/vm", "--format", "iso"],
    ["export", "vg0/vm", "out", "--bogus"],
    ["list", "--sort", "age"],
    ["lab", "run", "--disks", "two"],
    *[[*path, "--no-such-option"] for path in COMMANDS],
])
def test_bad_arguments_are_a_usage_error_on_one_line(argv, state, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    one_line_failure(capsys, exited.value.code, 2)


# --- `thinstack list` while someone else holds the pool's metadata snapshot --------------------

LV_FIELDS = dict(lv_uuid="u", data_percent="", metadata_percent="", lv_tags="", origin="",
                 lv_skip_activation="0", lv_when_full="queue", vg_free="0",
                 lv_metadata_size="4194304", chunk_size="0", thin_id="", pool_lv="")
LVS = {"report": [{"lv": [
    {**LV_FIELDS, "lv_name": "pool", "vg_name": "vg0", "lv_attr": "twi-aotz--",
     "lv_size": "1073741824", "segtype": "thin-pool", "lv_path": "",
     "lv_dm_path": "/dev/mapper/vg0-pool", "chunk_size": "65536", "data_percent": "1.00",
     "metadata_percent": "2.00"},
    {**LV_FIELDS, "lv_name": "vm", "vg_name": "vg0", "lv_attr": "Vwi-a-tz--",
     "lv_size": "67108864", "segtype": "thin", "pool_lv": "pool", "lv_path": "/dev/vg0/vm",
     "lv_dm_path": "/dev/mapper/vg0-vm", "thin_id": "1", "data_percent": "50.00"},
]}]}
VGS = {"report": [{"vg": [{"vg_name": "vg0", "vg_uuid": "v", "vg_size": "2147483648",
                           "vg_free": "1073741824", "vg_extent_size": "4194304",
                           "vg_extent_count": "512", "vg_free_count": "256", "pv_count": "1",
                           "vg_tags": ""}]}]}
TPOOL_INFO = "vg0-pool-tpool/254/3/1/0/L--w/LVM-pool-tpool\n"


@pytest.fixture
def someone_holds_the_metadata_snapshot(state, monkeypatch):
    """A pool whose metadata snapshot an operator's thin_dump holds (root 52): every command,
    lvm's and dmsetup's, goes to a fake runner."""
    fake = FakeRunner(default="")
    fake.on(["lvm", "vgs"], json.dumps(VGS))
    fake.on(["lvm", "lvs"], json.dumps(LVS))
    fake.on(["dmsetup", "info"], TPOOL_INFO)
    fake.on(["dmsetup", "table"], "0 2097152 thin-pool 254:1 254:2 128 16 0\n")
    fake.on(["dmsetup", "status"], "0 2097152 thin-pool 2 4124/262144 5/256 52 rw "
                                   "no_discard_passdown queue_if_no_space - 1024\n")
    fake.fail(["dmsetup", "message", "vg0-pool-tpool", "0", "reserve_metadata_snap"],
              "device-mapper: message ioctl on vg0-pool-tpool failed: Device or resource busy\n"
              "Command failed.\n")
    monkeypatch.setattr(command.RUNNER, "run", fake.run)
    monkeypatch.setattr(command.RUNNER, "stream", fake.stream)
    monkeypatch.setattr("thinstack.lvm.LVM", Lvm(command.RUNNER))  # no LVM shell: processes
    monkeypatch.setattr("thinstack.dm.client.CONTROL", None)  # no ioctls: dmsetup, faked
    return fake


def test_list_while_another_reader_holds_the_metadata_snapshot_prints_no_traceback(
        someone_holds_the_metadata_snapshot, capsys):
    status = cli.main(["list", "vg0"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") <= 1, err
    assert ["dmsetup", "message", "vg0-pool-tpool", "0", "reserve_metadata_snap"] in \
        someone_holds_the_metadata_snapshot.argvs  # the situation was met
    assert someone_holds_the_metadata_snapshot.argvs.count(
        ["dmsetup", "message", "vg0-pool-tpool", "0", "release_metadata_snap"]) == 0
    if status != 0:
        pytest.xfail("pools._reading_metadata does not yet take MetadataSnapHeld as Refused "
                     f"(B2a): exit {status}, {err.strip()}")
    assert "vg0/vm" in out  # LVM's coarser figures stand in for thin_ls's


# --- `pool create` on a kernel without dm-thin -------------------------------------------------

LAB_HINT = "this kernel has no dm-thin-pool target; run it inside `thinstack lab run`"


def test_a_kernel_without_device_mapper_says_to_use_the_lab(tmp_path):
    from thinstack.provision import require_thin_pool

    misc = tmp_path / "misc"
    misc.write_text(" 60 vhost-net\n 62 fuse\n")
    runner = FakeRunner(default=None)  # nothing is run: /proc/misc says enough
    with pytest.raises(ThinstackError, match=LAB_HINT):
        require_thin_pool(runner, misc)
    misc.write_text(" 60 vhost-net\n236 device-mapper\n")
    runner.fail(["dmsetup", "targets"], "/dev/mapper/control: open failed: No such device\n")
    with pytest.raises(ThinstackError, match=LAB_HINT):
        require_thin_pool(runner, misc)


def test_thin_pool_is_loaded_on_demand_before_it_is_missed(tmp_path):
    from thinstack.provision import require_thin_pool

    misc = tmp_path / "misc"
    misc.write_text("236 device-mapper\n")
    runner = FakeRunner(default=None).on(["dmsetup", "targets"], "striped v1.6.0\n",
                                         "thin-pool v1.23.0\nstriped v1.6.0\n")
    runner.on(["modprobe", "dm-thin-pool"], "")
    require_thin_pool(runner, misc)
    assert runner.argvs[1] == ["modprobe", "dm-thin-pool"]
    runner = FakeRunner(default=None).on(["dmsetup", "targets"], "striped v1.6.0\n")
    runner.fail(["modprobe"], "modprobe: FATAL: Module dm-thin-pool not found\n")
    with pytest.raises(ThinstackError, match=LAB_HINT):
        require_thin_pool(runner, misc)
