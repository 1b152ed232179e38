"""Turn a solver's `Solution` into the documented `Results` (costs, totals, prices, network checks).

The pieces work without the whole scenario, so the same code serves an in-process run (which has it),
an edge agent (its own community only: `p2pdoe.analysis.accounts`, which an edge imports without the
network checks) and the coordinator (the reported communities on its network view: `assemble_results`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pdoe.analysis.accounts import Tariffs, community_result, net_injection, purchases, reactive_injection
from p2pdoe.analysis.network_check import ac_state, lindistflow_state
from p2pdoe.core.envelope import GridView, grid_view
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas import results as r
from p2pdoe.core.solution import Dlmp, Solution

Mode = Literal["centralized", "admm", "distributed"]
Points = dict[str, tuple[FloatArray, FloatArray]]


@dataclass(frozen=True)
class Day:
    """The day a results.json describes."""

    scenario: str
    start: str
    dt_h: float
    intervals: int
    policy: str


def operating_points(s: Scenario, sol: Solution) -> Points:
    """(x, q) of shape (C, T) at the schedule and at both envelope corners."""
    x = np.array([net_injection(c, sc) for c, sc in zip(s.communities, sol.schedules, strict=True)])
    q = np.array([reactive_injection(c, sc) for c, sc in zip(s.communities, sol.schedules, strict=True)])
    q_ranges = [c.reactive_range_kvar() for c in s.communities]
    up = np.array([sc["up"] for sc in sol.schedules])
    lo = np.array([sc["lo"] for sc in sol.schedules])
    return {
        "schedule": (x, q),
        "upper_corner": (up, np.array([qr[1] for qr in q_ranges])),
        "lower_corner": (lo, np.array([qr[0] for qr in q_ranges])),
    }


def build_results(s: Scenario, sol: Solution, mode: Mode) -> r.Results:
    communities = [
        community_result(c, int(s.feeder.bus_ids[c.bus]), sc, _tariffs(s, i, sol))
        for i, (c, sc) in enumerate(zip(s.communities, sol.schedules, strict=True))
    ]
    trades = [
        t
        for i, sc in enumerate(sol.schedules)
        for t in purchases(s.ids[i], [s.ids[m] for m in sc.peers], sc, _tariffs(s, i, sol).pay)
    ]
    day = Day(s.name, s.start.isoformat().replace("+00:00", "Z"), s.dt_h, s.horizon, sol.policy.value)
    return assemble_results(
        day,
        mode,
        grid_view(s),
        communities,
        trades,
        dlmp_results(s.ids, sol.dlmp),
        operating_points(s, sol),
        [c.technical_range_kw() for c in s.communities],
        sol.objective_eur,
        r.SolverResult(
            name=sol.solver.name,
            status=sol.solver.status,
            iterations=sol.solver.iterations,
            converged=sol.solver.converged,
            wall_time_s=sol.solver.wall_time_s,
        ),
    )


def assemble_results(
    day: Day,
    mode: Mode,
    view: GridView,
    communities: list[r.CommunityResult],
    trades: list[r.Trade],
    dlmp: list[r.DlmpResult],
    points: Points,
    ranges: list[tuple[FloatArray, FloatArray]],
    objective_eur: float,
    solver: r.SolverResult,
) -> r.Results:
    """`points` holds (x, q) for every site of the view; `ranges` each community's technical range."""
    return r.Results(
        scenario=day.scenario,
        mode=mode,
        envelope=day.policy,  # type: ignore[arg-type]
        feeder=feeder_info(view),
        start=day.start,
        dt_h=day.dt_h,
        intervals=day.intervals,
        objective_eur=objective_eur,
        bus_load_kw=view.background_kw.T.tolist(),
        bus_load_kvar=view.background_kvar.T.tolist(),
        communities=communities,
        trades=trades,
        dlmp=dlmp,
        totals=_totals(day.dt_h, communities, trades, ranges),
        ac_check=r.NetworkCheck(**{k: ac_state(view, *v, day.dt_h) for k, v in points.items()}),
        lindistflow_check=r.NetworkCheck(**{k: lindistflow_state(view, *v) for k, v in points.items()}),
        solver=solver,
    )


