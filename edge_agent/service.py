"""The edge agent as an asyncio service: the shell around its two pure machines.

- The real-time machine (p2pdoe.core.edge.realtime) runs in the shell's loop (p2pdoe.services.shell):
  envelopes, the coordinator's status, meter readings and the periodic re-check, handled at once.
- The market machine (p2pdoe.core.edge.market) runs in a lane of its own: round messages in order,
  its solves in a worker thread, so a solve never delays the set-points of a reading. A finished
  round is reported (`SiteReport`) and its plan handed to the real-time machine.
Here only bytes move: the meter adapter is commanded, the journal written, the outbox fed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edge_agent.journal import Journal
from edge_agent.meter import MqttMeter
from edge_agent.outbox import Outbox
from edge_agent.report import cpu_seconds, site_report
from p2pdoe.core import topics
from p2pdoe.core.cpu import CpuClocks
from p2pdoe.core.edge.commands import (
    Actuate,
    DayStarts,
    Durable,
    MeterRead,
    PlanAgreed,
    Restored,
    SaveEnvelope,
    SaveInterval,
    SaveSettlement,
    SettlementsAgain,
    Telemetry,
)
from p2pdoe.core.edge.market import EdgeMarket, RoundDone
from p2pdoe.core.edge.reading_wait import ReadingWait
from p2pdoe.core.edge.realtime import EdgeRealtime, status_payload
from p2pdoe.core.effects import Fault, Heard, Send, Subscribe, Unsubscribe
from p2pdoe.core.realtime.controller import Controller
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.schemas.messages import Grant, PolishPrices, RoundOpen
from p2pdoe.core.schemas.runtime import MeterReading, SiteForecast
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.clock import Clock
from p2pdoe.services.shell import Shell, clock_divert
from p2pdoe.services.transport import InboundMessage, LastWill, Transport

if TYPE_CHECKING:  # pymodbus and pysunspec2 load only with --meter-modbus
    from edge_agent.sunspec_meter import SunSpecMeter

log = logging.getLogger("edge_agent")
T = TypeVar("T")
_MARKET = ("open", "grant", "proposal", "prices", *topics.PAYMENT_KINDS)


def goodbye(site: str) -> tuple[str, bytes]:
    """The retained status a clean stop publishes."""
    return topics.site(site, "status"), _offline(site)


def offline_will(site: str) -> LastWill:
    """Published by the broker, retained, if the agent's connection drops without a goodbye."""
    return LastWill(topics.site(site, "status"), _offline(site))


def _offline(site: str) -> bytes:
    return status_payload(site, "offline", "none", datetime.now(UTC))


def fixed_default(config: SiteConfig) -> Box:
    """The local safety net when no default was ever heard: no export, and import up to the site's
    largest preferred consumption (so it can keep its loads, not charge its battery from the grid)."""
    c = config.community
    peak = max(f + x for f, x in zip(c.fixed_load_kw, c.flexible_load.preferred_kw, strict=True))
    return Box(-float(peak), 0.0)


def market_machine(config: SiteConfig, margins: tuple[float, float] | None) -> EdgeMarket:
    return EdgeMarket(config, margins, time.perf_counter, CpuClocks(cpu_seconds, time.thread_time))


