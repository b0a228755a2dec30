"""Import benchmark: `thinstack import` against the same import by hand, in the lab, same run,
same pool.

Run it from the project root (it needs root, a scratch disk and the lab's kernel):

    thinstack lab run --disks 1 --disk-size 12G --mem 2G -- .venv/bin/python bench/import_bench.py

It generates a sparse raw disk (2 GiB virtual, about a quarter of it data in scattered runs, some
of them all zeros), converts it with qemu-img to a dynamic VHD and a qcow2, writes the zero runs
into them again with qemu-io (so they are allocated, holding zeros), and brings each image into a
fresh thin volume of its virtual size:

end to end (a new volume holding the image, durable):
  thinstack       `THINSTACK_TRACE=1 thinstack import IMAGE vg/NAME --json` (creates, fills,
                  renames, commits the volume); the trace and the summary give its phases
  by hand         lvcreate; `qemu-img convert -n --target-is-zero -t none -W -O raw IMAGE
                  /dev/vg/NAME`; fsync of the volume (what issue 10's goal compares with)

copy only (into a volume made beforehand, untimed):
  thinstack copy  the copy loop in process, as the import runs it: open the image, map it,
                  copy_extents into a BlockDeviceSink, sync
  qemu-img        `qemu-img convert -n --target-is-zero -t none -W -O raw IMAGE /dev/vg/NAME`
  dd              dd (O_DIRECT, 4 MiB blocks, conv=fsync) of a file holding just the image's
                  data runs back to back: the rate of writing those bytes, nothing else

Methods take turns, ROUNDS times each, best time kept; the image is in the page cache throughout.
Chunks: pool chunks the volume maps afterwards (kernel thin status). thinstack's volume must equal
qemu-img's byte for byte. The report goes to bench/reports/import.md and import.json; with
BENCH_LABEL=before it goes to import.before.json instead, which a later run reports beside its
own figures (run the "before" in a checkout of the earlier commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinstack.copy import BlockDeviceSink, copy_extents  # noqa: E402
from thinstack.importers import open_image  # noqa: E402

REPORTS = ROOT / "bench" / "reports"
THINSTACK = [sys.executable, "-m", "thinstack.cli"]

VG, DISK = "bench", "/dev/ubdb"
POOL_SIZE = "9G"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB
VIRTUAL = 2 * GiB
DATA_FRACTION = 0.25
ZERO_FRACTION = 0.15  # of the data runs, this share is all zeros
RUN_SIZES = [4 * KiB, 12 * KiB, 64 * KiB, 200 * KiB, 1 * MiB, 4 * MiB]
ROUNDS = 3
SEED = 20261122


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def commit() -> str:
    """The code measured: BENCH_COMMIT (for a copy without git), else the checkout's HEAD."""
    return os.environ.get("BENCH_COMMIT") or \
        sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").strip()


# --- the source ------------------------------------------------------------------------------

def make_raw(path: Path) -> list[tuple[int, int, bool]]:
    """A sparse raw disk: runs of 4 KiB to 4 MiB at scattered offsets (sector-aligned, mostly not
    chunk-aligned) with gaps between them sized so that about DATA_FRACTION of the disk is data,
    some runs all zeros. Returns the runs as (offset, length, zero)."""
    rng = random.Random(SEED)
    mean_gap = sum(RUN_SIZES) / len(RUN_SIZES) * (1 - DATA_FRACTION) / DATA_FRACTION
    runs, pos = [], 0
    while True:
        pos += int(rng.uniform(0, 2 * mean_gap)) // 512 * 512
        length = rng.choice(RUN_SIZES)
        if pos + length > VIRTUAL:
            break
        runs.append((pos, length, rng.random() < ZERO_FRACTION))
        pos += length
    with open(path, "wb") as f:
        f.truncate(VIRTUAL)
        for offset, length, zero in runs:
            f.seek(offset)
            f.write(bytes(length) if zero else rng.randbytes(length))
    return runs


