"""Command benchmark: each thinstack volume command against the one LVM command it wraps, in the
lab, same run, same pool, at several pool sizes (issue 10: the fixed cost of every command).

Run it through `bench/run` from the project root, or by hand:

    thinstack lab run --disks 1 --disk-size 8G --mem 1536M -- \\
        .venv/bin/python bench/ops_bench.py --scales 10,100,1000 --label after

For each scale N it fills the pool to N thin volumes (inactive, through `lvm` shells: untimed),
then times, ROUNDS times each and keeps the best (the first run of each compiles its modules:
Python keeps them compiled in a folder of the run's own, as an installed thinstack has them):

  create    `thinstack create vg/X --size 64M`    vs `lvm lvcreate -q -y --type thin
            --thinpool pool -V 64m -n Y vg`
  snapshot  `thinstack snapshot vg/X S`           vs `lvm lvcreate -q -y -s vg/Y -n S -kn`
  gold      `thinstack gold vg/X`                 vs `lvm lvchange -q -pr vg/Y`
  clone     `thinstack clone vg/G vg/C`           vs `lvm lvcreate -q -y -s vg/G' -n C -kn`
  delete    `thinstack delete vg/C`               vs `lvm lvremove -q -y vg/C'`
  list, info VG/X, pool status                    vs `lvm lvs vg`
  monitor   `thinstack monitor --once`            vs `lvm lvs vg`  (its poll: O(pools)?)

Every thinstack run has THINSTACK_TRACE=1: the commands it ran and their time are the per-phase
breakdown (the rest is Python: start-up, imports, its own work). Each command runs as a user
would run it: a new process, timed from fork to exit. `--label` names the code measured
(before/after a change): reports/ops.json keeps one entry per label, and reports/ops.md shows
them all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "reports"
THINSTACK = [str(ROOT / ".venv" / "bin" / "thinstack")]
VG, DISK = "bench", "/dev/ubdb"
ROUNDS = 3
OPS = ["create", "snapshot", "gold", "clone", "delete", "list", "info", "pool status", "monitor"]
GOAL = {"create": 1.2, "snapshot": 1.2, "gold": 1.2, "clone": 1.2, "delete": 1.2,
        "list": 2.0, "info": 2.0, "pool status": 2.0}
_TRACE = re.compile(r"^thinstack: +([0-9.]+)s (\S+) ?(\S*)")


# Python's compiled modules, as an installed thinstack has them (this environment may forbid
# writing them beside the sources: PYTHONDONTWRITEBYTECODE).
PYCACHE = tempfile.mkdtemp(prefix="ops-bench-pycache-")
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "PYTHONPYCACHEPREFIX": PYCACHE}


def run(argv: list[str], trace: bool = False) -> tuple[float, str, int]:
    """Run argv; its wall time, its stderr (the trace), and the pages it and the processes it
    waited for touched (minor faults). In the lab a process pays about the same for each page
    it touches: pages are what its start-up costs, and they do not vary from run to run."""
    env = {**ENV, "THINSTACK_TRACE": "1" if trace else "0"}
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    took = time.monotonic() - start
    pages = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return took, done.stderr, pages


def phases(trace: str) -> list[tuple[str, float]]:
    """The commands a traced run ran, with their times: ('lvm lvs', 0.21), ..."""
    out = []
    for line in trace.splitlines():
        m = _TRACE.match(line)
        if m:
            prog = os.path.basename(m.group(2))
            out.append((f"{prog} {m.group(3)}" if prog == "lvm" else prog, float(m.group(1))))
    return out


def lvm_shell(lines: list[str]) -> None:
    """Many lvm commands in one lvm process (the fill is not what is measured)."""
    subprocess.run(["lvm"], input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True)


def fill(target: int, have: int) -> int:
    """Thin volumes fill<N> until the pool holds `target` volumes of thinstack's own kind."""
    # Inactive: a third of the time to make in the lab, and LVM's metadata, which every
    # command reads, is the same as for active ones.
    lines = [f"lvcreate -q -y --type thin --thinpool pool -V 16m -n fill{i:05} -an "
             f"--setactivationskip n {VG}" for i in range(have, target)]
    for i in range(0, len(lines), 100):
        lvm_shell(lines[i:i + 100])
    return max(have, target)