class EdgeService:
    """`meter`: the site's meter, read through the main transport (`meter.transport is transport`:
    one connection, so readings keep their order with everything else) or its own; `rounds`: stop
    after this many finished rounds (0: never); `offload=False`: no worker threads (a virtual clock);
    `solve_delay_s` (fault injection: a slow gateway): every agreement step that may solve holds its
    answer this long on the service's clock."""

    def __init__(
        self,
        market: EdgeMarket,
        transport: Transport,
        clock: Clock,
        *,
        journal: Journal | None = None,
        meter: MqttMeter | SunSpecMeter | None = None,
        rounds: int = 0,
        offload: bool = True,
        forecast_file: Path | None = None,
        solve_delay_s: float = 0.0,
    ):
        self.market = market
        self.solve_delay = timedelta(seconds=solve_delay_s)
        self.realtime: EdgeRealtime | None = None
        self.site = market.site
        self.transport, self.clock = transport, clock
        self.journal, self.meter = journal, meter
        self.rounds, self.offload = rounds, offload
        self.outbox = None if journal is None else Outbox(transport, journal)
        self._clock_divert = clock_divert(clock)
        self._market_q: asyncio.Queue[InboundMessage] = asyncio.Queue()
        self.shell = Shell(transport, clock, self._carry_out, offload, self._divert, self._awaiting_reading)
        self.reports = 0
        self._journal_failing: str | None = None
        self._reading_wait = ReadingWait()
        self.failed_commands = 0
        self.forecast_file = forecast_file  # read again at each opening when it changed
        self._forecast_stamp: int | None = None

    async def run(self, realtime: EdgeRealtime) -> int:
        """Serve until stopped, the transport closes, or `rounds` rounds are reported."""
        self.realtime = realtime
        saved = None if self.journal is None else restored(self.journal)
        if self.forecast_file is not None:  # registered with the site's first registration
            await self._forecast_from_file(self.forecast_file, publish=False)
        first: list[object] = list(realtime.start(self.clock.now(), saved, self.market.registration()))
        tasks = [asyncio.create_task(self._market_lane(), name=f"market-{self.site}")]
        if self.meter is not None and self.meter.transport is not self.transport:
            tasks.append(asyncio.create_task(self._own_meter(self.meter), name=f"meter-{self.site}"))
        if self.outbox is not None:
            self.outbox.start()
        try:
            return await self.shell.run(realtime, first, self._subscriptions())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.outbox is not None:
                await self.outbox.close()

    async def subscribe(self) -> None:
        """Subscribe before joining a lockstep day, so no reading of the first step is missed."""
        for topic_filter, qos in self._subscriptions():
            await self.transport.subscribe(topic_filter, qos)

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs = [(topics.round_open("+"), 1), (topics.grant("+", self.site), 1)]
        subs += [(topics.polish_prices("+", self.site), 1)]
        subs += [(topics.proposal("+", p.id), 1) for p in self.market.config.peers]
        subs += [(topics.payment_open("+"), 1), (topics.payment_grant("+"), 1)]
        subs += [(topics.payment_proposal("+", p.id), 1) for p in self.market.config.peers]
        subs += [(topics.site(self.site, k), 1) for k in ("doe", "doe/default", "status", "forecast")] + [
            (topics.DSO_STATUS, 1)
        ]
        if self.meter is not None and self.meter.transport is self.transport:
            subs.append((self.meter.topic, 0))
        return subs

    # --- routing ---------------------------------------------------------------------------------

    def _divert(self, m: InboundMessage) -> bool:
        """Clock messages to the clock, market messages to the market lane, readings decoded."""
        if self._clock_divert is not None and self._clock_divert(m):
            return True
        parsed = topics.parse(m.topic)
        if parsed is not None and parsed.area == "market" and parsed.kind in _MARKET:
            self._market_q.put_nowait(m)
            return True
        if m.topic == topics.site(self.site, "forecast"):  # in order with the openings it precedes
            self._market_q.put_nowait(m)
            return True
        if self.meter is not None and m.topic == self.meter.topic:
            reading = self.meter.decode(m.payload)
            if reading is not None:
                self._reading(reading)
            return True
        return False

    async def _own_meter(self, meter: MqttMeter | SunSpecMeter) -> None:
        async for reading in meter.readings():
            self._reading(reading)

    def _reading(self, reading: MeterReading) -> None:
        assert self.meter is not None
        self._reading_wait.reading_arrived(getattr(self.meter.transport, "connections", None))
        self.shell.feed(MeterRead(reading))

    def _awaiting_reading(self) -> bool:
        """On a lockstep clock, with the meter taking part: whether this step's reading can still come
        (`ReadingWait`)."""
        takes_part = getattr(self.clock, "takes_part", None)
        if self.meter is None or takes_part is None or not takes_part(f"meter-{self.site}"):
            return False
        last = None if self.realtime is None else self.realtime.last_reading_ts
        connections = getattr(self.meter.transport, "connections", None)
        return self._reading_wait.holds(last, self.clock.now(), connections)

    # --- the market lane -------------------------------------------------------------------------

    async def _market_lane(self) -> None:
        try:
            while True:
                m = await self._market_q.get()
                if m.topic == topics.site(self.site, "forecast"):
                    await self._forecast(m.payload)
                    continue
                parsed = topics.parse(m.topic)
                if parsed is not None and parsed.kind in topics.PAYMENT_KINDS:
                    await self._payment(m)
                    continue
                if self.forecast_file is not None and m.topic.endswith("/open"):
                    await self._forecast_from_file(self.forecast_file)
                msg = self.market.read(Heard(m.topic, m.payload, m.retained))
                if msg is None:
                    continue
                site = self._snapshot() if m.topic.endswith("/open") else None
                may_solve = self.market.heavy(msg)
                # An opening builds and factors the site's problem, a polish step factors and
                # decomposes its KKT system: off the loop. An iteration's step is one warm-started
                # solve, cheaper on the loop than the hop to a thread and back.
                commands = (
                    await asyncio.to_thread(self.market.handle, msg, site)
                    if self.offload and _factors(msg)
                    else self.market.handle(msg, site)
                )
                if may_solve and self.solve_delay:
                    await self.clock.sleep_until(self.clock.now() + self.solve_delay)
                for cmd in commands:
                    await self._market_command(cmd)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: the market lane failed", self.site)
            self.shell.stop(error=exc)

    async def _payment(self, m: InboundMessage) -> None:
        """A payment round's message (Nash bargaining): light, handled in the lane's order."""
        msg = self.market.reader.payment(Heard(m.topic, m.payload, m.retained))
        if msg is not None:
            for cmd in self.market.handle_payment(msg):
                await self._market_command(cmd)

    async def _forecast(self, payload: bytes, publish: bool = True) -> None:
        """Keep a forecast for the next rounds; its ranges are registered at once (`publish`)."""
        msg = self.market.reader.runtime(payload)
        if msg is not None and not isinstance(msg, SiteForecast):
            self.market.reader.dropped["sender_not_topic"] += 1
        elif isinstance(msg, SiteForecast):
            commands = await self._off_loop(self.market.feed_forecast, msg)
            for cmd in commands if publish else ():
                await self._market_command(cmd)

    async def _forecast_from_file(self, path: Path, publish: bool = True) -> None:
        """The forecast file, read again (off the loop) whenever it changed (an integrator's job
        rewrites it)."""
        try:
            stamp = path.stat().st_mtime_ns
            if stamp == self._forecast_stamp:
                return
            self._forecast_stamp = stamp
            await self._forecast(await self._off_loop(path.read_bytes), publish)
        except OSError as exc:
            log.warning("%s: forecast file %s unreadable: %s", self.site, path, exc)

    def _snapshot(self) -> Controller | None:
        return None if self.realtime is None else self.realtime.snapshot()

    async def _market_command(self, cmd: object) -> None:
        if isinstance(cmd, (Send, Subscribe, Unsubscribe)):
            await self.shell.execute([cmd])
        elif isinstance(cmd, DayStarts):
            self.shell.feed(cmd)
            if self.journal is not None:
                self.journal.roll_over(cmd.start)
        elif isinstance(cmd, RoundDone):
            await self._round_done(cmd)
        elif isinstance(cmd, SettlementsAgain):
            self._settlements_again(cmd)

    def _settlements_again(self, cmd: SettlementsAgain) -> None:
        if self.journal is None or self.outbox is None:
            return
        sent = self.journal.settlement_messages(cmd.since)
        for payload in sent:
            self.outbox.durable(topics.site(self.site, "settlement"), payload)
        log.info("%s: %d settlements sent again for a new coordinator run", self.site, len(sent))

    async def _round_done(self, done: RoundDone) -> None:
        dropped = dict(self.market.reader.dropped)
        parts = self.market.cpu_parts.since(done.round.parts_at_open)
        report = await self._off_loop(site_report, self.site, done.round, done.outcome, dropped, parts)
        costs = report.community
        self.market.cost_of_round(done.round.id, costs.cost_eur, costs.cost_breakdown.p2p_net_eur)
        if done.plan is not None:
            self.shell.feed(PlanAgreed(done.plan))
        payload = report.model_dump_json().encode()
        await self.shell.execute([Send(topics.report(done.round.id, self.site), payload)])
        log.info(
            "%s: round %s %s after %d iterations; cost %.2f EUR",
            self.site, done.round.id, done.outcome.status, done.outcome.iterations, report.community.cost_eur,
        )  # fmt: skip
        self.reports += 1
        if self.rounds and self.market.settled >= self.rounds:
            self.shell.stop()

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args) if self.offload else fn(*args)

    # --- the real-time machine's commands --------------------------------------------------------

    async def _carry_out(self, cmd: object) -> None:
        """Carry out one command; one that fails is logged and counted, and control goes on."""
        handler = self._handlers().get(type(cmd))
        if handler is None:
            return
        try:
            await handler(cmd)
        except Exception:
            self.failed_commands += 1
            log.exception("%s: could not carry out %s", self.site, type(cmd).__name__)
        self._watch_journal()

    def _watch_journal(self) -> None:
        """Tell the machine when the journal starts or stops refusing writes."""
        failing = None if self.journal is None else self.journal.failing
        if (failing is None) != (self._journal_failing is None):
            detail = None if failing is None else f"the journal refuses writes: {failing}"
            self.shell.feed(Fault("journal_unwritable", detail))
        self._journal_failing = failing

    def _handlers(self) -> dict[type, Callable[[Any], Awaitable[None]]]:
        return {
            Actuate: self._actuate,
            SaveInterval: self._save_interval,
            SaveEnvelope: self._save_envelope,
            SaveSettlement: self._save_settlement,
            Durable: self._durable,
            Telemetry: self._telemetry,
        }

    async def _actuate(self, cmd: Actuate) -> None:
        if self.meter is not None:
            await self.meter.command(cmd.set_points, cmd.ts)

    async def _save_interval(self, cmd: SaveInterval) -> None:
        if self.journal is not None:
            self.journal.save_interval(
                cmd.energy, cmd.scheduled_kwh, cmd.envelope, cmd.lo_kw, cmd.up_kw, cmd.state
            )

    async def _save_envelope(self, cmd: SaveEnvelope) -> None:
        if self.journal is not None:
            self.journal.save_envelope(cmd.key, cmd.payload)
            self.journal.forget_envelopes(set(cmd.keep))

    async def _save_settlement(self, cmd: SaveSettlement) -> None:
        if self.journal is None:
            return
        if cmd.round is not None and cmd.trades:
            self.journal.save_trades(cmd.round, cmd.settlement.interval_start, cmd.trades)
        self.journal.save_settlement(cmd.settlement, cmd.message)

    async def _durable(self, cmd: Durable) -> None:
        if self.outbox is not None:
            self.outbox.durable(cmd.topic, cmd.payload)

    async def _telemetry(self, cmd: Telemetry) -> None:
        if self.outbox is not None:
            self.outbox.telemetry(cmd.topic, cmd.payload)


def restored(journal: Journal) -> Restored:
    """What the journal kept of a previous run."""
    flex = journal.value("flex_used_kwh")
    return Restored(
        envelopes=journal.envelopes(),
        intervals=journal.intervals(),
        settled={s.interval_start for s in journal.settlements()},
        flex_used_kwh=None if flex is None else float(flex),
    )


__all__ = ["EdgeService", "fixed_default", "goodbye", "market_machine", "offline_will", "restored"]


def _factors(msg: object) -> bool:
    """Whether handling `msg` factors a system: an opening, a polish's prices, a grant starting one."""
    return isinstance(msg, (RoundOpen, PolishPrices)) or (isinstance(msg, Grant) and msg.polish)
