"""LVM's shell mode against the real LVM: thinstack's commands through one `lvm` process read and
fail exactly as through one process each, a question is answered "no", and a command over its
time limit ends the shell without stopping the next command, and a device that comes meanwhile
is seen."""

from __future__ import annotations

import os

import pytest

from tests.labtools import assert_pool_consistent, lvs, sh, ts
from thinstack.dm.command import RUNNER
from thinstack.errors import ThinstackError
from thinstack.lvm import Lvm, VolumeRef
from thinstack.lvmshell import LvmShell


def outcome(lvm, *args, **kwargs):
    """What `lvm.run(*args)` gives: its output, or its error's kind and text."""
    try:
        return lvm.run(*args, **kwargs)
    except ThinstackError as e:
        return type(e).__name__, str(e)


def history() -> bytes | None:
    try:
        with open(os.path.expanduser("~/.lvm_history"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.mark.lab(disks=1, disk_size="1G")
def test_the_shell_reads_and_fails_as_processes_do(vg, tmp_path):
    before = history()
    shell, processes = Lvm(RUNNER, LvmShell()), Lvm(RUNNER, None)
    shell.run("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", "pool", "-V", "64m",
              "-n", "a", "--addtag", "ts_x", vg)
    pid = shell.shell._process.pid
    assert shell.lvs(vg) == processes.lvs(vg) and shell.vgs() == processes.vgs()
    assert shell.pvs() == processes.pvs()
    assert shell.lvs(vg, select="lv_tags=ts_x && lv_name=a")[0].name == "a"
    assert shell.find_lv(VolumeRef(vg, "nope")) is None

    failures = [
        ("lvs", "vg9"),  # no such VG
        ("lvremove", "-q", "-y", f"{vg}/nope"),  # no such LV
        ("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", "pool", "-V", "64m", "-n", "a",
         vg),  # exists
        ("lvremove", f"{vg}/a"),  # asks; a process reads end of input: "no"
        ("lvcreate", "--no-such-option", vg),
    ]
    for args in failures:
        seen = outcome(shell, *args)
        assert seen == outcome(processes, *args), args
        assert isinstance(seen, tuple), args
    assert "a" in lvs(vg)  # the question was answered no
    assert shell.shell._process.pid == pid  # one process for all of the above

    timed_out = outcome(shell, "lvs", vg, timeout=0.001)
    assert timed_out == ("ThinstackError", "lvm lvs vg0: timed out after 0.001s")
    assert [lv.name for lv in shell.lvs(vg) if lv.name == "a"] == ["a"]  # a new shell
    assert shell.shell._process.pid != pid

    # A device that comes after the shell started (a backing file's loop device) is seen: the
    # shell is started again, as LVM's shell keeps the devices it found at its start.
    pid = shell.shell._process.pid
    image = tmp_path / "pv.img"
    image.write_bytes(b"")
    os.truncate(image, 64 << 20)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        sh("pvcreate", "-q", loop)
        assert loop in [pv.name for pv in shell.pvs()]
        assert shell.shell._process.pid != pid
        sh("pvremove", "-q", loop)
    finally:
        sh("losetup", "-d", loop)
    assert loop not in [pv.name for pv in shell.pvs()]

    # End to end, with the shell and without it (THINSTACK_LVM_SHELL=0).
    ts("create", f"{vg}/b", "--size", "32M")
    ts("snapshot", f"{vg}/b", "b1", env={"THINSTACK_LVM_SHELL": "0"})
    ts("delete", f"{vg}/b1")
    ts("delete", f"{vg}/b", env={"THINSTACK_LVM_SHELL": "0"})
    assert ts("list", vg, "--json").stdout == ts("list", vg, "--json",
                                                 env={"THINSTACK_LVM_SHELL": "0"}).stdout
    shell.close()
    assert history() == before  # the operator's LVM shell history: untouched
    assert_pool_consistent(vg)
