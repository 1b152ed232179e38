"""A polish of ADMM's answer from the participants' own multipliers: does it land on the optimum,
and how early? (issue 18, items 1 and 2; an exploration, emulated in one process)

    .venv/bin/python benchmarks/polish_explore.py [--cases default synthetic-50] \
        [--eps 0.002 0.02 0.05 0.1] [--at 20 30 40] [--baselines]

For each case and stopping tolerance `eps_abs_kw` it runs ADMM in process (`run_admm`, the residual
test alone; `--at K` cuts the round at iteration K instead), taking each community's last local
multipliers (its last iteration's OSQP solve's y, which its outcome keeps). The polish then takes
as the active set of the whole day's QP (every community's rows, reciprocity, the DSO's safe set):
each community's rows with a nonzero multiplier (what the community knows), the DSO's safe rows its
granted envelopes hold at a bound (what the DSO knows), every equality; solves that
equality-constrained KKT system, adds the rows it violates and solves again (at most
`MAX_CORRECTIONS` times). The KKT is solved here as one sparse system; a decentralized polish
solves the same system by a Schur complement (each site sends the response of its coupling values
to prices at its active set, the DSO solves for the prices): the last column gives that block's size.

A cell: ADMM's iterations: ADMM's worst schedule difference from the optimum (kW) -> the polished
one's / the polished objective's gap (% of the gross energy cost) / corrections; "failed" when rows
are still violated after the corrections. The optimum is the same QP solved by Clarabel at 1e-12.
`--baselines` adds facts of the day's QP, how far the project's reference (Clarabel at its default
tolerances) is from the optimum, and two polishes that do not work here, for the record: OSQP on the
whole day with its own polish (eps 1e-3), and an active set read from ADMM's schedules (rows within
1e-3 of a bound) with primal-dual active-set corrections. `--diagnose` appends to each cell how the
guessed active set differs from the optimum's (rows with a nonzero multiplier in an OSQP solve at
1e-9), the communities' rows and the DSO's apart, and where the polish lands from the optimum's
community rows with the DSO's guess. `--certify` appends the polished answer's KKT residual (see
`kkt_certificate`): a certificate of optimality computed here for the whole day at once. `--prices`
appends how far the polish's reciprocity multipliers (which a decentralized polish would return as
trade prices) and ADMM's trade prices are from the reference's (EUR/kWh).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import clarabel
import numpy as np
import osqp
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from admm_scaling import FULL, SCHEDULE_KEYS, Case, _footer, _log, _warm_up

from p2pdoe.analysis.results import build_results
from p2pdoe.core.agreement.polish import DsoPolish, SitePolish, coupled_positions, coupling_rows, solve
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.market import community_qps, trade_links
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy, schedule_from_z
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import AdmmRun, run_admm

SCHUR_MAX_ROWS = 6000  # the Schur check's dense system of the coupling rows stays below this
ACTIVE_TOL = 1e-3  # a row this close to a bound (in its own unit) is held there: the DSO's guess
REG = 1e-9  # the KKT's primal and dual regularisation, refined away
MAX_CORRECTIONS = 10
VIOLATION = 1e-6  # a row violated by more joins the active set
CERTIFY_TOL = 1e-6  # the certificate's rows at a bound
OPTIMUM_TOL = 1e-12  # Clarabel's gaps and feasibility for the optimum
DEFAULT_CASES = ("default", "default, 15 min", "synthetic-10-peers4", "synthetic-20-peers4")
DEFAULT_EPS = (0.002, 0.02, 0.05, 0.1)
DUAL_TOL = 1e-7  # a multiplier beyond this makes its row active


@dataclass(frozen=True)
class DayQP:
    """The whole day as one QP: min 1/2 x'Px + q'x, l <= Ax <= u."""

    p: FloatArray
    q: FloatArray
    a: sp.csr_matrix
    lower: FloatArray
    upper: FloatArray
    offsets: tuple[int, ...]  # each community's first variable
    row_offsets: tuple[int, ...]  # each community's first local row; the coupling rows follow


def day_qp(s: Scenario, qps: list[CommunityQP]) -> DayQP:
    offsets = tuple(int(v) for v in np.cumsum([0] + [qp.layout.size for qp in qps]))
    n = offsets[-1]
    blocks = [sp.block_diag([qp.a for qp in qps], format="csr")]
    lower = [np.concatenate([qp.lower for qp in qps])]
    upper = [np.concatenate([qp.upper for qp in qps])]
    rec = _reciprocity_rows(qps, offsets, n)
    blocks.append(rec)
    lower.append(np.zeros(rec.shape[0]))
    upper.append(np.zeros(rec.shape[0]))
    safe = safe_set(s)
    for corner, name in ((safe.upper, "up"), (safe.lower, "lo")):
        rows = _corner_rows(corner.g, qps, offsets, n, name)
        h = corner.h.reshape(-1)  # (K*T,), row k*T + t
        blocks.append(rows)
        lower.append(np.full(h.size, -np.inf) if name == "up" else h)
        upper.append(h if name == "up" else np.full(h.size, np.inf))
    return DayQP(
        p=np.concatenate([qp.p_diag for qp in qps]),
        q=np.concatenate([qp.q for qp in qps]),
        a=sp.vstack(blocks, format="csr"),
        lower=np.concatenate(lower),
        upper=np.concatenate(upper),
        offsets=offsets,
        row_offsets=tuple(int(v) for v in np.cumsum([0] + [qp.a.shape[0] for qp in qps])),
    )


def _reciprocity_rows(qps: list[CommunityQP], offsets: tuple[int, ...], n: int) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    r = 0
    horizon = qps[0].layout.horizon
    for link in trade_links(tuple(qp.layout.peers for qp in qps)):
        buy = qps[link.buyer].layout.buy(link.buyer_pos)
        sell = qps[link.seller].layout.sell(link.seller_pos)
        for t in range(horizon):
            rows += [r, r]
            cols += [offsets[link.buyer] + buy.start + t, offsets[link.seller] + sell.start + t]
            vals += [1.0, -1.0]
            r += 1
    return sp.csr_matrix((vals, (rows, cols)), shape=(r, n))


def _corner_rows(
    g: FloatArray, qps: list[CommunityQP], offsets: tuple[int, ...], n: int, name: str
) -> sp.csr_matrix:
    horizon = qps[0].layout.horizon
    rows, cols, vals = [], [], []
    for k in range(g.shape[0]):
        for c in np.flatnonzero(g[k]):
            start = offsets[c] + qps[c].layout.block(name).start
            for t in range(horizon):
                rows.append(k * horizon + t)
                cols.append(start + t)
                vals.append(float(g[k, c]))
    return sp.csr_matrix((vals, (rows, cols)), shape=(g.shape[0] * horizon, n))


@dataclass(frozen=True)
class Polished:
    x: FloatArray
    corrections: int
    violation: float
    at_lo: np.ndarray  # the final active set
    at_up: np.ndarray
    y: FloatArray  # the KKT system's multipliers of every row (zero off the active set)


def dual_polish(d: DayQP, local_y: FloatArray, x_admm: FloatArray) -> Polished:
    """The active set guessed from what each participant holds; violated rows join until none is."""
    return _add_violated(d, *guessed_active(d, local_y, x_admm))


def guessed_active(d: DayQP, local_y: FloatArray, x_admm: FloatArray) -> tuple[np.ndarray, np.ndarray]:
    """Rows at their lower and upper bounds: the communities' rows with a nonzero multiplier (their
    rows come first in `d`), the DSO's rows that ADMM's answer holds at a bound, every equality."""
    equal = d.lower == d.upper
    local = np.arange(d.a.shape[0]) < local_y.size
    y = np.zeros(d.a.shape[0])
    y[local] = local_y
    ax = d.a @ x_admm
    held_up = ~local & (d.upper - ax <= ACTIVE_TOL)
    held_lo = ~local & (ax - d.lower <= ACTIVE_TOL)
    at_up = ~equal & ((local & (y > DUAL_TOL)) | held_up)
    at_lo = equal | (~equal & ((local & (y < -DUAL_TOL)) | held_lo))
    return at_lo, at_up


def _add_violated(d: DayQP, at_lo: np.ndarray, at_up: np.ndarray) -> Polished:
    equal = d.lower == d.upper
    for corrections in range(MAX_CORRECTIONS + 1):
        x, y = _kkt(d, at_lo, at_up)
        ax = d.a @ x
        over, under = ~equal & (ax > d.upper + VIOLATION), ~equal & (ax < d.lower - VIOLATION)
        if not (over.any() or under.any()) or corrections == MAX_CORRECTIONS:
            break
        at_up, at_lo = at_up | over, at_lo | under
    violation = float(max(np.max(ax - d.upper, initial=0.0), np.max(d.lower - ax, initial=0.0)))
    return Polished(x, corrections, violation, at_lo, at_up, y)


def primal_polish(d: DayQP, x0: FloatArray) -> Polished:
    """Baseline: the active set from x0's rows at a bound, then primal-dual active-set corrections
    (violated rows join, rows whose multiplier has the wrong sign leave)."""
    ax = d.a @ x0
    equal = d.lower == d.upper
    at_lo = equal | (ax - d.lower <= ACTIVE_TOL)
    at_up = ~equal & (d.upper - ax <= ACTIVE_TOL)
    for corrections in range(MAX_CORRECTIONS + 1):
        x, y = _kkt(d, at_lo, at_up)
        ax = d.a @ x
        new_up = ~equal & ((at_up & (y > -DUAL_TOL)) | (ax > d.upper + VIOLATION))
        new_lo = equal | (~equal & ((at_lo & ~at_up & (y < DUAL_TOL)) | (ax < d.lower - VIOLATION)))
        unchanged = np.array_equal(new_up, at_up) and np.array_equal(new_lo, at_lo)
        if unchanged or corrections == MAX_CORRECTIONS:
            break
        at_lo, at_up = new_lo, new_up
    violation = float(max(np.max(ax - d.upper, initial=0.0), np.max(d.lower - ax, initial=0.0)))
    return Polished(x, corrections, violation, at_lo, at_up, y)


def _kkt(d: DayQP, at_lo: np.ndarray, at_up: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """The equality-constrained QP on the active rows: regularised, then refined."""
    rows = np.flatnonzero(at_lo | at_up)
    a = d.a[rows]
    b = np.where(at_up[rows], d.upper[rows], d.lower[rows])
    n, m = d.p.size, rows.size
    k = sp.bmat([[sp.diags(d.p + REG), a.T], [a, -REG * sp.identity(m)]], format="csc")
    exact = sp.bmat([[sp.diags(d.p), a.T], [a, None]], format="csc")
    rhs = np.concatenate([-d.q, b])
    lu = spla.splu(k)
    sol = lu.solve(rhs)
    for _ in range(5):
        sol = sol + lu.solve(rhs - exact @ sol)
    y = np.zeros(d.a.shape[0])
    y[rows] = sol[n:]
    return sol[:n], y


def last_iteration_multipliers(run: AdmmRun) -> FloatArray:
    """Each community's multipliers from its last iteration's solve (its outcome keeps them)."""
    ys = [out.multipliers for out in run.communities]
    assert all(y is not None for y in ys)
    return np.concatenate(ys)


def clarabel_solve(d: DayQP, tol: float | None) -> FloatArray:
    """The day's QP by Clarabel at `tol` (gaps and feasibility), or at its defaults (None: what cvxpy
    uses for the project's centralized reference)."""
    eq = d.lower == d.upper
    hi = ~eq & np.isfinite(d.upper)
    lo = ~eq & np.isfinite(d.lower)
    a = sp.vstack([d.a[eq], d.a[hi], -d.a[lo]], format="csc")
    b = np.concatenate([d.lower[eq], d.upper[hi], -d.lower[lo]])
    cones = [clarabel.ZeroConeT(int(eq.sum())), clarabel.NonnegativeConeT(int(hi.sum() + lo.sum()))]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    if tol is not None:
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
        settings.tol_ktratio = 1e-10
    solution = clarabel.DefaultSolver(sp.diags(d.p, format="csc"), d.q, a, b, cones, settings).solve()
    return np.asarray(solution.x, dtype=float)


