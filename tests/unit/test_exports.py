"""Export decisions without a kernel: which options go together, what an incremental export
builds on, how a volume is read, and the per-volume lock."""

import json
from pathlib import Path

import pytest

from thinstack import exports, recovery
from thinstack.dm import tools
from thinstack.dm.status import ThinStatus
from thinstack.dm.targets import LinearTarget, Table, ThinTarget
from thinstack.errors import NotFound, Refused, ThinstackError
from thinstack.exporters import ExportError
from thinstack.exports import Base, Record, SourceKind
from thinstack.extents import Extent, Kind
from thinstack.journal import Entry
from thinstack.lvm import LV, VolumeRef

RW, RO = "Vwi-a-tz--", "Vri---tz-k"


def lv(name, *, origin="", attr=RW, uuid=None, thin_id=1, tags=()):
    return LV(vg="vg", name=name, uuid=uuid or f"uuid-{name}", attr=attr, size=1 << 30,
              segtype="thin" if attr[0] == "V" else "linear", pool="pool", origin=origin,
              data_percent=0.0, metadata_percent=None, tags=frozenset(tags),
              path=f"/dev/vg/{name}", dm_path=f"/dev/mapper/vg-{name}", thin_id=thin_id,
              chunk_size=0, metadata_size=0, skip_activation=False, when_full="")


def test_the_snapshot_just_made_is_described_from_its_device():
    source = lv("vm", attr="Vwi-aotz--", tags=("ts_gold_of",))
    table = Table.of(1 << 21, ThinTarget("253:4", 7))
    uuid = "LVM-" + "v" * 32 + "Dq9TzS1fOa4LhW2kR8yP0cXvN3bJ7uGe"
    made = exports.snapshot_made(source, VolumeRef("vg", "vm.export-1"), "ts_op_1", uuid, table)
    assert (made.name, made.origin, made.tags) == ("vm.export-1", "vm", frozenset({"ts_op_1"}))
    assert made.uuid == "Dq9TzS-1fOa-4LhW-2kR8-yP0c-XvN3-bJ7uGe"
    assert (made.thin_id, made.size) == (7, 1 << 30)  # the kernel's, not the source's
    assert made.readonly and made.active and made.is_thin and not made.open
    assert (made.path, made.dm_path) == ("/dev/vg/vm.export-1", "/dev/mapper/vg-vm.export--1")
    assert made.attr == "Vri-a-tz-k" and made.skip_activation
    with pytest.raises(ThinstackError, match="not a thin volume"):
        exports.snapshot_made(source, VolumeRef("vg", "x"), "t", uuid,
                              Table.of(8, LinearTarget("8:16", 0)))


NO_OPTIONS = dict(compress=False, round_to_mib=False, incremental=False, since=None, parent=None)


def check(format="vhd", **kw):
    exports.check_options(format, **{**NO_OPTIONS, **kw})


# --- options -----------------------------------------------------------------------------------

def test_plain_exports_of_every_format_are_fine():
    for format in ("raw", "vhd", "vhd-fixed", "qcow2", "gow1", "gow2", "gow3"):
        check(format)
    check("qcow2", compress=True)
    check("vhd-fixed", round_to_mib=True)
    check("qcow2", incremental=True, full=True)


@pytest.mark.parametrize("format", ["raw", "vhd-fixed", "gow1", "gow2"])
def test_formats_without_an_incremental_form_say_which_have_one(format):
    for kw in (dict(incremental=True), dict(since="snap")):
        with pytest.raises(ExportError, match=f"{format} has no incremental form; use vhd"):
            check(format, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(incremental=True, since="s"), "chooses its own base"),
    (dict(parent=Path("p.vhd")), "give both"),
    (dict(compress=True), "--compress is for qcow2"),
    (dict(format="raw", round_to_mib=True), "--round-to-mib is for vhd"),
    (dict(full=True), "give it with --incremental"),
    (dict(full=True, since="s"), "give it with --incremental"),
])
def test_options_that_cannot_go_together(kw, message):
    with pytest.raises(ExportError, match=message):
        check(**kw)


