"""Recovery of the edge agent, as deployed: one edge agent process (meter adapter and journal) and one
meter simulator process for one site, over real Mosquitto brokers, on an accelerated shared clock. No
coordinator process: the test plays it with a plain MQTT client, publishing what the coordinator
publishes (its retained status, the site's default on `doe/default`, and each interval's dynamic
envelope on `doe`, retained, as the interval before it starts), all of it again whenever its
connection comes back; and it judges only what travels over the brokers, and the journal.

1. The edge agent killed (SIGKILL) mid-interval and restarted on the same journal: once at once (it
   resumes the interval under way) and once after the interval has ended (it settles it late).
2. The DSO-side broker stopped for ten simulated minutes and started again on the same port, while
   the meter keeps talking to the agent over the site's own broker (the gateway set-up).

Every process is killed at the end and every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, TypeVar, cast

import aiomqtt
import pytest
from service_helpers import read_retained, service_env

from p2pdoe.core import topics
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    Registration,
    Runtime,
    SetPointMessage,
    SettlementRecord,
    SiteStatus,
    Telemetry,
    decode_runtime,
)
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import registration
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import Broker, start_mosquitto

SITE = "solar-wind-33"
RATE_S = 30.0  # simulated seconds between meter readings
DT_S = 900  # simulated seconds per interval
PER_INTERVAL = round(DT_S / RATE_S)
LEAD_S = 8.0  # wall seconds from the test's start to the day's start: room for the processes to start
REL = 1e-3  # 0.1 %
_WITHIN_STEP = timedelta(milliseconds=1)


# -- the bench: configuration, clock and processes ---------------------------------------------------


class Bench:
    """One site of the quarter-hour default day in `root`, on a clock that reaches the day's start
    LEAD_S wall seconds from now and runs `speed` simulated seconds per wall second."""

    def __init__(self, root: Path, speed: float):
        write_site_configs(load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}}), root)
        self.site_config = root / "sites" / f"{SITE}.json"
        self.config = SiteConfig.model_validate_json(self.site_config.read_bytes())
        self.journal = root / "journal" / f"{SITE}.db"
        self.logs = root / "logs"
        self.logs.mkdir()
        self.speed = speed
        now = datetime.now(UTC)
        self.start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        self.wall_origin = now + timedelta(seconds=LEAD_S)
        self.procs: list[subprocess.Popen[bytes]] = []

    def sim_now(self) -> datetime:
        return self.start + (datetime.now(UTC) - self.wall_origin) * self.speed

    def interval_start(self, t: int) -> datetime:
        return self.start + timedelta(seconds=DT_S * t)

    def interval_of(self, moment: datetime) -> int:
        return int((moment - self.start).total_seconds() // DT_S)

    def reading_interval(self, ts: datetime) -> int:
        """The interval a reading time-stamped `ts` (the end of its step) measured."""
        return self.interval_of(ts - _WITHIN_STEP)

    async def until(self, sim: datetime) -> None:
        wall = self.wall_origin + (sim - self.start) / self.speed
        await asyncio.sleep(max(0.0, (wall - datetime.now(UTC)).total_seconds()))

    def clock_args(self) -> list[str]:
        iso = [x.isoformat().replace("+00:00", "Z") for x in (self.start, self.start, self.wall_origin)]
        return [
            "--start",
            iso[0],
            "--sim-origin",
            iso[1],
            "--wall-origin",
            iso[2],
            "--speed",
            f"{self.speed:g}",
        ]

    def _run(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{len(self.procs):02d}-{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=service_env(),
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def edge(self, broker: str, meter_broker: str | None = None) -> subprocess.Popen[bytes]:
        meter = [] if meter_broker is None else ["--meter-broker", meter_broker]
        return self._run(
            "edge", "edge_agent", "--site-config", str(self.site_config), "--broker", broker, *meter,
            "--meter", "--meter-step-s", f"{RATE_S:g}", "--journal", str(self.journal), *self.clock_args(),
        )  # fmt: skip

    def meter(self, broker: str) -> subprocess.Popen[bytes]:
        return self._run(
            "meter", "meter_sim", "--site-config", str(self.site_config), "--broker", broker,
            "--rate-s", f"{RATE_S:g}", *self.clock_args(),
        )  # fmt: skip

    def logs_tail(self, limit: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-limit:]}" for p in sorted(self.logs.iterdir())
        )

    def stop_all(self) -> None:
        """SIGTERM (a clean stop), then SIGKILL what is still running after 10 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # what the coordinator publishes for the site
    def envelope(self, t: int) -> Doe:
        """Interval t's dynamic envelope: the site's technical range then, as a round may grant it."""
        reg = registration(self.config)
        lo, up = reg.technical_min_kw[t], reg.technical_max_kw[t]
        return Doe.from_box(SITE, f"rt{t:03d}", self.interval_start(t), DT_S, lo, up)

    def default(self) -> Doe:
        reg = registration(self.config)
        return Doe.from_box(
            SITE, None, self.start, DT_S * 96, min(reg.technical_min_kw), max(reg.technical_max_kw)
        )


