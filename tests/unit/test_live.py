"""Live import's pure decisions: region size, discard plan, metadata size, progress, NBD
sources, refusals (no kernel needed)."""

from __future__ import annotations

import pytest

from thinstack import live, tags
from thinstack.dm.status import CloneStatus
from thinstack.errors import Refused, Usage
from thinstack.extents import Extent, Kind
from thinstack.lvm import LV

KiB, MiB = 1 << 10, 1 << 20
D, H, Z = Kind.DATA, Kind.HOLE, Kind.ZERO


@pytest.mark.parametrize(("chunk", "region"), [
    (64 * KiB, 64 * KiB), (192 * KiB, 64 * KiB), (1 * MiB, 1 * MiB), (2 << 30, 1 << 30)])
def test_region_tiles_the_pool_chunk(chunk, region):
    assert live.region_size(chunk) == region
    assert chunk % live.region_size(chunk) == 0


def test_discard_plan_keeps_every_region_a_data_extent_touches():
    r = 64 * KiB
    extents = [Extent(0, 10 * KiB, D), Extent(10 * KiB, 300 * KiB, H),  # hole from 10K
               Extent(310 * KiB, 2 * KiB, D),  # data inside region 4
               Extent(312 * KiB, 200 * KiB, Z), Extent(512 * KiB, 64 * KiB, H),  # zero + hole
               Extent(576 * KiB, 64 * KiB, D)]
    size = 640 * KiB
    # Regions 1-3 (64K..256K) are pure hole; 4 has data; 5-8 (320K..576K) zero or hole.
    assert live.discard_plan(extents, size, r) == [(64 * KiB, 192 * KiB),
                                                   (320 * KiB, 256 * KiB)]


def test_discard_plan_takes_a_short_last_region_whole_and_nothing_of_all_data():
    r = 64 * KiB
    size = 100 * KiB  # last region 36K long
    assert live.discard_plan([Extent(0, 64 * KiB, D), Extent(64 * KiB, 36 * KiB, H)], size, r) \
        == [(64 * KiB, 36 * KiB)]
    assert live.discard_plan([Extent(0, size, H)], size, r) == [(0, size)]
    assert live.discard_plan([Extent(0, size, D)], size, r) == []
    # A hole that never covers a whole region: nothing.
    assert live.discard_plan([Extent(0, 10 * KiB, D), Extent(10 * KiB, 100 * KiB, H),
                              Extent(110 * KiB, 18 * KiB, D)], 128 * KiB, r) == []


def test_metadata_size_grows_with_regions_and_is_whole_extents():
    ext = 4 * MiB
    assert live.metadata_size(1024, ext) == 8 * MiB  # 4 MiB + 256 bytes, rounded to extents
    assert live.metadata_size(1 << 24, ext) == 8 * MiB  # 4 MiB + 4 MiB
    assert live.metadata_size(1 << 26, ext) % ext == 0


def _status(hydrated: int, total: int = 100, region_sectors: int = 128) -> CloneStatus:
    return CloneStatus(8, 6, 1024, region_sectors, hydrated, total, 0, False, False, 1, 16, False)


def _record(**kw) -> live.Record:
    base = dict(vg="vg0", name="v", source="/i", format="qcow2", requested="auto", allow_dirs=(),
                virtual_size=100 * 64 * KiB, region=64 * KiB, discarded=60, to_copy=40 * 64 * KiB,
                started=1000.0)
    return live.Record(**{**base, **kw})


def test_progress_counts_only_what_the_kernel_copied():
    p = live.progress(_record(), _status(70), True, now=1010.0)
    assert (p.state, p.copied, p.total) == ("hydrating", 10 * 64 * KiB, 40 * 64 * KiB)
    assert p.rate == 64 * KiB and p.eta == 30.0
    done = live.progress(_record(), _status(100), True, now=1020.0)
    assert (done.state, done.copied, done.eta) == ("hydrated", 40 * 64 * KiB, 0.0)
    # Discards counted in before the copy began are not "copied".
    assert live.progress(_record(), _status(60), True, now=1001.0).copied == 0
    assert live.progress(_record(), None, False, now=1001.0).state == "inactive"


def test_a_bounded_copy_shows_its_bound():
    p = live.progress(_record(rate=2 * MiB), _status(70), True, now=1010.0)
    assert p.limit == 2 * MiB and p.to_json()["limit"] == 2 * MiB
    assert "64KiB/s (at most 2MiB/s)" in live.progress_lines([p])
    unbounded = live.progress(_record(), _status(70), True, now=1010.0)
    assert unbounded.limit is None and "at most" not in live.progress_lines([unbounded])


def test_nbd_sources():
    assert live.nbd_spec("nbd://host:10810/disk") == {"driver": "raw", "file": {
        "driver": "nbd", "server": {"type": "inet", "host": "host", "port": "10810"},
        "export": "disk"}}
    assert live.nbd_spec("nbd://host/")["file"]["server"]["port"] == "10809"
    assert live.nbd_spec("nbd+unix:///e?socket=/run/s.sock")["file"] == {
        "driver": "nbd", "server": {"type": "unix", "path": "/run/s.sock"}, "export": "e"}
    for bad in ("nbd+unix:///e", "nbd+unix:///e?socket=rel", "nbd://:1/e", "nbd://h:x/e",
                "nbd+unix://host/e?socket=/s", "nbd+unix:///e?socket=/s&tls=1"):
        with pytest.raises(Usage):
            live.nbd_spec(bad)
    assert live.is_nbd("nbd://h/e") and not live.is_nbd("/images/nbd://x")


def _lv(tag_set: frozenset[str]) -> LV:
    return LV(vg="vg0", name="v", uuid="u", attr="Vwi-a-tz--", size=1, segtype="thin",
              pool="pool", origin="", data_percent=None, metadata_percent=None, tags=tag_set,
              path="", dm_path="", thin_id=1, chunk_size=0, metadata_size=0,
              skip_activation=True, when_full="")


def test_refusal_while_hydrating_says_to_wait():
    with pytest.raises(Refused, match=r"vg0/v is still being imported live; snapshot it once .*"
                                      r"--wait"):
        live.refuse_if_hydrating(_lv(frozenset({tags.LIVE})), "snapshot")
    live.refuse_if_hydrating(_lv(frozenset()), "snapshot")



def test_rate_without_live_is_a_usage_error(capsys):
    from thinstack import cli

    assert cli.main(["import", "--rate", "10M", "disk.vhd", "vg0/vm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rate" in err and "--live" in err