# --- the base of an --incremental export ---------------------------------------------------------

DEST = Path("/backup/vm1-2.vhd")
LAST = lv("vm1.last-export", origin="vm1", attr=RO, thin_id=9)
RECORD = Record("vm1.last-export", LAST.uuid, "/backup/vm1-1.vhd", "vhd",
                ("/backup/vm1-1.vhd", "/backup/vm1-0.vhd"))


def base(format="vhd", dest=DEST, record=RECORD, last=LAST, exists=True):
    return exports.incremental_base(format, dest, record, last, exists)


def test_the_last_export_is_the_base_and_its_image_the_parent():
    assert base() == (Base("vm1.last-export", 9, Path("/backup/vm1-1.vhd")),
                      "changes since vm1.last-export")


@pytest.mark.parametrize("kw, why", [
    (dict(last=None), "no earlier incremental export"),
    (dict(record=None), "no earlier incremental export"),
    (dict(last=lv("vm1.last-export", uuid="another")), "not the snapshot the last export recorded"),
    (dict(format="qcow2"), "the last export was vhd, not qcow2"),
    (dict(exists=False), "the last export /backup/vm1-1.vhd is gone"),
    (dict(dest=Path("/backup/vm1-1.vhd")), "a differencing VHD needs as its parent"),
])
def test_a_full_export_when_there_is_nothing_sound_to_build_on(kw, why):
    found, reason = base(**kw)
    assert found is None and why in reason


def test_a_gow3_increment_is_a_full_image_so_it_may_replace_its_parent():
    gow = str(DEST.with_suffix(".gow"))
    record = Record("vm1.last-export", LAST.uuid, gow, "gow3", (gow,))
    found, _ = base("gow3", DEST.with_suffix(".gow"), record)
    assert found == Base("vm1.last-export", 9, DEST.with_suffix(".gow"))


def test_a_chain_as_long_as_readers_follow_starts_afresh():
    images = tuple(f"/backup/vm1-{day}.vhd" for day in range(exports.MAX_PARENTS, -1, -1))
    longest = Record("vm1.last-export", LAST.uuid, images[0], "vhd", images[1:])
    assert base(record=longest)[0] is not None  # the next image has MAX_PARENTS parents
    found, why = base(record=Record("vm1.last-export", LAST.uuid, images[0], "vhd", images))
    assert found is None and f"the chain has {exports.MAX_PARENTS + 1} images" in why


def test_each_record_knows_the_chain_its_image_needs():
    b = Base("vm1.last-export", 9, Path(RECORD.path))
    nxt = exports.next_record(RECORD, b, "vm1.last-export", "u2", DEST, "vhd")
    assert nxt == Record("vm1.last-export", "u2", str(DEST), "vhd",
                         (str(DEST), "/backup/vm1-1.vhd", "/backup/vm1-0.vhd"))
    # A full export, or a GOW3 image (always whole), needs nothing else.
    assert exports.next_record(RECORD, None, "s", "u", DEST, "vhd").chain == (str(DEST),)
    assert exports.next_record(RECORD, b, "s", "u", DEST, "gow3").chain == (str(DEST),)


def test_an_image_the_chain_still_reads_is_never_overwritten():
    exports.check_dest(DEST, RECORD)
    exports.check_dest(Path("/backup/vm1-1.vhd"), RECORD)  # the last one: nothing reads it yet
    exports.check_dest(Path("/backup/vm1-0.vhd"), None)
    with pytest.raises(Refused, match="vm1-0.vhd is an earlier image of the chain"):
        exports.check_dest(Path("/backup/vm1-0.vhd"), RECORD)


# --- the base of a --since export ----------------------------------------------------------------

SOURCE = lv("vm1")
SNAP = lv("monday", origin="vm1", thin_id=4)


def test_since_uses_the_parent_given():
    assert exports.since_base(SNAP, SOURCE, Path("/b/mon.vhd"), None) == \
        Base("monday", 4, Path("/b/mon.vhd"))


def test_since_the_last_export_finds_its_recorded_image():
    assert exports.since_base(LAST, SOURCE, None, RECORD) == \
        Base("vm1.last-export", 9, Path("/backup/vm1-1.vhd"))