def make_image(image: Path, fmt: str, options: list[str], raw: Path,
               runs: list[tuple[int, int, bool]]) -> None:
    """convert skips zeros, so the zero runs are written again as data (allocated zeros)."""
    sh("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(image))
    writes = [a for offset, length, zero in runs if zero
              for a in ("-c", f"write -P 0 {offset} {length}")]
    sh("qemu-io", "-f", fmt, *writes, str(image))


def data_file(path: Path, raw: Path, runs: list[tuple[int, int, bool]]) -> None:
    """The raw disk's data runs back to back: what dd writes."""
    with open(raw, "rb") as src, open(path, "wb") as out:
        for offset, length, _ in runs:
            src.seek(offset)
            out.write(src.read(length))


def nonzero_chunks(raw: Path) -> int:
    count, zero = 0, bytes(CHUNK)
    with open(raw, "rb") as f:
        while block := f.read(CHUNK):
            count += block != zero[:len(block)]
    return count


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


# --- volumes ---------------------------------------------------------------------------------

def lvcreate(name: str, size: int) -> str:
    sh("lvcreate", "-q", "-y", "--type", "thin", "--thinpool", "pool", "-V", f"{size}b", "-n",
       name, "--setactivationskip", "n", VG)
    return f"/dev/{VG}/{name}"


def fsync(dev: str) -> None:
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mapped_chunks(name: str) -> int:
    words = sh("dmsetup", "status", f"{VG}-{name}").split()  # 0 LEN thin MAPPED HIGHEST
    return int(words[3]) * 512 // CHUNK


def digest(dev: str, size: int) -> str:
    h = hashlib.sha256()
    with open(dev, "rb") as f:
        left = size
        while left:
            block = f.read(min(16 * MiB, left))
            h.update(block)
            left -= len(block)
    return h.hexdigest()


# --- methods: each brings IMAGE into volume NAME; `timed` says what the clock covers ----------

BY_HAND = "lvcreate + qemu-img convert -n --target-is-zero -t none -W"
QEMU_ARGS = ["convert", "-n", "--target-is-zero", "-t", "none", "-W", "-O", "raw"]


def traced(argv: list[str]) -> tuple[str, list[tuple[float, str]]]:
    """Run a thinstack command with THINSTACK_TRACE=1: its stdout and the (seconds, command)
    of every command or ioctl it ran, in order."""
    done = subprocess.run(argv, check=True, capture_output=True, text=True,
                          env={**os.environ, "THINSTACK_TRACE": "1"})
    trace = []
    for line in done.stderr.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0] == "thinstack:" and words[1].endswith("s"):
            trace.append((float(words[1][:-1]), words[2]))
    return done.stdout, trace


def phases(wall: float, own: float, trace: list[tuple[float, str]],
           last_before: Callable[[str], bool]) -> dict:
    """Where a command's time went: the commands before its copy, the copy loop, the commands
    after it, the rest of thinstack's own seconds (Python: images' maps, journal, writers'
    closing), and Python's start-up and exit (the wall time beyond its own). The copy loop
    traces itself; a trace without it (an older thinstack) counts what follows the last
    command `last_before` matches as copy and Python work together."""
    copy = next((i for i, (_, c) in enumerate(trace) if c.startswith("copy ")), None)
    if copy is not None:
        before, after, copying = trace[:copy], trace[copy + 1:], trace[copy][0]
    else:
        cut = max(i for i, (_, c) in enumerate(trace) if last_before(c)) + 1
        before, after, copying = trace[:cut], trace[cut:], None
    fixed, commit = sum(t for t, _ in before), sum(t for t, _ in after)
    rest = own - fixed - commit
    return {"start-up": round(wall - own, 3), "fixed commands": round(fixed, 3),
            "copy": round(copying if copying is not None else rest, 3),
            "other": round(rest - copying, 3) if copying is not None else None,
            "commit commands": round(commit, 3),
            "commands": [c.split(" --")[0][:60] for _, c in trace if not c.startswith("copy ")]}


