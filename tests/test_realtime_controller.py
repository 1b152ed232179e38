"""The edge's real-time controller as a pure state machine, in closed loop with the simulated plant:
interval energy and settlement, repeated readings, the envelope choice and its switches, and
enforcement bringing an exceedance back inside within 15 s of simulated time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from p2pdoe.core.realtime.controller import Controller, Plan, Step
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import FallbackConfig
from p2pdoe.core.realtime.plant import Resources, SetPoints, plant_spec, step
from p2pdoe.core.schemas.runtime import Doe, MeterReading
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

DAY = datetime(2026, 6, 21, tzinfo=UTC)
FIXED = Box(-50.0, 0.0)


@pytest.fixture(scope="module")
def config() -> SiteConfig:
    s = load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})
    return site_config(s, s.ids.index("solar-18"))


def controller(config: SiteConfig, step_s: float = 5.0) -> Controller:
    return Controller(config, plant_spec(config), FallbackConfig(FIXED, 60.0), DAY, step_s)


def reading(config: SiteConfig, ts: datetime, p_kw: float, soc: float = 500.0) -> MeterReading:
    return MeterReading(site=config.community.id, ts=ts, p_kw=p_kw, soc_kwh=soc, flex_kw=0.0)


def flat_plan(config: SiteConfig, net_kw: float, bought_kw: float, price: float) -> Plan:
    t, peers = 96, len(config.peers)
    zero = np.zeros(t)
    bought = np.zeros((peers, t))
    bought[0] = bought_kw
    return Plan(
        round="r", start=DAY, dt_s=900, battery_kw=zero, pv_kw=zero, wind_kw=zero, flex_kw=zero,
        net_kw=np.full(t, net_kw), pv_forecast_kw=zero, wind_forecast_kw=zero,
        peers=tuple(p.id for p in config.peers), bought_kw=bought, sold_kw=np.zeros((peers, t)),
        buy_price=np.full((peers, t), price), sell_price=np.full((peers, t), price),
    )  # fmt: skip


def test_the_first_reading_of_a_new_interval_settles_the_last(config: SiteConfig) -> None:
    ctl = controller(config, step_s=30.0)
    ctl.adopt(flat_plan(config, net_kw=-8.0, bought_kw=4.0, price=0.10))
    steps = [ctl.on_reading(reading(config, DAY + timedelta(seconds=30 * k), -10.0)) for k in range(1, 32)]
    settled = [s.settled for s in steps if s is not None and s.settled is not None]
    assert len(settled) == 1
    done = settled[0].settlement
    assert done.interval_start == DAY
    assert done.measured_kwh == pytest.approx(-2.5)  # -10 kW over 15 min
    assert done.scheduled_kwh == pytest.approx(-2.0)
    assert done.p2p_paid_eur == pytest.approx(1.0 * 0.10)  # 4 kW for 15 min at the agreed price
    assert done.grid_kwh == pytest.approx(-2.5 + 1.0)  # the rest imported from the grid
    assert settled[0].energy.complete


def test_a_repeated_reading_counts_once(config: SiteConfig) -> None:
    ctl = controller(config, step_s=30.0)
    first = reading(config, DAY + timedelta(seconds=30), -10.0)
    assert ctl.on_reading(first) is not None
    assert ctl.on_reading(first) is None
    assert ctl.duplicates == 1
    assert ctl.energy is not None
    assert ctl.energy.energy_kwh == pytest.approx(-10.0 * 30 / 3600)


def test_without_any_envelope_the_fixed_default_applies_and_switches_once(config: SiteConfig) -> None:
    ctl = controller(config)
    steps = [ctl.on_reading(reading(config, DAY + timedelta(seconds=5 * k), -10.0)) for k in range(1, 5)]
    assert all(s is not None and s.choice.kind == "fixed_default" for s in steps)
    assert [s.switch is not None for s in steps if s is not None] == [True, False, False, False]


def test_an_exceedance_is_back_inside_within_15_simulated_seconds(config: SiteConfig) -> None:
    """The plant exports 100 kW of PV; the envelope allows 20 kW: curtailment (or the battery) brings
    the metered injection inside within three 5 s readings."""
    ctl = controller(config)
    doe = Doe.from_box(config.community.id, "r", DAY, 900, -50.0, 20.0)
    ctl.book.add(doe)
    spec = plant_spec(config)
    soc, sp = spec.soc_max_kwh, SetPoints(0.0, None, None, 0.0)  # a full battery: it cannot absorb
    res = Resources(pv_kw=100.0, wind_kw=0.0, fixed_load_kw=5.0)
    inside_at = None
    for k in range(1, 10):
        soc, r = step(spec, soc, sp, res, 5.0)
        ts = DAY + timedelta(seconds=5 * k)
        msg = MeterReading(
            site=config.community.id, ts=ts, p_kw=r.p_kw, pv_kw=r.pv_kw, pv_available_kw=100.0,
            wind_kw=0.0, wind_available_kw=0.0, fixed_load_kw=5.0, flex_kw=r.flex_kw,
            battery_kw=r.battery_kw, soc_kwh=soc,
        )  # fmt: skip
        out = ctl.on_reading(msg)
        assert isinstance(out, Step)
        if inside_at is None and doe.lo_kw <= r.p_kw <= doe.up_kw:
            inside_at = 5 * k
        sp = out.set_points
    assert inside_at is not None
    assert inside_at <= 15


def test_readings_before_the_day_are_enforced_but_belong_to_no_interval(config: SiteConfig) -> None:
    """A meter runs before the day: those readings get set-points (under the envelope in force then)
    but no interval, so the day's first settlement counts only the day's own steps."""
    ctl = controller(config, step_s=30.0)
    ctl.adopt(flat_plan(config, net_kw=-8.0, bought_kw=0.0, price=0.10))
    ctl.book.add(Doe.from_box(config.community.id, "r", DAY, 900, -30.0, 10.0))
    before = [ctl.on_reading(reading(config, DAY + timedelta(seconds=30 * k), -10.0)) for k in range(-4, 1)]
    assert all(s is not None and s.settled is None for s in before)
    assert ctl.energy is None
    assert [s.judged.kind for s in before if s is not None] == ["fixed_default"] * 5
    first = before[-1]
    assert first is not None
    assert first.choice.kind == "dynamic"  # the day's first step, set at 00:00
    after = [ctl.on_reading(reading(config, DAY + timedelta(seconds=30 * k), -10.0)) for k in range(1, 32)]
    settled = [s.settled for s in after if s is not None and s.settled is not None]
    assert [s.settlement.interval_start for s in settled] == [DAY]
    assert settled[0].energy.covered_s == pytest.approx(900.0)
    assert settled[0].settlement.measured_kwh == pytest.approx(-2.5)


def test_the_safety_margin_widens_with_the_measured_prediction_error(config: SiteConfig) -> None:
    """In closed loop with the plant: a site whose fixed load wanders by 4 kW from one reading to
    the next keeps about two sigmas of that error from the bound; a steady one keeps the default."""
    envelope = Box(-100.0, 0.0)
    spec = plant_spec(config)
    rng = np.random.default_rng(3)
    margins = []
    for sigma in (0.0, 4.0):
        ctl = controller(config, 30.0)
        ctl.book.add(Doe.from_box(config.community.id, "r", DAY, 900, envelope.lo_kw, envelope.up_kw))
        soc, sp = spec.soc_init_kwh, SetPoints(0.0, None, None, 0.0)
        for k in range(1, 29):
            load = 60.0 + float(rng.normal(0.0, sigma))
            soc, r = step(spec, soc, sp, Resources(pv_kw=0.0, wind_kw=0.0, fixed_load_kw=load), 30.0)
            msg = MeterReading(
                site=config.community.id, ts=DAY + timedelta(seconds=30 * k), p_kw=r.p_kw, pv_kw=0.0,
                pv_available_kw=0.0, wind_kw=0.0, wind_available_kw=0.0, fixed_load_kw=load,
                flex_kw=r.flex_kw, battery_kw=r.battery_kw, soc_kwh=soc,
            )  # fmt: skip
            out = ctl.on_reading(msg)
            assert out is not None
            sp = out.set_points
        margins.append(ctl.errors.margin_kw(envelope))
    assert margins[0] == pytest.approx(1.0)  # max(0.5 kW, 1 % of 100 kW)
    assert 4.0 < margins[1] < 12.0  # about 2 x 4 kW, early in its running mean


def test_the_next_day_agreed_ahead_waits_for_its_start_and_the_last_interval_is_settled_first(
    config: SiteConfig,
) -> None:
    """The day-ahead round for tomorrow ends at noon today: today runs to its end, its last interval
    is settled by the first reading after midnight, and that reading begins tomorrow's first."""
    ctl = controller(config, step_s=30.0)
    tomorrow = DAY + timedelta(days=1)
    ctl.flex_used_kwh = 12.0
    ctl.start_day(tomorrow, config.model_copy(update={"start": "2026-06-22T00:00:00Z"}))
    assert (ctl.day_start, ctl.next_day is not None) == (DAY, True)
    last = DAY + timedelta(hours=23, minutes=45)
    settled = []
    for k in range(1, 32):  # 23:45:30 .. 00:00:30 and on
        step = ctl.on_reading(reading(config, last + timedelta(seconds=30 * k), -10.0))
        assert step is not None
        if step.settled is not None:
            settled.append(step.settled.settlement.interval_start)
        if last + timedelta(seconds=30 * k) <= tomorrow:
            assert ctl.day_start == DAY  # a reading at midnight closes today's last step
    assert settled == [last]
    assert (ctl.day_start, ctl.next_day, ctl.flex_used_kwh) == (tomorrow, None, 0.0)
    assert ctl.energy is not None
    assert ctl.energy.start == tomorrow
    assert ctl.energy.energy_kwh == pytest.approx(-10.0 * 30 / 3600)  # 00:00 .. 00:00:30 so far


def test_a_day_that_began_already_is_taken_at_once(config: SiteConfig) -> None:
    ctl = controller(config)
    later = DAY + timedelta(hours=1)
    ctl.start_day(later)
    assert (ctl.day_start, ctl.next_day) == (later, None)


def test_a_23_hour_day_brings_its_own_intervals(config: SiteConfig) -> None:
    from datetime import date

    from p2pdoe.core.calendar import Calendar
    from p2pdoe.core.day_configs import site_config_on

    cal = Calendar("Europe/Amsterdam", 900)
    local = config.model_copy(update={"timezone": "Europe/Amsterdam", "start": "2026-03-27T23:00:00Z"})
    ctl = Controller(
        local, plant_spec(local), FallbackConfig(FIXED, 60.0), cal.start(date(2026, 3, 28)), 30.0
    )
    spring = date(2026, 3, 29)
    ctl.start_day(cal.start(spring), site_config_on(local, spring, cal))
    ctl.on_reading(reading(local, cal.start(spring) + timedelta(seconds=30), -10.0))
    assert (ctl.day_start, ctl.intervals) == (cal.start(spring), 92)
