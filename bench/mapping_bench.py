"""Reading a fragmented volume's thin mapping: thin_dump's whole output parsed as one XML tree
(`tests/thindump.py`'s parse_thin_dump, what exports used before) against the streamed reader
exports use now (`tools.thin_ranges`: expat over thin_dump's output as it comes, runs merged on
the fly).

No kernel needed: thin_dump's output is synthesised in the shape a fragmented volume gives (every
mapping a `single_mapping`, data blocks interleaved with other volumes', virtual blocks in runs
of two) and fed through `cat`, so both readers pay the same pipe. Each method runs in its own
process; the clock covers reading and parsing, and the memory figure is that process's peak RSS.

    .venv/bin/python bench/mapping_bench.py [MAPPINGS...]   (default: 250000 1000000 2000000)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPORTS = Path(__file__).parent / "reports"

METHODS = {
    "whole tree (parse_thin_dump)": (
        "from tests import thindump; from thinstack.dm.command import RUNNER;"
        "d = thindump.parse_thin_dump(RUNNER.run(['cat', PATH]));"
        "n = len(d.devices[1].virtual_ranges())"),
    "streamed (thin_ranges)": (
        "from thinstack.dm import tools; from thinstack.dm.command import RUNNER;"
        "r = tools.parse_thin_ranges(RUNNER.stream(['cat', PATH]), 1); n = len(r.ranges)"),
}

MEASURE = """
import resource, sys, time
PATH = sys.argv[1]
started = time.monotonic()
{code}
seconds = time.monotonic() - started
print(n, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def synthesise(path: Path, mappings: int) -> None:
    with open(path, "w") as f:
        f.write('<superblock uuid="" time="1" transaction="2" data_block_size="128" '
                f'nr_data_blocks="{4 * mappings}">\n<device dev_id="1" mapped_blocks="{mappings}" '
                'transaction="0" creation_time="0" snap_time="0">\n')
        for i in range(mappings):
            f.write(f'  <single_mapping origin_block="{i + i // 2}" data_block="{2 * i}" '
                    'time="0"/>\n')
        f.write("</device>\n</superblock>\n")


def measure(code: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(code=code), str(path)],
                         check=True, capture_output=True, text=True).stdout.split()
    return {"ranges": int(out[0]), "seconds": round(float(out[1]), 2),
            "peak_rss_mib": round(int(out[2]) / 1024)}


def main(sizes: list[int]) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"dump-{n}.xml"
            synthesise(path, n)
            results = {name: measure(code, path) for name, code in METHODS.items()}
            counts = {r["ranges"] for r in results.values()}
            assert len(counts) == 1, f"the readers disagree: {results}"
            rows.append({"mappings": n, "xml_mib": round(path.stat().st_size / 2**20),
                         "results": results})
            print(json.dumps(rows[-1]), flush=True)
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "mapping.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Reading a fragmented thin mapping", "",
             "Written by `bench/mapping_bench.py` (see its docstring for the method). Both readers "
             "find the same ranges; time and peak memory of the reading process.", "",
             "| mappings | thin_dump output | method | time | peak RSS | time ratio "
             "| memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        whole, streamed = row["results"].values()
        for name, r in row["results"].items():
            ratio = "" if r is whole else \
                f"{whole['seconds'] / r['seconds']:.1f}x faster"
            mem = "" if r is whole else \
                f"{whole['peak_rss_mib'] / r['peak_rss_mib']:.1f}x less"
            lines.append(f"| {row['mappings']:,} | {row['xml_mib']} MiB | {name} | "
                         f"{r['seconds']} s | {r['peak_rss_mib']} MiB | {ratio} | {mem} |")
    (REPORTS / "mapping.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    # Arguments meant for other benchmarks (bench/run passes its ARGS to each) are not counts.
    main([int(a) for a in sys.argv[1:] if a.isdigit()] or [250_000, 1_000_000, 2_000_000])
