"""The growth policy's decisions, on plain data."""

from __future__ import annotations

import pytest

from thinstack.dm.status import Discards, PoolMode, ThinPoolStatus
from thinstack.growth import (
    DEFAULT_THRESHOLD,
    METADATA_MAX,
    CowView,
    PoolPlan,
    PoolView,
    Reading,
    Settings,
    Space,
    arming,
    cow_max_size,
    growth,
    low_water_mark,
    lvm_threshold,
    metadata_projection_ok,
    plan_cow,
    plan_pool,
    settings,
    spaces,
    write_rate,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EXTENT = 4 * MiB
CHUNK = 64 * KiB
GROW = Settings(threshold=70.0, step=128 * MiB, enabled=True)


def pool(data_used=0, data_size=256 * MiB, *, meta_used=512 * KiB, meta_size=4 * MiB,
         mode="rw", error_if_no_space=False, needs_check=False, lwm=None, settings=GROW):
    if lwm is None:
        lwm = low_water_mark(data_size // CHUNK, settings.threshold)
    return PoolView(data=Space(data_used, data_size), metadata=Space(meta_used, meta_size),
                    chunk=CHUNK, mode=mode, error_if_no_space=error_if_no_space,
                    needs_check=needs_check, low_water_mark=lwm, settings=settings)


def plan(view, room=GiB, data_rate=0.0, metadata_rate=0.0, reaction=2.0):
    return plan_pool(view, room=room, extent=EXTENT, data_rate=data_rate,
                     metadata_rate=metadata_rate, reaction=reaction)


# --- settings ----------------------------------------------------------------------------------

def test_settings_from_tags():
    s = settings(frozenset({"ts_pool", "ts_grow_threshold=80", "ts_grow_step=268435456"}))
    assert s == Settings(threshold=80.0, step=256 * MiB, enabled=True)


def test_untagged_means_defaults_and_growth_on():
    assert settings(frozenset()) == Settings(DEFAULT_THRESHOLD, None, True)


def test_no_grow_tag_switches_growth_off():
    assert not settings(frozenset({"ts_no_grow"})).enabled


@pytest.mark.parametrize("tag", ["ts_grow_threshold=abc", "ts_grow_threshold=0",
                                 "ts_grow_threshold=100", "ts_grow_step=-5", "ts_grow_step=x"])
def test_malformed_tags_fall_back_to_defaults(tag):
    assert settings(frozenset({tag})) == Settings(DEFAULT_THRESHOLD, None, True)


# --- the write rate ----------------------------------------------------------------------------

def test_write_rate_is_growth_over_time():
    assert write_rate([Reading(10.0, 0), Reading(11.0, 10 * MiB), Reading(12.0, 40 * MiB)]) \
        == 20 * MiB


@pytest.mark.parametrize("readings", [[], [Reading(1.0, 5)], [Reading(1.0, 50), Reading(2.0, 10)],
                                      [Reading(1.0, 0), Reading(1.0, 10)]])
def test_write_rate_without_growth_or_time_is_zero(readings):
    assert write_rate(readings) == 0.0


# --- pools -------------------------------------------------------------------------------------

def test_below_threshold_nothing_to_do():
    assert plan(pool(data_used=100 * MiB)) == PoolPlan()


def test_crossing_the_threshold_grows_by_the_step():
    assert plan(pool(data_used=180 * MiB)) == PoolPlan(grow_data=128 * MiB)


def test_untagged_step_is_a_quarter_of_the_pool_at_least_64_mib():
    untagged = Settings(70.0, None, True)
    assert plan(pool(data_used=180 * MiB, settings=untagged)).grow_data == 64 * MiB
    assert plan(pool(data_used=720 * MiB, data_size=GiB, settings=untagged)).grow_data == 256 * MiB


def test_fast_writers_get_a_bigger_step():
    # 100 MiB/s for 3 s of reaction: 300 MiB, rounded up to whole extents.
    p = plan(pool(data_used=180 * MiB), data_rate=100 * MiB, reaction=3.0)
    assert p.grow_data == 300 * MiB
    p = plan(pool(data_used=180 * MiB), data_rate=10 * MiB + 1, reaction=3.0)
    assert p.grow_data == 128 * MiB  # the step already covers it


def test_step_rounds_up_to_extents():
    s = Settings(70.0, 10 * MiB, True)
    assert plan(pool(data_used=180 * MiB, settings=s)).grow_data == 12 * MiB


def test_after_a_burst_the_step_brings_use_back_under_the_threshold():
    assert plan(pool(data_used=250 * MiB)).grow_data == 128 * MiB  # 98% -> 65%
    p = plan(pool(data_used=GiB - 4 * MiB, data_size=GiB))  # 128 MiB would leave it at 88%
    assert p == PoolPlan(grow_data=436 * MiB)  # 1020 / 1460 = 69.9%


def test_growth_is_capped_by_the_vg_free_space():
    p = plan(pool(data_used=180 * MiB), room=64 * MiB + 123)
    assert p.grow_data == 64 * MiB  # enough to get under the threshold: no alert
    assert p.alert is None and p.error_if_no_space is None


def test_no_room_switches_to_error_mode_and_alerts():
    p = plan(pool(data_used=200 * MiB), room=0)
    assert p.grow_data == 0
    assert p.error_if_no_space is True
    assert "no room" in p.alert


def test_some_room_but_not_enough_grows_what_it_can_and_alerts():
    p = plan(pool(data_used=250 * MiB), room=8 * MiB)
    assert p.grow_data == 8 * MiB
    assert p.error_if_no_space is True and p.alert


def test_already_in_error_mode_without_room_just_alerts():
    p = plan(pool(data_used=200 * MiB, error_if_no_space=True), room=0)
    assert p.error_if_no_space is None and p.alert and not p.reloads


def test_room_back_grows_and_returns_to_queue_mode():
    p = plan(pool(data_used=256 * MiB, mode="out_of_data_space", error_if_no_space=True),
             room=GiB)
    assert p.grow_data >= 128 * MiB and p.error_if_no_space is False and p.alert is None


def test_error_mode_below_threshold_returns_to_queue_mode():
    p = plan(pool(data_used=10 * MiB, error_if_no_space=True), room=0)
    assert p == PoolPlan(error_if_no_space=False)


def test_no_grow_leaves_the_pool_alone():
    off = Settings(70.0, None, False)
    assert plan(pool(data_used=250 * MiB, settings=off), room=0) == PoolPlan()
    assert plan(pool(data_used=250 * MiB, lwm=0, settings=off)) == PoolPlan()


@pytest.mark.parametrize("mode,needs_check", [("ro", False), ("rw", True)])
def test_a_broken_pool_is_an_alert_and_not_touched(mode, needs_check):
    p = plan(pool(data_used=250 * MiB, mode=mode, needs_check=needs_check))
    assert p.alert and not p.reloads


def test_metadata_crossing_its_threshold_grows_by_a_quarter_at_least_an_extent():
    p = plan(pool(meta_used=3 * MiB, meta_size=4 * MiB))
    assert p == PoolPlan(grow_metadata=4 * MiB)
    p = plan(pool(meta_used=60 * MiB, meta_size=64 * MiB))
    assert p.grow_metadata == 24 * MiB  # 16 MiB would leave it at 75%


def test_metadata_and_data_share_the_room():
    p = plan(pool(data_used=200 * MiB, meta_used=3 * MiB, meta_size=4 * MiB), room=132 * MiB)
    assert (p.grow_data, p.grow_metadata) == (128 * MiB, 4 * MiB)
    p = plan(pool(data_used=200 * MiB, meta_used=3 * MiB, meta_size=4 * MiB), room=128 * MiB)
    assert p.grow_data == 128 * MiB and p.grow_metadata == 0 and "metadata" in p.alert
    assert p.error_if_no_space is None  # data is fine; error mode is about data space


def test_metadata_stops_at_the_kernel_limit():
    p = plan(pool(meta_used=METADATA_MAX - MiB, meta_size=METADATA_MAX), room=100 * GiB)
    assert p.grow_metadata == 0 and "metadata" in p.alert


def test_a_disarmed_low_water_mark_is_rearmed():
    p = plan(pool(data_used=10 * MiB, lwm=0))
    assert p == PoolPlan(rearm=True)


def test_a_reload_rearms_anyway():
    p = plan(pool(data_used=200 * MiB, lwm=0))
    assert p.grow_data and not p.rearm


def test_commands_that_load_a_pool_carry_its_own_threshold():
    assert arming(frozenset()) == "activation{thin_pool_autoextend_threshold=70 monitoring=0}"
    assert arming(frozenset({"ts_grow_threshold=85.5"})).endswith("=85 monitoring=0}")
    assert arming(frozenset({"ts_grow_threshold=30"})).endswith("=50 monitoring=0}")  # LVM's least


def test_low_water_mark_is_what_lvm_sets():
    # Measured in the lab: a 256 MiB pool of 64 KiB chunks (4096 blocks) at 70% gets 1228.
    assert low_water_mark(4096, 70) == 1228
    assert low_water_mark(5120, 70) == 1536
    assert low_water_mark(6144, 70.9) == 1843
    assert low_water_mark(4096, 30) == 2048  # LVM does not go below 50%
    assert lvm_threshold(30) == 50 and lvm_threshold(99.5) == 99


# --- metadata projection -----------------------------------------------------------------------

def pool_status(data_used, data_size, meta_used, meta_size):
    return ThinPoolStatus(transaction_id=1, used_metadata_blocks=meta_used // 4096,
                          total_metadata_blocks=meta_size // 4096,
                          used_data_blocks=data_used // CHUNK, total_data_blocks=data_size // CHUNK,
                          held_metadata_root=None, mode=PoolMode.RW,
                          discards=Discards.NO_PASSDOWN, error_if_no_space=False,
                          needs_check=False, metadata_low_watermark=None)


def test_spaces_in_bytes_from_a_pool_status():
    data, metadata = spaces(pool_status(100 * MiB, GiB, 512 * KiB, 4 * MiB), CHUNK)
    assert data == Space(100 * MiB, GiB) and metadata == Space(512 * KiB, 4 * MiB)


def test_metadata_projection_ok_when_every_free_block_fits():
    # 14,784 free blocks: under 1 MiB of mappings.
    st = pool_status(100 * MiB, GiB, 512 * KiB, 4 * MiB)
    assert metadata_projection_ok(st, chunk=CHUNK, room=0)


def test_metadata_projection_refuses_when_it_would_run_out():
    st = pool_status(0, 64 * GiB, MiB, 8 * MiB)  # a million free blocks: 64 MiB of mappings
    assert not metadata_projection_ok(st, chunk=CHUNK, room=0)
    # ... unless the VG has room for the metadata to grow into.
    assert metadata_projection_ok(st, chunk=CHUNK, room=GiB)


def test_metadata_projection_counts_the_new_devices():
    st = pool_status(GiB, GiB, 4 * MiB - 128 * KiB, 4 * MiB)
    assert metadata_projection_ok(st, chunk=CHUNK, room=0, new_devices=1)
    assert not metadata_projection_ok(st, chunk=CHUNK, room=0, new_devices=3)


# --- CoW stores --------------------------------------------------------------------------------

DEFAULT_SETTINGS = Settings(70.0, None, True)


def cow(used, size=8 * MiB, *, origin=GiB, invalid=False, settings=DEFAULT_SETTINGS):
    return CowView(store=Space(used, size), origin_size=origin, chunk=4 * KiB, invalid=invalid,
                   settings=settings)


def cow_plan(view, room=GiB, rate=0.0, reaction=2.0):
    return plan_cow(view, room=room, extent=EXTENT, rate=rate, reaction=reaction)


def test_cow_below_threshold_nothing():
    assert cow_plan(cow(5 * MiB)).grow == 0


def test_cow_default_step_is_64_mib_or_a_quarter():
    assert cow_plan(cow(6 * MiB)).grow == 64 * MiB
    assert cow_plan(cow(600 * MiB, size=800 * MiB)).grow == 200 * MiB


def test_cow_tagged_step_and_rate():
    s = Settings(50.0, 16 * MiB, True)
    assert cow_plan(cow(5 * MiB, settings=s)).grow == 16 * MiB
    assert cow_plan(cow(5 * MiB, settings=s), rate=50 * MiB, reaction=2.0).grow == 100 * MiB


def test_cow_never_grows_past_a_copy_of_its_whole_origin():
    # 64 MiB origin, 4 KiB chunks: 16384 data chunks, 64 of exceptions and a header; LVM caps
    # such a store at 68 MiB, the next whole extent (measured in the lab).
    assert cow_max_size(64 * MiB, 4 * KiB) == 64 * MiB + 65 * 4 * KiB
    assert cow_plan(cow(6 * MiB, origin=64 * MiB)).grow == 60 * MiB
    assert cow_plan(cow(60 * MiB, size=68 * MiB, origin=64 * MiB)) == \
        plan_cow(cow(0, origin=64 * MiB), room=0, extent=EXTENT, rate=0, reaction=0)


def test_cow_without_room_alerts():
    p = cow_plan(cow(7 * MiB), room=0)
    assert p.grow == 0 and "invalid" in p.alert


def test_cow_invalid_is_an_alert():
    assert "lost" in cow_plan(cow(8 * MiB, invalid=True)).alert


def test_cow_no_grow():
    assert cow_plan(cow(7 * MiB, settings=Settings(70.0, None, False))).grow == 0


def test_growth_reports_short_only_when_capped():
    g = growth(Space(90, 100), 70.0, 1, rate=0, reaction=0, extent=1, room=1000)
    assert (g.add, g.short) == (29, False)
    g = growth(Space(90, 100), 70.0, 1, rate=0, reaction=0, extent=1, room=10)
    assert (g.add, g.short) == (10, True)