def end_to_end(image: Path, virtual: int, notes: dict) -> dict[str, Callable[[str], None]]:
    def thinstack(name):
        start = time.monotonic()
        out, trace = traced([*THINSTACK, "import", str(image), f"{VG}/{name}", "--no-progress",
                             "--json"])
        wall = time.monotonic() - start
        notes.setdefault("phases", []).append(
            (wall, phases(wall, json.loads(out)["seconds"], trace,
                          lambda c: c.startswith("lvm lvcreate"))))

    def by_hand(name):
        dev = lvcreate(name, virtual)
        sh("qemu-img", *QEMU_ARGS, str(image), dev)
        fsync(dev)

    return {"thinstack import": thinstack, BY_HAND: by_hand}


def copy_only(image: Path, virtual: int, data: Path
              ) -> dict[str, Callable[[str], Callable[[], None]]]:
    """Each makes the volume (untimed) and returns what is timed."""

    def thinstack(name):
        dev = lvcreate(name, virtual)

        def copy():
            img = open_image(image)
            sink = BlockDeviceSink(dev)
            try:
                copy_extents(list(img.extents()), img.read, sink, size=img.virtual_size,
                             chunk=CHUNK, read_into=getattr(img, "read_into", None))
                sink.sync()
            finally:
                sink.close()
                img.close()
        return copy

    def qemu(name):
        dev = lvcreate(name, virtual)

        def convert():
            sh("qemu-img", *QEMU_ARGS, str(image), dev)
            fsync(dev)
        return convert

    def dd(name):
        dev = lvcreate(name, virtual)
        return lambda: sh("dd", f"if={data}", f"of={dev}", "bs=4M", "oflag=direct",
                          "conv=fsync", "status=none")

    return {"thinstack copy loop": thinstack, "qemu-img convert (convert only)": qemu,
            "dd of the data bytes": dd}


def measure(label: str, image: Path, virtual: int, data: Path) -> dict:
    warm(image)
    warm(data)
    notes: dict = {}
    whole = end_to_end(image, virtual, notes)
    copies = copy_only(image, virtual, data)
    times: dict[str, list[float]] = {m: [] for m in [*whole, *copies]}
    chunks: dict[str, int] = {}
    digests: dict[str, str] = {}
    for round_ in range(ROUNDS):
        for n, method in enumerate(times):
            name = f"m{n}r{round_}"
            if method in whole:
                start = time.monotonic()
                whole[method](name)
            else:
                timed = copies[method](name)
                start = time.monotonic()
                timed()
            times[method].append(time.monotonic() - start)
            if method != "dd of the data bytes":  # dd writes the runs back to back
                chunks[method] = mapped_chunks(name)
            if round_ == 0 and method in ("thinstack import", BY_HAND):
                digests[method] = digest(f"/dev/{VG}/{name}", virtual)
            sh("lvremove", "-q", "-y", f"{VG}/{name}")
            print(f"{label:6} {method:60} {times[method][-1]:7.2f} s", file=sys.stderr,
                  flush=True)
    return {"image": label, "file_bytes": image.stat().st_size, "virtual_size": virtual,
            "data_bytes": data.stat().st_size,
            "end_to_end": {m: _result(times[m], chunks.get(m)) for m in whole},
            "copy_only": {m: _result(times[m], chunks.get(m)) for m in copies},
            "phases": min(notes["phases"], key=lambda p: p[0])[1],
            "thinstack_equals_qemu": len(set(digests.values())) == 1}


def _result(seconds: list[float], chunks: int | None) -> dict:
    return {"seconds": round(min(seconds), 3), "all_seconds": [round(s, 3) for s in seconds],
            "chunks": chunks}


# --- the report ------------------------------------------------------------------------------

def goals(r: dict) -> dict[str, float]:
    """Issue 10's ratios for one image: import / by hand (goal <= 0.8), thinstack's chunks /
    by hand's (<= 1), the copy's rate / dd's for the data bytes (>= 0.7)."""
    whole, copies = r["end_to_end"], r["copy_only"]
    return {"import": whole["thinstack import"]["seconds"] / whole[BY_HAND]["seconds"],
            "chunks": whole["thinstack import"]["chunks"] / whole[BY_HAND]["chunks"],
            "copy rate": copies["dd of the data bytes"]["seconds"]
            / copies["thinstack copy loop"]["seconds"]}


