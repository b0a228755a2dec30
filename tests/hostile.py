"""The hostile-image corpus: every kind of image thinstack must refuse (exit 8, one line, bounded
memory and time, nothing left behind) without opening a file outside the folders it may read.

Each kind is a small function `make(folder, outside) -> Case`, registered in KINDS under its name
and its family (the format it attacks). `folder` is the image's own (empty) folder; `outside` a
folder beside it that holds the tripwires (`plant(outside)`): files with known content that the
images try to reach as backing files, parents, extents and data files, by every route a name can
take (absolute, `..`, a symlink, a symlinked folder, /dev, /proc/self, json:/nbd: protocols, a name
starting with '-'). Images are built from the project's own structs (importers.vhd, .qcow2, .gow)
or by `qemu-img create`, then corrupted.

    python -m tests.hostile DIR   # writes every kind to DIR/NAME/, tripwires to DIR/NAME.out/
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import uuid as uuidlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from thinstack.importers import gow as gowfmt
from thinstack.importers import qcow2 as qfmt
from thinstack.importers import vhd as vhdfmt

TRIP = b"TRIPWIRE"
TRIP_SIZE = 64 << 10
TRIP_UUID = uuidlib.UUID(int=0x7219_0000_0000_4000_8000_0000_0000_7219).bytes
SIZE = 1 << 20  # virtual size of the small images


@dataclass(frozen=True)
class Case:
    path: Path  # the image, as the operator would name it
    format: str  # the --format to import it with: "auto" or an explicit format
    description: str
    finding: str  # which of issue 8's findings (or which class of corruption) it exercises


@dataclass(frozen=True)
class Kind:
    name: str
    family: str
    make: Callable[[Path, Path], Case]


KINDS: dict[str, Kind] = {}
FAMILIES = ("raw", "qcow2", "vhd", "gow", "vmdk-text", "vmdk-binary", "vmdk-split", "vhdx", "vdi",
            "qed", "qcow1")


def kind(family: str, name: str | None = None):
    assert family in FAMILIES, family

    def register(make):
        key = name or make.__name__
        assert key not in KINDS, key
        KINDS[key] = Kind(key, family, make)
        return make
    return register


# --- tripwires and the routes out of the folder ----------------------------------------------

def plant(outside: Path) -> list[Path]:
    """The tripwires: a raw file and a valid dynamic VHD (what a hostile parent locator wants)."""
    outside.mkdir(parents=True, exist_ok=True)
    raw = outside / "tripwire.raw"
    if not raw.exists():
        raw.write_bytes(TRIP * (TRIP_SIZE // len(TRIP)))
    vhd = outside / "tripwire.vhd"
    if not vhd.exists():
        vhd_image(vhd, uuid=TRIP_UUID, blocks={0: TRIP * 8192})
    return [raw, vhd]


def _block_device() -> str:
    for name in ("loop0", "ubda", "vda", "sda", "nvme0n1"):
        if os.path.exists(f"/dev/{name}"):
            return f"/dev/{name}"
    return "/dev/zero"


def route(how: str, folder: Path, outside: Path, target: str = "tripwire.raw") -> str:
    """A name that an image in `folder` can hold to reach outside/target."""
    plant(outside)
    trip = outside / target
    if how == "absolute":
        return str(trip)
    if how == "dotdot":
        return os.path.relpath(trip, folder)
    if how == "symlink":
        link = folder / f"link-{target}"
        if not link.is_symlink():
            link.symlink_to(trip)
        return link.name
    if how == "symlinked_dir":
        sub = folder / "sub"
        if not sub.is_symlink():
            sub.symlink_to(outside, target_is_directory=True)
        return f"sub/{target}"
    if how == "dev":
        return _block_device()
    if how == "dev_zero":  # endless: a reader that follows it never ends
        return "/dev/zero"
    if how == "proc_root":
        return f"/proc/self/root{trip}"
    if how == "proc_fd":
        return "/proc/self/fd/3"
    if how == "json":
        return "json:" + json.dumps({"driver": "raw", "file": {"driver": "file",
                                                               "filename": str(trip)}})
    if how == "nbd":
        return "nbd:127.0.0.1:10809"
    if how == "dash":  # reaches qemu-img as an option unless passed safely
        (folder / "-o").mkdir(exist_ok=True)
        return "-o/../" + os.path.relpath(trip, folder)
    raise ValueError(how)


ROUTES = ("absolute", "dotdot", "symlink", "symlinked_dir", "dev", "proc_root", "json", "nbd",
          "dash")


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                   env={**os.environ, "LC_ALL": "C"})


# --- qcow2 -------------------------------------------------------------------------------------

@dataclass
class Q:
    """Where a built qcow2 image keeps things."""

    path: Path
    cs: int
    header: qfmt.Header
    rt: int  # refcount table
    rb: int  # refcount block
    l1: int
    l2: list[int]  # host offset of each L2 table
    data: dict[int, int]  # guest cluster -> host offset
    end: int


def qcow2_image(path: Path, *, size: int = SIZE, cb: int = 16, version: int = 3,
                data: dict[int, bytes] | None = None, backing: str | None = None,
                backing_fmt: str | None = "raw", data_file: str | None = None,
                incompat: int = 0, compression: int | None = None,
                compressed: dict[int, bytes] | None = None) -> Q:
    """A valid qcow2: header | refcount table | refcount block | L1 | L2s | data | compressed.
    `compressed` maps guest clusters to raw deflate (or zstd) streams stored as-is."""
    cs = 1 << cb
    data = {0: pattern(cs), 1: pattern(cs, 2)} if data is None else data
    compressed = compressed or {}
    per_l2 = cs // 8
    l1_entries = -(-size // (per_l2 * cs))
    l1_clusters = max(1, -(-l1_entries * 8 // cs))
    rt, rb, l1 = cs, 2 * cs, 3 * cs
    l2_needed = sorted({g // per_l2 for g in (*data, *compressed)})
    l2_at = {}
    pos = l1 + l1_clusters * cs
    for index in l2_needed:
        l2_at[index] = pos
        pos += cs
    hosts = {}
    for g in sorted(data):
        hosts[g] = pos
        pos += cs
    packed_at = {}
    for g in sorted(compressed):
        packed_at[g] = pos
        pos += -(-len(compressed[g]) // cs) * cs
    end = pos
    if data_file is not None:
        incompat |= qfmt.INCOMPAT_DATA_FILE
    if compression is not None:
        incompat |= qfmt.INCOMPAT_COMPRESSION
    header_length = 112 if version >= 3 else 72
    exts = b""
    if version >= 3:
        if backing is not None and backing_fmt is not None:
            exts += qfmt.pack_extension(qfmt.EXT_BACKING_FORMAT, backing_fmt.encode())
        if data_file is not None:
            exts += qfmt.pack_extension(qfmt.EXT_DATA_FILE, data_file.encode())
        exts += qfmt.EXTENSION.pack(qfmt.EXT_END, 0)
    name = b"" if backing is None else backing.encode()
    name_at = header_length + len(exts) if name else 0
    h = qfmt.Header(version, name_at, len(name), cb, size, 0, l1_entries, l1, rt, 1, 0, 0,
                    incompat, 0, 0, 4, header_length,
                    compression if compression is not None else 0)
    first = (h.pack() + exts + name).ljust(cs, b"\0")
    assert len(first) == cs
    out = bytearray(end)
    out[:cs] = first
    out[rt:rt + 8] = struct.pack(">Q", rb)
    for c in range(end // cs):
        out[rb + 2 * c:rb + 2 * c + 2] = struct.pack(">H", 1)
    for index, at in l2_at.items():
        out[l1 + 8 * index:l1 + 8 * index + 8] = struct.pack(">Q", at | qfmt.OFLAG_COPIED)
    for g, host in hosts.items():
        table = l2_at[g // per_l2]
        at = table + 8 * (g % per_l2)
        out[at:at + 8] = struct.pack(">Q", host | qfmt.OFLAG_COPIED)
        out[host:host + cs] = data[g].ljust(cs, b"\0")[:cs]
    bits = 62 - (cb - 8)
    for g, host in packed_at.items():
        stream = compressed[g]
        sectors = -(-len(stream) // 512)
        table = l2_at[g // per_l2]
        at = table + 8 * (g % per_l2)
        out[at:at + 8] = struct.pack(">Q", qfmt.OFLAG_COMPRESSED | (sectors - 1) << bits | host)
        out[host:host + len(stream)] = stream
    path.write_bytes(bytes(out))
    return Q(path, cs, h, rt, rb, l1, [l2_at.get(i, 0) for i in range(l1_entries)], hosts, end)


def set_header(q: Q, **fields) -> None:
    patch(q.path, 0, replace(q.header, **fields).pack())


def set_l1(q: Q, index: int, entry: int) -> None:
    patch(q.path, q.l1 + 8 * index, struct.pack(">Q", entry))


def set_l2(q: Q, guest_cluster: int, entry: int) -> None:
    per = q.cs // 8
    patch(q.path, q.l2[guest_cluster // per] + 8 * (guest_cluster % per), struct.pack(">Q", entry))


def _q(folder: Path, **options) -> Q:
    return qcow2_image(folder / "disk.qcow2", **options)


def _qcase(q: Q, description: str, finding: str, format: str = "qcow2") -> Case:
    return Case(q.path, format, description, finding)


# --- VHD ---------------------------------------------------------------------------------------

VHD_BLOCK = 64 << 10


@dataclass
class V:
    path: Path
    footer: vhdfmt.Footer
    header: vhdfmt.DynamicHeader | None
    bat: int
    blocks: dict[int, int]  # index -> file offset of the block's bitmap
    locators: list[int]
    end: int  # where the footer starts


def vhd_image(path: Path, *, size: int = SIZE, block: int = VHD_BLOCK, uuid: bytes | None = None,
              blocks: dict[int, bytes] | None = None, parent: tuple[bytes, str] | None = None,
              locators: list[tuple[bytes, str]] = ()) -> V:
    """A valid dynamic VHD (differencing with `parent` = (uuid, name)): footer copy | header |
    BAT | parent locators | blocks (bitmap + data) | footer."""
    uuid = uuid or os.urandom(16)
    blocks = {0: pattern(block)} if blocks is None else blocks
    entries = -(-size // block)
    bat_at = 1536
    pos = bat_at + -(-entries * 4 // 512) * 512
    locs = []
    loc_data = []
    for platform, name in locators:
        raw = name.encode("utf-16-le")
        locs.append(vhdfmt.Locator(platform, 512, len(raw), pos))
        loc_data.append((pos, raw))
        pos += -(-max(len(raw), 1) // 512) * 512
    bitmap = vhdfmt.bitmap_size(block)
    where = {}
    for index in sorted(blocks):
        where[index] = pos
        pos += bitmap + block
    footer = vhdfmt.Footer(vhdfmt.DIFFERENCING if parent else vhdfmt.DYNAMIC, size, (20, 16, 63),
                           uuid, data_offset=512, creator_app=b"win ", original_size=size)
    header = vhdfmt.DynamicHeader(bat_at, entries, block,
                                  parent_uuid=parent[0] if parent else bytes(16),
                                  parent_name=parent[1] if parent else "",
                                  locators=tuple(locs))
    out = bytearray(pos + 512)
    out[0:512] = footer.pack()
    out[512:1536] = header.pack()
    bat = [0xFFFFFFFF] * entries
    for index, at in where.items():
        bat[index] = at // 512
        out[at:at + bitmap] = b"\xff" * bitmap
        out[at + bitmap:at + bitmap + block] = blocks[index].ljust(block, b"\0")[:block]
    out[bat_at:bat_at + 4 * entries] = struct.pack(f">{entries}I", *bat)
    for at, raw in loc_data:
        out[at:at + len(raw)] = raw
    out[pos:pos + 512] = footer.pack()
    path.write_bytes(bytes(out))
    return V(path, footer, header, bat_at, where, [at for at, _ in loc_data], pos)


def set_vhd_footer(v: V, both: bool = True, raw: bytes | None = None, **fields) -> None:
    data = raw if raw is not None else replace(v.footer, **fields).pack()
    patch(v.path, v.end, data)
    if both:
        patch(v.path, 0, data)


def set_vhd_header(v: V, **fields) -> None:
    patch(v.path, 512, replace(v.header, **fields).pack())


def set_bat(v: V, index: int, sector: int) -> None:
    patch(v.path, v.bat + 4 * index, struct.pack(">I", sector))


def vhd_child(folder: Path, parent_uuid: bytes, name: str, platform: bytes = vhdfmt.W2RU,
              file: str = "disk.vhd", uuid: bytes | None = None) -> V:
    return vhd_image(folder / file, uuid=uuid, parent=(parent_uuid, Path(name).name),
                     locators=[(platform, name)], blocks={1: pattern(VHD_BLOCK, 3)})


# --- GOW ---------------------------------------------------------------------------------------

def gow_image(path: Path, *, version: int = 2, size: int = SIZE,
              blocks: dict[int, int] | None = None, slots: int = 2) -> gowfmt.Header:
    """A valid GOW image: block i -> slot (entry - 1); the data area holds `slots` slots."""
    h = gowfmt.Header(version, size, 1 if version == 3 else 0)
    blocks = {0: 1, 1: 2} if blocks is None else blocks
    with open(path, "wb") as f:
        f.write(h.pack())
        for index, entry in blocks.items():
            f.seek(gowfmt.HEADER_SIZE + 4 * index)
            f.write(struct.pack("<I", entry))
            if version == 3:
                f.seek(h.versions_offset + 4 * index)
                f.write(struct.pack("<I", 1))
        for slot in range(slots):
            f.seek(h.data_offset + slot * gowfmt.BLOCK_SIZE)
            f.write(pattern(gowfmt.BLOCK_SIZE, slot))
    return h


def _gow_header(path: Path, raw: bytes) -> None:
    """Patch the first 60 bytes and recompute the CRC, so only the field under test is bad."""
    raw = raw[:60]
    patch(path, 0, raw + zlib.crc32(raw).to_bytes(4, "little"))


# --- qemu formats ------------------------------------------------------------------------------

DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=7219abcd
parentCID={parent_cid}
createType="{create_type}"
{parent}
# Extent description
{extents}

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "2"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
"""


