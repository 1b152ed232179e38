"""One opening of a round at the coordinator: the DSO participant fed with proposals, its grants
and progress published, the iteration's patience renewed at every grant. Timings are measured, never
decided on: `stopwatch` is a wall-clock counter passed in for the figures of results.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import RoundSetup
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.cpu import NO_CPU, CpuClocks
from p2pdoe.core.effects import Patience, Relieve, Send
from p2pdoe.core.reader import topic_of
from p2pdoe.core.schemas.messages import Grant, PolishPrices, PolishReport, Proposal, encode
from p2pdoe.core.schemas.results import Attempt, MarketOutcome
from p2pdoe.core.schemas.runtime import Progress, Registration, SiteReport

ITERATION = "iteration"  # the patience key of an iteration's proposals
STRAGGLERS = "stragglers"  # the patience key of the wait for an iteration's last proposals
Effect = Send | Patience | Relieve
MIN_STRAGGLER_WAIT_S = 0.001


@dataclass
class Timings:
    registration_wait_s: float = 0.0
    round_wall_s: float = 0.0
    iteration_wall_s: list[float] = field(default_factory=list)
    dso_step_s: list[float] = field(default_factory=list)
    proposals: int = 0
    proposal_bytes: int = 0
    grants: int = 0  # one per site and iteration
    grant_bytes: int = 0
    polish_messages: int = 0  # the certified polish's, both ways
    polish_bytes: int = 0
    cpu_s: float = 0.0  # the process's CPU time from the opening to the end of the round
    dso_cpu_s: float = 0.0  # of which in the DSO participant (every proposal, not only the last)
    codec_cpu_s: float = 0.0  # of which decoding proposals and encoding grants and progress

    def copy(self) -> Timings:
        return replace(self, iteration_wall_s=list(self.iteration_wall_s), dso_step_s=list(self.dso_step_s))


@dataclass(frozen=True)
class Agreement:
    """The coordinator's account of the day-ahead agreement (its timings its own copy)."""

    setup: RoundSetup
    outcome: DsoOutcome
    attempts: list[Attempt]
    excluded: dict[str, str]  # site -> why
    registrations: dict[str, Registration]
    reports: dict[str, SiteReport]
    timings: Timings
    dropped: dict[str, int]
    protocol: str = "unknown"
    market: MarketOutcome | None = None  # Nash bargaining's payments
    market_failure: str | None = None  # why a design's payments were not agreed


