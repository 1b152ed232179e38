"""A whole day of every service in one process, on a virtual clock: the coordinator, one edge agent
and one simulated meter per site, each the same service as in a deployment (its machine and shell),
talking through an in-memory broker (p2pdoe.services.transport_memory; each service's session as
its settings say: the coordinator's persistent, the edges' clean) on a `VirtualTimeLoop`
(p2pdoe.services.clock): no broker process, no threads, no sleeps. Time jumps to the next timer
whenever every service waits, so a 24 h day takes seconds, and the outcome is the same every run.

Faults are scheduled at moments of the day (`VirtualDay.at`): kill a process (its connection drops,
its last will goes out), start it again, stop the broker for a while. Tests use it for the real-time
behaviour; `benchmarks/virtual_day.py` times it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dso_coordinator.service import CoordinatorService, coordinator_machine
from dso_coordinator.service import offline_will as dso_will
from dso_coordinator.settings import CoordinatorSettings
from edge_agent.__main__ import build_realtime, margins
from edge_agent.journal import Journal
from edge_agent.meter import MqttMeter
from edge_agent.service import EdgeService, market_machine
from edge_agent.service import offline_will as edge_will
from edge_agent.settings import EdgeSettings
from meter_sim.service import MeterService
from p2pdoe.core import topics
from p2pdoe.core.day_configs import scenario_forecast
from p2pdoe.core.realtime.simulated_meter import SimulatedMeter
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import SiteForecast
from p2pdoe.core.signing import SignatureError, edge_identity, unframe
from p2pdoe.core.site import coordinator_config, site_config
from p2pdoe.services.clock import VirtualClock, run_virtual
from p2pdoe.services.retained_sweep import RetainedSweep
from p2pdoe.services.runner import count_refusals
from p2pdoe.services.signing import SignedTransport, Signer
from p2pdoe.services.transport_api import LastWill
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

Recorder = Callable[[str, bytes, bool], None]
FORECAST_LEAD = timedelta(hours=14)  # a day's forecast comes at 10:00 the day before
CONTROL, GRID = 1, 2  # each instant in the lockstep phases' order: meters, edge agents, coordinator


@dataclass
class VirtualDay:
    """The day of scenario `s` from one interval before its start (the meters' lead-in) to `hours`
    after it; `root` holds the journals, checkpoint and results."""

    s: Scenario
    root: Path
    hours: float = 24.0
    rate_s: float = 30.0
    dso_options: dict[str, Any] = field(default_factory=dict)
    edge_options: dict[str, Any] = field(default_factory=dict)
    record: Recorder | None = None  # every message the broker accepts, as a plain client would see it
    coordinator: bool = True  # False: the test plays the coordinator (`client`), and `until` ends the day
    sites: list[str] | None = None  # the sites with an edge and a meter (default: all)
    until: datetime | timedelta | None = None  # end the day here (after the day's start) instead
    signed: bool = True  # every service signs and believes only signed messages (as `p2pdoe demo`)
    days: int = 1  # whole days one after another (then `hours` is not used)
    # each date's own scenario (its seeded profiles; p2pdoe.io.scenarios.load_scenario with `day`): its
    # meters' truth, and each site's forecast of it, published retained the day before at 10:00
    dated: Callable[[date], Scenario] | None = None

    def __post_init__(self) -> None:
        self.start = self.s.start
        self.origin = self.start - timedelta(hours=self.s.dt_h)
        self.broker = MemoryBroker(None if self.record is None else unsigned(self.record))
        identities = ["dso", *(edge_identity(site) for site in self.s.ids)]
        self.keys = {i: Ed25519PrivateKey.generate() for i in identities}
        self.trusted = {i: key.public_key() for i, key in self.keys.items()}
        self.configs = {site: site_config(self.s, c) for c, site in enumerate(self.s.ids)}
        self.coordinator_config = coordinator_config(self.s)
        self.tasks: dict[str, asyncio.Task[int]] = {}
        self.transports: dict[str, Any] = {}  # MemoryTransport, or SignedTransport around one
        self.exits: dict[str, list[int | BaseException]] = {}
        self._starts: dict[str, int] = {}
        self.journals: dict[str, Journal] = {}  # each edge agent's open journal (a fault may fill its disk)
        self._schedule: list[tuple[datetime, Callable[[], Awaitable[None] | None]]] = []
        self.wall_s = 0.0

    # --- the day ---------------------------------------------------------------------------------

    def at(self, moment: datetime | timedelta, action: Callable[[], Awaitable[None] | None]) -> None:
        """Do `action` at a moment of the day (a timedelta: after the day's start)."""
        when = self.start + moment if isinstance(moment, timedelta) else moment
        self._schedule.append((when, action))

    def run(self) -> Results:
        """Run the day to the coordinator's exit; its results.json."""
        t0 = time.perf_counter()
        run_virtual(self._day())
        self.wall_s = time.perf_counter() - t0
        return Results.model_validate_json((self.root / "results.json").read_bytes())

    def run_until_end(self) -> None:
        """Run the day without reading results (a day without a coordinator ends at `until`)."""
        t0 = time.perf_counter()
        run_virtual(self._day())
        self.wall_s = time.perf_counter() - t0

    async def _day(self) -> None:
        self.clock = VirtualClock(self.origin)
        if self.dated is not None:
            await self._forecasts(0)
            for k in range(1, self.days):
                self.at(self._day_start(k) - FORECAST_LEAD, lambda k=k: self._forecasts(k))  # type: ignore[misc]
        for site in self.s.ids if self.sites is None else self.sites:
            self.start_meter(site)
            self.start_edge(site)
        if self.coordinator:
            self.start_coordinator()
        timers = [asyncio.create_task(self._when(m, a)) for m, a in self._schedule]
        try:
            await self._until_over()
        finally:
            for task in [*timers, *self.tasks.values()]:
                task.cancel()
            await asyncio.gather(*timers, *self.tasks.values(), return_exceptions=True)

    async def _until_over(self) -> None:
        """Until `until`, or until the coordinator exits (a killed one is waited for: it may be
        started again), at the latest a day after the day's end."""
        if self.until is not None:
            end = self.start + self.until if isinstance(self.until, timedelta) else self.until
            await self.clock.sleep_until(end)
            return
        latest = self.start + timedelta(hours=(self.hours if self.days == 1 else 24 * self.days) + 24)
        while self.clock.now() < latest:
            task = self.tasks["dso"]
            if task.done() and not task.cancelled():
                return
            await asyncio.sleep(self.rate_s)

    def _day_start(self, k: int) -> datetime:
        return self.start + timedelta(days=k) if self.dated is None else self.dated_days[k].start

    @cached_property
    def dated_days(self) -> list[Scenario]:
        assert self.dated is not None
        first = self.start.date()
        return [self.dated(first + timedelta(days=k)) for k in range(self.days)]

    def forecast(self, site: str, k: int, issued: datetime) -> SiteForecast:
        """Site's forecast of day k (from 0): its date's scenario."""
        return scenario_forecast([self.dated_days[k]], site, issued)

    async def _forecasts(self, k: int) -> None:
        """Every site's integrator publishes its forecast of day k (retained, signed as the site)."""
        for site in self.s.ids:
            payload = self.forecast(site, k, self.clock.now()).model_dump_json().encode()
            async with self.client(f"forecaster-{site}", edge_identity(site)) as c:
                await c.publish(topics.site(site, "forecast"), payload, qos=1, retain=True)

    def client(self, name: str, identity: str | None = None) -> Any:
        """A client of the broker for the test (not started: `async with` it): plain, or signing as
        `identity` with its real key (a site that misbehaves)."""
        transport = self._transport(self.broker, name, identity)
        _use_clock(transport, self.clock)
        return transport

    def _transport(
        self,
        broker: MemoryBroker,
        name: str,
        identity: str | None,
        will: LastWill | None = None,
        sweep_retained: bool = False,
        session_expiry_s: int = 0,
    ) -> Any:
        """A service's transport: with `signed`, signing as `identity` and believing only the
        signed messages of the day's identities; `sweep_retained` as the coordinator's; a session
        the broker keeps `session_expiry_s` after a disconnect (0: clean)."""
        signer = None if not self.signed or identity is None else Signer(identity, self.keys[identity])
        signed_will = will if signer is None else signer.signed_will(will)
        mqtt = MemoryTransport(broker, name, will=signed_will, session_expiry_s=session_expiry_s)
        inner = RetainedSweep(mqtt) if sweep_retained else mqtt
        return inner if signer is None else SignedTransport(inner, signer, self.trusted)

    async def outage(self, seconds: float) -> None:
        """The broker is away for `seconds` of the day (its retained messages kept)."""
        self.broker.outage()
        await asyncio.sleep(seconds)
        self.broker.restore()

    async def _when(self, moment: datetime, action: Callable[[], Awaitable[None] | None]) -> None:
        await self.clock.sleep_until(moment)
        result = action()
        if result is not None:
            await result

    # --- processes -------------------------------------------------------------------------------

    def start_coordinator(self, **options: Any) -> None:
        settings = CoordinatorSettings(
            coordinator_config=self.root / "coordinator.json", rolling=True, exit_after_day=True,
            meter_step_s=self.rate_s, hours=self.hours if self.days == 1 else None, out=self.root,
            start=_iso(self.start), **{**self.dso_options, **options},
        )  # fmt: skip
        expiry = settings.session_expiry_s
        transport = self._transport(self.broker, "dso", "dso", dso_will(), True, expiry)
        clock = VirtualClock(self.origin, rank=GRID)
        _use_clock(transport, clock)
        service = CoordinatorService(transport, clock, settings, offload=False)

        async def main() -> int:
            async with transport:
                machine = coordinator_machine(
                    self.coordinator_config, settings, clock.now(), self._instance("dso"),
                    lambda m: count_refusals(transport, m.reader.dropped), days=self.days,
                )  # fmt: skip
                return await service.run(machine)

        self._launch("dso", transport, main())

    def start_edge(
        self, site: str, clock_offset_s: float = 0.0, name: str | None = None, **options: Any
    ) -> None:
        """`clock_offset_s`: the edge's clock runs this far ahead of everyone's (a skew); `name`: the
        process's name and client id (default `edge-<site>`; another one is a second process)."""
        name = name or f"edge-{site}"
        config = self.configs[site]
        settings = EdgeSettings(
            site_config=self.root / f"{site}.json", meter=True, meter_step_s=self.rate_s,
            journal=self.journal(site), start=_iso(self.start), **{**self.edge_options, **options},
        )  # fmt: skip
        expiry = settings.session_expiry_s
        transport = self._transport(self.broker, name, edge_identity(site), edge_will(site), False, expiry)
        main_one = name == f"edge-{site}"
        journal = Journal(self.journal(site) if main_one else self.root / "journal" / f"{name}.db", site)
        if main_one:
            self.journals[site] = journal
        market = market_machine(config, margins(settings))
        clock = VirtualClock(self.origin + timedelta(seconds=clock_offset_s), rank=CONTROL)
        _use_clock(transport, clock)
        count_refusals(transport, market.reader.dropped)
        service = EdgeService(
            market, transport, clock, journal=journal, meter=MqttMeter(transport, site), offload=False,
            forecast_file=settings.forecast_file,
        )  # fmt: skip

        async def main() -> int:
            try:
                async with transport:
                    return await service.run(
                        build_realtime(config, settings, clock.now(), self._instance(site))
                    )
            finally:
                journal.close()

        self._launch(name, transport, main())

    def start_meter(self, site: str) -> None:
        config = self.configs[site]
        seed = _seed(site)
        truth = None
        if self.dated is not None:
            truth = scenario_forecast(self.dated_days, site, self.start)
        meter = SimulatedMeter(
            config, self.start, self.rate_s, seed, self.s.dt_h * 3600, days=self.days, truth=truth
        )
        transport = self._transport(self.broker, f"meter-{site}", edge_identity(site))
        _use_clock(transport, self.clock)
        service = MeterService(transport, self.clock, offload=False)

        async def main() -> int:
            async with transport:
                return await service.run(meter)

        self._launch(f"meter-{site}", transport, main())

    def start_site_on_meter_broker(self, site: str, meter_broker: MemoryBroker, **options: Any) -> None:
        """The site's meter and edge agent with the meter on a broker of the site's own (the edge's
        `--meter-broker`, a gateway's): an `outage` of the day's broker then cuts the edge off the
        coordinator while its meter goes on reading and following its set-points."""
        config = self.configs[site]
        meter = SimulatedMeter(config, self.start, self.rate_s, _seed(site), self.s.dt_h * 3600)
        meter_side = self._transport(meter_broker, f"meter-{site}", edge_identity(site))
        _use_clock(meter_side, self.clock)
        meter_service = MeterService(meter_side, self.clock, offload=False)

        async def run_meter() -> int:
            async with meter_side:
                return await meter_service.run(meter)

        self._launch(f"meter-{site}", meter_side, run_meter())
        settings = EdgeSettings(
            site_config=self.root / f"{site}.json", meter=True, meter_step_s=self.rate_s,
            journal=self.journal(site), start=_iso(self.start), **{**self.edge_options, **options},
        )  # fmt: skip
        transport = self._transport(self.broker, f"edge-{site}", edge_identity(site), edge_will(site))
        adapter = self._transport(meter_broker, f"edge-{site}-meter", edge_identity(site))
        journal = self.journals[site] = Journal(self.journal(site), site)
        market = market_machine(config, margins(settings))
        clock = VirtualClock(self.origin, rank=CONTROL)
        for t in (transport, adapter):
            _use_clock(t, clock)
        count_refusals(transport, market.reader.dropped)
        service = EdgeService(
            market, transport, clock, journal=journal, meter=MqttMeter(adapter, site), offload=False
        )

        async def run_edge() -> int:
            try:
                async with transport, adapter:
                    return await service.run(
                        build_realtime(config, settings, clock.now(), self._instance(site))
                    )
            finally:
                journal.close()

        self._launch(f"edge-{site}", transport, run_edge())

    def _launch(self, name: str, transport: Any, main: Awaitable[int]) -> None:
        task: asyncio.Task[int] = asyncio.ensure_future(main)
        self.tasks[name], self.transports[name] = task, transport
        task.add_done_callback(lambda t: self.exits.setdefault(name, []).append(_outcome(t)))

    def kill(self, name: str) -> None:
        """The process dies: its connection drops without a goodbye (its will goes out)."""
        with contextlib.suppress(Exception):
            self.broker.kill(self.transports[name].client_id)
        self.tasks[name].cancel()

    def stop(self, name: str) -> None:
        """A clean stop (its transport says goodbye; no will)."""
        self.tasks[name].cancel()

    def _instance(self, site: str) -> str:
        """A token per start of the site's edge agent, the same on every run of the day."""
        self._starts[site] = self._starts.get(site, 0) + 1
        return f"{site}.{self._starts[site]}"

    def journal(self, site: str) -> Path:
        return self.root / "journal" / f"{site}.db"


def _use_clock(transport: object, clock: VirtualClock) -> None:
    if isinstance(transport, SignedTransport):
        transport.signer.use_clock(clock.now)


def unsigned(record: Recorder) -> Recorder:
    """`record` given each message without its signature line (as a service believes it)."""

    def strip(topic: str, payload: bytes, retained: bool) -> None:
        try:
            body = unframe(payload)[1]
        except SignatureError:
            body = payload
        record(topic, body, retained)

    return strip


def _outcome(task: asyncio.Task[int]) -> int | BaseException:
    if task.cancelled():
        return -1
    exc = task.exception()
    return exc if exc is not None else task.result()


def _seed(site: str) -> int:
    import zlib

    return zlib.crc32(site.encode())


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