def osqp_polish(d: DayQP, eps: float) -> tuple[FloatArray, int, bool]:
    """Baseline: OSQP on the whole day with its own polish: x, iterations, whether the polish took."""
    r = _osqp_day(d, eps, 0.0, polishing=True)
    return np.asarray(r.x), int(r.info.iter), int(r.info.status_polish) == 1


def _osqp_day(d: DayQP, eps_abs: float, eps_rel: float, polishing: bool) -> Any:
    """The day's QP by OSQP; its result."""
    solver = osqp.OSQP()
    solver.setup(
        P=sp.diags(d.p, format="csc"),
        q=d.q,
        A=d.a.tocsc(),
        l=d.lower,
        u=np.minimum(d.upper, 1e20),
        eps_abs=eps_abs,
        eps_rel=eps_rel,
        max_iter=500_000,
        polishing=polishing,
        verbose=False,
    )
    return solver.solve()


def schedule_diff(qps: list[CommunityQP], d: DayQP, x: FloatArray, y: FloatArray) -> float:
    """The worst difference of two days' schedules (kW)."""
    return max(
        float(np.max(np.abs(a[key] - b[key])))
        for c, qp in enumerate(qps)
        for a, b in [(schedule_from_z(qp, _part(d, x, c)), schedule_from_z(qp, _part(d, y, c)))]
        for key in SCHEDULE_KEYS
    )


