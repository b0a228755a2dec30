"""What lab tests share: running a command as root in the lab, and running thinstack's CLI as
an operator would (a separate process, its exit status and its one line of stderr)."""

from __future__ import annotations

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
