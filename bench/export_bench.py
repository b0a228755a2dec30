"""Export benchmark: `thinstack export` against `qemu-img convert`, in the lab, same run, same LV.

Run it from the project root (it needs root, two scratch disks and the lab's kernel):

    thinstack lab run --disks 2 --disk-size 8G --mem 2G -- .venv/bin/python bench/export_bench.py

It fills a thin volume (2 GiB by default) so that a quarter of it is mapped, in runs of 64 KiB to
4 MiB at scattered offsets (a few of them zeros, as freed blocks a guest never trimmed), and
exports it to an ext4 file system on the second disk, each way timed end to end, the page cache
dropped before each, best of ROUNDS:

  thinstack qcow2 / vhd   `THINSTACK_TRACE=1 thinstack export VG/NAME DEST --format qcow2|vhd`
                          (snapshot, read the mapped chunks, write, remove the snapshot); the
                          trace and the --json summary give its phases
  by hand qcow2 / vpc     the consistent export by hand (issue 10's reference): `lvcreate -s -K
                          -n NAME-hand VG/NAME`, `qemu-img convert -f raw -O qcow2|vpc
                          /dev/VG/NAME-hand DEST`, `lvremove -y VG/NAME-hand`

The same for a volume of that size with nothing mapped (the fixed cost of each way). Then the
incremental case: a full `--incremental` export, 1% of the volume rewritten (scattered 64 KiB
blocks), and the next `--incremental` export, against the full one. Last, the volume grown to 16
times its size, the same data in it, exported both ways again. Every image is checked equal to
the volume with `qemu-img compare` (for VHD chains, which QEMU does not follow, with thinstack's
importer). The report goes to bench/reports/export.md and export.json; with BENCH_LABEL=before
to export.before.json, which a later run reports beside its own figures.
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
sys.path.insert(0, str(ROOT))  # the importer, to read VHD chains

from bench.import_bench import commit, phases, processes, traced  # noqa: E402
from thinstack.importers import open_image  # noqa: E402

REPORTS = ROOT / "bench" / "reports"
THINSTACK = [sys.executable, "-m", "thinstack.cli"]

VG, DISK, OUT_DISK = "bench", "/dev/ubdb", "/dev/ubdc"
POOL_SIZE = "6G"
CHUNK = 64 << 10
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
VIRTUAL = int(os.environ.get("BENCH_VIRTUAL", 2 * GiB))
MAPPED_FRACTION = 0.25
ZERO_FRACTION = 0.05  # of the runs, this share is written as zeros: mapped, all zero
CHANGED_FRACTION = 0.01
SPARSE_VIRTUAL = 16 * VIRTUAL
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 2))
SEED = 20261122
NAME = "vm"
DEV = f"/dev/{VG}/{NAME}"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def fill(rng: random.Random) -> int:
    """Runs of 64 KiB to 4 MiB, chunk-aligned (the pool maps whole chunks whatever the guest
    writes), with gaps sized so that MAPPED_FRACTION of the volume ends up mapped."""
    sizes = [64 * KiB, 128 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
    mean_gap = sum(sizes) / len(sizes) * (1 - MAPPED_FRACTION) / MAPPED_FRACTION
    mapped, pos = 0, 0
    fd = os.open(DEV, os.O_WRONLY)
    try:
        while True:
            pos += int(rng.uniform(0, 2 * mean_gap)) // CHUNK * CHUNK
            length = rng.choice(sizes)
            if pos + length > VIRTUAL:
                break
            zero = rng.random() < ZERO_FRACTION
            os.pwrite(fd, bytes(length) if zero else rng.randbytes(length), pos)
            mapped += length
            pos += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return mapped


def change(rng: random.Random) -> int:
    """Rewrite CHANGED_FRACTION of the volume as scattered single chunks."""
    blocks = rng.sample(range(VIRTUAL // CHUNK), int(VIRTUAL * CHANGED_FRACTION) // CHUNK)
    fd = os.open(DEV, os.O_WRONLY)
    try:
        for b in sorted(blocks):
            os.pwrite(fd, rng.randbytes(CHUNK), b * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(blocks) * CHUNK


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sizes(path: Path) -> dict:
    st = path.stat()
    return {"apparent": st.st_size, "allocated": st.st_blocks * 512}


def timed(steps: list[list[str]]) -> tuple[float, str, dict | None]:
    """Run the commands one after the other, the page cache dropped first: the seconds, the
    last one's output and, for a thinstack export (traced), its phases."""
    drop_caches()
    start = time.monotonic()
    found = None
    for argv in steps:
        if argv[:len(THINSTACK)] == THINSTACK:
            out, trace = traced(argv)
            found = (out, trace)
        else:
            out = sh(*argv)
    seconds = time.monotonic() - start
    if found is None:
        return seconds, out, None
    out, trace = found
    return seconds, out, phases(seconds, json.loads(out)["seconds"], trace, _metadata_read)


