"""thin-provisioning-tools (thin_dump, thin_delta, thin_ls, thin_check) with their output parsed
into types. thin_dump is read as it streams (thin_ranges), in constant memory; the whole dump as
one tree is for tests (tests/thindump.py).

On a live pool these tools may only read the metadata snapshot, which must be reserved for the
duration (Pool.metadata_snap()): `metadata_snap=True`, the default, passes -m/--metadata-snap.
On a pool that is not active, pass metadata_snap=False to read the current metadata.
All block numbers and lengths are in pool data blocks of `data_block_size` sectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from thinstack.dm.command import RUNNER, CommandError, CommandNotFound, CommandTimeout, Runner
from thinstack.dm.errors import ParseError

# thin_dump of a large pool runs for a while; it still must not hang forever.
TIMEOUT = 3600


@dataclass(frozen=True)
class BlockRange:
    begin: int
    length: int

    @property
    def end(self) -> int:
        return self.begin + self.length


class DeltaKind(Enum):
    SAME = "same"
    DIFFERENT = "different"
    LEFT_ONLY = "left_only"  # mapped in snap1 only
    RIGHT_ONLY = "right_only"  # mapped in snap2 only


@dataclass(frozen=True)
class DeltaRange:
    kind: DeltaKind
    begin: int
    length: int


@dataclass(frozen=True)
class ThinDelta:
    data_block_size: int  # sectors
    left: int  # dev id given as snap1
    right: int  # dev id given as snap2
    ranges: tuple[DeltaRange, ...]

    def changed(self) -> list[BlockRange]:
        """Blocks whose content differs between left and right, coalesced: written after the
        snapshot (different), newly mapped (right_only) or unmapped since (left_only)."""
        return coalesce(BlockRange(r.begin, r.length) for r in self.ranges
                        if r.kind is not DeltaKind.SAME)


@dataclass(frozen=True)
class ThinLsEntry:
    dev_id: int
    mapped_blocks: int
    exclusive_blocks: int
    shared_blocks: int


@dataclass(frozen=True)
class ThinCheckResult:
    clean: bool
    output: str  # what thin_check said, for a log or a repair decision


def coalesce(ranges: Iterable[BlockRange]) -> list[BlockRange]:
    merged: list[BlockRange] = []
    for r in sorted(ranges, key=lambda r: r.begin):
        if merged and r.begin <= merged[-1].end:
            last = merged[-1]
            merged[-1] = BlockRange(last.begin, max(last.end, r.end) - last.begin)
        else:
            merged.append(r)
    return merged


def _snap(metadata_snap: bool) -> list[str]:
    return ["--metadata-snap"] if metadata_snap else []


@dataclass(frozen=True)
class ThinRanges:
    """What a reader of one thin device's content needs: which virtual blocks it maps, as
    coalesced ranges. thin_dump lists every mapping with its data block; for a fragmented
    volume that is millions of lines, held here as one range per run of mapped blocks."""

    data_block_size: int  # sectors
    dev_id: int
    mapped_blocks: int
    ranges: tuple[BlockRange, ...]


def thin_ranges(metadata_dev: str, dev_id: int, *, metadata_snap: bool = True,
                runner: Runner = RUNNER) -> ThinRanges | None:
    """Device `dev_id`'s mapped ranges, read from thin_dump as it streams (in constant memory
    but for the ranges themselves); None if the pool has no such device."""
    return parse_thin_ranges(
        runner.stream(["thin_dump", *_snap(metadata_snap), "--dev-id", str(dev_id),
                       metadata_dev], timeout=TIMEOUT), dev_id)


def _expat(pieces: Iterable[str], start: Callable[[str, dict[str, str]], None],
           end: Callable[[str], None], tool: str) -> None:
    """Feed a tool's XML output, in pieces, to start/end element callbacks: no tree is built,
    as a fragmented volume's output has millions of elements."""
    from xml.parsers import expat  # here: most commands never parse XML, and start-up is dear

    parser = expat.ParserCreate()
    parser.StartElementHandler, parser.EndElementHandler = start, end
    try:
        for piece in pieces:
            parser.Parse(piece, False)
        parser.Parse("", True)
    except expat.ExpatError as e:
        raise ParseError(f"{tool} output is not XML: {e}") from None