def descriptor(extents: list[str], create_type: str = "monolithicFlat",
               parent: str | None = None) -> str:
    return DESCRIPTOR.format(
        parent_cid="7219abcd" if parent else "ffffffff", create_type=create_type,
        parent=f'parentFileNameHint="{parent}"\n' if parent else "", extents="\n".join(extents))


def vmdk_text(folder: Path, extents: list[str], **options) -> Path:
    path = folder / "disk.vmdk"
    path.write_text(descriptor(extents, **options))
    return path


def flat(folder: Path, name: str = "disk-flat.vmdk", size: int = SIZE) -> str:
    (folder / name).write_bytes(pattern(size))
    return name


KDMV_CAPACITY, KDMV_DESC_OFFSET, KDMV_DESC_SIZE = 12, 28, 36


def kdmv(folder: Path, name: str = "disk.vmdk", size: int = SIZE) -> Path:
    """A monolithicSparse VMDK: a KDMV header with its descriptor embedded at sector 1."""
    path = folder / name
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse", str(path),
             str(size))
    return path


def embed(path: Path, text: str, capacity: int | None = None) -> None:
    head = path.read_bytes()[:512]
    offset, sectors = struct.unpack_from("<QQ", head, KDMV_DESC_OFFSET)
    raw = text.encode()
    assert offset and len(raw) < sectors * 512, (offset, sectors)
    patch(path, offset * 512, raw.ljust(sectors * 512, b"\0"))
    if capacity is not None:
        patch(path, KDMV_CAPACITY, struct.pack("<Q", capacity))


def qemu_create(path: Path, fmt: str, size: int = SIZE, backing: str | None = None,
                backing_fmt: str = "raw", options: str | None = None) -> Path:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    if options:
        args += ["-o", options]
    qemu_img(*args, "--", str(path), str(size))
    return path


# ===============================================================================================
# The kinds. Findings: "1" files named in qemu-read images, "2" checked by name and read later,
# "3" --format auto follows nothing, "4" /dev and /proc are never implicit, "13" bounded memory,
# time and errors, "14" data on metadata; "corrupt" for other malformed structures.
# ===============================================================================================

# --- raw backups holding a guest-written header (finding 3) -----------------------------------

@kind("raw")
def raw_holds_qcow2_backing_tripwire(folder: Path, outside: Path) -> Case:
    """The CVE-2008-2004 case: a guest wrote a qcow2 header naming a neighbour's disk."""
    q = qcow2_image(folder / "backup.img", backing=route("absolute", folder, outside))
    return Case(q.path, "auto", "raw backup whose bytes are a qcow2 naming the tripwire", "3")


@kind("raw")
def raw_holds_qcow2_backing_beside(folder: Path, outside: Path) -> Case:
    (folder / "neighbour.raw").write_bytes(pattern(SIZE))
    q = qcow2_image(folder / "backup.img", backing="neighbour.raw")
    return Case(q.path, "auto", "raw backup holding a qcow2 whose backing lies beside it", "3")


@kind("raw")
def raw_holds_qcow2_data_file(folder: Path, outside: Path) -> Case:
    q = qcow2_image(folder / "backup.img", data_file=route("absolute", folder, outside), data={})
    return Case(q.path, "auto", "raw backup holding a qcow2 with an external data file", "3")


@kind("raw")
def raw_holds_vhd_parent(folder: Path, outside: Path) -> Case:
    v = vhd_child(folder, TRIP_UUID, route("absolute", folder, outside, "tripwire.vhd"),
                  vhdfmt.W2KU, file="backup.img")
    return Case(v.path, "auto", "raw backup holding a differencing VHD naming a parent", "3")


