"""The coordinator SIGKILLed mid-day and started again from its checkpoint, as deployed: the
coordinator, an edge agent and a meter simulator per site, each a process over a real Mosquitto, on
the lockstep clock (tests/realtime_helpers.py). What only real processes show: the coordinator
dying at an arbitrary instruction, its checkpoint file (written atomically) read back by a new
process, the broker's last will and retained envelopes carrying the sites through. The test is a
member of the lockstep day (`Harness`), so the kill and the restart land at exact simulated moments
however slow the machine; the one wall-clock wait is the granter's patience (`--silence-timeout-s
60`) before it goes on without the dead coordinator.

Targets (issue 5): every site on its default envelope as its last valid envelope expires (the
cached envelope is followed until then: CSIP-AUS); once restarted, the coordinator's dynamic
envelopes resume within one interval.

Tested on the virtual clock now (tests/test_virtual_day.py), reading by reading: which envelope each
site's telemetry carried before, during and after the loss, and the restarted coordinator's
realtime.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from realtime_helpers import HARNESS, Harness, Processes, Seen, quarter_hour_day

from p2pdoe.core import topics
from p2pdoe.core.schemas.results import RealtimeInfo
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, SiteStatus, Telemetry
from p2pdoe.services.broker import Broker

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
RATE_S = 30.0
DT_S = 900
KILL_S = 40 * 60  # 00:40, ten minutes into interval 2
RESTART_S = 70 * 60  # 01:10, ten minutes into interval 4
HOURS = 1.75


@pytest.mark.timeout(600)
def test_sites_fall_back_as_their_envelopes_expire_and_resume_when_the_coordinator_returns(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    s = quarter_hour_day()
    checkpoint = tmp_path / "state" / "checkpoint.json"
    kinds = [(topics.every_site(k), 1) for k in ("status", "doe", "doe/default", "telemetry")]
    harness = Harness(mosquitto_broker.url, [*kinds, (topics.DSO_STATUS, 1)])
    with Processes(s, tmp_path, mosquitto_broker.url, RATE_S, HOURS) as day:
        killed = day.start + timedelta(seconds=KILL_S)
        restarted = day.start + timedelta(seconds=RESTART_S)

        async def kill() -> None:
            os.kill(first.pid, signal.SIGKILL)  # its last will says offline
            assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL

        async def restart() -> None:
            """Started, and the envelope in force published from its checkpoint, before time moves on."""
            day.coordinator("--checkpoint", str(checkpoint), "--out", str(tmp_path))
            await harness.until(lambda: len(_dynamic(harness, restarted)) >= len(s.ids), "its envelopes")

        harness.at(killed, kill)
        harness.at(restarted, restart)
        day.granter(s.ids, f"{HARNESS}:grid")
        first = day.coordinator("--checkpoint", str(checkpoint), "--out", str(tmp_path / "first"))
        day.sites(s.ids)
        asyncio.run(harness.run(timeout_s=480))
        second = day.latest("dso")
        assert second is not first
        assert second.wait(60) == 0, day.log("dso#1")
        clock = day.log("clock", 20000)

    # The broker published the coordinator's last will; the granter went on without it. (The second
    # said goodbye, offline, as it stopped after the day.)
    offline = [x.at for x in harness.of(DsoStatus) if cast(DsoStatus, x.msg).state == "offline"]
    assert offline[0] == killed
    assert all(at > day.start + timedelta(hours=HOURS) for at in offline[1:]), offline
    assert "dso: silent for 60 s" in clock, clock
    defaults = {
        cast(Doe, x.msg).site: cast(Doe, x.msg) for x in harness.seen if x.topic.endswith("/doe/default")
    }
    for site in s.ids:
        cached = [cast(Doe, x.msg) for x in _of_site(harness, site, "doe") if x.at <= killed]
        expires = max(d.end for d in cached)
        assert expires == day.start + timedelta(seconds=4 * DT_S)  # interval 3's, published at 00:30
        default = defaults[site]
        # Reading by reading, the telemetry carried the cached envelope to its end, then the
        # default until the coordinator was back, then the envelope it published from its checkpoint.
        for x in _of_site(harness, site, "telemetry"):
            m = cast(Telemetry, x.msg)
            if not day.start < m.ts <= day.start + timedelta(hours=HOURS):
                continue
            if killed < m.ts <= expires:
                doe = next(d for d in reversed(cached) if d.start < m.ts <= d.end)
                assert (m.envelope, m.lo_kw, m.up_kw) == ("dynamic", doe.lo_kw, doe.up_kw), m
            elif expires < m.ts <= restarted:
                assert (m.envelope, m.lo_kw, m.up_kw) == ("default", *default.box_at(m.ts)), m
            elif m.ts > restarted:
                assert m.envelope == "dynamic", m
        # Its status said so as it switched: default within a reading of the expiry, dynamic again
        # within one interval of the restart (at its next reading), never the fixed default.
        switches = [
            (m.ts, m.envelope)
            for m in (cast(SiteStatus, x.msg) for x in _of_site(harness, site, "status") if not x.retained)
            if m.state == "online" and m.ts >= day.start
        ]
        fell = next(ts for ts, k in switches if ts > killed and k != "dynamic")
        assert abs(fell - expires) <= timedelta(seconds=RATE_S), switches
        back = next(ts for ts, k in switches if ts >= fell and k == "dynamic")
        assert back - restarted <= timedelta(seconds=DT_S), switches
        assert {k for _, k in switches} <= {"dynamic", "default"}, switches

    # The restarted coordinator went on with the rolling horizon, warm from its checkpoint, and wrote
    # its part of the day.
    rt = RealtimeInfo.model_validate_json((tmp_path / "realtime.json").read_bytes())
    assert rt.clock == "lockstep"
    assert [i.interval for i in rt.intervals] == [5, 6]  # 5 too late to agree: the checkpoint's
    assert {i.status for i in rt.intervals[1:]} <= {"converged", "stopped", "max_iterations"}
    assert rt.missing_settlements == {}
    assert json.loads(checkpoint.read_text())["offset"] >= RESTART_S // DT_S


def _of_site(harness: Harness, site: str, kind: str) -> list[Seen]:
    return [x for x in harness.seen if x.topic == topics.site(site, kind)]


def _dynamic(harness: Harness, at: datetime) -> list[Seen]:
    return [x for x in harness.seen if x.topic.endswith("/doe") and x.at >= at and not x.retained]