def parse_thin_ranges(pieces: Iterable[str], dev_id: int) -> ThinRanges | None:
    found: dict[str, int] = {}
    ranges: list[BlockRange] = []
    run = [0, 0]  # the open run of mapped blocks: begin, end
    inside = [False]  # within the <device> asked for

    def take(begin: int, length: int) -> None:
        # thin_dump lists a device's mappings in virtual block order: runs merge as they come.
        if begin == run[1] and run[1] > run[0]:
            run[1] += length
            return
        if begin < run[1]:
            raise ParseError(f"thin_dump: mappings of device {dev_id} out of order at {begin}")
        if run[1] > run[0]:
            ranges.append(BlockRange(run[0], run[1] - run[0]))
        run[:] = [begin, begin + length]

    def start(tag: str, attrs: dict[str, str]) -> None:
        try:
            if tag == "single_mapping":
                mapped = (int(attrs["origin_block"]), 1) if inside[0] else None
            elif tag == "range_mapping":
                mapped = (int(attrs["origin_begin"]), int(attrs["length"])) if inside[0] else None
            else:
                mapped = None
                if tag == "device":
                    inside[0] = int(attrs["dev_id"]) == dev_id
                    if inside[0]:
                        found["mapped_blocks"] = int(attrs["mapped_blocks"])
                elif tag == "superblock":
                    found["data_block_size"] = int(attrs["data_block_size"])
        except (KeyError, ValueError):
            raise ParseError(f"thin_dump: <{tag}> lacks a numeric attribute: {attrs}") from None
        if mapped is not None:
            take(*mapped)

    def end(tag: str) -> None:
        if tag == "device":
            inside[0] = False

    _expat(pieces, start, end, "thin_dump")
    if "data_block_size" not in found:
        raise ParseError("thin_dump: no <superblock> in the output")
    if "mapped_blocks" not in found:
        return None
    if run[1] > run[0]:
        ranges.append(BlockRange(run[0], run[1] - run[0]))
    return ThinRanges(found["data_block_size"], dev_id, found["mapped_blocks"], tuple(ranges))


def thin_delta(metadata_dev: str, snap1: int, snap2: int, *, metadata_snap: bool = True,
               runner: Runner = RUNNER) -> ThinDelta:
    """How device `snap2`'s mappings differ from device `snap1`'s (read as it streams: two
    fragmented volumes differ in millions of ranges)."""
    return parse_thin_delta(runner.stream(["thin_delta", *_snap(metadata_snap), "--snap1",
                                           str(snap1), "--snap2", str(snap2), metadata_dev],
                                          timeout=TIMEOUT))


def thin_ls(metadata_dev: str, *, metadata_snap: bool = True,
            runner: Runner = RUNNER) -> list[ThinLsEntry]:
    out = runner.run(["thin_ls", *_snap(metadata_snap), "--no-headers",
               "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", metadata_dev],
              timeout=TIMEOUT)
    return parse_thin_ls(out)


def thin_check(metadata_dev: str, *, metadata_snap: bool = False, skip_mappings: bool = False,
               clear_needs_check: bool = False, runner: Runner = RUNNER) -> ThinCheckResult:
    """Check the metadata. thin_check refuses live metadata unless metadata_snap is set (then it
    checks the reserved snapshot); clear_needs_check clears the flag once the check passes."""
    argv = ["thin_check", *_snap(metadata_snap),
            *(["--skip-mappings"] if skip_mappings else []),
            *(["--clear-needs-check-flag"] if clear_needs_check else []), metadata_dev]
    try:
        out = runner.run(argv, timeout=TIMEOUT)
    except (CommandNotFound, CommandTimeout):
        raise
    except CommandError as e:
        return ThinCheckResult(False, (e.stdout + e.stderr).strip())
    return ThinCheckResult(True, out.strip())


def parse_thin_delta(output: str | Iterable[str]) -> ThinDelta:
    """thin_delta's output, whole or in pieces."""
    kinds = {k.value: k for k in DeltaKind}
    head: dict[str, int] = {}
    ranges: list[DeltaRange] = []
    depth = [0]  # 1 within <diff>

    def start(tag: str, attrs: dict[str, str]) -> None:
        if depth[0] and tag not in kinds:
            raise ParseError(f"thin_delta: unexpected <{tag}>")
        try:
            if tag == "superblock":
                head["data_block_size"] = int(attrs["data_block_size"])
            elif tag == "diff":
                head["left"], head["right"] = int(attrs["left"]), int(attrs["right"])
                depth[0] = 1
            elif depth[0]:
                ranges.append(DeltaRange(kinds[tag], int(attrs["begin"]), int(attrs["length"])))
        except (KeyError, ValueError):
            raise ParseError(f"thin_delta: <{tag}> lacks a numeric attribute: {attrs}") from None

    def end(tag: str) -> None:
        if tag == "diff":
            depth[0] = 0

    _expat([output] if isinstance(output, str) else output, start, end, "thin_delta")
    if "left" not in head:
        raise ParseError("thin_delta: no <diff> in the output")
    if "data_block_size" not in head:
        raise ParseError("thin_delta: no <superblock> in the output")
    return ThinDelta(head["data_block_size"], head["left"], head["right"], tuple(ranges))


def parse_thin_ls(text: str) -> list[ThinLsEntry]:
    entries = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) != 4 or not all(w.isdigit() for w in words):
            raise ParseError(f"thin_ls: unexpected line {line!r}")
        entries.append(ThinLsEntry(*map(int, words)))
    return entries
