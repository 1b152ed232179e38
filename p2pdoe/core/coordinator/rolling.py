"""The rolling horizon, a pure machine: a round every interval over the rest of the day.

For each interval t after the one in force, a round over intervals t..T-1 opens as interval t-1
starts, warm-started from the standing agreement (shifted) with its final rho, capped at
`rolling_max_iterations`. The standing agreement's envelopes for t go out first (safe together,
well ahead); the round's replace them only if it ends before t starts, so what is in force at t's
start always comes from one agreement. On a wall or scaled clock the round is asked to stop at
`rolling_stop_fraction` of interval t-1 (every grant is safe, so a stopped round's envelopes are
too); on a lockstep or virtual clock time waits for the round, and the cap ends it. A round that
fails in any way (a site silent past the iteration's patience, an infeasible problem, an empty
box) leaves the standing agreement's envelopes for t, which were safe together: it is logged,
counted and shown on the coordinator's status, and never ends the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from p2pdoe.core.agreement.coordination import (
    RoundSetup,
    remaining_coordinator_config,
    remaining_registration,
    round_setup,
)
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.coordinator.commands import Save
from p2pdoe.core.coordinator.context import Context, doe_send
from p2pdoe.core.coordinator.retained import sweep
from p2pdoe.core.coordinator.rounds import ITERATION, RoundRun, Timings
from p2pdoe.core.coordinator.standing import Standing, standing_from
from p2pdoe.core.effects import Patience, Relieve, Send, Subscribe
from p2pdoe.core.schemas.messages import PolishReport, Proposal
from p2pdoe.core.schemas.results import RealtimeInterval
from p2pdoe.core.schemas.runtime import Doe, Registration, SiteReport

log = logging.getLogger("dso_coordinator.realtime")
BOX_TOLERANCE_KW = 1e-6
REPORTS = "rolling-reports"
Effect = Send | Patience | Relieve | Save | Subscribe


@dataclass
class _Interval:
    """The interval whose round is under way (or whose reports are awaited)."""

    t: int
    round_id: str
    lead_s: float
    envelopes: dict[str, Doe]
    wall0: float
    setup: RoundSetup | None = None
    run: RoundRun | None = None
    stop_at: datetime | None = None
    awaiting: set[str] = field(default_factory=set)


class Rolling:
    def __init__(self, ctx: Context, standing: Standing | None, stopwatch: Callable[[], float]):
        self.ctx = ctx
        self.standing = standing
        self.stopwatch = stopwatch
        self.intervals: list[RealtimeInterval] = []
        self.failures: list[str] = []
        self.next_t = ctx.cfg.intervals
        self.last_t = ctx.last_interval()
        self.current: _Interval | None = None

    # --- the schedule ------------------------------------------------------------------------------

    def begin(self, now: datetime) -> list[Effect]:
        """The envelopes in force now, and the first round from the next interval on."""
        t = self.ctx.current_interval(now)
        self.next_t = t + 1
        return [doe_send("doe", self.envelope(site, t)) for site in self.ctx.site_ids]

    def skip_to(self, now: datetime) -> None:
        """A restarted coordinator's first round is for the interval after the one in force now."""
        self.next_t = self.ctx.current_interval(now) + 1

    def opens(self, t: int) -> datetime:
        return self.ctx.interval_start(t - 1)

    def next_wake(self) -> datetime | None:
        cur = self.current
        if cur is not None:
            return cur.stop_at
        return self.opens(self.next_t) if self.next_t < self.last_t else None

    @property
    def over(self) -> bool:
        return self.current is None and self.next_t >= self.last_t

    @property
    def holding(self) -> bool:
        return self.current is not None

    def woke(self, now: datetime, ready: set[str], registrations: dict[str, Registration]) -> list[Effect]:
        cur = self.current
        if cur is not None:
            if cur.run is not None and cur.stop_at is not None and now >= cur.stop_at:
                cur.run.dso.stop_at_next_iteration()
                cur.stop_at = None
            return []
        if self.next_t >= self.last_t or now < self.opens(self.next_t):
            return []
        return self._open_interval(self.next_t, now, ready, registrations)

    # --- one interval ------------------------------------------------------------------------------

    def _open_interval(
        self, t: int, now: datetime, ready: set[str], registrations: dict[str, Registration]
    ) -> list[Effect]:
        ctx = self.ctx
        starts = ctx.interval_start(t)
        envelopes = {site: self.envelope(site, t) for site in ctx.site_ids}
        out: list[Effect] = [doe_send("doe", d) for d in envelopes.values()]
        cur = _Interval(
            t, f"{ctx.rules.round}-rt{t:03d}", (starts - now).total_seconds(), envelopes, self.stopwatch()
        )
        self.current = cur
        budget = ctx.interval_s * ctx.rules.rolling_stop_fraction
        left = (starts - now).total_seconds()
        guard = 0.3 * ctx.interval_s
        if left - guard <= 0.25 * budget:
            return out + self._record(now, "skipped")  # too little time left
        taking_part = [s for s in ctx.site_ids if s in ready and s in registrations]
        if len(taking_part) < 2:  # no trade without two; the standing envelopes hold
            return out + self._failed(now, f"{len(taking_part)} site(s) ready, at least 2 needed")
        try:
            cur.setup = self._setup(t, cur.round_id, ready, registrations)
        except Exception as exc:  # an infeasible or broken round never ends the service
            return out + self._failed(now, f"its round could not be set up: {exc}")
        cur.stop_at = now + timedelta(seconds=min(budget, left - guard))
        rules = ctx.rules
        cur.run = RoundRun(
            cur.setup,
            Timings(),
            rules.iteration_timeout_s,
            self.stopwatch,
            straggler_wait=rules.straggler_wait,
        )
        return out + list(cur.run.open(now)) + sweep()

    def _setup(self, t: int, round_id: str, ready: set[str], regs: dict[str, Registration]) -> RoundSetup:
        ctx, prev = self.ctx, self.standing
        cfg = remaining_coordinator_config(ctx.cfg, t)
        cfg = cfg.model_copy(update={"admm": cfg.admm.model_copy(update={"max_iterations": self._cap()})})
        registrations = {s: remaining_registration(r, t, ctx.interval_s) for s, r in regs.items()}
        left_out = set(ctx.site_ids) - ready
        sites = tuple(s for s in ctx.site_ids if s not in left_out and s in registrations)
        warm = None if prev is None else prev.warm_for(t, sites)
        rho = None if prev is None else prev.rho
        defaults = ctx.defaults.from_interval(t)
        return round_setup(
            cfg, ctx.feeder, registrations, left_out, defaults, round_id, warm=warm, rho=rho,
            epoch=ctx.epoch,
        )  # fmt: skip

    def _cap(self) -> int:
        return min(self.ctx.rules.rolling_max_iterations, self.ctx.cfg.admm.max_iterations)

    def proposal(self, msg: Proposal | PolishReport, size: int, now: datetime) -> list[Effect]:
        cur = self.current
        if cur is None or cur.run is None or msg.round != cur.round_id or cur.run.outcome is not None:
            return []
        return self._stepped(cur, lambda run: run.proposal(msg, size, now), now)

    def stragglers_waited(self, now: datetime) -> list[Effect]:
        """The wait for an iteration's last proposals is over: it closes without them if it may."""
        cur = self.current
        if cur is None or cur.run is None or cur.run.outcome is not None:
            return []
        return self._stepped(cur, lambda run: run.close_early(now), now)

    def _stepped(
        self, cur: _Interval, step: Callable[[RoundRun], Sequence[Effect]], now: datetime
    ) -> list[Effect]:
        assert cur.run is not None
        try:
            out: list[Effect] = list(step(cur.run))
        except Exception as exc:  # a failed projection never ends the service
            return [cur.run.withdraw(), Relieve(ITERATION), *self._failed(now, f"its round failed: {exc}")]
        if cur.run.outcome is not None:
            out += self._finished(cur, cur.run.outcome, now)
        return out

    def iteration_over(self, now: datetime) -> list[Effect]:
        """The iteration's patience ran out: the round is lost, the standing agreement stands."""
        cur = self.current
        if cur is None or cur.run is None or cur.run.outcome is not None:
            return []
        missing = list(cur.run.missing())
        again = cur.run.repeat()
        if again:
            log.warning("interval %d: round %s: no proposal from %s; its last message sent again",
                        cur.t, cur.round_id, missing)  # fmt: skip
            return list(again)
        log.warning("interval %d: round %s lost %s; the last agreement stands", cur.t, cur.round_id, missing)
        return [cur.run.withdraw(), *self._failed(now, f"no proposal from {missing} in time")]

    def _finished(self, cur: _Interval, outcome: DsoOutcome, now: datetime) -> list[Effect]:
        assert cur.run is not None
        assert cur.setup is not None
        out: list[Effect] = [cur.run.withdraw()]
        if not _boxes_sound(outcome):
            return out + self._failed(now, "it granted an empty box")
        self.standing = standing_from(
            cur.setup, outcome, cur.t, self.ctx.start, self.ctx.interval_s, self.ctx.cfg.intervals
        )
        if self.ctx.rules.checkpoint:
            out.append(Save(self.standing))
        starts = self.ctx.interval_start(cur.t)
        in_time = now < starts
        if in_time:  # late: from t + 1 on; t keeps what was in force
            cur.envelopes = {site: self.envelope(site, cur.t) for site in self.ctx.site_ids}
            out += [doe_send("doe", d) for d in cur.envelopes.values()]
            cur.lead_s = (starts - now).total_seconds()
        status = outcome.status if in_time else f"{outcome.status} (late: not applied to this interval)"
        out += self._record(now, status, cur.round_id, outcome.iterations, keep=True)
        cur.awaiting = set(cur.setup.sites)
        return [*out, Patience(REPORTS, self.ctx.rules.report_timeout_s)]

    def report(self, msg: SiteReport) -> list[Effect]:
        cur = self.current
        if cur is None or msg.round != cur.round_id:
            return []
        cur.awaiting.discard(msg.site)
        return self.reports_over() if not cur.awaiting else []

    def reports_over(self) -> list[Effect]:
        """Every site of the round has reported (it follows the new plan), or patience ran out."""
        self.current = None
        return [Relieve(REPORTS)]

    def _failed(self, now: datetime, why: str) -> list[Effect]:
        cur = self.current
        assert cur is not None
        self.failures.append(f"interval {cur.t}: {why}")
        log.error("interval %d: %s; the last agreement's envelopes stand", cur.t, why)
        return self._record(now, "failed")

    def _record(
        self,
        now: datetime,
        status: str,
        round_id: str | None = None,
        iterations: int | None = None,
        keep: bool = False,
    ) -> list[Effect]:
        """The interval's account in results.json; `keep`: its reports are still awaited."""
        cur = self.current
        assert cur is not None
        if iterations is None:
            iterations = 0 if cur.run is None else cur.run.dso.iteration
        record = RealtimeInterval(
            interval=cur.t,
            start=self.ctx.interval_start(cur.t).isoformat().replace("+00:00", "Z"),
            round=round_id,
            status=status,
            iterations=iterations,
            wall_s=self.stopwatch() - cur.wall0,
            lead_s=cur.lead_s,
            sites=[] if cur.setup is None else list(cur.setup.sites),
            lo_kw={s: d.lo_kw for s, d in cur.envelopes.items()},
            up_kw={s: d.up_kw for s, d in cur.envelopes.items()},
        )
        self.intervals.append(record)
        self.next_t = cur.t + 1
        log.info(
            "interval %d: round %s %s after %d iterations in %.2f s; envelopes %.0f s (simulated) ahead",
            cur.t, cur.round_id, status, iterations, record.wall_s, record.lead_s,
        )  # fmt: skip
        if not keep:
            self.current = None
        return []

    # --- envelopes ---------------------------------------------------------------------------------

    def envelope(self, site: str, t: int) -> Doe:
        """Interval t's envelope of `site` from the standing agreement, or its default."""
        ctx, st = self.ctx, self.standing
        box = None if st is None else st.box(site, t)
        start = ctx.interval_start(t)
        if st is None or box is None:
            return ctx.default_at(site, t)
        lo, up = box
        if lo > up:  # round-off of a box the network pins to a point (within BOX_TOLERANCE_KW)
            lo = up = (lo + up) / 2
        return Doe.from_box(site, st.round, start, ctx.interval_s, lo, up)

    def lead_s(self) -> float | None:
        """How far ahead of its start the last interval's envelopes were published (simulated s)."""
        return self.intervals[-1].lead_s if self.intervals else None


def _boxes_sound(outcome: DsoOutcome) -> bool:
    """No granted box empty beyond round-off (an early-stopped projection of an infeasible target)."""
    lo, up = outcome.granted_lo_kw, outcome.granted_up_kw
    if lo is None or up is None:
        return True
    worst = float((lo - up).max(initial=0.0))
    if worst > BOX_TOLERANCE_KW:
        log.warning("a granted box is empty by %.3g kW", worst)
    return worst <= BOX_TOLERANCE_KW