def measure(scale: int) -> dict:
    """Best of ROUNDS for every operation, thinstack and by hand, at this scale."""
    ts = [*THINSTACK]
    results: dict[str, dict] = {}

    def pair(op: str, mine: list[str], theirs: list[str]) -> None:
        t_mine, trace, p_mine = run(mine, trace=True)
        t_theirs, _, p_theirs = run(theirs)
        r = results.setdefault(op, {"thinstack": [], "by_hand": [], "phases": None,
                                    "command": " ".join(mine[len(ts):]),
                                    "by_hand_command": " ".join(theirs),
                                    "pages": [], "pages_by_hand": []})
        r["thinstack"].append(t_mine)
        r["by_hand"].append(t_theirs)
        r["pages"].append(p_mine)
        r["pages_by_hand"].append(p_theirs)
        if r["phases"] is None or t_mine <= min(r["thinstack"]):
            r["phases"] = phases(trace)

    lvs = ["lvm", "lvs", VG]
    for k in range(ROUNDS):
        t, h = f"t{scale}r{k}", f"h{scale}r{k}"
        pair("create", [*ts, "create", f"{VG}/{t}", "--size", "64M"],
             ["lvm", "lvcreate", "-q", "-y", "--type", "thin", "--thinpool", "pool", "-V", "64m",
              "-n", h, VG])
        pair("snapshot", [*ts, "snapshot", f"{VG}/{t}", f"{t}s"],
             ["lvm", "lvcreate", "-q", "-y", "-s", f"{VG}/{h}", "-n", f"{h}s", "-kn"])
        pair("gold", [*ts, "gold", f"{VG}/{t}"], ["lvm", "lvchange", "-q", "-pr", f"{VG}/{h}"])
        pair("clone", [*ts, "clone", f"{VG}/{t}", f"{VG}/{t}c"],
             ["lvm", "lvcreate", "-q", "-y", "-s", f"{VG}/{h}", "-n", f"{h}c", "-kn"])
        pair("delete", [*ts, "delete", f"{VG}/{t}c"], ["lvm", "lvremove", "-q", "-y",
                                                       f"{VG}/{h}c"])
        pair("list", [*ts, "list", VG], lvs)
        pair("info", [*ts, "info", f"{VG}/{t}"], lvs)
        pair("pool status", [*ts, "pool", "status", VG], lvs)
        pair("monitor", [*ts, "monitor", "--once"], lvs)
    for op, r in results.items():
        r["best"], r["best_by_hand"] = min(r["thinstack"]), min(r["by_hand"])
        r["ratio"] = r["best"] / r["best_by_hand"]
        r["commands"] = len(r["phases"])
        r["command_seconds"] = sum(t for _, t in r["phases"])
        print(f"{scale:5} {op:12} {r['best']:6.2f} s vs {r['best_by_hand']:6.2f} s "
              f"{r['ratio']:5.2f}x  {r['commands']} commands", file=sys.stderr, flush=True)
    return results