@kind("raw")
def raw_holds_vmdk_descriptor(folder: Path, outside: Path) -> Case:
    path = folder / "backup.img"
    text = descriptor([f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0'])
    path.write_bytes(text.encode().ljust(SIZE, b"\0"))
    return Case(path, "auto", "raw backup starting with a VMDK descriptor naming an extent", "3")


@kind("raw")
def raw_holds_kdmv_embedded(folder: Path, outside: Path) -> Case:
    path = kdmv(folder, "backup.img")
    embed(path, descriptor([f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0']), 0)
    return Case(path, "auto", "raw backup holding a KDMV header with an embedded descriptor", "3")


@kind("raw")
def raw_holds_qed_backing(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "backup.img", "qed", backing=route("absolute", folder, outside))
    return Case(path, "auto", "raw backup holding a QED header naming a backing file", "3")


@kind("raw")
def raw_holds_qcow1_backing(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "backup.img", "qcow", backing=route("absolute", folder, outside))
    return Case(path, "auto", "raw backup holding a qcow (v1) header naming a backing file", "3")


@kind("raw")
def raw_source_is_fifo(folder: Path, outside: Path) -> Case:
    path = folder / "backup.img"
    os.mkfifo(path)
    return Case(path, "raw", "a FIFO named as the image: must not hang", "13")


@kind("raw")
def raw_source_is_directory(folder: Path, outside: Path) -> Case:
    (folder / "backup.img").mkdir()
    return Case(folder / "backup.img", "raw", "a directory named as the image", "13")


# --- qcow2 (native) ----------------------------------------------------------------------------

def _qcow2_backing_route(how: str):
    def make(folder: Path, outside: Path) -> Case:
        q = _q(folder, backing=route(how, folder, outside))
        return _qcase(q, f"backing file reached by {how}", "2" if "sym" in how else "4"
                      if how in ("dev", "proc_root") else "1")
    return make


for _how in ROUTES:
    kind("qcow2", f"qcow2_backing_{_how}")(_qcow2_backing_route(_how))


@kind("qcow2")
def qcow2_backing_proc_fd(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, backing=route("proc_fd", folder, outside)),
                  "backing file /proc/self/fd/3 (whatever the importer has open)", "4")


@kind("qcow2")
def qcow2_backing_dev_zero(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, backing=route("dev_zero", folder, outside)),
                  "backing file /dev/zero: endless", "4")


@kind("qcow2")
def qcow2_data_file_absolute(folder: Path, outside: Path) -> Case:
    q = _q(folder, data={}, data_file=route("absolute", folder, outside))
    return _qcase(q, "external data file outside the folder", "1")


@kind("qcow2")
def qcow2_data_file_symlink(folder: Path, outside: Path) -> Case:
    q = _q(folder, data={}, data_file=route("symlink", folder, outside))
    return _qcase(q, "external data file through a symlink", "2")


@kind("qcow2")
def qcow2_data_file_dotdot(folder: Path, outside: Path) -> Case:
    q = _q(folder, data={}, data_file=route("dotdot", folder, outside))
    return _qcase(q, "external data file through ..", "1")


@kind("qcow2")
def qcow2_backing_fifo(folder: Path, outside: Path) -> Case:
    os.mkfifo(folder / "pipe")
    return _qcase(_q(folder, backing="pipe"), "backing file is a FIFO: must not hang", "2")


@kind("qcow2")
def qcow2_backing_directory(folder: Path, outside: Path) -> Case:
    (folder / "dir").mkdir()
    return _qcase(_q(folder, backing="dir"), "backing file is a directory", "2")


@kind("qcow2")
def qcow2_backing_self(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, backing="disk.qcow2", backing_fmt="qcow2"),
                  "backing file is the image itself", "corrupt")


@kind("qcow2")
def qcow2_backing_loop_ab(folder: Path, outside: Path) -> Case:
    qcow2_image(folder / "b.qcow2", backing="disk.qcow2", backing_fmt="qcow2")
    return _qcase(_q(folder, backing="b.qcow2", backing_fmt="qcow2"),
                  "backing chain A -> B -> A", "corrupt")


@kind("qcow2")
def qcow2_backing_loop_hardlink(folder: Path, outside: Path) -> Case:
    q = _q(folder, backing="alias.qcow2", backing_fmt="qcow2")
    os.link(q.path, folder / "alias.qcow2")
    return _qcase(q, "backing file is the image itself under another name (a hard link)",
                  "corrupt")


@kind("qcow2")
def qcow2_backing_too_deep(folder: Path, outside: Path) -> Case:
    (folder / "base.raw").write_bytes(pattern(SIZE))
    below, fmt = "base.raw", "raw"
    for n in range(24):
        qcow2_image(folder / f"layer{n}.qcow2", backing=below, backing_fmt=fmt, data={})
        below, fmt = f"layer{n}.qcow2", "qcow2"
    return _qcase(_q(folder, backing=below, backing_fmt="qcow2"),
                  "a backing chain 25 deep", "13")


@kind("qcow2")
def qcow2_backing_missing(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, backing="gone.raw"), "backing file does not exist", "corrupt")


@kind("qcow2")
def qcow2_backing_vhd_parent_outside(folder: Path, outside: Path) -> Case:
    vhd_child(folder, TRIP_UUID, route("absolute", folder, outside, "tripwire.vhd"),
              vhdfmt.W2KU, file="mid.vhd")
    return _qcase(_q(folder, backing="mid.vhd", backing_fmt="vpc"),
                  "backing VHD beside it whose parent lies outside", "1")


@kind("qcow2")
def qcow2_backing_name_huge(folder: Path, outside: Path) -> Case:
    q = _q(folder, backing="x")
    set_header(q, backing_file_size=1 << 20)
    return _qcase(q, "backing file name of 1 MiB", "13")


@kind("qcow2")
def qcow2_backing_name_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder, backing="x")
    set_header(q, backing_file_offset=1 << 40, backing_file_size=64)
    return _qcase(q, "backing file name past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_backing_name_nul(folder: Path, outside: Path) -> Case:
    trip = route("absolute", folder, outside)
    return _qcase(_q(folder, backing="x\0" + trip), "backing name with a NUL byte", "corrupt")


@kind("qcow2")
def qcow2_auto_backing_beside(folder: Path, outside: Path) -> Case:
    (folder / "base.raw").write_bytes(pattern(SIZE))
    return _qcase(_q(folder, backing="base.raw"),
                  "--format auto: a qcow2 naming a backing file beside it", "3", "auto")


@kind("qcow2")
def qcow2_auto_data_file_beside(folder: Path, outside: Path) -> Case:
    (folder / "data.raw").write_bytes(pattern(SIZE))
    return _qcase(_q(folder, data={}, data_file="data.raw"),
                  "--format auto: a qcow2 naming a data file beside it", "3", "auto")


@kind("qcow2")
def qcow2_truncated_header(folder: Path, outside: Path) -> Case:
    path = folder / "disk.qcow2"
    path.write_bytes(_q(folder).path.read_bytes()[:48])
    return Case(path, "qcow2", "file ends inside the v2 header", "corrupt")


@kind("qcow2")
def qcow2_truncated_v3_header(folder: Path, outside: Path) -> Case:
    path = folder / "disk.qcow2"
    path.write_bytes(_q(folder).path.read_bytes()[:90])
    return Case(path, "qcow2", "file ends inside the v3 fields", "corrupt")


@kind("qcow2")
def qcow2_truncated_in_l1(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    os.truncate(q.path, q.l1 + 4)
    return _qcase(q, "file ends inside the L1 table", "corrupt")


@kind("qcow2")
def qcow2_truncated_in_l2(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    os.truncate(q.path, q.l2[0] + 100)
    return _qcase(q, "file ends inside an L2 table", "corrupt")


@kind("qcow2")
def qcow2_truncated_in_data(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    os.truncate(q.path, q.data[1] + 100)
    return _qcase(q, "file ends inside a data cluster", "corrupt")


@kind("qcow2")
def qcow2_bad_version(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    patch(q.path, 4, struct.pack(">I", 4))
    return _qcase(q, "version 4", "corrupt")


@kind("qcow2")
def qcow2_cluster_bits_small(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, cluster_bits=8)
    return _qcase(q, "cluster_bits 8", "corrupt")


@kind("qcow2")
def qcow2_cluster_bits_huge(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, cluster_bits=40)
    return _qcase(q, "cluster_bits 40 (a 1 TiB cluster)", "13")


@kind("qcow2")
def qcow2_header_length_bad(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, header_length=105)
    return _qcase(q, "header_length not a multiple of 8", "corrupt")


@kind("qcow2")
def qcow2_header_length_huge(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    patch(q.path, 100, struct.pack(">I", 1 << 30))
    return _qcase(q, "header_length of 1 GiB", "13")


@kind("qcow2")
def qcow2_virtual_size_over_limit(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, size=1 << 60, l1_size=1 << 20)
    return _qcase(q, "virtual size 1 EiB", "13")


@kind("qcow2")
def qcow2_l1_too_small(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, size=1 << 40)
    return _qcase(q, "L1 table too small for the virtual size", "corrupt")


@kind("qcow2")
def qcow2_l1_huge(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, size=1 << 46, l1_size=1 << 27)
    return _qcase(q, "L1 table of 1 GiB, within the virtual-size limit", "13")


@kind("qcow2")
def qcow2_l1_huge_sparse(folder: Path, outside: Path) -> Case:
    """What finding 13 measured: an L1 at the policy's size, present in a sparse file."""
    q = _q(folder)
    set_header(q, size=1 << 45, l1_size=1 << 26)
    os.truncate(q.path, q.l1 + (8 << 26))
    return _qcase(q, "L1 table of 512 MiB held in a sparse file", "13")


@kind("qcow2")
def qcow2_l1_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, l1_table_offset=1 << 40)
    return _qcase(q, "L1 table past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_l1_unaligned(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, l1_table_offset=q.l1 + 8)
    return _qcase(q, "L1 table offset not cluster-aligned", "corrupt")


@kind("qcow2")
def qcow2_l1_on_header(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, l1_table_offset=0)
    return _qcase(q, "L1 table placed on the header", "14")


@kind("qcow2")
def qcow2_l1_on_refcount_table(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, l1_table_offset=q.rt)
    return _qcase(q, "L1 table placed on the refcount table", "14")


@kind("qcow2")
def qcow2_refcount_table_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, refcount_table_offset=1 << 40)
    return _qcase(q, "refcount table past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_refcount_table_huge(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, refcount_table_clusters=1 << 24)
    return _qcase(q, "refcount table of 1 TiB", "13")


@kind("qcow2")
def qcow2_refcount_table_on_header(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, refcount_table_offset=0)
    return _qcase(q, "refcount table placed on the header", "14")


@kind("qcow2")
def qcow2_refcount_order_bad(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, refcount_order=7)
    return _qcase(q, "refcount_order 7", "corrupt")


@kind("qcow2")
def qcow2_l1_entry_reserved_bits(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, q.l2[0] | qfmt.OFLAG_COPIED | 1 << 58)
    return _qcase(q, "L1 entry with reserved bits set", "corrupt")


@kind("qcow2")
def qcow2_l1_entry_unaligned(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, (q.l2[0] + 512) | qfmt.OFLAG_COPIED)
    return _qcase(q, "L1 entry pointing between clusters", "corrupt")


@kind("qcow2")
def qcow2_l2_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, (1 << 40) | qfmt.OFLAG_COPIED)
    return _qcase(q, "L2 table past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_l2_on_l1(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, q.l1 | qfmt.OFLAG_COPIED)
    return _qcase(q, "L2 table placed on the L1 table", "14")


@kind("qcow2")
def qcow2_l2_on_refcount_table(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, q.rt | qfmt.OFLAG_COPIED)
    return _qcase(q, "L2 table placed on the refcount table", "14")


@kind("qcow2")
def qcow2_l2_on_refcount_block(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l1(q, 0, q.rb | qfmt.OFLAG_COPIED)
    return _qcase(q, "L2 table placed on a refcount block", "14")


@kind("qcow2")
def qcow2_l2_shared(folder: Path, outside: Path) -> Case:
    q = _q(folder, cb=9, size=SIZE, data={0: pattern(512), 64: pattern(512, 5)})
    set_l1(q, 1, q.l2[0] | qfmt.OFLAG_COPIED)
    return _qcase(q, "two L1 entries map one L2 table", "14")


@kind("qcow2")
def qcow2_data_on_l1(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, q.l1 | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster placed on the L1 table", "14")


@kind("qcow2")
def qcow2_data_on_l2(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, q.l2[0] | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster placed on its own L2 table", "14")


@kind("qcow2")
def qcow2_data_on_refcount_table(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, q.rt | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster placed on the refcount table", "14")


@kind("qcow2")
def qcow2_data_on_refcount_block(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, q.rb | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster placed on a refcount block", "14")


@kind("qcow2")
def qcow2_compressed_on_header(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    bits = 62 - (16 - 8)
    set_l2(q, 0, qfmt.OFLAG_COMPRESSED | 3 << bits | 0x10)
    return _qcase(q, "a compressed cluster read from the header", "14")


@kind("qcow2")
def qcow2_data_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, (1 << 40) | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_data_unaligned(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, (q.data[0] + 512) | qfmt.OFLAG_COPIED)
    return _qcase(q, "a data cluster between clusters", "corrupt")


@kind("qcow2")
def qcow2_l2_reserved_bits(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_l2(q, 0, q.data[0] | qfmt.OFLAG_COPIED | 1 << 57)
    return _qcase(q, "L2 entry with reserved bits set", "corrupt")


@kind("qcow2")
def qcow2_subclusters_alloc_and_zero(folder: Path, outside: Path) -> Case:
    q = _q(folder, incompat=qfmt.INCOMPAT_EXTENDED_L2, data={})
    table = q.end  # one extended L2 table appended: (offset 0, bitmap) pairs
    with open(q.path, "r+b") as f:
        f.seek(table)
        f.write(struct.pack(">QQ", 0, 1 | 1 << 32).ljust(q.cs, b"\0"))
    set_l1(q, 0, table | qfmt.OFLAG_COPIED)
    return _qcase(q, "extended L2: a subcluster both allocated and zero", "corrupt")


@kind("qcow2")
def qcow2_corrupt_flag(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, incompatible_features=qfmt.INCOMPAT_CORRUPT)
    return _qcase(q, "marked corrupt", "corrupt")


@kind("qcow2")
def qcow2_unknown_incompatible(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, incompatible_features=1 << 40)
    return _qcase(q, "an unknown incompatible feature", "corrupt")


@kind("qcow2")
def qcow2_encrypted(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    set_header(q, crypt_method=1)
    return _qcase(q, "AES-encrypted", "corrupt")


@kind("qcow2")
def qcow2_compression_type_unknown(folder: Path, outside: Path) -> Case:
    q = _q(folder, compression=7)
    return _qcase(q, "unknown compression type", "corrupt")


@kind("qcow2")
def qcow2_extension_overrun(folder: Path, outside: Path) -> Case:
    q = _q(folder)
    patch(q.path, 112, qfmt.EXTENSION.pack(qfmt.EXT_FEATURE_NAMES, 1 << 30))
    return _qcase(q, "a header extension claiming 1 GiB", "13")


@kind("qcow2")
def qcow2_extension_into_backing_name(folder: Path, outside: Path) -> Case:
    """The backing file name starts inside the backing-format extension's payload."""
    q = _q(folder, backing="base.raw")
    set_header(q, backing_file_offset=120)
    patch(q.path, 120, b"base.raw")
    return _qcase(q, "header extensions run into the backing file name", "corrupt")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, qfmt.DEFLATE_WBITS)
    return c.compress(data) + c.flush()


@kind("qcow2")
def qcow2_deflate_bomb(folder: Path, outside: Path) -> Case:
    """One compressed cluster whose stream inflates to 64 MiB (a cluster is 64 KiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, qfmt.DEFLATE_WBITS)
    chunk = bytes(1 << 20)
    stream = b"".join(c.compress(chunk) for _ in range(64)) + c.flush()
    return _qcase(_q(folder, data={}, compressed={0: stream}),
                  "deflate cluster that inflates to 1024 clusters", "13")


@kind("qcow2")
def qcow2_zstd_bomb(folder: Path, outside: Path) -> Case:
    import zstandard

    stream = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    return _qcase(_q(folder, data={}, compressed={0: stream}, compression=qfmt.COMPRESSION_ZSTD),
                  "zstd cluster that decompresses to 1024 clusters", "13")


@kind("qcow2")
def qcow2_zstd_claims_huge(folder: Path, outside: Path) -> Case:
    """A zstd frame whose header claims 1 TiB of content and holds a few bytes."""
    import zstandard

    stream = bytearray(zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100))
    # Frame header descriptor: content-size flag 3 (8 bytes), single segment.
    stream[4] = 0xE0 | (stream[4] & 0x1F)
    stream[5:5] = struct.pack("<Q", 1 << 40)
    return _qcase(_q(folder, data={}, compressed={0: bytes(stream)},
                     compression=qfmt.COMPRESSION_ZSTD),
                  "zstd frame claiming 1 TiB of content", "13")


@kind("qcow2")
def qcow2_deflate_corrupt(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, data={}, compressed={0: b"\xff" * 4000}),
                  "compressed cluster that is not deflate", "corrupt")


@kind("qcow2")
def qcow2_deflate_short(folder: Path, outside: Path) -> Case:
    return _qcase(_q(folder, data={}, compressed={0: _deflate(b"short")}),
                  "compressed cluster inflating to less than a cluster", "corrupt")


@kind("qcow2")
def qcow2_compressed_past_eof(folder: Path, outside: Path) -> Case:
    q = _q(folder, data={}, compressed={0: _deflate(bytes(65536))})
    bits = 62 - (16 - 8)
    set_l2(q, 0, qfmt.OFLAG_COMPRESSED | 3 << bits | 1 << 40)
    return _qcase(q, "compressed cluster past the end of the file", "corrupt")


@kind("qcow2")
def qcow2_format_mismatch(folder: Path, outside: Path) -> Case:
    path = folder / "disk.vhd"
    vhd_image(path)
    return Case(path, "qcow2", "--format qcow2 given a VHD", "corrupt")


# --- VHD (native) ------------------------------------------------------------------------------

def _vhd_parent_route(how: str):
    def make(folder: Path, outside: Path) -> Case:
        name = route(how, folder, outside, "tripwire.vhd")
        platform = vhdfmt.W2KU if os.path.isabs(name) else vhdfmt.W2RU
        v = vhd_child(folder, TRIP_UUID, name, platform)
        return Case(v.path, "vhd", f"parent reached by {how}",
                    "2" if "sym" in how else "4" if how in ("dev", "proc_root") else "1")
    return make


for _how in ("absolute", "dotdot", "symlink", "symlinked_dir", "dev", "proc_root", "dash"):
    kind("vhd", f"vhd_parent_{_how}")(_vhd_parent_route(_how))


@kind("vhd")
def vhd_parent_name_symlink(folder: Path, outside: Path) -> Case:
    """No locator: the parent's bare name in the header, a symlink beside the child."""
    plant(outside)
    (folder / "base.vhd").symlink_to(outside / "tripwire.vhd")
    v = vhd_image(folder / "disk.vhd", parent=(TRIP_UUID, "base.vhd"), locators=[])
    return Case(v.path, "vhd", "parent found by its header name: a symlink beside it", "2")


@kind("vhd")
def vhd_parent_fifo(folder: Path, outside: Path) -> Case:
    os.mkfifo(folder / "pipe.vhd")
    return Case(vhd_child(folder, TRIP_UUID, "pipe.vhd").path, "vhd",
                "parent is a FIFO: must not hang", "2")


@kind("vhd")
def vhd_parent_self(folder: Path, outside: Path) -> Case:
    me = os.urandom(16)
    v = vhd_child(folder, me, "disk.vhd", uuid=me)
    return Case(v.path, "vhd", "parent is the image itself", "corrupt")


@kind("vhd")
def vhd_parent_loop_ab(folder: Path, outside: Path) -> Case:
    a, b = os.urandom(16), os.urandom(16)
    vhd_child(folder, a, "disk.vhd", file="b.vhd", uuid=b)
    v = vhd_child(folder, b, "b.vhd", uuid=a)
    return Case(v.path, "vhd", "parent chain A -> B -> A", "corrupt")


@kind("vhd")
def vhd_parent_too_deep(folder: Path, outside: Path) -> Case:
    ids = [os.urandom(16) for _ in range(26)]
    vhd_image(folder / "l0.vhd", uuid=ids[0])
    for n in range(1, 25):
        vhd_child(folder, ids[n - 1], f"l{n - 1}.vhd", file=f"l{n}.vhd", uuid=ids[n])
    v = vhd_child(folder, ids[24], "l24.vhd")
    return Case(v.path, "vhd", "a differencing chain 25 deep", "13")


@kind("vhd")
def vhd_parent_missing(folder: Path, outside: Path) -> Case:
    return Case(vhd_child(folder, TRIP_UUID, "gone.vhd").path, "vhd", "parent does not exist",
                "corrupt")


@kind("vhd")
def vhd_parent_uuid_mismatch(folder: Path, outside: Path) -> Case:
    vhd_image(folder / "base.vhd")
    return Case(vhd_child(folder, os.urandom(16), "base.vhd").path, "vhd",
                "parent beside it has another UUID", "corrupt")


@kind("vhd")
def vhd_auto_parent_beside(folder: Path, outside: Path) -> Case:
    base = vhd_image(folder / "base.vhd")
    return Case(vhd_child(folder, base.footer.uuid, "base.vhd").path, "auto",
                "--format auto: a differencing VHD whose parent lies beside it", "3")


@kind("vhd")
def vhd_locator_huge(folder: Path, outside: Path) -> Case:
    v = vhd_child(folder, TRIP_UUID, "x.vhd")
    loc = v.header.locators[0]
    set_vhd_header(v, locators=(replace(loc, data_length=1 << 31),))
    return Case(v.path, "vhd", "parent locator of 2 GiB", "13")


@kind("vhd")
def vhd_locator_past_eof(folder: Path, outside: Path) -> Case:
    v = vhd_child(folder, TRIP_UUID, "x.vhd")
    loc = v.header.locators[0]
    set_vhd_header(v, locators=(replace(loc, data_offset=1 << 40),))
    return Case(v.path, "vhd", "parent locator past the end of the file", "corrupt")


@kind("vhd")
def vhd_locator_not_utf16(folder: Path, outside: Path) -> Case:
    v = vhd_child(folder, TRIP_UUID, "x.vhd")
    patch(v.path, v.locators[0], b"\x00\xd8\x41\x00")  # a lone surrogate
    return Case(v.path, "vhd", "parent locator that is not UTF-16", "corrupt")


@kind("vhd")
def vhd_truncated_footer(folder: Path, outside: Path) -> Case:
    path = folder / "disk.vhd"
    path.write_bytes(vhd_image(path).footer.pack()[:300])
    return Case(path, "vhd", "a file of 300 bytes holding part of a footer", "corrupt")


@kind("vhd")
def vhd_truncated_in_header(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    os.truncate(v.path, 1000)
    return Case(v.path, "vhd", "file ends inside the dynamic header (footer copy intact)",
                "corrupt")


@kind("vhd")
def vhd_truncated_in_bat(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    os.truncate(v.path, v.bat + 20)
    return Case(v.path, "vhd", "file ends inside the BAT", "corrupt")


@kind("vhd")
def vhd_truncated_in_block(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    os.truncate(v.path, v.blocks[0] + 1000)
    return Case(v.path, "vhd", "file ends inside a data block", "corrupt")


@kind("vhd")
def vhd_footer_checksum(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    raw = bytearray(v.footer.pack())
    raw[64] ^= 0xFF
    set_vhd_footer(v, raw=bytes(raw))
    return Case(v.path, "vhd", "both footers with a bad checksum", "corrupt")


@kind("vhd")
def vhd_footer_version(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, version=0x00020000)
    return Case(v.path, "vhd", "footer version 2.0", "corrupt")


@kind("vhd")
def vhd_disk_type_unknown(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, disk_type=5)
    return Case(v.path, "vhd", "disk type 5", "corrupt")


@kind("vhd")
def vhd_fixed_truncated(folder: Path, outside: Path) -> Case:
    path = folder / "disk.vhd"
    footer = vhdfmt.Footer(vhdfmt.FIXED, 1 << 30, (2080, 16, 63), os.urandom(16),
                           creator_app=b"win ")
    path.write_bytes(pattern(SIZE) + footer.pack())
    return Case(path, "vhd", "fixed disk claiming 1 GiB in a 1 MiB file", "corrupt")


@kind("vhd")
def vhd_size_over_limit(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, current_size=1 << 60)
    return Case(v.path, "vhd", "virtual size 1 EiB", "13")


@kind("vhd")
def vhd_size_not_sectors(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, current_size=SIZE - 100)
    return Case(v.path, "vhd", "virtual size not a whole number of sectors", "corrupt")


@kind("vhd")
def vhd_header_past_eof(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, data_offset=1 << 40)
    return Case(v.path, "vhd", "dynamic header past the end of the file", "corrupt")


@kind("vhd")
def vhd_header_cookie(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    patch(v.path, 512, b"cxsparsX")
    return Case(v.path, "vhd", "dynamic header with a bad cookie", "corrupt")


@kind("vhd")
def vhd_header_checksum(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    patch(v.path, 512 + 36, b"\0\0\0\1")
    return Case(v.path, "vhd", "dynamic header with a bad checksum", "corrupt")


@kind("vhd")
def vhd_block_size_not_power(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_header(v, block_size=3 << 16)
    return Case(v.path, "vhd", "block size not a power of two", "corrupt")


@kind("vhd")
def vhd_block_size_huge(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_header(v, block_size=1 << 31)
    return Case(v.path, "vhd", "block size 2 GiB", "13")


@kind("vhd")
def vhd_block_size_zero(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_header(v, block_size=0)
    return Case(v.path, "vhd", "block size 0", "corrupt")


@kind("vhd")
def vhd_bat_too_small(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_header(v, max_table_entries=2)
    return Case(v.path, "vhd", "BAT smaller than the disk", "corrupt")


@kind("vhd")
def vhd_bat_huge(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_footer(v, current_size=1 << 45)
    set_vhd_header(v, max_table_entries=1 << 29)
    return Case(v.path, "vhd", "BAT of 2 GiB", "13")


@kind("vhd")
def vhd_bat_past_eof(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_vhd_header(v, table_offset=1 << 40)
    return Case(v.path, "vhd", "BAT past the end of the file", "corrupt")


@kind("vhd")
def vhd_bat_on_header(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd", blocks={})
    set_vhd_header(v, table_offset=512)
    return Case(v.path, "vhd", "BAT placed on the dynamic header", "14")


@kind("vhd")
def vhd_block_past_eof(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_bat(v, 0, 1 << 30)
    return Case(v.path, "vhd", "data block past the end of the file", "corrupt")


@kind("vhd")
def vhd_block_on_footer_copy(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_bat(v, 0, 0)
    return Case(v.path, "vhd", "data block placed on the footer copy", "14")


@kind("vhd")
def vhd_block_on_header(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_bat(v, 0, 1)
    return Case(v.path, "vhd", "data block placed on the dynamic header", "14")


@kind("vhd")
def vhd_block_on_bat(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_bat(v, 0, v.bat // 512)
    return Case(v.path, "vhd", "data block placed on the BAT", "14")


@kind("vhd")
def vhd_block_on_footer(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd")
    set_bat(v, 0, (v.end - 1024) // 512)
    return Case(v.path, "vhd", "data block running into the footer", "14")


@kind("vhd")
def vhd_block_on_locator(folder: Path, outside: Path) -> Case:
    base = vhd_image(folder / "base.vhd")
    v = vhd_child(folder, base.footer.uuid, "base.vhd")
    set_bat(v, 1, v.locators[0] // 512)
    return Case(v.path, "vhd", "data block placed on the parent locator", "14")


@kind("vhd")
def vhd_blocks_overlap(folder: Path, outside: Path) -> Case:
    v = vhd_image(folder / "disk.vhd", blocks={0: pattern(VHD_BLOCK), 1: pattern(VHD_BLOCK, 9)})
    set_bat(v, 1, v.blocks[0] // 512 + 4)
    return Case(v.path, "vhd", "two data blocks overlap", "14")


# --- GOW (native) ------------------------------------------------------------------------------

def _g(folder: Path, **options) -> tuple[Path, gowfmt.Header]:
    path = folder / "disk.gow"
    return path, gow_image(path, **options)


@kind("gow")
def gow_truncated_header(folder: Path, outside: Path) -> Case:
    path, _ = _g(folder)
    os.truncate(path, 40)
    return Case(path, "gow", "file ends inside the header", "corrupt")


@kind("gow")
def gow_bad_crc(folder: Path, outside: Path) -> Case:
    path, _ = _g(folder)
    patch(path, 60, b"\0\0\0\0")
    return Case(path, "gow", "header checksum mismatch", "corrupt")


@kind("gow")
def gow_bad_version(folder: Path, outside: Path) -> Case:
    path, h = _g(folder)
    _gow_header(path, h.pack()[:8] + struct.pack("<I", 4) + h.pack()[12:])
    return Case(path, "gow", "version 4", "corrupt")


@kind("gow")
def gow_bad_block_size(folder: Path, outside: Path) -> Case:
    path, h = _g(folder)
    _gow_header(path, h.pack()[:12] + struct.pack("<I", 1 << 30) + h.pack()[16:])
    return Case(path, "gow", "block size 1 GiB", "13")


@kind("gow")
def gow_bad_entries(folder: Path, outside: Path) -> Case:
    path, h = _g(folder)
    _gow_header(path, h.pack()[:24] + struct.pack("<I", 1 << 30) + h.pack()[28:])
    return Case(path, "gow", "map entry count 2^30", "13")


@kind("gow")
def gow_size_over_version(folder: Path, outside: Path) -> Case:
    path, h = _g(folder, version=1)
    _gow_header(path, h.pack()[:16] + struct.pack("<Q", 1 << 40) + h.pack()[24:])
    return Case(path, "gow", "GOW v1 claiming 1 TiB", "13")


@kind("gow")
def gow_v3_session_zero(folder: Path, outside: Path) -> Case:
    path, h = _g(folder, version=3)
    _gow_header(path, replace(h, session=0).pack())
    return Case(path, "gow", "v3 with session 0", "corrupt")


@kind("gow")
def gow_v2_session_set(folder: Path, outside: Path) -> Case:
    path, h = _g(folder, version=2)
    _gow_header(path, replace(h, session=5).pack())
    return Case(path, "gow", "v2 with a session", "corrupt")


@kind("gow")
def gow_truncated_map(folder: Path, outside: Path) -> Case:
    path, _ = _g(folder, version=2)
    os.truncate(path, 4096)
    return Case(path, "gow", "file ends inside the map", "corrupt")


@kind("gow")
def gow_block_past_eof(folder: Path, outside: Path) -> Case:
    path, _ = _g(folder, blocks={0: 1, 1: 1 << 20})
    return Case(path, "gow", "a block mapped past the end of the file", "corrupt")


@kind("gow")
def gow_truncated_last_slot(folder: Path, outside: Path) -> Case:
    path, h = _g(folder)
    os.truncate(path, h.data_offset + gowfmt.BLOCK_SIZE + 1000)
    return Case(path, "gow", "file ends inside the last data slot", "corrupt")


@kind("gow")
def gow_blocks_share_slot(folder: Path, outside: Path) -> Case:
    path, _ = _g(folder, blocks={0: 1, 1: 1, 2: 1})
    return Case(path, "gow", "three blocks share one data slot", "14")


@kind("gow")
def gow_v3_version_newer(folder: Path, outside: Path) -> Case:
    path, h = _g(folder, version=3)
    patch(path, h.versions_offset, struct.pack("<I", 99))
    return Case(path, "gow", "a block version newer than the session", "corrupt")


@kind("gow")
def gow_v1_truncated_data(folder: Path, outside: Path) -> Case:
    path, h = _g(folder, version=1)
    os.truncate(path, h.data_offset + 100)
    return Case(path, "gow", "v1 whose data area ends after 100 bytes", "corrupt")


# --- VMDK: text descriptors (finding 1) --------------------------------------------------------

def _vmdk_extent_route(how: str, sectors: str = "2048", kind_: str = "FLAT", access: str = "RW"):
    def make(folder: Path, outside: Path) -> Case:
        name = route(how, folder, outside)
        path = vmdk_text(folder, [f'{access} {sectors} {kind_} "{name}" 0'])
        return Case(path, "qemu", f"{access} {kind_} extent reached by {how}",
                    "2" if "sym" in how else "4" if how in ("dev", "proc_root") else "1")
    return make


for _how in ROUTES:
    kind("vmdk-text", f"vmdk_text_extent_{_how}")(_vmdk_extent_route(_how))
kind("vmdk-text", "vmdk_text_extent_plus_sectors")(_vmdk_extent_route("absolute", "+2048"))
kind("vmdk-text", "vmdk_text_extent_plus_sectors_dotdot")(_vmdk_extent_route("dotdot", "+8"))
kind("vmdk-text", "vmdk_text_extent_rdonly")(_vmdk_extent_route("absolute", access="RDONLY"))
kind("vmdk-text", "vmdk_text_extent_vmfs")(_vmdk_extent_route("absolute", kind_="VMFS"))
kind("vmdk-text", "vmdk_text_extent_tabs")(_vmdk_extent_route("absolute", sectors="\t2048\t"))


@kind("vmdk-text")
def vmdk_text_second_extent_outside(folder: Path, outside: Path) -> Case:
    path = vmdk_text(folder, ['RW 2048 FLAT "' + flat(folder) + '" 0',
                              f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0'])
    return Case(path, "qemu", "a good extent, then one outside", "1")


@kind("vmdk-text")
def vmdk_text_zero_then_outside(folder: Path, outside: Path) -> Case:
    path = vmdk_text(folder, ["RW 2048 ZERO",
                              f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0'])
    return Case(path, "qemu", "a ZERO extent, then one outside", "1")


@kind("vmdk-text")
def vmdk_text_extent_after_64k(folder: Path, outside: Path) -> Case:
    path = folder / "disk.vmdk"
    text = descriptor([f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0'])
    head, tail = text.split("# Extent description")
    path.write_text(head + "#" * 80 + "\n" + ("# padding\n" * 8000) + "# Extent description"
                    + tail)
    return Case(path, "qemu", "an extent line past the first 64 KiB of the descriptor", "1")


@kind("vmdk-text")
def vmdk_text_parent_outside(folder: Path, outside: Path) -> Case:
    plant(outside)
    parent = kdmv(outside, "parent.vmdk")
    path = vmdk_text(folder, ['RW 2048 FLAT "' + flat(folder) + '" 0'],
                     parent=str(parent))
    return Case(path, "qemu", "parentFileNameHint naming a VMDK outside", "1")


@kind("vmdk-text")
def vmdk_text_extent_fifo(folder: Path, outside: Path) -> Case:
    os.mkfifo(folder / "pipe")
    return Case(vmdk_text(folder, ['RW 2048 FLAT "pipe" 0']), "qemu",
                "extent is a FIFO: must not hang", "2")


@kind("vmdk-text")
def vmdk_text_extent_dev_zero(folder: Path, outside: Path) -> Case:
    return Case(vmdk_text(folder, ['RW 2048 FLAT "/dev/zero" 0']), "qemu",
                "extent is /dev/zero", "4")


@kind("vmdk-text")
def vmdk_text_extent_missing(folder: Path, outside: Path) -> Case:
    return Case(vmdk_text(folder, ['RW 2048 FLAT "gone.vmdk" 0']), "qemu",
                "extent does not exist", "corrupt")


@kind("vmdk-text")
def vmdk_text_self_sparse(folder: Path, outside: Path) -> Case:
    return Case(vmdk_text(folder, ['RW 2048 SPARSE "disk.vmdk"']), "qemu",
                "a sparse extent that is the descriptor itself", "corrupt")


@kind("vmdk-text")
def vmdk_text_size_over_limit(folder: Path, outside: Path) -> Case:
    return Case(vmdk_text(folder, [f'RW {1 << 48} FLAT "{flat(folder)}" 0']), "qemu",
                "a flat extent of 2^48 sectors", "13")


@kind("vmdk-text")
def vmdk_text_auto_extent_beside(folder: Path, outside: Path) -> Case:
    return Case(vmdk_text(folder, ['RW 2048 FLAT "' + flat(folder) + '" 0']), "auto",
                "--format auto: a descriptor naming an extent beside it", "3")


# --- VMDK: binary sparse with an embedded descriptor (finding 1) -------------------------------

def _kdmv_route(how: str, sectors: str = "2048", capacity: int | None = 0):
    def make(folder: Path, outside: Path) -> Case:
        path = kdmv(folder)
        embed(path, descriptor([f'RW {sectors} FLAT "{route(how, folder, outside)}" 0']),
              capacity)
        return Case(path, "qemu", f"KDMV, capacity {capacity}, embedded descriptor naming an "
                                  f"extent by {how}", "2" if "sym" in how else "1")
    return make


for _how in ("absolute", "dotdot", "symlink", "symlinked_dir", "proc_root", "json"):
    kind("vmdk-binary", f"vmdk_kdmv_embedded_{_how}")(_kdmv_route(_how))
kind("vmdk-binary", "vmdk_kdmv_embedded_plus_sectors")(_kdmv_route("absolute", "+2048"))


@kind("vmdk-binary")
def vmdk_kdmv_parent_outside(folder: Path, outside: Path) -> Case:
    plant(outside)
    parent = kdmv(outside, "parent.vmdk")
    path = kdmv(folder)
    text = descriptor(['RW 2048 SPARSE "disk.vmdk"'], create_type="monolithicSparse",
                      parent=str(parent))
    embed(path, text)
    return Case(path, "qemu", "sparse VMDK whose embedded descriptor names a parent outside", "1")


@kind("vmdk-binary")
def vmdk_kdmv_auto_embedded_beside(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    embed(path, descriptor([f'RW 2048 FLAT "{flat(folder)}" 0']), 0)
    return Case(path, "auto", "--format auto: KDMV embedding a descriptor naming a file beside",
                "3")


@kind("vmdk-binary")
def vmdk_kdmv_truncated(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    os.truncate(path, 100)
    return Case(path, "qemu", "KDMV header cut at 100 bytes", "corrupt")


@kind("vmdk-binary")
def vmdk_kdmv_capacity_huge(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    patch(path, KDMV_CAPACITY, struct.pack("<Q", 1 << 50))
    return Case(path, "qemu", "KDMV capacity 2^50 sectors", "13")


@kind("vmdk-binary")
def vmdk_kdmv_bad_version(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    patch(path, 4, struct.pack("<I", 99))
    return Case(path, "qemu", "KDMV version 99", "corrupt")


@kind("vmdk-binary")
def vmdk_kdmv_grain_table_huge(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    patch(path, 44, struct.pack("<I", 1 << 30))
    return Case(path, "qemu", "KDMV grain tables of 2^30 entries", "13")


@kind("vmdk-binary")
def vmdk_kdmv_grain_size_zero(folder: Path, outside: Path) -> Case:
    path = kdmv(folder)
    patch(path, 20, struct.pack("<Q", 0))
    return Case(path, "qemu", "KDMV grain size 0", "corrupt")


# --- VMDK: split, one extent escaping ----------------------------------------------------------

def _split_route(how: str):
    def make(folder: Path, outside: Path) -> Case:
        first = flat(folder, "disk-s001.vmdk", SIZE // 2)
        path = vmdk_text(folder, [f'RW 1024 FLAT "{first}" 0',
                                  f'RW 1024 FLAT "{route(how, folder, outside)}" 0'],
                         create_type="twoGbMaxExtentFlat")
        return Case(path, "qemu", f"split flat VMDK whose second extent is reached by {how}",
                    "2" if "sym" in how else "1")
    return make


for _how in ("absolute", "dotdot", "symlink", "symlinked_dir"):
    kind("vmdk-split", f"vmdk_split_{_how}")(_split_route(_how))


@kind("vmdk-split")
def vmdk_split_sparse_outside(folder: Path, outside: Path) -> Case:
    plant(outside)
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
             str(folder / "disk.vmdk"), "3G")
    path = folder / "disk.vmdk"
    second = folder / "disk-s002.vmdk"
    second.rename(outside / "disk-s002.vmdk")
    text = path.read_text().replace('"disk-s002.vmdk"', f'"{outside / "disk-s002.vmdk"}"')
    path.write_text(text)
    return Case(path, "qemu", "split sparse VMDK whose second extent lies outside", "1")


@kind("vmdk-split")
def vmdk_split_auto(folder: Path, outside: Path) -> Case:
    first = flat(folder, "disk-s001.vmdk", SIZE // 2)
    second = flat(folder, "disk-s002.vmdk", SIZE // 2)
    path = vmdk_text(folder, [f'RW 1024 FLAT "{first}" 0', f'RW 1024 FLAT "{second}" 0'],
                     create_type="twoGbMaxExtentFlat")
    return Case(path, "auto", "--format auto: a split VMDK whose extents lie beside it", "3")


@kind("vmdk-split")
def vmdk_split_second_fifo(folder: Path, outside: Path) -> Case:
    first = flat(folder, "disk-s001.vmdk", SIZE // 2)
    os.mkfifo(folder / "disk-s002.vmdk")
    path = vmdk_text(folder, [f'RW 1024 FLAT "{first}" 0', 'RW 1024 FLAT "disk-s002.vmdk" 0'],
                     create_type="twoGbMaxExtentFlat")
    return Case(path, "qemu", "split VMDK whose second extent is a FIFO", "2")


# --- QED -----------------------------------------------------------------------------------------

def _qed_route(how: str):
    def make(folder: Path, outside: Path) -> Case:
        path = qemu_create(folder / "disk.qed", "qed", backing=route(how, folder, outside))
        return Case(path, "qemu", f"QED whose backing file is reached by {how}",
                    "2" if "sym" in how else "4" if how in ("dev", "proc_root") else "1")
    return make


for _how in ROUTES:
    kind("qed", f"qed_backing_{_how}")(_qed_route(_how))


@kind("qed")
def qed_backing_self(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qed", "qed", backing="disk.qed", backing_fmt="qed")
    return Case(path, "qemu", "QED backing file is itself", "corrupt")


@kind("qed")
def qed_backing_loop_ab(folder: Path, outside: Path) -> Case:
    qemu_create(folder / "b.qed", "qed", backing="disk.qed", backing_fmt="qed")
    path = qemu_create(folder / "disk.qed", "qed", backing="b.qed", backing_fmt="qed")
    return Case(path, "qemu", "QED chain A -> B -> A", "corrupt")


@kind("qed")
def qed_backing_too_deep(folder: Path, outside: Path) -> Case:
    (folder / "base.raw").write_bytes(pattern(SIZE))
    below, fmt = "base.raw", "raw"
    for n in range(24):
        qemu_create(folder / f"l{n}.qed", "qed", backing=below, backing_fmt=fmt)
        below, fmt = f"l{n}.qed", "qed"
    path = qemu_create(folder / "disk.qed", "qed", backing=below, backing_fmt="qed")
    return Case(path, "qemu", "QED chain 25 deep", "13")


@kind("qed")
def qed_backing_fifo(folder: Path, outside: Path) -> Case:
    os.mkfifo(folder / "pipe")
    return Case(qemu_create(folder / "disk.qed", "qed", backing="pipe"), "qemu",
                "QED backing file is a FIFO: must not hang", "2")


@kind("qed")
def qed_backing_vmdk_extent_outside(folder: Path, outside: Path) -> Case:
    vmdk = folder / "mid.vmdk"
    vmdk.write_text(descriptor([f'RW 2048 FLAT "{route("absolute", folder, outside)}" 0']))
    path = qemu_create(folder / "disk.qed", "qed", backing="mid.vmdk", backing_fmt="vmdk")
    return Case(path, "qemu", "QED backed by a VMDK beside it whose extent lies outside", "1")


@kind("qed")
def qed_backing_qcow2_backing_outside(folder: Path, outside: Path) -> Case:
    qcow2_image(folder / "mid.qcow2", backing=route("absolute", folder, outside), data={})
    path = qemu_create(folder / "disk.qed", "qed", backing="mid.qcow2", backing_fmt="qcow2")
    return Case(path, "qemu", "QED backed by a qcow2 beside it whose backing lies outside", "1")


@kind("qed")
def qed_auto_backing_beside(folder: Path, outside: Path) -> Case:
    (folder / "base.raw").write_bytes(pattern(SIZE))
    return Case(qemu_create(folder / "disk.qed", "qed", backing="base.raw"), "auto",
                "--format auto: a QED naming a backing file beside it", "3")


@kind("qed")
def qed_truncated(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qed", "qed")
    os.truncate(path, 40)
    return Case(path, "qemu", "QED header cut at 40 bytes", "corrupt")


@kind("qed")
def qed_cluster_size_bad(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qed", "qed")
    patch(path, 4, struct.pack("<I", 3000))
    return Case(path, "qemu", "QED cluster size 3000", "corrupt")


@kind("qed")
def qed_size_over_limit(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qed", "qed", options="cluster_size=1M,table_size=16")
    patch(path, 48, struct.pack("<Q", 1 << 50))
    return Case(path, "qemu", "QED image size 1 PiB", "13")


@kind("qed")
def qed_backing_name_past_eof(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qed", "qed", backing="x.raw")
    patch(path, 56, struct.pack("<II", 1 << 30, 4096))
    return Case(path, "qemu", "QED backing name past the end of the header", "corrupt")


# --- qcow (version 1) ----------------------------------------------------------------------------

def _qcow1_route(how: str):
    def make(folder: Path, outside: Path) -> Case:
        path = qemu_create(folder / "disk.qcow", "qcow", backing=route(how, folder, outside))
        return Case(path, "qemu", f"qcow v1 whose backing file is reached by {how}",
                    "2" if "sym" in how else "4" if how in ("dev", "proc_root") else "1")
    return make


for _how in ("absolute", "dotdot", "symlink", "symlinked_dir", "dev", "proc_root", "json",
             "dash"):
    kind("qcow1", f"qcow1_backing_{_how}")(_qcow1_route(_how))


@kind("qcow1")
def qcow1_backing_self(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qcow", "qcow", backing="disk.qcow", backing_fmt="qcow")
    return Case(path, "qemu", "qcow v1 backing file is itself", "corrupt")


@kind("qcow1")
def qcow1_auto_backing_beside(folder: Path, outside: Path) -> Case:
    (folder / "base.raw").write_bytes(pattern(SIZE))
    return Case(qemu_create(folder / "disk.qcow", "qcow", backing="base.raw"), "auto",
                "--format auto: a qcow v1 naming a backing file beside it", "3")


@kind("qcow1")
def qcow1_truncated(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qcow", "qcow")
    os.truncate(path, 30)
    return Case(path, "qemu", "qcow v1 header cut at 30 bytes", "corrupt")


@kind("qcow1")
def qcow1_size_over_limit(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qcow", "qcow")
    patch(path, 24, struct.pack(">Q", 1 << 60))
    return Case(path, "qemu", "qcow v1 virtual size 1 EiB", "13")


@kind("qcow1")
def qcow1_cluster_bits_bad(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qcow", "qcow")
    patch(path, 32, bytes([40]))
    return Case(path, "qemu", "qcow v1 cluster_bits 40", "13")


@kind("qcow1")
def qcow1_encrypted(folder: Path, outside: Path) -> Case:
    path = qemu_create(folder / "disk.qcow", "qcow")
    patch(path, 36, struct.pack(">I", 1))
    return Case(path, "qemu", "qcow v1 AES-encrypted", "corrupt")


# --- VDI -----------------------------------------------------------------------------------------

VDI_TYPE, VDI_OFFSET_BMAP, VDI_DISK_SIZE, VDI_BLOCK_SIZE, VDI_BLOCKS = 76, 340, 368, 376, 384
VDI_UUID_PARENT = 440


def _vdi(folder: Path) -> Path:
    return qemu_create(folder / "disk.vdi", "vdi")


@kind("vdi")
def vdi_truncated(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    os.truncate(path, 200)
    return Case(path, "qemu", "VDI header cut at 200 bytes", "corrupt")


@kind("vdi")
def vdi_parent_uuid(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, VDI_TYPE, struct.pack("<I", 4))  # differencing
    patch(path, VDI_UUID_PARENT, TRIP_UUID)
    return Case(path, "qemu", "differencing VDI naming a parent by UUID", "1")


@kind("vdi")
def vdi_bad_version(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, 68, struct.pack("<I", 0x00020000))
    return Case(path, "qemu", "VDI version 2.0", "corrupt")


@kind("vdi")
def vdi_disk_size_huge(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, VDI_DISK_SIZE, struct.pack("<Q", 1 << 60))
    return Case(path, "qemu", "VDI disk size 1 EiB", "13")


@kind("vdi")
def vdi_block_size_bad(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, VDI_BLOCK_SIZE, struct.pack("<I", 12345))
    return Case(path, "qemu", "VDI block size 12345", "corrupt")


@kind("vdi")
def vdi_blocks_huge(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, VDI_BLOCKS, struct.pack("<I", 0xFFFFFFF0))
    return Case(path, "qemu", "VDI with 2^32 blocks", "13")


@kind("vdi")
def vdi_bmap_past_eof(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    patch(path, VDI_OFFSET_BMAP, struct.pack("<I", 0xFFFFF000))
    return Case(path, "qemu", "VDI block map past the end of the file", "corrupt")


@kind("vdi")
def vdi_bmap_entry_past_eof(folder: Path, outside: Path) -> Case:
    path = _vdi(folder)
    offset = struct.unpack_from("<I", path.read_bytes(), VDI_OFFSET_BMAP)[0]
    patch(path, offset, struct.pack("<I", 0x00FFFFFF))
    return Case(path, "qemu", "VDI block mapped far past the end of the file", "corrupt")


# --- VHDX ----------------------------------------------------------------------------------------

def _vhdx(folder: Path) -> Path:
    return qemu_create(folder / "disk.vhdx", "vhdx")


@kind("vhdx")
def vhdx_truncated(folder: Path, outside: Path) -> Case:
    path = _vhdx(folder)
    os.truncate(path, 70000)
    return Case(path, "qemu", "VHDX cut inside its headers", "corrupt")


@kind("vhdx")
def vhdx_headers_corrupt(folder: Path, outside: Path) -> Case:
    path = _vhdx(folder)
    patch(path, 64 << 10, b"\xff" * 64)
    patch(path, 128 << 10, b"\xff" * 64)
    return Case(path, "qemu", "both VHDX headers corrupt", "corrupt")


@kind("vhdx")
def vhdx_region_table_corrupt(folder: Path, outside: Path) -> Case:
    path = _vhdx(folder)
    patch(path, (192 << 10) + 16, b"\xff" * 32)
    patch(path, (256 << 10) + 16, b"\xff" * 32)
    return Case(path, "qemu", "both VHDX region tables corrupt", "corrupt")


def _vhdx_metadata(path: Path) -> tuple[int, dict[bytes, tuple[int, int]]]:
    """The metadata region's offset and its items: GUID -> (offset in region, length)."""
    data = path.read_bytes()
    region = 192 << 10
    count = struct.unpack_from("<I", data, region + 8)[0]
    meta_guid = uuidlib.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    for i in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", data, region + 16 + 32 * i)
        if guid == meta_guid:
            break
    else:
        raise AssertionError("no metadata region")
    items = {}
    entries = struct.unpack_from("<H", data, offset + 10)[0]
    for i in range(entries):
        guid, item_offset, item_length, _, _ = struct.unpack_from("<16sIIII", data,
                                                                  offset + 32 + 32 * i)
        items[guid] = (item_offset, item_length)
    return offset, items


@kind("vhdx")
def vhdx_has_parent(folder: Path, outside: Path) -> Case:
    path = _vhdx(folder)
    offset, items = _vhdx_metadata(path)
    params = uuidlib.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
    at, _ = items[params]
    flags = struct.unpack_from("<I", path.read_bytes(), offset + at + 4)[0]
    patch(path, offset + at + 4, struct.pack("<I", flags | 2))  # HasParent
    return Case(path, "qemu", "differencing VHDX (names a parent)", "1")


@kind("vhdx")
def vhdx_size_huge(folder: Path, outside: Path) -> Case:
    path = _vhdx(folder)
    offset, items = _vhdx_metadata(path)
    size_guid = uuidlib.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
    at, _ = items[size_guid]
    patch(path, offset + at, struct.pack("<Q", 1 << 60))
    return Case(path, "qemu", "VHDX virtual disk size 1 EiB", "13")


# --- running a case, bounded ------------------------------------------------------------------

MEMORY = 1 << 30  # address space a case may add to the process it runs in
TIMEOUT = 30.0


def bounded(work: Callable[[], dict], timeout: float = TIMEOUT, memory: int = MEMORY) -> dict:
    """Run `work` in a forked child in its own process group, with RLIMIT_AS at the parent's
    current address space plus `memory` (inherited by anything it starts, qemu-img included),
    killed with its group after `timeout` seconds. Returns work's dict, or {"status":
    "timeout"|"crashed"}, plus "seconds" and "maxrss" (KiB, the child's peak)."""
    import resource
    import select
    import signal
    import time
    import traceback

    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
              if line.startswith("VmSize:"))
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            os.setpgid(0, 0)
            resource.setrlimit(resource.RLIMIT_AS, (vm + memory, vm + memory))
            try:
                result = work()
            except MemoryError:
                result = {"status": "memory", "message": "MemoryError"}
            except BaseException as e:  # noqa: BLE001 - reported, not hidden
                result = {"status": "error", "message": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-3000:]}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(write_end, data):]
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, deadline, timed_out = [], started + timeout, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever it left running (qemu-img)
        except ProcessLookupError:
            pass
        _, _, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    if timed_out:
        result = {"status": "timeout", "message": f"still running after {timeout} s"}
    elif not chunks:
        result = {"status": "crashed", "message": "the child died without a result"}
    else:
        result = json.loads(b"".join(chunks))
    return {**result, "seconds": round(seconds, 3), "maxrss": usage.ru_maxrss}


class _NullSink:
    def write(self, offset: int, data) -> None:
        pass

    def mark_zero(self, offset: int, length: int) -> None:
        pass


def import_on_host(case: Case) -> dict:
    """What `thinstack import` does with the image before touching a volume: open it with a
    default policy, map it, and read all of it through the copy loop."""
    from thinstack.copy import copy_extents
    from thinstack.importers import ImageError, Policy, open_image

    try:
        image = open_image(case.path, Policy(), case.format)
        try:
            extents = list(image.extents())
            copy_extents(extents, image.read, _NullSink(), size=image.virtual_size,
                         chunk=64 << 10)
        finally:
            image.close()
    except ImageError as e:
        return {"status": "refused", "message": str(e)}
    return {"status": "imported", "message": f"{image.format}, {image.virtual_size} bytes"}


# --- the positive control -----------------------------------------------------------------------

def raw_backup_holding_qcow2(folder: Path, outside: Path) -> Path:
    """Not a kind: the raw backup of raw_holds_qcow2_backing_tripwire, which `--format raw` must
    import as the bytes it is."""
    return raw_holds_qcow2_backing_tripwire(folder, outside).path


def build(base: Path, name: str) -> tuple[Case, Path]:
    """Kind `name` made in base/NAME, its tripwires in base/NAME.out; returns the case and the
    outside folder."""
    folder, outside = base / name, base / f"{name}.out"
    folder.mkdir(parents=True)
    plant(outside)
    return KINDS[name].make(folder, outside), outside


if __name__ == "__main__":
    target = Path(sys.argv[1])
    for key in KINDS:
        case, _ = build(target, key)
        print(f"{key:45} {KINDS[key].family:12} {case.format:6} {case.description}")
