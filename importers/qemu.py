"""Formats that QEMU reads and thinstack does not parse itself (VMDK, VHDX, VDI, QED, qcow v1,
Parallels), read through qemu-img: `info` for the header, `map` for the allocation, and
`convert` for the bytes (straight into the destination volume on import: `convert_into`).

qemu-img opens whatever files an image names, so it is never given a path that an image named.
Every file of the chain is opened once by us (`Source.open` for the top image, `Source.named`
for each extent and backing file: no symlink, checked on the descriptor, inside the policy's
folders), and qemu-img sees only a private folder of symlinks to `/proc/self/fd/N`, one per
pinned descriptor, passed to it at the same numbers. A name qemu would open that we did not pin
does not exist in that folder, so qemu fails instead of reaching a host file; and a file swapped
on disk after our check is never read, since qemu reads our descriptor.

- Extent names are found before qemu runs by a lenient parse (a superset of what qemu's sscanf
  accepts): every quoted name on a line whose first word is an access mode, whatever its sector
  count looks like, in text descriptors and in descriptors embedded in binary sparse extents.
- Backing files are found with `qemu-img info`, which opens no backing file, then pinned, and the
  chain is given to qemu explicitly as a `json:` spec (`backing` = the next pinned node), so qemu
  never opens a backing file by the name in a header.
- After pinning, each node's own `qemu-img info` is checked: every file qemu says it opened must
  be one of our links.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from thinstack.dm import command
from thinstack.extents import Extent, Kind, coalesce
from thinstack.sizes import SECTOR

from . import DEFAULT_POLICY, ImageError, Policy, Source

INFO_TIMEOUT = 60
MAP_TIMEOUT = 600
# A convert writes every allocated byte; allow for a slow disk (32 MiB/s) on top of a minimum.
CONVERT_TIMEOUT = 300
CONVERT_BYTES_PER_SECOND = 32 << 20
# qemu's vmdk driver reads at most 1 MiB - 1 of descriptor, and keeps 511 bytes of a name.
DESCRIPTOR_LIMIT = (1 << 20) - 1
MAX_NAME = 511
MAX_EXTENTS = 1024
# The drivers a node of the chain may be read with; each opens no file but the ones pinned here
# (vmdk's extents and qcow2's data file are handled below).
DRIVERS = ("vmdk", "vhdx", "vdi", "qed", "qcow", "parallels", "qcow2", "vpc", "raw")
TOP_LINK = "image"

_MAGICS = (
    (0, b"KDMV", "vmdk"),  # VMDK4 sparse extent (monolithic or stream-optimized)
    (0, b"COWD", "vmdk"),  # VMDK3 (ESX) sparse extent
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (64, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"QED\0", "qed"),
    (0, b"QFI\xfb\0\0\0\1", "qcow"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
)
# What a backing file with no format in its child's header is read as (qemu would probe it).
_BACKING_MAGICS = ((0, b"QFI\xfb", "qcow2"), (0, b"conectix", "vpc"))
_ACCESS = (b"RW", b"RDONLY", b"NOACCESS")
# VMDK4 sparse header: magic, version, flags, capacity, grain size, descriptor offset and size.
_VMDK4 = struct.Struct("<4sIIQQQQ")
QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature bit


def qemu_format(head: bytes) -> str | None:
    for offset, magic, name in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def probe(head: bytes, tail: bytes) -> bool:
    return qemu_format(head) is not None


# --- decisions (pure) --------------------------------------------------------------------------

def descriptor_extents(text: bytes) -> list[str]:
    """Every file name a VMDK descriptor may make qemu open, found leniently: the first quoted
    string of each line whose first word is an access mode (qemu's sscanf takes `+8` as a
    sector count, so nothing after the access mode is required to look right). A name is cut at
    a quote, CR or LF, as qemu cuts it."""
    names = []
    for line in text.split(b"\n"):
        words = line.split(None, 1)
        if not words or words[0] not in _ACCESS or b'"' not in line:
            continue
        name = line.split(b'"', 1)[1]
        for stop in (b'"', b"\r"):
            name = name.split(stop, 1)[0]
        names.append(os.fsdecode(name))
    return names


def embedded_descriptor(head: bytes) -> tuple[int, int] | None:
    """(offset, length) of the descriptor qemu reads from a binary sparse VMDK (`KDMV`) with
    capacity 0: such a file is a descriptor naming other extents, like a text one."""
    if len(head) < _VMDK4.size or head[:4] != b"KDMV":
        return None
    _, _, _, capacity, _, desc_sector, _ = _VMDK4.unpack_from(head)
    if capacity != 0 or desc_sector == 0:
        return None
    return desc_sector * SECTOR, DESCRIPTOR_LIMIT


def link_name(name: str, path: Path) -> PurePosixPath:
    """Where an extent name resolves inside a node's private folder; names qemu would resolve
    outside it, or truncate, are refused."""
    if len(os.fsencode(name)) > MAX_NAME:
        raise ImageError(path, f"VMDK extent name longer than {MAX_NAME} bytes (qemu would cut it)")
    if name.startswith("/"):
        raise ImageError(path, f"VMDK extent {name!r} is an absolute name; thinstack follows only "
                               f"extent names relative to the descriptor")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise ImageError(path, f"VMDK extent {name!r} climbs out of the descriptor's folder ('..')")
    if not parts:
        raise ImageError(path, f"VMDK extent {name!r} names no file")
    if parts == [TOP_LINK]:
        raise ImageError(path, f"VMDK extent {name!r} clashes with thinstack's name for the "
                               f"descriptor; rename the extent")
    return PurePosixPath(*parts)


def opened_files(info) -> set[str]:
    """Every file qemu says it opened for one node: "filename" and "data-file" values anywhere
    in `qemu-img info`'s JSON (extents included), json: filenames taken apart. Backing names
    are not among them: a node is inspected without its backing file, which we give explicitly."""
    found: set[str] = set()

    def walk(value, key=None):
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in ("backing-filename", "full-backing-filename"):
                    walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key in ("filename", "data-file"):
            if value.startswith("json:"):
                try:
                    walk(json.loads(value[5:]))
                except ValueError:
                    found.add(value)
            else:
                found.add(value)

    walk(info)
    return found


def backing_format(named: str | None, head: bytes) -> str:
    """The driver a backing file is read with: the one its child names, else from its content
    (as qemu would probe it)."""
    if named:
        return named
    for offset, magic, name in _BACKING_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return qemu_format(head) or "raw"


# --- the private folder of pinned files ------------------------------------------------------

@dataclass
class Node:
    format: str
    source: Source
    link: Path
    links: set[str]  # every path qemu may open for this node
    info: dict


class Pins:
    """Open descriptors and the private folder of symlinks through which qemu-img reaches them.
    The folder (mkdtemp: 0700) holds only symlinks, no data."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="thinstack-qemu-"))
        self.sources: list[Source] = []

    def keep(self, source: Source) -> Source:
        self.sources.append(source)
        return source

    def link(self, node: int, name: PurePosixPath, source: Source, path: Path) -> Path:
        link = self.dir / str(node) / name
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f"/proc/self/fd/{source.fd}", link)
        except OSError as e:  # e.g. "a" and "a/b" both named as extents
            raise ImageError(path, f"VMDK extent {str(name)!r}: {e.strerror}") from None
        return link

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(s.fd for s in self.sources)

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.sources = []
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------

