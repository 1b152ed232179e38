"""The edge agent's CSIP-AUS-style fail-safes, as deployed: one edge agent process (meter adapter and
journal) and one meter simulator process for one site, over a real broker, on an accelerated shared
clock. No coordinator process: the test plays it with a plain MQTT client, publishing what the
coordinator publishes (its retained status, the site's dynamic envelope on `doe` and its default on
`doe/default`, retained with the broker's expiry at their end), and judges only what travels over
the broker: the site's status, telemetry, meter readings and set-points.

1. Communications lost (a TCP proxy between the edge and the broker, severed and restored): the
   cached dynamic envelope until it expires, then the default; telemetry kept and forwarded.
2. A restart while the coordinator is away: the journal's saved default applies at once.
3. A clock skewed beyond tolerance: the fallback with alarm clock_skew, not the dynamic envelope.
4. An exceedance of a new, narrower envelope is back inside within 15 s of simulated time.

At midday the site (the scenario's first, a large PV plant with a battery) exports about 1.2 MW
uncurtailed: the dynamic envelopes here allow that, the default ([0, 400] kW) does not, so which one
is in force shows in the meter readings. Every process is killed at the end; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlsplit

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from service_helpers import read_retained, service_env

from p2pdoe.core import topics
from p2pdoe.core.realtime.observer import tolerance_kw
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    Runtime,
    SetPointMessage,
    SiteStatus,
    Telemetry,
    decode_runtime,
)
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import Broker

T = TypeVar("T")
M = TypeVar("M", bound=Runtime)

SPEED = 60.0  # simulated seconds per wall second
LEAD_S = 6.0  # wall seconds for the processes to start before the clock's origin
MIDDAY = timedelta(hours=11, minutes=30)  # the simulated time of day at the clock's origin
WAIT_S = 40.0  # the longest any single wait may take (wall)
DEFAULT = (0.0, 400.0)  # the site's default envelope, kW (export positive)
WIDE = (-500.0, 1500.0)  # a dynamic envelope the site's uncurtailed midday export fits in


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# -- the shared simulated clock, as the test sees it ---------------------------------------------


@dataclass(frozen=True)
class Clock:
    start: datetime  # the day's first interval
    origin: datetime  # the simulated time at `wall`
    wall: datetime
    speed: float

    @classmethod
    def midday(cls, speed: float = SPEED) -> Clock:
        now = datetime.now(UTC)
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(start, start + MIDDAY, now + timedelta(seconds=LEAD_S), speed)

    def now(self) -> datetime:
        return self.origin + (datetime.now(UTC) - self.wall) * self.speed

    async def sleep_until(self, moment: datetime) -> None:
        await asyncio.sleep(max(0.0, (moment - self.now()).total_seconds() / self.speed))

    def args(self) -> list[str]:
        return ["--start", _iso(self.start), "--sim-origin", _iso(self.origin), "--wall-origin",
                _iso(self.wall), "--speed", f"{self.speed:g}"]  # fmt: skip


# -- the two processes of one site ---------------------------------------------------------------


class Site:
    """The first site of the default scenario: its edge agent and meter simulator as processes.
    Leaving kills every process it started and, on a failure, prints their logs."""

    def __init__(self, tmp: Path, url: str, clock: Clock, rate_s: float):
        scenario = load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})
        write_site_configs(scenario, tmp / "config")
        self.id = scenario.ids[0]
        self.config = tmp / "config" / "sites" / f"{self.id}.json"
        self.journal = tmp / "journal" / f"{self.id}.db"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.url, self.clock, self.rate_s = url, clock, rate_s
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _start(self, name: str, module: str, *argv: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{len(self.procs):02d}-{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *argv, *self.clock.args()],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=service_env(),
            )  # fmt: skip
        self.procs.append((log.name, proc))
        return proc

    def edge(self, *extra: str, broker: str | None = None) -> subprocess.Popen[bytes]:
        """`python -m edge_agent` with its meter (always on the real broker) and its journal."""
        return self._start(
            "edge", "edge_agent", "--site-config", str(self.config), "--broker", broker or self.url,
            "--meter", "--meter-broker", self.url, "--meter-step-s", f"{self.rate_s:g}",
            "--journal", str(self.journal), *extra,
        )  # fmt: skip

    def meter(self) -> subprocess.Popen[bytes]:
        return self._start(
            "meter", "meter_sim", "--site-config", str(self.config), "--broker", self.url,
            "--rate-s", f"{self.rate_s:g}",
        )  # fmt: skip

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        name = next(n for n, p in self.procs if p is proc)
        return (self.logs / name).read_text(encoding="utf-8", errors="replace")

    def assert_healthy(self, proc: subprocess.Popen[bytes]) -> None:
        """Still running, and nothing went wrong in its log (no round is opened: idle, not failing)."""
        out = self.output(proc)
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{out[-4000:]}"
        assert "Traceback" not in out, out[-4000:]
        assert " ERROR " not in out, out[-4000:]

    def __enter__(self) -> Site:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if exc_type is not None:
            for name, _ in self.procs:
                print(f"----- {name} -----\n{(self.logs / name).read_text(errors='replace')[-6000:]}")


# -- the test's MQTT client: the coordinator's part, and what the site publishes ------------------


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() on arrival
    msg: Runtime


@dataclass
class Bench:
    """One plain MQTT v5 client: publishes what the coordinator would, and keeps every message the
    site publishes (status, telemetry, meter readings, set-points) as it arrives."""

    url: str
    clock: Clock
    site: str
    seen: dict[str, list[Seen]] = field(default_factory=lambda: {"status": [], "telemetry": [], "meter": [],
                                                                 "setpoints": []})  # fmt: skip
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bench:
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._client = aiomqtt.Client(
            parts.hostname, parts.port, identifier=f"test-dso-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5, timeout=10,
        )  # fmt: skip
        await self._client.__aenter__()
        for kind in self.seen:
            await self._client.subscribe(topics.site(self.site, kind), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    @property
    def client(self) -> aiomqtt.Client:
        assert self._client is not None
        return self._client

    async def _read(self) -> None:
        async for m in self.client.messages:
            parsed = topics.parse(m.topic.value)
            if (
                parsed is None
                or parsed.kind not in self.seen
                or not isinstance(m.payload, bytes)
                or not m.payload
            ):
                continue
            self.seen[parsed.kind].append(Seen(time.monotonic(), decode_runtime(m.payload)))

    def timed(self, kind: str, cls: type[M], since: float = 0.0) -> list[tuple[float, M]]:
        """(arrival, message) of `kind` that arrived at or after `since` (time.monotonic())."""
        return [(s.at, s.msg) for s in self.seen[kind] if s.at >= since and isinstance(s.msg, cls)]

    def readings(self, since: float = 0.0) -> list[MeterReading]:
        return [m for _, m in self.timed("meter", MeterReading, since)]

    def statuses(self, since: float = 0.0) -> list[SiteStatus]:
        return [m for _, m in self.timed("status", SiteStatus, since)]

    def telemetry(self, since: float = 0.0) -> list[Telemetry]:
        return [m for _, m in self.timed("telemetry", Telemetry, since)]

    async def until(self, check: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
        """Poll `check` until it gives something true (not None, False or empty); fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"not within {timeout_s:g} s: {what}")

    # the coordinator's part (dso_coordinator.service: dso_status, _publish_doe, default_envelope)

    async def dso_status(self, state: str = "online") -> None:
        msg = DsoStatus(state=state, round=None, ts=self.clock.now())  # type: ignore[arg-type]
        await self.client.publish(topics.DSO_STATUS, msg.model_dump_json().encode(), qos=1, retain=True)

    async def envelope(self, kind: str, box: tuple[float, float], start: datetime, end: datetime) -> Doe:
        """Retained on the site's `doe` (a round's) or `doe/default` (round None), with the broker's
        expiry at its end in wall seconds, as the coordinator publishes it."""
        round_id = None if kind == "doe/default" else f"test-{start:%H%M%S}"
        doe = Doe.from_box(self.site, round_id, start, round((end - start).total_seconds()), *box)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        left = (end - self.clock.now()).total_seconds() / self.clock.speed
        properties.MessageExpiryInterval = max(1, int(left) + 1)
        payload = doe.model_dump_json().encode()
        await self.client.publish(
            topics.site(self.site, kind), payload, qos=1, retain=True, properties=properties
        )
        return doe

    async def withdraw(self, topic: str) -> None:
        """Clear a retained message (what the broker keeps for a coordinator that is gone)."""
        await self.client.publish(topic, b"", qos=1, retain=True)

    async def day_default(self) -> Doe:
        """The default for the whole day, as the coordinator publishes it at its start."""
        start = self.clock.start
        return await self.envelope("doe/default", DEFAULT, start, start + timedelta(days=1))


