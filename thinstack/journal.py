"""The intent journal: every multi-step operation records what it is about to do before its first
change, marks each step as it completes, and removes the record at the end. An entry left behind
is an operation that was interrupted; `recover` reads it and completes or rolls back.

Each entry is one small JSON file, replaced atomically (write, fsync, rename, fsync the folder),
so a crash leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from thinstack.state import state_dir


@dataclass
class Entry:
    id: str
    op: str
    vg: str
    args: dict
    steps: list[str] = field(default_factory=list)
    started: float = 0.0
    pid: int = 0

    @property
    def tag(self) -> str:
        """The LVM tag that marks volumes this operation made and has not yet committed."""
        return f"ts_op_{self.id}"

    def done(self, step: str) -> bool:
        return step in self.steps


class Journal:
    def __init__(self, root: Path | None = None):
        self.root = root or state_dir() / "journal"

    def begin(self, op: str, vg: str, **args) -> Entry:
        entry = Entry(id=uuid.uuid4().hex[:12], op=op, vg=vg, args=args, started=time.time(),
                      pid=os.getpid())
        self._write(entry)
        return entry

    def step(self, entry: Entry, step: str) -> None:
        entry.steps.append(step)
        self._write(entry)

    def finish(self, entry: Entry) -> None:
        self._path(entry).unlink(missing_ok=True)
        self._sync_dir()

    def pending(self, vg: str | None = None) -> list[Entry]:
        if not self.root.is_dir():
            return []
        entries = []
        for f in sorted(self.root.glob("*.json")):
            try:
                entry = Entry(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a stray file: not ours to interpret
            if vg is None or entry.vg == vg:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.started)

    def _path(self, entry: Entry) -> Path:
        return self.root / f"{entry.vg}.{entry.id}.json"

    def _write(self, entry: Entry) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(entry)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(asdict(entry)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
