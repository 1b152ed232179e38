"""The edge agent as an asyncio service: one community's side of the agreement over MQTT.

It registers (retained: bus, peers, technical and reactive ranges; never costs or profiles), marks
itself online (retained status; its last will marks it offline), takes part in every round that
includes it, trading only with the peers that round includes, and reports its settled schedule when
the round ends. It keeps the envelopes the coordinator publishes for it and says which one applies.
Solves run in a worker thread, so the MQTT keep-alive never starves.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from p2pdoe.analysis.admm import solve_times
from p2pdoe.analysis.results import Tariffs, community_result, purchases
from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.outcome import agreed_schedule, agreed_z
from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.messages import Proposal, RoundOpen, encode
from p2pdoe.core.schemas.runtime import Doe, SiteReport, SiteStatus, Telemetry, decode_runtime
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import community_data, registration, site_qp, with_peers
from p2pdoe.core.solution import Policy
from p2pdoe.services.agreement_mqtt import MarketReader, Message, topic_of
from p2pdoe.services.transport import InboundMessage, LastWill, Transport

log = logging.getLogger("edge_agent")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def status_payload(site: str, state: str, envelope: str) -> bytes:
    msg = SiteStatus(site=site, state=state, envelope=envelope, ts=utc_now())  # type: ignore[arg-type]
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

    def __init__(self, config: SiteConfig, clock: Clock = utc_now):
        self.config = config
        self.site = config.community.id
        self.clock = clock
        self.reader = MarketReader(self.site)
        self.settled: list[Settled] = []
        self.envelopes: dict[str, Doe] = {}  # the latest on "doe" and on "doe/default"
        self.applied = "none"  # which envelope applies: dynamic, default or none
        self._round: _Round | None = None
        self._over: set[str] = set()  # rounds finished, superseded or not ours
        self._early: list[Message] = []

    async def run(self, transport: Transport, rounds: int = 0, report_every_s: float = 10.0) -> list[Settled]:
        """Serve until the transport closes, or until `rounds` rounds are settled (0: no limit)."""
        await self._subscribe(transport)
        reg = registration(self.config).model_dump_json().encode()
        await transport.publish_state(topics.site(self.site, "register"), reg)
        await self._publish_status(transport)
        log.info("%s: registered at bus %d; waiting for a round", self.site, self.config.community.bus)
        ticker = asyncio.create_task(self._tick(transport, report_every_s))
        try:
            async for m in transport.messages():
                await self._on_message(transport, m)
                if rounds and len(self.settled) >= rounds:
                    break
        finally:
            ticker.cancel()
        return self.settled

    async def _subscribe(self, transport: Transport) -> None:
        await transport.subscribe(topics.round_open("+"))
        await transport.subscribe(topics.grant("+"))
        for peer in self.config.peers:
            await transport.subscribe(topics.proposal("+", peer.id))
        await transport.subscribe(topics.site(self.site, "doe"))
        await transport.subscribe(topics.site(self.site, "doe/default"))

    async def _on_message(self, transport: Transport, m: InboundMessage) -> None:
        parsed = topics.parse(m.topic)
        if parsed is not None and parsed.area == "site":
            await self._on_envelope(transport, parsed.kind, m.payload)
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
        config = with_peers(self.config, set(msg.sites))
        qp = await asyncio.to_thread(site_qp, config, Policy(msg.policy))
        peer_ids = tuple(p.id for p in config.peers)
        participant = CommunityParticipant(self.site, peer_ids, qp, config.dt_h)
        r = _Round(
            msg.round,
            datetime.fromisoformat(msg.start.replace("Z", "+00:00")).astimezone(UTC),
            config,
            qp,
            participant,
        )
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
        report = self.report(r, out)
        x = np.array(report.community.net_injection_kw)  # computed once, for the report
        self.settled.append(Settled(r.id, r.start, out, x))
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
        await self._publish_telemetry(transport)

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

    # --- envelopes -------------------------------------------------------------------------------

    async def _on_envelope(self, transport: Transport, kind: str, payload: bytes) -> None:
        if not payload:
            self.envelopes.pop(kind, None)  # a retained envelope withdrawn
        else:
            try:
                doe = decode_runtime(payload)
            except ValueError:
                self.reader.dropped["malformed"] += 1
                return
            if (
                not isinstance(doe, Doe)
                or doe.site != self.site
                or (kind == "doe/default") != (doe.round is None)
            ):
                self.reader.dropped["sender_not_topic"] += 1
                return
            self.envelopes[kind] = doe
            log.info(
                "%s: %s [%.1f, %.1f] kW from %s", self.site, kind, doe.lo_kw, doe.up_kw, doe.start.isoformat()
            )
        await self._report_state(transport)

    async def _report_state(self, transport: Transport) -> None:
        """Which envelope applies now (status, on a change) and the telemetry."""
        applied = self.envelope_in_force()
        kind_now = "none" if applied is None else ("default" if applied.round is None else "dynamic")
        if kind_now != self.applied:
            log.info("%s: the %s envelope applies (was %s)", self.site, kind_now, self.applied)
            self.applied = kind_now
            await self._publish_status(transport)
        await self._publish_telemetry(transport)

    async def _tick(self, transport: Transport, every_s: float) -> None:
        """Envelopes expire as time passes: re-check which applies, and report, every `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            await self._report_state(transport)

    def envelope_in_force(self) -> Doe | None:
        """The dynamic envelope if valid now, else the default if valid now, else None: an envelope
        past its validity is never applied."""
        now = self.clock()
        for kind in ("doe", "doe/default"):
            doe = self.envelopes.get(kind)
            if doe is not None and doe.valid_at(now):
                return doe
        return None

    async def _publish_status(self, transport: Transport) -> None:
        payload = status_payload(self.site, "online", self.applied)
        await transport.publish_state(topics.site(self.site, "status"), payload)

    async def _publish_telemetry(self, transport: Transport) -> None:
        """The scheduled net injection in the interval of the envelope in force (a meter takes over
        with the real-time runtime)."""
        doe = self.envelope_in_force()
        p_kw = self._scheduled_at(doe.start if doe is not None else self.clock())
        if p_kw is None:
            return
        msg = Telemetry(
            site=self.site,
            ts=self.clock(),
            source="schedule",
            p_kw=p_kw,
            envelope=self.applied,  # type: ignore[arg-type]
            lo_kw=None if doe is None else doe.lo_kw,
            up_kw=None if doe is None else doe.up_kw,
            inside=None if doe is None else bool(doe.lo_kw - 1e-6 <= p_kw <= doe.up_kw + 1e-6),
            round=self.settled[-1].round if self.settled else None,
        )
        await transport.publish(topics.site(self.site, "telemetry"), msg.model_dump_json().encode(), qos=0)

    def _scheduled_at(self, moment: datetime) -> float | None:
        if not self.settled:
            return None
        last = self.settled[-1]
        x = last.net_injection_kw
        t = int((moment - last.start).total_seconds() // (self.config.dt_h * 3600))
        return float(x[t]) if 0 <= t < x.shape[0] else None
