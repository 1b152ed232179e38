"""A site's own forecast (site/<id>/forecast or --forecast-file): the schema refuses what cannot be
a forecast, the overlay takes the time-weighted mean of the steps over each interval it covers whole,
and the edge's next round solves with it."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydantic import ValidationError
from realtime_helpers import opening_heard

from p2pdoe.core import topics
from p2pdoe.core.cpu import CpuClocks
from p2pdoe.core.day_configs import coordinator_config_on, registration_on, site_config_on
from p2pdoe.core.edge.forecast import forecast_problem, with_forecast
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Heard
from p2pdoe.core.schemas.messages import ranges_digest
from p2pdoe.core.schemas.runtime import Registration, SiteForecast, decode_runtime
from p2pdoe.core.site import coordinator_config, registration, site_config
from p2pdoe.io.scenarios import load_scenario

S = load_scenario("default")
SOLAR = S.ids.index("solar-18")
CONFIG = site_config(S, SOLAR)
T0 = datetime(2026, 6, 21, tzinfo=UTC)


def forecast(**fields: Any) -> SiteForecast:
    base: dict[str, Any] = {
        "site": "solar-18",
        "issued": T0 - timedelta(hours=12),
        "start": T0,
        "step_s": 900,
    }
    return SiteForecast(**{**base, **fields})


def test_each_interval_covered_whole_gets_the_mean_of_its_steps_and_the_rest_stay() -> None:
    steps = [float(k) for k in range(16)]  # 10:00-14:00 in 15-minute steps
    f = forecast(start=T0 + timedelta(hours=10), pv_kw=steps)
    day, covered = with_forecast(CONFIG, f)
    assert covered == 4
    pv = day.community.pv_kw
    assert pv[10:14] == [1.5, 5.5, 9.5, 13.5]  # means of 0..3, 4..7, 8..11, 12..15
    assert pv[:10] == CONFIG.community.pv_kw[:10]
    assert pv[14:] == CONFIG.community.pv_kw[14:]
    assert day.community.fixed_load_kw == CONFIG.community.fixed_load_kw  # not forecast: configured


def test_hourly_steps_half_an_hour_off_weigh_two_steps_and_leave_the_first_interval() -> None:
    f = forecast(start=T0 + timedelta(hours=10, minutes=30), step_s=3600, fixed_load_kw=[10.0, 20.0, 30.0])
    day, covered = with_forecast(CONFIG, f)
    assert covered == 2  # 11:00-12:00 and 12:00-13:00; 10:00-11:00 and 13:00-14:00 only in part
    assert day.community.fixed_load_kw[11:13] == [15.0, 25.0]
    assert day.community.fixed_load_kw[10] == CONFIG.community.fixed_load_kw[10]


def test_a_forecast_outside_the_day_changes_nothing() -> None:
    day, covered = with_forecast(CONFIG, forecast(start=T0 + timedelta(days=1), pv_kw=[1.0] * 96))
    assert (day, covered) == (CONFIG, 0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"site": "town-14", "pv_kw": [1.0]}, "town-14's forecast"),
        ({"wind_kw": [5.0]}, "does not have"),  # solar-18 has no wind turbine
        ({"pv_kw": [1e6]}, "over 10 x its configured peak"),
    ],
)
def test_a_forecast_that_cannot_be_the_sites_is_named(fields: dict[str, Any], match: str) -> None:
    why = forecast_problem(CONFIG, forecast(**fields))
    assert why is not None
    assert match in why


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "at least one of"),
        ({"pv_kw": [1.0, 2.0], "fixed_load_kw": [1.0]}, "one value per step"),
        ({"pv_kw": [-1.0]}, "greater than or equal to 0"),
        ({"pv_kw": [1.0], "step_s": 0}, "greater than 0"),
        ({"pv_kw": [1.0], "start": "2026-06-21T02:00:00+02:00"}, "UTC"),
    ],
)
def test_the_schema_refuses_what_cannot_be_a_forecast(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        forecast(**fields)


def test_a_forecast_travels_as_a_runtime_message() -> None:
    f = forecast(pv_kw=[1.0, 2.0])
    assert decode_runtime(f.model_dump_json().encode()) == f
    with pytest.raises(ValueError, match="ISO 8601"):
        decode_runtime(json.dumps({**json.loads(f.model_dump_json()), "issued": 12}).encode())


def market() -> EdgeMarket:
    return EdgeMarket(CONFIG, None, time.perf_counter, CpuClocks(time.process_time))


def opening() -> Heard:
    return cast(Heard, opening_heard(S, "day-ahead-2026-06-21", T0, S.horizon))


def test_the_next_round_solves_with_the_newest_plausible_forecast() -> None:
    m = market()
    cloudy = [0.5 * v for v in CONFIG.community.pv_kw]
    assert m.feed_forecast(forecast(step_s=3600, pv_kw=cloudy))
    assert not m.feed_forecast(forecast(step_s=3600, pv_kw=[0.0] * 24, issued=T0 - timedelta(days=1)))
    assert not m.feed_forecast(forecast(step_s=3600, wind_kw=[5.0] * 24, issued=T0))
    assert m.reader.dropped["implausible"] == 1
    msg = m.read(opening())
    assert msg is not None
    m.handle(msg)
    assert m.round is not None
    np.testing.assert_allclose(m.round.config.community.pv_kw, cloudy)
    assert m.config.community.pv_kw == CONFIG.community.pv_kw  # the configuration itself stays


def solar_day_with_forecast(tmp_path: Path, pv_factor: float) -> tuple[SiteForecast, Any, Any]:
    """An hour of the virtual day with solar-18's forecast file: its configured PV times `pv_factor`."""
    from virtual_helpers import S as DAY
    from virtual_helpers import day_of

    config = site_config(DAY, DAY.ids.index("solar-18"))
    f = SiteForecast(
        site="solar-18", issued=DAY.start - timedelta(hours=12), start=DAY.start,
        step_s=round(DAY.dt_h * 3600), pv_kw=[pv_factor * v for v in config.community.pv_kw],
    )  # fmt: skip
    path = tmp_path / "forecast.json"
    path.write_text(f.model_dump_json(), encoding="utf-8")
    day, tape = day_of(tmp_path / "day", 1.0, edge_options={"forecast_file": path})
    return f, day, tape


