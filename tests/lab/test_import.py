"""`thinstack import` against the real kernel: every subformat qemu-img and thinstack's own
writers make imports byte for byte and allocates exactly the non-zero chunks; real-world images
(the corpus) import as their makers meant; hostile ones change nothing; an interrupted import is
hidden, resumable and recoverable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labtools import sh, ts
from thinstack import exporters, faults, imports
from thinstack.lvm import VolumeRef

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB


def make_vg(disk: str, pool: str, vg: str = "vg0") -> None:
    sh("pvcreate", "-q", disk)
    sh("vgcreate", "-q", vg, disk)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", pool, "-Zy", "--chunksize", "64k", "-n",
       "pool", "--addtag", "ts_pool", vg)


def write_raw(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in sorted(pieces.items()):
            f.seek(offset)
            f.write(data)
    return path


def content(path: Path, size: int) -> tuple[str, int]:
    """SHA-256 of the first `size` bytes of a file or device, and how many CHUNK-sized chunks
    of them are not all zeros."""
    h, nonzero, zero = hashlib.sha256(), 0, bytes(CHUNK)
    with open(path, "rb") as f:
        left = size
        while left:
            block = f.read(min(CHUNK, left))
            assert block, f"{path} ends before {size} bytes"
            h.update(block)
            nonzero += block != zero[:len(block)]
            left -= len(block)
    return h.hexdigest(), nonzero


def mapped_chunks(name: str) -> int:
    words = sh("dmsetup", "status", f"vg0-{name}").split()  # 0 LEN thin MAPPED HIGHEST
    return int(words[3]) * 512 // CHUNK


def volume_names() -> set[str]:
    out = json.loads(sh("lvs", "--reportformat", "json", "-o", "lv_name", "vg0"))
    return {r["lv_name"] for r in out["report"][0]["lv"]} - {"pool"}


def listed() -> set[str]:
    return {v["name"] for v in json.loads(ts("list", "vg0", "--json").stdout)}


def journal_entries(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (state / "journal").glob("*.json")]


def qemu_raw(image: Path, out: Path, fmt: str | None = None) -> Path:
    """qemu-img's reading of `image` (fixed VHDs need `fmt`: qemu-img probes them as raw)."""
    sh("qemu-img", "convert", *(["-f", fmt] if fmt else []), "-O", "raw", str(image), str(out))
    return out


def assert_imported(image: Path, name: str, expected: Path, summary: dict | None = None) -> None:
    """The volume holds `expected`'s bytes and maps exactly its non-zero chunks."""
    size = expected.stat().st_size
    want, nonzero = content(expected, size)
    got, _ = content(Path(f"/dev/vg0/{name}"), size)
    assert got == want, f"{image.name}: volume differs from {expected.name}"
    assert mapped_chunks(name) == nonzero, f"{image.name}: chunks allocated"
    if summary is not None:
        assert summary["chunks_allocated"] == nonzero and summary["virtual_size"] == size


# --- every subformat ----------------------------------------------------------------------------

SIZE = 40 * MiB + 72 * KiB  # whole sectors, not whole chunks: the last chunk is partial
PIECES = {
    0: os.urandom(3000),  # part of the first chunk
    MiB - 512: os.urandom(1024),  # across a chunk boundary
    5 * MiB + 4 * KiB: os.urandom(2 * MiB),  # across a VHD block boundary
    10 * MiB: bytes(MiB),  # written zeros
    20 * MiB + 4 * KiB: os.urandom(12 * KiB),
    33 * MiB: os.urandom(CHUNK),  # exactly one chunk
    SIZE - 5000: os.urandom(5000),  # the partial last chunk
}


