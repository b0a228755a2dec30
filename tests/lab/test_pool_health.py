"""A pool's health against the real kernel (issue 13): a pool made in an existing VG over a
device-mapper device, driven to needs_check by write errors, refused by every mutating command
and alerted by the monitor, then `pool repair`ed; and a pool whose metadata is damaged (LVM
refuses to activate it), repaired through kills midway. Each test does many checks in one boot."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.labtools import assert_pool_consistent, lvs, sh, ts
from tests.patterns import BLOCK, blocks_match, write_blocks

MiB = 1 << 20
META_BLOCK = 4096
SUPERBLOCK_CSUM_XOR = 160774  # dm-thin-metadata.c
METADATA_SM_ROOT = slice(192, 320)  # the superblock's metadata space map root


def mode(vg: str) -> str:
    (pool,) = json.loads(ts("pool", "status", vg, "--json").stdout)
    return pool["mode"]


def names(vg: str) -> set[str]:
    return set(lvs(vg))


def state_left() -> list[Path]:
    return list((Path(os.environ["THINSTACK_STATE_DIR"]) / "journal").glob("*.json"))


def _crc32c(data: bytes) -> int:
    """The kernel's crc32c(~0, data): without the final inversion."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def edit_superblock(vg: str, edit) -> None:
    """Change the inactive pool's metadata superblock as damage would, with a valid checksum:
    the metadata is swapped into a plain LV (LVM's usual way to reach it), edited, swapped back."""
    sh("lvcreate", "-q", "-an", "-Zn", "-L", "4M", "-n", "swap", vg)
    sh("lvconvert", "-q", "-y", "--thinpool", f"{vg}/pool", "--poolmetadata", f"{vg}/swap")
    sh("lvchange", "-q", "-ay", f"{vg}/swap")
    with open(f"/dev/{vg}/swap", "r+b", buffering=0) as f:
        block = bytearray(f.read(META_BLOCK))
        assert int.from_bytes(block[:4], "little") == _crc32c(block[4:]) ^ SUPERBLOCK_CSUM_XOR
        edit(block)
        block[:4] = (_crc32c(block[4:]) ^ SUPERBLOCK_CSUM_XOR).to_bytes(4, "little")
        f.seek(0)
        f.write(block)
        os.fsync(f.fileno())
    sh("lvchange", "-q", "-an", f"{vg}/swap")
    sh("lvconvert", "-q", "-y", "--thinpool", f"{vg}/pool", "--poolmetadata", f"{vg}/swap")
    sh("lvremove", "-q", "-y", f"{vg}/swap")  # now the pool's former metadata LV: a copy


