"""Build every participant of a round from a scenario (what site configs will hold in a deployment)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pdoe.core.agreement.community import CommunityParticipant
from p2pdoe.core.agreement.dso import DsoParticipant, Ranges, RoundPlan, with_rho
from p2pdoe.core.agreement.grid_solver import Bounds, GridSolver
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.envelope import SafeSet, safe_set
from p2pdoe.core.market import community_qps
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.messages import WarmStart
from p2pdoe.core.solution import Policy


@dataclass(frozen=True)
class Participants:
    dso: DsoParticipant
    communities: tuple[CommunityParticipant, ...]
    qps: tuple[CommunityQP, ...]
    safe: SafeSet | None  # None without envelopes


def envelope_bounds_of(qps: tuple[CommunityQP, ...]) -> Bounds:
    """Each site's public technical bounds on lo and up, as its own QP states them."""

    def rows(name: str, upper: bool) -> np.ndarray:
        out = []
        for qp in qps:
            base = qp.a.shape[0] - qp.layout.size  # the identity rows come last
            sl = qp.layout.block(name)
            out.append((qp.upper if upper else qp.lower)[base + sl.start : base + sl.stop])
        return np.array(out)

    return Bounds(rows("lo", False), rows("lo", True), rows("up", False), rows("up", True))


def participants(
    s: Scenario,
    policy: Policy,
    round_id: str,
    *,
    warm: WarmStart | None = None,
    rho: tuple[float, float] | None = None,
) -> Participants:
    """Every participant of a round over the whole scenario; `warm` and `rho` as in `round_setup`."""
    qps = tuple(community_qps(s, policy))
    ids = tuple(s.ids)
    communities = tuple(
        CommunityParticipant(ids[c], tuple(ids[m] for m in s.market.peers[c]), qp, s.dt_h)
        for c, qp in enumerate(qps)
    )
    grid, safe = None, None
    if policy is not Policy.NONE:
        safe = safe_set(s)
        grid = GridSolver(safe, envelope_bounds_of(qps), static=policy is Policy.STATIC)
    plan = RoundPlan(
        round=round_id,
        policy=policy.value,
        start=s.start.isoformat().replace("+00:00", "Z"),
        dt_h=s.dt_h,
        sites=ids,
        peers=s.market.peers,
        initial_trade_price=tuple(float(v) for v in 0.5 * (s.price_import + s.price_export)),
        warm=warm,
    )
    bounds = envelope_bounds_of(qps)
    ranges = Ranges(bounds.lo_min, bounds.up_max)
    dso = DsoParticipant(plan, s.horizon, with_rho(s.admm, rho), grid, ranges)
    return Participants(dso, communities, qps, safe)