def feeder_info(view: GridView) -> r.FeederInfo:
    f = view.feeder
    return r.FeederInfo(
        name=f.name,
        v0_pu=view.v0_pu,
        vmin_pu=view.vmin_pu,
        vmax_pu=view.vmax_pu,
        vmin_margin_pu=view.vmin_margin_pu,
        vmax_margin_pu=view.vmax_margin_pu,
        bus_ids=[int(b) for b in f.bus_ids],
        branches=[f.branch_label(int(k)) for k in f.branches],
        rating_kva=[None if np.isnan(f.rating_kva[k]) else float(f.rating_kva[k]) for k in f.branches],
    )


def _tariffs(s: Scenario, i: int, sol: Solution) -> Tariffs:
    peers = list(sol.schedules[i].peers)
    return Tariffs(
        price_import=s.price_import,
        price_export=s.price_export,
        pay=sol.trade_price[i, peers, :],
        receive=sol.trade_price[peers, i, :],
        fees=s.market.fee_eur_per_kwh[i, peers],
        dt_h=s.dt_h,
    )


def dlmp_results(ids: list[str], d: Dlmp) -> list[r.DlmpResult]:
    return [
        r.DlmpResult(
            id=cid,
            export_eur_per_kwh=d.export_total[i].tolist(),
            export_voltage_eur_per_kwh=d.export_voltage[i].tolist(),
            export_congestion_eur_per_kwh=d.export_congestion[i].tolist(),
            import_eur_per_kwh=d.import_total[i].tolist(),
            import_voltage_eur_per_kwh=d.import_voltage[i].tolist(),
            import_congestion_eur_per_kwh=d.import_congestion[i].tolist(),
        )
        for i, cid in enumerate(ids)
    ]


def _totals(
    dt: float,
    communities: list[r.CommunityResult],
    trades: list[r.Trade],
    ranges: list[tuple[FloatArray, FloatArray]],
) -> r.Totals:
    p2p_payments = sum(t.kw * abs(t.price_eur_per_kwh) for t in trades) * dt
    gross = sum(
        abs(c.cost_breakdown.grid_import_eur) + abs(c.cost_breakdown.grid_export_eur) for c in communities
    )
    widths = [np.mean(np.subtract(c.envelope_up_kw, c.envelope_lo_kw)) for c in communities]
    usable = [_usable_width(rng, c) for rng, c in zip(ranges, communities, strict=True)]
    return r.Totals(
        p2p_traded_kwh=sum(c.p2p_bought_kwh for c in communities),
        curtailed_kwh=sum(c.curtailed_kwh for c in communities),
        cost_eur=sum(c.cost_eur for c in communities),
        gross_energy_eur=gross + p2p_payments,
        grid_import_kwh=float(sum(np.sum(c.grid_import_kw) for c in communities) * dt),
        grid_export_kwh=float(sum(np.sum(c.grid_export_kw) for c in communities) * dt),
        mean_envelope_width_kw=float(np.mean(widths)),
        mean_usable_envelope_width_kw=float(np.mean(usable)),
    )


def _usable_width(technical: tuple[FloatArray, FloatArray], c: r.CommunityResult) -> float:
    """Mean width of the envelope clipped to the technical range (a static box is wider than usable)."""
    x_min, x_max = technical
    top = np.minimum(np.asarray(c.envelope_up_kw), x_max)
    bottom = np.maximum(np.asarray(c.envelope_lo_kw), x_min)
    return float(np.mean(np.clip(top - bottom, 0.0, None)))


def trade_price_errors(s: Scenario, ours: Solution, central: Solution, min_kw: float) -> list[float]:
    """|our price - the centralized dual| (EUR/kWh) for each trade of at least min_kw in the central
    answer. Where no energy flows, any price between the two sides' marginal values is a dual, so a
    difference there is no error."""
    index = {c.id: i for i, c in enumerate(s.communities)}
    return [
        abs(float(ours.trade_price[index[t.buyer], index[t.seller], t.interval]) - t.price_eur_per_kwh)
        for t in build_results(s, central, "centralized").trades
        if t.kw >= min_kw
    ]
