"""The real-time day as a deployment runs it, on the lockstep clock: a coordinator, an edge agent and
a meter simulator per site, each a process over one broker, and the granter
(`python -m p2pdoe.services.lockstep`) that moves simulated time on one step (a meter reading) once
every process has finished the one before. The day's simulated outcome then does not depend on the
machine's speed: a slow or loaded machine takes longer, it does not see another day. A member silent
`silence_timeout_s` (wall) is left out until it speaks again (a killed process). Every process is
killed when `Processes` closes; the logs stay in `logs/` for the failure message.

Also the journal's rows (`read_journal`) and a readings' energy (`kwh`), for these tests and the
virtual day's (tests/test_virtual_day.py)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiomqtt
import pytest
from service_helpers import service_env

from p2pdoe.core import topics
from p2pdoe.core.realtime.clock import day_start
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.lockstep import ClockDone, ClockGrant, ClockMember, ClockStatus, decode_lockstep
from p2pdoe.core.schemas.runtime import MeterReading, Runtime, decode_runtime
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import REQUIRE_MOSQUITTO_ENV, Broker, BrokerUnavailableError, start_mosquitto

R = TypeVar("R", bound=Runtime)


def quarter_hour_day() -> Scenario:
    return load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})


@dataclass(frozen=True)
class JournalRows:
    """An edge agent's journal as read from its SQLite file (by another connection, as a tool would)."""

    settlements: dict[str, tuple[object, ...]]  # by interval start (ISO)
    intervals: dict[str, tuple[object, ...]]  # (start, end, energy_kwh, readings, covered_s, ...)
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


def kwh(readings: Iterable[MeterReading], rate_s: float) -> float:
    """Each reading's p over its own step (the simulator's readings are evenly spaced)."""
    return sum(r.p_kw for r in readings) * rate_s / 3600.0