def _part(d: DayQP, x: FloatArray, c: int) -> FloatArray:
    return x[d.offsets[c] : d.offsets[c + 1]]


def schur_block_sizes(qps: list[CommunityQP], local_y: FloatArray) -> tuple[int, int]:
    """The largest site's coupling values and the rank of their response to prices at its active
    set: what one site would send for a decentralized polish (a dense block of that rank)."""
    sizes, ranks, start = [], [], 0
    for qp in qps:
        y = local_y[start : start + qp.a.shape[0]]
        start += qp.a.shape[0]
        coupled = coupled_positions(qp.layout)
        sizes.append(coupled.size)
        ranks.append(_response_rank(qp, y, coupled))
    return max(sizes), max(ranks)


def _response_rank(qp: CommunityQP, y: FloatArray, coupled: np.ndarray) -> int:
    equal = qp.lower == qp.upper
    rows = np.flatnonzero(equal | (y > DUAL_TOL) | (y < -DUAL_TOL))
    a = sp.csc_matrix(qp.a)[rows]
    n, m = qp.layout.size, rows.size
    k = sp.bmat([[sp.diags(qp.p_diag + REG), a.T], [a, -REG * sp.identity(m)]], format="csc")
    rhs = np.zeros((n + m, coupled.size))
    rhs[coupled, np.arange(coupled.size)] = 1.0
    response = spla.splu(k).solve(rhs)[coupled]
    s = np.linalg.svd(0.5 * (response + response.T), compute_uv=False)
    return int(np.sum(s > 1e-6 * max(s[0], 1e-300)))