# -- a link that can be cut -----------------------------------------------------------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 to the broker: `sever` closes every connection and stops listening
    (new ones are refused), `start` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(writer)
            writer.transport.abort()

    async def sever(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def close(self) -> None:
        await self.sever()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


def outbox_size(journal: Path) -> int:
    """Messages waiting in the edge's journal for the broker (read beside the running agent: WAL)."""
    db = sqlite3.connect(journal, timeout=5)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def at_least(n: int, items: list[T]) -> list[T] | None:
    return items if len(items) >= n else None


def outside(r: MeterReading, box: tuple[float, float]) -> bool:
    """Beyond a bound by more than the broker-only observer's tolerance (p2pdoe.core.realtime.observer)."""
    return r.p_kw > box[1] + tolerance_kw(box[1]) or r.p_kw < box[0] - tolerance_kw(box[0])


def exporting_beyond(readings: list[MeterReading], box: tuple[float, float]) -> bool:
    return bool(readings) and all(r.p_kw > box[1] + tolerance_kw(box[1]) for r in readings)


# -- the cases ------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_communications_lost_the_cached_envelope_until_its_end_then_the_default(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """CSIP-AUS: a control is honoured until its end with communications lost; then the default. The
    edge's link to the DSO's broker is cut for 7 simulated minutes (its meter, local, keeps working);
    its cached dynamic envelope ends 3 minutes into the outage."""
    rate_s = 10.0
    clock = Clock.midday()
    sever_at = clock.origin + timedelta(minutes=5)
    expires = sever_at + timedelta(minutes=3)
    restore_at = sever_at + timedelta(minutes=7)
    broker_port = urlsplit(mqtt_broker.url).port
    assert broker_port is not None

    async def scenario(site: Site) -> None:
        proxy = Proxy(broker_port)
        await proxy.start()
        try:
            async with Bench(mqtt_broker.url, clock, site.id) as bench:
                await bench.dso_status("online")
                await bench.day_default()
                await bench.envelope("doe", WIDE, clock.start + timedelta(hours=11), expires)
                edge = site.edge(broker=f"mqtt://127.0.0.1:{proxy.port}")
                site.meter()
                await outage(site, edge, proxy, bench)
        finally:
            await proxy.close()

    async def outage(site: Site, edge: subprocess.Popen[bytes], proxy: Proxy, bench: Bench) -> None:
        await bench.until(lambda: any(s.envelope == "dynamic" for s in bench.statuses()), "status dynamic")
        await clock.sleep_until(sever_at)
        before = [r for r in bench.readings() if r.ts > sever_at - timedelta(minutes=2)]
        assert len(before) >= 6, f"too few readings before the outage: {len(before)}"
        assert exporting_beyond(before, DEFAULT), [r.p_kw for r in before]  # the wide envelope's freedom
        await proxy.sever()
        await clock.sleep_until(restore_at)
        restored = time.monotonic()
        await proxy.start()
        await bench.dso_status("online")
        await bench.envelope("doe", WIDE, clock.now(), clock.now() + timedelta(minutes=30))

        # The telemetry of the outage arrives after it (kept in the journal, forwarded in order on
        # reconnect), each reading judged against the cached dynamic envelope until its end, then
        # against the default.
        last = restore_at - timedelta(seconds=rate_s)
        await bench.until(lambda: any(last <= t.ts for t in bench.telemetry(restored)), "forwarded telemetry")
        late = [t for t in bench.telemetry(restored) if sever_at < t.ts <= restore_at]
        expected = (restore_at - sever_at).total_seconds() / rate_s
        assert len(late) >= expected - 3, f"{len(late)} of {expected:g} outage readings forwarded"
        assert [t.ts for t in late] == sorted({t.ts for t in late})
        cut = sever_at + timedelta(seconds=2 * rate_s)  # readings the cut may have caught in flight before
        assert not [t for at, t in bench.timed("telemetry", Telemetry) if at < restored and t.ts > cut]
        for t in late:
            on_cache = t.ts - timedelta(milliseconds=1) < expires
            want = ("dynamic", *WIDE) if on_cache else ("default", *DEFAULT)
            assert (t.envelope, t.lo_kw, t.up_kw) == want, t

        # The meter readings (the site's own broker, all along) show it was done, not just said: no
        # curtailment while the cached envelope lasted, the default from the reading after its end.
        readings = bench.readings()
        cached = [r for r in readings if sever_at < r.ts <= expires]
        fallback = [r for r in readings if expires + timedelta(seconds=2 * rate_s) <= r.ts <= restore_at]
        assert len(cached) >= (expires - sever_at).total_seconds() / rate_s - 2
        assert exporting_beyond(cached, DEFAULT), [r.p_kw for r in cached]
        assert len(fallback) >= (restore_at - expires).total_seconds() / rate_s - 4
        assert not [r for r in fallback if outside(r, DEFAULT)], [(r.ts, r.p_kw) for r in fallback]
        # ... because the control loop kept running: set-points at meter rate all through the outage.
        live = [sp.ts for at, sp in bench.timed("setpoints", SetPointMessage) if at < restored]
        assert len([ts for ts in live if expires < ts]) >= len(fallback) - 1, "the control loop stalled"

        # Back (once the edge has reconnected, after its backoff): the fresh dynamic envelope applies
        # again, in its status, its telemetry and its meter.
        await bench.until(
            lambda: bench.statuses(restored) and bench.statuses()[-1].envelope == "dynamic", "status dynamic"
        )
        switches = [s.envelope for s in bench.statuses(restored)]
        assert "default" in switches, switches  # the switch during the outage, published on return
        settled_in = clock.now() + timedelta(seconds=2 * rate_s)
        back = await bench.until(
            lambda: at_least(4, [t for t in bench.telemetry(restored) if t.ts > settled_in]),
            "telemetry after the return",
        )
        assert all((t.envelope, t.lo_kw, t.up_kw) == ("dynamic", *WIDE) for t in back), back
        again = [r for r in bench.readings() if r.ts > settled_in]
        assert exporting_beyond(again, DEFAULT), [r.p_kw for r in again]
        await bench.until(lambda: outbox_size(site.journal) == 0, "the journal's outbox drained")
        site.assert_healthy(edge)

    with Site(tmp_path, mqtt_broker.url, clock, rate_s) as site:
        asyncio.run(scenario(site))


@pytest.mark.timeout(150)
def test_an_edge_restarted_while_the_coordinator_is_away_applies_its_saved_default_at_once(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """The edge hears a default and a dynamic envelope (which then expires), is killed, the coordinator
    goes away with its retained envelopes; restarted on the same journal, the edge applies the saved
    default within 5 s: never its fixed default, never the wide box, and its set-points follow it."""
    rate_s = 10.0
    clock = Clock.midday()
    expires = clock.origin + timedelta(minutes=2)

    async def scenario(site: Site) -> None:
        async with Bench(mqtt_broker.url, clock, site.id) as bench:
            await bench.dso_status("online")
            await bench.day_default()
            await bench.envelope("doe", WIDE, clock.start + timedelta(hours=11), expires)
            edge = site.edge()
            site.meter()
            await restart(site, edge, bench)

    async def restart(site: Site, edge: subprocess.Popen[bytes], bench: Bench) -> None:
        await bench.until(lambda: any(s.envelope == "dynamic" for s in bench.statuses()), "status dynamic")
        await bench.until(lambda: bench.statuses()[-1].envelope == "default", "status default")
        heard = time.monotonic()
        await bench.until(lambda: len(bench.readings(heard)) >= 3, "readings on the default")
        site.assert_healthy(edge)
        edge.kill()
        edge.wait(timeout=30)
        await bench.until(lambda: bench.statuses()[-1].state == "offline", "the edge's last will")

        # The coordinator is away, and so are its retained envelopes; the assets, without their
        # controller, go back to their own defaults (no curtailment).
        await bench.dso_status("offline")
        for kind in ("doe", "doe/default"):
            await bench.withdraw(topics.site(site.id, kind))
        retained = await read_retained(mqtt_broker.url, [topics.site(site.id, "doe") + "/#"], timeout_s=1.0)
        assert retained == {}, retained
        idle = SetPointMessage(site=site.id, ts=clock.now(), battery_kw=0.0, pv_cap_kw=None, wind_cap_kw=None,
                               flex_kw=0.0)  # fmt: skip
        await bench.client.publish(topics.site(site.id, "setpoints"), idle.model_dump_json().encode())
        loose = time.monotonic()
        await bench.until(lambda: exporting_beyond(bench.readings(loose)[1:3], DEFAULT), "uncurtailed export")

        started = time.monotonic()
        edge = site.edge()
        first = await bench.until(
            lambda: next(
                ((at, s) for at, s in bench.timed("status", SiteStatus, started) if s.state == "online"), None
            ),
            "the restarted edge's status",
        )
        assert first[0] - started <= 5.0, f"status after {first[0] - started:.1f} s"
        assert (first[1].envelope, first[1].alarm) == ("default", None), first[1]

        print(f"the restarted edge's first status after {first[0] - started:.1f} s (wall)")

        # Its telemetry and its meter: the saved default's box, enforced.
        telemetry = await bench.until(lambda: bench.telemetry(started), "telemetry")
        resumed = telemetry[0].ts + timedelta(seconds=2 * rate_s)
        await bench.until(lambda: len([r for r in bench.readings() if r.ts > resumed]) >= 6, "readings")
        telemetry = bench.telemetry(started)
        assert all((t.envelope, t.lo_kw, t.up_kw) == ("default", *DEFAULT) for t in telemetry), telemetry
        obeyed = [r for r in bench.readings() if r.ts > resumed]
        assert not [r for r in obeyed if outside(r, DEFAULT)], [r.p_kw for r in obeyed]
        commands = [sp for _, sp in bench.timed("setpoints", SetPointMessage, started)]
        assert commands, "no set-points from the restarted edge"
        assert all(c.pv_cap_kw is not None for c in commands[1:]), commands  # curtailing to the default
        assert {s.envelope for s in bench.statuses(started)} == {"default"}, bench.statuses(started)
        site.assert_healthy(edge)

    with Site(tmp_path, mqtt_broker.url, clock, rate_s) as site:
        asyncio.run(scenario(site))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("offset_wall_s", [0.0, 90.0], ids=["in-time", "skewed-90s"])
def test_a_clock_skewed_beyond_tolerance_never_applies_the_dynamic_envelope(
    mqtt_broker: Broker, tmp_path: Path, offset_wall_s: float
) -> None:
    """The skew is measured in wall seconds from the coordinator's live, time-stamped status: an edge
    whose clock is 90 wall seconds off (90 x speed simulated seconds) with a 30 s tolerance applies the
    fallback with alarm clock_skew although a valid dynamic envelope is published; in time, the
    dynamic envelope."""
    rate_s = 10.0
    clock = Clock.midday()
    tolerance_s = 30.0
    skewed = offset_wall_s > tolerance_s

    async def scenario(site: Site) -> None:
        async with Bench(mqtt_broker.url, clock, site.id) as bench:
            await bench.dso_status("online")
            await bench.day_default()
            await bench.envelope(
                "doe", WIDE, clock.now() - timedelta(minutes=30), clock.now() + timedelta(hours=3)
            )
            edge = site.edge(
                "--skew-tolerance-s",
                f"{tolerance_s:g}",
                "--clock-offset-s",
                f"{offset_wall_s * clock.speed:g}",
            )
            site.meter()
            await bench.until(lambda: bench.telemetry(), "the edge's first telemetry")
            live = time.monotonic()
            heartbeat = asyncio.create_task(beat(bench))
            try:
                await check(site, edge, bench, live)
            finally:
                heartbeat.cancel()

    async def beat(bench: Bench) -> None:
        """The coordinator's status, live and time-stamped, as it publishes it at every round."""
        while True:
            await bench.dso_status("online")
            await asyncio.sleep(0.5)

    async def check(site: Site, edge: subprocess.Popen[bytes], bench: Bench, live: float) -> None:
        if skewed:
            alarm = await bench.until(
                lambda: next(
                    ((at, s) for at, s in bench.timed("status", SiteStatus, live) if s.alarm == "clock_skew"),
                    None,
                ),
                "status with alarm clock_skew",
            )
            since, status = alarm
            assert status.envelope in ("default", "fixed_default"), status
            skew = re.search(r"clock skew \+(\d+) s", status.reason or "")
            assert skew is not None, status.reason
            assert abs(int(skew.group(1)) - offset_wall_s) <= 3, status.reason  # in wall seconds
        else:
            since = live + 3.0
            await asyncio.sleep(3.0)
        telemetry = await bench.until(lambda: at_least(9, bench.telemetry(since)), "telemetry")
        settled = telemetry[2:]  # readings handled before the status went out may follow it
        readings = [r for r in bench.readings() if r.ts > settled[0].ts + timedelta(seconds=rate_s)]
        if skewed:
            assert all((t.envelope, t.lo_kw, t.up_kw) == ("default", *DEFAULT) for t in settled), settled
            assert all(s.alarm == "clock_skew" and s.envelope != "dynamic" for s in bench.statuses(since))
            assert readings
            assert not [r for r in readings if outside(r, DEFAULT)], [r.p_kw for r in readings]
        else:
            assert all((t.envelope, t.lo_kw, t.up_kw) == ("dynamic", *WIDE) for t in telemetry), telemetry
            assert all(s.alarm is None for s in bench.statuses()), bench.statuses()
            assert bench.statuses()[-1].envelope == "dynamic"
            assert exporting_beyond(readings, DEFAULT), [r.p_kw for r in readings]
        site.assert_healthy(edge)

    with Site(tmp_path, mqtt_broker.url, clock, rate_s) as site:
        asyncio.run(scenario(site))


@pytest.mark.timeout(120)
def test_an_exceedance_is_back_inside_within_15_simulated_seconds(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """At midday, following a wide dynamic envelope, the site exports ~1.2 MW; a new dynamic envelope
    with up = 600 kW takes effect at once: the first reading judged against it is outside, and the
    readings are back inside within 15 s of simulated time (battery, flexible load and PV
    curtailment), and stay inside. A slower clock (30x) leaves the loop reading -> set-points ->
    plant a sixth of a wall second per 5 s reading."""
    rate_s = 5.0
    clock = Clock.midday(speed=30.0)
    narrow = (-500.0, 600.0)

    async def scenario(site: Site) -> None:
        async with Bench(mqtt_broker.url, clock, site.id) as bench:
            await bench.dso_status("online")
            await bench.day_default()
            await bench.envelope(
                "doe", WIDE, clock.start + timedelta(hours=11), clock.origin + timedelta(hours=2)
            )
            edge = site.edge()
            site.meter()
            await check(site, edge, bench)

    async def check(site: Site, edge: subprocess.Popen[bytes], bench: Bench) -> None:
        await bench.until(lambda: any(s.envelope == "dynamic" for s in bench.statuses()), "status dynamic")
        # In force at once, between two readings (they come every 5 s from the day's start): the
        # set-points of the step under way were chosen for the wide envelope.
        start = clock.origin + timedelta(minutes=1, seconds=2)
        await clock.sleep_until(start)
        steady = bench.readings()[-6:]
        assert exporting_beyond(steady, narrow), [r.p_kw for r in steady]
        doe = await bench.envelope("doe", narrow, start, start + timedelta(minutes=30))
        watch_until = doe.start + timedelta(minutes=1)
        await bench.until(lambda: bench.readings()[-1].ts > watch_until, "a minute of readings")
        judged = [r for r in bench.readings() if doe.start <= r.ts - timedelta(milliseconds=1)]
        first = judged[0]
        assert outside(first, narrow), f"no exceedance to correct: {first}"
        inside = next((r for r in judged if not outside(r, narrow)), None)
        assert inside is not None, [(r.ts, r.p_kw) for r in judged]
        back_s = (inside.ts - first.ts).total_seconds()
        assert back_s <= 15.0, [(r.ts, r.p_kw) for r in judged[:6]]
        after = [r for r in judged if r.ts >= inside.ts]
        assert not [r for r in after if outside(r, narrow)], [(r.ts, r.p_kw) for r in after]
        # The edge's own account: the same exceedance, and the levers it moved.
        telemetry = [t for t in bench.telemetry() if t.ts >= first.ts and t.up_kw == narrow[1]]
        assert telemetry
        assert telemetry[0].excess_kw is not None
        assert telemetry[0].excess_kw > 0
        assert "pv" in {a for t in telemetry[:4] for a in t.actions}
        print(f"back inside {back_s:g} s after the first reading judged against the new envelope")
        site.assert_healthy(edge)

    with Site(tmp_path, mqtt_broker.url, clock, rate_s) as site:
        asyncio.run(scenario(site))
