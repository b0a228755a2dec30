"""`dmsetup status` parsed once into types, per target type (formats from the kernel's
Documentation/admin-guide/device-mapper/{thin-provisioning,snapshot,dm-clone}.rst and what the
kernel prints)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from thinstack.dm.errors import ParseError


@dataclass(frozen=True)
class Failed:
    """The bare `Fail` status of a thin-pool, thin or clone: the target stopped all I/O and
    its metadata needs the offline recovery tools."""


class PoolMode(Enum):
    RW = "rw"
    RO = "ro"
    OUT_OF_DATA_SPACE = "out_of_data_space"


class Discards(Enum):
    PASSDOWN = "discard_passdown"
    NO_PASSDOWN = "no_discard_passdown"
    IGNORED = "ignore_discard"


@dataclass(frozen=True)
class ThinPoolStatus:
    """Blocks are data blocks of the pool's block size; metadata blocks are 4 KiB."""

    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    held_metadata_root: int | None
    mode: PoolMode
    discards: Discards
    error_if_no_space: bool
    needs_check: bool
    metadata_low_watermark: int | None  # None on kernels older than 4.19, which omit it

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks

    @property
    def free_metadata_blocks(self) -> int:
        return self.total_metadata_blocks - self.used_metadata_blocks


@dataclass(frozen=True)
class ThinStatus:
    mapped_sectors: int
    highest_mapped_sector: int | None  # None when nothing is mapped


@dataclass(frozen=True)
class SnapshotStatus:
    """sectors_allocated counts data and metadata; a merge is done when it equals
    metadata_sectors."""

    sectors_allocated: int
    total_sectors: int
    metadata_sectors: int


class SnapshotState(Enum):
    INVALID = "Invalid"
    OVERFLOW = "Overflow"
    MERGE_FAILED = "Merge failed"


@dataclass(frozen=True)
class SnapshotUnusable:
    """The snapshot no longer works: it filled up (Invalid, or Overflow when the table asked
    for "PO"), or merging it into its origin failed."""

    state: SnapshotState


@dataclass(frozen=True)
class CloneStatus:
    metadata_block_size: int  # sectors
    used_metadata_blocks: int
    total_metadata_blocks: int
    region_size: int  # sectors
    hydrated_regions: int
    total_regions: int
    hydrating_regions: int
    no_hydration: bool
    no_discard_passdown: bool
    hydration_threshold: int | None
    hydration_batch_size: int | None
    read_only: bool

    @property
    def hydrated(self) -> bool:
        return self.hydrated_regions == self.total_regions


@dataclass(frozen=True)
class OtherStatus:
    """A target whose status thinstack does not interpret (linear, zero, error, flakey, ... print
    nothing), kept verbatim."""

    params: tuple[str, ...]


TargetStatus = (ThinPoolStatus | ThinStatus | SnapshotStatus | SnapshotUnusable | CloneStatus
                | Failed | OtherStatus)


@dataclass(frozen=True)
class StatusLine:
    start: int
    length: int
    target_type: str
    status: TargetStatus


def parse_status(target_type: str, params: str) -> TargetStatus:
    """The status a target of `target_type` reports as `params` (the text after its type)."""
    parser = _PARSERS.get(target_type)
    if parser is None:
        return OtherStatus(tuple(params.split()))
    try:
        return parser(params.strip())
    except (ValueError, IndexError):
        raise ParseError(f"{target_type} status {params.strip()!r} is not in the documented "
                         "form") from None


def parse_status_lines(text: str) -> list[StatusLine]:
    """Every line of `dmsetup status NAME`."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        words = line.split(maxsplit=3)
        if len(words) < 3 or not (words[0].isdigit() and words[1].isdigit()):
            raise ParseError(f"not a status line: {line!r}")
        params = words[3] if len(words) > 3 else ""
        lines.append(StatusLine(int(words[0]), int(words[1]), words[2],
                                parse_status(words[2], params)))
    return lines


def _fraction(word: str) -> tuple[int, int]:
    used, total = word.split("/")
    return int(used), int(total)


def _thin_pool(params: str) -> ThinPoolStatus | Failed:
    if params == "Fail":
        return Failed()
    w = params.split()
    if len(w) not in (8, 9):
        raise ValueError("wrong number of fields")
    used_meta, total_meta = _fraction(w[1])
    used_data, total_data = _fraction(w[2])
    if w[6] not in ("error_if_no_space", "queue_if_no_space") or w[7] not in ("needs_check", "-"):
        raise ValueError("unknown flag")
    return ThinPoolStatus(
        transaction_id=int(w[0]),
        used_metadata_blocks=used_meta, total_metadata_blocks=total_meta,
        used_data_blocks=used_data, total_data_blocks=total_data,
        held_metadata_root=None if w[3] == "-" else int(w[3]),
        mode=PoolMode(w[4]),
        discards=Discards(w[5]),
        error_if_no_space=w[6] == "error_if_no_space",
        needs_check=w[7] == "needs_check",
        metadata_low_watermark=int(w[8]) if len(w) == 9 else None)


def _thin(params: str) -> ThinStatus | Failed:
    if params == "Fail":
        return Failed()
    mapped, highest = params.split()
    # With nothing mapped the kernel prints "-" as the highest mapped sector.
    return ThinStatus(int(mapped), None if highest == "-" else int(highest))


def _snapshot(params: str) -> SnapshotStatus | SnapshotUnusable:
    if params in {s.value for s in SnapshotState}:
        return SnapshotUnusable(SnapshotState(params))
    fraction, metadata = params.split()
    allocated, total = _fraction(fraction)
    return SnapshotStatus(allocated, total, int(metadata))


def _clone(params: str) -> CloneStatus | Failed:
    if params == "Fail":
        return Failed()
    w = params.split()
    used_meta, total_meta = _fraction(w[1])
    hydrated, total = _fraction(w[3])
    n_features = int(w[5])
    features = w[6:6 + n_features]
    rest = w[6 + n_features:]
    n_core = int(rest[0])
    core = {key: int(value)
            for key, value in zip(rest[1:1 + n_core:2], rest[2:1 + n_core:2], strict=True)}
    mode = rest[1 + n_core:]
    if mode not in (["rw"], ["ro"]) or set(features) - {"no_hydration", "no_discard_passdown"}:
        raise ValueError("unknown mode or feature")
    return CloneStatus(
        metadata_block_size=int(w[0]),
        used_metadata_blocks=used_meta, total_metadata_blocks=total_meta,
        region_size=int(w[2]), hydrated_regions=hydrated, total_regions=total,
        hydrating_regions=int(w[4]),
        no_hydration="no_hydration" in features,
        no_discard_passdown="no_discard_passdown" in features,
        hydration_threshold=core.get("hydration_threshold"),
        hydration_batch_size=core.get("hydration_batch_size"),
        read_only=mode == ["ro"])


_PARSERS = {
    "thin-pool": _thin_pool,
    "thin": _thin,
    "snapshot": _snapshot,
    "snapshot-merge": _snapshot,
    "clone": _clone,
}