def test_since_a_snapshot_without_a_recorded_image_needs_parent():
    with pytest.raises(NotFound, match="pass --parent IMAGE"):
        exports.since_base(SNAP, SOURCE, None, RECORD)


def test_since_must_name_a_snapshot_of_the_volume():
    with pytest.raises(Refused, match="not a thin snapshot of vg/vm1"):
        exports.since_base(lv("other", origin="vm2"), SOURCE, Path("/b/x.vhd"), None)


# --- how a volume is read ------------------------------------------------------------------------

def test_how_volumes_are_read():
    gold = lv("gold", attr="Vri-a-tz--")
    ext_origin = lv("img", attr="ori-a-----")
    lvs = [SOURCE, gold, ext_origin]
    assert exports.source_kind(SOURCE, lvs) is SourceKind.THIN
    assert exports.source_kind(lv("clone", origin="gold"), lvs) is SourceKind.THIN
    assert exports.source_kind(lv("ext", origin="img"), lvs) is SourceKind.EXTERNAL
    assert exports.source_kind(lv("plain", attr="-ri-a-----"), lvs) is SourceKind.PLAIN
    with pytest.raises(Refused, match="neither a thin volume"):
        exports.source_kind(lv("linear", attr="-wi-a-----"), lvs)


K = 64 << 10
DUMP = tools.parse_thin_ranges([
    '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">'
    '<device dev_id="3" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">'
    '<single_mapping origin_block="1" data_block="0" time="0"/></device></superblock>'], 3)
DELTA = tools.parse_thin_delta(
    '<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">'
    '<diff left="2" right="3"><left_only begin="0" length="1"/>'
    '<right_only begin="1" length="1"/></diff></superblock>')


def test_what_is_copied():
    H, D, Z = Kind.HOLE, Kind.DATA, Kind.ZERO
    assert exports.volume_extents(SourceKind.THIN, 3 * K, DUMP, None) == [
        Extent(0, K, H), Extent(K, K, D), Extent(2 * K, K, H)]
    assert exports.volume_extents(SourceKind.THIN, 3 * K, DUMP, DELTA) == [
        Extent(0, K, Z), Extent(K, K, D), Extent(2 * K, K, H)]
    # Over an external origin, unmapped is not zero: all of it, or all changes, are data.
    assert exports.volume_extents(SourceKind.EXTERNAL, 3 * K, DUMP, None) == [Extent(0, 3 * K, D)]
    assert exports.volume_extents(SourceKind.EXTERNAL, 3 * K, DUMP, DELTA)[0] == Extent(0, 2 * K, D)
    assert exports.volume_extents(SourceKind.PLAIN, 3 * K, None, None) == [Extent(0, 3 * K, D)]


# --- state: the record, the lock, recovery -------------------------------------------------------

@pytest.fixture
def dirs(tmp_path):
    return tmp_path


REF = VolumeRef("vg", "vm1")


def test_the_record_round_trips_and_a_damaged_one_means_a_full_export(dirs):
    assert exports.read_record(REF) is None
    exports.write_record(REF, RECORD)
    assert exports.read_record(REF) == RECORD
    path = dirs / "state" / "exports" / "vg" / "vm1.json"
    assert json.loads(path.read_text())["format"] == "vhd"
    path.write_text("{not json")
    assert exports.read_record(REF) is None


def test_one_export_of_a_volume_at_a_time(dirs):
    with exports.export_lock(REF):
        assert exports._running(REF)
        with pytest.raises(Refused, match=r"vg/vm1 is being exported by another thinstack "
                                          r"process \(pid \d+\)"):
            with exports.export_lock(REF):
                pass
        with exports.export_lock(VolumeRef("vg", "vm2")):
            pass  # other volumes export meanwhile
    assert not exports._running(REF)


