"""Assemble the participants' outcomes into the solver-independent `Solution`."""

from __future__ import annotations

import numpy as np

from p2pdoe.core.agreement.community import CommunityOutcome, agreed_schedule, agreed_z
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.envelope import SafeSet
from p2pdoe.core.network import FloatArray
from p2pdoe.core.solution import Dlmp, Policy, Solution, SolverInfo


def trade_prices(
    outs: tuple[CommunityOutcome, ...], peers: tuple[tuple[int, ...], ...], horizon: int
) -> FloatArray:
    """(C, C, T): what buyer c pays seller m, from the buyer's copy (the seller's is identical)."""
    n = len(outs)
    price = np.zeros((n, n, horizon))
    for c, out in enumerate(outs):
        for k, m in enumerate(peers[c]):
            price[c, m] = out.buy_price[k]
    return price


def dlmp(dso: DsoOutcome, safe: SafeSet | None, n_sites: int, horizon: int) -> Dlmp:
    """Voltage and congestion parts from the DSO's corner-row duals (same split as the reference)."""
    zero = np.zeros((n_sites, horizon))
    if dso.grid is None or safe is None:
        return Dlmp(zero, zero, zero, zero)
    parts = {"vmax": zero, "reverse": zero, "vmin": zero, "forward": zero}
    for corner, duals in ((safe.upper, dso.grid.row_duals_up), (safe.lower, dso.grid.row_duals_lo)):
        kinds = np.array(corner.kind)
        for kind in set(corner.kind):
            mask = kinds == kind
            parts[kind] = corner.g[mask].T @ (duals[mask] * dso.rho_envelope)
    return Dlmp(parts["vmax"], parts["reverse"], parts["vmin"], parts["forward"])


def solution(
    policy: Policy,
    qps: tuple[CommunityQP, ...],
    outs: tuple[CommunityOutcome, ...],
    dso: DsoOutcome,
    safe: SafeSet | None,
    wall_time_s: float,
) -> Solution:
    horizon = qps[0].layout.horizon
    peers = tuple(qp.layout.peers for qp in qps)
    return Solution(
        policy=policy,
        z=tuple(o.z for o in outs),
        schedules=tuple(agreed_schedule(qp, o) for qp, o in zip(qps, outs, strict=True)),
        trade_price=trade_prices(outs, peers, horizon),
        dlmp=dlmp(dso, safe, len(outs), horizon),
        objective_eur=float(sum(qp.objective(agreed_z(qp, o)) for qp, o in zip(qps, outs, strict=True))),
        solver=SolverInfo(
            name="ADMM",
            status=dso.status,
            converged=dso.status == "converged",
            iterations=dso.iterations,
            wall_time_s=wall_time_s,
        ),
    )