@pytest.mark.slow
def test_the_edge_agents_read_the_forecast_file_at_each_opening(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """solar-18's integrator writes its forecast file (a cloudy day): its edge agent solves the
    day-ahead round with it; every other edge reading the same file drops it as not its own, and the
    day goes on with every site agreed."""
    from virtual_helpers import S as DAY

    steps = DAY.horizon
    f, day, _ = solar_day_with_forecast(tmp_path, 0.5)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        results = day.run()
    assert f"solar-18: the forecast issued {f.issued.isoformat()} covers {steps} intervals" in caplog.text
    others = [s for s in DAY.ids if s != "solar-18"]
    assert all(f"{s}: dropped a forecast issued" in caplog.text for s in others)
    assert results.runtime is not None
    assert {x.id: x.state for x in results.runtime.sites} == dict.fromkeys(DAY.ids, "agreed")


TOMORROW = T0 + timedelta(days=1)
MORE_LOAD = [1.2 * v for v in CONFIG.community.fixed_load_kw]  # wider than the configured day's ranges


def registered(commands: list[Any]) -> Registration:
    [send] = commands
    assert (send.topic, send.state) == (topics.site("solar-18", "register"), True)
    return Registration.model_validate_json(send.payload)


def test_a_forecast_registers_the_ranges_it_gives_each_day_it_reaches() -> None:
    """More load than configured tomorrow: the site registers tomorrow's own ranges (wider than the
    configured day's), and the coordinator's day machines each take their date's."""
    m = market()
    f = forecast(start=TOMORROW, step_s=3600, fixed_load_kw=MORE_LOAD)
    reg = registered(m.feed_forecast(f))
    typical = registration(CONFIG)
    assert reg.technical_min_kw == typical.technical_min_kw
    [day] = reg.days
    assert day.start == TOMORROW
    tomorrow = registration(with_forecast(site_config_on(CONFIG, TOMORROW.date()), f)[0])
    assert day.technical_min_kw == tomorrow.technical_min_kw
    assert min(day.technical_min_kw) < min(typical.technical_min_kw)  # wider: more load to import for
    cfg = coordinator_config(S)
    on_tomorrow = registration_on(reg, coordinator_config_on(cfg, TOMORROW.date()))
    assert (on_tomorrow.technical_min_kw, on_tomorrow.days) == (tomorrow.technical_min_kw, [])
    assert registration_on(reg, cfg).technical_min_kw == typical.technical_min_kw  # today: configured


def test_a_registration_with_two_entries_for_one_day_is_refused() -> None:
    reg = registration(CONFIG)
    day = registered(market().feed_forecast(forecast(step_s=3600, fixed_load_kw=MORE_LOAD))).days[0]
    with pytest.raises(ValidationError, match="one entry per day"):
        Registration.model_validate({**reg.model_dump(), "days": [day.model_dump(), day.model_dump()]})


def envelope_bounds_of(m: EdgeMarket) -> tuple[np.ndarray, np.ndarray]:
    """(lowest lo, highest up) the open round lets the site request."""
    assert m.round is not None
    qp = m.round.qp
    rows = qp.a.shape[0] - qp.layout.size
    lo, up = qp.layout.block("lo"), qp.layout.block("up")
    return qp.lower[rows + lo.start : rows + lo.stop], qp.upper[rows + up.start : rows + up.stop]


@pytest.mark.parametrize("coordinator_has", ["configured", "forecast"])
def test_a_round_requests_envelopes_within_the_ranges_its_opening_names(coordinator_has: str) -> None:
    """The forecast came after the coordinator set the round up: the opening names the configured
    day's ranges, and the site requests nothing beyond them (the coordinator would refuse it). Once
    the coordinator holds the forecast's, the site requests within those."""
    m = market()
    reg = registered(m.feed_forecast(forecast(step_s=3600, fixed_load_kw=MORE_LOAD)))
    held = registration(CONFIG) if coordinator_has == "configured" else reg.days[0]
    digest = ranges_digest(held.technical_min_kw, held.technical_max_kw)
    msg = m.read(cast(Heard, opening_heard(S, "day-ahead-2026-06-21", T0, S.horizon, {"solar-18": digest})))
    assert msg is not None
    m.handle(msg)
    lowest, highest = envelope_bounds_of(m)
    np.testing.assert_allclose(lowest, held.technical_min_kw)
    assert np.all(highest <= np.asarray(held.technical_max_kw) + 1e-9)
    np.testing.assert_allclose(m.round.config.community.fixed_load_kw, MORE_LOAD)  # type: ignore[union-attr]


def test_an_opening_naming_ranges_this_run_never_registered_keeps_to_the_configured_days(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = market()
    m.feed_forecast(forecast(step_s=3600, fixed_load_kw=MORE_LOAD))
    heard = opening_heard(S, "day-ahead-2026-06-21", T0, S.horizon, {"solar-18": "0" * 16})
    with caplog.at_level(logging.WARNING, logger="edge_agent"):
        m.handle(m.read(cast(Heard, heard)))  # type: ignore[arg-type]
    assert "checks ranges this run did not register" in caplog.text
    lowest, _ = envelope_bounds_of(m)
    np.testing.assert_allclose(lowest, registration(CONFIG).technical_min_kw)


@pytest.mark.slow
def test_a_forecast_wider_than_the_configured_day_is_registered_and_agreed_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """solar-18's integrator forecasts 30 % more sun than configured: the edge registers the day's
    own ranges with it, the coordinator checks the day-ahead round against them (named in the
    opening), every site agrees, and solar-18's envelope reaches beyond what its configured day
    could have been granted."""
    from virtual_helpers import S as DAY

    from p2pdoe.core.schemas.messages import RoundOpen, decode

    config = site_config(DAY, DAY.ids.index("solar-18"))
    _, day, tape = solar_day_with_forecast(tmp_path, 1.3)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        results = day.run()
    assert "did not register" not in caplog.text
    [reg] = [h.msg for h in tape.of(Registration, "solar-18")]
    [own] = reg.days
    assert own.start == DAY.start
    assert max(own.technical_max_kw) > max(registration(config).technical_max_kw)
    openings = [decode(p) for t, p in tape.raw if t.endswith("/open") and p]
    day_ahead = [m for m in openings if isinstance(m, RoundOpen) and m.intervals == DAY.horizon]
    assert day_ahead
    rounds = [m for m in openings if isinstance(m, RoundOpen)]
    assert len(rounds) > len(day_ahead)  # rolling rounds too, each over the rest of the day
    for m in rounds:
        k = DAY.horizon - m.intervals
        assert m.ranges["solar-18"] == ranges_digest(own.technical_min_kw[k:], own.technical_max_kw[k:])
    assert results.runtime is not None
    assert {x.id: x.state for x in results.runtime.sites} == dict.fromkeys(DAY.ids, "agreed")
    solar = next(c for c in results.communities if c.id == "solar-18")
    assert np.any(np.asarray(solar.envelope_up_kw) > np.asarray(registration(config).technical_max_kw) + 1.0)


def test_each_day_keeps_its_own_newest_forecast() -> None:
    """Tomorrow's forecast leaves today's rounds on today's; both days are registered, and at most
    a week of days is kept (the earliest dropped)."""
    m = market()
    cloudy = [0.5 * v for v in CONFIG.community.pv_kw]
    m.feed_forecast(forecast(step_s=3600, pv_kw=cloudy))
    reg = registered(m.feed_forecast(forecast(start=TOMORROW, step_s=3600, fixed_load_kw=MORE_LOAD)))
    assert [d.start for d in reg.days] == [T0, TOMORROW]
    msg = m.read(opening())
    assert msg is not None
    m.handle(msg)
    assert m.round is not None
    np.testing.assert_allclose(m.round.config.community.pv_kw, cloudy)
    assert m.round.config.community.fixed_load_kw == CONFIG.community.fixed_load_kw
    for k in range(2, 9):
        m.feed_forecast(forecast(start=T0 + timedelta(days=k), step_s=3600, pv_kw=cloudy))
    assert sorted(m.forecasts) == [(T0 + timedelta(days=k)).date() for k in range(2, 9)]
