"""Forecast errors at meter resolution: seeded and reproducible, unbiased where they should be,
bounded, and looked up by simulated second."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from p2pdoe.core.network import FloatArray
from p2pdoe.core.realtime.weather import Actuals, ErrorModel, actuals
from p2pdoe.io.scenarios import load_scenario

Forecasts = tuple[FloatArray, FloatArray, FloatArray, float]


@pytest.fixture(scope="module")
def day() -> Forecasts:
    """PV and load of the default scenario's first community (night PV is exactly zero), wind of the
    second (the first has none); 24 x 1 h."""
    s = load_scenario("default")
    first, second = s.communities[0], s.communities[1]
    return first.pv_kw, second.wind_kw, first.fixed_load_kw, s.dt_h


def _actuals(day: Forecasts, step_s: float = 60.0, seed: int = 0, model: ErrorModel | None = None) -> Actuals:
    pv, wind, load, dt_h = day
    return actuals(pv, wind, load, dt_h, step_s, seed, model or ErrorModel())


def _held(forecast: FloatArray, a: Actuals) -> FloatArray:
    return np.repeat(forecast, a.samples // forecast.shape[0])


def _energy_ratio(actual: FloatArray, forecast: FloatArray, step_s: float, dt_h: float) -> float:
    return float(actual.sum() * step_s / 3600.0 / (forecast.sum() * dt_h))


def test_the_same_seed_gives_identical_series_and_another_seed_different_ones(day: Forecasts) -> None:
    a, b, c = _actuals(day, seed=11), _actuals(day, seed=11), _actuals(day, seed=12)
    for name in ("pv_kw", "wind_kw", "fixed_load_kw"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name))


def test_changing_one_quantitys_model_leaves_the_others_unchanged(day: Forecasts) -> None:
    base = _actuals(day, seed=3)
    windier = _actuals(day, seed=3, model=replace(ErrorModel(), wind_sigma=0.3, gusts_per_hour=20.0))
    cloudier = _actuals(day, seed=3, model=replace(ErrorModel(), clear_minutes=5.0, load_sigma=0.1))
    assert not np.array_equal(base.wind_kw, windier.wind_kw)
    assert np.array_equal(base.pv_kw, windier.pv_kw)
    assert np.array_equal(base.fixed_load_kw, windier.fixed_load_kw)
    assert not np.array_equal(base.pv_kw, cloudier.pv_kw)
    assert np.array_equal(base.wind_kw, cloudier.wind_kw)


def test_shapes_cover_the_horizon_at_the_meter_step(day: Forecasts) -> None:
    for step_s, samples in ((1.0, 86_400), (60.0, 1440), (900.0, 96), (3600.0, 24)):
        a = _actuals(day, step_s=step_s)
        assert a.pv_kw.shape == a.wind_kw.shape == a.fixed_load_kw.shape == (samples,)
        assert a.horizon_s == 86_400.0


@pytest.mark.parametrize(("dt_h", "step_s"), [(1.0, 7.0), (0.25, 1000.0), (1.0, 0.0), (0.0, 60.0)])
def test_a_step_that_does_not_divide_the_horizon_is_rejected(dt_h: float, step_s: float) -> None:
    three = np.ones(3)
    with pytest.raises(ValueError, match="step_s"):
        actuals(three, three, three, dt_h, step_s, 0)


def test_bad_forecasts_are_rejected() -> None:
    one = np.ones(4)
    with pytest.raises(ValueError, match="forecasts"):
        actuals(one, one, np.array([1.0, -1.0, 1.0, 1.0]), 1.0, 60.0, 0)
    with pytest.raises(ValueError, match="forecasts"):
        actuals(one, one, np.ones(5), 1.0, 60.0, 0)
    with pytest.raises(ValueError, match="forecasts"):
        actuals(one, np.array([1.0, np.nan, 1.0, 1.0]), one, 1.0, 60.0, 0)


def test_the_load_is_unbiased_over_a_day(day: Forecasts) -> None:
    """Load noise has mean 1: each day's energy lands within 2 % of the forecast (its standard
    deviation is about 0.3 % for 4 % noise decorrelating in 3 minutes)."""
    _, _, load, dt_h = day
    for seed in range(8):
        a = _actuals(day, seed=seed)
        assert _energy_ratio(a.fixed_load_kw, load, a.step_s, dt_h) == pytest.approx(1.0, abs=0.02)


def test_wind_is_unbiased_over_a_day(day: Forecasts) -> None:
    """Wind noise has mean 1 and gusts add a few tenths of a percent: within 5 % each day."""
    _, wind, _, dt_h = day
    for seed in range(8):
        a = _actuals(day, seed=seed)
        assert _energy_ratio(a.wind_kw, wind, a.step_s, dt_h) == pytest.approx(1.0, abs=0.05)


def test_clouds_only_remove_pv_energy(day: Forecasts) -> None:
    """Every day yields less PV than forecast (clouds only shade); over several days the mean ratio
    approaches the model's expected factor (0.925 by default: 17 % shaded at 0.55 transmittance)."""
    pv, _, _, dt_h = day
    ratios = [_energy_ratio(_actuals(day, seed=s).pv_kw, pv, 60.0, dt_h) for s in range(12)]
    assert all(0.8 < r < 1.0 for r in ratios)
    assert np.mean(ratios) == pytest.approx(ErrorModel().expected_pv_factor, abs=0.025)