def open(target: str | os.PathLike | Source, policy: Policy = DEFAULT_POLICY,
         driver: str | None = None) -> QemuImage:
    """The image read through qemu-img; `driver` names qemu's driver for the top file (live
    import serves every format through qemu-nbd), else it is found from the content."""
    source = Source.of(target)
    pins = Pins()
    pins.keep(source)
    try:
        fmt = driver or qemu_format(source.head_and_tail()[0])
        if fmt is None:
            raise ImageError(source.path, "not a format this driver hands to qemu-img")
        nodes = _chain(source, fmt, policy, pins)
        for at in range(len(nodes)):
            _check(nodes[at].source.path, _spec(nodes[at:]), pins)
        size = nodes[0].info["virtual-size"]
        if size > policy.max_virtual_size:
            raise ImageError(source.path, f"virtual size {size} exceeds the policy's "
                                          f"{policy.max_virtual_size}")
        return QemuImage(source.path, fmt, size, pins, _spec(nodes))
    except BaseException:
        pins.close()
        raise


def _chain(top: Source, fmt: str, policy: Policy, pins: Pins) -> list[Node]:
    """Pin every file of the chain, one node at a time, and check qemu's view of each."""
    nodes: list[Node] = []
    seen = set()
    source = top
    while True:
        if source.identity in seen:
            raise ImageError(source.path, "the backing chain loops back to this image")
        seen.add(source.identity)
        node = _pin_node(len(nodes), source, fmt, policy, pins)
        nodes.append(node)
        backing = node.info.get("backing-filename")
        if not backing:
            return nodes
        if len(nodes) > policy.max_chain_depth:
            raise ImageError(source.path, f"backing chain is deeper than the policy allows (at "
                                          f"backing file {backing})")
        child = source
        source = pins.keep(_named(backing, child, "backing file", policy))
        fmt = backing_format(node.info.get("backing-filename-format"),
                             source.head_and_tail()[0])
        if fmt not in DRIVERS:
            raise ImageError(child.path, f"backing file {backing} has format {fmt!r}, which "
                                         f"thinstack does not read through qemu-img")


