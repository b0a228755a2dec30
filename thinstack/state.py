"""Where thinstack keeps what must survive the process: the journal (across reboots, so under
/var/lib) and the locks (per boot, so under /run). Both movable by environment for tests."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("THINSTACK_STATE_DIR", "/var/lib/thinstack"))


def run_dir() -> Path:
    return Path(os.environ.get("THINSTACK_RUN_DIR", "/run/thinstack"))