def qemu_variants(work: Path, raw: Path) -> dict[str, Path]:
    """Images qemu-img makes of `raw`, some then changed with qemu-io: allocated zeros (write
    -P 0), zero clusters (write -z), subclusters, a backing chain."""

    def convert(name: str, fmt: str, *options: str, io: tuple[str, ...] = ()) -> Path:
        out = work / name
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(raw), str(out))
        if io:
            sh("qemu-io", "-f", fmt, *[a for cmd in io for a in ("-c", cmd)], str(out))
        return out

    base = convert("base.qcow2", "qcow2")
    overlay = work / "overlay.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1028k 100k", "-c", "write -z 5M 1M",
       "-c", "write -P 0 33M 64k", str(overlay))
    return {
        "vpc dynamic": convert("dyn.vhd", "vpc", "-o", "subformat=dynamic",
                               io=("write -P 0 12M 1M",)),
        "vpc fixed": convert("fixed.vhd", "vpc", "-o", "subformat=fixed,force_size=on"),
        "qcow2 compat 0.10": convert("v2.qcow2", "qcow2", "-o", "compat=0.10",
                                     io=("write -P 0 12M 1M",)),
        "qcow2 compat 1.1": convert("v3.qcow2", "qcow2", "-o", "compat=1.1",
                                    io=("write -P 0 12M 1M", "write -z 5M 64k")),
        "qcow2 compressed": convert("zlib.qcow2", "qcow2", "-c"),
        "qcow2 zstd": convert("zstd.qcow2", "qcow2", "-c", "-o", "compression_type=zstd"),
        "qcow2 extended_l2": convert("l2.qcow2", "qcow2", "-o",
                                     "extended_l2=on,cluster_size=128k",
                                     io=("write -P 0x77 13M 4k", "write -z 5M 8k",
                                         "write -P 0 16M 4k")),
        "qcow2 backing chain": overlay,
    }


def thinstack_variants(work: Path) -> dict[str, Path]:
    """Images thinstack's own writers make of PIECES (the written zeros as data, and a range
    marked zero on the way)."""
    made = {}
    for fmt, options in [("vhd", {}), ("vhd-fixed", {}), ("qcow2", {}),
                         ("qcow2", {"compress": True}), ("gow1", {}), ("gow2", {}), ("gow3", {})]:
        path = work / f"own-{fmt}{'-c' if options else ''}.img"
        writer = exporters.driver(fmt).create(path, SIZE, format=fmt, **options)
        for offset, data in sorted(PIECES.items()):
            if offset == 33 * MiB:  # in offset order, as writers take them
                writer.mark_zero(30 * MiB, MiB)
            writer.write(offset, data)
        writer.close()
        made[f"thinstack {fmt}{' compressed' if options else ''}"] = path
    return made


@pytest.mark.lab(disks=1, disk_size="2G", timeout=600)
def test_every_subformat_imports_byte_for_byte_allocating_only_non_zero_chunks(
        lab_disks, state_dirs, tmp_path):
    make_vg(lab_disks[0], "1G")
    raw = write_raw(tmp_path / "source.raw", SIZE, PIECES)
    images = {**qemu_variants(tmp_path, raw), **thinstack_variants(tmp_path)}
    for n, (label, image) in enumerate(images.items()):
        name = f"v{n}"
        # A chain is imported with its format named: --format auto follows no backing file.
        named = "qcow2" if label == "qcow2 backing chain" else "auto"
        summary = imports.import_image(image, VolumeRef("vg0", name), format=named).to_json()
        fmt = "vpc" if "vpc" in label or "vhd" in label else None
        expected = raw if "gow" in label else qemu_raw(image, tmp_path / "x.raw", fmt)
        assert_imported(image, name, expected, summary)
        assert summary["bytes_written"] <= summary["bytes_read"]
    assert journal_entries(state_dirs) == []


# --- the corpus, hostile images, capacity -------------------------------------------------------