def _pin_node(index: int, source: Source, fmt: str, policy: Policy, pins: Pins) -> Node:
    link = pins.link(index, PurePosixPath(TOP_LINK), source, source.path)
    links = {str(link)}
    if fmt == "vmdk":
        links |= _pin_extents(index, source, policy, pins)
    if fmt == "qcow2":
        _refuse_data_file(source)
    info = json.loads(_qemu_img(source.path, INFO_TIMEOUT, pins.fds, "info", "--output=json",
                                _json(_node_spec(fmt, link, source))))
    stray = sorted(f for f in opened_files(info) if os.path.normpath(f) not in links)
    if stray:
        raise ImageError(source.path, f"qemu-img would open {stray[0]}, which is no file "
                                      f"thinstack checked")
    return Node(fmt, source, link, links, info)


def _pin_extents(index: int, top: Source, policy: Policy, pins: Pins) -> set[str]:
    """Open every file the descriptor of `top` (text or embedded) may name, and link each into
    the node's folder under the name qemu will look for. Extents that are themselves binary
    descriptors are followed too (their names resolve, for qemu, next to `top`)."""
    links: dict[PurePosixPath, Path] = {}
    todo = [top]
    while todo:
        holder = todo.pop()
        for name in _names_in(holder):
            where = link_name(name, top.path)
            if where in links:
                continue
            if len(links) >= MAX_EXTENTS:
                raise ImageError(top.path, f"names more than {MAX_EXTENTS} VMDK extents")
            extent = pins.keep(_named(str(where), top, "VMDK extent", policy))
            links[where] = pins.link(index, where, extent, top.path)
            todo.append(extent)
    return {str(link) for link in links.values()}


def _named(name: str, by: Source, what: str, policy: Policy) -> Source:
    """Source.named, after refusing by name what lies outside the allowed folders, so a file
    refused is not even opened (a tripwire stays untouched). The check that counts is still
    the one Source.named makes on the open descriptor."""
    if policy.follow_references and name and "\0" not in name \
            and ":" not in name.split("/", 1)[0]:
        path = Path(name) if os.path.isabs(name) else by.real.parent / name
        if path.name in ("", ".", ".."):
            raise ImageError(by.path, f"{what} {name} names a folder, not a file")
        where = Path(os.path.realpath(path.parent)) / path.name
        roots = policy.roots(by)
        if not any(where.is_relative_to(root) for root in roots):
            shown = ", ".join(map(str, roots)) or "nowhere (a block device names no folder)"
            raise ImageError(by.path, f"{what} {name} is {where}, outside the folders an image "
                                      f"may name files in ({shown}); allow its folder with "
                                      f"--allow-dir if it is trusted")
    return Source.named(name, by=by, what=what, policy=policy)


def _names_in(source: Source) -> list[str]:
    head = os.pread(source.fd, 4096, 0)
    if head[:4] == b"COWD":
        return []
    embedded = embedded_descriptor(head)
    if head[:4] == b"KDMV" and embedded is None:
        return []
    offset, length = embedded or (0, DESCRIPTOR_LIMIT)
    return descriptor_extents(os.pread(source.fd, length, offset))


def _refuse_data_file(source: Source) -> None:
    """qemu opens a qcow2 image's external data file by the name in its header, even for
    `info`; thinstack reads none through qemu."""
    head = source.head_and_tail()[0]
    version = int.from_bytes(head[4:8], "big")
    if version >= 3 and int.from_bytes(head[72:80], "big") & QCOW2_EXTERNAL_DATA:
        raise ImageError(source.path, "uses an external data file, which thinstack does not "
                                      "read through qemu-img")


def _check(path: Path, spec: dict, pins: Pins) -> None:
    """`qemu-img check` of one node (with its pinned backing chain): an image whose tables are
    corrupt (data mapped onto metadata or past the end, say) is refused. Leaked clusters are
    harmless; formats qemu cannot check pass as they are."""
    try:
        _qemu_img(path, INFO_TIMEOUT, pins.fds, "check", "--output=json", _json(spec))
    except _Exit as e:
        if e.status == 2:
            try:
                found = f"{json.loads(e.message)['corruptions']} corruptions"
            except (ValueError, KeyError, TypeError):
                found = e.message
            raise ImageError(path, f"qemu-img check finds the image corrupt ({found})") from None
        if e.status not in (3, 63):
            raise ImageError(path, f"qemu-img check failed: {e.message}") from None


def _node_spec(fmt: str, link: Path, source: Source) -> dict:
    protocol = "file" if source.regular else "host_device"
    return {"driver": fmt, "file": {"driver": protocol, "filename": str(link)}}


def _spec(nodes: list[Node]) -> dict:
    """The whole chain for qemu: each node with its backing given explicitly, so no header's
    backing name is ever looked up."""
    last = nodes[-1]
    spec = _node_spec(last.format, last.link, last.source)
    for node in reversed(nodes[:-1]):
        spec = {**_node_spec(node.format, node.link, node.source), "backing": spec}
    return spec


