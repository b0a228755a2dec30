"""Named fault points: `THINSTACK_FAULT=clone:after-snapshot` kills the process (SIGKILL, no
cleanup, as a power cut would) when the clone operation reaches that point. Several points may be
given separated by commas. Every point is declared here, so tests can enumerate them all."""

from __future__ import annotations

import os
import signal

POINTS: dict[str, tuple[str, ...]] = {
    "create": ("after-intent", "after-lvcreate"),
    "snapshot": ("after-intent", "after-lvcreate"),
    "clone": ("after-intent", "after-origin-readonly", "after-snapshot"),
    "gold": ("after-intent", "after-readonly"),
    "resize": ("after-intent",),
    "delete": ("after-intent",),
    "cow": ("after-intent", "after-lvcreate"),
    "pool-create": ("after-intent", "after-vg", "after-pool"),
    "pool-repair": ("after-intent", "after-deactivate", "after-repair"),
    "import": ("after-intent", "after-lvcreate", "mid-copy", "after-copy", "after-rename"),
    # after-suspend: only an export of a clone of a device outside the VG suspends it.
    "export": ("after-intent", "after-suspend", "after-snapshot", "mid-copy", "after-write"),
    "live-import": ("after-intent", "after-lvcreate", "after-nbd", "after-clone",
                    "after-discard", "after-hydration"),
    "live-finish": ("after-reload",),
    "mount": ("after-intent", "after-snapshot"),  # a mounted file's first open
    # mid-batch: the volume suspended, its private twin up, the batch's discards done.
    "reclaim": ("after-intent", "after-device", "mid-batch"),
}


def point(op: str, name: str) -> None:
    assert name in POINTS.get(op, ()), f"undeclared fault point {op}:{name}"
    wanted = os.environ.get("THINSTACK_FAULT", "")
    if f"{op}:{name}" in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
