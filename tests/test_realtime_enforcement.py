"""Envelope enforcement, one step: the schedule while it is inside, else the cheapest levers first."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdoe.core.realtime import plant
from p2pdoe.core.realtime.enforcement import (
    Box,
    Enforcement,
    FlexRange,
    LeverCosts,
    Measured,
    costs_from_config,
    default_margin_kw,
    enforce,
    target_band,
)
from p2pdoe.core.realtime.plant import SetPoints
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

FLEX = FlexRange(min_kw=1.0, max_kw=3.0)
SCHEDULE = SetPoints(battery_kw=0.0, pv_cap_kw=None, wind_cap_kw=None, flex_kw=2.0)
FIXED_LOAD_KW = 3.0
BATTERY_CHEAPEST = LeverCosts(
    battery_eur_per_kwh=0.02, flex_up_eur_per_kwh=0.10, flex_down_eur_per_kwh=0.10, curtail_eur_per_kwh=0.08
)
CURTAIL_CHEAPEST = replace(BATTERY_CHEAPEST, battery_eur_per_kwh=0.20, curtail_eur_per_kwh=0.05)
FLEX_CHEAPEST = replace(BATTERY_CHEAPEST, flex_up_eur_per_kwh=0.0, flex_down_eur_per_kwh=0.0)


def measured_at(sp: SetPoints, pv_available_kw: float = 8.0, **limits: float) -> Measured:
    """The meter once the plant follows `sp`: p = pv + battery - flex - fixed load (no wind)."""
    pv = pv_available_kw if sp.pv_cap_kw is None else min(pv_available_kw, sp.pv_cap_kw)
    return Measured(
        p_kw=pv + sp.battery_kw - sp.flex_kw - FIXED_LOAD_KW,
        pv_kw=pv,
        pv_available_kw=pv_available_kw,
        wind_kw=0.0,
        wind_available_kw=0.0,
        flex_kw=sp.flex_kw,
        battery_kw=sp.battery_kw,
        max_charge_kw=limits.get("max_charge_kw", 5.0),
        max_discharge_kw=limits.get("max_discharge_kw", 5.0),
    )


def moves(out: Enforcement) -> list[tuple[str, float]]:
    return [(a.lever, round(a.delta_kw, 9)) for a in out.compliance.actions]


def test_inside_the_schedule_is_followed_and_nothing_done() -> None:
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, Box(-5.0, 5.0), BATTERY_CHEAPEST)  # p = 3
    assert out.set_points == SCHEDULE
    assert out.compliance.inside_before is True
    assert out.compliance.excess_kw == 0.0
    assert out.compliance.actions == ()
    assert out.compliance.predicted_kw == pytest.approx(3.0)


def test_no_envelope_follows_the_schedule() -> None:
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, None, BATTERY_CHEAPEST)
    assert out.set_points == SCHEDULE
    assert out.compliance.inside_before is None
    assert out.compliance.actions == ()


def test_an_export_excess_charges_the_battery_when_it_is_cheapest() -> None:
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, Box(-5.0, 2.0), BATTERY_CHEAPEST)
    assert out.compliance.inside_before is False
    assert out.compliance.excess_kw == pytest.approx(1.0)
    assert moves(out) == [("battery", -1.5)]  # to 2 - 0.5
    assert out.compliance.actions[0].eur_per_kwh == 0.02
    assert out.set_points == replace(SCHEDULE, battery_kw=out.set_points.battery_kw)
    assert out.set_points.battery_kw == pytest.approx(-1.5)
    assert out.compliance.predicted_kw == pytest.approx(1.5)
    assert out.compliance.residual_kw == 0.0


def test_an_export_excess_curtails_pv_when_curtailing_is_cheapest() -> None:
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, Box(-5.0, 2.0), CURTAIL_CHEAPEST)
    assert [a.lever for a in out.compliance.actions] == ["pv"]
    assert out.set_points.pv_cap_kw == pytest.approx(8.0 - 1.5)
    assert out.set_points.battery_kw == 0.0
    assert out.compliance.predicted_kw == pytest.approx(1.5)


def test_a_full_battery_hands_over_to_the_next_cheapest_lever() -> None:
    measured = measured_at(SCHEDULE, max_charge_kw=1.0)
    out = enforce(measured, SCHEDULE, FLEX, Box(-5.0, 2.0), BATTERY_CHEAPEST)
    assert moves(out) == [("battery", -1.0), ("pv", -0.5)]  # curtailing (0.08) before the load (0.10)
    assert out.set_points.battery_kw == pytest.approx(-1.0)
    assert out.set_points.pv_cap_kw == pytest.approx(7.5)


def test_an_import_excess_gives_back_curtailment_first() -> None:
    curtailed = replace(SCHEDULE, pv_cap_kw=4.0)  # p = 4 - 2 - 3 = -1
    out = enforce(measured_at(curtailed), curtailed, FLEX, Box(4.0, 10.0), BATTERY_CHEAPEST)
    assert out.compliance.excess_kw == pytest.approx(-5.0)
    assert moves(out) == [("pv", 4.0), ("battery", 1.5)]
    assert out.set_points.pv_cap_kw is None  # all of it given back
    assert out.set_points.battery_kw == pytest.approx(1.5)
    assert out.compliance.predicted_kw == pytest.approx(4.5)


def test_the_flexible_load_stays_within_its_range() -> None:
    no_battery = {"max_charge_kw": 0.0, "max_discharge_kw": 0.0}
    up = enforce(measured_at(SCHEDULE, **no_battery), SCHEDULE, FLEX, Box(-5.0, 0.0), FLEX_CHEAPEST)
    assert up.set_points.flex_kw == FLEX.max_kw
    assert [a.lever for a in up.compliance.actions] == ["flex", "pv"]
    assert up.compliance.predicted_kw == pytest.approx(-0.5)
    down = enforce(measured_at(SCHEDULE, **no_battery), SCHEDULE, FLEX, Box(5.0, 9.0), FLEX_CHEAPEST)
    assert down.set_points.flex_kw == FLEX.min_kw
    assert down.compliance.residual_kw == pytest.approx(4.0 - 5.0)  # p = 4 at best, below lo = 5


def test_the_residual_is_reported_when_no_lever_is_left() -> None:
    idle = replace(SCHEDULE, flex_kw=FLEX.max_kw)  # p = 8 - 3 - 3 = 2
    measured = measured_at(idle, max_charge_kw=0.0)
    out = enforce(measured, idle, FLEX, Box(-10.0, -7.0), CURTAIL_CHEAPEST)
    assert out.set_points.pv_cap_kw == 0.0  # curtailed to nothing, never below
    assert out.compliance.predicted_kw == pytest.approx(-6.0)
    assert out.compliance.residual_kw == pytest.approx(1.0)


def test_the_margin_is_kept_inside_the_envelope() -> None:
    envelope = Box(-5.0, 2.0)
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, envelope, BATTERY_CHEAPEST, margin_kw=2.0)
    assert out.compliance.predicted_kw == pytest.approx(0.0)
    assert default_margin_kw(Box(-100.0, 100.0)) == pytest.approx(2.0)
    assert default_margin_kw(Box(0.0, 10.0)) == 0.5
    middle = target_band(Box(0.1, 0.7), 0.5)  # at most to the middle
    assert middle.lo_kw == middle.up_kw == pytest.approx(0.4)


def test_a_schedule_inside_the_envelope_but_within_the_margin_is_pulled_in() -> None:
    out = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, Box(-5.0, 3.2), BATTERY_CHEAPEST)  # p = 3
    assert out.compliance.inside_before is True
    assert out.compliance.predicted_kw == pytest.approx(2.7)


def test_a_correction_lasts_while_the_schedule_is_outside_and_ends_when_it_is_back() -> None:
    envelope = Box(-5.0, 2.0)
    first = enforce(measured_at(SCHEDULE), SCHEDULE, FLEX, envelope, BATTERY_CHEAPEST)
    corrected = measured_at(first.set_points)  # inside now, thanks to the correction
    assert corrected.p_kw == pytest.approx(1.5)
    second = enforce(corrected, SCHEDULE, FLEX, envelope, BATTERY_CHEAPEST)
    assert second.set_points == first.set_points  # kept: no oscillation back to the schedule
    cloud = measured_at(first.set_points, pv_available_kw=5.0)  # the schedule alone gives p = 0
    third = enforce(cloud, SCHEDULE, FLEX, envelope, BATTERY_CHEAPEST)
    assert third.set_points == SCHEDULE
    assert third.compliance.actions == ()


def test_a_schedule_beyond_the_assets_is_clipped_to_them() -> None:
    greedy = SetPoints(battery_kw=-9.0, pv_cap_kw=None, wind_cap_kw=None, flex_kw=7.0)
    out = enforce(measured_at(SCHEDULE, max_charge_kw=4.0), greedy, FLEX, None, BATTERY_CHEAPEST)
    assert out.set_points == SetPoints(-4.0, None, None, FLEX.max_kw)


def test_costs_come_from_the_sites_configuration() -> None:
    config = site_config(load_scenario("default"), 0)
    f = config.community.flexible_load
    costs = costs_from_config(config, 3, f.preferred_kw[3] + 10.0)
    assert costs.battery_eur_per_kwh == config.community.battery.wear_eur_per_kwh
    assert costs.flex_up_eur_per_kwh == pytest.approx(2 * f.discomfort_eur_per_kw2h * 10.0)
    assert costs.flex_down_eur_per_kwh == pytest.approx(-costs.flex_up_eur_per_kwh)
    assert costs.curtail_eur_per_kwh == config.price_export_eur_per_kwh[3]


def test_an_exceedance_on_the_simulated_plant_is_back_inside_within_15_s() -> None:
    spec = plant.PlantSpec(
        battery_power_kw=5.0,
        soc_min_kwh=1.0,
        soc_max_kwh=9.0,
        soc_init_kwh=5.0,
        eta_charge=0.95,
        eta_discharge=0.95,
        flex_min_kw=FLEX.min_kw,
        flex_max_kw=FLEX.max_kw,
        tan_phi=0.0,
    )
    envelope, dt_s, soc = Box(-5.0, 2.0), 5.0, spec.soc_init_kwh
    sun = plant.Resources(pv_kw=9.0, wind_kw=0.0, fixed_load_kw=FIXED_LOAD_KW)  # a PV surge: p = 4
    soc, reading = plant.step(spec, soc, SCHEDULE, sun, dt_s)
    assert envelope.excess_kw(reading.p_kw) > 0
    inside_after_s = None
    for k in range(1, 4):
        lim = plant.limits(spec, soc, dt_s)
        measured = Measured(
            reading.p_kw, reading.pv_kw, sun.pv_kw, 0.0, 0.0, reading.flex_kw, reading.battery_kw,
            lim.charge_kw, lim.discharge_kw,
        )  # fmt: skip
        sp = enforce(measured, SCHEDULE, FLEX, envelope, BATTERY_CHEAPEST).set_points
        soc, reading = plant.step(spec, soc, sp, sun, dt_s)
        if inside_after_s is None and envelope.excess_kw(reading.p_kw) == 0:
            inside_after_s = k * dt_s
    assert inside_after_s is not None
    assert inside_after_s <= 15.0
    assert envelope.excess_kw(reading.p_kw) == 0  # and stays inside


kw = st.floats(min_value=0.0, max_value=20.0)
cost = st.floats(min_value=-1.0, max_value=1.0)


@st.composite
def situations(draw: st.DrawFn) -> tuple[Measured, SetPoints, FlexRange, Box, LeverCosts, float]:
    flex_min = draw(st.floats(0.0, 5.0))
    flex = FlexRange(flex_min, flex_min + draw(st.floats(0.0, 5.0)))
    pv_available, wind_available = draw(kw), draw(kw)
    max_charge, max_discharge = draw(st.floats(0.0, 10.0)), draw(st.floats(0.0, 10.0))
    pv = draw(st.floats(0.0, 1.0)) * pv_available
    wind = draw(st.floats(0.0, 1.0)) * wind_available
    flex_kw = draw(st.floats(flex.min_kw, flex.max_kw))
    battery = draw(st.floats(-max_charge, max_discharge))
    fixed_load = draw(kw)
    measured = Measured(
        pv + wind + battery - flex_kw - fixed_load, pv, pv_available, wind, wind_available,
        flex_kw, battery, max_charge, max_discharge,
    )  # fmt: skip
    cap = st.none() | kw
    schedule = SetPoints(draw(st.floats(-15.0, 15.0)), draw(cap), draw(cap), draw(st.floats(-1.0, 12.0)))
    lo = draw(st.floats(-30.0, 30.0))
    envelope = Box(lo, lo + draw(st.floats(0.0, 20.0)))
    costs = LeverCosts(draw(cost), draw(cost), draw(cost), draw(cost))
    return measured, schedule, flex, envelope, costs, fixed_load


@given(situations())
def test_whenever_the_levers_suffice_the_injection_is_put_inside(
    situation: tuple[Measured, SetPoints, FlexRange, Box, LeverCosts, float],
) -> None:
    m, schedule, flex, envelope, costs, fixed_load = situation
    out = enforce(m, schedule, flex, envelope, costs)
    sp = out.set_points
    # the plant's own arithmetic, independent of the controller's
    pv = m.pv_available_kw if sp.pv_cap_kw is None else min(m.pv_available_kw, sp.pv_cap_kw)
    wind = m.wind_available_kw if sp.wind_cap_kw is None else min(m.wind_available_kw, sp.wind_cap_kw)
    p = pv + wind + sp.battery_kw - sp.flex_kw - fixed_load
    assert out.compliance.predicted_kw == pytest.approx(p, abs=1e-9)
    assert -m.max_charge_kw <= sp.battery_kw <= m.max_discharge_kw
    assert flex.min_kw <= sp.flex_kw <= flex.max_kw
    assert all(cap is None or cap >= 0 for cap in (sp.pv_cap_kw, sp.wind_cap_kw))
    lowest = -m.max_charge_kw - flex.max_kw - fixed_load
    highest = m.max_discharge_kw - flex.min_kw + m.pv_available_kw + m.wind_available_kw - fixed_load
    band = target_band(envelope, default_margin_kw(envelope))
    if lowest <= band.up_kw and highest >= band.lo_kw:
        assert envelope.lo_kw - 1e-6 <= p <= envelope.up_kw + 1e-6
        assert out.compliance.residual_kw == 0.0
    costs_taken = [a.eur_per_kwh for a in out.compliance.actions]
    assert costs_taken == sorted(costs_taken)
    assert len({a.delta_kw > 0 for a in out.compliance.actions}) <= 1  # one direction per step


def test_a_reading_over_its_bound_by_less_than_a_watt_is_inside() -> None:
    """A meter resolves watts: 7e-5 kW over a bound (seen in the monitor as `inside: no`) is inside;
    a watt and more over is not."""
    from p2pdoe.core.realtime.enforcement import Box

    box = Box(-5.0, 10.0)
    assert box.excess_kw(10.00007) == 0.0
    assert box.excess_kw(-5.00007) == 0.0
    assert box.excess_kw(10.002) == pytest.approx(0.002)
    assert box.excess_kw(-5.002) == pytest.approx(-0.002)