# -- plain MQTT clients: the coordinator's part and the observers ------------------------------------


def client(url: str) -> aiomqtt.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    return aiomqtt.Client(host, int(port), identifier=f"test-{uuid.uuid4().hex[:10]}", timeout=5)


M = TypeVar("M", bound=Runtime)


@dataclass(frozen=True)
class Seen(Generic[M]):
    wall: float  # time.monotonic() at arrival
    topic: str
    msg: M
    retained: bool
    connection: int  # the observer's connection it came on (1: the first, 2: after a broker restart)


@dataclass
class Observer:
    """Records what arrives on `filters` at `url`, reconnecting every 5 ms while the broker is away.
    A restarted broker keeps nothing for a client that has not subscribed again, so the observer must
    be back before the agent forwards its backlog: the agent's reconnection backs off (0.25 s, then
    doubling), and once connected it subscribes, republishes its state and forwards at its next
    telemetry, so a 5 ms retry is back first all but always."""

    url: str
    filters: list[tuple[str, int]]
    seen: list[Seen[Runtime]] = field(default_factory=list)
    connections: int = 0
    connected_at: list[float] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            try:
                async with client(self.url) as c:
                    for f, qos in self.filters:
                        await c.subscribe(f, qos=qos)
                    self.connections += 1
                    self.connected_at.append(time.monotonic())
                    async for m in c.messages:
                        if isinstance(m.payload, bytes | bytearray) and m.payload:
                            msg = decode_runtime(bytes(m.payload))
                            seen = Seen(
                                time.monotonic(), m.topic.value, msg, bool(m.retain), self.connections
                            )
                            self.seen.append(seen)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.005)

    async def connected(self, n: int = 1, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            while self.connections < n:
                await asyncio.sleep(0.02)

    def of(self, kind: type[M]) -> list[Seen[M]]:
        return [cast(Seen[M], s) for s in self.seen if isinstance(s.msg, kind)]


async def coordinate(bench: Bench, url: str) -> None:
    """The coordinator's part: its retained status, the site's default, and interval t's envelope,
    retained on `doe`, as interval t-1 starts (interval 0's at once). On every (re)connection it
    publishes all of it again (the envelope in force and the next), as our transport does: a broker
    restarted without persistence keeps no retained message."""
    doe_topic = topics.site(SITE, "doe")
    while True:
        try:
            async with client(url) as c:

                async def follow(c: aiomqtt.Client = c) -> None:
                    status = DsoStatus(state="online", round=None, ts=bench.sim_now())
                    await c.publish(topics.DSO_STATUS, status.model_dump_json(), qos=1, retain=True)
                    default = bench.default().model_dump_json()
                    await c.publish(topics.site(SITE, "doe/default"), default, qos=1, retain=True)
                    t = max(bench.interval_of(bench.sim_now()), -1)
                    for k in range(max(t, 0), t + 2):
                        await c.publish(doe_topic, bench.envelope(k).model_dump_json(), qos=1, retain=True)
                    while True:
                        t += 1
                        await bench.until(bench.interval_start(t))
                        await c.publish(
                            doe_topic, bench.envelope(t + 1).model_dump_json(), qos=1, retain=True
                        )

                async def watch(c: aiomqtt.Client = c) -> None:  # ends (MqttError) when the link drops
                    async for _ in c.messages:
                        pass

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(follow())
                    tg.create_task(watch())
        except* aiomqtt.MqttError:
            await asyncio.sleep(0.02)


async def serving(work: Callable[[], Awaitable[None]], background: Iterable[Awaitable[None]]) -> None:
    """`work` with the `background` coroutines running beside it (cancelled when it ends)."""
    tasks = [asyncio.ensure_future(b) for b in background]
    try:
        await work()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.1)


