"""A model of what thinstack's volume commands must do, for the stateful test of the whole CLI
(tests/lab/test_model.py): the volumes that must exist, what `thinstack list --json` must say of
each, and each volume's bytes as a pattern oracle (tests/patterns.py). Pure: plain data in, plain
data out; unit-tested on the host (tests/unit/test_model.py).

A volume's content is the map {offset: seed} of the BLOCK-sized pattern blocks written to it
(directly, through its origin before it was snapshotted, or from an imported image); every other
byte reads as zero. Each command is a function of the volumes before it: the exit status it must
end with, a word its one line of stderr must hold when it refuses, and the volumes after it (the
same ones when it is refused: a refusal changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from thinstack import errors

BLOCK = 64 << 10
MiB = 1 << 20
EPERM = -1  # a write the kernel refuses (a read-only device), not an exit status


@dataclass(frozen=True)
class Vol:
    size: int
    origin: str | None = None  # the volume it was snapshotted or cloned from
    gold: bool = False
    blocks: tuple[tuple[int, str], ...] = ()  # (offset, seed) of each pattern block, sorted

    def seed_at(self, offset: int) -> str | None:
        """The seed of the pattern block at `offset`, None where the volume reads zeros."""
        return dict(self.blocks).get(offset)


Vols = dict[str, Vol]


@dataclass(frozen=True)
class Outcome:
    status: int  # the exit status the command must end with (EPERM for a refused write)
    after: Vols  # the volumes once it has run
    says: str = ""  # a word its stderr must hold, when it fails


def _refused(vols: Vols, error: type[errors.ThinstackError], says: str) -> Outcome:
    return Outcome(error.exit_status, vols, says)


def _with(vols: Vols, name: str, vol: Vol | None) -> Vols:
    out = {k: v for k, v in vols.items() if k != name}
    if vol is not None:
        out[name] = vol
    return out


def _blocks(content: dict[int, str]) -> tuple[tuple[int, str], ...]:
    return tuple(sorted(content.items()))


def create(vols: Vols, name: str, size: int) -> Outcome:
    if name in vols:
        return _refused(vols, errors.Exists, "already exists")
    return Outcome(0, _with(vols, name, Vol(size)))


def snapshot(vols: Vols, origin: str, name: str) -> Outcome:
    if origin not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    if name in vols:
        return _refused(vols, errors.Exists, "already exists")
    src = vols[origin]
    return Outcome(0, _with(vols, name, Vol(src.size, origin, blocks=src.blocks)))


def clone(vols: Vols, origin: str, name: str) -> Outcome:
    if origin not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    if name in vols:
        return _refused(vols, errors.Exists, "already exists")
    if not vols[origin].gold:
        return _refused(vols, errors.Refused, "not a gold master")
    return snapshot(vols, origin, name)


def gold(vols: Vols, name: str) -> Outcome:
    if name not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    return Outcome(0, _with(vols, name, replace(vols[name], gold=True)))


def resize(vols: Vols, name: str, size: int, yes: bool) -> Outcome:
    if name not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    vol = vols[name]
    if vol.gold:
        return _refused(vols, errors.Refused, "gold master")
    if size < vol.size and not yes:
        return _refused(vols, errors.Refused, "--yes")
    # The tail a shrink cuts off is gone: grown again, it reads zeros.
    kept = tuple((off, seed) for off, seed in vol.blocks if off + BLOCK <= size)
    return Outcome(0, _with(vols, name, replace(vol, size=size, blocks=kept)))


def dependants(vols: Vols, name: str) -> list[str]:
    return sorted(n for n, v in vols.items() if v.origin == name)


def delete(vols: Vols, name: str) -> Outcome:
    if name not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    if dependants(vols, name):
        return _refused(vols, errors.Refused, "dependants")
    return Outcome(0, _with(vols, name, None))


def write(vols: Vols, name: str, offsets: list[int], seed: str) -> Outcome:
    """Pattern blocks written straight to the device (not a thinstack command)."""
    vol = vols[name]
    if vol.gold:
        return Outcome(EPERM, vols)  # read-only in the kernel
    content = dict(vol.blocks) | {off: seed for off in offsets}
    return Outcome(0, _with(vols, name, replace(vol, blocks=_blocks(content))))


def import_(vols: Vols, name: str, size: int, blocks: dict[int, str]) -> Outcome:
    if name in vols:
        return _refused(vols, errors.Exists, "already exists")
    return Outcome(0, _with(vols, name, Vol(size, blocks=_blocks(blocks))))


def export(vols: Vols, name: str) -> Outcome:
    if name not in vols:
        return _refused(vols, errors.NotFound, "no such volume")
    return Outcome(0, vols)


# --- what the CLI must show -------------------------------------------------------------------

def kind(vols: Vols, name: str) -> str:
    """What `thinstack list` must call the volume (volumes._kind, for the volumes modelled)."""
    vol = vols[name]
    if vol.gold:
        return "gold"
    if vol.origin is None:
        return "thin"
    return "clone" if vols[vol.origin].gold else "snapshot"


def row(vols: Vols, name: str) -> dict:
    """The fields of the volume's `thinstack list --json` entry the model decides."""
    vol = vols[name]
    return dict(size=vol.size, kind=kind(vols, name), origin=vol.origin, gold=vol.gold,
                readonly=vol.gold, dependants=dependants(vols, name))


def mismatches(vols: Vols, listing: list[dict]) -> list[str]:
    """How `thinstack list --json` (one VG's) differs from the model; empty when it agrees."""
    seen = {v["name"]: v for v in listing}
    out = [f"{n}: missing" for n in sorted(vols.keys() - seen.keys())]
    out += [f"{n}: should not exist" for n in sorted(seen.keys() - vols.keys())]
    for name in sorted(vols.keys() & seen.keys()):
        want = row(vols, name)
        got = {k: sorted(seen[name][k]) if k == "dependants" else seen[name][k] for k in want}
        out += [f"{name}: {k} is {got[k]!r}, should be {want[k]!r}" for k in want
                if got[k] != want[k]]
    return out


def resolve(candidates: list[Vols], listing: list[dict]) -> Vols | None:
    """After an interrupted command and its recovery, the one state it may have left (each
    candidate: the command done wholly or not at all) that the listing shows; None if none."""
    return next((c for c in candidates if not mismatches(c, listing)), None)


def probes(vol: Vol, written: set[int]) -> list[int]:
    """The offsets worth reading on `vol`: every block offset written to any volume (so a write
    that leaked from another volume, or a tail that came back after a shrink, shows), within the
    volume's size."""
    return sorted(off for off in written if off + BLOCK <= vol.size)


@dataclass
class Stats:
    """What a run of the model did, for the report."""
    steps: int = 0
    examples: int = 0
    kills: int = 0
    refusals: int = 0
    violations: list[str] = field(default_factory=list)