GOALS = {"import": ("thinstack import / by hand, end to end", "<= 0.8"),
         "chunks": ("chunks allocated, thinstack / by hand", "<= 1"),
         "copy rate": ("copy loop's rate / dd's, for the data bytes", ">= 0.7")}


def goal_table(runs: list[dict], before: dict[str, dict]) -> list[str]:
    lines = ["| image | ratio | goal | before | now | met |", "|---|---|---:|---:|---:|---|"]
    for r in runs:
        now, then = goals(r), goals(before[r["image"]]) if r["image"] in before else {}
        for key, (what, goal) in GOALS.items():
            bound = float(goal.split()[1])
            met = now[key] <= bound if goal.startswith("<=") else now[key] >= bound
            was = f"{then[key]:.2f}" if key in then else "-"
            lines.append(f"| {r['image']} | {what} | {goal} | {was} | {now[key]:.2f} | "
                         f"{'yes' if met else '**no**'} |")
    return lines


def table(results: dict[str, dict], base: str, before: dict[str, dict] | None) -> list[str]:
    lines = [f"| method | seconds (best of {ROUNDS}) | time / {base} | chunks allocated "
             "| before: seconds |", "|---|---:|---:|---:|---:|"]
    for method, r in results.items():
        then = (before or {}).get(method)
        lines.append(f"| {method} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / results[base]['seconds']:.2f} | {r['chunks'] or '-'} | "
                     f"{then['seconds'] if then else '-'} |")
    return lines


def phase_table(now: dict, then: dict | None) -> list[str]:
    lines = ["| phase | before: seconds | now: seconds |", "|---|---:|---:|"]
    for key in ("start-up", "fixed commands", "copy", "other", "commit commands"):
        was = then.get(key) if then else None
        lines.append(f"| {key} | {'-' if was is None else was} | "
                     f"{'-' if now[key] is None else now[key]} |")
    lines += ["", f"Commands now ({processes(now)} processes): "
              + ", ".join(f"`{c}`" for c in now["commands"])]
    if then and then.get("other") is None:
        lines += ["", "(Before, the copy loop did not trace itself: its copy figure includes "
                  "the Python work around it.)"]
    if then:
        lines += ["", f"Commands before ({processes(then)} processes): "
                  + ", ".join(f"`{c}`" for c in then["commands"])]
    return lines


def processes(phases: dict) -> int:
    """The commands a thinstack run started (its ioctls start none)."""
    return sum(not c.startswith("ioctl ") for c in phases["commands"])