def schur_solve(
    s: Scenario, d: DayQP, qps: list[CommunityQP], at_lo: np.ndarray, at_up: np.ndarray
) -> FloatArray:
    """The polish's KKT system solved the decentralized way, by the project's own parties
    (`p2pdoe.core.agreement.polish`, without their priors and checks): each community eliminates
    its own variables at its part of the active set and hands over the response of its coupling
    values to their prices; the DSO solves for the multipliers of the active coupling rows; the
    answer is refined by the parties' small exchanges; each community recovers its schedule."""
    sites = [
        SitePolish(qp, at_lo[start:stop], at_up[start:stop], np.zeros(stop - start))
        for qp, start, stop in zip(qps, d.row_offsets[:-1], d.row_offsets[1:], strict=True)
    ]
    rows = coupling_rows([qp.layout for qp in qps], safe_set(s))
    coupling = slice(d.row_offsets[-1], None)
    solve(sites, DsoPolish(rows, at_lo[coupling], at_up[coupling], np.zeros(rows.b.shape[0])))
    return np.concatenate([site.schedule() for site in sites])


Stop = tuple[str, dict[str, float]]  # a column's label and the admm settings that end the round there


def stops(eps: list[float], at: list[int]) -> list[Stop]:
    """Rounds that end where the residuals meet `eps_abs_kw`, or that are cut at an iteration."""
    by_eps = [(f"eps_abs_kw {e}", {"eps_abs_kw": e, "eps_price_eur_per_kwh": 1.0}) for e in eps]
    by_count = [(f"cut at {k}", {"eps_abs_kw": 1e-9, "max_iterations": k}) for k in at]
    return by_eps + by_count


