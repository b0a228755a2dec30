"""The monitor's mapping of decisions to commands, over a fake LVM and a fake device-mapper."""

from __future__ import annotations

import dataclasses
import signal
from unittest import mock

import pytest

from tests.fakes import FakeLvm
from thinstack import monitor
from thinstack.dm.client import DeviceInfo
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError
from thinstack.dm.status import Discards, Failed, PoolMode, ThinPoolStatus
from thinstack.dm.targets import Table, ThinPoolTarget
from thinstack.errors import Alert
from thinstack.lvm import LV, VG

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * KiB
BLOCKS_256M = 256 * MiB // CHUNK
CONFIG = ["--config", "activation{thin_pool_autoextend_threshold=70 monitoring=0}"]
ARMED = BLOCKS_256M * 30 // 100  # the low-water mark LVM sets for 70%
POOL_TAGS = frozenset({"ts_pool", "ts_grow_threshold=70", f"ts_grow_step={64 * MiB}"})


def lv(name, attr, *, size=256 * MiB, tags=frozenset(), origin="", data_percent=None,
       chunk=CHUNK, vg="vg", segtype="linear"):
    # lvs reports an old-style snapshot's segtype as its store's: linear.
    return LV(vg=vg, name=name, uuid=name, attr=attr, size=size, segtype=segtype, pool="",
              origin=origin, data_percent=data_percent, metadata_percent=None, tags=tags,
              path=f"/dev/{vg}/{name}", dm_path=f"/dev/mapper/{vg}-{name}", thin_id=None,
              chunk_size=chunk, metadata_size=4 * MiB, skip_activation=False, when_full="")


def pool_lv(tags=POOL_TAGS, vg="vg"):
    return lv("pool", "twi-aotz--", tags=tags, vg=vg, segtype="thin-pool")


def vg(free=GiB, name="vg"):
    return VG(name=name, uuid=name, size=2 * GiB, free=free, extent_size=4 * MiB,
              extent_count=512, free_count=free // (4 * MiB), pv_count=1, tags=frozenset())


def status(used_blocks=0, total_blocks=BLOCKS_256M, *, meta_used=100, meta_total=1024,
           mode=PoolMode.RW, error_if_no_space=False, needs_check=False):
    return ThinPoolStatus(transaction_id=1, used_metadata_blocks=meta_used,
                          total_metadata_blocks=meta_total, used_data_blocks=used_blocks,
                          total_data_blocks=total_blocks, held_metadata_root=None, mode=mode,
                          discards=Discards.NO_PASSDOWN, error_if_no_space=error_if_no_space,
                          needs_check=needs_check, metadata_low_watermark=None)


class FakeDM:
    """Pools by device-mapper name; each has a status and a table low-water mark."""

    def __init__(self, **pools):
        self.pools = pools  # name -> (status, low_water_mark)
        self.reloads = []  # (name, table, noflush) of each table reload, in order

    def reload(self, name, table, noflush=False):
        self.reloads.append((name, table, noflush))

    def exists(self, name):
        return name in self.pools

    def info(self, name):  # live, and not suspended
        return DeviceInfo(name, 254, 2, 1, 0, True, False, False, False, None) \
            if name in self.pools else None

    def target_status(self, name):
        return self.pools[name][0]

    def table(self, name):
        return Table.of(BLOCKS_256M * 128, ThinPoolTarget("254:0", "254:1", 128,
                                                          self.pools[name][1]))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fake LVM, the default for a Monitor that is handed none."""
    fake = FakeLvm()
    monkeypatch.setattr("thinstack.lvm.LVM", fake)
    return fake


def setup(fake, lvs, vgs):
    """The volumes as `lvs` reports them: each row with its VG's free space and extent size."""
    by_name = {v.name: v for v in vgs}
    fake.lv_list[:] = [dataclasses.replace(x, vg_free=by_name[x.vg].free,
                                           vg_extent_size=by_name[x.vg].extent_size)
                       if x.vg in by_name else x for x in lvs]
    fake.vg_list[:] = vgs


def commands(fake):
    return [list(c) for c in fake.commands]


def one_pass(dm, interval=5.0):
    return monitor.Monitor(interval, dm).check_all()


# --- pools -------------------------------------------------------------------------------------

def test_pool_below_threshold_with_its_event_armed_runs_nothing(env, mocker):
    setup(env, [pool_lv()], [vg()])
    [report] = one_pass(FakeDM(**{"vg-pool-tpool": (status(1000), ARMED)}))
    assert commands(env) == []
    assert report.alert is None and report.data_percent == pytest.approx(1000 / 40.96)


def test_pool_over_threshold_is_extended_by_the_step(env, mocker):
    setup(env, [pool_lv()], [vg()])
    [report] = one_pass(FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)}))
    assert commands(env) == [["lvextend", "-q", "-L", f"+{64 * MiB}b", "vg/pool", *CONFIG]]
    assert report.growths == 1


