"""The pacer's token bucket: the background copy of a live import held to its rate (no kernel
needed; the lab test runs the process against dm-clone)."""

from __future__ import annotations

import pytest

from thinstack.pacer import MIN_PULSE, TICK, Bucket, pulse

MiB = 1 << 20


def run(bucket: Bucket, seconds: float, speed: float, in_flight: float = 0.0) -> list[float]:
    """The kernel as the pacer sees it each tick: while hydration is on it copies `speed`
    bytes/s, and `in_flight` more lands in the tick after it was turned off."""
    copied, on, late = [], False, 0.0
    for _ in range(round(seconds / TICK)):
        step = (speed * TICK if on else 0.0) + late
        late = in_flight if on else 0.0
        copied.append(step)
        on = bucket.copy(int(step), TICK)
    return copied


@pytest.mark.parametrize("speed", [4 * MiB, 60 * MiB, 600 * MiB])
def test_over_time_the_copy_runs_at_the_rate_whatever_the_disk_does(speed):
    rate = 10 * MiB
    copied = run(Bucket(rate, rate * TICK), 60, speed, in_flight=4 * MiB)
    total = sum(copied)
    if speed < rate:
        assert total >= 0.9 * speed * 60  # slower than the rate: never held back much
    else:
        # Within a tick's worth and what was in flight of rate x time.
        assert abs(total - rate * 60) <= rate * TICK + 4 * MiB + speed * TICK
    # No second copies more than the rate plus one tick of the disk's speed and the tail.
    per_second = [sum(copied[i:i + 10]) for i in range(0, len(copied), 10)]
    assert max(per_second) <= rate + speed * TICK + 4 * MiB


def test_time_without_copying_saves_only_a_tick():
    # (The kernel starts no copy while the guest has I/O in flight: a guest busy for a minute
    # must not earn the copy a minute at full speed afterwards.)
    rate = 10 * MiB
    bucket = Bucket(rate, rate * TICK)
    assert bucket.copy(0, 60.0)
    assert bucket.tokens == rate * TICK


def test_a_tick_that_ran_ahead_is_paid_back_before_the_copy_goes_on():
    rate = 10 * MiB
    bucket = Bucket(rate, rate * TICK)
    assert not bucket.copy(5 * MiB, TICK)  # 5 MiB in a tick: 4 MiB ahead
    offs = 0
    while not bucket.copy(0, TICK):
        offs += 1
    assert offs == 4  # 4 MiB ahead at 1 MiB a tick: off for 4 ticks


def test_a_pulse_lasts_what_the_bucket_holds_at_the_speed_seen():
    assert pulse(1 * MiB, 100 * MiB) == pytest.approx(0.01)
    assert pulse(100 * MiB, 100 * MiB) == TICK  # never longer than a tick
    assert pulse(1, 100 * MiB) == MIN_PULSE  # nor shorter than the messages take
