"""VM disks against the real kernel: thin volumes, snapshots, gold masters, clones, CoW volumes,
and what is left after a kill at every fault point."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess

import pytest

from tests.labtools import assert_pool_consistent, lvs, sh, ts
from tests.patterns import BLOCK, blocks_match, digest, pattern, read_direct, write_blocks
from thinstack import faults

MiB = 1 << 20


OFFSETS = [0, 5 * BLOCK, 100 * BLOCK, 1000 * BLOCK]


@pytest.mark.lab(disks=1, disk_size="1G")
def test_gold_master_and_three_clones_diverge_without_touching_it(vg):
    ts("create", "vg0/base", "--size", "256M")
    write_blocks("/dev/vg0/base", "gold", OFFSETS)
    before = digest("/dev/vg0/base", 256 * MiB)
    ts("gold", "vg0/base")
    info = json.loads(ts("info", "vg0/base", "--json").stdout)
    assert info["gold"] and info["readonly"] and info["kind"] == "gold"
    with pytest.raises(PermissionError):
        write_blocks("/dev/vg0/base", "x", [0])

    for i in range(3):
        path = ts("clone", "vg0/base", f"vg0/c{i}").stdout.strip()
        assert path == f"/dev/vg0/c{i}"
        assert blocks_match(path, "gold", OFFSETS)  # a clone starts as the gold's content
    for i in range(3):
        write_blocks(f"/dev/vg0/c{i}", f"clone{i}", [OFFSETS[i], (2000 + i) * BLOCK])
    for i in range(3):
        assert blocks_match(f"/dev/vg0/c{i}", f"clone{i}", [OFFSETS[i], (2000 + i) * BLOCK])
        assert blocks_match(f"/dev/vg0/c{i}", "gold", [o for j, o in enumerate(OFFSETS) if j != i])
    assert digest("/dev/vg0/base", 256 * MiB) == before

    table = {r["lv_name"]: r for r in lvs("vg0").values()}
    assert all(table[f"c{i}"]["origin"] == "base" for i in range(3))
    assert all(table[f"c{i}"]["lv_skip_activation"] == "" for i in range(3))  # no trap
    listing = json.loads(ts("list", "vg0", "--json").stdout)
    gold = next(v for v in listing if v["name"] == "base")
    assert sorted(gold["dependants"]) == ["c0", "c1", "c2"]
    # O(1): a clone shares everything until written.
    c0 = next(v for v in listing if v["name"] == "c0")
    assert c0["exclusive_bytes"] == 2 * BLOCK

    refused = ts("delete", "vg0/base", check=False)
    assert refused.returncode == 5 and "dependants" in refused.stderr
    for i in range(3):
        ts("delete", f"vg0/c{i}")
    ts("delete", "vg0/base")
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G")
def test_external_origin_clone_of_a_read_only_lv_outside_the_pool(vg):
    sh("lvcreate", "-q", "-y", "-L", "64M", "-n", "image", "vg0")
    write_blocks("/dev/vg0/image", "image", [0, 7 * BLOCK, 1000 * BLOCK])
    before = digest("/dev/vg0/image", 64 * MiB)

    ts("clone", "vg0/image", "vg0/vm1")
    assert blocks_match("/dev/vg0/vm1", "image", [0, 7 * BLOCK, 1000 * BLOCK])
    write_blocks("/dev/vg0/vm1", "vm1", [7 * BLOCK])
    assert blocks_match("/dev/vg0/vm1", "vm1", [7 * BLOCK])
    assert blocks_match("/dev/vg0/vm1", "image", [0, 1000 * BLOCK])
    assert digest("/dev/vg0/image", 64 * MiB) == before
    table = lvs("vg0")
    assert table["image"]["lv_attr"][1] == "r"  # kept read-only
    assert table["vm1"]["origin"] == "image"
    refused = ts("delete", "vg0/image", check=False)
    assert refused.returncode == 5 and "vm1" in refused.stderr
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G")
def test_snapshots_are_isolated_both_ways_and_resize_is_online(vg, tmp_path):
    ts("create", "vg0/vm", "--size", "128M")
    write_blocks("/dev/vg0/vm", "v1", [0, BLOCK])
    ts("snapshot", "vg0/vm", "snap")
    ts("snapshot", "vg0/vm", "frozen", "--readonly")
    write_blocks("/dev/vg0/vm", "v2", [0])
    write_blocks("/dev/vg0/snap", "s", [BLOCK])
    assert blocks_match("/dev/vg0/vm", "v2", [0]) and blocks_match("/dev/vg0/vm", "v1", [BLOCK])
    assert blocks_match("/dev/vg0/snap", "v1", [0]) and blocks_match("/dev/vg0/snap", "s", [BLOCK])
    assert blocks_match("/dev/vg0/frozen", "v1", [0, BLOCK])
    with pytest.raises(PermissionError):
        write_blocks("/dev/vg0/frozen", "x", [0])

    # Grow while a writer holds the volume open; the data stays, the new space is usable.
    fd = os.open("/dev/vg0/vm", os.O_RDWR)
    try:
        ts("resize", "vg0/vm", "256M")
        assert int(sh("blockdev", "--getsize64", "/dev/vg0/vm")) == 256 * MiB
        write_blocks("/dev/vg0/vm", "tail", [200 * MiB])
    finally:
        os.close(fd)
    assert blocks_match("/dev/vg0/vm", "v2", [0])
    assert blocks_match("/dev/vg0/vm", "tail", [200 * MiB])
    refused = ts("resize", "vg0/vm", "64M", check=False)
    assert refused.returncode == 5 and "--yes" in refused.stderr
    ts("resize", "vg0/vm", "64M", "--yes")
    assert int(sh("blockdev", "--getsize64", "/dev/vg0/vm")) == 64 * MiB
    assert_pool_consistent("vg0")

    # Chunks of 8 MiB, twice LVM's extent: a shrink to 4 MiB ends inside the first chunk, whose
    # old tail must not come back when the volume grows again (found by the CLI model).
    ts("pool", "create", "vgc", "--file", str(tmp_path / "vgc.img"), "--size", "256M",
       "--chunk", "8M")
    ts("create", "vgc/t", "--size", "16M")
    write_blocks("/dev/vgc/t", "t", [0, 5 * MiB, 12 * MiB])
    ts("resize", "vgc/t", "4M", "--yes")
    ts("resize", "vgc/t", "16M")
    assert blocks_match("/dev/vgc/t", "t", [0])
    assert read_direct("/dev/vgc/t", 5 * MiB) == read_direct("/dev/vgc/t", 12 * MiB) == bytes(BLOCK)


@pytest.mark.lab(disks=1, disk_size="1G")
def test_cow_volume_over_a_read_only_origin(vg):
    sh("lvcreate", "-q", "-y", "-L", "64M", "-n", "golden", "vg0")
    write_blocks("/dev/vg0/golden", "g", [0, 10 * BLOCK])
    sh("lvchange", "-pr", "vg0/golden")
    ts("cow", "vg0/golden", "vg0/scratch", "--store", "8M")
    write_blocks("/dev/vg0/scratch", "w", [10 * BLOCK])
    assert blocks_match("/dev/vg0/scratch", "g", [0])
    assert blocks_match("/dev/vg0/scratch", "w", [10 * BLOCK])
    assert blocks_match("/dev/vg0/golden", "g", [0, 10 * BLOCK])
    info = json.loads(ts("info", "vg0/scratch", "--json").stdout)
    assert info["kind"] == "cow" and info["origin"] == "golden"


@pytest.mark.lab(disks=1, disk_size="1G")
def test_bad_requests_are_clear_and_change_nothing(vg):
    ts("create", "vg0/a", "--size", "64M")
    cases = [
        (("create", "vg0/a", "--size", "64M"), 4, "already exists"),
        (("create", "vg0/-bad", "--size", "64M"), 2, "invalid"),
        (("create", "nosuchvg/x", "--size", "64M"), 3, "not found"),
        (("snapshot", "vg0/missing", "s"), 3, "no such volume"),
        (("clone", "vg0/a", "vg0/b"), 5, "not a gold master"),
        (("delete", "vg0/pool"), 5, "thin pool"),
    ]
    before = lvs("vg0")
    for args, status, text in cases:
        done = ts(*args, check=False)
        assert done.returncode == status, (args, done.stderr)
        assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert lvs("vg0").keys() == before.keys()


# Every fault point of every volume operation: kill there, then `recover` must converge. Each
# scenario gets fresh names (suffix i), so one pool serves them all without cleanup in between.
# `dev` is a loop device outside the VG, made for the scenario, holding the "ext" pattern too.
SCENARIOS = [
    ("create", lambda i, dev: ["create", f"vg0/new{i}", "--size", "64M"]),
    ("snapshot", lambda i, dev: ["snapshot", f"vg0/vm{i}", f"new{i}"]),
    ("clone", lambda i, dev: ["clone", "vg0/gold", f"vg0/new{i}"]),
    ("clone", lambda i, dev: ["clone", f"vg0/ext{i}", f"vg0/new{i}"]),
    ("clone", lambda i, dev: ["clone", dev, f"vg0/new{i}"]),
    ("gold", lambda i, dev: ["gold", f"vg0/vm{i}"]),
    ("resize", lambda i, dev: ["resize", f"vg0/vm{i}", "96M"]),
    ("delete", lambda i, dev: ["delete", f"vg0/vm{i}"]),
    ("cow", lambda i, dev: ["cow", "vg0/gold", f"vg0/new{i}", "--store", "8M"]),
]


@pytest.mark.lab(disks=1, disk_size="2G", timeout=900)
def test_kill_at_every_fault_point_then_recover_converges(vg, tmp_path):
    ts("create", "vg0/gold", "--size", "64M")
    write_blocks("/dev/vg0/gold", "gold", [0])
    ts("gold", "vg0/gold")
    i = 0
    fired, fired_outside = set(), set()
    for op, argv in SCENARIOS:
        for point in faults.POINTS[op]:
            i += 1
            ts("create", f"vg0/vm{i}", "--size", "64M")
            sh("lvcreate", "-q", "-y", "-L", "4M", "-n", f"ext{i}", "vg0")
            write_blocks(f"/dev/vg0/ext{i}", "ext", [0])
            args = argv(i, None)
            dev = None
            if None in args:  # a scenario with a device outside the VG
                dev = loop_device(tmp_path / f"dev{i}.img", 4 * MiB)
                write_blocks(dev, "ext", [0])
                args = argv(i, dev)
            killed = ts(*args, env={"THINSTACK_FAULT": f"{op}:{point}"}, check=False)
            if killed.returncode == 0:
                continue  # this path of the operation does not pass that point
            assert killed.returncode == -9, f"{op}:{point}: {killed.stderr}"
            fired.add((op, point))
            if dev is not None:
                fired_outside.add(point)
            ts("recover")
            table = lvs("vg0")
            new = table.get(f"new{i}")
            # Either fully done or not at all; never a half-made volume that looks finished.
            if new is not None:
                assert "ts_op_" not in new["lv_tags"]
                # Only a clone of a device outside the VG keeps LVM from activating it.
                assert bool(new["lv_skip_activation"]) == (dev is not None)
                source = "gold" if args[1] == "vg0/gold" else "ext"
                if op == "clone":
                    assert blocks_match(f"/dev/vg0/new{i}", source, [0])
            ext = table[f"ext{i}"]
            if op == "clone" and new is None:  # rolled back: the origin is as the operator had it
                assert ext["lv_attr"][1] == "w", f"{op}:{point} left ext{i} read-only"
                assert dev is None or not getro(dev), f"{op}:{point} left {dev} read-only"
                assert not os.path.exists(f"/dev/mapper/vg0-new{i}")
            vm = table.get(f"vm{i}")
            if op == "gold":
                ro, tagged = vm["lv_attr"][1] == "r", "ts_gold" in vm["lv_tags"]
                assert ro == tagged, f"gold half-done at {point}: {vm}"
            assert blocks_match("/dev/vg0/gold", "gold", [0])
            assert_pool_consistent("vg0")
    declared = {(op, p) for op, _ in SCENARIOS for p in faults.POINTS[op]}
    assert fired_outside == set(faults.POINTS["clone"]), "the device-origin clone path skipped some"
    assert fired == declared, f"never fired: {declared - fired}"
    # After all that, ordinary commands work (no stale lock or journal in the way).
    ts("create", "vg0/after", "--size", "64M")


@pytest.mark.lab(disks=1, disk_size="1G", timeout=900)
def test_twenty_concurrent_commands_stay_consistent(vg):
    ts("create", "vg0/base", "--size", "64M")
    cmds = []
    for i in range(8):
        cmds.append(["create", f"vg0/v{i}", "--size", "32M"])
    for i in range(6):
        cmds.append(["snapshot", "vg0/base", f"s{i}"])
    cmds += [["create", "vg0/dup", "--size", "32M"]] * 2  # racing for one name
    cmds += [["delete", f"vg0/v{i}"] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda a: ts(*a, check=False), cmds))
    dup = [r for a, r in zip(cmds, results, strict=True) if a[1] == "vg0/dup"]
    assert sorted(r.returncode for r in dup) == [0, 4]
    assert any("already exists" in r.stderr for r in dup)
    for args, r in zip(cmds, results, strict=True):
        if args[0] != "delete" and args[1] != "vg0/dup":
            assert r.returncode == 0, (args, r.stderr)
    table = lvs("vg0")
    assert {f"s{i}" for i in range(6)} <= table.keys()
    for i in range(4):  # a delete either found its volume or said so clearly
        r = results[cmds.index(["delete", f"vg0/v{i}"])]
        assert (r.returncode == 0 and f"v{i}" not in table) or (r.returncode == 3)
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="16G")
def test_snapshot_refused_when_pool_metadata_would_run_out(lab_disks):
    sh("pvcreate", "-q", lab_disks[0])
    sh("vgcreate", "-q", "vg0", lab_disks[0])
    # 4 MiB of metadata cannot map 16 GiB of 64 KiB chunks, and the VG has no room to grow it.
    sh("lvcreate", "-q", "-y", "--type", "thin-pool", "-l", "100%FREE", "--poolmetadatasize", "2M",
       "--poolmetadataspare", "n", "--chunksize", "64k", "-n", "pool", "--addtag", "ts_pool",
       "vg0")
    ts("create", "vg0/vm", "--size", "1G")
    refused = ts("snapshot", "vg0/vm", "s1", check=False)
    assert refused.returncode == 6 and "metadata" in refused.stderr
    assert "s1" not in lvs("vg0")


def loop_device(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return sh("losetup", "-f", "--show", str(path)).strip()


def getro(dev: str) -> bool:
    return sh("blockdev", "--getro", dev).strip() == "1"


def qemu_compare(dev: str, image) -> None:
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", dev, str(image)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_clone_of_a_block_device_outside_the_vg(vg, tmp_path):
    # 90 MiB: not a whole number of LVM extents, so the clone's tail lies past the origin.
    origin = loop_device(tmp_path / "origin.img", 90 * MiB)
    write_blocks(origin, "ext", OFFSETS)
    before = digest(origin, 90 * MiB)

    assert ts("clone", origin, "vg0/c1").stdout.strip() == "/dev/vg0/c1"
    assert getro(origin) and blocks_match("/dev/vg0/c1", "ext", OFFSETS)
    assert read_direct("/dev/vg0/c1", 90 * MiB, 2 * MiB) == bytes(2 * MiB)
    # A write smaller than a pool block: the rest of the block still reads the origin's bytes.
    write_blocks("/dev/vg0/c1", "mine", [OFFSETS[2] + 8192], length=4096)
    block = read_direct("/dev/vg0/c1", OFFSETS[2])
    expected = pattern("ext", OFFSETS[2])
    assert block[:8192] == expected[:8192] and block[12288:] == expected[12288:]
    assert block[8192:12288] == pattern("mine", OFFSETS[2] + 8192, 4096)
    write_blocks("/dev/vg0/c1", "mine", [OFFSETS[1]])
    assert digest(origin, 90 * MiB) == before

    info = json.loads(ts("info", "vg0/c1", "--json").stdout)
    assert (info["kind"], info["origin"], info["active"]) == ("clone", origin, True)
    assert info["size"] == 92 * MiB and info["mapped_bytes"] == 2 * BLOCK
    # LVM sees the volume inactive and skipped: it never activates it without its origin.
    row = lvs("vg0")["c1"]
    assert row["lv_attr"][4] == "-" and row["lv_skip_activation"]
    assert subprocess.run(["lvchange", "-ay", "-K", "vg0/c1"], capture_output=True).returncode
    for args in (["snapshot", "vg0/c1", "s"], ["gold", "vg0/c1"]):
        done = ts(*args, check=False)
        assert done.returncode == 5 and "outside LVM" in done.stderr, done.stderr

    # As after a reboot: device down, VG inactive, the origin writable again; attach restores.
    sh("dmsetup", "remove", "vg0-c1")
    sh("vgchange", "-q", "-an", "vg0")
    sh("blockdev", "--setrw", origin)
    ts("pool", "attach")  # as thinstack-attach.service runs it at boot: every VG that needs it
    assert getro(origin) and blocks_match("/dev/vg0/c1", "mine", [OFFSETS[1]])
    assert blocks_match("/dev/vg0/c1", "ext", [OFFSETS[0], OFFSETS[3]])

    # Another device at the origin's path (here: another file on the same loop device) keeps
    # the clone down rather than showing it other bytes.
    sh("dmsetup", "remove", "vg0-c1")
    sh("losetup", "-d", origin)
    (tmp_path / "other.img").write_bytes(bytes(64 * MiB))
    sh("losetup", origin, str(tmp_path / "other.img"))
    refused = ts("pool", "attach", "vg0", check=False)
    assert refused.returncode == 5 and "was 94371840" in refused.stderr, refused.stderr
    assert not os.path.exists("/dev/mapper/vg0-c1")
    sh("losetup", "-d", origin)
    sh("losetup", origin, str(tmp_path / "origin.img"))
    ts("pool", "attach", "vg0")

    # Online growth keeps the data; an export reads the origin wherever the clone maps nothing.
    ts("resize", "vg0/c1", "128M")
    assert int(sh("blockdev", "--getsize64", "/dev/vg0/c1")) == 128 * MiB
    write_blocks("/dev/vg0/c1", "tail", [120 * MiB])
    assert blocks_match("/dev/vg0/c1", "mine", [OFFSETS[1]])
    ts("export", "vg0/c1", str(tmp_path / "a.qcow2"), "--format", "qcow2", "--incremental")
    qemu_compare("/dev/vg0/c1", tmp_path / "a.qcow2")
    write_blocks("/dev/vg0/c1", "more", [OFFSETS[3]])
    sh("blkdiscard", "-o", str(OFFSETS[1]), "-l", str(BLOCK), "/dev/vg0/c1")  # origin again
    ts("export", "vg0/c1", str(tmp_path / "b.qcow2"), "--format", "qcow2", "--incremental")
    qemu_compare("/dev/vg0/c1", tmp_path / "b.qcow2")
    assert blocks_match("/dev/vg0/c1", "ext", [OFFSETS[1]])

    ts("resize", "vg0/c1", "64M", "--yes")
    assert int(sh("blockdev", "--getsize64", "/dev/vg0/c1")) == 64 * MiB
    assert blocks_match("/dev/vg0/c1", "ext", [OFFSETS[0]])

    done = ts("delete", "vg0/c1")
    assert done.returncode == 0
    assert not os.path.exists("/dev/mapper/vg0-c1") and not os.path.lexists("/dev/vg0/c1")
    assert "c1" not in lvs("vg0") and digest(origin, 90 * MiB) == before
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G")
def test_bad_outside_origins_are_refused_clearly(vg, tmp_path):
    cases = [
        (["clone", "/dev/nosuch", "vg0/c"], 3, "no such device"),
        (["clone", "/etc/hostname", "vg0/c"], 5, "not a block device"),
    ]
    mounted = loop_device(tmp_path / "fs.img", 16 * MiB)
    sh("mkfs.ext4", "-q", mounted)
    (tmp_path / "mnt").mkdir()
    sh("mount", mounted, str(tmp_path / "mnt"))
    try:
        cases.append((["clone", mounted, "vg0/c"], 5, "is mounted"))
        # A disk whose partition is mounted: writes through the partition change the disk.
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(32 * MiB))
        subprocess.run(["sfdisk", "-q", str(image)], input="start=2048, size=20480\n",
                       text=True, check=True, capture_output=True)
        disk = sh("losetup", "-f", "--show", "-P", str(image)).strip()
        sh("mkfs.ext4", "-q", disk + "p1")
        (tmp_path / "mnt2").mkdir()
        sh("mount", disk + "p1", str(tmp_path / "mnt2"))
        cases.append((["clone", disk, "vg0/c"], 5, "a partition of it) is mounted"))
        before = set(lvs("vg0"))
        for args, status, text in cases:
            done = ts(*args, check=False)
            assert done.returncode == status and text in done.stderr, (args, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1
        assert not getro(mounted) and set(lvs("vg0")) == before
    finally:
        sh("umount", str(tmp_path / "mnt"))
        if (tmp_path / "mnt2").exists():
            sh("umount", str(tmp_path / "mnt2"))


@pytest.mark.lab(disks=1, disk_size="1G")
def test_clone_of_a_volume_in_another_vg_protects_it(vg, tmp_path):
    other = loop_device(tmp_path / "vg1.img", 64 * MiB)
    sh("vgcreate", "-q", "vg1", other)
    sh("lvcreate", "-q", "-y", "-L", "16M", "-n", "base", "vg1")
    write_blocks("/dev/vg1/base", "base", [0])
    refused = ts("clone", "/dev/vg1/base", "vg0/c", check=False)
    assert refused.returncode == 5 and "lvchange -pr" in refused.stderr, refused.stderr
    sh("lvchange", "-q", "-pr", "vg1/base")
    ts("clone", "/dev/vg1/base", "vg0/c")
    write_blocks("/dev/vg0/c", "c", [BLOCK])
    assert blocks_match("/dev/vg0/c", "base", [0]) and blocks_match("/dev/vg1/base", "base", [0])
    done = ts("delete", "vg1/base", check=False)
    assert done.returncode == 5 and "vg0/c" in done.stderr, done.stderr
    # Nor resized under it (issue 8, 13b): the clone reads it block for block.
    for size in ("32M", "8M"):
        resized = ts("resize", "vg1/base", size, "--yes", check=False)
        assert resized.returncode == 5 and "vg0/c" in resized.stderr, resized.stderr
    assert sh("lvs", "--noheadings", "--units", "m", "-o", "lv_size", "vg1/base").strip() == \
        "16.00m"
    # Named by its path, a volume of the clone's own VG is an ordinary LVM external origin.
    sh("lvcreate", "-q", "-y", "-L", "8M", "-n", "local", "vg0")
    sh("lvchange", "-q", "-pr", "vg0/local")
    ts("clone", "/dev/vg0/local", "vg0/c2")
    assert lvs("vg0")["c2"]["origin"] == "local"
    ts("delete", "vg0/c")
    ts("delete", "vg1/base")
    assert_pool_consistent("vg0")
