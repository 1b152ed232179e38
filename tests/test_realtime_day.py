"""The real-time day across processes over a real broker, on an accelerated shared clock: the
coordinator's rolling horizon, one edge agent (with its meter adapter and journal) and one meter
simulator per site, and an independent observer that reads only the broker (meter readings and
envelopes) and counts sustained envelope violations. Every wait is bounded."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from realtime_helpers import Processes, quarter_hour_day

from p2pdoe.core import topics
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import Doe, MeterReading, decode_runtime
from p2pdoe.services.broker import Broker

SPEED = 640.0
RATE_S = 30.0
HOURS = 4.0
LEAD_S = 20.0


@pytest.mark.timeout(240)
def test_a_four_hour_day_holds_its_envelopes_and_settles_every_interval(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    import asyncio

    import aiomqtt

    s = quarter_hour_day()
    url = mqtt_broker.url
    day = Processes(s, tmp_path, url, SPEED, RATE_S, LEAD_S)
    start = day.start
    coordinator = day.coordinator(
        "--out", str(tmp_path), "--hours", f"{HOURS:g}", "--registration-timeout-s", "60"
    )
    day.sites(s.ids)

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

    with day:
        asyncio.run(observe())
        coordinator.wait(timeout=60)
    assert coordinator.returncode == 0, day.log("dso")
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
        db = sqlite3.connect(day.journal(site))
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