def report(runs: list[dict], context: dict, before: dict) -> str:
    by_image = {r["image"]: r for r in before.get("results", [])}
    lines = [
        "# Import benchmark", "",
        "Made by `bench/import_bench.py` (its docstring says exactly what each method runs) in "
        "the lab, User-Mode Linux, whose I/O and process start-up are slower than bare metal's:",
        "",
        "    thinstack lab run --disks 1 --disk-size 12G --mem 2G -- "
        ".venv/bin/python bench/import_bench.py", "",
        f"Source: a {context['virtual'] // MiB} MiB raw disk with {context['runs']} runs of "
        f"4 KiB to 4 MiB at scattered, mostly unaligned offsets, {context['data'] // MiB} MiB "
        f"in all, {context['zero'] // MiB} MiB of them zeros; converted by qemu-img to a dynamic "
        "VHD and a qcow2, the zero runs then written into the images with qemu-io so that they "
        f"are allocated but zero. Pool chunk {CHUNK // KiB} KiB; the content has "
        f"**{context['nonzero_chunks']}** non-zero chunks, the least any importer can allocate.",
        "",
        f"By hand: `lvcreate`, then `qemu-img {' '.join(QEMU_ARGS)} IMAGE /dev/VG/NAME`. "
        "*End to end* is from nothing to a durable volume holding the image (volume creation, "
        "and for thinstack its rename and commit, included); *copy only* times the bytes "
        f"moving into a volume made beforehand. Each method ran {ROUNDS} times, taking turns "
        "with the others; the best time is shown. *Before*: the same script run on "
        f"{before.get('context', {}).get('commit', 'no earlier run')}, in the same lab on the "
        "same host (another boot, so compare its ratios, not its seconds).", "",
        "## Issue 10's goals", "", *goal_table(runs, by_image), ""]
    for r in runs:
        then = by_image.get(r["image"])
        lines += [f"## {r['image']}: {r['file_bytes'] // MiB} MiB file, "
                  f"{r['virtual_size'] // MiB} MiB virtual", "", "End to end:", "",
                  *table(r["end_to_end"], "thinstack import", then and then["end_to_end"]), "",
                  "Copy only:", "",
                  *table(r["copy_only"], "thinstack copy loop", then and then["copy_only"]), "",
                  "Where `thinstack import`'s time goes (its best run; commands timed by "
                  "THINSTACK_TRACE):", "", *phase_table(r["phases"], then and then["phases"]),
                  "", "thinstack's volume equals qemu-img's byte for byte: "
                  + ("yes" if r["thinstack_equals_qemu"] else "**NO**"), ""]
    lines += ["## Environment", "", f"- lab kernel {context['kernel']}, {context['cpus']} CPU, "
              f"{context['qemu_img']}", f"- {context['date']}, commit {context['commit']}", ""]
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="import-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        os.environ["THINSTACK_STATE_DIR"] = str(work / "state")
        os.environ["THINSTACK_RUN_DIR"] = str(work / "run")
        sh("pvcreate", "-q", DISK)
        sh("vgcreate", "-q", VG, DISK)
        sh("lvcreate", "-q", "--type", "thin-pool", "-L", POOL_SIZE, "-Zy", "--chunksize",
           f"{CHUNK // KiB}k", "-n", "pool", "--addtag", "ts_pool", VG)
        raw, data = work / "disk.raw", work / "data.bin"
        runs = make_raw(raw)
        data_file(data, raw, runs)
        context = {"virtual": VIRTUAL, "runs": len(runs), "data": data.stat().st_size,
                   "zero": sum(n for _, n, z in runs if z), "nonzero_chunks": nonzero_chunks(raw),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "kernel": platform.release(), "cpus": os.cpu_count(),
                   "commit": commit(),
                   "qemu_img": sh("qemu-img", "--version").splitlines()[0]}
        results = []
        for label, fmt, options in [("vhd", "vpc", ["-o", "subformat=dynamic"]),
                                    ("qcow2", "qcow2", [])]:
            image = work / f"disk.{label}"
            make_image(image, fmt, options, raw, runs)
            virtual = json.loads(sh("qemu-img", "info", "--output=json", str(image)))[
                "virtual-size"]
            results.append(measure(label, image, virtual, data))
            image.unlink()
    REPORTS.mkdir(parents=True, exist_ok=True)
    figures = json.dumps({"context": context, "results": results}, indent=2) + "\n"
    if os.environ.get("BENCH_LABEL") == "before":
        (REPORTS / "import.before.json").write_text(figures)
        return 0
    (REPORTS / "import.json").write_text(figures)
    before_file = REPORTS / "import.before.json"
    before = json.loads(before_file.read_text()) if before_file.exists() else {}
    (REPORTS / "import.md").write_text(report(results, context, before))
    print((REPORTS / "import.md").read_text())
    return 0 if all(r["thinstack_equals_qemu"] for r in results) else 1


def rerender() -> int:
    """`import_bench.py --report`: the report again from import.json (and import.before.json)."""
    f = json.loads((REPORTS / "import.json").read_text())
    before_file = REPORTS / "import.before.json"
    before = json.loads(before_file.read_text()) if before_file.exists() else {}
    (REPORTS / "import.md").write_text(report(f["results"], f["context"], before))
    return 0


if __name__ == "__main__":
    sys.exit(rerender() if sys.argv[1:] == ["--report"] else main())
