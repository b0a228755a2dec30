"""The device filter that keeps a live import's devices (the guest's bytes) out of LVM's scans:
its patterns, the host's own filter kept behind them, and the one place (Lvm.run) that adds it."""

from __future__ import annotations

import re

from tests.fakes import FakeRunner
from thinstack import hidden
from thinstack.lvm import Lvm


def lvm_regex(pattern: str) -> re.Pattern[str]:
    """What LVM's own matcher makes of a pattern like ours: `r|REGEX|`."""
    assert pattern.startswith("r|") and pattern.endswith("|")
    return re.compile(pattern[2:-1])


def test_a_pattern_rejects_its_path_and_no_other():
    for path in ("/dev/nbd0", "/dev/mapper/vg0-vm1-clonedest", "/dev/dm-7",
                 "/dev/disk/by-id/dm-name-vg0-vm1", "/dev/disk/by-path/pci-0000:00:1f.2-ata-1"):
        assert lvm_regex(hidden.pattern(path)).fullmatch(path)
    rx = lvm_regex(hidden.pattern("/dev/nbd1"))
    assert not rx.fullmatch("/dev/nbd10") and not rx.fullmatch("/dev/nbd1p1")


def test_no_quote_or_regex_character_of_a_name_reaches_lvm():
    # LVM allows + and . in VG and LV names; a name under /dev/disk can hold more.
    pattern = hidden.pattern('/dev/vg.x/a+b"c|d\\e[f]')
    assert not set('"\\[]+') & set(pattern) and pattern.count("|") == 2
    assert lvm_regex(pattern).fullmatch('/dev/vg.x/a+b"c|d\\e[f]')


def test_the_hosts_filter_is_read_and_kept_behind_ours():
    host = hidden.host_patterns('filter=["a|^/dev/sd.*|","r|.*|"]\n')
    assert host == ["a|^/dev/sd.*|", "r|.*|"]
    assert hidden.host_patterns('filter=["a|.*|"]') == ["a|.*|"]
    assert hidden.config(["/dev/nbd0", "/dev/dm-3"], host) == \
        'devices{filter=["r|^/dev/nbd0$|","r|^/dev/dm-3$|","a|^/dev/sd.*|","r|.*|"]}'


def test_lvm_commands_carry_the_filter_only_while_something_is_hidden(tmp_path):
    shown: list[str] = []
    runner = FakeRunner().on(["lvmconfig"], 'filter=["a|.*|"]\n')
    lvm = Lvm(runner, hide=lambda: list(shown))
    lvm.run("lvs", "vg0")
    assert runner.argvs == [["lvm", "lvs", "vg0"]]  # nothing live: no filter, no lvmconfig
    # A device of the live import (a regular file here: only block devices are named, so
    # the filter holds the host's patterns alone).
    shown.append(str(tmp_path / "not-a-device"))
    lvm.run("lvchange", "-an", "vg0/a")
    lvm.run("lvs", "vg0")
    lvmconfig = [a for a in runner.argvs if a[0] == "lvmconfig"]
    assert len(lvmconfig) == 1  # the host's filter: asked once a process
    assert runner.argvs[-1] == ["lvm", "lvs", "--config", 'devices{filter=["a|.*|"]}', "vg0"]
    assert runner.argvs[-2][:3] == ["lvm", "lvchange", "--config"]
    # A command with a --config of its own (the monitor's) gets one --config holding both:
    # LVM refuses the option twice ("Error during parsing of command line").
    lvm.run("lvextend", "-q", "-L", "+4m", "vg0/pool", "--config", "activation{x=1}")
    assert runner.argvs[-1] == ["lvm", "lvextend", "-q", "-L", "+4m", "vg0/pool", "--config",
                                'activation{x=1} devices{filter=["a|.*|"]}']
    lvm.close()  # the monitor's pass ends so: the next one reads the host's filter afresh
    lvm.run("lvs", "vg0")
    assert len([a for a in runner.argvs if a[0] == "lvmconfig"]) == 2
