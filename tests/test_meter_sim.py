"""The meter simulator: the plant stepped on the simulated clock, readings out, set-points in."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from service_helpers import assert_service_error, run_module

from p2pdoe.core import topics
from p2pdoe.core.realtime.simulated_meter import SimulatedMeter
from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage, decode_runtime
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import Broker
from p2pdoe.services.transport import MqttTransport

DAY = datetime(2026, 6, 21, tzinfo=UTC)
NOON = DAY + timedelta(hours=12)


def _sim(rate_s: float = 60.0) -> SimulatedMeter:
    s = load_scenario("default")
    return SimulatedMeter(site_config(s, 0), DAY, rate_s, seed=7)


def _points(sim: SimulatedMeter, battery_kw: float, flex_kw: float) -> bytes:
    msg = SetPointMessage(
        site=sim.site, ts=NOON, battery_kw=battery_kw, pv_cap_kw=None, wind_cap_kw=None, flex_kw=flex_kw
    )
    return msg.model_dump_json().encode()


def test_readings_step_the_plant_and_follow_set_points() -> None:
    sim = _sim()
    k = int(12 * 3600 / sim.rate_s)  # noon
    idle = sim.reading(k)
    assert idle.ts == DAY + timedelta(seconds=(k + 1) * sim.rate_s)  # a reading closes its step
    assert idle.battery_kw == 0.0
    flex = sim.config.community.flexible_load.preferred_kw[12]
    assert idle.flex_kw == pytest.approx(flex)
    parts = (idle.pv_kw or 0) + (idle.wind_kw or 0) + (idle.battery_kw or 0)
    assert idle.p_kw == pytest.approx(parts - (idle.fixed_load_kw or 0) - (idle.flex_kw or 0))
    sim.apply(_points(sim, 50.0, 10.0))
    soc = sim.soc_kwh
    after = sim.reading(k + 1)
    assert after.battery_kw == pytest.approx(50.0)
    assert after.flex_kw == pytest.approx(10.0)
    eta = sim.spec.eta_discharge
    assert after.soc_kwh == pytest.approx(soc - 50.0 * sim.rate_s / 3600 / eta)


def test_the_same_seed_gives_the_same_readings() -> None:
    a, b = _sim(), _sim()
    assert [a.reading(k) for k in range(700, 720)] == [b.reading(k) for k in range(700, 720)]


def test_set_points_for_another_site_or_malformed_are_dropped() -> None:
    sim = _sim()
    other = json.loads(_points(sim, 50.0, 10.0)) | {"site": "someone-else"}
    sim.apply(json.dumps(other).encode())
    sim.apply(b'{"kind": "setpoints", "battery_kw": NaN}')
    assert sim.set_points is None
    assert dict(sim.dropped) == {"sender_not_topic": 1, "malformed": 1}


def test_a_rate_that_does_not_divide_the_day_is_one_line(tmp_path: Path) -> None:
    write_site_configs(load_scenario("default"), tmp_path)
    site = tmp_path / "sites" / "solar-18.json"
    run = run_module(
        "meter_sim", "--site-config", str(site), "--rate-s", "7", "--broker", "mqtt://127.0.0.1:1"
    )
    assert_service_error(run, "meter-sim", "step_s")


@pytest.mark.timeout(120)
def test_the_simulator_publishes_readings_and_obeys_set_points(mqtt_broker: Broker, tmp_path: Path) -> None:
    write_site_configs(load_scenario("default"), tmp_path)
    site = "solar-18"
    argv = [sys.executable, "-m", "meter_sim", "--site-config", str(tmp_path / "sites" / f"{site}.json"),
            "--broker", mqtt_broker.url, "--speed", "1200", "--rate-s", "60", "--start", "now"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def watch() -> list[MeterReading]:
        readings: list[MeterReading] = []
        async with MqttTransport(mqtt_broker.url, "meter-watch") as t:
            await t.subscribe(topics.site(site, "meter"))
            incoming = t.messages()
            async with asyncio.timeout(60):
                while len(readings) < 40:
                    msg = decode_runtime((await anext(incoming)).payload)
                    assert isinstance(msg, MeterReading)
                    readings.append(msg)
                    if len(readings) == 10:
                        sim = _sim()
                        await t.publish(topics.site(site, "setpoints"), _points(sim, 30.0, 2.0))
        return readings

    try:
        readings = asyncio.run(watch())
    finally:
        proc.kill()
        proc.wait(10)
    steps = {b.ts - a.ts for a, b in itertools.pairwise(readings)}
    assert steps == {timedelta(seconds=60)}  # one reading per simulated minute, none lost or repeated
    assert readings[0].battery_kw == 0.0
    assert readings[-1].battery_kw == pytest.approx(30.0)  # followed the set-point
    assert readings[-1].flex_kw == pytest.approx(2.0)
    socs = [r.soc_kwh or 0.0 for r in readings[-10:]]
    assert all(b < a for a, b in itertools.pairwise(socs))  # discharging


def test_before_the_day_the_plant_sees_the_days_first_sample() -> None:
    sim = SimulatedMeter(site_config(load_scenario("default"), 0), DAY, 60.0, 7, 150.0)
    assert sim.first_sample == -3  # 150 s of lead-in at 60 s: three readings, the first at -2 min
    before, first = sim.reading(-1), _sim().reading(0)
    assert before.ts == DAY
    assert (before.pv_available_kw, before.wind_available_kw) == (
        first.pv_available_kw,
        first.wind_available_kw,
    )
    assert before.fixed_load_kw == first.fixed_load_kw
    with pytest.raises(ValueError, match="lead-in"):
        SimulatedMeter(sim.config, DAY, 60.0, 7, -1.0)


@pytest.mark.timeout(60)
def test_the_simulator_starts_publishing_its_lead_in_before_the_day(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """A meter is running when the day starts: with --lead-in-s 120 the first reading closes the step
    two minutes before the day's start (then one a minute), so the edge controls the day's first step."""
    write_site_configs(load_scenario("default"), tmp_path)
    site = "solar-18"
    origin = datetime.now(UTC).replace(microsecond=0)
    start = origin + timedelta(minutes=100)  # 10 s wall: the process has started by then
    argv = [sys.executable, "-m", "meter_sim", "--site-config", str(tmp_path / "sites" / f"{site}.json"),
            "--broker", mqtt_broker.url, "--speed", "600", "--rate-s", "60", "--lead-in-s", "120",
            "--start", start.isoformat(), "--sim-origin", origin.isoformat(),
            "--wall-origin", origin.isoformat()]  # fmt: skip

    async def watch() -> list[MeterReading]:
        readings: list[MeterReading] = []
        async with MqttTransport(mqtt_broker.url, "meter-watch") as t:
            await t.subscribe(topics.site(site, "meter"))
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                incoming = t.messages()
                async with asyncio.timeout(40):
                    while len(readings) < 4:
                        msg = decode_runtime((await anext(incoming)).payload)
                        assert isinstance(msg, MeterReading)
                        readings.append(msg)
            finally:
                proc.kill()
                proc.wait(10)
        return readings

    readings = asyncio.run(watch())
    assert [r.ts - start for r in readings] == [timedelta(minutes=m) for m in (-1, 0, 1, 2)]


def test_the_plants_truth_is_the_profile_given_with_the_same_seeded_errors() -> None:
    """Two days whose weather and load are each date's own scenario: the meter's actual values are
    those of the dated series under its seeded errors (to rounding); the configured day read by clock
    hour gives the same first day (its own date keeps its seeds) and repeats it."""
    import numpy as np

    from p2pdoe.core.day_configs import scenario_forecast
    from p2pdoe.core.realtime.weather import actuals

    s = load_scenario("default")
    days = [load_scenario("default", day=(DAY + timedelta(days=k)).date()) for k in range(2)]
    config = site_config(s, 0)
    truth = scenario_forecast(days, config.community.id, DAY)
    sim = SimulatedMeter(config, DAY, 60.0, seed=7, days=2, truth=truth)
    expected = actuals(
        np.array(truth.pv_kw), np.array(truth.wind_kw), np.array(truth.fixed_load_kw), 1.0, 60.0, 7
    )
    np.testing.assert_allclose(sim.actuals.fixed_load_kw, expected.fixed_load_kw, rtol=1e-12)
    np.testing.assert_allclose(sim.actuals.pv_kw, expected.pv_kw, rtol=1e-12, atol=1e-12)
    same = SimulatedMeter(config, DAY, 60.0, seed=7, days=2)
    assert not np.array_equal(same.actuals.fixed_load_kw, sim.actuals.fixed_load_kw)
    one_day = 24 * 60
    np.testing.assert_allclose(
        same.actuals.fixed_load_kw[:one_day], sim.actuals.fixed_load_kw[:one_day], rtol=1e-12
    )


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"kind": "forecast"}', ("profile file", "is invalid")),
        (None, ("town-14's, not solar-18's",)),
    ],
)
def test_a_profile_file_that_cannot_be_the_sites_is_one_line(
    tmp_path: Path, content: str | None, needles: tuple[str, ...]
) -> None:
    from p2pdoe.core.schemas.runtime import SiteForecast

    write_site_configs(load_scenario("default"), tmp_path)
    profile = tmp_path / "profile.json"
    other = SiteForecast(site="town-14", issued=DAY, start=DAY, step_s=3600, pv_kw=[0.0] * 24)
    profile.write_text(content or other.model_dump_json(), encoding="utf-8")
    run = run_module(
        "meter_sim", "--site-config", str(tmp_path / "sites" / "solar-18.json"),
        "--profile-file", str(profile), "--broker", "mqtt://127.0.0.1:1",
    )  # fmt: skip
    assert_service_error(run, "meter-sim", *needles)
