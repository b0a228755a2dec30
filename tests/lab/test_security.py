"""The hostile-image corpus through the command an operator runs: `thinstack import` of every
kind into a real pool exits 8 with one line on stderr and no traceback, leaves no volume and no
unfinished operation behind, never opens a file outside the image's folder, and the pool is
consistent afterwards. One boot for the whole corpus: most kinds run `thinstack.cli.main` in a
forked child (so a hang or an allocation past the limit is caught, as in the unit test), and a
sample runs as a real `python -m thinstack.cli` process."""

from __future__ import annotations

import io
import json
import sys
import time
import traceback

import pytest

from tests import hostile, tripwire
from tests.labtools import assert_pool_consistent, lvs, ts

SAMPLE = 15  # kinds also run as a separate process, spread over the families


def _cli(args: list[str]) -> dict:
    """thinstack's CLI in this (forked) process: its exit status and what it wrote to stderr."""
    from thinstack import cli

    err = io.StringIO()
    sys.stderr = err
    try:
        status = cli.main(args)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - what the operator would see: a traceback
        err.write(traceback.format_exc())
        status = 1
    return {"status": "ran", "exit": status, "stderr": err.getvalue()}


def _problems(name: str, case: hostile.Case, exit_status, stderr: str) -> list[str]:
    problems = []
    if exit_status != 8:
        problems.append(f"exit status {exit_status}")
    if stderr.count("\n") != 1 or not stderr.endswith("\n"):
        problems.append(f"{stderr.count(chr(10))} lines on stderr")
    if "Traceback" in stderr:
        problems.append("a traceback")
    if not problems:
        return []
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "(nothing)"
    return [f"{name} ({case.description}): {', '.join(problems)}: {last}"]


@pytest.mark.lab(disks=1, disk_size="1G", timeout=1200)
def test_hostile_images_are_refused_by_import(vg, tmp_path):
    started = time.monotonic()
    names = list(hostile.KINDS)
    cases = {name: hostile.build(tmp_path / "corpus", name) for name in names}
    sample = set(names[::max(1, len(names) // SAMPLE)])
    (tmp_path / "backup").mkdir()
    backup = hostile.raw_backup_holding_qcow2(tmp_path / "backup", tmp_path / "backup.out")
    before = set(lvs(vg))
    failures: list[str] = []
    outsides = [outside for _, outside in cases.values()] + [tmp_path / "backup.out"]
    with tripwire.watch(outsides) as wire:
        for n, name in enumerate(names):
            case, _ = cases[name]
            args = ["import", "--format", case.format, str(case.path), f"{vg}/hostile{n}"]
            if name in sample:
                done = ts(*args, check=False, timeout=60)
                failures += _problems(name, case, done.returncode, done.stderr)
            else:
                result = hostile.bounded(lambda args=args: _cli(args), timeout=60)
                if result["status"] != "ran":
                    failures.append(f"{name}: {result['status']}: {result.get('message')}")
                else:
                    failures += _problems(name, case, result["exit"], result["stderr"])
        # The positive side of finding 3: the same bytes, as a raw backup, restore as they are.
        ts("import", "--format", "raw", str(backup), f"{vg}/restored")
    with open(f"/dev/{vg}/restored", "rb") as f:
        assert f.read(backup.stat().st_size) == backup.read_bytes()
    ts("delete", f"{vg}/restored")
    after = lvs(vg)
    assert set(after) == before, f"volumes left: {sorted(set(after) - before)}"
    assert not [v for v, r in after.items() if "ts_op_" in r["lv_tags"]]
    assert json.loads(ts("list", "--json", vg).stdout) == []
    opened = sorted({str(p) for p in wire.opened})
    assert not opened, f"files outside the image folders were opened: {opened}"
    assert_pool_consistent(vg)
    print(f"{len(names)} kinds in {time.monotonic() - started:.1f} s")
    assert not failures, f"{len(failures)} kinds not refused as they must be:\n" + \
        "\n".join(failures)