class RoundRun:
    def __init__(
        self,
        setup: RoundSetup,
        timings: Timings,
        patience_s: float,
        stopwatch: Callable[[], float],
        cpu: CpuClocks = NO_CPU,
        straggler_wait: float = 1.0,
    ):
        """`straggler_wait`: with bounded staleness, once an iteration may close without the sites
        still missing, wait this many times as long as the iteration had taken until then."""
        self.setup = setup
        self.cpu = cpu
        self._cpu_open = cpu.process()
        self.dso = setup.dso
        self.timings = timings
        self.patience_s = patience_s
        self.stopwatch = stopwatch
        self.outcome: DsoOutcome | None = None
        self._t_round = self._t_iter = stopwatch()
        self._last: list[Send] = []  # the opening, or the latest grants (one per site)
        self._repeated: list[Send] = []  # the ones already sent a second time
        self.straggler_wait = straggler_wait
        self._iteration_start: datetime | None = None  # on the event-loop clock
        self._waiting_at = -1  # the iteration whose stragglers are being waited for

    def close_early(self, now: datetime) -> list[Effect]:
        """The wait for the stragglers is over: close the iteration without them, if still allowed."""
        if self.outcome is not None or self._waiting_at != self.dso.iteration:
            return []
        return self._handled(self.dso.close_early, now)

    def _straggler_patience(self, now: datetime) -> list[Effect]:
        """Once the iteration may close early: how long to wait for the rest (once per iteration)."""
        k = self.dso.iteration
        if self._waiting_at == k or self._iteration_start is None or not self.dso.may_close_early():
            return []
        self._waiting_at = k
        elapsed = (now - self._iteration_start).total_seconds()
        return [Patience(STRAGGLERS, max(self.straggler_wait * elapsed, MIN_STRAGGLER_WAIT_S))]

    @property
    def id(self) -> str:
        return self.dso.plan.round

    def open(self, now: datetime | None = None) -> list[Effect]:
        """The opening (retained) and the first iteration's patience."""
        self._iteration_start = now
        self._t_round = self._t_iter = self.stopwatch()
        self._cpu_open = self.cpu.process()
        sends = [
            Send(topic_of(c.message), encode(c.message), retain=True)
            for c in self.dso.open_round()
            if isinstance(c, Publish)
        ]
        self._last = sends[-1:]
        return [*sends, Patience(ITERATION, self.patience_s)]

    def repeat(self) -> list[Effect]:
        """At an iteration's deadline: the opening or the latest grant once more, with one more
        patience, so a site whose proposal (or a peer's, or this grant) a broker lost sends it again
        (its participant answers a repeat with its latest proposal). Empty if already repeated: then
        the missing sites are left out."""
        if not self._last or self._repeated is self._last:
            return []
        self._repeated = self._last
        return [*self._last, Patience(ITERATION, self.patience_s)]

    def proposal(self, msg: Proposal | PolishReport, size: int, now: datetime | None = None) -> list[Effect]:
        """A proposal, or a report of the certified polish."""
        if isinstance(msg, PolishReport):
            self.timings.polish_messages += 1
            self.timings.polish_bytes += size
        else:
            self.timings.proposals += 1
            self.timings.proposal_bytes += size
        return self._handled(lambda: self.dso.handle(Received(msg)), now)

    def _handled(self, step: Callable[[], list[Command]], now: datetime | None) -> list[Effect]:
        """What the DSO's answer to a proposal (or to the end of a wait) sends."""
        t0, c0 = self.stopwatch(), self.cpu.thread()
        commands = step()
        self.timings.dso_cpu_s += self.cpu.thread() - c0
        grants = [c.message for c in commands if isinstance(c, Publish) and isinstance(c.message, Grant)]
        out: list[Effect] = self._granted(grants, self.stopwatch() - t0) if grants else []
        prices = [
            c.message for c in commands if isinstance(c, Publish) and isinstance(c.message, PolishPrices)
        ]
        out += self._polish_prices(prices) if prices else []
        if grants:
            self._iteration_start = now
            out.append(Relieve(STRAGGLERS))
        elif now is not None:
            out += self._straggler_patience(now)
        for cmd in commands:
            if isinstance(cmd, Finished) and isinstance(cmd.outcome, DsoOutcome):
                self.outcome = cmd.outcome
                self.timings.round_wall_s = self.stopwatch() - self._t_round
                self.timings.cpu_s = self.cpu.process() - self._cpu_open
                out.append(Relieve(ITERATION))
        return out

    def _granted(self, grants: list[Grant], step_s: float) -> list[Effect]:
        """An iteration's grants, one per site, each on its recipient's topic."""
        self.timings.dso_step_s.append(step_s)
        c0 = self.cpu.thread()
        sends = [Send(topic_of(g), encode(g)) for g in grants]
        progress = self._progress(grants[0])
        self.timings.codec_cpu_s += self.cpu.thread() - c0
        self.timings.grants += len(sends)
        self.timings.grant_bytes += sum(len(s.payload) for s in sends)
        now = self.stopwatch()
        self.timings.iteration_wall_s.append(now - self._t_iter)
        self._t_iter = now
        self._last = sends
        return [*sends, progress, Patience(ITERATION, self.patience_s)]

    def _polish_prices(self, prices: list[PolishPrices]) -> list[Effect]:
        """A step of the certified polish: one message per site; the iteration's patience renewed
        (and these sent again at its end, like a grant)."""
        sends = [Send(topic_of(m), encode(m)) for m in prices]
        self.timings.polish_messages += len(sends)
        self.timings.polish_bytes += sum(len(s.payload) for s in sends)
        self._last = sends
        return [*sends, Patience(ITERATION, self.patience_s)]

    def _progress(self, grant: Grant) -> Send:
        last = self.dso.last_record
        msg = Progress(
            round=grant.round,
            iteration=grant.iteration,
            status=grant.status,
            primal_trade_kw=grant.residuals.primal_trade_kw,
            dual_trade_kw=grant.residuals.dual_trade_kw,
            primal_envelope_kw=grant.residuals.primal_envelope_kw,
            dual_envelope_kw=grant.residuals.dual_envelope_kw,
            eps_trade_kw=0.0 if last is None else last.trade.eps_primal_kw,
            eps_envelope_kw=0.0 if last is None else last.envelope.eps_primal_kw,
            price_change_max_eur_per_kwh=None if last is None else last.price_change_max_eur_per_kwh,
            eps_price_eur_per_kwh=self.dso.settings.eps_price,
            sites=list(self.setup.sites),
            excluded_sites=list(self.setup.excluded),
            frozen_sites=grant.frozen,
        )
        return Send(topics.DSO_PROGRESS, msg.model_dump_json().encode(), qos=0, retain=True)

    def missing(self) -> tuple[str, ...]:
        return self.dso.waiting_for()

    def withdraw(self) -> Send:
        """Delete the retained opening: the round is over, or opened again under a new id."""
        return Send(topics.round_open(self.id), b"", retain=True)

    def attempt(self) -> Attempt:
        out = self.outcome
        return Attempt(
            round=self.id,
            sites=list(self.setup.sites),
            status="deadline_missed" if out is None else out.status,
            iterations=self.dso.iteration if out is None else out.iterations,
            missed_deadline=[] if out is not None else list(self.missing()),
        )
