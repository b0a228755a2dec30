"""Mount benchmark: reading images through `thinstack mount` against `thinstack export`, in the
lab, same run, same volume.

Run it from the project root (root, two scratch disks, the lab's kernel), or through bench/run:

    thinstack lab run --disks 2 --disk-size 8G --mem 2G -- .venv/bin/python bench/fuse_bench.py

It fills a thin volume (1 GiB by default) so that a quarter of it is mapped, in runs of 64 KiB to
4 MiB at scattered offsets, mounts the VG, and for qcow2 and vhd times, the page cache dropped
before each, best of ROUNDS:

  export        `thinstack export --format F` to a file on an ext4 file system (second disk)
  mount read    open NAME.F in the mount and read it to the end in 1 MiB reads (no write)
  mount cp      `cp` of NAME.F from the mount to the same ext4 file system (what export does:
                the image ends up in a file)
  convert       `qemu-img convert -O raw` from the mounted file, and from the exported file
  first byte    open NAME.F (a thin snapshot and a read of the pool's mapping) and read 4 KiB

Throughput is the image's bytes per second. When pyfuse3 and trio are importable (Debian:
python3-pyfuse3 python3-trio), it also measures the bindings' per-read overhead: a file served
from memory by mfusepy and by pyfuse3, read with 4 KiB, 128 KiB and O_DIRECT 128 KiB reads.
The report goes to bench/reports/fuse.md and fuse.json (`--report-only` writes the first
again from the second).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import random
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "reports"
THINSTACK = [sys.executable, "-m", "thinstack.cli"]
VG, DISK, OUT_DISK = "bench", "/dev/ubdb", "/dev/ubdc"
CHUNK = 64 << 10
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
VIRTUAL = int(os.environ.get("BENCH_VIRTUAL", GiB))
MAPPED_FRACTION = 0.25
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 2))
SEED = 20261202
NAME = "vm"
DEV = f"/dev/{VG}/{NAME}"
FORMATS = {"qcow2": "qcow2", "vhd": "vpc"}


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def fill(rng: random.Random) -> int:
    sizes = [64 * KiB, 128 * KiB, 256 * KiB, MiB, 4 * MiB]
    mean_gap = sum(sizes) / len(sizes) * (1 - MAPPED_FRACTION) / MAPPED_FRACTION
    mapped, pos = 0, 0
    fd = os.open(DEV, os.O_WRONLY)
    try:
        while True:
            pos += int(rng.uniform(0, 2 * mean_gap)) // CHUNK * CHUNK
            length = rng.choice(sizes)
            if pos + length > VIRTUAL:
                break
            os.pwrite(fd, rng.randbytes(length), pos)
            mapped, pos = mapped + length, pos + length
        os.fsync(fd)
    finally:
        os.close(fd)
    return mapped


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(action) -> float:
    drop_caches()
    start = time.monotonic()
    action()
    return time.monotonic() - start


def best(action) -> float:
    return min(timed(action) for _ in range(ROUNDS))


def read_through(path: Path, piece: int = MiB) -> int:
    fd = os.open(path, os.O_RDONLY)
    total = 0
    try:
        while data := os.read(fd, piece):
            total += len(data)
    finally:
        os.close(fd)
    return total


def first_byte(path: Path) -> float:
    start = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        return time.monotonic() - start
    finally:
        os.close(fd)


def export(fmt: str, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    sh(*THINSTACK, "export", f"{VG}/{NAME}", str(dest), "--format", fmt, "--no-progress")


def copy(source: Path, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    sh("cp", str(source), str(dest))


def convert(qemu_fmt: str, source: Path, dest: Path) -> None:
    sh("qemu-img", "convert", "-f", qemu_fmt, "-O", "raw", str(source), str(dest))
    dest.unlink()


def images(mnt: Path, out: Path) -> dict:
    results = {}
    for fmt, qemu_fmt in FORMATS.items():
        mounted = mnt / VG / f"{NAME}.{fmt}"
        exported = out / f"exported.{fmt}"
        r = {"image_bytes": mounted.stat().st_size,
             "export_s": best(lambda: export(fmt, exported)),  # noqa: B023 (called at once)
             "mount_read_s": best(lambda: read_through(mounted)),  # noqa: B023
             "mount_cp_s": best(lambda: copy(mounted, out / "copied")),  # noqa: B023
             "convert_mounted_s": best(lambda: convert(qemu_fmt, mounted,  # noqa: B023
                                                       out / "c.raw")),
             "convert_exported_s": best(lambda: convert(qemu_fmt, exported,  # noqa: B023
                                                        out / "c.raw")),
             "first_byte_s": sorted(first_byte(mounted) for _ in range(5))[2],
             "equal": subprocess.run(["qemu-img", "compare", "-f", qemu_fmt, "-F", qemu_fmt,
                                      str(mounted), str(exported)],
                                     capture_output=True).returncode == 0}
        (out / "copied").unlink(missing_ok=True)
        results[fmt] = r
        print(fmt, json.dumps(r), file=sys.stderr)
    return results


# --- the bindings: a file served from memory -----------------------------------------------

MEMORY_FILE = 256 * MiB
_BUF = bytes(range(256)) * 4096  # 1 MiB


def _data(offset: int, size: int) -> bytes:
    size = max(0, min(size, MEMORY_FILE - offset))
    at = offset % len(_BUF)
    return _BUF[at:at + size] if at + size <= len(_BUF) else bytes(size)


def serve_mfusepy(mnt: str) -> None:
    import mfusepy

    class FS(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path == "/":
                return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
            if path == "/f":
                return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1, st_size=MEMORY_FILE)
            raise OSError(errno.ENOENT, path)

        def open(self, path, flags):
            return 1

        def read(self, path, size, offset, fh):
            return _data(offset, size)

    mfusepy.FUSE(FS(), mnt, foreground=True, ro=True)


def serve_pyfuse3(mnt: str) -> None:
    import pyfuse3
    import trio

    class FS(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            e = pyfuse3.EntryAttributes()
            e.st_ino = inode
            e.st_mode = stat.S_IFDIR | 0o755 if inode == pyfuse3.ROOT_INODE \
                else stat.S_IFREG | 0o600
            e.st_size = 0 if inode == pyfuse3.ROOT_INODE else MEMORY_FILE
            return e

        async def lookup(self, parent, name, ctx=None):
            if name == b"f":
                return await self.getattr(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, offset, size):
            return _data(offset, size)

    pyfuse3.init(FS(), mnt, {"ro", "fsname=bench"})
    trio.run(pyfuse3.main)


def bindings() -> dict:
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        return {}
    results = {}
    for binding in ("mfusepy", "pyfuse3"):
        mnt = tempfile.mkdtemp(prefix=f"bench-{binding}-")
        server = subprocess.Popen([sys.executable, __file__, "--serve", binding, mnt],
                                  stderr=subprocess.DEVNULL)
        path = Path(mnt) / "f"
        for _ in range(100):
            if path.exists():
                break
            time.sleep(0.1)
        r = {}
        for label, args in (("4k", ["bs=4k"]), ("128k", ["bs=128k"]),
                            ("128k_direct", ["bs=128k", "iflag=direct"])):
            drop_caches()
            start = time.monotonic()
            sh("dd", f"if={path}", "of=/dev/null", *args)
            r[label] = MEMORY_FILE / (time.monotonic() - start) / MiB
        subprocess.run(["umount", mnt], check=True)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        results[binding] = r
        print(binding, json.dumps(r), file=sys.stderr)
    return results


# --- the report ----------------------------------------------------------------------------

def report(setup: dict, results: dict, binding: dict) -> None:
    lines = ["# thinstack mount: reading images through FUSE", "",
             f"Lab (User-Mode Linux, {setup['kernel']}), {setup['virtual'] // MiB} MiB volume "
             f"with {setup['mapped'] // MiB} MiB mapped in scattered runs; best of {ROUNDS}, "
             "page cache dropped before each; generated by bench/fuse_bench.py.", "",
             "| format | image MiB | export s | mount read s (vs export) | mount cp s (vs export)"
             " | convert mounted s | convert exported s | first byte s | equal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for fmt, r in results.items():
        lines.append(
            f"| {fmt} | {r['image_bytes'] / MiB:.0f} | {r['export_s']:.2f} | "
            f"{r['mount_read_s']:.2f} ({r['export_s'] / r['mount_read_s']:.0%}) | "
            f"{r['mount_cp_s']:.2f} ({r['export_s'] / r['mount_cp_s']:.0%}) | "
            f"{r['convert_mounted_s']:.2f} | {r['convert_exported_s']:.2f} | "
            f"{r['first_byte_s']:.2f} | {r['equal']} |")
    lines += ["", "Percentages: the mount's throughput as a share of the export's (time of the "
              "export / time through the mount; the goal is at least 80%). \"first byte\": "
              "open and read 4 KiB of a file not open yet (the median of 5), which takes the "
              "snapshot and reads the pool's mapping. \"convert\": `qemu-img convert -O raw` "
              "to the ext4 disk; from the mount it reads the volume through FUSE with eight "
              "requests in flight, which out-of-order reads make slower than one at a time "
              "(`-m 1` took half the time in a trial run), where the exported file is compact "
              "and on a plain disk."]
    if binding:
        lines += ["", "## FUSE bindings: a 256 MiB file served from memory (MiB/s)", "",
                  "| binding | 4 KiB reads | 128 KiB reads | 128 KiB O_DIRECT |",
                  "|---|---:|---:|---:|"]
        for name, r in binding.items():
            lines.append(f"| {name} | {r['4k']:.0f} | {r['128k']:.0f} | "
                         f"{r['128k_direct']:.0f} |")
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "fuse.md").write_text("\n".join(lines) + "\n")
    (REPORTS / "fuse.json").write_text(json.dumps(
        {"setup": setup, "results": results, "bindings": binding}, indent=2) + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--report-only"]:  # the tables again from the last fuse.json
        data = json.loads((REPORTS / "fuse.json").read_text())
        report(data["setup"], data["results"], data["bindings"])
        return
    if sys.argv[1:2] == ["--serve"]:
        {"mfusepy": serve_mfusepy, "pyfuse3": serve_pyfuse3}[sys.argv[2]](sys.argv[3])
        return
    os.environ.setdefault("THINSTACK_STATE_DIR", tempfile.mkdtemp(prefix="bench-state-"))
    os.environ.setdefault("THINSTACK_RUN_DIR", tempfile.mkdtemp(prefix="bench-run-"))
    sh("pvcreate", "-q", DISK)
    sh("vgcreate", "-q", VG, DISK)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "4G", "-Zy", "-c", "64k", "-n", "pool",
       "--addtag", "ts_pool", VG)
    sh(*THINSTACK, "create", f"{VG}/{NAME}", "--size", str(VIRTUAL))
    mapped = fill(random.Random(SEED))
    sh("mkfs.ext4", "-q", OUT_DISK)
    out = Path(tempfile.mkdtemp(prefix="bench-out-"))
    sh("mount", OUT_DISK, str(out))
    mnt = Path(tempfile.mkdtemp(prefix="bench-mnt-"))
    sh(*THINSTACK, "mount", str(mnt), VG)
    try:
        results = images(mnt, out)
    finally:
        sh(*THINSTACK, "umount", str(mnt))
        sh("umount", str(out))
    report({"virtual": VIRTUAL, "mapped": mapped, "rounds": ROUNDS,
            "kernel": platform.release()}, results, bindings())


if __name__ == "__main__":
    main()
