"""A thin device's content as extents, from thin_dump and thin_delta output captured in the lab.

The scenario (64 KiB pool blocks, a 4 MiB volume): blocks 1-3, 10, 20-21 and 62-63 written;
snapshot `base` (thin id 2) taken; then the volume (thin id 1) got block 2 rewritten, block 30
written, 4 KiB written inside block 40, and blocks 20-21 and 63 discarded.
"""

import pytest

from tests import thindump
from thinstack import mapping
from thinstack.dm import tools
from thinstack.dm.errors import ParseError
from thinstack.extents import Extent, Kind

K = 64 << 10  # the pool's block size
SIZE = 4 << 20

THIN_DUMP = """\
<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" \
nr_data_blocks="0">
  <device dev_id="1" mapped_blocks="7" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="1" data_block="0" time="0"/>
    <single_mapping origin_block="2" data_block="8" time="1"/>
    <single_mapping origin_block="3" data_block="2" time="0"/>
    <single_mapping origin_block="10" data_block="3" time="0"/>
    <single_mapping origin_block="30" data_block="9" time="1"/>
    <single_mapping origin_block="40" data_block="10" time="1"/>
    <single_mapping origin_block="62" data_block="6" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="8" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="1" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="10" data_block="3" time="0"/>
    <range_mapping origin_begin="20" data_begin="4" length="2" time="0"/>
    <range_mapping origin_begin="62" data_begin="6" length="2" time="0"/>
  </device>
</superblock>
"""

# thin_delta --snap1 2 --snap2 1: what the volume changed since the snapshot.
THIN_DELTA = """\
<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="1">
    <same begin="1" length="1"/>
    <different begin="2" length="1"/>
    <same begin="3" length="1"/>
    <same begin="10" length="1"/>
    <left_only begin="20" length="2"/>
    <right_only begin="30" length="1"/>
    <right_only begin="40" length="1"/>
    <same begin="62" length="1"/>
    <left_only begin="63" length="1"/>
  </diff>
</superblock>
"""


def ext(begin, length, kind):
    """An extent in pool blocks."""
    return Extent(begin * K, length * K, kind)


D, Z, H = Kind.DATA, Kind.ZERO, Kind.HOLE


def pieces(text: str, size: int = 7) -> list[str]:
    """thin_dump's output as a stream delivers it: cut anywhere, even inside a tag."""
    return [text[i:i + size] for i in range(0, len(text), size)]


def ranges(dev_id: int, text: str = THIN_DUMP) -> tools.ThinRanges:
    return tools.parse_thin_ranges(pieces(text), dev_id)


@pytest.fixture
def delta():
    return tools.parse_thin_delta(THIN_DELTA)


def test_block_size_comes_from_the_tools_in_sectors(delta):
    assert mapping.block_size(ranges(1)) == mapping.block_size(delta) == K


def test_mapped_blocks_are_data_and_the_rest_holes():
    assert list(mapping.mapped_extents(ranges(1), SIZE)) == [
        ext(0, 1, H), ext(1, 3, D), ext(4, 6, H), ext(10, 1, D), ext(11, 19, H), ext(30, 1, D),
        ext(31, 9, H), ext(40, 1, D), ext(41, 21, H), ext(62, 1, D), ext(63, 1, H)]


def test_ranges_and_single_mappings_read_alike():
    assert list(mapping.mapped_extents(ranges(2), SIZE)) == [
        ext(0, 1, H), ext(1, 3, D), ext(4, 6, H), ext(10, 1, D), ext(11, 9, H), ext(20, 2, D),
        ext(22, 40, H), ext(62, 2, D)]


def test_mappings_past_the_end_of_a_shrunk_device_are_clipped():
    assert list(mapping.mapped_extents(ranges(2), 21 * K)) == [
        ext(0, 1, H), ext(1, 3, D), ext(4, 6, H), ext(10, 1, D), ext(11, 9, H), ext(20, 1, D)]
    # A size that is not a whole number of blocks ends inside the last one.
    assert list(mapping.mapped_extents(ranges(2), 2 * K + 512))[-1] == Extent(K, K + 512, D)


def test_an_empty_device_is_one_hole():
    empty = ranges(7,
        '<superblock uuid="" time="0" transaction="1" data_block_size="256" nr_data_blocks="0">'
        '<device dev_id="7" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0"/>'
        '</superblock>')
    assert list(mapping.mapped_extents(empty, SIZE)) == [Extent(0, SIZE, H)]


def test_the_streamed_ranges_are_the_full_dumps_coalesced():
    full = thindump.parse_thin_dump(THIN_DUMP)
    for dev_id, device in full.devices.items():
        streamed = ranges(dev_id)
        assert list(streamed.ranges) == device.virtual_ranges()
        assert (streamed.mapped_blocks, streamed.data_block_size) == \
            (device.mapped_blocks, full.data_block_size)
    assert ranges(99) is None  # no such device


def test_a_broken_or_disordered_dump_is_a_parse_error():
    with pytest.raises(ParseError, match="not XML"):
        ranges(1, THIN_DUMP[:-20] + "<<")
    with pytest.raises(ParseError, match="out of order"):
        ranges(1, '<superblock uuid="" time="0" transaction="1" data_block_size="128" '
                  'nr_data_blocks="0"><device dev_id="1" mapped_blocks="2" transaction="0" '
                  'creation_time="0" snap_time="0"><single_mapping origin_block="5" '
                  'data_block="0" time="0"/><single_mapping origin_block="2" data_block="1" '
                  'time="0"/></device></superblock>')


def test_changes_are_data_discards_are_zero_the_rest_stands(delta):
    assert list(mapping.changed_extents(delta, SIZE)) == [
        ext(0, 2, H), ext(2, 1, D), ext(3, 17, H), ext(20, 2, Z), ext(22, 8, H), ext(30, 1, D),
        ext(31, 9, H), ext(40, 1, D), ext(41, 22, H), ext(63, 1, Z)]


def test_over_an_external_origin_a_discarded_block_reads_the_origin_again(delta):
    kinds = {e.offset // K: e.kind for e in
             mapping.changed_extents(delta, SIZE, unmapped_reads_zero=False)}
    assert kinds[20] is kinds[63] is D


def test_changes_past_the_end_are_clipped(delta):
    # thin_delta reports discards past the end of a device shrunk since (wyng-backup #56).
    assert list(mapping.changed_extents(delta, 21 * K))[-1] == ext(20, 1, Z)


def test_adjacent_changes_of_one_kind_merge_and_order_is_restored():
    shuffled = tools.parse_thin_delta(
        '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">'
        '<diff left="2" right="1">'
        '<right_only begin="5" length="1"/><different begin="3" length="2"/>'
        '<left_only begin="6" length="1"/></diff></superblock>')
    assert list(mapping.changed_extents(shuffled, 8 * K)) == [
        ext(0, 3, H), ext(3, 3, D), ext(6, 1, Z), ext(7, 1, H)]


def test_block_count_counts_what_the_image_stores(delta):
    extents = list(mapping.changed_extents(delta, SIZE))
    assert mapping.block_count(extents, K) == 6
    assert mapping.block_count([Extent(0, K + 512, D)], K) == 2