def test_the_service_takes_each_pool_over_from_dmeventd_once(env, mocker):
    setup(env, [pool_lv()], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (status(1000), ARMED)})
    one_pass(dm)
    assert commands(env) == []  # a one-off pass leaves the pool as it found it
    service = monitor.Monitor(1.0, dm, takes_over=True)
    service.check_all()
    service.check_all()
    assert commands(env) == [["lvchange", "-q", "--monitor", "n", "vg/pool"]]


def test_a_pool_dmeventd_keeps_is_grown_all_the_same(env, capsys):
    setup(env, [pool_lv()], [vg()])
    env.runner.fail(["lvm", "lvchange"], "dmeventd not responding")
    service = monitor.Monitor(1.0, FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)}),
                              takes_over=True)
    [report] = service.check_all()
    assert report.growths == 1 and report.alert is None
    assert "vg/pool: left registered with dmeventd" in capsys.readouterr().err


def test_the_pool_itself_when_it_has_no_thin_volumes_yet(env, mocker):
    setup(env, [pool_lv()], [vg()])
    one_pass(FakeDM(**{"vg-pool": (status(3000), ARMED)}))
    assert commands(env)[0][0] == "lvextend"


def test_metadata_over_threshold_grows_the_metadata(env, mocker):
    setup(env, [pool_lv()], [vg()])
    one_pass(FakeDM(**{"vg-pool-tpool": (status(10, meta_used=800), ARMED)}))
    assert commands(env) == [["lvextend", "-q", "--poolmetadatasize", f"+{4 * MiB}b", "vg/pool",
                              *CONFIG]]


def test_a_disarmed_low_water_mark_is_set_again_through_lvm(env, mocker):
    setup(env, [pool_lv()], [vg()])
    one_pass(FakeDM(**{"vg-pool-tpool": (status(10), 0)}))
    assert commands(env) == [["lvchange", "-q", "--refresh", "vg/pool", *CONFIG]]


def test_threshold_below_lvms_minimum_is_given_as_50(env, mocker):
    tags = frozenset({"ts_pool", "ts_grow_threshold=30"})
    setup(env, [pool_lv(tags)], [vg()])
    one_pass(FakeDM(**{"vg-pool-tpool": (status(10), 0)}))
    assert commands(env)[0][-1] == "activation{thin_pool_autoextend_threshold=50 monitoring=0}"


def test_no_room_switches_to_error_mode_and_once_exits_7(env, mocker, tmp_path, capsys):
    setup(env, [pool_lv()], [vg(free=0)])
    dm = FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)})
    with pytest.raises(Alert) as raised:
        monitor.run(once=True, interval=5, dm=dm)
    assert raised.value.exit_status == 7
    # The kernel's table first (its writers get ENOSPC at once), without flushing queued I/O;
    # LVM's record after.
    [(name, table, noflush)] = dm.reloads
    assert (name, table.target.error_if_no_space, noflush) == ("vg-pool-tpool", True, True)
    assert table.target.low_water_mark == ARMED  # the rest of the table as it was
    assert commands(env) == [["lvchange", "-q", "--errorwhenfull", "y", "vg/pool", *CONFIG]]
    assert "ALERT vg/pool" in capsys.readouterr().err
    text = (tmp_path / "run" / "monitor.prom").read_text()
    assert 'thinstack_alert{vg="vg",pool="pool"} 1' in text
    assert 'thinstack_pool_error_if_no_space{vg="vg",pool="pool"} 1' in text


