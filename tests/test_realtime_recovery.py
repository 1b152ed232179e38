"""An edge agent SIGKILLed and started again on its journal, as deployed: the coordinator, an edge
agent and a meter simulator per site, each a process over a real Mosquitto, on the lockstep clock
(tests/realtime_helpers.py). What only real processes show: a process dying at an arbitrary
instruction, its SQLite journal (WAL, full synchronous commits) read back by a new process, the last
will published by the broker. The test is a member of the lockstep day (`Harness`), so each kill and
restart lands at an exact simulated moment however slow the machine; the one wall-clock wait is the
granter's patience (`--silence-timeout-s 60`) before it goes on without the dead agent.

Tested on the virtual clock now (tests/test_virtual_day.py), with exact counts: the same kills with
every settlement checked against the broker's readings, and the broker outage (the edge's outbox
forwarding the outage's telemetry and settlements, its retained state published again).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from realtime_helpers import (
    HARNESS,
    Harness,
    JournalRows,
    Processes,
    kwh,
    quarter_hour_day,
    read_journal,
    subscribe_logging_mosquitto,
)

from p2pdoe.core import topics
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import MeterReading, SettlementRecord, SiteStatus, Telemetry
from p2pdoe.services.broker import Broker

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
SITE = "solar-wind-33"
RATE_S = 30.0
DT_S = 900
PER_INTERVAL = round(DT_S / RATE_S)
HOURS = 2.0
# Each kill: (simulated seconds into the day, seconds dead). The first comes back at once (the new
# process resumes the interval under way from the journal and misses no reading); the second in the
# next interval, after the granter has gone on without it (it settles the interrupted interval late).
KILLS = [(2 * DT_S + 180, 0), (4 * DT_S + 720, 240)]
_WITHIN_STEP = timedelta(milliseconds=1)


@pytest.fixture
def mosquitto() -> Iterator[Broker]:
    yield from subscribe_logging_mosquitto()


@dataclass(frozen=True)
class Kill:
    at: datetime
    back: datetime
    journal: JournalRows  # read once the process had died: what it had committed


@pytest.mark.timeout(600)
def test_a_sigkilled_edge_agent_resumes_its_journal_and_loses_no_settlement(
    mosquitto: Broker, tmp_path: Path
) -> None:
    s = quarter_hour_day()
    kinds = ("status", "settlement", "telemetry", "meter")
    harness = Harness(mosquitto.url, [(topics.site(SITE, k), 0 if k == "meter" else 1) for k in kinds])
    kills: list[Kill] = []
    with Processes(s, tmp_path, mosquitto.url, RATE_S, HOURS) as day:
        subscribed = f"edge-{SITE} 0 {topics.site(SITE, 'meter')}"

        async def start_edge() -> None:
            """Started, and subscribed to its meter before time moves on (a restarted agent that
            misses its first step's reading holds the step for ever: see the report)."""
            n = mosquitto.log().count(subscribed)
            day.edge(SITE)
            await harness.until(
                lambda: mosquitto.log().count(subscribed) > n, "the agent's meter subscription"
            )

        async def kill(at: datetime, back: datetime) -> None:
            edge = day.latest(f"edge-{SITE}")
            os.kill(edge.pid, signal.SIGKILL)
            assert await asyncio.to_thread(edge.wait, 10) == -signal.SIGKILL
            kills.append(Kill(at, back, read_journal(day.journal(SITE))))
            if back == at:
                await start_edge()

        for into_s, dead_s in KILLS:
            at = day.start + timedelta(seconds=into_s)
            back = at + timedelta(seconds=dead_s)
            harness.at(at, partial(kill, at, back))
            if dead_s:
                harness.at(back, start_edge)
        day.granter(s.ids, f"{HARNESS}:grid")
        coordinator = day.coordinator("--out", str(tmp_path))
        day.sites(s.ids)
        asyncio.run(harness.run(timeout_s=480))
        assert coordinator.wait(60) == 0, day.logs()
        clock = day.log("clock", 20000)

    msgs = [x.msg for x in harness.seen if getattr(x.msg, "site", None) == SITE]
    readings: dict[int, list[MeterReading]] = {}
    integral = MeterIntegral(day.start, float(DT_S), RATE_S)
    for r in sorted({m.ts: m for m in msgs if isinstance(m, MeterReading)}.values(), key=_ts):
        integral.add(r)
        readings.setdefault(_interval(day.start, r.ts - _WITHIN_STEP), []).append(r)
    telemetry = [m for m in msgs if isinstance(m, Telemetry) and m.ts > day.start]
    settled = [m for m in msgs if isinstance(m, SettlementRecord)]
    after = read_journal(day.journal(SITE))
    n = int(HOURS * 3600 / DT_S)

    # Both kills landed, and the granter named the dead agent and went on without it.
    assert [(k.at - day.start).total_seconds() for k in kills] == [into for into, _ in KILLS]
    assert f"edge-{SITE}: silent for 60 s" in clock, clock

    # The journal survived each SIGKILL intact with all it had committed: every settlement, and the
    # interval under way exactly to the kill's last reading.
    assert after.integrity == "ok"
    for k in kills:
        assert k.journal.integrity == "ok"
        assert k.journal.settlements
        for key, row in k.journal.settlements.items():
            assert after.settlements[key] == row, key
        t = _interval(day.start, k.at - _WITHIN_STEP)
        row = k.journal.intervals[(day.start + timedelta(seconds=DT_S * t)).isoformat()]
        before = [r for r in readings[t] if r.ts <= k.at]
        assert row[3] == len(before)
        assert row[2] == pytest.approx(kwh(before, RATE_S), rel=1e-9, abs=1e-9)

    # Every interval settled exactly once, with the readings the agent saw: all of them but those of
    # the second kill's dead time (the first restart missed none), each over its own step.
    assert sorted(x.interval_start for x in settled) == [
        day.start + timedelta(seconds=DT_S * t) for t in range(n)
    ]
    interrupted = set()
    for x in settled:
        t = _interval(day.start, x.interval_start)
        alive = [r for r in readings[t] if not any(k.at < r.ts <= k.back for k in kills)]
        assert (x.readings, x.covered_s) == (len(alive), len(alive) * RATE_S), t
        assert x.measured_kwh == pytest.approx(kwh(alive, RATE_S), rel=1e-9, abs=1e-9), t
        assert after.settlements[x.interval_start.isoformat()][1] == x.measured_kwh
        if len(alive) == PER_INTERVAL:
            assert x.measured_kwh == pytest.approx(integral.energy_kwh(SITE, t), rel=1e-9, abs=1e-9), t
        else:
            interrupted.add(t)
    assert interrupted == {4, 5}
    assert after.outbox == 0

    for k in kills:
        # The broker published the last will (offline); the new process said online, on the dynamic
        # envelope its journal kept, and handled the next step's reading.
        statuses = [
            x.msg
            for x in harness.seen
            if isinstance(x.msg, SiteStatus) and x.msg.site == SITE and x.at >= k.at and not x.retained
        ]
        assert statuses[0].state == "offline"
        online = next(m for m in statuses if m.state == "online")
        assert online.envelope == "dynamic"
        first = min((m for m in telemetry if m.ts > k.back), key=_ts)
        assert first.ts == k.back + timedelta(seconds=RATE_S)
        assert first.envelope == "dynamic"

    results = Results.model_validate_json((tmp_path / "results.json").read_bytes())
    assert results.realtime is not None
    assert results.realtime.missing_settlements == {}
    assert results.realtime.clock == "lockstep"


def _ts(m: MeterReading | Telemetry) -> datetime:
    return m.ts


def _interval(start: datetime, moment: datetime) -> int:
    return int((moment - start).total_seconds() // DT_S)