def _json(spec: dict) -> str:
    return "json:" + json.dumps(spec, separators=(",", ":"))


class QemuImage:
    format = "qemu"

    def __init__(self, path: Path, qemu_format: str, virtual_size: int, pins: Pins, spec: dict):
        self.path = path
        self.qemu_format = qemu_format
        self.virtual_size = virtual_size
        self._pins = pins
        self._spec = _json(spec)
        self._raw: Source | None = None

    @property
    def spec(self) -> str:
        """The whole pinned chain as a `json:` name, for a qemu tool run with `fds`."""
        return self._spec

    @property
    def fds(self) -> tuple[int, ...]:
        return self._pins.fds

    def extents(self) -> Iterator[Extent]:
        lines = _qemu_img_lines(self.path, MAP_TIMEOUT, self._pins.fds, "map", "--output=json",
                                self._spec)
        # One JSON object a line, inside a list: '[{...},' ... '{...}]'.
        return coalesce(_extent(json.loads(line.strip().lstrip("[").rstrip("]").rstrip(",")))
                        for line in lines if line.strip() not in ("", "[", "]"))

    def convert_into(self, device: str) -> None:
        """Write the image's bytes onto `device` (a fresh thin volume that reads as zeros),
        skipping what reads as zeros: qemu-img writes straight into it, no copy in between.
        A rerun after an interruption writes the same bytes again."""
        if not device.startswith("/"):
            raise ValueError(f"device {device!r} must be an absolute path")
        timeout = CONVERT_TIMEOUT + self.virtual_size // CONVERT_BYTES_PER_SECOND
        _qemu_img(self.path, timeout, self._pins.fds, "convert", "-n", "--target-is-zero",
                  "-O", "raw", self._spec, device)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError(self.path, f"read of {length} bytes at {offset} outside the virtual "
                                        f"size {self.virtual_size}")
        if self._raw is None:
            self._raw = self._convert()
        return self._raw.read_at(offset, length, "converted data")

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self._pins.close()

    def _convert(self) -> Source:
        """For readers other than import: the whole image as a sparse raw file that exists only
        as an open descriptor."""
        with tempfile.TemporaryDirectory(prefix="thinstack-qemu-") as tmp:
            target = Path(tmp) / "image.raw"
            timeout = CONVERT_TIMEOUT + self.virtual_size // CONVERT_BYTES_PER_SECOND
            _qemu_img(self.path, timeout, self._pins.fds, "convert", "-O", "raw", self._spec,
                      str(target))
            raw = Source.open(target)
        if raw.size < self.virtual_size:
            raw.close()
            raise ImageError(self.path, f"qemu-img convert produced {raw.size} bytes, expected "
                                        f"{self.virtual_size}")
        return raw


def _extent(entry: dict) -> Extent:
    if entry.get("zero"):
        kind = Kind.ZERO if entry.get("present") else Kind.HOLE
    elif entry.get("data"):
        kind = Kind.DATA
    else:
        kind = Kind.HOLE
    return Extent(entry["start"], entry["length"], kind)


def _qemu_img(path: Path, timeout: float, fds: tuple[int, ...], *args: str) -> str:
    """Run qemu-img through the one runner, with our pinned descriptors at the same numbers;
    any failure is an ImageError (`check`'s statuses come back as _Exit, which mean things)."""
    try:
        return command.RUNNER.run(["qemu-img", *args], timeout=timeout, pass_fds=fds)
    except command.CommandError as e:
        raise _failure(path, args[0], e) from None


def _qemu_img_lines(path: Path, timeout: float, fds: tuple[int, ...], *args: str
                    ) -> Iterator[str]:
    """qemu-img's output line by line as it comes (a map of a large image is large)."""
    rest = ""
    try:
        for piece in command.RUNNER.stream(["qemu-img", *args], timeout=timeout,
                                           pass_fds=fds):
            *lines, rest = (rest + piece).split("\n")
            yield from lines
    except command.CommandError as e:
        raise _failure(path, args[0], e) from None
    if rest:
        yield rest


def _failure(path: Path, verb: str, e: command.CommandError) -> Exception:
    if isinstance(e, command.CommandNotFound):
        return ImageError(path, "qemu-img is not installed (Debian: qemu-utils)")
    if isinstance(e, command.CommandTimeout):
        return ImageError(path, f"qemu-img {verb} took longer than {e.timeout:g} s")
    output = (e.stderr or e.stdout).strip()
    message = " ".join(output.split())[:300] or f"exit status {e.exit_status}"
    if verb == "check":
        return _Exit(e.exit_status, message)
    return ImageError(path, f"qemu-img {verb} failed: {message}")


class _Exit(Exception):
    def __init__(self, status: int | None, message: str):
        self.status, self.message = status, message


