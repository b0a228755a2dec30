"""LVM's shell mode against the real LVM: thinstack's commands through one `lvm` process read and
fail exactly as through one process each, a question is answered "no", and a command over its
time limit ends the shell without stopping the next command."""

from __future__ import annotations

import pytest

from tests.labtools import assert_pool_consistent, lvs, ts
from thinstack.dm.command import RUNNER
from thinstack.errors import ThinstackError
from thinstack.lvm import Lvm, VolumeRef
from thinstack.lvmshell import LvmShell


def outcome(call):
    try:
        return call()
    except ThinstackError as e:
        return type(e).__name__, str(e)


@pytest.mark.lab(disks=1, disk_size="1G")
def test_the_shell_reads_and_fails_as_processes_do(vg):
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
        seen = outcome(lambda: shell.run(*args))
        assert seen == outcome(lambda: processes.run(*args)), args
        assert isinstance(seen, tuple), args
    assert "a" in lvs(vg)  # the question was answered no
    assert shell.shell._process.pid == pid  # one process for all of the above

    timed_out = outcome(lambda: shell.run("lvs", vg, timeout=0.001))
    assert timed_out == ("ThinstackError", "lvm lvs vg0: timed out after 0.001s")
    assert [lv.name for lv in shell.lvs(vg) if lv.name == "a"] == ["a"]  # a new shell
    assert shell.shell._process.pid != pid

    # End to end, with the shell and without it (THINSTACK_LVM_SHELL=0).
    ts("create", f"{vg}/b", "--size", "32M")
    ts("snapshot", f"{vg}/b", "b1", env={"THINSTACK_LVM_SHELL": "0"})
    ts("delete", f"{vg}/b1")
    ts("delete", f"{vg}/b", env={"THINSTACK_LVM_SHELL": "0"})
    assert ts("list", vg, "--json").stdout == ts("list", vg, "--json",
                                                 env={"THINSTACK_LVM_SHELL": "0"}).stdout
    shell.close()
    assert_pool_consistent(vg)
