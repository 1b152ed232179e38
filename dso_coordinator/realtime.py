"""The coordinator's real-time day: a rolling horizon on the shared simulated clock.

For each interval t after the one in force, a round over intervals t..T-1 opens as interval t-1
starts (at once for the first), warm-started from the last agreement (shifted) with its final rho.
The sites bring their measured state of charge and updated forecasts into their own problems. At
`rolling_stop_fraction` of interval t-1 the round is asked to end at its next iteration (every
grant is safe, so a stopped round's envelopes are too), and interval t's envelopes are published,
retained with their validity window, before t starts. If the round fails (a site silent past the
iteration deadline), the last agreement's envelopes for t stand: they were safe together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from dso_coordinator.checkpoint import Standing, save, standing_from
from dso_coordinator.service import Coordinator, utc_now
from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import (
    RoundSetup,
    remaining_coordinator_config,
    remaining_registration,
    round_setup,
)
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.schemas.results import RealtimeInterval
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.services.transport import Transport

log = logging.getLogger("dso_coordinator.realtime")
BOX_TOLERANCE_KW = 1e-6


@dataclass
class Day:
    intervals: list[RealtimeInterval] = field(default_factory=list)


class RollingHorizon:
    """`standing`: the day-ahead agreement, or a restarted coordinator's checkpoint (None: none,
    so the defaults stand until the first round ends)."""

    def __init__(
        self,
        coordinator: Coordinator,
        transport: Transport,
        standing: Standing | None,
        rejoining: bool = False,
    ):
        self.c = coordinator
        self.transport = transport
        self.standing = standing
        self.rejoining = rejoining
        self.day = Day()

    async def run(self) -> Day:
        c = self.c
        now = c.current_interval()
        for site in c.site_ids:  # the interval in force: a restarted coordinator's first word
            await c._publish_doe(self.transport, "doe", self._envelope(site, now))
        if self.rejoining:
            await c.await_sites_briefly()
        first = c.current_interval() + 1
        hours = c.settings.hours
        last = c.cfg.intervals if hours is None else min(c.cfg.intervals, round(hours * 3600 / c.interval_s))
        for t in range(first, last):
            opens = c.clock.wall_at(c.start + timedelta(seconds=c.interval_s * (t - 1)))
            await asyncio.sleep(max(0.0, (opens - utc_now()).total_seconds()))
            await self._interval(t)
        end = c.clock.wall_at(c.start + timedelta(seconds=c.interval_s * last))
        await asyncio.sleep(max(0.0, (end - utc_now()).total_seconds()))
        return self.day

    async def _interval(self, t: int) -> None:
        """The standing agreement's envelopes for t go out first (safe together, well ahead); a
        round's replace them only if it ends before t starts, so what is in force at t's start
        always comes from one agreement. A round is skipped when too little time is left."""
        c = self.c
        starts = c.start + timedelta(seconds=c.interval_s * t)
        envelopes = {site: self._envelope(site, t) for site in c.site_ids}
        for doe in envelopes.values():
            await c._publish_doe(self.transport, "doe", doe)
        lead = (starts - c.now()).total_seconds()  # of the envelopes in force at t's start
        budget = c.clock.wall_seconds(c.interval_s * c.settings.rolling_stop_fraction)
        left = (c.clock.wall_at(starts) - utc_now()).total_seconds()
        guard = 0.3 * c.clock.wall_seconds(c.interval_s)
        round_id = f"{c.settings.round}-rt{t:03d}"
        t0 = time.perf_counter()
        setup, outcome = None, None
        if left - guard > 0.25 * budget:
            stop_at = t0 + min(budget, left - guard)
            setup, outcome = await self._round(t, round_id, stop_at)
        wall = time.perf_counter() - t0
        in_time = c.now() < starts
        if outcome is not None and not _boxes_sound(outcome):
            log.warning("interval %d: round %s granted an empty box; the last agreement stands", t, round_id)
            outcome = None
        if outcome is not None and setup is not None:
            await self._stand(setup, outcome, t)  # late: from t + 1 on; t keeps what was in force
        if outcome is not None and in_time:
            envelopes = {site: self._envelope(site, t) for site in c.site_ids}
            for doe in envelopes.values():
                await c._publish_doe(self.transport, "doe", doe)
            lead = (starts - c.now()).total_seconds()
        record = RealtimeInterval(
            interval=t,
            start=starts.isoformat().replace("+00:00", "Z"),
            round=round_id if outcome is not None else None,
            status=_status(setup, outcome, in_time),
            iterations=0 if setup is None else setup.dso.iteration if outcome is None else outcome.iterations,
            wall_s=wall,
            lead_s=lead,
            sites=[] if setup is None else list(setup.sites),
            lo_kw={s: d.lo_kw for s, d in envelopes.items()},
            up_kw={s: d.up_kw for s, d in envelopes.items()},
        )
        self.day.intervals.append(record)
        log.info(
            "interval %d: round %s %s after %d iterations in %.2f s; envelopes %.0f s (simulated) ahead",
            t, round_id, record.status, record.iterations, wall, lead,
        )  # fmt: skip

    async def _round(self, t: int, round_id: str, stop_at: float) -> tuple[RoundSetup, DsoOutcome | None]:
        c, prev = self.c, self.standing
        cfg = remaining_coordinator_config(c.cfg, t)
        registrations = {s: remaining_registration(r, t) for s, r in c.registrations.items()}
        left_out = set(c.site_ids) - c._ready()
        sites = tuple(s for s in c.site_ids if s not in left_out and s in registrations)
        warm = None if prev is None else prev.warm_for(t, sites)
        rho = None if prev is None else prev.rho
        setup = await asyncio.to_thread(
            round_setup, cfg, c.feeder, registrations, left_out, c.defaults, round_id, warm=warm, rho=rho
        )
        if len(setup.sites) < 2:
            return setup, None
        outcome, missing = await c._run_round(self.transport, setup, stop_at)
        await self.transport.publish(topics.round_open(round_id), b"", retain=True)  # withdraw the opening
        if outcome is None:
            log.warning(
                "interval %d: round %s lost %s; the last agreement stands", t, round_id, list(missing)
            )
        return setup, outcome

    def _envelope(self, site: str, t: int) -> Doe:
        """Interval t's envelope of `site` from the standing agreement, or its default."""
        c, st = self.c, self.standing
        box = None if st is None else st.box(site, t)
        start = c.start + timedelta(seconds=c.interval_s * t)
        if st is None or box is None:
            return c.default_envelope(site, start, c.interval_s)
        lo, up = box
        if lo > up:  # round-off of a box the network pins to a point (within BOX_TOLERANCE_KW)
            lo = up = (lo + up) / 2
        return Doe.from_box(site, st.round, start, c.interval_s, lo, up)

    async def _stand(self, setup: RoundSetup, outcome: DsoOutcome, t: int) -> None:
        c = self.c
        self.standing = standing_from(setup, outcome, t, c.start, c.interval_s, c.cfg.intervals)
        if c.settings.checkpoint is not None:
            await asyncio.to_thread(save, c.settings.checkpoint, self.standing)  # fsync: off the loop


def _boxes_sound(outcome: DsoOutcome) -> bool:
    """No granted box empty beyond round-off (an early-stopped projection of an infeasible target)."""
    lo, up = outcome.granted_lo_kw, outcome.granted_up_kw
    if lo is None or up is None:
        return True
    worst = float((lo - up).max(initial=0.0))
    if worst > BOX_TOLERANCE_KW:
        log.warning("a granted box is empty by %.3g kW", worst)
    return worst <= BOX_TOLERANCE_KW


def _status(setup: RoundSetup | None, outcome: DsoOutcome | None, in_time: bool) -> str:
    if setup is None:
        return "skipped"  # too little time left: the standing agreement's envelopes stood
    if outcome is None:
        return "failed"
    return outcome.status if in_time else f"{outcome.status} (late: not applied to this interval)"
