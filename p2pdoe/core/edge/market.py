"""An edge agent's part in the rounds, a pure machine: one `CommunityParticipant` per round.

A round that includes the site is opened with the partners it includes, over its horizon: a round
over the whole day sets the day's start; a shorter one (a rolling round) covers the rest of the day,
from the site's measured state (p2pdoe.core.site.remaining_config) taken from a snapshot of its
real-time controller. Messages of a round whose opening has not arrived yet are kept (a few); a
round that leaves the site out is logged (its default envelope applies). When the participant
finishes, the machine hands back `RoundDone`: the shell reports it and the real-time machine
follows its plan, if the round is in force (a `trial` round, standalone, coalition or bid trial,
only measures costs: its envelopes are never published). The site bids the sale markup its opening
names for it (the noncooperative design's bid profiles). Under Nash bargaining a
payment round follows (`handle_payment`): the site's gain comes from its own costs in the
standalone and welfare rounds (`cost_of_round`), which it keeps.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

import numpy as np

from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant, agreed_schedule
from p2pdoe.core.agreement.payments import PaymentOutcome, PaymentParty
from p2pdoe.core.agreement.payments import Publish as PublishPayment
from p2pdoe.core.agreement.protocol import Finished, Publish, Received
from p2pdoe.core.calendar import utc_moment
from p2pdoe.core.community import CommunityQP, within_ranges
from p2pdoe.core.cpu import CpuClocks, CpuParts
from p2pdoe.core.day_configs import daily_calendar, site_config_on
from p2pdoe.core.edge.commands import DayStarts, SettlementsAgain
from p2pdoe.core.edge.forecast import forecast_problem, with_forecast
from p2pdoe.core.effects import Heard, Send, Subscribe, Unsubscribe
from p2pdoe.core.market import envelope_bounds
from p2pdoe.core.network import FloatArray
from p2pdoe.core.reader import MarketReader, Message, payment_topic_of, topic_of
from p2pdoe.core.realtime.controller import Controller, Plan, plan_from
from p2pdoe.core.schemas.messages import Proposal, RoundOpen, encode, ranges_digest
from p2pdoe.core.schemas.payments import PaymentMessage, PaymentOpen, encode_payment
from p2pdoe.core.schemas.runtime import MAX_DAYS_REGISTERED, Registration, SiteForecast
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import Recent, day_ranges, registration, remaining_config, site_qp, with_peers
from p2pdoe.core.solution import Policy

log = logging.getLogger("edge_agent")
REGISTRATIONS_KEPT = 8
COSTS_KEPT = 8  # rounds whose costs a payment round may name


@dataclass
class RoundState:
    id: str
    epoch: str | None  # the coordinator's run that opened it
    start: datetime  # of the round's first interval
    config: SiteConfig  # with only the peers this round includes
    qp: CommunityQP
    participant: CommunityParticipant
    cpu_at_open: float
    in_force: bool = True  # False for a trial round: its envelopes are never published
    steps: list[float] = field(default_factory=list)  # seconds per solve-and-propose
    parts_at_open: CpuParts = field(default_factory=CpuParts)  # the market's, at the opening


@dataclass(frozen=True)
class RoundDone:
    round: RoundState
    outcome: CommunityOutcome
    plan: Plan | None  # what the controller follows; None for a round not in force


Command = Send | RoundDone | DayStarts | SettlementsAgain | Subscribe | Unsubscribe


def _trading_with(site: str, msg: RoundOpen) -> set[str]:
    """The sites `site` may trade with in the round: every one, or the coalition's if it is in it."""
    if msg.traders is None:
        return set(msg.sites)
    return set(msg.traders) if site in msg.traders else set()


