"""The coordinator killed mid-day and restarted, with every site, its edge agent and its meter
running as processes over a real broker on an accelerated clock. What the sites apply is read from
their status topics (each switch of envelope, time-stamped in simulated time), what the coordinator
published from the broker alone.

Targets (issue 5): every site on its default envelope as its last valid envelope expires (the
cached envelope is followed until then: CSIP-AUS); once restarted, the coordinator's dynamic
envelopes resume within one interval.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from realtime_helpers import Processes, quarter_hour_day

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, SiteStatus, decode_runtime
from p2pdoe.services.broker import Broker

SPEED = 120.0  # an interval is 7.5 s of wall time: more than a restarted process needs to start
RATE_S = 30.0
INTERVAL_S = 900.0
KILL_S = 40 * 60  # 00:40, ten minutes into interval 2
RESTART_S = 70 * 60  # 01:10, ten minutes into interval 4
HOURS = 1.75


@dataclass
class Seen:
    """What the broker carried, as (simulated) time-stamped events."""

    switches: dict[str, list[tuple[datetime, str]]] = field(default_factory=dict)  # site -> (ts, kind)
    dynamic: dict[str, list[tuple[float, Doe]]] = field(default_factory=dict)  # site -> (wall, envelope)
    dso: list[tuple[float, str]] = field(default_factory=list)  # (wall, state) of live DSO statuses

    def take(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse(topic)
        msg = decode_runtime(payload) if payload else None
        if isinstance(msg, SiteStatus) and parsed is not None and not retained:
            self.switches.setdefault(msg.site, []).append((msg.ts, msg.envelope))
        elif isinstance(msg, Doe) and parsed is not None and parsed.kind == "doe" and msg.round is not None:
            self.dynamic.setdefault(msg.site, []).append((time.monotonic(), msg))
        elif isinstance(msg, DsoStatus) and not retained:
            self.dso.append((time.monotonic(), msg.state))

    def kind_at(self, site: str, moment: datetime) -> str | None:
        kind = None
        for ts, k in self.switches.get(site, []):
            if ts <= moment:
                kind = k
        return kind


async def watch(url: str, seen: Seen, until: float, done: asyncio.Event) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port), identifier="loss-observer") as client:
        for kind in ("status", "doe"):
            await client.subscribe(topics.every_site(kind), qos=1)
        await client.subscribe(topics.DSO_STATUS, qos=1)
        while time.monotonic() < until and not done.is_set():
            try:
                m = await asyncio.wait_for(anext(client.messages), 0.5)
            except TimeoutError:
                continue
            seen.take(str(m.topic), bytes(m.payload), m.retain)  # type: ignore[arg-type,unused-ignore]


@pytest.mark.timeout(240)
def test_sites_fall_back_as_their_envelopes_expire_and_resume_when_the_coordinator_returns(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    s = quarter_hour_day()
    checkpoint = tmp_path / "state" / "checkpoint.json"
    seen = Seen()
    with Processes(s, tmp_path, mqtt_broker.url, SPEED, RATE_S) as day:
        first = day.coordinator(
            "--hours", f"{HOURS:g}", "--registration-timeout-s", "60", "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / "first"),
        )  # fmt: skip
        day.sites(s.ids)

        async def scenario() -> tuple[float, float]:
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(mqtt_broker.url, seen, time.monotonic() + 200, done))
            await _sleep_until(day.wall_at(KILL_S))
            os.kill(first.pid, signal.SIGKILL)  # its last will says offline
            killed_at = time.monotonic()
            await _sleep_until(day.wall_at(RESTART_S))
            restarted_at = day.sim_now_s()
            day.coordinator("--hours", f"{HOURS:g}", "--checkpoint", str(checkpoint), "--out", str(tmp_path))
            await _sleep_until(day.wall_at(HOURS * 3600 + 10 * 60))
            done.set()
            await watcher
            return killed_at, restarted_at

        killed_wall, restarted_s = asyncio.run(scenario())
        second = day.procs["dso#1"]
        try:
            second.wait(60)
        except Exception:
            pytest.fail(day.log("dso#1"))
        assert second.returncode == 0, day.log("dso#1")
        assert first.wait(10) == -signal.SIGKILL
        logs = {site: day.log(f"edge-{site}") for site in s.ids}

    killed = day.start + timedelta(seconds=KILL_S)
    restarted = day.start + timedelta(seconds=restarted_s)
    assert [state for _, state in seen.dso].count("offline") >= 1  # the last will
    for site in s.ids:
        # The cached envelope is followed until it expires; then the default, at the next reading.
        before = [d for wall, d in seen.dynamic.get(site, []) if wall < killed_wall]
        assert before, (site, logs[site])
        expires = max(d.end for d in before)
        assert expires > killed
        assert seen.kind_at(site, expires - timedelta(seconds=1)) == "dynamic", (site, seen.switches[site])
        fell = [ts for ts, k in seen.switches[site] if ts >= killed and k != "dynamic"]
        assert fell, (site, seen.switches[site], logs[site])
        assert expires <= fell[0] <= expires + timedelta(seconds=2 * RATE_S), (site, expires, fell[0])
        assert seen.kind_at(site, restarted - timedelta(seconds=1)) == "default", seen.switches[site]
        # Dynamic again within one interval of the coordinator's restart.
        back = [ts for ts, k in seen.switches[site] if ts >= restarted and k == "dynamic"]
        assert back, (site, seen.switches[site], logs[site])
        assert back[0] - restarted <= timedelta(seconds=INTERVAL_S), (site, restarted, back[0])
        during = [k for ts, k in seen.switches[site] if ts >= day.start]  # before: nothing heard yet
        assert set(during) <= {"dynamic", "default"}, seen.switches[site]

    # The restarted coordinator went on with the rolling horizon, warm from its checkpoint.
    realtime = json.loads((tmp_path / "realtime.json").read_text())
    rounds = [i for i in realtime["intervals"] if i["round"] is not None]
    assert rounds, realtime["intervals"]
    assert any(i["status"] in ("converged", "stopped") for i in rounds), [i["status"] for i in rounds]
    assert json.loads(checkpoint.read_text())["offset"] >= RESTART_S // INTERVAL_S


async def _sleep_until(moment: datetime) -> None:
    from datetime import UTC

    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))