def _run_case(
    case: Case, columns: list[Stop], baselines: bool, diagnose: bool, certify: bool, prices: bool
) -> list[str]:
    _log(f"{case.label}: the optimum ...")
    s = load_scenario(case.scenario, case.overrides)
    qps = community_qps(s, Policy.DYNAMIC)
    d = day_qp(s, qps)
    optimum = clarabel_solve(d, OPTIMUM_TOL)
    gross = build_results(s, solve_centralized(s, Policy.DYNAMIC), "centralized").totals.gross_energy_eur
    cells, sizes = [], ""
    reference_prices = solve_centralized(s, Policy.DYNAMIC).trade_price if prices else None
    optimum_active = _optimum_active(d) if diagnose else None
    for label, admm in columns:
        overrides = {**(case.overrides or {}), "admm": admm}
        run = run_admm(load_scenario(case.scenario, overrides), Policy.DYNAMIC)
        x0 = np.concatenate(run.solution.z)
        local_y = last_iteration_multipliers(run)
        p = dual_polish(d, local_y, x0)
        gap = 100.0 * (_objective(d, p.x) - _objective(d, optimum)) / gross
        tail = "failed" if p.violation > VIOLATION else f"{p.corrections}"
        cells.append(
            f"{run.solution.solver.iterations}: {schedule_diff(qps, d, x0, optimum):.2f} → "
            f"{schedule_diff(qps, d, p.x, optimum):.2f} / {gap:.4f} / {tail}"
        )
        if prices:
            cells[-1] += " " + _price_errors(s, qps, d, p, run.solution.trade_price, reference_prices)
        if certify and p.violation <= VIOLATION:  # a failed polish is no candidate
            cells[-1] += f" (KKT residual {kkt_certificate(d, p.x):.0e})"
        if optimum_active is not None:
            cells[-1] += " " + _diagnosis(qps, d, optimum, optimum_active, guessed_active(d, local_y, x0))
        _log(f"  {label}: {cells[-1]}")
        if not sizes:
            sizes = "{:,} / {:,}".format(*schur_block_sizes(qps, local_y))
            sizes += " / " + _schur_check(s, d, qps, p)
        if baselines and label == columns[0][0]:
            cells += _baselines(qps, d, optimum, x0)
    return [*cells, sizes]


