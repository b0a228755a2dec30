"""The long run of the stateful model of the whole CLI (tests/lab/test_model.py, issue 13): the
same state machine as the CI test, for thousands of steps, and its figures for
docs/reliability.md in bench/reports/reliability/state-machine.json.

Run it through `bench/run --only model` from the project root, or by hand:

    thinstack lab run --disks 1 --disk-size 2G --mem 1G --timeout 7200 -- \\
        .venv/bin/python bench/model_bench.py --steps 2000 --minutes 60

It makes vg0 with a 512 MiB pool on the lab's scratch disk (as the lab tests' fixture does),
then runs the model in batches of EXAMPLES examples from successive hypothesis seeds until it
has run --steps steps or --minutes have passed. A failing batch is counted as an invariant
violation, its failing sequence of steps (as hypothesis prints it) kept in the report, and the
next batch starts from a fresh pool.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab.test_model import run_model  # noqa: E402
from tests.model import Stats  # noqa: E402

REPORT = ROOT / "bench" / "reports" / "reliability" / "state-machine.json"
VG, DISK = "vg0", "/dev/ubdb"
EXAMPLES = 2  # per batch: one hypothesis run, stopped by its first failure


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def failure(e: BaseException, seed: int) -> str:
    """The failure and the steps that led to it, as hypothesis printed them."""
    notes = "\n".join(getattr(e, "__notes__", []))
    frames = traceback.extract_tb(e.__traceback__)
    where = ([f for f in frames if "/tests/" in f.filename] or frames)[-1]  # the model's line
    return f"seed {seed}: {type(e).__name__} at {where.name}:{where.lineno}: {e}\n{notes}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="stop after this many steps")
    parser.add_argument("--minutes", type=float, default=60, help="or after this long")
    parser.add_argument("--per-example", type=int, default=25, help="steps of one example")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="model-bench-"))
    os.environ["THINSTACK_STATE_DIR"] = str(scratch / "state")
    os.environ["THINSTACK_RUN_DIR"] = str(scratch / "run")
    sh("pvcreate", "-q", DISK)
    sh("vgcreate", "-q", VG, DISK)
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "512M", "-Zy", "-n", "pool",
       "--addtag", "ts_pool", VG)

    stats, failures, batch = Stats(), [], 0
    started = time.monotonic()
    while stats.steps < args.steps and time.monotonic() - started < args.minutes * 60:
        seed = args.seed + batch
        batch += 1
        try:
            run_model(VG, scratch / "model", examples=EXAMPLES, steps=args.per_example,
                      seed_=seed, stats=stats)
        except Exception as e:  # a violation: record it, go on from a fresh pool
            failures.append(failure(e, seed))
            print(failures[-1], file=sys.stderr)
        print(f"batch {batch} (seed {seed}): {stats.steps} steps, {stats.examples} examples, "
              f"{stats.kills} kills, {len(failures)} violations, "
              f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({
        "row": "state-machine steps run / invariant violations",
        "measured": f"{stats.steps} / {len(failures)}",
        "produced_by": f"bench/model_bench.py (tests/lab/test_model.py's CLIModel, seeds "
                       f"{args.seed}-{args.seed + batch - 1}, {args.per_example} steps an "
                       f"example, in one lab boot)",
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "examples": stats.examples, "kills": stats.kills, "refusals": stats.refusals,
        "minutes": round((time.monotonic() - started) / 60, 1), "failures": failures,
    }, indent=2) + "\n")
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