def _metadata_read(command: str) -> bool:
    """The last command before an older thinstack's copy: its metadata read."""
    return command.startswith(("thin_dump", "thin_delta")) or "release_metadata_snap" in command


def qemu_same(dev: str, path: Path, fmt: str) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, dev, str(path)],
                          capture_output=True)
    return done.returncode == 0


def importer_same(path: Path) -> bool:
    """For VHD chains: QEMU ignores a VHD's parent, thinstack's importer follows it."""
    image = open_image(path, format="vhd")  # a chain: auto would follow no parent
    try:
        with open(DEV, "rb") as dev:
            for off in range(0, VIRTUAL, 16 * MiB):
                n = min(16 * MiB, VIRTUAL - off)
                if hashlib.sha256(image.read(off, n)).digest() != \
                        hashlib.sha256(dev.read(n)).digest():
                    return False
        return True
    finally:
        image.close()


def by_hand(fmt: str) -> Callable[[str, str], list[list[str]]]:
    return lambda n, d: [["lvcreate", "-q", "-y", "-s", f"{VG}/{n}", "-n", f"{n}-hand", "-K"],
                         ["qemu-img", "convert", "-f", "raw", "-O", fmt,
                          f"/dev/{VG}/{n}-hand", d],
                         ["lvremove", "-q", "-y", f"{VG}/{n}-hand"]]


METHODS = {  # name -> (the commands for volume NAME and DEST, qemu-img's name for the format)
    "thinstack qcow2": (lambda n, d: [[*THINSTACK, "export", f"{VG}/{n}", d, "--format",
                                       "qcow2", "--json", "--no-progress"]], "qcow2"),
    "by hand qcow2": (by_hand("qcow2"), "qcow2"),
    "thinstack vhd": (lambda n, d: [[*THINSTACK, "export", f"{VG}/{n}", d, "--format", "vhd",
                                     "--json", "--no-progress"]], "vpc"),
    "by hand vpc": (by_hand("vpc"), "vpc"),
}
PAIRS = {"thinstack qcow2": "by hand qcow2", "thinstack vhd": "by hand vpc"}


def full_exports(out: Path, name: str) -> dict:
    results = {}
    for method, (steps, fmt) in METHODS.items():
        dest = out / f"{method.replace(' ', '_')}.img"
        runs = []  # (seconds, stdout, phases)
        for _ in range(ROUNDS):
            dest.unlink(missing_ok=True)
            runs.append(timed(steps(name, str(dest))))
        seconds, stdout, phase = min(runs, key=lambda r: r[0])
        results[method] = {"seconds": seconds, "all_seconds": [r[0] for r in runs],
                           **sizes(dest), "equal": qemu_same(f"/dev/{VG}/{name}", dest, fmt)}
        if method.startswith("thinstack"):
            results[method]["summary"] = json.loads(stdout)  # of the best run
            results[method]["phases"] = phase
        print(f"{name} {method:28} {seconds:7.2f} s  {results[method]['allocated'] // MiB} MiB",
              file=sys.stderr)
        dest.unlink()
    return results