def subscribe_logging_mosquitto() -> Iterator[Broker]:
    """Mosquitto logging every subscription (`log_type subscribe`, in `Broker.log`), so a test can
    tell when a process has subscribed; skipped if not installed, failed instead with
    P2PDOE_REQUIRE_MOSQUITTO=1 (as the `mosquitto_broker` fixture)."""
    try:
        broker = start_mosquitto(extra_config="log_type subscribe")
    except BrokerUnavailableError as exc:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with broker:
        yield broker


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Processes:
    """The real-time day's processes for scenario `s` (today's date, the scenario's time of day), its
    `hours` on the lockstep clock, with readings every `rate_s`."""

    s: Scenario
    root: Path
    url: str
    rate_s: float
    hours: float
    silence_timeout_s: float = 60.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        write_site_configs(self.s, self.root / "config")
        (self.root / "logs").mkdir(exist_ok=True)
        self.start = day_start("today", self.s.start.isoformat(), self.s.dt_h, datetime.now(UTC))
        self.interval_s = round(self.s.dt_h * 3600)
        self.clock = ["--clock", "lockstep", "--start", iso(self.start)]

    def interval_start(self, t: int) -> datetime:
        return self.start + timedelta(seconds=self.interval_s * t)

    def granter(self, sites: Iterable[str], *others: str) -> subprocess.Popen[bytes]:
        """Steps from the meters' lead-in (one interval before the day) to two steps past its end
        (the last settlements); members: the coordinator, each site's edge agent and meter, and
        `others` ("name:phase")."""
        first = self.start - timedelta(seconds=self.interval_s)
        end = self.start + timedelta(hours=self.hours, seconds=2 * self.rate_s)
        ids = list(sites)
        members = ["dso:grid", *(f"edge-{i}:control" for i in ids), *(f"meter-{i}:plant" for i in ids)]
        members += others
        return self.start_proc(
            "clock", "p2pdoe.services.lockstep", "--broker", self.url, "--start", iso(first),
            "--end", iso(end), "--step-s", f"{self.rate_s:g}", "--members", ",".join(members),
            "--silence-timeout-s", f"{self.silence_timeout_s:g}",
        )  # fmt: skip

    def start_proc(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        n = sum(1 for k in self.procs if k == name or k.startswith(f"{name}#"))
        key = name if n == 0 else f"{name}#{n}"
        with (self.root / "logs" / f"{key}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=service_env(),
            )  # fmt: skip
        self.procs[key] = proc
        return proc

    def latest(self, name: str) -> subprocess.Popen[bytes]:
        """The process last started under `name`."""
        return [p for key, p in self.procs.items() if key == name or key.startswith(f"{name}#")][-1]

    def coordinator(self, *extra: str, name: str = "dso") -> subprocess.Popen[bytes]:
        """Wall-clock patience generous enough for a loaded machine: on the lockstep clock time waits
        for a round, so these only bound a failure."""
        return self.start_proc(
            name, "dso_coordinator", "--coordinator-config", str(self.root / "config" / "coordinator.json"),
            "--broker", self.url, "--rolling", "--exit-after-day", "--meter-step-s", f"{self.rate_s:g}",
            "--hours", f"{self.hours:g}", "--registration-timeout-s", "300", "--iteration-timeout-s", "60",
            "--report-timeout-s", "60", *self.clock, *extra,
        )  # fmt: skip

    def site_config(self, site: str) -> str:
        return str(self.root / "config" / "sites" / f"{site}.json")

    def journal(self, site: str) -> Path:
        return self.root / "journal" / f"{site}.db"

    def edge(self, site: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.start_proc(
            f"edge-{site}", "edge_agent", "--site-config", self.site_config(site), "--broker", self.url,
            "--meter", "--meter-step-s", f"{self.rate_s:g}", "--journal", str(self.journal(site)),
            *self.clock, *extra,
        )  # fmt: skip

    def meter(self, site: str) -> subprocess.Popen[bytes]:
        return self.start_proc(
            f"meter-{site}", "meter_sim", "--site-config", self.site_config(site), "--broker", self.url,
            "--rate-s", f"{self.rate_s:g}", *self.clock,
        )  # fmt: skip

    def sites(self, ids: Iterable[str]) -> None:
        for site in ids:
            self.edge(site)
            self.meter(site)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def logs(self, tail: int = 1500) -> str:
        return "\n".join(f"--- {key}\n{self.log(key, tail)}" for key in self.procs)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- the test as a member of the lockstep day ------------------------------------------------------------

HARNESS = "harness"
Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Seen:
    at: datetime  # simulated: the latest grant's time when it arrived
    topic: str
    msg: Runtime
    retained: bool


class Harness:
    """The test as a member of the lockstep day (`HARNESS`, in the grid phase: after the meters and
    the edges of a step): granted at the moments of its faults, it carries each out (killing or
    starting a process, and waiting for what that needs) before it reports the step done, so a fault
    lands at an exact simulated moment however slow the machine; meanwhile it sends heartbeats. It
    records what the broker carries on `filters` (`seen`), time-stamped in simulated time."""

    def __init__(self, url: str, filters: Iterable[tuple[str, int]]):
        self.url = url
        self.filters = list(filters)
        self.faults: list[tuple[datetime, Action]] = []
        self.now: datetime | None = None
        self.seen: list[Seen] = []
        self.ended = False
        self._done_step: int | None = None

    def at(self, moment: datetime, action: Action) -> None:
        self.faults.append((moment, action))
        self.faults.sort(key=lambda f: f[0])

    def of(self, kind: type[R]) -> list[Seen]:
        return [s for s in self.seen if isinstance(s.msg, kind)]

    async def until(self, condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:g} s")
            await asyncio.sleep(0.02)

    async def run(self, timeout_s: float) -> None:
        """Until the granter says the day has ended (at most `timeout_s` wall seconds)."""
        host, port = self.url.removeprefix("mqtt://").split(":")
        async with asyncio.timeout(timeout_s), aiomqtt.Client(host, int(port), identifier=HARNESS) as client:
            for f, qos in [(topics.CLOCK_GRANT, 1), (topics.CLOCK_STATUS, 1), *self.filters]:
                await client.subscribe(f, qos=qos)
            joined = ClockMember(member=HARNESS, phase="grid", state="joined").model_dump_json()
            await client.publish(topics.clock_member(HARNESS), joined, qos=1, retain=True)
            work: asyncio.Task[None] | None = None  # the faults of a step
            inbox = aiter(client.messages)
            message: asyncio.Future[aiomqtt.Message] | None = None
            try:
                while not self.ended:
                    message = message or asyncio.ensure_future(anext(inbox))
                    waits: set[asyncio.Future[Any]] = {message}
                    if work is not None and not work.done():
                        waits.add(work)
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if work is not None and work.done():
                        work.result()  # a fault that failed fails the test at once
                    if message.done():
                        work = self._take(client, message.result(), work)
                        message = None
            finally:
                for task in (work, message):
                    if task is not None:
                        task.cancel()

    def _take(
        self, client: aiomqtt.Client, m: aiomqtt.Message, work: asyncio.Task[None] | None
    ) -> asyncio.Task[None] | None:
        payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b""
        parsed = topics.parse(m.topic.value)
        if not payload:
            return work
        if parsed is None or parsed.area != "clock":
            at = self.now or datetime.min.replace(tzinfo=UTC)  # a retained message, before the day
            self.seen.append(Seen(at, m.topic.value, decode_runtime(payload), m.retain))
            return work
        message = decode_lockstep(payload)
        if isinstance(message, ClockStatus) and message.state == "ended" and self.now is not None:
            self.ended = True
        elif isinstance(message, ClockGrant):
            self.now = message.time
            if self._granted(message) and (work is None or work.done()):
                return asyncio.create_task(self._step(client, message))
        return work

    def _granted(self, grant: ClockGrant) -> bool:
        return grant.phase == "grid" and HARNESS in grant.members and grant.step != self._done_step

    async def _step(self, client: aiomqtt.Client, grant: ClockGrant) -> None:
        due = [f for f in self.faults if f[0] <= grant.time]
        self.faults = [f for f in self.faults if f[0] > grant.time]
        for _, action in due:
            task = asyncio.ensure_future(action())
            while not task.done():
                await self._done(client, grant, holding=True)  # a heartbeat
                await asyncio.wait({task}, timeout=2.0)
            task.result()
        self._done_step = grant.step
        await self._done(client, grant, holding=False)

    async def _done(self, client: aiomqtt.Client, grant: ClockGrant, holding: bool) -> None:
        later = self.faults[0][0] if self.faults else grant.time + timedelta(days=2)
        done = ClockDone(member=HARNESS, step=grant.step, phase="grid", next=later, holding=holding)
        await client.publish(topics.clock_done(HARNESS), done.model_dump_json(), qos=1)


def opening_heard(
    s: Scenario, name: str, start: datetime, intervals: int, ranges: dict[str, str] | None = None
) -> Any:
    """A round's opening over `intervals` of scenario `s` from `start`, as an edge agent hears it;
    `ranges`: the digests of the ranges it names per site."""
    from p2pdoe.core.effects import Heard
    from p2pdoe.core.schemas.messages import AdmmParameters, RoundOpen, encode

    a = s.admm
    msg = RoundOpen(
        round=name, policy="dynamic", start=start.isoformat().replace("+00:00", "Z"), dt_h=s.dt_h,
        intervals=intervals, sites=s.ids,
        admm=AdmmParameters(
            rho_trade_eur_per_kw2h=a.rho_trade, rho_envelope_eur_per_kw2h=a.rho_envelope,
            over_relaxation=a.over_relaxation, max_iterations=a.max_iterations,
        ),
        initial_trade_price_eur_per_kwh=[0.1] * intervals, ranges=ranges or {},
    )  # fmt: skip
    return Heard(topics.round_open(name), encode(msg), False)
