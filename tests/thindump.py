"""thin_dump's whole output as one tree of types, for tests and the mapping benchmark: thinstack
itself reads one device's mapping as it streams (thinstack.dm.tools.thin_ranges)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from thinstack.dm.command import RUNNER, Runner
from thinstack.dm.errors import ParseError
from thinstack.dm.tools import TIMEOUT, BlockRange, _snap, coalesce


@dataclass(frozen=True)
class Mapping:
    """`length` virtual blocks from `origin_begin` stored at data blocks from `data_begin`."""

    origin_begin: int
    data_begin: int
    length: int
    time: int


@dataclass(frozen=True)
class DeviceMappings:
    dev_id: int
    mapped_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    mappings: tuple[Mapping, ...]

    def virtual_ranges(self) -> list[BlockRange]:
        """The device's mapped virtual blocks as sorted, coalesced ranges."""
        return coalesce(BlockRange(m.origin_begin, m.length) for m in self.mappings)


@dataclass(frozen=True)
class ThinDump:
    data_block_size: int  # sectors
    transaction: int
    devices: dict[int, DeviceMappings]


def thin_dump(metadata_dev: str, *, metadata_snap: bool = True, dev_id: int | None = None,
              runner: Runner = RUNNER) -> ThinDump:
    """Every device's mappings (only `dev_id`'s, if given)."""
    dev = ["--dev-id", str(dev_id)] if dev_id is not None else []
    return parse_thin_dump(runner.run(["thin_dump", *_snap(metadata_snap), *dev, metadata_dev],
                                      timeout=TIMEOUT))


def _xml(text: str, tool: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise ParseError(f"{tool} output is not XML: {e}") from None


def _int(element: ET.Element, name: str) -> int:
    value = element.get(name)
    if value is None or not value.isdigit():
        raise ParseError(f"<{element.tag}> has no numeric {name}: {ET.tostring(element)!r}")
    return int(value)


def parse_thin_dump(text: str) -> ThinDump:
    root = _xml(text, "thin_dump")
    devices = {}
    for d in root.iter("device"):
        mappings = []
        for m in d:
            if m.tag == "range_mapping":
                mappings.append(Mapping(_int(m, "origin_begin"), _int(m, "data_begin"),
                                        _int(m, "length"), _int(m, "time")))
            elif m.tag == "single_mapping":
                mappings.append(Mapping(_int(m, "origin_block"), _int(m, "data_block"), 1,
                                        _int(m, "time")))
            else:
                raise ParseError(f"thin_dump: unexpected <{m.tag}> in a device")
        dev_id = _int(d, "dev_id")
        devices[dev_id] = DeviceMappings(dev_id, _int(d, "mapped_blocks"),
                                         _int(d, "transaction"), _int(d, "creation_time"),
                                         _int(d, "snap_time"), tuple(mappings))
    return ThinDump(_int(root, "data_block_size"), _int(root, "transaction"), devices)
