"""Turn a solver's `Solution` into the documented `Results` (costs, totals, prices, network checks).

The pieces work without the whole scenario, so the same code serves an in-process run (which has it),
an edge agent (its own community only: `community_result`, `purchases`) and the coordinator (the
reported communities on its network view: `assemble_results`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pdoe.analysis.network_check import ac_state, lindistflow_state
from p2pdoe.core.envelope import GridView, grid_view
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import CommunityData, Scenario
from p2pdoe.core.schemas import results as r
from p2pdoe.core.solution import Dlmp, Schedule, Solution

TRADE_EPS_KW = 1e-3
Mode = Literal["centralized", "admm", "distributed"]
Points = dict[str, tuple[FloatArray, FloatArray]]


@dataclass(frozen=True)
class Tariffs:
    """What one community pays: retail prices (T,) and, per peer, the trade price it pays (buying)
    and receives (selling) (P, T), and the network fee (P,)."""

    price_import: FloatArray
    price_export: FloatArray
    pay: FloatArray
    receive: FloatArray
    fees: FloatArray
    dt_h: float


@dataclass(frozen=True)
class Day:
    """The day a results.json describes."""

    scenario: str
    start: str
    dt_h: float
    intervals: int
    policy: str


def net_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(sc["pv"] + sc["wd"] + sc["dis"] - sc["lx"] - sc["ch"] - c.fixed_load_kw)


def reactive_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(-c.tan_phi * (c.fixed_load_kw + sc["lx"]))


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


def _costs(c: CommunityData, sc: Schedule, t: Tariffs) -> r.CostBreakdown:
    dt = t.dt_h
    paid = float(np.sum(t.pay * sc.buy))
    received = float(np.sum(t.receive * sc.sell))
    fees = float(0.5 * t.fees @ (sc.buy + sc.sell).sum(axis=1)) if len(sc.peers) else 0.0
    return r.CostBreakdown(
        grid_import_eur=float(t.price_import @ sc["imp"]) * dt,
        grid_export_eur=-float(t.price_export @ sc["exp"]) * dt,
        p2p_net_eur=(paid - received) * dt,
        network_fees_eur=fees * dt,
        discomfort_eur=float(c.flex.discomfort_eur_per_kw2h * np.sum((sc["lx"] - c.flex.preferred_kw) ** 2))
        * dt,
        battery_wear_eur=float(c.battery.wear_eur_per_kwh * np.sum(sc["ch"] + sc["dis"])) * dt,
    )


def community_result(c: CommunityData, bus_id: int, sc: Schedule, t: Tariffs) -> r.CommunityResult:
    """One community's part of results.json, from its own data and schedule alone."""
    dt = t.dt_h
    costs = _costs(c, sc, t)
    width = sc["up"] - sc["lo"]
    value = c.envelope_value_eur_per_kwh * width - 0.5 * c.envelope_curvature_eur_per_kw2h * width**2
    return r.CommunityResult(
        id=c.id,
        bus=bus_id,
        net_injection_kw=net_injection(c, sc).tolist(),
        q_kvar=reactive_injection(c, sc).tolist(),
        envelope_lo_kw=sc["lo"].tolist(),
        envelope_up_kw=sc["up"].tolist(),
        cost_eur=float(sum(costs.model_dump().values())),
        cost_breakdown=costs,
        envelope_value_eur=float(value.sum() * dt),
        p2p_bought_kwh=float(sc.buy.sum() * dt),
        p2p_sold_kwh=float(sc.sell.sum() * dt),
        curtailed_kwh=float((c.pv_kw + c.wind_kw - sc["pv"] - sc["wd"]).sum() * dt),
        grid_import_kw=sc["imp"].tolist(),
        grid_export_kw=sc["exp"].tolist(),
        pv_kw=sc["pv"].tolist(),
        wind_kw=sc["wd"].tolist(),
        flexible_load_kw=sc["lx"].tolist(),
        battery_charge_kw=sc["ch"].tolist(),
        battery_discharge_kw=sc["dis"].tolist(),
        soc_kwh=sc["soc"].tolist(),
    )


def purchases(buyer: str, peer_ids: list[str], sc: Schedule, pay: FloatArray) -> list[r.Trade]:
    """What `buyer` bought from each peer, interval by interval, at the price it pays."""
    return [
        r.Trade(
            seller=seller,
            buyer=buyer,
            interval=int(t),
            kw=float(sc.buy[k, t]),
            price_eur_per_kwh=float(pay[k, t]),
        )
        for k, seller in enumerate(peer_ids)
        for t in np.flatnonzero(sc.buy[k] > TRADE_EPS_KW)
    ]


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