# -- the journal and the meter -----------------------------------------------------------------------


@dataclass(frozen=True)
class JournalRows:
    settlements: dict[str, tuple[object, ...]]  # by interval start (ISO)
    intervals: dict[str, tuple[object, ...]]
    outbox: int
    integrity: str


def read_journal(path: Path) -> JournalRows:
    db = sqlite3.connect(path, timeout=10)
    try:
        settlements = {str(r[0]): tuple(r) for r in db.execute("SELECT * FROM settlements")}
        intervals = {str(r[0]): tuple(r) for r in db.execute("SELECT * FROM intervals")}
        outbox = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()
    return JournalRows(settlements, intervals, outbox, integrity)


def kwh(readings: Iterable[MeterReading]) -> float:
    """Each reading's p over its own step (the simulator's readings are evenly spaced)."""
    return sum(r.p_kw for r in readings) * RATE_S / 3600.0


def meter_side(bench: Bench, obs: Observer) -> tuple[dict[int, list[MeterReading]], MeterIntegral]:
    """The readings seen on the broker, by interval, and their integral (MeterIntegral, as the
    coordinator computes it)."""
    readings = sorted({s.msg.ts: s.msg for s in obs.of(MeterReading)}.values(), key=lambda r: r.ts)
    integral = MeterIntegral(bench.start, float(DT_S), RATE_S)
    by_interval: dict[int, list[MeterReading]] = {}
    for r in readings:
        integral.add(r)
        by_interval.setdefault(bench.reading_interval(r.ts), []).append(r)
    return by_interval, integral


# -- 1. the edge agent killed mid-interval ------------------------------------------------------------

SPEED_KILL = 180.0  # an interval in 5 s of wall time, a reading every 1/6 s
# Each kill: (interval, simulated seconds into it, when it comes back: None at once, else simulated
# seconds into the next interval).
KILLS = [(2, 180, None), (4, 720, 60)]
END_KILL = 8  # the run ends as this interval starts: intervals 0..7 complete


@dataclass(frozen=True)
class Kill:
    before: JournalRows  # read just before the SIGKILL
    wall: float  # as it was sent
    sim: datetime  # once the process had gone
    restart_wall: float
    restart_sim: datetime