def _price_errors(
    s: Scenario,
    qps: list[CommunityQP],
    d: DayQP,
    p: Polished,
    admm: FloatArray,
    reference: FloatArray | None,
) -> str:
    """How far the polish's reciprocity multipliers and ADMM's trade prices are from the
    reference's trade prices (EUR/kWh, the largest over every link and interval)."""
    assert reference is not None
    links = trade_links(tuple(qp.layout.peers for qp in qps))
    horizon = qps[0].layout.horizon
    start = d.row_offsets[-1]
    polished = p.y[start : start + len(links) * horizon].reshape(len(links), horizon) / s.dt_h
    pairs = [(link.buyer, link.seller) for link in links]
    ref = np.array([reference[b, m] for b, m in pairs])
    theirs = np.array([admm[b, m] for b, m in pairs])
    return (
        f"[prices from the reference: polish {np.max(np.abs(polished - ref)):.3f}, "
        f"ADMM {np.max(np.abs(theirs - ref)):.4f} EUR/kWh]"
    )


def kkt_certificate(d: DayQP, x: FloatArray) -> float:
    """How far x is from satisfying the KKT conditions: the least largest stationarity residual
    |Px + q + A'y| over multipliers y of the right sign on the rows x holds at a bound (zero
    elsewhere), found as a least-squares problem in y by OSQP. About zero exactly when x is optimal;
    a degenerate active set does not matter, since any multipliers of the right sign will do."""
    ax = d.a @ x
    equal = d.lower == d.upper
    at_up = ~equal & (d.upper - ax <= CERTIFY_TOL)
    at_lo = ~equal & (ax - d.lower <= CERTIFY_TOL)
    rows = np.flatnonzero(equal | at_up | at_lo)
    a = d.a[rows]
    gradient = d.p * x + d.q
    free = equal[rows] | (at_up[rows] & at_lo[rows])
    lower = np.where(free | at_lo[rows], -np.inf, 0.0)
    upper = np.where(free | at_up[rows], np.inf, 0.0)
    solver = osqp.OSQP()
    solver.setup(
        P=(a @ a.T).tocsc(),
        q=a @ gradient,
        A=sp.identity(rows.size, format="csc"),
        l=lower,
        u=upper,
        eps_abs=1e-12,
        eps_rel=1e-12,
        max_iter=200_000,
        polishing=True,
        verbose=False,
    )
    y = np.asarray(solver.solve().x)
    return float(np.max(np.abs(a.T @ y + gradient)))


def _optimum_active(d: DayQP) -> tuple[np.ndarray, np.ndarray]:
    """The optimum's rows with a nonzero multiplier (OSQP at 1e-9), at their lower and upper bounds."""
    y = _osqp_tight(d)
    equal = d.lower == d.upper
    return equal | (~equal & (y < -DUAL_TOL)), ~equal & (y > DUAL_TOL)


def _diagnosis(
    qps: list[CommunityQP],
    d: DayQP,
    optimum: FloatArray,
    optimum_active: tuple[np.ndarray, np.ndarray],
    guess: tuple[np.ndarray, np.ndarray],
) -> str:
    """How the guess differs from the optimum's active set (rows guessed active that are not, rows
    not guessed that are), the communities' rows and the DSO's apart; and the polish from the
    optimum's community rows with the DSO's guess."""
    local = np.arange(d.a.shape[0]) < d.row_offsets[-1]
    extra = (guess[0] & ~optimum_active[0]) | (guess[1] & ~optimum_active[1])
    lacking = (~guess[0] & optimum_active[0]) | (~guess[1] & optimum_active[1])
    mixed_lo = np.where(local, optimum_active[0], guess[0])
    mixed_up = np.where(local, optimum_active[1], guess[1])
    oracle = _add_violated(d, mixed_lo, mixed_up)
    return (
        f"[communities +{int(np.sum(extra & local))}/-{int(np.sum(lacking & local))}, "
        f"DSO +{int(np.sum(extra & ~local))}/-{int(np.sum(lacking & ~local))}; "
        f"with the optimum's community rows {schedule_diff(qps, d, oracle.x, optimum):.2f} kW]"
    )


