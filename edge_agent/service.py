"""The edge agent as an asyncio service: one community's side of the agreement over MQTT.

It registers (retained: bus, peers, technical and reactive ranges; never costs or profiles), marks
itself online (retained status; its last will marks it offline), takes part in every round that
includes it, trading only with the peers that round includes, and reports its settled schedule when
the round ends. It keeps the envelopes the coordinator publishes for it and says which one applies
(p2pdoe.core.realtime.fallback). With a meter (edge_agent.meter) it runs the real-time controller
(p2pdoe.core.realtime.controller) at meter rate: set-points, compliance telemetry, switches on its
status, and each interval settled into its journal (edge_agent.journal) and sent to the coordinator.
Solves run in a worker thread, so the MQTT keep-alive never starves.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from edge_agent.journal import Journal
from edge_agent.meter import MeterAdapter
from edge_agent.outbox import Outbox
from p2pdoe.analysis.admm import solve_times
from p2pdoe.analysis.results import Tariffs, community_result, purchases
from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.outcome import agreed_schedule, agreed_z
from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.network import FloatArray
from p2pdoe.core.realtime.controller import Controller, Plan, plan_from
from p2pdoe.core.realtime.controller import Settled as CtlSettled
from p2pdoe.core.realtime.controller import Step as CtlStep
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import Choice, FallbackConfig, describe_switch, is_switch
from p2pdoe.core.realtime.plant import plant_spec
from p2pdoe.core.schemas.messages import Proposal, RoundOpen, encode
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    SettlementRecord,
    SiteReport,
    SiteStatus,
    Telemetry,
)
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import Recent, community_data, registration, remaining_config, site_qp, with_peers
from p2pdoe.core.solution import Policy
from p2pdoe.services.agreement_mqtt import MarketReader, Message, topic_of
from p2pdoe.services.transport import InboundMessage, LastWill, Transport, TransportError

log = logging.getLogger("edge_agent")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def status_payload(
    site: str,
    state: str,
    envelope: str,
    ts: datetime | None = None,
    reason: str | None = None,
    alarm: str | None = None,
) -> bytes:
    msg = SiteStatus(
        site=site,
        state=state,  # type: ignore[arg-type]
        envelope=envelope,  # type: ignore[arg-type]
        ts=ts or utc_now(),
        reason=reason,
        alarm=alarm,  # type: ignore[arg-type]
    )
    return msg.model_dump_json().encode()


def goodbye(site: str) -> tuple[str, bytes]:
    """The retained status a clean stop publishes."""
    return topics.site(site, "status"), status_payload(site, "offline", "none")


def offline_will(site: str) -> LastWill:
    """Published by the broker, retained, if the agent's connection drops without a goodbye."""
    return LastWill(topics.site(site, "status"), status_payload(site, "offline", "none"))


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@dataclass
class _Round:
    id: str
    start: datetime  # of the round's first interval
    config: SiteConfig  # with only the peers this round includes
    qp: CommunityQP
    participant: CommunityParticipant
    cpu_at_open: float = field(default_factory=cpu_seconds)
    steps: list[float] = field(default_factory=list)  # seconds per solve-and-propose


@dataclass(frozen=True)
class Settled:
    """A finished round as the agent keeps it: enough to report and to follow the schedule."""

    round: str
    start: datetime
    outcome: CommunityOutcome
    net_injection_kw: FloatArray


