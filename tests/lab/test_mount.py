"""thinstack mount against the real kernel and FUSE: every file equals `thinstack export` of the
same instant (cmp, or qemu-img compare where a mapped chunk holds zeros), passes qemu-img check
and imports back as the volume; random reads anywhere; SEEK_DATA/SEEK_HOLE; one instant per open
while a writer rewrites the volume; read-only and private; a deleted volume's open file goes on;
umount refused while files are open; a killed mount cleaned up by recover."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.lab.test_export import export_here, generation_block, generation_of
from tests.labtools import assert_pool_consistent, lvs, sh, ts
from tests.patterns import BLOCK, write_blocks
from thinstack import exports, lvm, mount_instants

MiB = 1 << 20
QEMU = {"raw": "raw", "vhd": "vpc", "qcow2": "qcow2"}


def volumes(tmp_path: Path) -> dict[str, int]:
    """Volumes of every kind, name -> size: data, holes, a mapped zero run, a snapshot sharing
    blocks with its origin, a gold master read as it is, its clone, and a clone of a device
    outside the VG (all data)."""
    ts("create", "vg0/vm1", "--size", "64M")
    write_blocks("/dev/vg0/vm1", "a", [0, 5 * BLOCK, 40 * BLOCK, 1000 * BLOCK])
    write_blocks("/dev/vg0/vm1", "a", [33 * MiB], length=3 * MiB)  # across VHD blocks
    zeros = os.open("/dev/vg0/vm1", os.O_WRONLY)
    os.pwrite(zeros, bytes(4 * BLOCK), 20 * MiB)  # mapped, all zeros: the export drops them
    os.fsync(zeros)
    os.close(zeros)
    ts("snapshot", "vg0/vm1", "s1")
    write_blocks("/dev/vg0/vm1", "b", [5 * BLOCK, 600 * BLOCK])  # s1 keeps the old ones
    ts("create", "vg0/gold", "--size", "16M")
    write_blocks("/dev/vg0/gold", "g", [0, 100 * BLOCK])
    ts("gold", "vg0/gold")
    ts("clone", "vg0/gold", "vg0/c1")
    write_blocks("/dev/vg0/c1", "c", [7 * BLOCK])
    backing = tmp_path / "outside.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    loop = sh("losetup", "-f", "--show", str(backing)).strip()
    write_blocks(loop, "x", [0, 64 * BLOCK])
    ts("clone", loop, "vg0/ext")
    write_blocks("/dev/vg0/ext", "e", [3 * BLOCK])
    return {"vm1": 64 * MiB, "s1": 64 * MiB, "gold": 16 * MiB, "c1": 16 * MiB, "ext": 8 * MiB}


def edges(name: str) -> dict[str, list[int]]:
    """The offsets where a layout's pieces begin or end, per format: where reads straddle a
    header, a table and data."""
    lvs_ = lvm.volumes_of("vg0")
    lv = mount_instants.shown(lvs_)[name]
    content = mount_instants.content(lv, exports.source_kind(lv, lvs_),
                                     lvm.holding_pool(lv, lvs_))
    return {f: sorted({x for p in content.layout(f).pieces for x in (p.offset, p.end)})
            for f in QEMU}


def qemu(*args) -> subprocess.CompletedProcess:
    done = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, f"qemu-img {args}: {done.stdout}{done.stderr}"
    return done


def no_snapshots_left() -> None:
    left = [n for n in lvs("vg0") if ".export-" in n]
    assert not left, f"snapshots left: {left}"
    assert_pool_consistent("vg0")


@pytest.mark.lab(disks=1, disk_size="1G", timeout=1200)
def test_mounted_files_are_the_exports_of_their_instant(vg, tmp_path):
    sizes = volumes(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ts("mount", str(mnt))
    try:
        here = mnt / "vg0"
        assert sorted(os.listdir(here)) == sorted(f"{n}.{f}" for n in sizes for f in QEMU)
        for name in sizes:
            for fmt, qfmt in QEMU.items():
                path = here / f"{name}.{fmt}"
                st = path.stat()
                assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
                exported = export_here(f"vg0/{name}", tmp_path / f"x.{fmt}", format=fmt)["path"]
                # Byte for byte where no mapped chunk is all zeros: vm1's zero run is (s1 shares
                # it), and so is most of the outside device (all of it counts as data).
                same = name not in ("vm1", "s1", "ext") or fmt == "raw"
                assert st.st_size == os.stat(exported).st_size or not same
                if fmt == "qcow2":
                    assert "No errors were found" in qemu("check", path).stdout
                qemu("compare", "-f", qfmt, "-F", qfmt, path, exported)
                # A VHD's footers carry their own uuid and time.
                mounted, written = path.read_bytes(), Path(exported).read_bytes()
                if fmt == "vhd":
                    mounted, written = mounted[512:-512], written[512:-512]
                assert mounted == written or not same, f"{name}.{fmt} differs from its export"

        # Random reads, many straddling a piece's edge, some past the end, against the export.
        rng = random.Random(3)
        for fmt, cut in edges("c1").items():
            exported = Path(export_here("vg0/c1", tmp_path / f"r.{fmt}", format=fmt)["path"])
            whole = exported.read_bytes()
            fd = os.open(here / f"c1.{fmt}", os.O_RDONLY)
            try:
                for _ in range(200):
                    at = max(0, rng.choice(cut) + rng.randint(-600, 600)) if rng.random() < .7 \
                        else rng.randrange(len(whole) + MiB)
                    n = rng.choice([1, 512, 4096, 65536 + 7, 1 << 20])
                    got, want = os.pread(fd, n, at), whole[at:at + n]
                    if fmt == "vhd":  # footers (own uuid and time) masked out
                        got, want = mask_footers(got, at, len(whole)), \
                            mask_footers(want, at, len(whole))
                    assert got == want, (fmt, at, n)
            finally:
                os.close(fd)

        # Holes stay holes: SEEK_DATA/SEEK_HOLE from the mapping, and cp --sparse keeps them.
        fd = os.open(here / "gold.raw", os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == BLOCK
            assert os.lseek(fd, BLOCK, os.SEEK_DATA) == 100 * BLOCK
            assert os.lseek(fd, 100 * BLOCK, os.SEEK_HOLE) == 101 * BLOCK
            with pytest.raises(OSError) as e:
                os.lseek(fd, 101 * BLOCK, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        sh("cp", "--sparse=always", str(here / "gold.raw"), str(tmp_path / "copy.raw"))
        assert os.stat(tmp_path / "copy.raw").st_blocks * 512 <= 2 * BLOCK
        assert (tmp_path / "copy.raw").read_bytes() == Path("/dev/vg0/gold").read_bytes()

        # An import of a mounted file is the volume again.
        ts("import", "--format", "qcow2", str(here / "vm1.qcow2"), "vg0/back")
        assert Path("/dev/vg0/back").read_bytes() == Path("/dev/vg0/vm1").read_bytes()

        one_instant_while_a_writer_runs(here, tmp_path)
        read_only_and_kept_after_delete(here)

        # umount refused while a file is open, with one line and status 5 (refused).
        held = os.open(here / "gold.vhd", os.O_RDONLY)
        busy = ts("umount", str(mnt), check=False)
        os.close(held)
        assert busy.returncode == 5 and busy.stderr.count("\n") == 1, busy.stderr
        assert "open" in busy.stderr
    finally:
        ts("umount", str(mnt), check=False)
    assert not mount_instants.mounted(mnt)
    no_snapshots_left()


def mask_footers(data: bytes, at: int, size: int) -> bytes:
    out = bytearray(data)
    for lo, hi in ((0, 512), (size - 512, size)):
        for i in range(max(lo, at), min(hi, at + len(data))):
            out[i - at] = 0
    return bytes(out)


def one_instant_while_a_writer_runs(here: Path, tmp_path: Path) -> None:
    """qemu-img convert reads vm3.qcow2 while a writer rewrites 256 blocks pass after pass (as
    test_export's one-instant test): the result is one instant of the volume."""
    ts("create", "vg0/vm3", "--size", "64M")
    offsets = [b * BLOCK for b in random.Random(7).sample(range(1024), 256)]
    stop, written = threading.Event(), [0]

    def writer():
        fd = os.open("/dev/vg0/vm3", os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            gen = 0
            while not stop.is_set() or gen == 0:
                for off in offsets:
                    buf[:] = generation_block(gen, off)
                    os.pwritev(fd, [buf], off)
                written[0], gen = gen, gen + 1
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while written[0] < 2:
            stop.wait(0.05)
        before = written[0]
        out = tmp_path / "vm3.raw"
        for _ in range(50):  # the list is cached a second: the new volume shows up then
            if (here / "vm3.qcow2").exists():
                break
            time.sleep(0.1)
        qemu("convert", "-f", "qcow2", "-O", "raw", here / "vm3.qcow2", out)
        after = written[0]
    finally:
        stop.set()
        thread.join()
    assert after > before + 1, "the writer should have run through the read"
    with open(out, "rb") as f:
        gens = [generation_of(os.pread(f.fileno(), BLOCK, off), off) for off in offsets]
    g = min(gens)
    k = gens.count(g + 1)
    assert gens == [g + 1] * k + [g] * (len(gens) - k), gens


def read_only_and_kept_after_delete(here: Path) -> None:
    path = here / "c1.raw"
    for attempt in (lambda: os.open(path, os.O_WRONLY), lambda: os.truncate(path, 0),
                    lambda: os.rename(path, here / "other.raw"), lambda: os.unlink(path)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    before = Path("/dev/vg0/c1").read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        ts("delete", "vg0/c1")
        time.sleep(1.1)  # the listing is cached for a second
        assert "c1.raw" not in os.listdir(here)
        assert os.pread(fd, len(before), 0) == before
        assert os.fstat(fd).st_size == len(before)
        assert any(".export-" in n for n in lvs("vg0")), "the open file's snapshot is kept"
    finally:
        os.close(fd)


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_a_killed_mount_is_cleaned_up_by_recover(vg, tmp_path):
    ts("create", "vg0/vm1", "--size", "32M")
    write_blocks("/dev/vg0/vm1", "a", [0, 9 * BLOCK])
    ts("create", "vg0/vm2", "--size", "32M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ts("mount", str(mnt), "vg0", "--formats", "raw,gow3")
    assert sorted(os.listdir(mnt / "vg0")) == ["vm1.gow", "vm1.raw", "vm2.gow", "vm2.raw"]
    exported = export_here("vg0/vm1", tmp_path / "vm1.gow", format="gow3")["path"]
    assert (mnt / "vg0" / "vm1.gow").read_bytes() == Path(exported).read_bytes()
    files = [os.open(mnt / "vg0" / f, os.O_RDONLY) for f in ("vm1.raw", "vm2.gow")]
    assert os.pread(files[0], BLOCK, 9 * BLOCK) == Path("/dev/vg0/vm1").read_bytes()[
        9 * BLOCK:10 * BLOCK]
    assert sum(".export-" in n for n in lvs("vg0")) == 2
    # Other commands of the VG leave a live mount's snapshots alone.
    ts("create", "vg0/vm3", "--size", "8M")
    assert sum(".export-" in n for n in lvs("vg0")) == 2
    [lock] = mount_instants.live(mnt)
    os.kill(int(lock.read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while mount_instants.live(mnt) and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(OSError) as e:  # the open file fails, and no new one opens
        os.pread(files[0], 512, 0)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.open(mnt / "vg0" / "vm1.gow", os.O_RDONLY)
    assert e.value.errno == errno.ENOTCONN
    ts("recover")
    for fd in files:
        os.close(fd)
    assert not mount_instants.mounted(mnt), "the dead mount is still there"
    no_snapshots_left()
    # And it mounts again at the same place.
    ts("mount", str(mnt))
    assert (mnt / "vg0" / "vm3.vhd").stat().st_size > 0
    ts("umount", str(mnt))
    assert not mount_instants.mounted(mnt)
    no_snapshots_left()
