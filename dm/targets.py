"""Device-mapper tables as types: each target's parameters render to, and parse from, the text
`dmsetup` speaks (Documentation/admin-guide/device-mapper/*.rst).

Devices are strings, either "major:minor" or a /dev path. The kernel always prints
"major:minor", so a table parsed from `dmsetup table` renders back to exactly what was printed,
and a table built with /dev paths is equal to the parsed one only after the paths are resolved.
Target types this module does not model parse into `OtherTarget`, so reading any device's
table never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from thinstack.dm.errors import DmError, ParseError

Device = str


class Target:
    """One target type's constructor parameters (the part of a table line after the type)."""

    type_name: ClassVar[str]
    _types: ClassVar[dict[str, type[Target]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" in cls.__dict__:
            Target._types[cls.type_name] = cls

    def args(self) -> list[str]:
        raise NotImplementedError

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        raise NotImplementedError

    @staticmethod
    def parse(type_name: str, args: list[str]) -> Target:
        kind = Target._types.get(type_name)
        return kind.from_args(args) if kind else OtherTarget(type_name, tuple(args))


class _Args:
    """A cursor over a target's arguments that names the target in every parse error."""

    def __init__(self, type_name: str, args: list[str]):
        self.type_name = type_name
        self.args = args
        self.pos = 0

    def fail(self, why: str) -> ParseError:
        return ParseError(f"{self.type_name} {' '.join(self.args)!r}: {why}")

    def word(self) -> str:
        if self.pos >= len(self.args):
            raise self.fail("too few arguments")
        self.pos += 1
        return self.args[self.pos - 1]

    def int(self) -> int:
        word = self.word()
        if not word.isdigit():
            raise self.fail(f"{word!r} is not a number")
        return int(word)

    def more(self) -> bool:
        return self.pos < len(self.args)

    def group(self) -> list[str]:
        """An optional `<count> <arg>*` group, as feature arguments are given; [] when absent."""
        if not self.more():
            return []
        return [self.word() for _ in range(self.int())]

    def end(self) -> None:
        if self.more():
            raise self.fail(f"unexpected {' '.join(self.args[self.pos:])!r}")


def _counted(words: list[str]) -> list[str]:
    return [str(len(words)), *words]


def _flags(target: Target, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if getattr(target, name)]


def _parse_flags(a: _Args, words: list[str], names: tuple[str, ...]) -> dict[str, bool]:
    unknown = [w for w in words if w not in names]
    if unknown:
        raise a.fail(f"unknown feature {unknown[0]!r}")
    return {name: name in words for name in names}


@dataclass(frozen=True)
class LinearTarget(Target):
    type_name = "linear"
    device: Device
    offset: int = 0

    def args(self) -> list[str]:
        return [self.device, str(self.offset)]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        target = cls(a.word(), a.int())
        a.end()
        return target


@dataclass(frozen=True)
class _NoArgs(Target):
    def args(self) -> list[str]:
        return []

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        _Args(cls.type_name, args).end()
        return cls()


@dataclass(frozen=True)
class ZeroTarget(_NoArgs):
    type_name = "zero"


@dataclass(frozen=True)
class ErrorTarget(_NoArgs):
    type_name = "error"


@dataclass(frozen=True)
class ThinPoolTarget(Target):
    """block_size is in sectors; low_water_mark in data blocks."""

    type_name = "thin-pool"
    metadata: Device
    data: Device
    block_size: int
    low_water_mark: int = 0
    skip_block_zeroing: bool = False
    ignore_discard: bool = False
    no_discard_passdown: bool = False
    read_only: bool = False
    error_if_no_space: bool = False

    FEATURES: ClassVar = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown",
                          "read_only", "error_if_no_space")

    def args(self) -> list[str]:
        # The kernel prints the feature count even when it is 0; so do we, to round-trip.
        return [self.metadata, self.data, str(self.block_size), str(self.low_water_mark),
                *_counted(_flags(self, self.FEATURES))]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        metadata, data, block_size, low_water_mark = a.word(), a.word(), a.int(), a.int()
        flags = _parse_flags(a, a.group(), cls.FEATURES)
        a.end()
        return cls(metadata, data, block_size, low_water_mark, **flags)


@dataclass(frozen=True)
class ThinTarget(Target):
    """A thin device `dev_id` of `pool`; reads of unprovisioned blocks go to `origin` if set."""

    type_name = "thin"
    pool: Device
    dev_id: int
    origin: Device | None = None

    def args(self) -> list[str]:
        return [self.pool, str(self.dev_id), *([self.origin] if self.origin else [])]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        pool, dev_id = a.word(), a.int()
        origin = a.word() if a.more() else None
        a.end()
        return cls(pool, dev_id, origin)


@dataclass(frozen=True)
class SnapshotTarget(Target):
    """persistence: "P" (persistent), "PO" (persistent, reports Overflow) or "N" (transient)."""

    type_name = "snapshot"
    origin: Device
    cow: Device
    persistence: str
    chunk_size: int
    discard_zeroes_cow: bool = False
    discard_passdown_origin: bool = False

    FEATURES: ClassVar = ("discard_zeroes_cow", "discard_passdown_origin")
    PERSISTENCE: ClassVar = ("P", "PO", "N")

    def __post_init__(self) -> None:
        if self.persistence not in self.PERSISTENCE:
            raise ValueError(f"snapshot persistence must be one of {self.PERSISTENCE}")

    def args(self) -> list[str]:
        features = _flags(self, self.FEATURES)
        return [self.origin, self.cow, self.persistence, str(self.chunk_size),
                *(_counted(features) if features else [])]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        origin, cow, persistence, chunk_size = a.word(), a.word(), a.word(), a.int()
        if persistence not in cls.PERSISTENCE:
            raise a.fail(f"persistence {persistence!r} is not one of {cls.PERSISTENCE}")
        flags = _parse_flags(a, a.group(), cls.FEATURES)
        a.end()
        return cls(origin, cow, persistence, chunk_size, **flags)


@dataclass(frozen=True)
class SnapshotMergeTarget(SnapshotTarget):
    type_name = "snapshot-merge"


@dataclass(frozen=True)
class SnapshotOriginTarget(Target):
    type_name = "snapshot-origin"
    origin: Device

    def args(self) -> list[str]:
        return [self.origin]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        target = cls(a.word())
        a.end()
        return target


@dataclass(frozen=True)
class CloneTarget(Target):
    """dm-clone: `destination` reads from `source` until hydrated. For live import (a volume
    usable while its image is still being copied in), not yet called by thinstack.
    region_size is in sectors; None for a core argument means the kernel's default."""

    type_name = "clone"
    metadata: Device
    destination: Device
    source: Device
    region_size: int
    no_hydration: bool = False
    no_discard_passdown: bool = False
    hydration_threshold: int | None = None
    hydration_batch_size: int | None = None

    FEATURES: ClassVar = ("no_hydration", "no_discard_passdown")
    CORE: ClassVar = ("hydration_threshold", "hydration_batch_size")

    def args(self) -> list[str]:
        # The kernel echoes the constructor's arguments, so the shortest form round-trips.
        features = _flags(self, self.FEATURES)
        core = [w for name in self.CORE if getattr(self, name) is not None
                for w in (name, str(getattr(self, name)))]
        tail = [*(_counted(features) if features or core else []),
                *(_counted(core) if core else [])]
        return [self.metadata, self.destination, self.source, str(self.region_size), *tail]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        metadata, destination, source, region_size = a.word(), a.word(), a.word(), a.int()
        flags = _parse_flags(a, a.group(), cls.FEATURES)
        core = a.group()
        a.end()
        keys, values = core[0::2], core[1::2]
        if len(keys) != len(values) or any(k not in cls.CORE for k in keys):
            raise a.fail(f"bad core arguments {' '.join(core)!r}")
        if not all(v.isdigit() for v in values):
            raise a.fail(f"core argument values must be numbers: {' '.join(core)!r}")
        core_args = {k: int(v) for k, v in zip(keys, values, strict=True)}
        return cls(metadata, destination, source, region_size, **flags,
                   hydration_threshold=core_args.get("hydration_threshold"),
                   hydration_batch_size=core_args.get("hydration_batch_size"))


@dataclass(frozen=True)
class CorruptBioByte:
    """flakey's corrupt_bio_byte: during the down interval, set byte `nth_byte` (1-based) of
    matching bios (direction "r" or "w", bi_opf containing `flags`) to `value`."""

    nth_byte: int
    direction: str
    value: int
    flags: int = 0

    def __post_init__(self) -> None:
        if self.direction not in ("r", "w"):
            raise ValueError("corrupt_bio_byte direction must be 'r' or 'w'")


@dataclass(frozen=True)
class FlakeyTarget(Target):
    """Works like linear for `up` seconds, then misbehaves for `down` seconds, repeating.
    With no feature given the kernel fails all I/O while down (newer kernels print that as
    error_reads error_writes). For fault tests: a disk that fails under an operation."""

    type_name = "flakey"
    device: Device
    offset: int
    up: int
    down: int
    error_reads: bool = False
    drop_writes: bool = False
    error_writes: bool = False
    corrupt_bio_byte: CorruptBioByte | None = None

    FEATURES: ClassVar = ("error_reads", "drop_writes", "error_writes")

    def args(self) -> list[str]:
        features = _flags(self, self.FEATURES)
        if c := self.corrupt_bio_byte:
            features += ["corrupt_bio_byte", str(c.nth_byte), c.direction, str(c.value),
                         str(c.flags)]
        return [self.device, str(self.offset), str(self.up), str(self.down),
                *(_counted(features) if features else [])]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        device, offset, up, down = a.word(), a.int(), a.int(), a.int()
        words = a.group()
        a.end()
        corrupt = None
        if "corrupt_bio_byte" in words:
            i = words.index("corrupt_bio_byte")
            c = _Args("flakey corrupt_bio_byte", words[i + 1:i + 5])
            try:
                corrupt = CorruptBioByte(c.int(), c.word(), c.int(), c.int())
            except ValueError as e:
                raise a.fail(str(e)) from None
            words = words[:i] + words[i + 5:]
        return cls(device, offset, up, down, **_parse_flags(a, words, cls.FEATURES),
                   corrupt_bio_byte=corrupt)


@dataclass(frozen=True)
class DelayTarget(Target):
    """Passes I/O to `device` (from sector `offset`) after `delay` ms; writes (and flushes)
    may go elsewhere with their own delay. For fault tests: a slow but healthy disk."""

    type_name = "delay"
    device: Device
    offset: int
    delay: int
    write: tuple[Device, int, int] | None = None  # device, offset, delay for writes
    flush: tuple[Device, int, int] | None = None  # for flushes; only with `write`

    def __post_init__(self) -> None:
        if self.flush and not self.write:
            raise ValueError("delay: a flush path needs a write path")

    def args(self) -> list[str]:
        paths = [(self.device, self.offset, self.delay), self.write, self.flush]
        return [str(w) for path in paths if path for w in path]

    @classmethod
    def from_args(cls, args: list[str]) -> Self:
        a = _Args(cls.type_name, args)
        if len(args) not in (3, 6, 9):
            raise a.fail("expected 3, 6 or 9 arguments")
        paths = [(a.word(), a.int(), a.int()) for _ in range(len(args) // 3)]
        return cls(*paths[0], *paths[1:])


@dataclass(frozen=True)
class OtherTarget(Target):
    """A target type thinstack does not model (striped, raid, cache, ...), kept verbatim."""

    # Its type is per instance: the one place the class-level name is a field.
    type_name: str  # type: ignore[misc]
    params: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return list(self.params)


@dataclass(frozen=True)
class TableLine:
    """`length` sectors of the device, from sector `start`, mapped by `target`."""

    start: int
    length: int
    target: Target

    def render(self) -> str:
        return " ".join([str(self.start), str(self.length), self.target.type_name,
                         *self.target.args()])

    @classmethod
    def parse(cls, line: str) -> TableLine:
        words = line.split()
        if len(words) < 3 or not (words[0].isdigit() and words[1].isdigit()):
            raise ParseError(f"not a table line: {line!r}")
        return cls(int(words[0]), int(words[1]), Target.parse(words[2], words[3:]))


@dataclass(frozen=True)
class Table:
    """A device's whole mapping: lines in order, each starting where the previous one ends."""

    lines: tuple[TableLine, ...]

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a table needs at least one line")
        end = 0
        for line in self.lines:
            if line.start != end or line.length <= 0:
                raise ValueError(f"table line {line.render()!r} does not start at sector {end}"
                                 " or is empty")
            end += line.length

    @classmethod
    def of(cls, length: int, target: Target) -> Table:
        """The one-line table mapping `length` sectors with `target`."""
        return cls((TableLine(0, length, target),))

    @property
    def size(self) -> int:
        """Length of the device in sectors."""
        return sum(line.length for line in self.lines)

    @property
    def target(self) -> Target:
        """The target of a one-line table."""
        if len(self.lines) != 1:
            raise DmError(f"table has {len(self.lines)} lines, expected one")
        return self.lines[0].target

    def render(self) -> str:
        return "".join(line.render() + "\n" for line in self.lines)

    @classmethod
    def parse(cls, text: str) -> Table:
        lines = [TableLine.parse(line) for line in text.splitlines() if line.strip()]
        if not lines:
            raise ParseError("empty table")
        try:
            return cls(tuple(lines))
        except ValueError as e:
            raise ParseError(str(e)) from None

