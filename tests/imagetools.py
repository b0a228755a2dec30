"""Helpers shared by the format tests: an image's content as its extents describe it, and
writers driven by a list of operations."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from thinstack.exporters import vhd as vhd_out
from thinstack.extents import Kind
from thinstack.importers import DEFAULT_POLICY, Policy, open_image


def content(image, extents=None) -> bytes:
    """The disk as the extents and reads describe it; checks the extents tile [0, size)."""
    out = bytearray(image.virtual_size)
    pos = 0
    for ext in image.extents() if extents is None else extents:
        assert ext.offset == pos and ext.length > 0
        if ext.kind is Kind.DATA:
            out[ext.offset:ext.end] = image.read(ext.offset, ext.length)
        pos = ext.end
    assert pos == image.virtual_size
    if hasattr(image, "read_into") and image.virtual_size <= 64 << 20:
        # The copy loop reads into a used buffer, across holes: every byte must be written.
        used = bytearray(b"\xa5" * image.virtual_size)
        image.read_into(0, memoryview(used))
        assert used == out
    return bytes(out)


def walk(image) -> None:
    """Read every DATA extent, a piece at a time: for hostile images of any claimed size."""
    pos = 0
    for ext in image.extents():
        assert ext.offset == pos and ext.length > 0
        if ext.kind is Kind.DATA:
            for at in range(ext.offset, ext.end, 1 << 20):
                image.read(at, min(1 << 20, ext.end - at))
        pos = ext.end
    assert pos == image.virtual_size


def imported(path: Path, policy: Policy = DEFAULT_POLICY) -> bytes:
    image = open_image(path, policy)
    try:
        return content(image)
    finally:
        image.close()


def export(path: Path, size: int, ops, *, base: bytes = b"", create=vhd_out.create,
           **options) -> bytes:
    """Run ops ("w", offset, data) / ("z", offset, length) through a writer; returns what the
    disk should read as, starting from `base` (the parent's content)."""
    expected = bytearray(base.ljust(size, b"\0")[:size])
    writer = create(path, size, **options)
    for op, offset, arg in ops:
        if op == "w":
            writer.write(offset, arg)
            expected[offset:offset + len(arg)] = arg
        else:
            writer.mark_zero(offset, arg)
            expected[offset:offset + arg] = bytes(arg)
    writer.close()
    return bytes(expected)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@st.composite
def ordered_ops(draw, size: int, block: int):
    """Writes and zeroings at any alignment, in offset order, not overlapping, up to a few
    blocks long and apart."""
    ops, pos = [], draw(st.integers(0, 2000))
    while pos < size and len(ops) < 8:
        length = draw(st.integers(1, min(size - pos, 3 * block)))
        if draw(st.booleans()):
            ops.append(("w", pos, draw(st.binary(min_size=1)).ljust(length, b"\7")[:length]))
        else:
            ops.append(("z", pos, length))
        pos += length + draw(st.sampled_from([0, 1, 511, block - 1, block, 5 * block]))
    return ops