class EdgeAgent:
    """Drives one `CommunityParticipant` per round from a transport."""

    def __init__(
        self,
        config: SiteConfig,
        clock: Clock = utc_now,
        *,
        controller: Controller | None = None,
        journal: Journal | None = None,
        speed: float = 1.0,
        margins: tuple[float, float] | None = None,
    ):
        self.config = config
        self.speed = speed  # of the simulated clock: a skew is judged in wall seconds
        self.margins = margins  # kept inside envelopes (real time; p2pdoe.core.community.envelope_margins)
        self.site = config.community.id
        self.clock = clock
        self.reader = MarketReader(self.site)
        self.settled: list[Settled] = []
        self.controller = controller or Controller(
            config, plant_spec(config), FallbackConfig(fixed_default(config)), clock(), config.dt_h * 3600
        )
        self.journal = journal
        self.applied = "none"  # which envelope applies: dynamic, default, fixed_default (none: not yet)
        self.meter_ok = 0  # readings handled
        self._round: _Round | None = None
        self._over: set[str] = set()  # rounds finished, superseded or not ours
        self._early: list[Message] = []
        self._outbox: Outbox | None = None
        if journal is not None:
            self._restore(journal)

    async def run(
        self,
        transport: Transport,
        rounds: int = 0,
        report_every_s: float = 10.0,
        meter: MeterAdapter | None = None,
    ) -> list[Settled]:
        """Serve until the transport closes, or until `rounds` rounds are settled (0: no limit). With a
        meter, the real-time controller runs on its readings."""
        await self._subscribe(transport)
        reg = registration(self.config).model_dump_json().encode()
        await transport.publish_state(topics.site(self.site, "register"), reg)
        await self._report_state(transport)
        log.info("%s: registered at bus %d; waiting for a round", self.site, self.config.community.bus)
        tasks = [asyncio.create_task(self._tick(transport, report_every_s))]
        if self.journal is not None:
            self._outbox = Outbox(transport, self.journal)
            self._outbox.start()
        if meter is not None:
            tasks.append(asyncio.create_task(self._follow_meter(transport, meter)))
        market: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
        agreement = asyncio.create_task(self._agree(transport, market, rounds))
        tasks.append(agreement)
        reader = asyncio.create_task(self._read(transport, market))
        tasks.append(reader)
        try:
            await asyncio.wait({agreement, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        for task in (agreement, reader):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            if self._outbox is not None:
                await self._outbox.close()
        return self.settled

    async def _subscribe(self, transport: Transport) -> None:
        await transport.subscribe(topics.round_open("+"))
        await transport.subscribe(topics.grant("+"))
        for peer in self.config.peers:
            await transport.subscribe(topics.proposal("+", peer.id))
        await transport.subscribe(topics.site(self.site, "doe"))
        await transport.subscribe(topics.site(self.site, "doe/default"))
        await transport.subscribe(topics.DSO_STATUS)

    async def _read(self, transport: Transport, market: asyncio.Queue[InboundMessage | None]) -> None:
        """Envelopes and status at once; the market in order, behind any solve under way."""
        async for m in transport.messages():
            if not await self._on_state(transport, m):
                market.put_nowait(m)
        market.put_nowait(None)

    async def _agree(
        self, transport: Transport, market: asyncio.Queue[InboundMessage | None], rounds: int
    ) -> None:
        """The market's messages in order; ends once `rounds` rounds are settled (0: never)."""
        while True:
            m = await market.get()
            if m is None:
                return
            await self._on_message(transport, m)
            if rounds and len(self.settled) >= rounds:
                return

    async def _on_state(self, transport: Transport, m: InboundMessage) -> bool:
        """Envelopes and the coordinator's status, handled on arrival; False for anything else."""
        parsed = topics.parse(m.topic)
        if parsed is not None and parsed.area == "site":
            await self._on_envelope(transport, parsed.kind, m.payload)
            return True
        if parsed is not None and parsed.area == "dso":
            await self._on_dso_status(transport, m)
            return True
        return False

    async def _on_message(self, transport: Transport, m: InboundMessage) -> None:
        if await self._on_state(transport, m):
            return
        message = self.reader.decoded(m)
        if message is None:
            return
        for cmd in await self._handle(message):
            await self._carry_out(transport, cmd)

    # --- the agreement ---------------------------------------------------------------------------

    async def _handle(self, message: Message) -> list[Command]:
        if isinstance(message, RoundOpen):
            return await self._open(message)
        r = self._round
        if r is None or message.round != r.id:
            if message.round not in self._over and len(self._early) < 4 * (len(self.config.peers) + 1):
                self._early.append(message)  # its round's opening may still be on its way
            return []
        return await self._step(r, message)

    async def _open(self, msg: RoundOpen) -> list[Command]:
        if self._round is not None and self._round.id == msg.round:
            return await self._step(self._round, msg)  # a repeated opening: the participant counts it
        if msg.round in self._over:
            return []
        if self.site not in msg.sites:
            log.warning("%s: left out of round %s; the default envelope applies", self.site, msg.round)
            self._over.add(msg.round)
            return []
        if self._round is not None:
            log.info("%s: round %s superseded by %s", self.site, self._round.id, msg.round)
            self._over.add(self._round.id)
        start = datetime.fromisoformat(msg.start.replace("Z", "+00:00")).astimezone(UTC)
        config = with_peers(self.remaining(start, msg.intervals), set(msg.sites))
        qp = await asyncio.to_thread(site_qp, config, Policy(msg.policy), self.margins)
        peer_ids = tuple(p.id for p in config.peers)
        participant = CommunityParticipant(self.site, peer_ids, qp, config.dt_h)
        r = _Round(msg.round, start, config, qp, participant)
        self._round = r
        log.info(
            "%s: round %s opened with %d sites, %d peers", self.site, msg.round, len(msg.sites), len(peer_ids)
        )
        commands = await self._step(r, msg)
        early, self._early = [m for m in self._early if m.round == msg.round], []
        for m in early:
            commands += await self._step(r, m)
        return commands

    async def _step(self, r: _Round, message: Message) -> list[Command]:
        t0 = time.perf_counter()
        if not r.participant.may_solve(message):  # microseconds: no worker thread needed
            return r.participant.handle(Received(message))
        commands = await asyncio.to_thread(r.participant.handle, Received(message))
        if any(isinstance(c, Publish) and isinstance(c.message, Proposal) for c in commands):
            r.steps.append(time.perf_counter() - t0)
        return commands

    async def _carry_out(self, transport: Transport, cmd: Command) -> None:
        if isinstance(cmd, Publish):
            await transport.publish(topic_of(cmd.message), encode(cmd.message), qos=1)
        elif isinstance(cmd, Finished) and self._round is not None:
            assert isinstance(cmd.outcome, CommunityOutcome)
            await self._settle(transport, self._round, cmd.outcome)

    async def _settle(self, transport: Transport, r: _Round, out: CommunityOutcome) -> None:
        report = await asyncio.to_thread(self.report, r, out)
        x = np.array(report.community.net_injection_kw)  # computed once, for the report
        self.settled.append(Settled(r.id, r.start, out, x))
        self.controller.adopt(self.plan(r, out, x))
        self._over.add(r.id)
        self._round = None
        await transport.publish(topics.report(r.id, self.site), report.model_dump_json().encode(), qos=1)
        log.info(
            "%s: round %s %s after %d iterations; cost %.2f EUR",
            self.site,
            r.id,
            out.status,
            out.iterations,
            report.community.cost_eur,
        )
        await self._report_state(transport)

    def plan(self, r: _Round, out: CommunityOutcome, net_kw: FloatArray) -> Plan:
        """The agreed schedule as the controller follows it; trades with every peer of the site's
        configuration (zero with those the round left out)."""
        c = r.config.community
        by_peer = {p.id: k for k, p in enumerate(r.config.peers)}
        peers = [p.id for p in self.config.peers]
        horizon = len(c.pv_kw)

        def rows(a: FloatArray) -> FloatArray:
            return np.array([a[by_peer[p]] if p in by_peer else np.zeros(horizon) for p in peers])

        schedule = agreed_schedule(r.qp, out)
        return plan_from(
            r.id, r.start, r.config.dt_h, schedule.values, peers,
            rows(out.agreed_buy_kw), rows(out.agreed_sell_kw), rows(out.buy_price), rows(out.sell_price),
            net_kw, np.array(c.pv_kw), np.array(c.wind_kw),
        )  # fmt: skip

    def remaining(self, start: datetime, intervals: int) -> SiteConfig:
        """The site's configuration over a round's horizon. A round over the whole day sets the day's
        start; a shorter one covers the rest of the day (a rolling round), with the measured state of
        charge, the flexible energy used so far and the forecasts updated by the last interval."""
        ctl = self.controller
        offset = ctl.intervals - intervals
        if offset <= 0:
            ctl.day_start = start
            return self.config
        soc = ctl.projected_soc(start)
        flex_used = ctl.flex_used_kwh + ctl.projected_flex_kwh(start)
        recent = None
        if ctl.last_means is not None and ctl.last_means[0] == offset - 1:
            m = ctl.last_means[1]
            recent = Recent(pv_kw=m.pv_kw, wind_kw=m.wind_kw, fixed_load_kw=m.fixed_load_kw)
        return remaining_config(self.config, offset, soc, flex_used, recent)

    def report(self, r: _Round, out: CommunityOutcome) -> SiteReport:
        c = r.config
        schedule = agreed_schedule(r.qp, out)
        tariffs = Tariffs(
            price_import=np.array(c.price_import_eur_per_kwh),
            price_export=np.array(c.price_export_eur_per_kwh),
            pay=out.buy_price,
            receive=out.sell_price,
            fees=np.array([p.fee_eur_per_kwh for p in c.peers]),
            dt_h=c.dt_h,
        )
        return SiteReport(
            site=self.site,
            round=r.id,
            status=out.status,  # type: ignore[arg-type]
            iterations=out.iterations,
            objective_eur=float(r.qp.objective(agreed_z(r.qp, out))),
            community=community_result(community_data(c), c.community.bus, schedule, tariffs),
            purchases=purchases(self.site, [p.id for p in c.peers], schedule, out.buy_price),
            final_solve=out.final_solve,
            solve_times=solve_times(self.site, "community", r.steps),
            rss_mb=peak_rss_mb(),
            cpu_s=cpu_seconds() - r.cpu_at_open,
            ignored=r.participant.ignored,
            dropped=dict(self.reader.dropped),
        )

    # --- envelopes and the coordinator -----------------------------------------------------------

    def _restore(self, journal: Journal) -> None:
        """What a previous run saved: the envelopes heard (so the saved default applies at once) and
        the interval that was under way: the day's latest with readings and no settlement. Resumed
        whether it still runs (its accumulation goes on) or is over (the first reading settles it with
        what was measured before the stop), so a stop never loses an interval's settlement."""
        for key, payload in journal.envelopes():
            doe = self.reader.runtime(payload)
            if isinstance(doe, Doe) and doe.site == self.site:
                self._file(key.split("@", 1)[0], doe)
        now, ctl = self.clock(), self.controller
        settled = {s.interval_start for s in journal.settlements()}
        unsettled = [
            e for e in journal.intervals() if e.start not in settled and ctl.day_start <= e.start <= now
        ]
        if unsettled:
            energy = unsettled[-1]
            self.controller.resume(energy, float(journal.value("flex_used_kwh") or 0.0))
            self._restarted = True
            log.info("%s: resumed interval %s from the journal", self.site, energy.start.isoformat())
        elif journal.value("flex_used_kwh") is not None:
            self.controller.flex_used_kwh = float(journal.value("flex_used_kwh") or 0.0)

    def _file(self, kind: str, doe: Doe) -> None:
        """An envelope heard on `kind` (doe or doe/default) into the controller's book."""
        if kind == "doe/default":
            self.controller.book.set_default(doe)
        else:
            self.controller.book.add(doe)

    async def _on_envelope(self, transport: Transport, kind: str, payload: bytes) -> None:
        if kind not in ("doe", "doe/default") or not payload:
            return  # a withdrawn retained envelope: the cached one stands until it expires
        doe = self.reader.runtime(payload)
        if doe is None:
            return
        if (
            not isinstance(doe, Doe)
            or doe.site != self.site
            or (kind == "doe/default") != (doe.round is None)
        ):
            self.reader.dropped["sender_not_topic"] += 1
            return
        self._file(kind, doe)
        if self.journal is not None:
            self.journal.save_envelope(f"{kind}@{doe.start.isoformat()}", payload)
            keep = {f"doe@{d.start.isoformat()}" for d in self.controller.book.dynamic.values()}
            default = self.controller.book.default
            if default is not None:
                keep.add(f"doe/default@{default.start.isoformat()}")
            self.journal.forget_envelopes(keep)
        log.info(
            "%s: %s [%.1f, %.1f] kW from %s", self.site, kind, doe.lo_kw, doe.up_kw, doe.start.isoformat()
        )
        await self._report_state(transport)

    async def _on_dso_status(self, transport: Transport, m: InboundMessage) -> None:
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return
        if not isinstance(msg, DsoStatus):
            self.reader.dropped["sender_not_topic"] += 1
            return
        self.controller.coordinator_online = msg.state == "online"
        if not m.retained and msg.state == "online":  # live and fresh: its time stamp tells the skew
            self.controller.skew_s = (self.clock() - msg.ts).total_seconds() / self.speed
        await self._report_state(transport)

    async def _report_state(self, transport: Transport) -> None:
        """Which envelope applies now (status, on a switch) and, without a meter, the telemetry."""
        choice = self.controller.choose_at(self.clock())
        await self._note_switch(transport, choice)
        if self.meter_ok == 0:
            await self._publish_schedule_telemetry(transport, choice)

    async def _note_switch(self, transport: Transport, choice: Choice, wait: bool = True) -> None:
        """`wait=False` (the meter loop): the status goes out in the background, so the control loop
        never waits for a broker that is away; the transport publishes the latest on reconnect."""
        previous = self._last_choice
        if not is_switch(previous, choice):
            return
        self._last_choice = choice
        log.info("%s: envelope %s", self.site, describe_switch(previous, choice))
        self.applied = choice.kind
        await self._publish_status(transport, choice, wait)

    _last_choice: Choice | None = None
    _status_task: asyncio.Task[None] | None = None  # a status still on its way (wait=False)

    async def _tick(self, transport: Transport, every_s: float) -> None:
        """Envelopes expire as time passes: re-check which applies, and report, every `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            await self._report_state(transport)

    def envelope_in_force(self) -> Choice:
        return self.controller.choose_at(self.clock())

    async def _publish_status(
        self, transport: Transport, choice: Choice | None = None, wait: bool = True
    ) -> None:
        payload = status_payload(
            self.site, "online", self.applied, self.clock(),
            None if choice is None else choice.reason, None if choice is None else choice.alarm,
        )  # fmt: skip
        if self._status_task is not None and not self._status_task.done():
            self._status_task.cancel()  # superseded: the latest status wins
        if wait:
            await transport.publish_state(topics.site(self.site, "status"), payload)
        else:
            self._status_task = asyncio.create_task(self._status_in_background(transport, payload))

    async def _status_in_background(self, transport: Transport, payload: bytes) -> None:
        try:
            await transport.publish_state(topics.site(self.site, "status"), payload)
        except TransportError as exc:
            log.warning("%s: status not published: %s", self.site, exc)

    async def _publish_schedule_telemetry(self, transport: Transport, choice: Choice) -> None:
        """Before any meter reading: the scheduled net injection now, against the envelope in force."""
        now = self.clock()
        plan = self.controller.plan_at(now)
        t = None if plan is None else plan.index(now)
        if plan is None or t is None:
            return
        p_kw = float(plan.net_kw[t])
        msg = Telemetry(
            site=self.site,
            ts=now,
            source="schedule",
            p_kw=p_kw,
            envelope=choice.kind,
            lo_kw=choice.lo_kw,
            up_kw=choice.up_kw,
            inside=choice.box.excess_kw(p_kw) == 0.0,
            round=plan.round,
        )
        await transport.publish(topics.site(self.site, "telemetry"), msg.model_dump_json().encode(), qos=0)

    # --- the real-time loop ----------------------------------------------------------------------

    async def _follow_meter(self, transport: Transport, meter: MeterAdapter) -> None:
        async for reading in meter.readings():
            self._after_restart(reading)
            step = self.controller.on_reading(reading)
            if step is None:
                continue
            self.meter_ok += 1
            await meter.command(step.set_points, reading.ts)
            if step.settled is not None:  # journaled before the next interval's first reading, so a
                self._settled(step.settled)  # crash between the two never leaves it unsettled
            self._journal_step(step)
            await self._note_switch(transport, step.choice, wait=False)
            self._send_telemetry(reading, step)

    _restarted = False  # an interval was resumed from the journal, and no reading has come since

    def _after_restart(self, r: MeterReading) -> None:
        """The first reading after a restart counts its own step only, like a fresh agent's first
        reading: the readings the meter gave while the agent was not running are missing from the
        interval's coverage (its settlement's `covered_s` shows it), not estimated from this one."""
        ctl = self.controller
        if not self._restarted or ctl.last_ts is None or r.ts <= ctl.last_ts:
            return  # nothing resumed, or a repeated reading (the controller drops it)
        self._restarted = False
        ctl.last_ts = max(ctl.last_ts, r.ts - timedelta(seconds=ctl.nominal_step_s))

    def _journal_step(self, step: CtlStep) -> None:
        e = self.controller.energy
        if self.journal is None or e is None:
            return
        plan = step.plan
        k = None if plan is None else plan.index(e.start)
        scheduled = None if plan is None or k is None else plan.scheduled_kwh(k)
        c = step.choice
        state = {"flex_used_kwh": repr(self.controller.flex_used_kwh)}
        self.journal.save_interval(e, scheduled, c.kind, c.lo_kw, c.up_kw, state)

    def _settled(self, done: CtlSettled) -> None:
        """Queued to send first, then journaled as settled: a crash between the two leaves the
        interval unsettled in the journal, so the restart settles it again (a repeat the coordinator
        replaces), never a settlement journaled but never sent."""
        s, e = done.settlement, done.energy
        choice = done.choice
        record = SettlementRecord(
            site=self.site,
            interval_start=s.interval_start,
            duration_s=self.controller.dt_s,
            round=done.round,
            measured_kwh=s.measured_kwh,
            scheduled_kwh=s.scheduled_kwh,
            deviation_kwh=s.deviation_kwh,
            p2p_paid_eur=s.p2p_paid_eur,
            p2p_received_eur=s.p2p_received_eur,
            grid_kwh=s.grid_kwh,
            grid_eur=s.grid_eur,
            net_eur=s.net_eur,
            readings=e.readings,
            covered_s=e.covered_s,
            envelope="none" if choice is None else choice.kind,
            lo_kw=None if choice is None else choice.lo_kw,
            up_kw=None if choice is None else choice.up_kw,
        )
        log.info(
            "%s: settled %s: %.2f kWh measured, %.2f scheduled, %.2f EUR",
            self.site, s.interval_start.isoformat(), s.measured_kwh, s.scheduled_kwh, s.net_eur,
        )  # fmt: skip
        if self._outbox is not None:
            self._outbox.durable(topics.site(self.site, "settlement"), record.model_dump_json().encode())
        if self.journal is not None:
            plan = self.controller.plan_at(e.start)
            k = None if plan is None else plan.index(e.start)
            if plan is not None and k is not None:
                self.journal.save_trades(plan.round, e.start, plan.trades(k))
            self.journal.save_settlement(s)

    def _send_telemetry(self, r: MeterReading, step: CtlStep) -> None:
        if self._outbox is None:
            return
        j, comp = step.judged, step.compliance
        msg = Telemetry(
            site=self.site,
            ts=r.ts,
            source="meter",
            p_kw=r.p_kw,
            envelope=j.kind,
            lo_kw=j.lo_kw,
            up_kw=j.up_kw,
            inside=step.excess_kw == 0.0,
            round=None if step.plan is None else step.plan.round,
            excess_kw=step.excess_kw,
            actions=[a.lever for a in comp.actions],
            predicted_kw=comp.predicted_kw,
            residual_kw=comp.residual_kw,
            soc_kwh=r.soc_kwh,
        )
        self._outbox.telemetry(topics.site(self.site, "telemetry"), msg.model_dump_json().encode())


def fixed_default(config: SiteConfig) -> Box:
    """The local safety net when no default was ever heard: no export, and import up to the site's
    largest preferred consumption (so it can keep its loads, not charge its battery from the grid)."""
    c = config.community
    peak = max(f + x for f, x in zip(c.fixed_load_kw, c.flexible_load.preferred_kw, strict=True))
    return Box(-float(peak), 0.0)