def _schur_check(s: Scenario, d: DayQP, qps: list[CommunityQP], p: Polished) -> str:
    coupling_rows = int(np.sum((p.at_lo | p.at_up)[d.row_offsets[-1] :]))
    if coupling_rows > SCHUR_MAX_ROWS:
        return f"not checked ({coupling_rows:,} coupling rows)"
    return f"{schedule_diff(qps, d, schur_solve(s, d, qps, p.at_lo, p.at_up), p.x):.1e}"


def _baselines(qps: list[CommunityQP], d: DayQP, optimum: FloatArray, x0: FloatArray) -> list[str]:
    x, iterations, took = osqp_polish(d, 1e-3)
    primal = primal_polish(d, x0)
    return [
        _facts(d),
        f"{schedule_diff(qps, d, clarabel_solve(d, None), optimum):.3f}",
        f"{iterations:,} / {'took' if took else 'failed'} / {schedule_diff(qps, d, x, optimum):.2f}",
        f"{schedule_diff(qps, d, primal.x, optimum):,.0f}",
    ]


def _facts(d: DayQP) -> str:
    """Variables, rows with a nonzero multiplier at the optimum (OSQP at 1e-9), variables without
    curvature, the smallest curvature."""
    y = _osqp_tight(d)
    active = int(np.sum((d.lower == d.upper) | (np.abs(y) > DUAL_TOL)))
    flat = int(np.sum(d.p == 0))
    return f"{d.p.size:,} / {active:,} / {flat:,} / {d.p[d.p > 0].min():.0e}"


def _osqp_tight(d: DayQP) -> FloatArray:
    """The optimum's multipliers, from OSQP at 1e-9."""
    return np.asarray(_osqp_day(d, 1e-9, 1e-9, polishing=False).y)


def _objective(d: DayQP, x: FloatArray) -> float:
    return float(0.5 * x @ (d.p * x) + d.q @ x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="case labels of admm_scaling")
    parser.add_argument("--eps", nargs="*", type=float, default=list(DEFAULT_EPS), help="eps_abs_kw values")
    parser.add_argument("--at", nargs="*", type=int, default=[], help="iterations to cut rounds at")
    parser.add_argument("--baselines", action="store_true", help="also the two polishes that fail here")
    parser.add_argument("--diagnose", action="store_true", help="compare each guess with the optimum's")
    parser.add_argument("--certify", action="store_true", help="each polished answer's KKT residual")
    parser.add_argument("--prices", action="store_true", help="the polish's and ADMM's trade prices")
    args = parser.parse_args(argv)
    known = {c.label: c for c in FULL}
    cases = [known[c] for c in args.cases]
    _warm_up()
    started = time.perf_counter()
    columns = stops(args.eps, args.at)
    header = [label for label, _ in columns]
    if args.baselines:
        header[1:1] = [
            "the day's QP: variables / rows with a nonzero multiplier at the optimum / variables with "
            "no curvature / the smallest curvature (the P of 1/2 z'Pz, EUR/kW² per interval)",
            "the reference (Clarabel at its defaults) from the optimum, kW",
            "baseline: OSQP on the whole day, eps 1e-3: iterations / its polish / kW",
            f"baseline: active set from ADMM's schedules at {columns[0][0]}, kW",
        ]
    header = [
        "case",
        *header,
        "Schur block per site: coupling values / rank (largest site) / Schur form's answer from the "
        "whole-day KKT's, first column, kW",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    for case in cases:
        cells = _run_case(case, columns, args.baselines, args.diagnose, args.certify, args.prices)
        lines.append(f"| {case.label} | " + " | ".join(cells) + " |")
    sys.stdout.write("\n".join(lines) + "\n\n" + _footer(time.perf_counter() - started, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