def one_line_failure(done: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_real_world_images_hostile_inputs_and_capacity(lab_disks, state_dirs, tmp_path, corpus):
    make_vg(lab_disks[0], "200M")

    def imported(image: Path, name: str, *more: str) -> dict:
        return json.loads(ts("import", str(image), f"vg0/{name}", "--json", *more).stdout)

    # Hyper-V sizes a VHD by current_size, Virtual PC by CHS; both empty: nothing allocated,
    # though 127 GiB exceed the 200 MiB pool (thin volumes overcommit).
    hyperv = imported(corpus("hyperv2012r2-dynamic.vhd"), "hyperv")
    vpc = imported(corpus("virtualpc-dynamic.vhd"), "vpc")
    assert (hyperv["virtual_size"], vpc["virtual_size"]) == (136365211648, 136363130880)
    assert hyperv["chunks_allocated"] == vpc["chunks_allocated"] == 0
    assert int(sh("blockdev", "--getsize64", "/dev/vg0/hyperv")) >= 136365211648
    empty = tmp_path / "empty127.vhd"
    sh("qemu-img", "create", "-q", "-f", "vpc", str(empty), "127G")
    assert imported(empty, "empty127")["chunks_allocated"] == 0

    # fs-overhead.qcow2: its bytes, in no more chunks than its allocated clusters.
    fs = corpus("fs-overhead.qcow2")
    summary = imported(fs, "fs")
    assert summary["virtual_size"] == 858993664
    assert_imported(fs, "fs", qemu_raw(fs, tmp_path / "fs.raw"), summary)
    clusters = sum(e["length"] for e in json.loads(sh("qemu-img", "map", "--output=json",
                                                      str(fs))) if e["data"])
    assert summary["chunks_allocated"] * CHUNK <= -(-clusters // CHUNK) * CHUNK

    # Capacity: d2v holds 251 MiB of (zero) data. With the VG's free space taken, the pool
    # cannot hold it even after growing: refused before anything is made.
    d2v = corpus("d2v-zerofilled.vhd")
    free = int(float(sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free",
                        "vg0")))
    sh("lvcreate", "-q", "-L", f"{free}b", "-n", "filler", "vg0")
    one_line_failure(ts("import", str(d2v), "vg0/d2v", check=False), 6, "251.2MiB of data")
    assert "d2v.importing" not in volume_names() and journal_entries(state_dirs) == []
    # With room to grow it fits, and allocated-but-zero is not data: no chunk at all.
    sh("lvremove", "-q", "-y", "vg0/filler")
    summary = imported(d2v, "d2v")
    assert (summary["virtual_size"], summary["chunks_allocated"]) == (263454720, 0)
    assert summary["bytes_read"] == 263454720 and summary["bytes_written"] == 0

    before = volume_names()
    # A qcow2 chain whose base is missing names the missing link.
    snap2 = corpus("cirros-snapshot2.qcow2")
    qcow2 = ("--format", "qcow2")  # a chain's format is named, or no backing file is followed
    one_line_failure(ts("import", *qcow2, str(snap2), "vg0/c2", check=False), 8,
                     "cirros-snapshot1.qcow2")
    snap1 = corpus("cirros-snapshot1.qcow2")
    one_line_failure(ts("import", *qcow2, str(snap1), "vg0/c1", check=False), 8, "cirros.raw")
    one_line_failure(ts("import", *qcow2, str(snap2), "vg0/c2", check=False), 8, "cirros.raw")
    # Under --format auto the same image is refused before any file it names is looked at.
    one_line_failure(ts("import", str(snap1), "vg0/c1", check=False), 8, "--format qcow2")

    # Hostile or wrong inputs.
    qcow = tmp_path / "data.qcow2"
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
       str(write_raw(tmp_path / "d.raw", 8 * MiB, {MiB * i: os.urandom(MiB) for i in range(8)})),
       str(qcow))
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(qcow.read_bytes()[:qcow.stat().st_size // 2])
    bad_sum = tmp_path / "badsum.vhd"
    sh("qemu-img", "create", "-q", "-f", "vpc", str(bad_sum), "64M")
    with open(bad_sum, "r+b") as f:  # a byte of the dynamic header's reserved area
        f.seek(512 + 900)
        f.write(b"\x01")
    for source, words in [(truncated, ["truncated.qcow2", "past the end"]),
                          (bad_sum, ["badsum.vhd", "checksum"]),
                          (tmp_path, ["not a regular file"]),
                          (Path("/dev/null"), ["/dev/null", "not a regular file"])]:
        one_line_failure(ts("import", str(source), "vg0/bad", check=False), 8, *words)
    one_line_failure(ts("import", str(qcow), "vg0/bad", "--format", "vhd", check=False), 8,
                     "claimed format 'vhd'", "'qcow2'")
    one_line_failure(ts("import", str(qcow), "vg0/bad", "--size", "4M", check=False), 1,
                     "smaller than the image's virtual size")
    one_line_failure(ts("import", str(qcow), "vg0/hyperv", check=False), 4, "already exists")
    assert volume_names() == before and journal_entries(state_dirs) == []

    # --size larger than the image: the volume is that large, the bytes are the image's.
    summary = imported(qcow, "sized", "--size", "64M")
    assert int(sh("blockdev", "--getsize64", "/dev/vg0/sized")) == 64 * MiB
    assert_imported(qcow, "sized", tmp_path / "d.raw", summary)


# --- interruptions ------------------------------------------------------------------------------

def fault_image(tmp_path: Path) -> Path:
    """A raw image with more data than one checkpoint's worth, so mid-copy is reached."""
    pieces = {i * 2 * MiB + 4 * KiB: os.urandom(MiB + 5 * KiB) for i in range(150)}
    return write_raw(tmp_path / "big.raw", 320 * MiB, pieces)


@pytest.mark.lab(disks=1, disk_size="2G", timeout=600)
def test_an_import_killed_at_any_point_is_hidden_and_resumes_to_the_right_bytes(
        lab_disks, state_dirs, tmp_path):
    make_vg(lab_disks[0], "1G")
    image = fault_image(tmp_path)
    size = image.stat().st_size
    for point in faults.POINTS["import"]:
        name = point.replace("-", "")
        killed = ts("import", str(image), f"vg0/{name}",
                    env={"THINSTACK_FAULT": f"import:{point}"}, check=False)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        # Whatever was left carries the operation's tag: nothing looks finished.
        rows = json.loads(sh("lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", "vg0"))
        for row in rows["report"][0]["lv"]:
            if row["lv_name"] in (name, f"{name}.importing"):
                assert "ts_op_" in row["lv_tags"], (point, row)
        if point in ("mid-copy", "after-rename"):
            assert not {name, f"{name}.importing"} & listed()
        if point == "mid-copy":
            # Other commands leave an interrupted import alone; a fresh import of it is refused.
            ts("create", "vg0/bystander", "--size", "4M")
            assert f"{name}.importing" in volume_names()
            one_line_failure(ts("import", str(image), f"vg0/{name}", check=False), 5, "--resume")
        summary = json.loads(ts("import", "--resume", str(image), f"vg0/{name}",
                                "--json").stdout)
        if point == "mid-copy":  # continued from the journalled position, not from 0
            assert 0 < summary["bytes_read"] <= size - imports.CHECKPOINT_BYTES
        if point in ("after-copy", "after-rename"):
            assert summary["bytes_read"] == 0
        assert_imported(image, name, image, summary)
        sh("lvremove", "-q", "-y", f"vg0/{name}")
    assert journal_entries(state_dirs) == []


@pytest.mark.lab(disks=2, disk_size="2G", timeout=600)
def test_recover_removes_an_interrupted_import_and_errors_mid_copy_keep_it_or_not(
        lab_disks, state_dirs, tmp_path):
    make_vg(lab_disks[0], "1G")
    image = fault_image(tmp_path)

    # kill -9 mid-copy, then `thinstack recover`: the volume and the entry go; nothing resumes.
    killed = ts("import", str(image), "vg0/gone", env={"THINSTACK_FAULT": "import:mid-copy"},
                check=False)
    assert killed.returncode == -signal.SIGKILL
    assert "gone.importing" in volume_names()
    ts("recover", "vg0")
    assert volume_names() == set() and journal_entries(state_dirs) == []
    one_line_failure(ts("import", "--resume", str(image), "vg0/gone", check=False), 3,
                     "no interrupted import")

    # A changed source is not resumed.
    ts("import", str(image), "vg0/moved", env={"THINSTACK_FAULT": "import:mid-copy"},
       check=False)
    os.utime(image, ns=(0, 0))
    one_line_failure(ts("import", "--resume", str(image), "vg0/moved", check=False), 5,
                     "mtime_ns changed")
    ts("recover", "vg0")

    # A compressed cluster that does not inflate fails the copy half way: rolled back at once,
    # since resuming cannot mend the image.
    source = write_raw(tmp_path / "c.raw", 16 * MiB,
                       {i * MiB: os.urandom(KiB) * KiB for i in range(16)})  # compressible
    packed = tmp_path / "packed.qcow2"
    sh("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(source), str(packed))
    with open(packed, "r+b") as f:  # the last clusters' deflate streams: an invalid block type
        f.seek(packed.stat().st_size - 64 * KiB)
        f.write(b"\xff" * 64 * KiB)
    one_line_failure(ts("import", str(packed), "vg0/broken", check=False), 8,
                     "packed.qcow2", "compressed cluster")
    assert volume_names() == set() and journal_entries(state_dirs) == []

    # SIGTERM (as Ctrl-C) mid-copy unwinds: the volume stays hidden for --resume.
    proc = subprocess.Popen([sys.executable, "-m", "thinstack.cli", "import", str(image),
                             "vg0/term"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not any("created:" in step for e in journal_entries(state_dirs) for step in e["steps"]):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, proc.stderr.read()
    assert "term.importing" in volume_names() and "term" not in listed()
    summary = json.loads(ts("import", "--resume", str(image), "vg0/term", "--json").stdout)
    assert_imported(image, "term", image, summary)
    assert journal_entries(state_dirs) == []

    # A pool that fails writes when full, and no monitor to grow it: the import stops, kept;
    # once the pool is extended it resumes.
    make_vg(lab_disks[1], "64M", "vg1")
    sh("lvchange", "-q", "--errorwhenfull", "y", "vg1/pool")
    one_line_failure(ts("import", str(image), "vg1/full", check=False), 6,
                     "import into vg1/full stopped", "--resume")
    assert "full" not in {v["name"] for v in json.loads(ts("list", "vg1", "--json").stdout)}
    sh("lvextend", "-q", "-L", "+256M", "vg1/pool")
    summary = json.loads(ts("import", "--resume", str(image), "vg1/full", "--json").stdout)
    size = image.stat().st_size
    want, nonzero = content(image, size)
    assert content(Path("/dev/vg1/full"), size)[0] == want
    assert summary["chunks_allocated"] == nonzero
    assert journal_entries(state_dirs) == []


# --- formats read through qemu-img --------------------------------------------------------------

@pytest.mark.lab(disks=1, disk_size="1G", timeout=600)
def test_qemu_formats_convert_straight_into_the_volume(lab_disks, state_dirs, tmp_path):
    """VMDK (its subformats), VHDX, VDI, QED with a backing file, qcow v1, Parallels: qemu-img
    writes into the volume itself, with $TMPDIR a 1 MiB tmpfs that could not hold a copy of
    the 8 MiB of data; the bytes are qemu's and exactly the non-zero chunks are allocated. A
    pool that does not zero new chunks is refused, and a killed import resumes."""
    make_vg(lab_disks[0], "600M")
    raw = write_raw(tmp_path / "source.raw", SIZE, PIECES)
    small = tmp_path / "tmp"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1M,mode=1777", "tmpfs", str(small))
    env = {"TMPDIR": str(small)}

    def convert(name: str, fmt: str, *options: str) -> Path:
        out = tmp_path / name
        sh("qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(raw), str(out))
        return out

    base = tmp_path / "base.raw"
    base.write_bytes(raw.read_bytes())
    child = tmp_path / "child.qed"
    sh("qemu-img", "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", str(child),
       str(SIZE))
    sh("qemu-io", "-f", "qed", "-c", "write -P 0x5a 1028k 100k", "-c", "write -P 0 33M 64k",
       str(child))
    images = {
        "vmdk": convert("mono.vmdk", "vmdk"),
        "stream": convert("stream.vmdk", "vmdk", "-o", "subformat=streamOptimized"),
        "split": convert("split.vmdk", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"),
        "flat": convert("flat.vmdk", "vmdk", "-o", "subformat=monolithicFlat"),
        "vhdx": convert("d.vhdx", "vhdx"),
        "vdi": convert("d.vdi", "vdi"),
        "qcow": convert("d.qcow", "qcow"),
        "parallels": convert("d.hds", "parallels"),
        "qed": child,
    }
    for name, image in images.items():
        summary = json.loads(ts("import", str(image), f"vg0/{name}", "--format", "qemu",
                                "--json", env=env).stdout)
        assert summary["format"] == "qemu"
        assert_imported(image, name, qemu_raw(image, tmp_path / "x.raw"), summary)
        assert list(small.iterdir()) == [], name  # no copy and no private folder left
    assert journal_entries(state_dirs) == []

    # qemu-img leaves partial chunks: a pool that does not zero new ones would show stale bytes.
    sh("lvchange", "-q", "-Zn", "vg0/pool")
    one_line_failure(ts("import", str(images["vdi"]), "vg0/nozero", "--format", "qemu",
                        check=False), 5, "zeroes new chunks", "lvchange -Zy vg0/pool")
    assert "nozero.importing" not in volume_names() and journal_entries(state_dirs) == []
    sh("lvchange", "-q", "-Zy", "vg0/pool")

    # Killed after the volume was made or after the convert: --resume converts again.
    for point in ("after-lvcreate", "after-copy"):
        name = point.replace("-", "")
        killed = ts("import", str(images["split"]), f"vg0/{name}", "--format", "qemu",
                    env={**env, "THINSTACK_FAULT": f"import:{point}"}, check=False)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        summary = json.loads(ts("import", "--resume", str(images["split"]), f"vg0/{name}",
                                "--format", "qemu", "--json", env=env).stdout)
        assert_imported(images["split"], name, qemu_raw(images["split"], tmp_path / "x.raw"),
                        summary)
    assert journal_entries(state_dirs) == []
    sh("umount", str(small))