def test_a_pool_at_its_limit_errors_while_its_neighbour_grows(env):
    """Two tenants of one VG, both over their threshold: the one at its limit (ts_limit, as
    `pool set` tags it) gets no extent of the VG's room and errors; the other grows."""
    limited = pool_lv(POOL_TAGS | {f"ts_limit={256 * MiB}"})
    other = dataclasses.replace(pool_lv(), name="t2", uuid="t2", dm_path="/dev/mapper/vg-t2")
    setup(env, [limited, other], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (status(3000), ARMED), "vg-t2-tpool": (status(3000), ARMED)})
    reports = {r.name: r for r in one_pass(dm)}
    assert commands(env) == [["lvchange", "-q", "--errorwhenfull", "y", "vg/pool", *CONFIG],
                             ["lvextend", "-q", "-L", f"+{64 * MiB}b", "vg/t2", *CONFIG]]
    assert [name for name, _, _ in dm.reloads] == ["vg-pool-tpool"]
    assert "at its limit (256MiB)" in reports["pool"].alert
    assert "`thinstack pool set vg/pool --limit SIZE`" in reports["pool"].alert
    assert reports["t2"].alert is None and reports["t2"].growths == 1


def test_room_back_grows_then_queues_again(env, mocker, tmp_path):
    setup(env, [pool_lv()], [vg()])
    full = status(BLOCKS_256M, mode=PoolMode.OUT_OF_DATA_SPACE, error_if_no_space=True)
    assert monitor.run(once=True, interval=5, dm=FakeDM(**{"vg-pool-tpool": (full, ARMED)})) == 0
    [grow, mode] = commands(env)
    assert grow[:2] == ["lvextend", "-q"] and grow[3] == f"+{112 * MiB}b"  # back under 70%
    assert mode == ["lvchange", "-q", "--errorwhenfull", "n", "vg/pool", *CONFIG]
    text = (tmp_path / "run" / "monitor.prom").read_text()
    assert 'thinstack_alert{vg="vg",pool="pool"} 0' in text
    assert 'thinstack_pool_error_if_no_space{vg="vg",pool="pool"} 0' in text


def test_no_grow_pool_is_left_alone(env, mocker):
    setup(env, [pool_lv(POOL_TAGS | {"ts_no_grow"})], [vg(free=0)])
    [report] = one_pass(FakeDM(**{"vg-pool-tpool": (status(BLOCKS_256M - 1), 0)}))
    assert commands(env) == [] and report.alert is None


def test_untagged_pools_are_not_thinstacks(env, mocker):
    setup(env, [pool_lv(frozenset())], [vg()])
    assert one_pass(FakeDM()) == []


def test_a_failed_pool_is_an_alert(env, mocker):
    setup(env, [pool_lv()], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (Failed(), 0)})
    [report] = one_pass(dm)
    assert commands(env) == [] and "failed" in report.alert and report.mode == "fail"


def test_a_fast_writer_gets_a_bigger_step(env, mocker):
    setup(env, [pool_lv()], [vg()])
    clock = mocker.patch("thinstack.monitor.time.monotonic", return_value=100.0)
    env.on_command = lambda *args: setattr(clock, "return_value", clock.return_value + 3)
    dm = FakeDM(**{"vg-pool-tpool": (status(100), ARMED)})
    m = monitor.Monitor(1.0, dm)
    m.check_all()
    # 3200 blocks (200 MiB) in 4 s: 50 MiB/s, for 1 s of interval and twice the first guess at
    # an lvextend's time (2 s): 250 MiB, in whole 4 MiB extents.
    dm.pools["vg-pool-tpool"] = (status(3300), ARMED)
    clock.return_value = 104.0
    m.check_all()
    assert commands(env) == [["lvextend", "-q", "-L", f"+{252 * MiB}b", "vg/pool", *CONFIG]]
    # That lvextend took 3 s: now 7 s at 50 MiB/s.
    dm.pools["vg-pool-tpool"] = (status(6500, BLOCKS_256M + 4032), ARMED)
    clock.return_value = 108.0
    m.check_all()
    assert commands(env)[-1][3] == f"+{352 * MiB}b"


