"""The centralized reference: every community's QP, reciprocity and the DSO's safe set in one cvxpy
problem. Its optimum is what the decentralized agreement must reach.

Prices are read from the duals: trade prices from reciprocity, DLMPs from the corner rows.
"""

from __future__ import annotations

import time

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from p2pdoe.core.community import CommunityQP
from p2pdoe.core.envelope import Corner, SafeSet, grid_view, safe_set, unmeetable_limit
from p2pdoe.core.market import community_qps, trade_links
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Dlmp, Policy, Solution, SolverInfo, schedule_from_z
from p2pdoe.errors import InfeasibleError

SOLVER = "CLARABEL"


def solve_centralized(s: Scenario, policy: Policy, solver: str = SOLVER) -> Solution:
    """Solve the whole day in one piece; InfeasibleError if no schedule meets every limit."""
    qps = community_qps(s, policy)
    z = [cp.Variable(qp.layout.size, name=f"z_{c.id}") for qp, c in zip(qps, s.communities, strict=True)]
    objective = sum((_objective(qp, zc) for qp, zc in zip(qps, z, strict=True)), start=cp.Constant(0.0))
    local = [con for qp, zc in zip(qps, z, strict=True) for con in _local_constraints(qp, zc)]
    reciprocity = _reciprocity(qps, z)
    grid = _GridPart(s, qps, z, policy)
    problem = cp.Problem(cp.Minimize(objective), local + list(reciprocity.values()) + grid.constraints)
    started = time.perf_counter()
    problem.solve(solver=solver)
    wall = time.perf_counter() - started
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise InfeasibleError(f"the {policy.value} problem is {problem.status}: {_why_infeasible(s, policy)}")
    values = tuple(np.asarray(zc.value, dtype=float) for zc in z)
    return Solution(
        policy=policy,
        z=values,
        schedules=tuple(schedule_from_z(qp, v) for qp, v in zip(qps, values, strict=True)),
        trade_price=_trade_prices(reciprocity, len(qps), s.horizon, s.dt_h),
        dlmp=grid.dlmp(s.dt_h),
        objective_eur=float(sum(qp.objective(v) for qp, v in zip(qps, values, strict=True))),
        solver=SolverInfo(
            name=solver,
            status=str(problem.status),
            converged=problem.status == cp.OPTIMAL,
            iterations=int(problem.solver_stats.num_iters or 0),
            wall_time_s=wall,
        ),
    )


def _why_infeasible(s: Scenario, policy: Policy) -> str:
    """The limit out of reach, where one is on its own (the network's, for a policy that has one)."""
    if policy is not Policy.NONE:
        ranges = [c.technical_range_kw() for c in s.communities]
        low, high = np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])
        why = unmeetable_limit(grid_view(s), low, high)
        if why is not None:
            return why
    return "no schedule meets every limit (none out of reach on its own: their combination is)"


def _objective(qp: CommunityQP, z: cp.Variable) -> cp.Expression:
    return 0.5 * cp.sum(cp.multiply(qp.p_diag, cp.square(z))) + qp.q @ z + qp.constant


def _local_constraints(qp: CommunityQP, z: cp.Variable) -> list[cp.Constraint]:
    """l <= A z <= u, split into equalities, lower and upper rows (infinite bounds dropped)."""
    a = sp.csr_matrix(qp.a)
    eq = qp.lower == qp.upper
    has_lo = ~eq & np.isfinite(qp.lower)
    has_hi = ~eq & np.isfinite(qp.upper)
    out: list[cp.Constraint] = []
    if eq.any():
        out.append(a[eq] @ z == qp.lower[eq])
    if has_lo.any():
        out.append(a[has_lo] @ z >= qp.lower[has_lo])
    if has_hi.any():
        out.append(a[has_hi] @ z <= qp.upper[has_hi])
    return out


def _reciprocity(qps: list[CommunityQP], z: list[cp.Variable]) -> dict[tuple[int, int], cp.Constraint]:
    """buy[c -> m] == sell[m -> c] for every ordered pair (buyer c, seller m)."""
    out = {}
    for link in trade_links(tuple(qp.layout.peers for qp in qps)):
        buy = z[link.buyer][qps[link.buyer].layout.buy(link.buyer_pos)]
        sell = z[link.seller][qps[link.seller].layout.sell(link.seller_pos)]
        out[(link.buyer, link.seller)] = buy == sell
    return out


def _trade_prices(
    reciprocity: dict[tuple[int, int], cp.Constraint], n: int, horizon: int, dt_h: float
) -> FloatArray:
    price = np.zeros((n, n, horizon))
    for (buyer, seller), con in reciprocity.items():
        price[buyer, seller] = np.asarray(con.dual_value, dtype=float) / dt_h
    return price


class _GridPart:
    """The DSO's side: granted envelopes, agreement with the requests, and the safe set."""

    def __init__(self, s: Scenario, qps: list[CommunityQP], z: list[cp.Variable], policy: Policy):
        self.n, self.horizon = len(qps), s.horizon
        self.constraints: list[cp.Constraint] = []
        self.rows: list[tuple[Corner, cp.Constraint]] = []
        if policy is Policy.NONE:
            return
        columns = 1 if policy is Policy.STATIC else s.horizon
        lo_granted = cp.Variable((self.n, columns), name="LO")
        up_granted = cp.Variable((self.n, columns), name="UP")
        lo_full = lo_granted if columns == s.horizon else lo_granted @ np.ones((1, s.horizon))
        up_full = up_granted if columns == s.horizon else up_granted @ np.ones((1, s.horizon))
        for c, qp in enumerate(qps):
            self.constraints.append(z[c][qp.layout.block("lo")] == lo_full[c, :])
            self.constraints.append(z[c][qp.layout.block("up")] == up_full[c, :])
        safe: SafeSet = safe_set(s)
        upper = safe.upper.g @ up_full <= safe.upper.h
        lower = safe.lower.g @ lo_full >= safe.lower.h
        self.rows = [(safe.upper, upper), (safe.lower, lower)]
        self.constraints += [upper, lower]

    def dlmp(self, dt_h: float) -> Dlmp:
        zero = np.zeros((self.n, self.horizon))
        parts = {"vmax": zero, "reverse": zero, "vmin": zero, "forward": zero}
        for corner, con in self.rows:
            dual = np.maximum(np.asarray(con.dual_value, dtype=float), 0.0) / dt_h
            kinds = np.array(corner.kind)
            for kind in set(corner.kind):
                mask = kinds == kind
                parts[kind] = corner.g[mask].T @ dual[mask]
        return Dlmp(parts["vmax"], parts["reverse"], parts["vmin"], parts["forward"])
