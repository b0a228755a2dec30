"""The intent journal: every multi-step operation records what it is about to do before its first
change, marks each step as it completes, and removes the record at the end. An entry left behind
is an operation that was interrupted; `recover` reads it and completes or rolls back.

Each entry is one small JSON file, `VG.ID.json`, replaced atomically (write, fsync, rename, fsync
the folder), so a crash leaves either the old or the new version, never a torn one.

An entry that cannot be read all the same (a disk that lied about a flush, a hand edit, a field of
the wrong type) is never acted on, and never dropped in silence: `pending()` leaves it out and
says so on stderr, `damaged()` lists it, and recovery leaves alone the volumes tagged with its
operation's tag (the id is in the file's name) until the operator has looked.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from thinstack.state import state_dir
from thinstack.tags import OP_PREFIX


class StepKind(StrEnum):
    """What a journalled step did (or is about to do) to its target."""
    COMMITTED = "committed"  # the point of no return: a rollback stops here
    READONLY = "readonly"  # NAME made read-only (a clone's or gold master's origin)
    INACTIVE = "inactive"  # NAME deactivated (an external origin)
    DEVRO = "devro"  # the device PATH outside the VG made read-only for a clone
    CREATED = "created"  # import: NAME made
    COPIED = "copied"  # import: every byte before NUMBER is on the volume
    SUSPEND = "suspend"  # export: "DM_NAME DM_UUID" about to be suspended
    RESUMED = "resumed"  # export: DM_NAME resumed
    # pool create: each resource recorded before it is made, and its identity once it exists
    FILE = "file"
    FILE_ID = "file-id"
    LOOP = "loop"
    MD_MEMBER = "md-member"
    MD = "md"
    PV = "pv"
    VG = "vg"
    VG_UUID = "vg-uuid"
    REGISTRY = "registry"
    POOL = "pool"
    POOL_UUID = "pool-uuid"


@dataclass(frozen=True)
class Step:
    """One journalled step, `KIND:TARGET` (or `KIND`) in the entry's file."""
    kind: StepKind
    target: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else str(self.kind)

    @classmethod
    def parse(cls, text: str) -> Step:
        """The step a journal's string says; ValueError when it says none."""
        kind, _, target = text.partition(":")
        try:
            step = cls(StepKind(kind), target)
        except ValueError:
            raise ValueError(f"step {text!r}: unknown kind {kind!r}") from None
        if step.kind is StepKind.COPIED and not target.isdigit():
            raise ValueError(f"step {text!r} is not copied:NUMBER")
        return step


def parse_steps(steps: list[str]) -> list[Step]:
    return [Step.parse(s) for s in steps]


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
        return f"{OP_PREFIX}{self.id}"

    @property
    def committed(self) -> bool:
        return StepKind.COMMITTED in self.steps

    def parsed(self) -> list[Step]:
        """The steps (checked valid when the entry was read or written)."""
        return parse_steps(self.steps)


def last_target(steps: list[str], kind: StepKind) -> str | None:
    """The target of the last of `steps` of this kind, or None."""
    return next((s.target for s in reversed(parse_steps(steps)) if s.kind is kind), None)


@dataclass(frozen=True)
class Damaged:
    """A journal file that cannot be trusted: its operation's volumes are left as they are."""
    path: Path
    vg: str  # from the file's name; "" when even the name is not ours
    id: str
    reason: str

    @property
    def tag(self) -> str:
        return f"{OP_PREFIX}{self.id}" if self.id else ""

    def __str__(self) -> str:
        tagged = f"; volumes tagged {self.tag} are left as they are" if self.tag else ""
        return f"journal entry {self.path} cannot be used ({self.reason}){tagged}"

    def advice(self) -> str:
        """What the operator does about it: one line."""
        look = (f"look at the volumes tagged {self.tag} (`lvs -o+tags @{self.tag}`), remove them "
                f"or keep them (`lvchange --deltag {self.tag} VG/NAME`), then " if self.tag else "")
        return f"{self}: {look}delete {self.path}"


# The name thinstack gives entries: the VG (LVM's name rules), the id (hex).
_FILE_NAME = re.compile(r"(?P<vg>[A-Za-z0-9+_.][A-Za-z0-9+_.-]*)\.(?P<id>[0-9a-f]{1,64})\.json")

# Every field with the type a reader relies on; `int` never admits a bool.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "op": str, "vg": str, "args": dict, "steps": list, "started": (int, float),
    "pid": int}
# Arguments that code reads back from an entry, with their types, where they appear.
_ARGS: dict[str, type | tuple[type, ...]] = {
    "name": str, "origin": str, "size": (int, type(None)), "path": str, "source": dict,
    "dest": str, "partial": str, "file": str, "devices": list, "raid1": bool,
    "chunk": int, "mountpoint": str, "lock": str}
# Arguments an operation's recovery cannot do without.
_REQUIRED_ARGS = {"import": ("name", "size", "source"), "export": ("name", "partial"),
                  "mount": ("name", "mountpoint", "lock")}