def test_the_writer_builds_dest_under_the_journalled_name(tmp_path):
    from thinstack.exporters import driver

    dest = tmp_path / "x.raw"
    partial = exports._partial(dest)
    assert partial.parent == tmp_path and partial.name.startswith(".x.raw.partial-")
    assert exports._partial(dest) != partial  # drawn afresh: nobody can plant it beforehand
    writer = driver("raw").create(dest, 4096, partial=partial.name)
    assert partial.is_file()
    writer.abort()
    assert not partial.exists()


def test_a_foreign_last_export_is_never_the_base(dirs):
    """Finding 5: NAME.last-export is used (and later removed) only when thinstack made it."""
    ours = lv("vm1.last-export", origin="vm1", attr=RO, tags={"ts_last_export"})
    assert exports.last_export(SOURCE, [SOURCE, ours]) == ours
    assert exports.last_export(SOURCE, [SOURCE]) is None
    for foreign in (lv("vm1.last-export", attr=RW),  # `thinstack create` before names were checked
                    lv("vm1.last-export", origin="vm1", attr=RO),  # a snapshot made by hand
                    lv("vm1.last-export", origin="vm2", attr=RO, tags={"ts_last_export"})):
        with pytest.raises(Refused, match="vg/vm1.last-export is not the base snapshot"):
            exports.last_export(SOURCE, [SOURCE, foreign])


def test_a_dead_export_is_rolled_back_by_any_recovery_a_live_one_by_none(dirs):
    """Finding 9: the recovery at the start of every command rolls back a dead export (which may
    have left a device suspended); a running export's entry is left to it."""
    entry = Entry(id="abc", op="export", vg="vg",
                  args=dict(name="vm1", dest="/b/d", partial="/b/.d"))
    assert not recovery.deferred(entry, explicit=False)
    with exports.export_lock(REF):
        assert recovery.deferred(entry, explicit=False)
    importing = Entry(id="def", op="import", vg="vg", args={})
    assert recovery.deferred(importing, explicit=False)  # kept for --resume
    assert not recovery.deferred(importing, explicit=True)


def test_the_summary_is_one_json_object():
    summary = exports.Summary(
        path=Path("/b/x.vhd"), format="vhd", volume="vg/vm1", size=1 << 30,
        snapshot="vm1.last-export", base=None, parent=None, reason="full export",
        block_size=K, bytes_mapped=3 * K, changed_blocks=3, bytes_read=3 * K,
        bytes_written=2 * K, file_bytes=4 * K, seconds=1.5)
    line = json.dumps(summary.to_json())
    assert json.loads(line)["path"] == "/b/x.vhd"
    assert {"bytes_mapped", "bytes_written", "changed_blocks", "seconds", "path", "format",
            "base"} <= set(summary.to_json())


def test_the_units_create_files_for_root_only():
    """Finding 6: every unit runs with UMask=0077, and the export folder is made 0700."""
    import configparser

    units = Path(exports.__file__).with_name("units")
    for path in sorted(units.glob("*.service")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(path)
        assert unit["Service"]["UMask"] == "0077", path.name
    export = configparser.ConfigParser(strict=False, interpolation=None)
    export.read(units / "thinstack-export@.service")
    assert export["Service"]["ExecStartPre"].split()[:4] == ["/bin/mkdir", "-m", "0700", "-p"]


def test_the_mapping_is_read_only_where_the_kernel_status_does_not_say_it_all():
    size = 64 << 20  # 1024 blocks of 64 KiB: 131072 sectors
    every = ThinStatus(mapped_sectors=131072, highest_mapped_sector=131071)
    assert exports.whole_volume_is_data(exports.SourceKind.THIN, size, every)
    assert not exports.whole_volume_is_data(exports.SourceKind.THIN, size,
                                            ThinStatus(131072 - 128, 131071))
    # Mapped past the end (a volume shrunk since): the count proves nothing about [0, size).
    assert not exports.whole_volume_is_data(exports.SourceKind.THIN, size,
                                            ThinStatus(131072, 131072 + 127))
    assert not exports.whole_volume_is_data(exports.SourceKind.THIN, size, ThinStatus(0, None))
    # Over an external origin, whatever is not mapped reads the origin: all of it is data.
    assert exports.whole_volume_is_data(exports.SourceKind.EXTERNAL, size, ThinStatus(0, None))
