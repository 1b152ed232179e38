"""The simulated clock: a speed factor between wall and simulated time, both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from p2pdoe.core.realtime.clock import SimClock

SIM0 = datetime(2026, 6, 21, tzinfo=UTC)
WALL0 = datetime(2026, 11, 24, 12, tzinfo=UTC)


def test_a_day_at_speed_480_lasts_three_minutes() -> None:
    clock = SimClock(SIM0, WALL0, speed=480.0)
    assert clock.sim_at(WALL0 + timedelta(minutes=3)) == SIM0 + timedelta(hours=24)
    assert clock.wall_at(SIM0 + timedelta(hours=24)) == WALL0 + timedelta(minutes=3)
    assert clock.wall_seconds(15 * 60) == pytest.approx(1.875)
    assert clock.sim_delta(1.875) == timedelta(minutes=15)


def test_speed_one_is_wall_time_shifted() -> None:
    clock = SimClock(SIM0, WALL0)
    moment = WALL0 + timedelta(seconds=12.5)
    assert clock.sim_at(moment) - SIM0 == moment - WALL0
    assert clock.wall_at(clock.sim_at(moment)) == moment


@pytest.mark.parametrize("speed", [0.0, -2.0, float("nan")])
def test_a_speed_that_is_not_positive_is_refused(speed: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        SimClock(SIM0, WALL0, speed)


def test_naive_origins_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        SimClock(datetime(2026, 6, 21), WALL0)