def test_one_pools_failure_does_not_stop_the_others(env, mocker):
    setup(env, [pool_lv(vg="a"), pool_lv(vg="b")], [vg(name="a"), vg(name="b")])
    env.runner.on("lvm", CommandError(["lvm"], 5, "boom"), "")
    dm = FakeDM(**{"a-pool-tpool": (status(3000), ARMED),
                   "b-pool-tpool": (status(3000), ARMED)})
    a, b = one_pass(dm)
    assert "boom" in a.alert and b.alert is None and b.growths == 1
    assert [c[4] for c in commands(env)] == ["a/pool", "b/pool"]


# --- CoW volumes and sharing the room ----------------------------------------------------------

def cow_lvs(percent, *, size=8 * MiB, tags=frozenset()):
    return [lv("base", "ori-a-s---", size=GiB),
            lv("cow", "swi-a-s---", size=size, origin="base", data_percent=percent, tags=tags,
               chunk=4 * KiB)]


def test_cow_over_threshold_grows_its_store(env, mocker):
    setup(env, cow_lvs(75.0), [vg()])
    [report] = one_pass(FakeDM())
    # Without dmeventd's unregistering and registering again (growth.DMEVENTD_UNTOUCHED).
    assert commands(env) == [["lvextend", "-q", "-L", f"+{64 * MiB}b", "vg/cow", "--config",
                              "activation{monitoring=0}"]]
    assert report.kind == "cow" and report.growths == 1


def test_cow_below_threshold_runs_nothing(env, mocker):
    setup(env, cow_lvs(50.0), [vg()])
    one_pass(FakeDM())
    assert commands(env) == []


def test_invalid_cow_is_an_alert(env, mocker):
    lvs = cow_lvs(None)
    lvs[1] = lv("cow", "swi-I-s---", size=8 * MiB, origin="base", chunk=4 * KiB)
    setup(env, lvs, [vg()])
    [report] = one_pass(FakeDM())
    assert "invalid" in report.alert and commands(env) == []


def test_devices_in_one_vg_share_its_room(env, mocker):
    setup(env, [pool_lv(), *cow_lvs(75.0)], [vg(free=96 * MiB)])
    pool, cow = one_pass(FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)}))
    assert [c[3] for c in commands(env)] == [f"+{64 * MiB}b", f"+{32 * MiB}b"]
    assert pool.alert is None and cow.alert is None


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_in_prometheus_text_format():
    text = monitor.metrics_text([
        monitor.Report("pool", "vg", "pool", data_percent=71.5, metadata_percent=10.0,
                       mode="rw", error_if_no_space=False, growths=3),
        monitor.Report("cow", "vg", "c", data_percent=40.0, alert="full")])
    lines = text.splitlines()
    assert 'thinstack_pool_data_percent{vg="vg",pool="pool"} 71.50' in lines
    assert 'thinstack_pool_metadata_percent{vg="vg",pool="pool"} 10.00' in lines
    assert 'thinstack_pool_mode{vg="vg",pool="pool",mode="rw"} 1' in lines
    assert 'thinstack_growths_total{vg="vg",pool="pool"} 3' in lines
    assert 'thinstack_cow_percent{vg="vg",cow="c"} 40.00' in lines
    assert 'thinstack_alert{vg="vg",cow="c"} 1' in lines
    assert "# TYPE thinstack_growths_total counter" in lines
    names = {line.split("{")[0] for line in lines if not line.startswith("#")}
    assert all(f"# TYPE {name} " in text and f"# HELP {name} " in text for name in names)


