"""The real-time day across processes over a real broker, on an accelerated shared clock: the
coordinator's rolling horizon, one edge agent (with its meter adapter and journal) and one meter
simulator per site, and an independent observer that reads only the broker (meter readings and
envelopes) and counts sustained envelope violations. Every wait is bounded."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from service_helpers import service_env

from p2pdoe.core import topics
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import Doe, MeterReading, decode_runtime
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import Broker

SPEED = 640.0
RATE_S = 30.0
HOURS = 4.0
LEAD_S = 20.0


def _clock(start: datetime, wall: datetime) -> list[str]:
    iso = [x.isoformat().replace("+00:00", "Z") for x in (start, start, wall)]
    return ["--start", iso[0], "--sim-origin", iso[1], "--wall-origin", iso[2], "--speed", f"{SPEED:g}"]


@pytest.mark.timeout(240)
def test_a_four_hour_day_holds_its_envelopes_and_settles_every_interval(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    import asyncio

    import aiomqtt

    s = load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})
    write_site_configs(s, tmp_path / "config")
    now = datetime.now(UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    clock = _clock(start, now + timedelta(seconds=LEAD_S))
    url = mqtt_broker.url
    py = sys.executable
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start_proc(name: str, *argv: str) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen([py, "-m", *argv], stdout=out, stderr=subprocess.STDOUT, env=service_env())
        procs.append(proc)
        return proc

    coordinator = start_proc(
        "dso", "dso_coordinator", "--coordinator-config", str(tmp_path / "config" / "coordinator.json"),
        "--broker", url, "--out", str(tmp_path), "--rolling", "--exit-after-day", "--hours", f"{HOURS:g}",
        "--meter-step-s", f"{RATE_S:g}", "--registration-timeout-s", "60", *clock,
    )  # fmt: skip
    for site in s.ids:
        cfg = str(tmp_path / "config" / "sites" / f"{site}.json")
        start_proc(
            f"edge-{site}", "edge_agent", "--site-config", cfg, "--broker", url, "--meter",
            "--meter-step-s", f"{RATE_S:g}", "--journal", str(tmp_path / "journal" / f"{site}.db"), *clock,
        )  # fmt: skip
        start_proc(
            f"meter-{site}",
            "meter_sim",
            "--site-config",
            cfg,
            "--broker",
            url,
            "--rate-s",
            f"{RATE_S:g}",
            *clock,
        )

    observer = ViolationObserver()
    integral = MeterIntegral(start, 900.0, RATE_S)

    async def observe() -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port), identifier="independent-observer") as client:
            for kind in ("doe", "doe/default"):
                await client.subscribe(topics.every_site(kind), qos=1)
            await client.subscribe(topics.every_site("meter"), qos=0)
            deadline = time.monotonic() + 200
            async for m in client.messages:
                parsed = topics.parse(str(m.topic))
                if parsed is not None and m.payload:
                    msg = decode_runtime(bytes(m.payload))  # type: ignore[arg-type,unused-ignore]
                    if isinstance(msg, MeterReading):
                        observer.reading(msg)
                        integral.add(msg)
                    elif isinstance(msg, Doe):
                        observer.envelope(parsed.kind, msg)
                if coordinator.poll() is not None or time.monotonic() > deadline:
                    return

    try:
        asyncio.run(observe())
        coordinator.wait(timeout=60)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    assert coordinator.returncode == 0, (logs / "dso.log").read_text()[-3000:]
    results = Results.model_validate_json((tmp_path / "results.json").read_bytes())
    rt = results.realtime
    assert rt is not None

    # Sustained violations, counted from the broker alone, and by the coordinator alike: none (the
    # rolling schedules keep their margins inside the envelopes; see docs/realtime.md).
    assert observer.judged > 0.9 * len(s.ids) * HOURS * 3600 / RATE_S
    assert observer.violations == [], observer.violations
    assert rt.envelope_violations.count == len(observer.violations)

    # The rolling rounds ran every interval and published before the interval started.
    assert len(rt.intervals) == int(HOURS * 4) - 1
    ran = [i for i in rt.intervals if i.status in ("converged", "stopped", "max_iterations")]
    assert len(ran) >= len(rt.intervals) // 2, [i.status for i in rt.intervals]
    assert all(i.lead_s > 0 for i in rt.intervals), [i.lead_s for i in rt.intervals]

    # Every site settled every complete interval, and the journal's energy matches the meter integral.
    complete = range(int(HOURS * 4) - 1)
    for site in s.ids:
        settled = {datetime.fromisoformat(x.interval_start) for x in rt.settlements if x.site == site}
        assert {start + timedelta(minutes=15 * t) for t in complete} <= settled, site
        db = sqlite3.connect(tmp_path / "journal" / f"{site}.db")
        rows = dict(db.execute("SELECT interval_start, measured_kwh FROM settlements").fetchall())
        for t in complete:
            key = (start + timedelta(minutes=15 * t)).isoformat()
            meter = integral.energy_kwh(site, t)
            assert meter is not None
            assert rows[key] == pytest.approx(meter, rel=1e-3, abs=1e-3), (site, t)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert rt.energy_mismatch_max_pct < 0.1
    assert rt.measured_ac is not None
    assert rt.measured_ac.converged
    json.dumps(results.model_dump())  # the whole results.json stays JSON
