"""The DSO coordinator's lifecycle as a pure machine: `handle(event, now) -> commands`.

1. Online (retained status) with every site's default envelope (retained, valid for the day).
2. Registering: until every site has registered and is online, at most `registration_timeout_s`;
   the sites missing then are left out (on their defaults, which every grant accounts for).
3. Agreeing: the day-ahead round among the ready sites. A site silent past an iteration's patience
   is left out and the round is opened again without it (`<round>.2`, ...), up to `max_attempts`.
   Under Nash bargaining, Shapley and the noncooperative design (`market` in the configuration), a
   standalone round (`<round>-standalone`, no trade) comes first, then for Shapley a round per
   coalition (`<round>-cNN`), for the noncooperative design a round per bid profile its best
   responses try (`<round>-bNN`) (p2pdoe.core.coordinator.cooperative). The welfare round follows,
   on the bids where best responses ended. After its reports, Nash bargaining's payment round
   (`<round>-payments`, p2pdoe.core.coordinator.payments) agrees on payments over the trading
   links; Shapley's values and the bids' outcome follow from the rounds' reports.
4. Reporting: the agreed envelopes of the interval in force go out; the sites' reports are awaited
   (`report_timeout_s`), then the agreement is handed to the shell (results.json).
5. Then, by the rules: stop; or publish each interval's envelopes as it starts (following); or the
   rolling horizon (p2pdoe.core.coordinator.rolling) to the day's end, then closing (the last
   settlements) and the day's results.
A coordinator restarted mid-day from its checkpoint skips 1-4 (rejoining): it publishes the envelope
in force from the checkpoint at once, hears the sites for half an interval, and rolls on.
Meter readings, envelopes, settlements and statuses are booked all along (p2pdoe.core.coordinator.books).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum

from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import round_setup
from p2pdoe.core.coordinator.books import DayBooks
from p2pdoe.core.coordinator.commands import Agreed, DayOver, DayReport, Save
from p2pdoe.core.coordinator.context import Context, doe_send
from p2pdoe.core.coordinator.cooperative import WELFARE, Stages
from p2pdoe.core.coordinator.payments import PAYMENT_ITERATION, PaymentRun, payment_run
from p2pdoe.core.coordinator.plausible import reading_problem, report_problem, settlement_problem
from p2pdoe.core.coordinator.retained import sweep
from p2pdoe.core.coordinator.rolling import REPORTS as ROLLING_REPORTS
from p2pdoe.core.coordinator.rolling import Rolling
from p2pdoe.core.coordinator.rounds import ITERATION, STRAGGLERS, Agreement, RoundRun, Timings
from p2pdoe.core.coordinator.sites import SiteRegistry
from p2pdoe.core.coordinator.standing import Standing, standing_from
from p2pdoe.core.cpu import NO_CPU, CpuClocks
from p2pdoe.core.effects import (
    Exit,
    Heard,
    Patience,
    PatienceOver,
    Relieve,
    Send,
    Subscribe,
    Unsubscribe,
    Woke,
)
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.schemas.messages import DSO_ID, PolishReport, Proposal, RoundOpen
from p2pdoe.core.schemas.payments import PaymentProposal
from p2pdoe.core.schemas.results import Attempt, MarketOutcome
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    Registration,
    SettlementRecord,
    SiteReport,
    SiteStatus,
)

log = logging.getLogger("dso_coordinator")
REGISTRATION, REPORTS, SETTLEMENTS = "registration", "reports", "settlements"
Event = Heard | Woke | PatienceOver
Command = Send | Patience | Relieve | Subscribe | Unsubscribe | Exit | Save | Agreed | DayOver
SUBSCRIPTIONS: tuple[tuple[str, int], ...] = (
    *((topics.every_site(kind), 1) for kind in ("register", "status", "settlement", "doe", "doe/default")),
    (topics.every_site("meter"), 0),
    (topics.all_proposals(), 1),
    (topics.all_polish_reports(), 1),
    (topics.all_reports(), 1),
    (topics.all_payment_proposals(), 1),
    (topics.round_open("+"), 1),  # retained openings another run left behind are cleared
    (topics.payment_open("+"), 1),
)
_TYPES: dict[str, type] = {
    "register": Registration,
    "status": SiteStatus,
    "meter": MeterReading,
    "doe": Doe,
    "doe/default": Doe,
    "settlement": SettlementRecord,
}


class Phase(StrEnum):
    REGISTERING = "registering"
    AGREEING = "agreeing"
    REPORTING = "reporting"
    BARGAINING = "bargaining"
    FOLLOWING = "following"
    REJOINING = "rejoining"
    ROLLING = "rolling"
    CLOSING = "closing"
    OVER = "over"


class CoordinatorMachine:
    def __init__(
        self,
        ctx: Context,
        stopwatch: Callable[[], float],
        resume: Standing | None = None,
        cpu: CpuClocks = NO_CPU,
    ):
        """`resume`: a checkpoint of this day (a coordinator restarted mid-day); `stopwatch` and `cpu`:
        wall and CPU counters for the timings reported, never decided on."""
        self.ctx = ctx
        self.stopwatch = stopwatch
        self.cpu = cpu
        self.resume = resume
        self.registry = SiteRegistry(ctx.cfg)
        self.reader = MarketReader(DSO_ID)
        self.books = DayBooks(MeterIntegral(ctx.start, ctx.interval_s, ctx.rules.meter_step_s))
        self.timings = Timings()
        self.attempts: list[Attempt] = []
        self.run: RoundRun | None = None  # the day-ahead round's current opening
        self.reports: dict[str, SiteReport] = {}
        self.agreement: Agreement | None = None
        self.rolling: Rolling | None = None
        self.phase = Phase.REGISTERING
        self.day_ahead_late_s = 0.0
        self._wake: datetime | None = None
        self._follow_t = ctx.cfg.intervals
        self._t0 = stopwatch()
        # the cooperative designs: the rounds before the welfare one, Nash bargaining's payment
        # round, and the design's outcome
        self.stages = Stages.of(ctx.cfg)
        self._stage_start = 0  # attempts before the current stage's
        self.payments: PaymentRun | None = None
        self.market: MarketOutcome | None = None
        self.market_failure: str | None = None

    # --- the shell's questions -------------------------------------------------------------------

    def next_wake(self) -> datetime | None:
        if self.phase in (Phase.FOLLOWING, Phase.REJOINING):
            return self._wake
        if self.phase is Phase.ROLLING and self.rolling is not None:
            wake = self.rolling.next_wake()
            return self._close_at() if wake is None and self.rolling.over else wake
        return None

    def holding(self) -> bool:
        """Whether the current moment must last (a lockstep clock waits): a round, its reports."""
        if self.phase is Phase.ROLLING:
            return self.rolling is not None and self.rolling.holding
        return self.phase in (
            Phase.REGISTERING, Phase.AGREEING, Phase.REPORTING, Phase.BARGAINING, Phase.CLOSING
        )  # fmt: skip

    def heavy(self, event: Event) -> bool:
        """Whether handling `event` may solve (a round's setup or step): run it off the event loop."""
        if not isinstance(event, Heard):
            return True
        parsed = topics.parse(event.topic)
        if parsed is None or parsed.area != "market":
            return parsed is not None and parsed.kind in ("register", "status")
        return parsed.kind in ("proposal", "polish")

    # --- events ----------------------------------------------------------------------------------

    def start(self, now: datetime) -> list[Command]:
        ctx = self.ctx
        if self.resume is not None:
            self.phase = Phase.REJOINING
        out: list[Command] = [self.status(now)]
        out += [doe_send("doe/default", ctx.default_envelope(s)) for s in ctx.site_ids]
        if self.resume is None:
            return [*out, Patience(REGISTRATION, ctx.rules.registration_timeout_s)]
        log.info("resumed mid-day from round %s", self.resume.round)
        self.rolling = Rolling(ctx, self.resume, self.stopwatch)
        self._wake = now + timedelta(seconds=ctx.interval_s / 2)
        return out + self.rolling.begin(now)

    def handle(self, event: Event, now: datetime) -> list[Command]:
        if isinstance(event, Heard):
            return self._heard(event, now)
        if isinstance(event, Woke):
            return self._woke(now)
        return self._patience_over(event.key, now)

    def _heard(self, m: Heard, now: datetime) -> list[Command]:
        parsed = topics.parse(m.topic)
        if parsed is None:
            return []
        if parsed.area == "site" and parsed.site is not None:
            return self._site(parsed.kind, parsed.site, m, now)
        if parsed.area == "market" and parsed.kind == "report":
            return self._report(parsed.site, parsed.round, m.payload, now)
        if parsed.area == "market" and parsed.kind in ("proposal", "polish"):
            return self._proposal(m, now)
        if parsed.area == "market" and parsed.kind == "payments/proposal":
            return self._payment_proposal(m, now)
        if parsed.area == "market" and parsed.kind == "open" and m.retained and m.payload:
            return self._stale_opening(m)
        if parsed.area == "market" and parsed.kind == "payments/open" and m.retained and m.payload:
            return self._stale_payment_opening(m)
        return []

    def _stale_payment_opening(self, m: Heard) -> list[Command]:
        if self.payments is not None and m.topic == topics.payment_open(self.payments.id):
            return []  # our own
        log.info("deleted the retained payment opening of %s left by another run", m.topic)
        return [Send(m.topic, b"", retain=True)]

    def _stale_opening(self, m: Heard) -> list[Command]:
        """A retained opening from another run of the coordinator (killed before it could delete it):
        deleted, so no edge agent ever joins a round nobody runs."""
        msg = self.reader.decoded(m)
        if isinstance(msg, RoundOpen) and msg.epoch == self.ctx.epoch:
            return []  # our own, heard back after a reconnect
        log.info("deleted the retained opening of %s left by another run of the coordinator", m.topic)
        return [Send(m.topic, b"", retain=True)]

    def _site(self, kind: str, site: str, m: Heard, now: datetime) -> list[Command]:
        msg = self.reader.runtime(m.payload)
        if msg is None or kind not in _TYPES:
            return []
        if not isinstance(msg, _TYPES[kind]) or getattr(msg, "site", None) != site:
            self.reader.dropped["sender_not_topic"] += 1
            return []
        why = self._implausible(msg)
        if why is not None:
            self.reader.dropped["implausible"] += 1
            log.warning("dropped an implausible %s from %s: %s", kind, site, why)
            return []
        if isinstance(msg, MeterReading):
            self.books.reading(msg)
        elif isinstance(msg, Doe):
            self.books.envelope(kind, msg)
        elif isinstance(msg, SettlementRecord):
            if not self._within_day(msg.interval_start):
                return []  # another day's (one sent again after a restart): booked by that day or not at all
            self.books.settlement(msg)
            return self._settled(now) if self.phase is Phase.CLOSING else []
        elif isinstance(msg, Registration) and not self.registry.registered(msg):
            self.reader.dropped["registration_refused"] += 1
        elif isinstance(msg, SiteStatus):
            self.books.status(msg, now)
            self.registry.status(msg, m.retained)
        return self._sites_changed(now)

    def _within_day(self, moment: datetime) -> bool:
        ctx = self.ctx
        return ctx.start <= moment < ctx.interval_start(ctx.cfg.intervals)

    def _implausible(self, msg: object) -> str | None:
        """Why a site's reading, settlement or report cannot come from what it registered, or None."""
        reg = self.registry.registrations.get(str(getattr(msg, "site", "")))
        if reg is None:
            return None
        if isinstance(msg, MeterReading):
            return reading_problem(msg, reg)
        if isinstance(msg, SettlementRecord):
            return settlement_problem(msg, reg)
        if isinstance(msg, SiteReport):
            return report_problem(msg, reg, self.ctx.cfg)
        return None

    def _sites_changed(self, now: datetime) -> list[Command]:
        if not self.registry.all_ready():
            return []
        if self.phase is Phase.REGISTERING:
            return [Relieve(REGISTRATION), *self._registered(now)]
        if self.phase is Phase.REJOINING:
            return self._rejoined(now)
        return []

    def _patience_over(self, key: str, now: datetime) -> list[Command]:
        if key == REGISTRATION and self.phase is Phase.REGISTERING:
            return self._registered(now)
        if key == ITERATION and self.phase is Phase.AGREEING:
            return self._attempt_lost(now)
        if key == STRAGGLERS and self.phase is Phase.AGREEING:
            out: list[Command] = list(self._run().close_early(now))
            return out + self._round_over(now) if self._run().outcome is not None else out
        if key == REPORTS and self.phase is Phase.REPORTING:
            missing = sorted(set(self._run().setup.sites) - set(self.reports))
            again = self._run().repeat()  # the final grant once more: a site may not have had it
            if again:
                log.warning("no report from %s; the final messages sent again", missing)
                sends = [e for e in again if isinstance(e, Send)]  # one per site
                return [*sends, Patience(REPORTS, self.ctx.rules.report_timeout_s)]
            log.warning("no report from %s", missing)
            return self._day_ahead_done(now)
        if key == PAYMENT_ITERATION and self.phase is Phase.BARGAINING:
            return self._payment_deadline(now)
        if key == SETTLEMENTS and self.phase is Phase.CLOSING:
            return self._day_over(now)
        if self.rolling is not None and key == ITERATION:
            return list(self.rolling.iteration_over(now))
        if self.rolling is not None and key == STRAGGLERS:
            return list(self.rolling.stragglers_waited(now))
        if self.rolling is not None and key == ROLLING_REPORTS:
            return list(self.rolling.reports_over())
        return []

    def _woke(self, now: datetime) -> list[Command]:
        if self.phase is Phase.FOLLOWING:
            return self._follow(now)
        if self.phase is Phase.REJOINING and self._wake is not None and now >= self._wake:
            return self._rejoined(now)
        if self.phase is not Phase.ROLLING or self.rolling is None:
            return []
        if self.rolling.over:
            return self._closing(now) if now >= self._close_at() else []
        out: list[Command] = []
        out += self.rolling.woke(now, self.registry.ready(), self.registry.registrations)
        return [*out, self.status(now)] if self.rolling.intervals else out

    # --- the day-ahead round ---------------------------------------------------------------------

    def _registered(self, now: datetime) -> list[Command]:
        self.timings.registration_wait_s = self.stopwatch() - self._t0
        self.registry.exclude_unready()
        self.phase = Phase.AGREEING
        return self._next_attempt(now)

    def _next_attempt(self, now: datetime) -> list[Command]:
        ctx, n = self.ctx, len(self.attempts) - self._stage_start + 1
        left_out = self.registry.left_out()
        taking_part = len(ctx.site_ids) - len(left_out)
        spec = self.stages.round_spec(ctx.rules.round)
        base = spec.id
        if n > ctx.rules.max_attempts and self.stages.stage != WELFARE:
            return self._stage_given_up(now, f"no agreement of {base} after {n - 1} attempts")
        if n > ctx.rules.max_attempts:
            return self._no_day_ahead(now, f"no agreement after {n - 1} attempts: {self._statuses()}")
        if taking_part < 2:  # no trade without two
            return self._no_day_ahead(now, f"{taking_part} site(s) registered and online, at least 2 needed")
        round_id = base if n == 1 else f"{base}.{n}"
        try:
            setup = round_setup(
                ctx.cfg, ctx.feeder, self.registry.registrations, left_out, ctx.defaults, round_id,
                epoch=ctx.epoch, traders=spec.traders, markups=spec.markups, trial=spec.trial,
            )  # fmt: skip
        except Exception as exc:  # e.g. no safe envelopes: the day cannot be agreed
            return self._no_day_ahead(now, f"round {round_id} could not be set up: {exc}")
        self.run = RoundRun(
            setup,
            self.timings,
            ctx.rules.iteration_timeout_s,
            self.stopwatch,
            self.cpu,
            ctx.rules.straggler_wait,
        )
        log.info("round %s opened: %d sites, %d on defaults", round_id, len(setup.sites), len(setup.excluded))
        return [self.status(now, round_id), *self.run.open(now), *sweep()]

    def _statuses(self) -> list[str]:
        return [a.status for a in self.attempts]

    def _no_day_ahead(self, now: datetime, why: str) -> list[Command]:
        """No day-ahead agreement: the default envelopes (published at the start) stand. A real-time
        day goes on with rolling rounds, which open as soon as two sites are ready; a day-ahead-only
        coordinator stops with the reason."""
        if not self.ctx.rules.rolling:
            return [Exit(2, f"no day-ahead agreement ({why}); the default envelopes stand")]
        log.error("no day-ahead agreement (%s): the default envelopes stand; rolling rounds go on", why)
        self.phase, self.rolling = Phase.ROLLING, Rolling(self.ctx, None, self.stopwatch)
        self.rolling.failures.append(f"day-ahead: {why}")
        return [*self.rolling.begin(now), self.status(now)]

    def _run(self) -> RoundRun:
        assert self.run is not None
        return self.run

    def _proposal(self, m: Heard, now: datetime) -> list[Command]:
        c0 = self.cpu.thread()
        msg = self.reader.decoded(m)
        if not isinstance(msg, (Proposal, PolishReport)):
            return []
        run = self.run
        if self.phase is Phase.AGREEING and run is not None and msg.round == run.id:
            self.timings.codec_cpu_s += self.cpu.thread() - c0
            out: list[Command] = list(run.proposal(msg, len(m.payload), now))
            return out + self._round_over(now) if run.outcome is not None else out
        return [] if self.rolling is None else list(self.rolling.proposal(msg, len(m.payload), now))

    def _attempt_lost(self, now: datetime) -> list[Command]:
        run = self._run()
        again = run.repeat()
        if again:
            log.warning("round %s: no proposal from %s in %.1f s; its last message sent again",
                        run.id, list(run.missing()), self.ctx.rules.iteration_timeout_s)  # fmt: skip
            return list(again)
        attempt = run.attempt()
        self.attempts.append(attempt)
        for site in attempt.missed_deadline:
            self.registry.exclude(site, self._why_missed(site, attempt.iterations))
            log.warning("%s: no valid proposal within %.1f s; round %s is opened again without it",
                        site, self.ctx.rules.iteration_timeout_s, run.id)  # fmt: skip
        return [run.withdraw(), *self._next_attempt(now)]

    def _why_missed(self, site: str, iteration: int) -> str:
        """A site silent at the deadline, or one whose proposals were refused as implausible."""
        run = self._run()
        implausible = run.dso.implausible.get(site)
        if implausible is not None:
            return f"its proposals in round {run.id} were implausible ({implausible})"
        return f"missed the deadline of iteration {iteration} of round {run.id}"

    def _round_over(self, now: datetime) -> list[Command]:
        run, ctx = self._run(), self.ctx
        assert run.outcome is not None
        self.attempts.append(run.attempt())
        t = ctx.current_interval(now)
        out: list[Command] = [run.withdraw()]
        if self.stages.publishes_envelopes:  # a standalone or coalition round's never are in force
            out += [doe_send("doe", ctx.envelope(run.setup, run.outcome, s, t)) for s in ctx.site_ids]
        self.day_ahead_late_s = max(0.0, (now - ctx.start).total_seconds())
        if self.day_ahead_late_s > 0 and ctx.rules.rolling:
            log.warning(
                "the day-ahead round ended %.0f s (simulated) after the day began", self.day_ahead_late_s
            )
        self.phase = Phase.REPORTING
        out.append(Patience(REPORTS, ctx.rules.report_timeout_s))
        return out + self._reports_in(now)

    def _report(self, site: str | None, round_id: str | None, payload: bytes, now: datetime) -> list[Command]:
        msg = self.reader.runtime(payload)
        if msg is None:
            return []
        if not isinstance(msg, SiteReport) or msg.site != site or msg.round != round_id:
            self.reader.dropped["sender_not_topic"] += 1
            return []
        why = self._implausible(msg)
        if why is not None:
            self.reader.dropped["implausible"] += 1
            log.warning("dropped an implausible report of %s for round %s: %s", site, round_id, why)
            return []
        if self.run is not None and msg.round == self.run.id:
            self.reports[msg.site] = msg
            return self._reports_in(now) if self.phase is Phase.REPORTING else []
        return [] if self.rolling is None else list(self.rolling.report(msg))

    def _reports_in(self, now: datetime) -> list[Command]:
        if not set(self._run().setup.sites) <= set(self.reports):
            return []
        return [Relieve(REPORTS), *self._day_ahead_done(now)]

    def _day_ahead_done(self, now: datetime) -> list[Command]:
        if self.stages.stage != WELFARE:
            return self._stage_done(now)
        design, unsettled = self.ctx.cfg.market, self.market is None and self.market_failure is None
        if design == "nash-bargaining" and self.payments is None and unsettled:
            return self._open_payments(now)
        if design == "shapley" and unsettled:
            self._shapley_values()
        if design == "noncooperative" and unsettled:
            self._bidding_outcome()
        run, ctx, rules = self._run(), self.ctx, self.ctx.rules
        assert run.outcome is not None
        setup = run.setup
        left_out = {s: self.registry.why_left_out(s) for s in ctx.site_ids if s not in setup.sites}
        self.agreement = Agreement(
            setup, run.outcome, list(self.attempts), left_out, dict(self.registry.registrations),
            dict(self.reports), self.timings.copy(), dict(self.reader.dropped),
            market=self.market, market_failure=self.market_failure,
        )  # fmt: skip
        out: list[Command] = [Agreed(self.agreement, not rules.rolling or rules.exit_after_round, ctx)]
        if rules.exit_after_round:
            self.phase = Phase.OVER
            return [*out, self.status(now), Exit(0)]
        if not rules.rolling:
            self.phase, self._follow_t = Phase.FOLLOWING, ctx.current_interval(now) + 1
            self._wake = ctx.interval_start(self._follow_t)
            return [
                *out,
                self.status(now),
                Unsubscribe(topics.all_proposals()),
                Unsubscribe(topics.all_polish_reports()),
                Unsubscribe(topics.all_reports()),
            ]
        standing = standing_from(setup, run.outcome, 0, ctx.start, ctx.interval_s, ctx.cfg.intervals)
        if rules.checkpoint:
            out.append(Save(standing))
        self.phase, self.rolling = Phase.ROLLING, Rolling(ctx, standing, self.stopwatch)
        return [*out, *self.rolling.begin(now), self.status(now)]

    # --- the cooperative designs: standalone and coalition rounds before, payments after ---------

    def _stage_done(self, now: datetime) -> list[Command]:
        """A standalone or coalition round's reports in: the next stage's round opens."""
        run = self._run()
        log.info("round %s over: %d reports", run.id, len(self.reports))
        self.stages.done(run.id, self.reports)
        return self._next_stage(now)

    def _stage_given_up(self, now: datetime, why: str) -> list[Command]:
        self.market_failure = f"no {self.ctx.cfg.market} payments: {why}"
        log.warning("%s; the welfare round follows and its trade prices stand", self.market_failure)
        self.stages.give_up(why)
        return self._next_stage(now)

    def _next_stage(self, now: datetime) -> list[Command]:
        self.reports, self._stage_start = {}, len(self.attempts)
        self.timings = Timings(registration_wait_s=self.timings.registration_wait_s)  # the next round's
        self.phase = Phase.AGREEING
        return self._next_attempt(now)

    def _shapley_values(self) -> None:
        self._market_from(self.stages.shapley(self.reports), "no Shapley values", "trade prices")
        if self.market is not None:
            log.info("Shapley values from %d coalition rounds", self.stages.coalition_rounds)

    def _bidding_outcome(self) -> None:
        made = self.stages.noncooperative(self.reports)
        self._market_from(made, "no noncooperative outcome", "trade prices on honest bids")
        if self.market is not None:
            m = self.market
            log.info("bids: %s after %d profiles, %s in force", m.status, m.profiles_cleared, m.bids_in_force)

    def _market_from(self, made: MarketOutcome | str, failure: str, standing: str) -> None:
        """The design's market section, or why there is none (logged: the welfare round's
        `standing` stand)."""
        if isinstance(made, str):
            self.market_failure = f"{failure}: {made}"
            log.warning("%s; the welfare round's %s stand", self.market_failure, standing)
        else:
            self.market = made

    def _open_payments(self, now: datetime) -> list[Command]:
        run, rules, stages = self._run(), self.ctx.rules, self.stages
        assert stages.baseline_round is not None
        rounds = (stages.baseline_round, run.id, f"{rules.round}-payments")
        made = payment_run(self.ctx.cfg, run.setup.sites, stages.baseline, self.reports, rounds,
                           rules.iteration_timeout_s)  # fmt: skip
        if isinstance(made, str):
            self.market_failure = f"no payments agreed: {made}"
            log.warning("%s; the welfare round's trade prices stand", self.market_failure)
            return self._day_ahead_done(now)
        self.payments, self.phase = made, Phase.BARGAINING
        log.info("payment round %s opened over %d links", made.id, len(made.chair.links))
        return [self.status(now, made.id), *made.open()]

    def _payment_proposal(self, m: Heard, now: datetime) -> list[Command]:
        msg = self.reader.payment(m)
        pay = self.payments
        if not isinstance(msg, PaymentProposal) or pay is None or self.phase is not Phase.BARGAINING:
            return []
        out: list[Command] = list(pay.proposal(msg, len(m.payload)))
        if pay.result is None:
            return out
        assert self.stages.baseline_round is not None
        self.market = pay.outcome(self.stages.baseline_round)
        log.info("payment round %s %s after %d iterations", pay.id, pay.result.status, pay.result.iterations)
        self.phase = Phase.REPORTING
        return [*out, pay.withdraw(), *self._day_ahead_done(now)]

    def _payment_deadline(self, now: datetime) -> list[Command]:
        pay = self.payments
        assert pay is not None
        again = pay.repeat()
        if again:
            log.warning("round %s: no payment proposal from %s; its last message sent again",
                        pay.id, list(pay.missing()))  # fmt: skip
            return list(again)
        self.market_failure = f"no payments agreed: no proposal from {', '.join(pay.missing())}"
        log.warning("%s; the welfare round's trade prices stand", self.market_failure)
        self.phase = Phase.REPORTING
        return [pay.withdraw(), *self._day_ahead_done(now)]

    # --- after the day-ahead round ---------------------------------------------------------------

    def _follow(self, now: datetime) -> list[Command]:
        """Without rolling rounds: each interval's day-ahead envelopes as it starts."""
        ctx, a = self.ctx, self.agreement
        assert a is not None
        t = self._follow_t
        if self._wake is None or now < self._wake or t >= ctx.cfg.intervals:
            return []
        self._follow_t = t + 1
        self._wake = ctx.interval_start(t + 1) if t + 1 < ctx.cfg.intervals else None
        out: list[Command] = [doe_send("doe", ctx.envelope(a.setup, a.outcome, s, t)) for s in ctx.site_ids]
        return [*out, Exit(0)] if self._wake is None and ctx.rules.exit_after_day else out

    def _rejoined(self, now: datetime) -> list[Command]:
        assert self.rolling is not None
        self.phase, self._wake = Phase.ROLLING, None
        self.rolling.skip_to(now)
        return []

    def _close_at(self) -> datetime:
        """The day's end and two meter steps: the last interval's settlements are on their way."""
        assert self.rolling is not None
        end = self.ctx.interval_start(self.rolling.last_t)
        return end + timedelta(seconds=2 * self.ctx.rules.meter_step_s)

    def _closing(self, now: datetime) -> list[Command]:
        self.phase = Phase.CLOSING
        out = self._settled(now)
        return out if out else [Patience(SETTLEMENTS, self.ctx.rules.report_timeout_s)]

    def _settled(self, now: datetime) -> list[Command]:
        """Once every interval with readings is settled, the day is over."""
        assert self.rolling is not None
        last = self.rolling.last_t
        cells = [(s, t) for s, t in self.books.metering.cells if 0 <= t < last]
        if any((s, self.ctx.interval_start(t)) not in self.books.settlements for s, t in cells):
            return []
        return [Relieve(SETTLEMENTS), *self._day_over(now)]

    def _day_over(self, now: datetime) -> list[Command]:
        rolling = self.rolling
        assert rolling is not None
        self.phase = Phase.OVER
        report = DayReport(
            self.agreement, self.books, rolling.intervals, (len(rolling.intervals) + 1) * self.ctx.cfg.dt_h,
            list(rolling.failures), self.day_ahead_late_s, dict(self.reader.dropped),
        )  # fmt: skip
        out: list[Command] = [DayOver(report, self.ctx), self.status(now)]
        return [*out, Exit(0)] if self.ctx.rules.exit_after_day else out

    # --- status ----------------------------------------------------------------------------------

    def _round_in_force(self) -> str | None:
        if self.rolling is not None and self.rolling.standing is not None:
            return self.rolling.standing.round
        return None if self.agreement is None else self.agreement.outcome.round

    def status(self, now: datetime, round_id: str | None = None, state: str = "online") -> Send:
        """Online, with the round under way (else the one whose envelopes stand), the phase, how far
        ahead the envelopes go out and the rounds that failed."""
        rolling = self.rolling
        msg = DsoStatus(
            state=state,  # type: ignore[arg-type]
            round=round_id or self._round_in_force(),
            ts=now,
            phase=self.phase.value,
            envelope_lead_s=None if rolling is None else rolling.lead_s(),
            failed_rounds=0 if rolling is None else len(rolling.failures),
            last_failure=None if rolling is None or not rolling.failures else rolling.failures[-1],
        )
        return Send(topics.DSO_STATUS, msg.model_dump_json().encode(), state=True)