def test_each_pool_reports_its_space_limit_and_budget():
    text = monitor.metrics_text([
        monitor.Report("pool", "vg", "t1", data_percent=50.0, metadata_percent=1.0, mode="rw",
                       data_size=64 << 20, data_used=32 << 20, limit=128 << 20,
                       provisioned=200 << 20, overcommit=1.5),
        monitor.Report("pool", "vg", "t2", data_percent=10.0, metadata_percent=1.0, mode="rw",
                       data_size=32 << 20, data_used=3 << 20)])
    lines = text.splitlines()
    for line in ('thinstack_pool_data_bytes{vg="vg",pool="t1"} 67108864',
                 'thinstack_pool_used_bytes{vg="vg",pool="t1"} 33554432',
                 'thinstack_pool_limit_bytes{vg="vg",pool="t1"} 134217728',
                 'thinstack_pool_provisioned_bytes{vg="vg",pool="t1"} 209715200',
                 'thinstack_pool_overcommit_ratio{vg="vg",pool="t1"} 1.5',
                 'thinstack_pool_data_bytes{vg="vg",pool="t2"} 33554432'):
        assert line in lines, line
    # No limit, budget or (not yet read) provisioned size: no sample, rather than a made-up one.
    assert not [line for line in lines if 'pool="t2"' in line and
                line.startswith(("thinstack_pool_limit", "thinstack_pool_overcommit",
                                 "thinstack_pool_provisioned"))]


# --- the loop ----------------------------------------------------------------------------------

def test_watcher_waits_from_each_new_event_and_ends_with_its_device():
    class DM:
        answers = [3, None, 4]  # an event, a timeout, an event; then the device is gone
        asked = []

        def info(self, name):
            return DeviceInfo(name, 254, 2, 1, 2, True, False, False, False, None)

        def wait(self, name, event_nr, timeout):
            self.asked.append(event_nr)
            if not self.answers:
                raise DmError("removed")
            return self.answers.pop(0)

    wakes = []
    wake = mock.Mock(set=lambda: wakes.append(DM.asked[-1]))
    monitor.Watcher(DM(), "vg-pool-tpool", wake, timeout=0.01).run()
    assert DM.asked == [2, 3, 3, 4]
    assert wakes == [2, 3, 4]  # after each event, and once more when the device went away


def test_loop_runs_passes_until_sigterm_and_exits_cleanly(env, mocker, tmp_path):
    setup(env, [], [])
    handlers = {}
    mocker.patch("thinstack.monitor.signal.signal",
                 side_effect=lambda sig, handler: handlers.setdefault(sig, handler))
    passes = []

    def check_all(self):
        passes.append(1)
        if len(passes) == 3:
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return []

    mocker.patch.object(monitor.Monitor, "check_all", check_all)
    assert monitor.run(once=False, interval=0.01) == 0
    assert len(passes) == 3
    assert (tmp_path / "run" / "monitor.prom").exists()


def test_systemd_unit_runs_the_monitor_and_always_restarts_it():
    import configparser
    from pathlib import Path

    unit = configparser.ConfigParser()
    unit.read(Path(monitor.__file__).with_name("units") / "thinstack-monitor.service")
    assert unit["Service"]["ExecStart"].split()[:2] == ["thinstack", "monitor"]
    assert unit["Service"]["Restart"] == "always"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"


def test_two_monitors_never_grow_the_same_pool_at_once(env, mocker):
    """Issue 8, 13c: growth is serialised per pool by a flock (per open file description, so a
    second monitor in this same process conflicts as one in another process would)."""
    from thinstack.lock import flocked

    setup(env, [pool_lv()], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)})
    with flocked(monitor.growth_lock(pool_lv()), 1, "held"):  # the other monitor, mid-growth
        [report] = one_pass(dm)
    assert commands(env) == [] and report.busy and report.alert is None
    [report] = one_pass(dm)  # the lock released: this monitor grows it
    assert [c[0] for c in commands(env)] == ["lvextend"] and not report.busy


def test_concurrent_passes_grow_once(env, mocker):
    """Two monitors (threads here) in a pass over the same pool at the same time, both having
    read it over its threshold: one lvextend, not two."""
    import threading

    setup(env, [pool_lv()], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (status(3000), ARMED)})
    together = threading.Barrier(2, timeout=1)
    real = monitor.Monitor.check_pool

    def check_pool(self, *args):
        try:
            together.wait()  # both in their pass at once, unless the lock keeps one out
        except threading.BrokenBarrierError:
            pass
        return real(self, *args)
    mocker.patch.object(monitor.Monitor, "check_pool", check_pool)
    threads = [threading.Thread(target=monitor.Monitor(5.0, dm).check_all) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c[0] for c in commands(env)] == ["lvextend"]


