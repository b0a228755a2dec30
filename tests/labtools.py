"""What lab tests share: running a command as root in the lab, and running thinstack's CLI as
an operator would (a separate process, its exit status and its one line of stderr), and what a
thin pool must look like after any thinstack command."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ts(*args: str, env: dict | None = None, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "thinstack.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"thinstack {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def lvs(vg: str) -> dict[str, dict]:
    out = json.loads(sh("lvs", "--reportformat", "json", "-a", "-o",
                        "lv_name,lv_attr,origin,lv_tags,thin_id,lv_skip_activation", vg))
    return {r["lv_name"]: r for r in out["report"][0]["lv"]}


def assert_pool_consistent(vg: str) -> None:
    """thin_check is clean, and the pool's thin devices are exactly those LVM knows."""
    tpool = f"{vg}-pool-tpool"
    sh("dmsetup", "message", tpool, "0", "reserve_metadata_snap")
    try:
        sh("thin_check", "-m", f"/dev/mapper/{vg}-pool_tmeta")
        devs = {int(line.split()[0]) for line in
                sh("thin_ls", "-m", "--no-headers", "-o", "DEV",
                   f"/dev/mapper/{vg}-pool_tmeta").splitlines() if line.strip()}
    finally:
        sh("dmsetup", "message", tpool, "0", "release_metadata_snap")
    known = {int(r["thin_id"]) for r in lvs(vg).values() if r["thin_id"]}
    assert devs == known, f"pool has thin ids {devs}, LVM knows {known}"
    leftovers = [n for n, r in lvs(vg).items() if "ts_op_" in r["lv_tags"]]
    assert not leftovers, f"unfinished volumes left: {leftovers}"