def startup() -> dict:
    """Python's import cost: `thinstack --help` and `thinstack list` (inside the lab, as root:
    the list reaches the kernel), and whether blivet or pyudev were imported."""
    out: dict = {}
    for name, args in (("--help", ["--help"]), ("list", ["list", VG])):
        env = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
        done = subprocess.run([*THINSTACK, *args], capture_output=True, text=True, env=env)
        rows = [line.split("|") for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
        modules = {r[2].strip() for r in rows if len(r) == 3}
        total = sum(int(r[0].split(":")[1]) for r in rows if r[0].split(":")[1].strip().isdigit())
        wall, _, pages = run([*THINSTACK, *args])
        out[name] = {"import_seconds": total / 1e6, "wall": wall, "modules": len(modules),
                     "pages": pages,
                     "blivet": any(m.startswith("blivet") for m in modules),
                     "pyudev": any(m.startswith("pyudev") for m in modules),
                     "sh": "sh" in modules}
    # The floor under every command: the interpreter with its site, importing nothing of ours;
    # and what a process costs a page, from the smallest one to the interpreter.
    for name, argv in (("python", [sys.executable, "-c", "pass"]),
                       ("python -S", [sys.executable, "-S", "-c", "pass"]),
                       ("true", ["/bin/true"]), ("lvs", ["lvm", "lvs", VG])):
        runs = [run(argv) for _ in range(ROUNDS)]
        out[name] = {"wall": min(r[0] for r in runs), "pages": min(r[2] for r in runs)}
    return out


def report(runs: dict) -> str:
    lines = ["# Commands against the LVM command they wrap", "",
             "Produced by `bench/ops_bench.py` (run by `bench/run`); its docstring lists each "
             "command pair.", "Best of "
             f"{ROUNDS} runs each, same lab run; ratio = thinstack / by hand. Goals (issue 10): "
             "create, snapshot, gold, clone, delete <= 1.2x; list, info, pool status <= 2x a bare "
             "`lvs`; the same at every scale. `monitor` is `monitor --once` (one poll) against "
             "`lvs`: it must not grow with the volumes.", ""]
    for label, entry in runs.items():
        lines += [f"## {label}: {entry['commit']}", "",
                  f"{entry['kernel']}, {entry['cpus']} CPU, {entry['date']}"
                  + (f"; {entry['note']}" if entry.get("note") else ""), ""]
        scales = sorted(entry["scales"], key=int)
        lines += ["| operation | " + " | ".join(f"{s} volumes: thinstack / by hand (ratio)"
                                                for s in scales) + " | goal |",
                  "|---|" + "---|" * len(scales) + "---|"]
        for op in OPS:
            cells = []
            for s in scales:
                r = entry["scales"][s].get(op)
                cells.append("-" if r is None else
                             f"{r['best']:.2f} / {r['best_by_hand']:.2f} s "
                             f"(**{r['ratio']:.1f}x**)")
            lines.append(f"| {op} | " + " | ".join(cells) + f" | {GOAL.get(op, '-')}"
                         f"{'x' if op in GOAL else ''} |")
        lines += ["", "Per-phase breakdown (largest scale): commands run, their time, the rest "
                  "(Python: start-up, imports, its own work), and the pages the command and "
                  "its children touched (best run), thinstack / by hand.", "",
                  "| operation | commands | in commands | rest | pages | what ran |",
                  "|---|---|---|---|---|---|"]
        top = entry["scales"][scales[-1]]
        for op in OPS:
            r = top.get(op)
            if r is None:
                continue
            ran = ", ".join(f"{c} {t:.2f}" for c, t in r["phases"]) or "-"
            pages = (f"{min(r['pages'])} / {min(r['pages_by_hand'])}" if r.get("pages")
                     else "-")
            lines.append(f"| {op} | {r['commands']} | {r['command_seconds']:.2f} s | "
                         f"{r['best'] - r['command_seconds']:.2f} s | {pages} | {ran} |")
        st = entry.get("startup", {})
        if st:
            lines += ["", "Start-up (`python -X importtime`):", ""]
            for name, s in st.items():
                pages = f", {s['pages']} pages" if "pages" in s else ""
                if name in ("python", "python -S", "true", "lvs"):
                    what = {"python": "`python -c pass` (the interpreter alone: under every "
                                      "command, by hand none)",
                            "python -S": "`python -S -c pass` (without site)",
                            "true": "`/bin/true`", "lvs": "`lvm lvs`"}[name]
                    lines.append(f"- {what}: {s['wall']:.2f} s{pages}")
                    continue
                lines.append(f"- `thinstack {name}`: {s['wall']:.2f} s{pages}, imports "
                             f"{s['import_seconds']:.2f} s ({s['modules']} modules); blivet "
                             f"{'imported' if s['blivet'] else 'not imported'}, pyudev "
                             f"{'imported' if s['pyudev'] else 'not imported'}, sh "
                             f"{'imported' if s['sh'] else 'not imported'}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="10,100", help="pool sizes in volumes, e.g. 10,100,1000")
    p.add_argument("--label", default="after", help="which code this measures (before, after)")
    p.add_argument("--commit", default="", help="the commit measured (default: git HEAD)")
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    commit = args.commit or subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
        text=True).stdout.strip()[:80]
    subprocess.run([*THINSTACK, "pool", "create", VG, DISK], check=True, capture_output=True)
    entry: dict = {"commit": commit, "kernel": platform.release(), "cpus": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d %H:%M"), "scales": {}}
    startup()  # compiles what they import
    entry["startup"] = startup()
    have = 0
    for scale in scales:  # the report is written after each scale: the largest may take hours
        have = fill(scale, have)
        entry["scales"][str(scale)] = measure(scale)
        have += 4 * ROUNDS  # the volumes measure() left (t, ts, h, hs per round)
        save(args.label, entry)
    return 0


def save(label: str, entry: dict) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / "ops.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[label] = entry
    path.write_text(json.dumps(runs, indent=2) + "\n")
    (REPORTS / "ops.md").write_text(report(runs))
    print(f"wrote {REPORTS / 'ops.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
