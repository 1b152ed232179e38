"""The non-cooperative reading of the market: each community a player that minimises its own cost,
taking the prices as given, with the reciprocity of trades and the DSO's limits as shared
constraints (docs/markets.md, "Non-cooperative: a price-taking equilibrium").

A generalised Nash equilibrium in which every player sees the same multiplier on each shared
constraint is a variational one (Facchinei & Kanzow, 4OR 2007). The players' costs are separable,
so its conditions are those of the welfare problem: the welfare optimum, with its trade prices and
DLMPs, is the variational equilibrium, and the agreement's ADMM computes it. `best_response_gaps`
checks the players' side of those conditions at an answer: given the prices, can any community
lower its own cost (money at those prices) by changing its schedule alone?
"""

from __future__ import annotations

import numpy as np

from p2pdoe.core.agreement.local_solver import LocalSolver
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.market import community_qps
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy, Solution


def priced_linear_term(qp: CommunityQP, c: int, sol: Solution, dt_h: float) -> FloatArray:
    """Community c's linear term with what it pays at `sol`'s prices: each kWh bought from peer m at
    trade_price[c, m], each sold to m at trade_price[m, c] earned, each kW of export capacity at its
    export DLMP and each kW of import capacity at its import DLMP."""
    lay = qp.layout
    q = qp.q.copy()
    for k, m in enumerate(lay.peers):
        q[lay.buy(k)] += dt_h * sol.trade_price[c, m]
        q[lay.sell(k)] -= dt_h * sol.trade_price[m, c]
    q[lay.block("up")] += dt_h * sol.dlmp.export_total[c]
    q[lay.block("lo")] -= dt_h * sol.dlmp.import_total[c]
    return q


def best_response_gaps(s: Scenario, sol: Solution, policy: Policy = Policy.DYNAMIC) -> dict[str, float]:
    """Per community, how much it would save (EUR, >= 0 up to the solver's tolerance) by answering
    `sol`'s prices with its own best schedule instead of `sol`'s: 0 at an equilibrium."""
    gaps = {}
    for c, qp in enumerate(community_qps(s, policy)):
        q = priced_linear_term(qp, c, sol, s.dt_h)
        best = LocalSolver(qp, np.zeros(qp.layout.size)).solve(q).z
        gaps[s.ids[c]] = _priced(qp, q, sol.z[c]) - _priced(qp, q, best)
    return gaps


def _priced(qp: CommunityQP, q: FloatArray, z: FloatArray) -> float:
    return float(0.5 * z @ (qp.p_diag * z) + q @ z)
