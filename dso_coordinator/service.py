"""The DSO coordinator as an asyncio service: registers sites, runs the round over MQTT with
deadlines, publishes envelopes, defaults and progress, and gathers the sites' reports.

Sites that have not registered by the registration deadline are left out, and so is a site that
misses an iteration's deadline: the round is then opened again without it (a site that comes back
online rejoins at the next opening). A site left out is on its default envelope, which the others'
grants take into account. Solves run in a worker thread, so the MQTT keep-alive never starves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from dso_coordinator.settings import CoordinatorSettings
from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import (
    Defaults,
    RoundSetup,
    default_envelopes,
    feeder_of,
    registration_problem,
    round_setup,
)
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.agreement.protocol import Finished, Publish, Received
from p2pdoe.core.realtime.clock import SimClock, day_start
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.messages import DSO_ID, Grant, Proposal, encode
from p2pdoe.core.schemas.results import Attempt, FallbackEvent
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    Progress,
    Registration,
    SettlementRecord,
    SiteReport,
    SiteStatus,
)
from p2pdoe.errors import P2PDoeError
from p2pdoe.services.agreement_mqtt import MarketReader, topic_of
from p2pdoe.services.transport import InboundMessage, LastWill, Transport

log = logging.getLogger("dso_coordinator")


class RoundFailedError(P2PDoeError):
    """No round could be agreed (no site registered, or every attempt lost a site)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def dso_status(state: str, round_id: str | None, ts: datetime | None = None) -> bytes:
    msg = DsoStatus(state=state, round=round_id, ts=ts or utc_now())  # type: ignore[arg-type]
    return msg.model_dump_json().encode()


def offline_will() -> LastWill:
    return LastWill(topics.DSO_STATUS, dso_status("offline", None))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Timings:
    registration_wait_s: float = 0.0
    round_wall_s: float = 0.0
    iteration_wall_s: list[float] = field(default_factory=list)
    dso_step_s: list[float] = field(default_factory=list)
    proposals: int = 0
    proposal_bytes: int = 0
    grant_bytes: int = 0


