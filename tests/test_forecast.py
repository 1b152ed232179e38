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

from p2pdoe.core.edge.forecast import forecast_problem, with_forecast
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Heard
from p2pdoe.core.schemas.runtime import SiteForecast, decode_runtime
from p2pdoe.core.site import site_config
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
        # More load than configured: a range beyond the registration the coordinator checks against.
        ({"step_s": 3600, "fixed_load_kw": [1.2 * v for v in CONFIG.community.fixed_load_kw]}, "registered"),
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
    return EdgeMarket(CONFIG, None, time.perf_counter, time.process_time)


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


@pytest.mark.slow
def test_the_edge_agents_read_the_forecast_file_at_each_opening(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """solar-18's integrator writes its forecast file (a cloudy day): its edge agent solves the
    day-ahead round with it; every other edge reading the same file drops it as not its own, and the
    day goes on with every site agreed."""
    from virtual_helpers import S as DAY
    from virtual_helpers import day_of

    steps = DAY.horizon
    config = site_config(DAY, DAY.ids.index("solar-18"))
    f = SiteForecast(
        site="solar-18", issued=DAY.start - timedelta(hours=12), start=DAY.start,
        step_s=round(DAY.dt_h * 3600), pv_kw=[0.5 * v for v in config.community.pv_kw],
    )  # fmt: skip
    path = tmp_path / "forecast.json"
    path.write_text(f.model_dump_json(), encoding="utf-8")
    day, _ = day_of(tmp_path / "day", 1.0, edge_options={"forecast_file": path})
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        results = day.run()
    assert f"solar-18: the forecast issued {f.issued.isoformat()} covers {steps} intervals" in caplog.text
    others = [s for s in DAY.ids if s != "solar-18"]
    assert all(f"{s}: dropped a forecast issued" in caplog.text for s in others)
    assert results.runtime is not None
    assert {x.id: x.state for x in results.runtime.sites} == dict.fromkeys(DAY.ids, "agreed")


def test_a_forecast_for_tomorrow_is_checked_against_tomorrows_registration() -> None:
    m = market()
    more = forecast(
        start=T0 + timedelta(days=1),
        step_s=3600,
        fixed_load_kw=[1.2 * v for v in CONFIG.community.fixed_load_kw],
    )
    assert not m.feed_forecast(more)
    assert m.reader.dropped["implausible"] == 1
