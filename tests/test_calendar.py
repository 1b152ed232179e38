"""The DSO's calendar: days from local midnight to midnight (23 or 25 h across a daylight-saving
change), the gate closure the day before, and every date's own scenario. The daylight-saving dates
are checked against the rule the EU and the US publish, not against the time zone library alone."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdoe.core.calendar import Calendar, CalendarError, day_seed, round_id
from p2pdoe.errors import ScenarioError
from p2pdoe.io.scenarios import load_scenario

AMS = Calendar("Europe/Amsterdam", 900)


def last_sunday(year: int, month: int) -> date:
    day = date(year, month + 1, 1) - timedelta(days=1)
    return day - timedelta(days=(day.weekday() - 6) % 7)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_utc_day_is_24_hours_from_midnight_and_its_gate_closes_at_noon_the_day_before() -> None:
    cal = Calendar()
    day = date(2026, 6, 21)
    assert (cal.start(day), cal.end(day), cal.intervals(day)) == (utc("2026-06-21"), utc("2026-06-22"), 24)
    assert cal.gate_closure_at(day) == utc("2026-06-20T12:00")
    assert round_id(day) == "day-ahead-2026-06-21"


@pytest.mark.parametrize("year", [2026, 2027, 2031])
def test_eu_daylight_saving_days_have_23_and_25_hours_changing_at_one_utc(year: int) -> None:
    """EU rule: clocks change on the last Sunday of March and of October at 01:00 UTC."""
    spring, autumn = last_sunday(year, 3), last_sunday(year, 10)
    assert (AMS.hours(spring), AMS.intervals(spring)) == (23.0, 92)
    assert (AMS.hours(autumn), AMS.intervals(autumn)) == (25.0, 100)
    assert AMS.intervals(spring - timedelta(days=1)) == AMS.intervals(autumn + timedelta(days=1)) == 96
    # Midnight before the change is CET (UTC+1) in spring, CEST (UTC+2) in autumn.
    assert AMS.start(spring) == datetime.combine(spring, datetime.min.time(), UTC) - timedelta(hours=1)
    assert AMS.start(autumn) == datetime.combine(autumn, datetime.min.time(), UTC) - timedelta(hours=2)


def test_local_clock_hours_skip_two_oclock_in_spring_and_repeat_it_in_autumn() -> None:
    hourly = Calendar("Europe/Amsterdam", 3600)
    spring, autumn = last_sunday(2026, 3), last_sunday(2026, 10)
    assert list(hourly.local_hours(spring)) == [h + 0.5 for h in range(24) if h != 2]
    assert list(hourly.local_hours(autumn)) == [h + 0.5 for h in (0, 1, 2, 2, *range(3, 24))]


def test_us_daylight_saving_days_follow_the_second_sunday_of_march_and_the_first_of_november() -> None:
    ny = Calendar("America/New_York", 3600)
    march = date(2026, 3, 1) + timedelta(days=(6 - date(2026, 3, 1).weekday()) % 7 + 7)
    november = date(2026, 11, 1) + timedelta(days=(6 - date(2026, 11, 1).weekday()) % 7)
    assert (ny.intervals(march), ny.intervals(november)) == (23, 25)


def test_the_day_in_force_and_the_next_day_ahead_round_are_local() -> None:
    # 22:30 UTC on 21 June is 00:30 on 22 June in Amsterdam (CEST).
    assert AMS.day_of(utc("2026-06-21T22:30")) == date(2026, 6, 22)
    assert AMS.gate_closure_at(date(2026, 6, 23)) == utc("2026-06-22T10:00")
    assert AMS.next_day_ahead(utc("2026-06-22T09:59")) == date(2026, 6, 23)
    assert AMS.next_day_ahead(utc("2026-06-22T10:00")) == date(2026, 6, 24)
    # The gate closure on the day the clocks went forward is in summer time.
    spring = last_sunday(2026, 3)
    assert AMS.gate_closure_at(spring + timedelta(days=1)) == datetime.combine(
        spring, datetime.min.time(), UTC
    ) + timedelta(hours=10)


@settings(max_examples=200, deadline=None)
@given(
    st.dates(date(2000, 1, 1), date(2037, 12, 31)),
    st.sampled_from(["UTC", "Europe/Amsterdam", "America/New_York", "Australia/Sydney", "Pacific/Auckland"]),
)
def test_days_tile_time_and_their_intervals_cover_them_exactly(day: date, tz: str) -> None:
    cal = Calendar(tz, 900)
    assert cal.end(day) == cal.start(day + timedelta(days=1))
    assert cal.hours(day) in (23.0, 24.0, 25.0)
    assert cal.interval_start(day, cal.intervals(day)) == cal.end(day)
    assert cal.day_of(cal.start(day)) == day == cal.day_of(cal.end(day) - timedelta(seconds=1))
    assert len(cal.local_hours(day)) == cal.intervals(day)


def test_half_hour_daylight_saving_needs_intervals_that_divide_it() -> None:
    """Lord Howe Island moves its clocks by 30 minutes: hourly intervals cannot tile its days."""
    change = date(2026, 4, 5)  # first Sunday of April
    assert Calendar("Australia/Lord_Howe", 1800).hours(change) == 24.5
    with pytest.raises(CalendarError, match=r"24\.5 h in Australia/Lord_Howe"):
        Calendar("Australia/Lord_Howe", 3600).intervals(change)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"gate_closure": "noon"}, "HH:MM"),
        ({"gate_closure": "25:00"}, "HH:MM"),
        ({"dt_s": 7 * 60}, "does not divide an hour"),
    ],
)
def test_a_calendar_it_cannot_work_with_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(CalendarError, match=match):
        Calendar(**kwargs)  # type: ignore[arg-type]


def test_every_date_draws_its_own_seed_and_the_scenarios_date_keeps_its_own() -> None:
    anchor = date(2026, 6, 21)
    assert day_seed(7, anchor, anchor) == 7
    seeds = {day_seed(7, anchor + timedelta(days=k), anchor) for k in range(1, 366)}
    assert len(seeds) == 365
    assert day_seed(7, date(2026, 7, 1), anchor) == day_seed(7, date(2026, 7, 1), anchor)
    assert day_seed(7, date(2026, 7, 1), anchor) != day_seed(8, date(2026, 7, 1), anchor)


def test_the_scenario_of_its_own_date_is_the_scenario_itself() -> None:
    own, day = load_scenario("default"), load_scenario("default", day=date(2026, 6, 21))
    assert (day.start, day.horizon) == (own.start, own.horizon)
    for a, b in zip(own.communities, day.communities, strict=True):
        for field in ("pv_kw", "wind_kw", "fixed_load_kw"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(own.price_import, day.price_import)
    np.testing.assert_array_equal(own.background_kw, day.background_kw)


def test_another_date_has_its_own_weather_and_load_on_the_same_shapes() -> None:
    own, other = load_scenario("default"), load_scenario("default", day=date(2026, 6, 24))
    assert other.start == utc("2026-06-24")
    winds = [(a.wind_kw, b.wind_kw) for a, b in zip(own.communities, other.communities, strict=True)]
    assert any(a.any() and not np.allclose(a, b) for a, b in winds)
    pairs = zip(own.communities, other.communities, strict=True)
    loads = [(a.fixed_load_kw, b.fixed_load_kw) for a, b in pairs]
    assert any(not np.allclose(a, b) for a, b in loads)
    for a, b in loads:  # the same shape, only its noise (a few per cent) differs
        np.testing.assert_allclose(a, b, rtol=0.2)
    np.testing.assert_array_equal(own.price_import, other.price_import)


def test_a_23_hour_day_follows_the_local_clock_in_every_profile_and_tariff() -> None:
    spring = last_sunday(2026, 3)
    zone = {"horizon": {"timezone": "Europe/Amsterdam"}}
    s = load_scenario("default", zone, day=spring)
    midnight = datetime.combine(spring, datetime.min.time(), UTC) - timedelta(hours=1)
    assert (s.horizon, s.start, s.background_kw.shape[1]) == (23, midnight, 23)
    assert all(c.fixed_load_kw.shape == (23,) for c in s.communities)
    hours = [h for h in range(24) if h != 2]
    # default.yaml: import 0.16 before 07:00, 0.32 from 17:00 to 21:00, 0.16 from 23:00 (local).
    expected = [0.16 if h < 7 or h >= 23 else 0.32 if 17 <= h < 21 else 0.22 for h in hours]
    np.testing.assert_allclose(s.price_import, expected)


def test_fixed_values_are_read_by_local_clock_hour_on_a_25_hour_day() -> None:
    autumn = last_sunday(2026, 10)
    values = [float(h) for h in range(24)]
    spec = {
        "horizon": {"timezone": "Europe/Amsterdam"},
        "feeder": {"background_load": {"profile": {"kind": "values", "values": values}, "peak_factor": 1.0}},
    }
    s = load_scenario("default", spec, day=autumn)
    bus = int(np.argmax(s.feeder.load_kw))
    per_unit = s.background_kw[bus] / s.feeder.load_kw[bus]
    np.testing.assert_allclose(per_unit, [0, 1, 2, 2, *range(3, 24)])


def test_a_day_of_its_own_needs_a_24_hour_horizon() -> None:
    with pytest.raises(ScenarioError, match="24 hours"):
        load_scenario("default", {"horizon": {"intervals": 12}}, day=date(2026, 6, 22))