@dataclass(frozen=True)
class Agreement:
    """The coordinator's account of the day-ahead agreement."""

    setup: RoundSetup
    outcome: DsoOutcome
    attempts: list[Attempt]
    excluded: dict[str, str]  # site -> why
    registrations: dict[str, Registration]
    reports: dict[str, SiteReport]
    timings: Timings
    dropped: dict[str, int]
    protocol: str


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, settings: CoordinatorSettings, clock: SimClock | None = None):
        self.settings = settings
        wall = utc_now()
        self.clock = clock or SimClock(wall, wall, 1.0)
        policy = settings.policy or cfg.policy
        start = day_start(settings.start, cfg.start, cfg.dt_h, self.now())
        self.start = start
        self.cfg = cfg.model_copy(update={"policy": policy, "start": iso(start)})
        self.feeder = feeder_of(cfg.feeder)
        self.defaults: Defaults = default_envelopes(self.cfg, self.feeder)
        self.site_ids = [s.id for s in cfg.sites]
        self.registrations: dict[str, Registration] = {}
        self.online: set[str] = set()
        self.excluded: dict[str, str] = {}
        self.reasons: dict[str, str] = {}  # why each site was last left out, kept once it is back
        self.reader = MarketReader(DSO_ID)
        self.reports: dict[str, SiteReport] = {}
        self.timings = Timings()
        self._changed = asyncio.Event()
        self._proposals: asyncio.Queue[Proposal] = asyncio.Queue()
        self._round: str | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self.observer = ViolationObserver()
        self.metering = MeterIntegral(start, self.interval_s, settings.meter_step_s)
        self.settlements: dict[tuple[str, datetime], SettlementRecord] = {}
        self.fallback_events: list[FallbackEvent] = []
        self._site_envelope: dict[str, str] = {}

    def now(self) -> datetime:
        """Simulated time on the shared clock (wall time at speed 1)."""
        return self.clock.sim_at(utc_now())

    def status(self, state: str, round_id: str | None) -> bytes:
        return dso_status(state, round_id, self.now())

    # --- the service -----------------------------------------------------------------------------

    async def go_online(self, transport: Transport) -> None:
        """Online, the defaults out, and reading the broker (until `stop`)."""
        await transport.publish_state(topics.DSO_STATUS, self.status("online", None))
        await self._publish_defaults(transport)
        for kind in ("register", "status", "settlement", "doe", "doe/default"):
            await transport.subscribe(topics.every_site(kind))
        await transport.subscribe(topics.every_site("meter"), qos=0)
        await transport.subscribe(topics.all_proposals())
        await transport.subscribe(topics.all_reports())
        self._pump_task = asyncio.create_task(self._pump(transport))

    async def await_sites_briefly(self) -> None:
        """A coordinator (re)started mid-day hears the sites (their registrations and statuses are
        retained) for at most half an interval, so its first rolling round can include them."""
        half = self.clock.wall_seconds(self.interval_s / 2)
        await self._await_sites(min(self.settings.registration_timeout_s, half), required=False)

    async def run(self, transport: Transport) -> Agreement:
        await self.go_online(transport)
        try:
            await self._await_sites()
            setup, outcome, attempts = await self._agree(transport)
            await self._publish_envelopes(transport, setup, outcome)
            await self._await_reports(setup)
        except BaseException:
            self.stop()
            raise
        if not self.settings.rolling:  # the market is over
            await transport.unsubscribe(topics.all_proposals())
            await transport.unsubscribe(topics.all_reports())
        protocol = str(getattr(transport, "protocol", "unknown"))
        return Agreement(
            setup,
            outcome,
            attempts,
            {  # a site back online too late for the last opening keeps the reason it was left out
                s: self.excluded.get(s) or self.reasons.get(s, "not online when the round was opened")
                for s in self.site_ids
                if s not in setup.sites
            },
            dict(self.registrations),
            dict(self.reports),
            self.timings,
            dict(self.reader.dropped),
            protocol,
        )

    def stop(self) -> None:
        """Stop reading the broker (statuses and registrations are followed until then)."""
        if self._pump_task is not None:
            self._pump_task.cancel()

    async def _pump(self, transport: Transport) -> None:
        async for m in transport.messages():
            parsed = topics.parse(m.topic)
            if parsed is None:
                continue
            if parsed.area == "site" and parsed.kind in ("register", "status"):
                self._on_site(parsed.kind, parsed.site, m)
            elif parsed.area == "site" and parsed.kind in ("meter", "settlement", "doe", "doe/default"):
                self._on_realtime(parsed.kind, parsed.site, m)
            elif parsed.area == "market" and parsed.kind == "report":
                self._on_report(parsed.site, parsed.round, m)
            elif parsed.area == "market" and parsed.kind == "proposal":
                self._on_proposal(m)

    def _on_site(self, kind: str, site: str | None, m: InboundMessage) -> None:
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return
        if not isinstance(msg, Registration | SiteStatus) or msg.site != site:
            self.reader.dropped["sender_not_topic"] += 1
            return
        if isinstance(msg, SiteStatus):
            self._note_envelope(msg)
        if isinstance(msg, Registration):
            problem = registration_problem(self.cfg, msg)
            if problem is not None:
                log.warning("refused the registration of %s: %s", msg.site, problem)
                self.reader.dropped["registration_refused"] += 1
                return
            self.registrations[msg.site] = msg
        elif msg.state == "online" and not m.retained:
            self.online.add(msg.site)
            if self.excluded.pop(msg.site, None) is not None:
                log.info("%s is back online; it rejoins at the next opening", msg.site)
        elif msg.state == "online":
            self.online.add(msg.site)
        else:
            self.online.discard(msg.site)
        self._changed.set()

    def _on_realtime(self, kind: str, site: str | None, m: InboundMessage) -> None:
        """Meter readings and envelopes (for its own violation count and meter integral, from the
        broker alone), and the sites' settlements."""
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return
        if getattr(msg, "site", None) != site:
            self.reader.dropped["sender_not_topic"] += 1
            return
        if isinstance(msg, MeterReading):
            self.observer.reading(msg)
            self.metering.add(msg)
        elif isinstance(msg, Doe):
            self.observer.envelope(kind, msg)
        elif isinstance(msg, SettlementRecord):
            self.settlements[(msg.site, msg.interval_start)] = msg  # a redelivery replaces itself

    def _note_envelope(self, msg: SiteStatus) -> None:
        """A site's switch of envelope (dynamic, default, fixed default), as its status says."""
        if msg.state != "online" or self._site_envelope.get(msg.site) == msg.envelope:
            return
        self._site_envelope[msg.site] = msg.envelope
        self.fallback_events.append(
            FallbackEvent(
                site=msg.site, ts=iso(msg.ts), envelope=msg.envelope, reason=msg.reason, alarm=msg.alarm
            )
        )

    def _on_report(self, site: str | None, round_id: str | None, m: InboundMessage) -> None:
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return
        if not isinstance(msg, SiteReport) or msg.site != site or msg.round != round_id:
            self.reader.dropped["sender_not_topic"] += 1
            return
        self.reports[msg.site] = msg
        self._changed.set()

    def _on_proposal(self, m: InboundMessage) -> None:
        message = self.reader.decoded(m)
        if isinstance(message, Proposal) and message.round == self._round:
            self.timings.proposals += 1
            self.timings.proposal_bytes += len(m.payload)
            self._proposals.put_nowait(message)

    # --- registration ----------------------------------------------------------------------------

    def _ready(self) -> set[str]:
        return {s for s in self.site_ids if s in self.registrations and s in self.online}

    async def _await_sites(self, timeout_s: float | None = None, required: bool = True) -> None:
        t0 = time.perf_counter()
        wait_s = self.settings.registration_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + wait_s
        while len(self._ready()) < len(self.site_ids):
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        self.timings.registration_wait_s = time.perf_counter() - t0
        why = "not registered and online by the registration deadline"
        for site in self.site_ids:
            if site not in self._ready():
                self.excluded[site] = self.reasons[site] = why
                log.warning("%s: not registered and online in time; on its default envelope", site)
        if required and not self._ready():
            raise RoundFailedError("no site registered before the registration deadline")

    # --- the round -------------------------------------------------------------------------------

    async def _agree(self, transport: Transport) -> tuple[RoundSetup, DsoOutcome, list[Attempt]]:
        attempts: list[Attempt] = []
        for n in range(1, self.settings.max_attempts + 1):
            round_id = self.settings.round if n == 1 else f"{self.settings.round}.{n}"
            left_out = set(self.excluded) | (set(self.site_ids) - self._ready())
            if len(left_out) == len(self.site_ids):
                break
            setup = await asyncio.to_thread(
                round_setup, self.cfg, self.feeder, self.registrations, left_out, self.defaults, round_id
            )
            outcome, missing = await self._run_round(transport, setup)
            await transport.publish(topics.round_open(round_id), b"", retain=True)  # withdraw the opening
            status = "deadline_missed" if outcome is None else outcome.status
            iterations = setup.dso.iteration if outcome is None else outcome.iterations
            attempts.append(
                Attempt(
                    round=round_id,
                    sites=list(setup.sites),
                    status=status,
                    iterations=iterations,
                    missed_deadline=list(missing),
                )
            )
            if outcome is not None:
                return setup, outcome, attempts
            for site in missing:
                why = f"missed the deadline of iteration {iterations} of round {round_id}"
                self.excluded[site] = self.reasons[site] = why
                log.warning(
                    "%s: no proposal within %.1f s; round %s is opened again without it",
                    site,
                    self.settings.iteration_timeout_s,
                    round_id,
                )
        raise RoundFailedError(f"no agreement after {len(attempts)} attempts: {[a.status for a in attempts]}")

    async def _run_round(
        self, transport: Transport, setup: RoundSetup, stop_at: float | None = None
    ) -> tuple[DsoOutcome | None, tuple[str, ...]]:
        """Run one opening to its end. `stop_at` (time.perf_counter): ask the round to end at the
        next iteration once it passes (a rolling round's deadline)."""
        dso = setup.dso
        self._round = dso.plan.round
        while not self._proposals.empty():
            self._proposals.get_nowait()
        await transport.publish_state(topics.DSO_STATUS, self.status("online", dso.plan.round))
        t_round = time.perf_counter()
        opening = await asyncio.to_thread(dso.open_round)
        for cmd in opening:
            if isinstance(cmd, Publish):
                await transport.publish(topic_of(cmd.message), encode(cmd.message), retain=True)
        log.info(
            "round %s opened: %d sites, %d on defaults", dso.plan.round, len(setup.sites), len(setup.excluded)
        )
        t_iter = time.perf_counter()
        while True:
            timeout = self.settings.iteration_timeout_s - (time.perf_counter() - t_iter)
            if stop_at is not None:
                timeout = min(timeout, max(stop_at - time.perf_counter(), 0.0))
            try:
                proposal = await asyncio.wait_for(self._proposals.get(), timeout)
            except TimeoutError:
                if stop_at is not None and time.perf_counter() >= stop_at:
                    dso.stop_at_next_iteration()
                    stop_at = None
                    continue
                return None, dso.waiting_for()
            t0 = time.perf_counter()
            if dso.may_step(proposal):
                commands = await asyncio.to_thread(dso.handle, Received(proposal))
            else:  # parsed on arrival in microseconds, no worker thread needed
                commands = dso.handle(Received(proposal))
            for cmd in commands:
                if isinstance(cmd, Publish) and isinstance(cmd.message, Grant):
                    self.timings.dso_step_s.append(time.perf_counter() - t0)
                    payload = encode(cmd.message)
                    self.timings.grant_bytes += len(payload)
                    await transport.publish(topic_of(cmd.message), payload)
                    await self._publish_progress(transport, setup, cmd.message)
                    now = time.perf_counter()
                    self.timings.iteration_wall_s.append(now - t_iter)
                    t_iter = now
                elif isinstance(cmd, Finished):
                    assert isinstance(cmd.outcome, DsoOutcome)
                    self.timings.round_wall_s = time.perf_counter() - t_round
                    return cmd.outcome, ()

    async def _publish_progress(self, transport: Transport, setup: RoundSetup, grant: Grant) -> None:
        last = setup.dso.last_record
        eps_t = 0.0 if last is None else last.trade.eps_primal_kw
        eps_e = 0.0 if last is None else last.envelope.eps_primal_kw
        msg = Progress(
            round=grant.round,
            iteration=grant.iteration,
            status=grant.status,
            primal_trade_kw=grant.residuals.primal_trade_kw,
            dual_trade_kw=grant.residuals.dual_trade_kw,
            primal_envelope_kw=grant.residuals.primal_envelope_kw,
            dual_envelope_kw=grant.residuals.dual_envelope_kw,
            eps_trade_kw=eps_t,
            eps_envelope_kw=eps_e,
            sites=list(setup.sites),
            excluded_sites=list(setup.excluded),
        )
        await transport.publish(topics.DSO_PROGRESS, msg.model_dump_json().encode(), qos=0, retain=True)

    async def _await_reports(self, setup: RoundSetup) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.report_timeout_s
        while not set(setup.sites) <= set(self.reports):
            self._changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning("no report from %s", sorted(set(setup.sites) - set(self.reports)))
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    # --- envelopes -------------------------------------------------------------------------------

    @property
    def interval_s(self) -> int:
        return round(self.cfg.dt_h * 3600)

    def _expiry(self, end: datetime) -> int | None:
        """The broker's message expiry (wall seconds) for an envelope valid until `end` (simulated)."""
        left = (self.clock.wall_at(end) - utc_now()).total_seconds()
        return int(np.ceil(left)) if left >= 1 else None

    async def _publish_doe(self, transport: Transport, kind: str, doe: Doe) -> None:
        """Retained, re-published after a reconnect, expiring at the end of its validity."""
        payload = doe.model_dump_json().encode()
        await transport.publish_state(topics.site(doe.site, kind), payload, expiry_s=self._expiry(doe.end))

    def default_envelope(self, site: str, start: datetime, duration_s: int) -> Doe:
        c = self.defaults.sites.index(site)
        lo, up = float(self.defaults.lo_kw[c]), float(self.defaults.up_kw[c])
        return Doe.from_box(site, None, start, duration_s, lo, up)

    async def _publish_defaults(self, transport: Transport) -> None:
        duration = self.interval_s * self.cfg.intervals
        for site in self.defaults.sites:
            await self._publish_doe(
                transport, "doe/default", self.default_envelope(site, self.start, duration)
            )

    def envelope(
        self, setup: RoundSetup, outcome: DsoOutcome, site: str, t: int, column: int | None = None
    ) -> Doe:
        """The envelope of `site` for interval t of the day: its grant (column `column` of the
        round's horizon, t by default), or its default if the round left it out."""
        start = self.start + timedelta(seconds=self.interval_s * t)
        k = t if column is None else column
        if site in setup.sites and outcome.granted_lo_kw is not None and outcome.granted_up_kw is not None:
            c = setup.sites.index(site)
            lo, up = float(outcome.granted_lo_kw[c, k]), float(outcome.granted_up_kw[c, k])
            return Doe.from_box(site, outcome.round, start, self.interval_s, lo, up)
        return self.default_envelope(site, start, self.interval_s)

    def current_interval(self) -> int:
        """The interval in force now, clamped to the horizon."""
        t = int((self.now() - self.start).total_seconds() // self.interval_s)
        return min(max(t, 0), self.cfg.intervals - 1)

    async def _publish_envelopes(self, transport: Transport, setup: RoundSetup, outcome: DsoOutcome) -> None:
        t = self.current_interval()
        for site in self.site_ids:
            await self._publish_doe(transport, "doe", self.envelope(setup, outcome, site, t))

    async def follow_day(self, transport: Transport, agreement: Agreement) -> None:
        """Publish each interval's envelope as the interval starts, until the horizon ends."""
        for t in range(self.current_interval() + 1, self.cfg.intervals):
            due = self.clock.wall_at(self.start + timedelta(seconds=self.interval_s * t))
            await asyncio.sleep(max(0.0, (due - utc_now()).total_seconds()))
            for site in self.site_ids:
                await self._publish_doe(
                    transport, "doe", self.envelope(agreement.setup, agreement.outcome, site, t)
                )