# --- pool modes --------------------------------------------------------------------------------

def test_every_mode_change_away_from_rw_is_an_alert_and_the_return_is_logged(env, capsys):
    setup(env, [pool_lv()], [vg()])
    dm = FakeDM(**{"vg-pool-tpool": (status(10), ARMED)})
    m = monitor.Monitor(5.0, dm)
    [report] = m.check_all()
    assert report.mode == "rw" and report.alert is None and "mode" not in capsys.readouterr().err
    dm.pools["vg-pool-tpool"] = (status(10, mode=PoolMode.RO), ARMED)
    [report] = m.check_all()
    assert report.mode == "ro" and report.alert.endswith("(`thinstack pool repair vg/pool`)")
    assert "ALERT vg/pool: mode rw -> ro" in capsys.readouterr().err
    dm.pools["vg-pool-tpool"] = (status(10, mode=PoolMode.RO, needs_check=True), ARMED)
    [report] = m.check_all()
    assert report.mode == "needs_check"
    assert "ALERT vg/pool: mode ro -> needs_check" in capsys.readouterr().err
    dm.pools["vg-pool-tpool"] = (Failed(), ARMED)
    [report] = m.check_all()
    assert "ALERT vg/pool: mode needs_check -> fail" in capsys.readouterr().err
    assert 'thinstack_pool_mode{vg="vg",pool="pool",mode="fail"} 1' in \
        monitor.metrics_text([report]).splitlines()
    dm.pools["vg-pool-tpool"] = (status(10), ARMED)
    [report] = m.check_all()
    err = capsys.readouterr().err
    assert "vg/pool: mode fail -> rw" in err and "ALERT vg/pool: mode" not in err
    assert report.alert is None


def test_a_pool_out_of_data_space_that_cannot_grow_names_the_way_out(env):
    setup(env, [pool_lv(POOL_TAGS | {"ts_no_grow"})], [vg(free=0)])
    full = status(BLOCKS_256M, mode=PoolMode.OUT_OF_DATA_SPACE)
    [report] = one_pass(FakeDM(**{"vg-pool-tpool": (full, ARMED)}))
    assert report.mode == "out_of_data_space" and "thinstack pool extend vg" in report.alert


# --- per-volume usage --------------------------------------------------------------------------

def test_volume_usage_is_read_once_a_minute_and_shown_per_volume(env, mocker):
    vm = dataclasses.replace(lv("vm", "Vwi-a-tz--", segtype="thin"), pool="pool", thin_id=1)
    setup(env, [pool_lv(), vm], [vg()])
    reads = mocker.patch("thinstack.poolstatus.thin_usage",
                         return_value={("pool", 1): (8 * MiB, 6 * MiB, 2 * MiB),
                                       ("pool", 9): (MiB, MiB, 0),
                                       ("other", 1): (MiB, MiB, 0)})  # another pool's id 1
    m = monitor.Monitor(5.0, FakeDM(**{"vg-pool-tpool": (status(10), ARMED)}))
    [report] = m.check_all()
    assert report.volumes == (monitor.VolumeUsage("vm", 8 * MiB, 6 * MiB),)
    assert [x.name for x in reads.call_args.args[1]] == ["pool", "vm"]  # and its thin volumes
    lines = monitor.metrics_text([report]).splitlines()
    assert f'thinstack_volume_mapped_bytes{{vg="vg",pool="pool",volume="vm"}} {8 * MiB}' in lines
    assert f'thinstack_volume_exclusive_bytes{{vg="vg",pool="pool",volume="vm"}} {6 * MiB}' \
        in lines
    reads.return_value = None  # another reader holds the metadata snapshot: the last figures
    assert m.check_all()[0].volumes == report.volumes and reads.call_count == 1
    mocker.patch("time.monotonic", return_value=monitor.time.monotonic() + 61)
    assert m.check_all()[0].volumes == report.volumes and reads.call_count == 2
