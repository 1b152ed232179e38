"""The simulated plant: battery power, SOC and efficiency limits, curtailment caps, the meter reading."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from p2pdoe.core.realtime.plant import (
    PlantSpec,
    Resources,
    SetPoints,
    limits,
    plant_spec,
    step,
)
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

SPEC = PlantSpec(
    battery_power_kw=100.0,
    soc_min_kwh=20.0,
    soc_max_kwh=190.0,
    soc_init_kwh=100.0,
    eta_charge=0.95,
    eta_discharge=0.9,
    flex_min_kw=5.0,
    flex_max_kw=60.0,
    tan_phi=0.33,
)
CALM = Resources(pv_kw=0.0, wind_kw=0.0, fixed_load_kw=0.0)


def _battery(kw: float) -> SetPoints:
    return SetPoints(battery_kw=kw, pv_cap_kw=None, wind_cap_kw=None, flex_kw=SPEC.flex_min_kw)


def test_plant_spec_takes_the_sites_battery_flexible_load_and_power_factor() -> None:
    config = site_config(load_scenario("default"), 0)
    spec = plant_spec(config)
    b, f = config.community.battery, config.community.flexible_load
    assert (spec.battery_power_kw, spec.soc_min_kwh, spec.soc_max_kwh) == (
        b.power_kw,
        b.soc_min_kwh,
        b.soc_max_kwh,
    )
    assert (spec.soc_init_kwh, spec.eta_charge, spec.eta_discharge) == (
        b.soc_init_kwh,
        b.eta_charge,
        b.eta_discharge,
    )
    assert (spec.flex_min_kw, spec.flex_max_kw, spec.tan_phi) == (
        f.min_kw,
        f.max_kw,
        config.community.tan_phi,
    )


def test_random_set_points_never_break_power_or_soc_bounds() -> None:
    rng = np.random.default_rng(7)
    soc = SPEC.soc_init_kwh
    for _ in range(3000):
        dt_s = float(rng.uniform(1.0, 1800.0))
        target = float(rng.uniform(-2.5, 2.5) * SPEC.battery_power_kw)
        new_soc, reading = step(SPEC, soc, _battery(target), CALM, dt_s)
        assert abs(reading.battery_kw) <= SPEC.battery_power_kw
        assert SPEC.soc_min_kwh <= new_soc <= SPEC.soc_max_kwh
        assert reading.soc_kwh == new_soc
        charge, discharge = max(-reading.battery_kw, 0.0), max(reading.battery_kw, 0.0)
        expected = soc + (SPEC.eta_charge * charge - discharge / SPEC.eta_discharge) * dt_s / 3600.0
        assert new_soc == pytest.approx(expected, abs=1e-9)
        soc = new_soc


def test_the_battery_follows_a_set_point_within_its_limits_exactly() -> None:
    soc, reading = step(SPEC, 100.0, _battery(-40.0), CALM, 900.0)
    assert reading.battery_kw == -40.0
    assert soc == pytest.approx(100.0 + 0.95 * 40.0 * 0.25)
    soc, reading = step(SPEC, 100.0, _battery(40.0), CALM, 900.0)
    assert reading.battery_kw == 40.0
    assert soc == pytest.approx(100.0 - 40.0 / 0.9 * 0.25)


def test_round_trip_returns_eta_charge_times_eta_discharge_of_the_energy_stored() -> None:
    start, dt_s = 100.0, 60.0
    soc, charged_kwh = start, 0.0
    for _ in range(60):  # one hour at 50 kW
        soc, reading = step(SPEC, soc, _battery(-50.0), CALM, dt_s)
        charged_kwh -= reading.battery_kw * dt_s / 3600.0
    floor_at_start = replace(SPEC, soc_min_kwh=start, soc_init_kwh=start)
    delivered_kwh = 0.0
    for _ in range(200):  # discharge at full power until the battery is back at the start SOC
        soc, reading = step(floor_at_start, soc, _battery(SPEC.battery_power_kw), CALM, dt_s)
        delivered_kwh += reading.battery_kw * dt_s / 3600.0
    assert charged_kwh == pytest.approx(50.0)
    assert soc == pytest.approx(start)
    assert delivered_kwh == pytest.approx(0.95 * 0.9 * charged_kwh)


def test_a_full_battery_refuses_charge_and_an_empty_one_refuses_discharge() -> None:
    soc, reading = step(SPEC, SPEC.soc_max_kwh, _battery(-80.0), CALM, 60.0)
    assert (reading.battery_kw, soc) == (0.0, SPEC.soc_max_kwh)
    assert reading.p_kw == -SPEC.flex_min_kw
    soc, reading = step(SPEC, SPEC.soc_min_kwh, _battery(80.0), CALM, 60.0)
    assert (reading.battery_kw, soc) == (0.0, SPEC.soc_min_kwh)


def test_near_a_bound_the_battery_stops_exactly_at_it() -> None:
    soc, reading = step(SPEC, SPEC.soc_max_kwh - 1.0, _battery(-100.0), CALM, 3600.0)
    assert reading.battery_kw == pytest.approx(-1.0 / 0.95)
    assert soc == pytest.approx(SPEC.soc_max_kwh)
    soc, reading = step(SPEC, SPEC.soc_min_kwh + 1.0, _battery(100.0), CALM, 3600.0)
    assert reading.battery_kw == pytest.approx(0.9)
    assert soc == pytest.approx(SPEC.soc_min_kwh)


@pytest.mark.parametrize("seed", range(5))
def test_limits_agree_with_what_step_then_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        soc = float(rng.uniform(SPEC.soc_min_kwh, SPEC.soc_max_kwh))
        dt_s = float(rng.choice([1.0, 60.0, 900.0, 3600.0]))
        lim = limits(SPEC, soc, dt_s)
        assert 0.0 <= lim.charge_kw <= SPEC.battery_power_kw
        assert 0.0 <= lim.discharge_kw <= SPEC.battery_power_kw
        assert step(SPEC, soc, _battery(-1e6), CALM, dt_s)[1].battery_kw == -lim.charge_kw
        assert step(SPEC, soc, _battery(1e6), CALM, dt_s)[1].battery_kw == lim.discharge_kw


def test_a_battery_of_zero_power_never_moves() -> None:
    spec = replace(SPEC, battery_power_kw=0.0)
    assert limits(spec, 100.0, 60.0) == limits(spec, 100.0, 1.0)
    soc, reading = step(spec, 100.0, _battery(50.0), CALM, 60.0)
    assert (soc, reading.battery_kw) == (100.0, 0.0)


@pytest.mark.parametrize(
    ("available", "cap", "produced"),
    [
        (100.0, None, 100.0),
        (100.0, 30.0, 30.0),
        (100.0, 0.0, 0.0),
        (20.0, 30.0, 20.0),
        (20.0, math.inf, 20.0),
    ],
)
def test_pv_and_wind_produce_the_lesser_of_available_and_cap(
    available: float, cap: float | None, produced: float
) -> None:
    res = Resources(pv_kw=available, wind_kw=2 * available, fixed_load_kw=0.0)
    sp = SetPoints(battery_kw=0.0, pv_cap_kw=cap, wind_cap_kw=cap, flex_kw=10.0)
    _, reading = step(SPEC, 100.0, sp, res, 60.0)
    assert reading.pv_kw == produced
    assert reading.wind_kw == (2 * available if cap is None else min(2 * available, cap))


@pytest.mark.parametrize(("asked", "held"), [(0.0, 5.0), (30.0, 30.0), (100.0, 60.0)])
def test_the_flexible_load_clamps_to_its_range(asked: float, held: float) -> None:
    sp = SetPoints(battery_kw=0.0, pv_cap_kw=None, wind_cap_kw=None, flex_kw=asked)
    assert step(SPEC, 100.0, sp, CALM, 60.0)[1].flex_kw == held


def test_the_reading_sums_to_the_documented_net_injection_and_reactive_power() -> None:
    res = Resources(pv_kw=80.0, wind_kw=50.0, fixed_load_kw=35.0)
    sp = SetPoints(battery_kw=-20.0, pv_cap_kw=70.0, wind_cap_kw=None, flex_kw=15.0)
    _, r = step(SPEC, 100.0, sp, res, 60.0)
    assert (r.pv_kw, r.wind_kw, r.fixed_load_kw, r.flex_kw, r.battery_kw) == (70.0, 50.0, 35.0, 15.0, -20.0)
    assert r.p_kw == pytest.approx(70.0 + 50.0 - 20.0 - 35.0 - 15.0)
    assert r.q_kvar == pytest.approx(-0.33 * (35.0 + 15.0))


@pytest.mark.parametrize(
    ("sp", "dt_s", "message"),
    [
        (SetPoints(math.nan, None, None, 10.0), 60.0, "battery_kw"),
        (SetPoints(0.0, None, None, math.inf), 60.0, "flex_kw"),
        (SetPoints(0.0, math.nan, None, 10.0), 60.0, "pv_cap_kw"),
        (SetPoints(0.0, None, -1.0, 10.0), 60.0, "wind_cap_kw"),
        (SetPoints(0.0, None, None, 10.0), -1.0, "positive"),
        (SetPoints(0.0, None, None, 10.0), 0.0, "positive"),
        (SetPoints(0.0, None, None, 10.0), math.nan, "positive"),
    ],
)
def test_invalid_set_points_or_durations_raise(sp: SetPoints, dt_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step(SPEC, 100.0, sp, CALM, dt_s)


def test_invalid_state_or_resources_raise() -> None:
    with pytest.raises(ValueError, match="state of charge"):
        step(SPEC, math.nan, _battery(0.0), CALM, 60.0)
    with pytest.raises(ValueError, match="pv_kw"):
        step(SPEC, 100.0, _battery(0.0), Resources(-1.0, 0.0, 0.0), 60.0)
    with pytest.raises(ValueError, match="positive"):
        limits(SPEC, 100.0, -5.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"soc_min_kwh": 150.0}, "soc_min_kwh <= soc_init_kwh"),
        ({"eta_charge": 0.0}, "efficiencies"),
        ({"flex_min_kw": 70.0}, "flexible load"),
        ({"battery_power_kw": -1.0}, "power must be"),
    ],
)
def test_an_inconsistent_spec_is_rejected(change: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SPEC, **change)