@pytest.mark.timeout(150)
def test_a_killed_edge_agent_resumes_its_journal_and_loses_no_settlement(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """Honest behaviour for the interval under way at a kill: the restarted agent resumes the
    accumulation it journaled (it loses nothing it committed) and settles the interval with the
    readings it saw, each over its own step. The readings the meter gave while the agent was dead are
    not in the settlement, neither as readings nor as energy: `covered_s` says how much of the
    interval the readings cover, and the coordinator, which saw every reading on the broker, can tell
    the gap. (Extrapolating the first reading after the restart over the whole gap would claim a
    measurement nobody made.) An interval the agent saw whole settles to the meter's integral."""
    bench = Bench(tmp_path, SPEED_KILL)
    url = mosquitto_broker.url
    kinds = ("telemetry", "settlement", "status")
    obs = Observer(url, [*[(topics.site(SITE, k), 1) for k in kinds], (topics.site(SITE, "meter"), 0)])
    kills: list[Kill] = []

    async def work() -> None:
        await obs.connected()
        bench.meter(url)
        edge = bench.edge(url)
        for t, into_s, back_s in KILLS:
            await bench.until(bench.interval_start(t) + timedelta(seconds=into_s))
            before = read_journal(bench.journal)
            wall = time.monotonic()
            edge.send_signal(signal.SIGKILL)
            await asyncio.to_thread(edge.wait, 10)
            sim = bench.sim_now()
            if back_s is not None:
                await bench.until(bench.interval_start(t + 1) + timedelta(seconds=back_s))
            edge = bench.edge(url)
            kills.append(Kill(before, wall, sim, time.monotonic(), bench.sim_now()))
        await bench.until(bench.interval_start(END_KILL) + timedelta(seconds=60))
        last = bench.interval_start(END_KILL - 1)
        await until(
            lambda: any(s.msg.interval_start == last for s in obs.of(SettlementRecord)),
            20, "the last complete interval's settlement on the broker",
        )  # fmt: skip

    try:
        asyncio.run(asyncio.wait_for(serving(work, [obs.run(), coordinate(bench, url)]), 120))
        bench.stop_all()
    finally:
        bench.kill_all()
    logs = bench.logs_tail()
    after = read_journal(bench.journal)
    by_interval, integral = meter_side(bench, obs)
    telemetry = _in_day(bench, obs.of(Telemetry))
    reported = {s.msg.ts for s in telemetry}
    on_broker = {s.msg.interval_start: s.msg for s in obs.of(SettlementRecord)}

    # The journal is intact, and nothing it had committed before a kill is lost.
    assert after.integrity == "ok"
    assert len(kills) == len(KILLS)
    for k in kills:
        assert k.before.integrity == "ok"
        assert k.before.settlements, "the agent had settled nothing before the kill"
        for key, row in k.before.settlements.items():
            assert after.settlements[key] == row, key
        for key, row in k.before.intervals.items():
            if key in k.before.settlements:
                assert after.intervals[key] == row, key
                continue
            # the interval under way: its committed accumulation is exactly its first readings, and
            # it only grew (readings handled between the read and the kill, or after the restart)
            t = bench.interval_of(datetime.fromisoformat(key))
            n = cast(int, row[3])
            assert row[2] == pytest.approx(kwh(by_interval[t][:n]), rel=REL, abs=1e-9), key
            assert cast(int, after.intervals[key][3]) >= n

    # Every complete interval of the run is settled, in the journal and on the broker, with the
    # readings the agent saw: all of them where it was alive, its own part of the interrupted ones.
    interrupted: set[int] = set()
    for t in range(END_KILL):
        start = bench.interval_start(t)
        rs = by_interval[t]
        assert len(rs) == PER_INTERVAL, (t, len(rs))
        assert start.isoformat() in after.settlements, (t, logs)
        assert start in on_broker, (t, logs)
        rec = on_broker[start]
        assert after.settlements[start.isoformat()][1] == rec.measured_kwh
        seen = [r for r in rs if r.ts in reported]
        # A reading handled and journaled just before a kill may have had no time to leave as
        # telemetry: those are the readings right after the last one reported before the kill.
        unreported = rec.readings - len(seen)
        assert 0 <= unreported <= 3, (t, rec.readings, len(seen))
        if unreported:
            k = next(k for k in kills if bench.interval_of(k.sim) == t)
            last = max(s.msg.ts for s in telemetry if s.wall < k.restart_wall)
            seen = sorted(
                [*seen, *[r for r in rs if r.ts > last and r.ts not in reported][:unreported]],
                key=lambda r: r.ts,
            )
        assert rec.readings == len(seen), t
        assert rec.covered_s == pytest.approx(len(seen) * RATE_S), t
        assert rec.measured_kwh == pytest.approx(kwh(seen), rel=REL, abs=1e-6), t
        if len(seen) == PER_INTERVAL:
            meter = integral.energy_kwh(SITE, t)
            assert meter is not None
            assert rec.measured_kwh == pytest.approx(meter, rel=REL, abs=1e-6), t
            assert rec.envelope == "dynamic", t
        else:
            interrupted.add(t)

    # The interrupted intervals are those of the kills and of the restarts' first readings, and in
    # each the readings of the dead time are missing.
    expected: set[int] = set()
    for k in kills:
        first = min((s for s in telemetry if s.wall > k.restart_wall), key=lambda s: s.wall).msg
        expected |= {bench.interval_of(k.sim), bench.reading_interval(first.ts)}
        dead = [r for t in by_interval for r in by_interval[t] if k.sim < r.ts < first.ts]
        assert dead, "the agent missed no reading"
        assert not {r.ts for r in dead} & reported
        # It resumes within one interval: its first reading after the restart ...
        assert first.ts - k.restart_sim < timedelta(seconds=DT_S), (first.ts, k.restart_sim)
        # ... on the dynamic envelope (its journal kept the one in force) ...
        assert first.envelope == "dynamic"
        # ... and the next interval is settled whole.
        assert on_broker[bench.interval_start(bench.reading_interval(first.ts) + 1)].readings == PER_INTERVAL
        # The broker published its last will (offline), then it said online on the dynamic envelope.
        statuses = [s.msg for s in obs.of(SiteStatus) if s.wall > k.wall]
        assert statuses[0].state == "offline", statuses
        back = next(s for s in statuses if s.state == "online")
        assert back.envelope == "dynamic", back
    assert interrupted == expected, (interrupted, expected)
    assert {s.msg.envelope for s in telemetry} == {"dynamic"}
    assert after.outbox == 0


def _in_day(bench: Bench, seen: list[Seen[Telemetry]]) -> list[Seen[Telemetry]]:
    """The day's telemetry: the meter also reads during its lead-in before the day, on the fixed
    default (the day's envelopes start with the day)."""
    return [s for s in seen if s.msg.ts > bench.start]


# -- 2. the DSO-side broker restarted -----------------------------------------------------------------

SPEED_OUTAGE = 120.0  # an interval in 7.5 s of wall time, a reading every 1/4 s
OUTAGE_AT = (2, 420)  # (interval, simulated seconds into it): across the start of interval 3
OUTAGE_S = 600.0  # simulated
END_OUTAGE = 5  # intervals 0..4 complete


@pytest.mark.timeout(150)
def test_a_restarted_broker_gets_the_telemetry_and_settlements_of_its_outage(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """The DSO-side broker down for ten simulated minutes, across an interval's end and the
    publication of the next envelope; the meter stays on the site's own broker. The agent keeps
    controlling its site, keeps its telemetry and the settlement of the interval that ended in the
    journal, and forwards them, in order, once the broker is back; the broker comes back empty
    (no persistence) and the agent's retained registration and status are there again because it
    publishes them again on reconnecting."""
    bench = Bench(tmp_path, SPEED_OUTAGE)
    dso = mosquitto_broker  # restarted; no persistence: it comes back without any retained message
    assert "persistence false" in (dso.workdir / "mosquitto.conf").read_text()
    local = start_mosquitto()  # the site's own broker: meter readings and set-points
    kinds = ("telemetry", "settlement", "status", "register")
    dso_obs = Observer(dso.url, [(topics.site(SITE, k), 1) for k in kinds])
    local_obs = Observer(local.url, [(topics.site(SITE, "meter"), 0), (topics.site(SITE, "setpoints"), 0)])
    marks: dict[str, float] = {}
    sims: dict[str, datetime] = {}
    retained: dict[str, bytes] = {}

    async def work() -> None:
        await dso_obs.connected()
        await local_obs.connected()
        bench.meter(local.url)
        bench.edge(dso.url, local.url)
        t, into_s = OUTAGE_AT
        await bench.until(bench.interval_start(t) + timedelta(seconds=into_s))
        await asyncio.to_thread(dso.stop)
        marks["stopped"], sims["stopped"] = time.monotonic(), bench.sim_now()
        await bench.until(sims["stopped"] + timedelta(seconds=OUTAGE_S))
        sims["starting"] = bench.sim_now()
        await asyncio.to_thread(dso.start)
        marks["started"], sims["started"] = time.monotonic(), bench.sim_now()
        await bench.until(bench.interval_start(END_OUTAGE) + timedelta(seconds=60))
        last = bench.interval_start(END_OUTAGE - 1)
        await until(
            lambda: any(s.msg.interval_start == last for s in dso_obs.of(SettlementRecord)),
            20, "the last complete interval's settlement on the broker",
        )  # fmt: skip
        await until(lambda: read_journal(bench.journal).outbox == 0, 20, "the journal's outbox empty")
        wanted = [topics.site(SITE, "status"), topics.site(SITE, "register")]
        retained.update(await read_retained(dso.url, wanted, wanted, timeout_s=5))

    try:
        background = [dso_obs.run(), local_obs.run(), coordinate(bench, dso.url)]
        asyncio.run(asyncio.wait_for(serving(work, background), 120))
        bench.stop_all()
    finally:
        bench.kill_all()
        local.close()
    logs = bench.logs_tail()
    after = read_journal(bench.journal)
    by_interval, integral = meter_side(bench, local_obs)
    readings = [r for t in sorted(by_interval) if t >= 0 for r in by_interval[t]]  # the day's
    telemetry = _in_day(bench, dso_obs.of(Telemetry))
    by_ts = {s.msg.ts: s for s in telemetry}
    setpoints = {s.msg.ts: s for s in local_obs.of(SetPointMessage)}
    on_broker = {s.msg.interval_start: s for s in dso_obs.of(SettlementRecord)}
    assert dso_obs.connections == 2, dso_obs.connected_at
    outage = [r for r in readings if sims["stopped"] < r.ts <= sims["starting"]]
    assert len(outage) >= OUTAGE_S / RATE_S - 2, len(outage)

    # The agent kept reading its meter and commanding its assets while the DSO's broker was down.
    for r in outage:
        assert r.ts in setpoints, (r.ts, logs)
        assert setpoints[r.ts].wall < marks["started"], r.ts

    # The telemetry of the outage was kept and arrives after the restart; nothing else is lost but
    # what was in flight (QoS 0) as the broker went down, and all of it arrives in order.
    for r in outage:
        assert r.ts in by_ts, (r.ts, logs)
        assert by_ts[r.ts].connection == 2, r.ts
        assert by_ts[r.ts].wall > marks["started"], r.ts
    lost = [r.ts for r in readings if r.ts not in by_ts and r.ts <= max(by_ts)]
    in_flight = (sims["stopped"] - timedelta(seconds=3 * RATE_S), sims["stopped"] + timedelta(seconds=RATE_S))
    assert all(in_flight[0] <= ts <= in_flight[1] for ts in lost), (lost, sims)
    arrival = [s.msg.ts for s in telemetry]
    assert arrival == sorted(arrival), "telemetry out of order"
    # After the reconnection the agent hears the republished envelopes again: the dynamic one
    # throughout, interval t's own in interval t.
    for m in (s.msg for s in telemetry):
        doe = bench.envelope(bench.reading_interval(m.ts))
        assert (m.envelope, m.lo_kw, m.up_kw) == ("dynamic", doe.lo_kw, doe.up_kw), m

    # Every complete interval is settled and on the broker, the one that ended in the outage after
    # the restart; each equals the meter's integral (the agent saw every reading).
    ended_in_outage = bench.interval_of(sims["stopped"])
    assert bench.interval_start(ended_in_outage + 1) < sims["starting"]
    for t in range(END_OUTAGE):
        start = bench.interval_start(t)
        assert start in on_broker, (t, logs)
        rec = on_broker[start].msg
        assert rec.readings == PER_INTERVAL, t
        meter = integral.energy_kwh(SITE, t)
        assert meter is not None
        assert rec.measured_kwh == pytest.approx(meter, rel=REL, abs=1e-6), t
        assert after.settlements[start.isoformat()][1] == rec.measured_kwh
    assert on_broker[bench.interval_start(ended_in_outage)].connection == 2
    assert on_broker[bench.interval_start(ended_in_outage)].wall > marks["started"]

    # Delivered, the outbox is empty; the journal is intact.
    assert after.outbox == 0
    assert after.integrity == "ok"

    # The broker came back empty; the agent published its retained state again: its registration
    # and its status (online, on the dynamic envelope).
    assert any(isinstance(s.msg, Registration) and s.connection == 2 for s in dso_obs.seen)
    status = SiteStatus.model_validate_json(retained[topics.site(SITE, "status")])
    assert (status.state, status.envelope) == ("online", "dynamic"), status
    assert Registration.model_validate_json(retained[topics.site(SITE, "register")]).site == SITE