def test_without_clouds_pv_is_unbiased(day: Forecasts) -> None:
    pv, _, _, dt_h = day
    clear = replace(ErrorModel(), cloudy_transmittance=(1.0, 1.0))
    a = _actuals(day, seed=5, model=clear)
    assert clear.expected_pv_factor == 1.0
    assert _energy_ratio(a.pv_kw, pv, a.step_s, dt_h) == pytest.approx(1.0, abs=0.01)


def test_pv_is_zero_at_night(day: Forecasts) -> None:
    pv = day[0]
    a = _actuals(day, step_s=1.0, seed=2)
    night = _held(pv, a) == 0.0
    assert night.sum() >= 6 * 3600
    assert np.all(a.pv_kw[night] == 0.0)
    assert np.all(a.pv_kw[~night] > 0.0)


def test_bounds_hold_even_under_wild_noise(day: Forecasts) -> None:
    """With noise large enough to hit them, PV and wind stay in [0, cap x forecast], load >= 0."""
    pv, wind, _, _ = day
    wild = replace(ErrorModel(), pv_noise_sigma=0.6, wind_sigma=0.8, load_sigma=1.5, gusts_per_hour=60.0)
    a = _actuals(day, step_s=10.0, seed=9, model=wild)
    for actual, forecast in ((a.pv_kw, pv), (a.wind_kw, wind)):
        cap = wild.cap_factor * _held(forecast, a)
        assert np.all(actual >= 0.0)
        assert np.all(actual <= cap)
        assert np.any((actual == cap) & (cap > 0))  # the cap binds somewhere
        assert np.any((actual == 0.0) & (cap > 0))  # and so does the floor
    assert np.all(a.fixed_load_kw >= 0.0)
    assert np.any(a.fixed_load_kw == 0.0)


def test_at_picks_the_sample_in_force(day: Forecasts) -> None:
    a = _actuals(day, step_s=60.0, seed=4)
    for t_s, k in ((0.0, 0), (59.9, 0), (60.0, 1), (3599.0, 59), (43_200.0, 720), (86_399.9, 1439)):
        r = a.at(t_s)
        assert (r.pv_kw, r.wind_kw, r.fixed_load_kw) == (a.pv_kw[k], a.wind_kw[k], a.fixed_load_kw[k])


@pytest.mark.parametrize("t_s", [-0.001, 86_400.0, 90_000.0, float("nan")])
def test_at_rejects_times_outside_the_horizon(day: Forecasts, t_s: float) -> None:
    with pytest.raises(ValueError, match="outside the horizon"):
        _actuals(day).at(t_s)


def test_clouds_do_not_depend_on_the_meter_step(day: Forecasts) -> None:
    """Cloud spells live in continuous time, so the day's PV energy barely moves with the step."""
    pv, _, _, dt_h = day
    fine, coarse = _actuals(day, step_s=1.0, seed=6), _actuals(day, step_s=900.0, seed=6)
    assert _energy_ratio(fine.pv_kw, pv, 1.0, dt_h) == pytest.approx(
        _energy_ratio(coarse.pv_kw, pv, 900.0, dt_h), abs=0.01
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clear_minutes": 0.0}, "durations must be positive"),
        ({"load_sigma": -0.1}, "sigmas"),
        ({"cloudy_transmittance": (0.8, 0.3)}, "cloudy_transmittance"),
        ({"gust_gain": (-0.1, 0.2)}, "gust_gain"),
        ({"cap_factor": 0.9}, "cap_factor"),
    ],
)
def test_an_inconsistent_error_model_is_rejected(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(ErrorModel(), **change)