def incremental(out: Path, rng: random.Random) -> dict:
    """Per format: a full --incremental export, 1% changed, the next one."""
    results = {}
    for fmt, qemu_fmt in (("qcow2", "qcow2"), ("vhd", None)):
        steps = {}
        for step in ("full", "incremental"):
            if step == "incremental":
                steps["changed_bytes"] = change(rng)
            dest = out / f"inc-{step}.{fmt}"
            seconds, stdout, phase = timed([[*THINSTACK, "export", "--incremental", "--format",
                                             fmt, f"{VG}/{NAME}", str(dest), "--json",
                                             "--no-progress"]])
            equal = qemu_same(DEV, dest, qemu_fmt) if qemu_fmt else importer_same(dest)
            steps[step] = {"seconds": seconds, **sizes(dest), "equal": equal,
                           "summary": json.loads(stdout), "phases": phase}
            print(f"{fmt} {step:12} {seconds:7.2f} s  {steps[step]['allocated'] // MiB} MiB",
                  file=sys.stderr)
        for step in ("full", "incremental"):
            (out / f"inc-{step}.{fmt}").unlink()
        results[fmt] = steps
    return results


def full_table(results: dict, before: dict | None) -> list[str]:
    lines = ["| method | seconds | thinstack / by hand | before: thinstack / by hand "
             "| thinstack's own seconds | allocated MiB | apparent MiB | equal to the volume |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for ours, theirs in PAIRS.items():
        for method in (ours, theirs):
            r, mine = results[method], method == ours
            was = _ratio(before, ours, theirs) if mine and before else None
            lines.append(
                f"| {method} | {r['seconds']:.2f} | "
                f"{_ratio(results, ours, theirs):.2f} | " if mine else f"| {method} | "
                f"{r['seconds']:.2f} | | ")
            lines[-1] += (f"{'-' if was is None else f'{was:.2f}'} | {r['summary']['seconds']} | "
                          if mine else " | | ")
            lines[-1] += (f"{r['allocated'] / MiB:.0f} | {r['apparent'] / MiB:.0f} | "
                          f"{'yes' if r['equal'] else '**NO**'} |")
    return lines


def _ratio(results: dict, ours: str, theirs: str) -> float:
    return results[ours]["seconds"] / results[theirs]["seconds"]


def _inc_ratio(steps: dict) -> float:
    return steps["incremental"]["seconds"] / steps["full"]["seconds"]


def goal_table(full: dict, sparse: dict, inc: dict, before: dict) -> list[str]:
    rows = []
    for ours, theirs in PAIRS.items():
        rows.append((f"{ours}, {VIRTUAL // GiB} GiB: thinstack / by hand", "<= 0.5",
                     _ratio(full, ours, theirs),
                     _ratio(before["full"], ours, theirs) if before else None))
        rows.append((f"{ours}, {SPARSE_VIRTUAL // GiB} GiB: thinstack / by hand",
                     f"< {_ratio(full, ours, theirs):.2f} (the {VIRTUAL // GiB} GiB ratio)",
                     _ratio(sparse, ours, theirs),
                     _ratio(before["sparse"], ours, theirs) if before else None))
    for fmt, steps in inc.items():
        rows.append((f"{fmt}: incremental (1% changed) / full, time", "<= 0.10",
                     _inc_ratio(steps),
                     _inc_ratio(before["incremental"][fmt]) if before else None))
    lines = ["| ratio | goal | before | now | met |", "|---|---|---:|---:|---|"]
    for what, goal, now, was in rows:
        bound = float(goal.split()[1])
        met = now <= bound if goal.startswith("<=") else now < bound
        lines.append(f"| {what} | {goal} | {'-' if was is None else f'{was:.2f}'} | {now:.2f} "
                     f"| {'yes' if met else '**no**'} |")
    return lines


def phase_table(rows: dict[str, tuple[dict, dict | None]]) -> list[str]:
    keys = ("start-up", "fixed commands", "copy", "other", "commit commands")
    lines = ["| export | " + " | ".join(keys) + " | processes run |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for label, (now, then) in rows.items():
        for tag, p in (("now", now), ("before", then)):
            if p is None:
                continue
            cells = ["-" if p.get(k) is None else f"{p[k]:.2f}" for k in keys]
            lines.append(f"| {label} ({tag}) | " + " | ".join(cells)
                         + f" | {processes(p)} |")
    return lines


def report(full: dict, empty: dict, inc: dict, sparse: dict, context: dict,
           before: dict) -> str:
    def then(section: str, *keys: str) -> dict | None:
        found = before.get(section) if before else None
        for key in keys:
            found = found.get(key) if found else None
        return found

    lines = [
        "# Export benchmark", "",
        "Generated by `bench/export_bench.py` in the lab (User-Mode Linux: every process start and "
        "every LVM command costs far more there than on bare metal, so compare ratios, not "
        "absolute times):", "",
        "    thinstack lab run --disks 2 --disk-size 8G --mem 2G -- "
        ".venv/bin/python bench/export_bench.py", "",
        f"Volume: {context['virtual'] // MiB} MiB thin, {context['mapped'] // MiB} MiB of it "
        f"mapped ({context['mapped'] * 100 // context['virtual']}%) in runs of 64 KiB-4 MiB at "
        f"scattered offsets, {ZERO_FRACTION:.0%} of the runs zeros. Pool chunk "
        f"{CHUNK // KiB} KiB. Images written to ext4 on a second disk. Times end to end "
        f"(process start, snapshot and its removal included), page cache dropped before each, "
        f"best of {ROUNDS}; thinstack's own seconds: from its --json summary, i.e. without the "
        "Python start. Allocated: the space the file takes; apparent: its length.", "",
        "By hand, consistent (what a careful operator runs): `lvcreate -s -K -n NAME-hand "
        "VG/NAME`, `qemu-img convert -f raw -O FMT /dev/VG/NAME-hand DEST`, `lvremove -y "
        "VG/NAME-hand`. *Before*: the same script run on "
        f"{before.get('context', {}).get('commit', 'no earlier run') if before else 'no run'}, "
        "in the same lab (another boot: compare ratios).", "",
        "## Issue 10's goals", "", *goal_table(full, sparse, inc, before), "",
        "## Where thinstack's time goes", "",
        "Phases of the best run (THINSTACK_TRACE): Python's start-up and exit, the commands "
        "before the copy (lvs, lvcreate -s, reading the mapping), the copy loop, other Python "
        "work (the writer's closing, journal), the commands after it (lvremove, or the "
        "rotation of the --incremental base).", "",
        *phase_table({
            f"qcow2, {VIRTUAL // GiB} GiB": (full["thinstack qcow2"]["phases"],
                                             then("full", "thinstack qcow2", "phases")),
            f"qcow2, {VIRTUAL // GiB} GiB, nothing mapped": (
                empty["thinstack qcow2"]["phases"], then("empty", "thinstack qcow2", "phases")),
            "qcow2 --incremental, 1% changed": (
                inc["qcow2"]["incremental"]["phases"],
                then("incremental", "qcow2", "incremental", "phases")),
            f"qcow2, {SPARSE_VIRTUAL // GiB} GiB": (sparse["thinstack qcow2"]["phases"],
                                                    then("sparse", "thinstack qcow2", "phases")),
        }), "",
        "Commands of a full export now: " + ", ".join(
            f"`{c}`" for c in full["thinstack qcow2"]["phases"]["commands"]), ""]
    old = then("full", "thinstack qcow2", "phases")
    if old:
        lines += ["Before: " + ", ".join(f"`{c}`" for c in old["commands"]), ""]
    lines += ["## Full export", "", *full_table(full, then("full")), "",
              "thinstack reads only the mapped chunks (`bytes_read` "
              f"{full['thinstack qcow2']['summary']['bytes_read'] // MiB} MiB); qemu-img reads "
              f"all {context['virtual'] // MiB} MiB of the LV and looks for zeros itself.", "",
              "## The same size, nothing mapped", "",
              "What each way costs whatever the data: for thinstack the process start, the "
              "snapshot, reading the mapping and removing the snapshot; by hand the same "
              "snapshot and its removal, and qemu-img reading the zeros of an unmapped thin LV "
              "(dm-thin makes them up without any disk I/O).", "",
              *full_table(empty, then("empty")), "",
              "## Incremental export, 1% of the volume changed", "",
              "| format | step | seconds | allocated MiB | apparent MiB | bytes read MiB | equal |",
              "|---|---|---:|---:|---:|---:|---|"]
    for fmt, steps in inc.items():
        for step in ("full", "incremental"):
            r = steps[step]
            lines.append(f"| {fmt} | {step} | {r['seconds']:.2f} | {r['allocated'] / MiB:.1f} | "
                         f"{r['apparent'] / MiB:.0f} | "
                         f"{r['summary']['bytes_read'] / MiB:.1f} | "
                         f"{'yes' if r['equal'] else '**NO**'} |")
    lines += ["", "| format | incremental / full: time | allocated | bytes read |",
              "|---|---:|---:|---:|"]
    for fmt, steps in inc.items():
        f, i = steps["full"], steps["incremental"]
        lines.append(f"| {fmt} | {i['seconds'] / f['seconds']:.1%} | "
                     f"{i['allocated'] / f['allocated']:.1%} | "
                     f"{i['summary']['bytes_read'] / f['summary']['bytes_read']:.1%} |")
    lines += ["", f"## The same data in a {SPARSE_VIRTUAL // GiB} GiB volume", "",
              "The volume grown (`thinstack resize`) after the runs above, so it maps the same "
              "data plus the 1% rewritten: thinstack's work stays the same, qemu-img's grows "
              "with the size.", "", *full_table(sparse, then("sparse"))]
    lines += ["", "## Environment", "", f"- kernel {platform.release()}, {os.cpu_count()} CPUs, "
              f"{sh('qemu-img', '--version').splitlines()[0]}",
              f"- {context['date']}, commit {context['commit']}", ""]
    return "\n".join(lines)


def main() -> int:
    os.environ.setdefault("THINSTACK_STATE_DIR", tempfile.mkdtemp(prefix="bench-state-"))
    os.environ.setdefault("THINSTACK_RUN_DIR", tempfile.mkdtemp(prefix="bench-run-"))
    sh("pvcreate", "-q", DISK)
    sh("vgcreate", "-q", VG, DISK)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", POOL_SIZE, "-Zy", "--chunksize",
       f"{CHUNK // KiB}k", "-n", "pool", "--addtag", "ts_pool", VG)
    sh(*THINSTACK, "create", f"{VG}/{NAME}", "--size", f"{VIRTUAL}b")
    sh("mkfs.ext4", "-q", OUT_DISK)
    out = Path(tempfile.mkdtemp(prefix="export-bench-", dir="/tmp"))
    sh("mount", OUT_DISK, str(out))
    try:
        rng = random.Random(SEED)
        mapped = fill(rng)
        context = {"virtual": VIRTUAL, "mapped": mapped,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "commit": commit()}
        full = full_exports(out, NAME)
        # The same volume with nothing mapped: what each way costs whatever the data.
        sh(*THINSTACK, "create", f"{VG}/empty", "--size", f"{VIRTUAL}b")
        empty = full_exports(out, "empty")
        inc = incremental(out, rng)
        # The same data in a volume 16 times the size: sparser, as thin volumes often are.
        sh(*THINSTACK, "resize", f"{VG}/{NAME}", f"{SPARSE_VIRTUAL}b")
        sparse = full_exports(out, NAME)
    finally:
        sh("umount", str(out))
    REPORTS.mkdir(parents=True, exist_ok=True)
    figures = {"context": context, "full": full, "empty": empty, "incremental": inc,
               "sparse": sparse}
    text = json.dumps(figures, indent=2) + "\n"
    if os.environ.get("BENCH_LABEL") == "before":
        (REPORTS / "export.before.json").write_text(text)
        return 0
    (REPORTS / "export.json").write_text(text)
    before_file = REPORTS / "export.before.json"
    before = json.loads(before_file.read_text()) if before_file.exists() else {}
    (REPORTS / "export.md").write_text(report(full, empty, inc, sparse, context, before))
    print((REPORTS / "export.md").read_text())
    equal = [r["equal"] for r in [*full.values(), *empty.values(), *sparse.values()]] + \
        [s["equal"] for steps in inc.values() for s in (steps["full"], steps["incremental"])]
    return 0 if all(equal) else 1


def rerender() -> int:
    """`export_bench.py --report`: the report again from export.json (and export.before.json)."""
    f = json.loads((REPORTS / "export.json").read_text())
    before_file = REPORTS / "export.before.json"
    before = json.loads(before_file.read_text()) if before_file.exists() else {}
    (REPORTS / "export.md").write_text(report(f["full"], f["empty"], f["incremental"],
                                              f["sparse"], f["context"], before))
    return 0


if __name__ == "__main__":
    sys.exit(rerender() if sys.argv[1:] == ["--report"] else main())