class EdgeMarket:
    """`stopwatch` and `cpu` measure (solve times, CPU per round and its parts) and decide nothing."""

    def __init__(
        self,
        config: SiteConfig,
        margins: tuple[float, float] | None,
        stopwatch: Callable[[], float],
        cpu: CpuClocks,
    ):
        self.config = config
        self.site = config.community.id
        self.margins = margins  # kept inside envelopes (real time; p2pdoe.core.community.envelope_margins)
        self.stopwatch = stopwatch
        self.cpu = cpu
        self.cpu_parts = CpuParts()
        self.reader = MarketReader(self.site)
        self.rounds: dict[str, RoundState] = {}  # under way: at most one per day (today's, tomorrow's)
        self._latest: str | None = None
        self.settled = 0
        self._over: set[tuple[str, str | None]] = set()  # (round, epoch): finished, superseded, not ours
        self.epoch: str | None = None  # the coordinator run that opened the latest round heard
        self._early: list[Message] = []
        self._hears_peers = True  # subscribed to the peers' proposals (a relayed round needs none)
        self.forecasts: dict[date | None, SiteForecast] = {}  # the newest per day, for its next rounds
        self.calendar = daily_calendar(config)  # None: its own horizon only, whatever the date
        self.own_start = utc_moment(config.start)
        # what this run registered with forecasts (the newest last): a round meets the one it names
        self.registered: deque[Registration] = deque(maxlen=REGISTRATIONS_KEPT)
        # per finished round: its cost and what it paid peers for energy (EUR), private
        self.costs: dict[str, tuple[float, float]] = {}
        self.payments: dict[str, PaymentParty] = {}  # payment rounds under way or over

    def cost_of_round(self, round_id: str, cost_eur: float, p2p_net_eur: float) -> None:
        """Its cost in a finished round (from its report), for a payment round that names it."""
        self.costs[round_id] = (cost_eur, p2p_net_eur)
        for old in list(self.costs)[:-COSTS_KEPT]:
            del self.costs[old]

    def handle_payment(self, msg: PaymentMessage) -> list[Command]:
        """A payment round's message: an opening starts this site's party with its own gain,
        C0 - C* from its costs in the two rounds the opening names; the party's proposals go out."""
        party = self.payments.get(msg.round)
        if isinstance(msg, PaymentOpen) and party is None:
            party = self._payment_party(msg)
            if party is None:
                return []
            return self._payment_commands(party, party.start())
        if party is None:
            return []
        return self._payment_commands(party, party.handle(msg))

    def _payment_party(self, msg: PaymentOpen) -> PaymentParty | None:
        if self.site not in msg.weights:
            log.info("%s: left out of payment round %s", self.site, msg.round)
            return None
        alone, welfare = self.costs.get(msg.baseline_round), self.costs.get(msg.agreement_round)
        if alone is None or welfare is None:
            log.warning("%s: payment round %s names rounds it has no cost of (%s, %s)",
                        self.site, msg.round, msg.baseline_round, msg.agreement_round)  # fmt: skip
            return None
        gain = alone[0] - (welfare[0] - welfare[1])
        log.info("%s: payment round %s opened over %d links", self.site, msg.round,
                 sum(self.site in (x.payer, x.payee) for x in msg.links))  # fmt: skip
        party = self.payments[msg.round] = PaymentParty(self.site, msg, gain)
        for old in list(self.payments)[:-COSTS_KEPT]:
            del self.payments[old]
        return party

    def _payment_commands(self, party: PaymentParty, commands: Sequence[object]) -> list[Command]:
        out: list[Command] = []
        for cmd in commands:
            if isinstance(cmd, PublishPayment):
                out.append(Send(payment_topic_of(cmd.message), encode_payment(cmd.message)))
            elif isinstance(cmd, PaymentOutcome):
                log.info("%s: payment round %s %s after %d iterations: it pays its peers %.2f EUR in all, "
                         "its gain after payments %.2f EUR", self.site, cmd.round, cmd.status, cmd.iterations,
                         cmd.net_payment_eur, party.gain_eur - cmd.net_payment_eur)  # fmt: skip
        return out

    def feed_forecast(self, f: SiteForecast) -> list[Command]:
        """Keep `f` for the next rounds of each day it reaches (up to `MAX_DAYS_REGISTERED` days, the
        earliest dropped first) and register the ranges it gives them; a day keeps a forecast issued
        later. One that cannot be this site's is dropped, counted and logged; either way, nothing."""
        why = forecast_problem(self._date_config(f.start), f)
        if why is not None:
            self.reader.dropped["implausible"] += 1
            log.warning("%s: dropped a forecast issued %s: %s", self.site, f.issued.isoformat(), why)
            return []
        days = [
            d for d in self._days_of(f) if d not in self.forecasts or self.forecasts[d].issued <= f.issued
        ]
        if not days:
            log.info("%s: dropped a forecast issued %s, older than the one kept", self.site, f.issued)
            return []
        for d in days:
            self.forecasts[d] = f
        for d in sorted(self.forecasts, key=str)[:-MAX_DAYS_REGISTERED]:
            del self.forecasts[d]
        reg = self.registration()
        self.registered.append(reg)
        dates = ", ".join(d.start.isoformat() for d in reg.days) or "its configured day"
        log.info("%s: registered the ranges of its forecasts for %s", self.site, dates)
        return [Send(topics.site(self.site, "register"), reg.model_dump_json().encode(), state=True)]

    def _days_of(self, f: SiteForecast) -> Sequence[date | None]:
        """The days `f` reaches (None: the configured horizon, without whole days)."""
        cal = self.calendar
        if cal is None:
            return [None]
        first, last = cal.day_of(f.start), cal.day_of(f.start + timedelta(seconds=f.steps * f.step_s - 1))
        return [first + timedelta(days=k) for k in range((last - first).days + 1)][:MAX_DAYS_REGISTERED]

    def registration(self) -> Registration:
        """What the site registers: its configured day's ranges, and with forecasts, those of each day
        they reach (its configured day's own when it has no whole days)."""
        cal = self.calendar
        if not self.forecasts:
            return registration(self.config)
        if cal is None:
            return registration(with_forecast(self.config, self.forecasts[None])[0])
        days = [
            day_ranges(with_forecast(self._date_config(cal.start(d)), f)[0])
            for d, f in sorted(self.forecasts.items(), key=lambda kv: str(kv[0]))
            if d is not None
        ]
        return registration(self.config).model_copy(update={"days": days})

    def read(self, m: Heard) -> Message | None:
        """The message strictly decoded, or None (dropped and counted)."""
        c0 = self.cpu.thread()
        msg = self.reader.decoded(m)
        self.cpu_parts.codec_s += self.cpu.thread() - c0
        return msg

    @property
    def round(self) -> RoundState | None:
        """The round opened last, if it is still under way."""
        return None if self._latest is None else self.rounds.get(self._latest)

    def heavy(self, msg: Message) -> bool:
        """Whether handling `msg` may solve (an opening, or the message completing an iteration)."""
        r = self.rounds.get(msg.round)
        if isinstance(msg, RoundOpen):
            return True
        return r is not None and r.participant.may_solve(msg)

    def handle(self, msg: Message, site: Controller | None = None) -> list[Command]:
        """`site`: a snapshot of the real-time controller (needed for an opening)."""
        if isinstance(msg, RoundOpen):
            return self._open(msg, site)
        r = self.rounds.get(msg.round)
        if r is None:
            if msg.round not in {rid for rid, _ in self._over} and len(self._early) < 4 * (
                len(self.config.peers) + 1
            ):
                self._early.append(msg)  # its round's opening may still be on its way
            return []
        return self._step(r, msg)

    def _open(self, msg: RoundOpen, site: Controller | None) -> list[Command]:
        r = self.rounds.get(msg.round)
        if r is not None and r.epoch == msg.epoch:
            return self._step(r, msg)  # a repeated opening: the participant counts it
        if (msg.round, msg.epoch) in self._over:
            return []
        start = datetime.fromisoformat(msg.start.replace("Z", "+00:00")).astimezone(UTC)
        resend = self._another_run(msg.epoch, start)
        if self.site not in msg.sites:
            log.warning("%s: left out of round %s; the default envelope applies", self.site, msg.round)
            self._over.add((msg.round, msg.epoch))
            return resend
        for old in self._superseded(msg.round, start):
            again = " (opened again by a restarted coordinator)" if old.id == msg.round else ""
            log.info("%s: round %s superseded by %s%s", self.site, old.id, msg.round, again)
            self._over.add((old.id, old.epoch))
            del self.rounds[old.id]
        out: list[Command] = [*resend, *self._hear_peers(not msg.admm.relay_trades)]
        config, whole_day = self._config(start, msg.intervals, site)
        if whole_day:
            out.append(DayStarts(start, config))
        config = with_peers(config, _trading_with(self.site, msg))
        markup = (msg.markups or {}).get(self.site, 0.0)
        qp = self._within_registered(site_qp(config, Policy(msg.policy), self.margins, markup), msg, start)
        peers = tuple(p.id for p in config.peers)
        participant = CommunityParticipant(self.site, peers, qp, config.dt_h)
        r = self.rounds[msg.round] = RoundState(
            msg.round,
            msg.epoch,
            start,
            config,
            qp,
            participant,
            self.cpu.process(),
            in_force=not msg.trial,
            parts_at_open=replace(self.cpu_parts),
        )
        self._latest = msg.round
        log.info(
            "%s: round %s opened with %d sites, %d peers", self.site, msg.round, len(msg.sites), len(peers)
        )
        out += self._step(r, msg)
        early = [m for m in self._early if m.round == msg.round]
        self._early = [m for m in self._early if m.round != msg.round]
        for m in early:
            out += self._step(r, m)
        return out

    def _hear_peers(self, hear: bool) -> list[Command]:
        """Subscribe to the peers' proposals, or leave them, as the round needs them. Proposals a
        new subscription misses are sent again when the coordinator repeats a grant at its deadline."""
        if hear == self._hears_peers:
            return []
        self._hears_peers = hear
        filters = [topics.proposal("+", p.id) for p in self.config.peers]
        why = "hearing the peers' proposals" if hear else "the grants relay the peers' trades"
        log.info("%s: %s", self.site, why)
        return [Subscribe(f) for f in filters] if hear else [Unsubscribe(f) for f in filters]

    def _within_registered(self, qp: CommunityQP, msg: RoundOpen, start: datetime) -> CommunityQP:
        """`qp` requesting envelopes inside the ranges the coordinator checks them against: those of
        the registration the opening names by digest (its forecast may have come after the coordinator
        set the round up), or where none matches, the configured day's."""
        digest = msg.ranges.get(self.site)
        if digest is None or msg.policy == "none":
            return qp
        candidates = self._registered_ranges(start, msg.intervals)
        chosen = next((r for r in candidates if ranges_digest(*r) == digest), None)
        if chosen is None:
            log.warning("%s: round %s checks ranges this run did not register", self.site, msg.round)
            chosen = candidates[0]
        bounds = envelope_bounds(Policy(msg.policy))
        return within_ranges(qp, np.asarray(chosen[0]), np.asarray(chosen[1]), bounds)

    def _registered_ranges(self, start: datetime, intervals: int) -> list[tuple[list[float], list[float]]]:
        """Every technical range this run registered over the round (from `start`, `intervals`
        long): the configured day's first, then those of its forecasts, the newest first."""
        day = self._date_config(start)
        n = len(day.price_import_eur_per_kwh)
        own = utc_moment(day.start)
        base = registration(day)
        found = [(base.technical_min_kw, base.technical_max_kw)]
        for reg in reversed(self.registered):
            if self.calendar is None:
                found.append((reg.technical_min_kw, reg.technical_max_kw))
            else:
                found += [(d.technical_min_kw, d.technical_max_kw) for d in reg.days if d.start == own]
        offset = n - intervals
        return [(lo[offset:], hi[offset:]) for lo, hi in found]

    def _another_run(self, epoch: str | None, start: datetime) -> list[Command]:
        """An opening of a coordinator run other than the one heard last (a restart): it may have
        lost the settlements sent before, so those of the day before the round's and later go again."""
        previous = self.epoch
        self.epoch = epoch or previous
        if previous is None or epoch is None or epoch == previous:
            return []
        cal = self.calendar
        since = start - timedelta(days=2) if cal is None else cal.start(cal.day_of(start) - timedelta(days=1))
        log.info("%s: a new coordinator run (%s after %s): settlements go again", self.site, epoch, previous)
        return [SettlementsAgain(since)]

    def _config(self, start: datetime, intervals: int, ctl: Controller | None) -> tuple[SiteConfig, bool]:
        """The site's configuration over a round's horizon, and whether that is a whole day: the
        configuration of the day `start` falls in (its date's, with the integrator's forecast where it
        covers it), whole, or the rest of it from the measured state of charge, the flexible energy
        used so far that day and the forecasts updated by the last interval."""
        day = self._day_config(start)
        n = len(day.price_import_eur_per_kwh)
        if ctl is None or intervals >= n:
            return day, True
        offset = n - intervals
        day_start = start - timedelta(hours=offset * day.dt_h)
        soc = ctl.projected_soc(start)
        recent = None
        if ctl.day_start < day_start:  # the controller's last reading was the day before
            flex_used = ctl.projected_flex_kwh(start) - ctl.projected_flex_kwh(day_start)
        else:
            flex_used = ctl.flex_used_kwh + ctl.projected_flex_kwh(start)
            if ctl.last_means is not None and ctl.last_means[0] == offset - 1:
                m = ctl.last_means[1]
                recent = Recent(pv_kw=m.pv_kw, wind_kw=m.wind_kw, fixed_load_kw=m.fixed_load_kw)
        return remaining_config(day, offset, soc, flex_used, recent), False

    def _day_config(self, start: datetime) -> SiteConfig:
        """The configuration of the day `start` falls in (the configured day, on its own date or
        read by local clock hour on another), with the integrator's forecast where it covers it."""
        day = self._date_config(start)
        f = self.forecasts.get(None if self.calendar is None else self.calendar.day_of(start))
        if f is None:
            return day
        day, covered = with_forecast(day, f)
        log.info("%s: the forecast issued %s covers %d intervals", self.site, f.issued.isoformat(), covered)
        return day

    def _date_config(self, start: datetime) -> SiteConfig:
        """The configured day, on its own date or read by local clock hour on the date of `start`."""
        cal = self.calendar
        if cal is None or cal.day_of(start) == cal.day_of(self.own_start):
            return self.config
        return site_config_on(self.config, cal.day_of(start), cal)

    def _step(self, r: RoundState, message: Message) -> list[Command]:
        t0, c0 = self.stopwatch(), self.cpu.thread()
        out: list[Command] = []
        repeats = r.participant.repeats_answered
        commands = r.participant.handle(Received(message))
        c1 = self.cpu.thread()
        self.cpu_parts.steps_s += c1 - c0
        if r.participant.repeats_answered > repeats:
            sent = [
                c.message.iteration
                for c in commands
                if isinstance(c, Publish) and isinstance(c.message, Proposal)
            ]
            log.info(
                "%s: round %s: the coordinator repeated itself; proposals %s sent again",
                self.site,
                r.id,
                sent,
            )
        for cmd in commands:
            if isinstance(cmd, Publish):
                e0 = self.cpu.thread()
                out.append(Send(topic_of(cmd.message), encode(cmd.message)))
                self.cpu_parts.codec_s += self.cpu.thread() - e0
                if isinstance(cmd.message, Proposal):
                    r.steps.append(self.stopwatch() - t0)
            elif isinstance(cmd, Finished) and isinstance(cmd.outcome, CommunityOutcome):
                out.append(self._finished(r, cmd.outcome))
        return out

    def _superseded(self, round_id: str, start: datetime) -> list[RoundState]:
        """The rounds a new opening ends: one of the same id (a coordinator restarted), and those
        of the same day (today's next rolling round; without whole days, every round). Tomorrow's
        day-ahead round and today's rolling rounds run side by side."""
        cal = self.calendar
        day = None if cal is None else cal.day_of(start)
        return [
            r for r in self.rounds.values() if r.id == round_id or cal is None or cal.day_of(r.start) == day
        ]

    def _finished(self, r: RoundState, out: CommunityOutcome) -> RoundDone:
        self._over.add((r.id, r.epoch))
        self.rounds.pop(r.id, None)
        self.settled += 1
        return RoundDone(r, out, self.plan(r, out) if r.in_force else None)

    def plan(self, r: RoundState, out: CommunityOutcome) -> Plan:
        """The agreed schedule as the controller follows it; trades with every peer of the site's
        configuration (zero with those the round left out)."""
        c = r.config.community
        by_peer = {p.id: k for k, p in enumerate(r.config.peers)}
        peers = [p.id for p in self.config.peers]
        horizon = len(c.pv_kw)

        def rows(a: FloatArray) -> FloatArray:
            return np.array([a[by_peer[p]] if p in by_peer else np.zeros(horizon) for p in peers])

        schedule = agreed_schedule(r.qp, out).values
        net_kw = schedule["pv"] + schedule["wd"] + schedule["dis"] - schedule["lx"] - schedule["ch"]
        net_kw = np.asarray(net_kw - np.array(c.fixed_load_kw))
        return plan_from(
            r.id, r.start, r.config.dt_h, schedule, peers,
            rows(out.agreed_buy_kw), rows(out.agreed_sell_kw), rows(out.buy_price), rows(out.sell_price),
            net_kw, np.array(c.pv_kw), np.array(c.wind_kw),
        )  # fmt: skip