_reported: set[Path] = set()  # damaged entries this process has already reported


def _typed(value: object, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):  # a bool is an int to isinstance; never to a reader
        return bool in kinds
    return isinstance(value, kinds)


def check(data: object, vg: str, id: str) -> str | None:
    """What is wrong with a loaded entry that should be `VG.ID.json`, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if set(data) != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - set(data)), sorted(set(data) - set(_FIELDS))
        return ", ".join([f"missing {k}" for k in missing] + [f"unknown field {k}" for k in extra])
    for key, kind in _FIELDS.items():
        if not _typed(data[key], kind):
            return f"{key}: {type(data[key]).__name__} where {_type_name(kind)} belongs"
    if (data["vg"], data["id"]) != (vg, id):
        return f"it names {data['vg']}.{data['id']}, not its file's {vg}.{id}"
    for key, value in data["args"].items():
        if key in _ARGS and not _typed(value, _ARGS[key]):
            return f"args.{key}: {type(value).__name__} where {_type_name(_ARGS[key])} belongs"
    for key in _REQUIRED_ARGS.get(data["op"], ()):
        if key not in data["args"]:
            return f"args.{key} is missing"
    for step in data["steps"]:
        if not isinstance(step, str):
            return f"steps: {type(step).__name__} where str belongs"
        try:
            Step.parse(step)
        except ValueError as e:
            return str(e)
    return None


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: a write may be short (a signal, a full disk that
    frees up), and a journal with half an entry is no journal."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sync_dir(folder: Path) -> None:
    """fsync a folder, so the names made, renamed or removed in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (0600) so that a crash leaves the old or the new content, never
    a torn one: written beside it, fsynced, renamed over it, and its folder fsynced."""
    make_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    sync_dir(path.parent)


def make_dir(folder: Path, mode: int = 0o700) -> None:
    """mkdir -p whose new folders survive a crash (each parent fsynced after its child)."""
    if folder.is_dir():
        return
    make_dir(folder.parent, mode)
    try:
        folder.mkdir(mode)
    except FileExistsError:
        return
    sync_dir(folder.parent)


class Journal:
    def __init__(self, root: Path | None = None):
        self.root = root or state_dir() / "journal"

    def begin(self, op: str, vg: str, **args) -> Entry:
        entry = Entry(id=os.urandom(6).hex(), op=op, vg=vg, args=args, started=time.time(),
                      pid=os.getpid())
        self._write(entry)
        return entry

    def step(self, entry: Entry, step: str | Step) -> None:
        entry.steps.append(str(Step.parse(str(step))))
        self._write(entry)

    def finish(self, entry: Entry) -> None:
        self._path(entry).unlink(missing_ok=True)
        sync_dir(self.root)

    def pending(self, vg: str | None = None) -> list[Entry]:
        """The readable entries (of `vg`), oldest first. A damaged one is reported on stderr,
        once per process, and left out: see damaged()."""
        entries, damaged = self._load(vg)
        for d in damaged:
            if d.path not in _reported:
                self.reported(d)
                print(f"thinstack: {d} (see `thinstack recover`)", file=sys.stderr, flush=True)
        return entries

    @staticmethod
    def reported(d: Damaged) -> None:
        """Note that the operator has been told about `d` (pending() stays quiet about it)."""
        _reported.add(d.path)

    def damaged(self, vg: str | None = None) -> list[Damaged]:
        """The entries (of `vg`, and those whose name names no VG) that cannot be used."""
        return self._load(vg)[1]

    def damaged_tags(self, vg: str) -> frozenset[str]:
        """The operation tags of damaged entries in `vg`: recovery keeps their volumes."""
        return frozenset(d.tag for d in self.damaged(vg) if d.tag)

    def _load(self, vg: str | None) -> tuple[list[Entry], list[Damaged]]:
        if not self.root.is_dir():
            return [], []
        entries, damaged = [], []
        for f in sorted(self.root.glob("*.json")):
            named = _FILE_NAME.fullmatch(f.name)
            file_vg, file_id = (named["vg"], named["id"]) if named else ("", "")
            if vg is not None and file_vg not in (vg, ""):
                continue
            try:
                data = json.loads(f.read_bytes())
                problem = check(data, file_vg, file_id) if named else \
                    "its name is not VG.ID.json"
            except OSError as e:
                problem = e.strerror or str(e)
            except ValueError as e:  # not JSON, not UTF-8: torn or overwritten
                problem = f"not valid JSON: {e}"
            if problem:
                damaged.append(Damaged(f, file_vg, file_id, problem))
            else:
                entries.append(Entry(**data))
        return sorted(entries, key=lambda e: e.started), damaged

    def _path(self, entry: Entry) -> Path:
        return self.root / f"{entry.vg}.{entry.id}.json"

    def _write(self, entry: Entry) -> None:
        write_atomically(self._path(entry), json.dumps(asdict(entry)).encode())