def switch(name: str, table: str) -> None:
    sh("dmsetup", "load", name, "--table", table)
    sh("dmsetup", "suspend", name)
    sh("dmsetup", "resume", name)


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_pool_in_an_existing_vg_fails_is_refused_alerted_and_repaired(lab_disks):
    # An existing VG on a dm device, with someone's LV: LVM must see the PV only there.
    Path("/etc/lvm/lvmlocal.conf").write_text(
        f'devices {{ global_filter = [ "r|^{lab_disks[0]}$|" ] }}\n')
    size = sh("blockdev", "--getsz", lab_disks[0]).strip()
    linear = f"0 {size} linear {lab_disks[0]} 0"
    sh("dmsetup", "create", "disk0", "--table", linear)
    sh("pvcreate", "-q", "/dev/mapper/disk0")
    sh("vgcreate", "-q", "vgx", "/dev/mapper/disk0")
    sh("lvcreate", "-q", "-y", "-L", "32M", "-n", "theirs", "vgx")
    write_blocks("/dev/vgx/theirs", "theirs", [0, 100 * BLOCK])

    missing = ts("pool", "create", "nosuch", check=False)
    assert missing.returncode == 3 and "volume group nosuch not found" in missing.stderr
    too_big = ts("pool", "create", "vgx", "--size", "2G", check=False)
    assert too_big.returncode == 6 and "free" in too_big.stderr and "\n" == too_big.stderr[-1:]
    for point in ("after-intent", "after-pool"):  # a rollback removes the pool, only it
        killed = ts("pool", "create", "vgx", env={"THINSTACK_FAULT": f"pool-create:{point}"},
                    check=False)
        assert killed.returncode == -9, killed.stderr
        ts("recover", "vgx")
        assert names("vgx") == {"theirs"} and state_left() == []
    ts("pool", "create", "vgx", "--size", "300M")
    again = ts("pool", "create", "vgx", check=False)
    assert again.returncode == 4 and "already has a volume named pool" in again.stderr
    assert mode("vgx") == "rw"
    ts("create", "vgx/vm", "--size", "64M")
    write_blocks("/dev/vgx/vm", "vm", [0, 300 * BLOCK])  # O_DIRECT, then flushed
    sh("sync")

    # Writes to the disk fail (reads work: LVM still finds its VG): a write to a new chunk
    # makes the pool commit its metadata, which fails; the kernel flags it needs_check.
    switch("disk0", f"0 {size} flakey {lab_disks[0]} 0 0 86400 1 error_writes")
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/vgx/vm", "bs=64k", "seek=500", "count=1",
                    "oflag=direct", "conv=fsync"], capture_output=True, timeout=120)
    assert mode("vgx") == "needs_check"
    for argv in (["create", "vgx/x", "--size", "8M"], ["snapshot", "vgx/vm", "s"],
                 ["delete", "vgx/vm"], ["pool", "extend", "vgx", "8M"]):
        refused = ts(*argv, check=False)
        assert refused.returncode == 5, (argv, refused.stderr)
        assert refused.stderr == ("thinstack: pool vgx/pool is needs_check: repair it first "
                                  "(`thinstack pool repair vgx/pool`)\n"), refused.stderr
    check = ts("pool", "check", "vgx", check=False)
    assert check.returncode == 1 and "`thinstack pool repair vgx/pool`" in check.stderr
    monitor = ts("monitor", "--once", check=False)
    assert monitor.returncode == 7 and "ALERT vgx/pool: mode rw -> needs_check" in monitor.stderr
    prom = (Path(os.environ["THINSTACK_RUN_DIR"]) / "monitor.prom").read_text()
    assert 'thinstack_pool_mode{vg="vgx",pool="pool",mode="needs_check"} 1' in prom

    # The disk is back. An open volume stops the repair, by name.
    switch("disk0", linear)
    with open("/dev/vgx/vm", "rb"):
        busy = ts("pool", "repair", "vgx", check=False)
    assert busy.returncode == 5 and busy.stderr.rstrip().endswith("close them first: vgx/vm")
    done = json.loads(ts("pool", "repair", "vgx", "--json").stdout)
    assert done == {"pool": "vgx/pool", "old_metadata": "vgx/pool_meta0", "volumes": 1,
                    "deleted_ids": [], "emptied": []}
    assert mode("vgx") == "rw" and "pool_meta0" in names("vgx")
    assert blocks_match("/dev/vgx/vm", "vm", [0, 300 * BLOCK])  # flushed before the fault
    assert blocks_match("/dev/vgx/theirs", "theirs", [0, 100 * BLOCK])
    ts("create", "vgx/after", "--size", "8M")
    assert_pool_consistent("vgx")
    assert state_left() == []


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_damaged_metadata_is_repaired_through_kills_with_the_old_kept(lab_disks):
    ts("pool", "create", "vg0", lab_disks[0], "--size", "64M")
    ts("create", "vg0/vm", "--size", "64M")
    write_blocks("/dev/vg0/vm", "vm", [0, 200 * BLOCK])
    ts("snapshot", "vg0/vm", "snap")
    write_blocks("/dev/vg0/vm", "vm2", [0])

    # A repair killed once the volumes are down: recovery brings back what was active.
    killed = ts("pool", "repair", "vg0", env={"THINSTACK_FAULT": "pool-repair:after-deactivate"},
                check=False)
    assert killed.returncode == -9, killed.stderr
    assert lvs("vg0")["vm"]["lv_attr"][4] != "a" and mode("vg0") == "inactive"
    ts("recover", "vg0")
    assert lvs("vg0")["vm"]["lv_attr"][4] == "a" and state_left() == []
    assert mode("vg0") == "rw" and names("vg0") & {"pool_meta0", "pool_meta1"} == set()

    # Damaged metadata: LVM refuses to activate the pool at all, and says so.
    sh("lvchange", "-q", "-an", "vg0/vm", "vg0/snap", "vg0/pool")
    edit_superblock("vg0", lambda b: b.__setitem__(METADATA_SM_ROOT, bytes(128)))
    failed = subprocess.run(["lvchange", "-ay", "vg0/vm"], capture_output=True, text=True)
    assert failed.returncode != 0 and "Manual repair required" in failed.stderr
    assert mode("vg0") == "inactive"
    check = ts("pool", "check", "vg0", check=False)
    assert check.returncode == 5 and "not active" in check.stderr

    # Killed right after LVM's commit: repaired, the old metadata kept; recovery adds nothing.
    killed = ts("pool", "repair", "vg0", env={"THINSTACK_FAULT": "pool-repair:after-repair"},
                check=False)
    assert killed.returncode == -9, killed.stderr
    ts("recover", "vg0")
    assert "pool_meta0" in names("vg0") and state_left() == []
    out = ts("pool", "repair", "vg0").stdout  # again: checked this time
    assert out.strip() == ("vg0/pool: repaired, 2 volumes checked; old metadata kept as "
                           "vg0/pool_meta1 (lvremove it when no longer needed)")
    assert {"pool_meta0", "pool_meta1"} <= names("vg0") and mode("vg0") == "rw"
    ts("pool", "attach", "vg0")
    sh("lvchange", "-q", "-ay", "-K", "vg0/snap")
    assert blocks_match("/dev/vg0/vm", "vm2", [0]) and blocks_match("/dev/vg0/snap", "vm", [0])
    assert blocks_match("/dev/vg0/vm", "vm", [200 * BLOCK])
    assert ts("pool", "check", "vg0").stdout.strip() == "vg0/pool: metadata clean"
    ts("create", "vg0/after", "--size", "8M")
    assert_pool_consistent("vg0")

    # Out of data space: only what frees or adds space is let through.
    ts("create", "vg0/fill", "--size", "128M")
    sh("lvchange", "-q", "--errorwhenfull", "y", "vg0/pool")  # ENOSPC at once, no 60 s queue
    full = subprocess.run(["dd", "if=/dev/zero", "of=/dev/vg0/fill", "bs=1M", "oflag=direct"],
                          capture_output=True, text=True, timeout=300)
    assert "No space left" in full.stderr or "Input/output error" in full.stderr, full.stderr
    assert mode("vg0") == "out_of_data_space"
    refused = ts("snapshot", "vg0/vm", "s2", check=False)
    assert refused.returncode == 5 and refused.stderr == (
        "thinstack: pool vg0/pool is out_of_data_space: grow it (`thinstack pool extend "
        "vg0/pool SIZE`, or raise its limit: `thinstack pool set vg0/pool --limit SIZE`) or "
        "delete volumes first\n")
    ts("delete", "vg0/after")
    ts("pool", "extend", "vg0", "64M")
    assert mode("vg0") == "rw"
    ts("snapshot", "vg0/vm", "s2")
    assert_pool_consistent("vg0")

    # A power cut between LVM's commit and the pool's can leave sound metadata that disagrees
    # with LVM (H2's power-cut runs, 2 in 20): made here by hand, a volume the pool lost and a
    # thin id no volume has. pool check names both; pool repair reconciles them in place, with
    # vm open, and changes no byte of vm.
    ts("create", "vg0/lost", "--size", "8M")
    lost_id = lvs("vg0")["lost"]["thin_id"]
    sh("lvchange", "-q", "-an", "vg0/lost")
    sh("dmsetup", "message", "vg0-pool-tpool", "0", "delete", lost_id)
    sh("dmsetup", "message", "vg0-pool-tpool", "0", "create_thin", "99")
    check = ts("pool", "check", "vg0", check=False)
    assert check.returncode == 1 and check.stderr.rstrip().endswith(
        "disagree: it lost volumes, whose data is not in the pool's metadata: lost; "
        "it holds thin ids no volume has: 99"), check.stderr
    with open("/dev/vg0/vm", "rb"):
        done = json.loads(ts("pool", "repair", "vg0", "--json").stdout)
    assert done["deleted_ids"] == [99] and done["emptied"] == ["vg0/lost"], done
    assert done["old_metadata"] is None
    assert ts("pool", "check", "vg0").stdout.strip() == "vg0/pool: metadata clean"
    ts("delete", "vg0/lost")
    assert blocks_match("/dev/vg0/vm", "vm2", [0])
    assert blocks_match("/dev/vg0/vm", "vm", [200 * BLOCK])
    assert_pool_consistent("vg0")
