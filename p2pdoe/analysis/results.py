"""Turn a solver's `Solution` into the documented `Results` (costs, totals, prices, network checks)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from p2pdoe.analysis.network_check import ac_state, lindistflow_state
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import CommunityData, Scenario
from p2pdoe.core.schemas import results as r
from p2pdoe.core.solution import Schedule, Solution

TRADE_EPS_KW = 1e-3


def net_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(sc["pv"] + sc["wd"] + sc["dis"] - sc["lx"] - sc["ch"] - c.fixed_load_kw)


def reactive_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(-c.tan_phi * (c.fixed_load_kw + sc["lx"]))


def operating_points(s: Scenario, sol: Solution) -> dict[str, tuple[FloatArray, FloatArray]]:
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


def build_results(s: Scenario, sol: Solution, mode: Literal["centralized", "admm"]) -> r.Results:
    points = operating_points(s, sol)
    communities = [_community(s, i, sol) for i in range(len(s.communities))]
    trades = _trades(s, sol)
    return r.Results(
        scenario=s.name,
        mode=mode,
        envelope=sol.policy.value,
        feeder=_feeder(s),
        start=s.start.isoformat().replace("+00:00", "Z"),
        dt_h=s.dt_h,
        intervals=s.horizon,
        objective_eur=sol.objective_eur,
        bus_load_kw=s.background_kw.T.tolist(),
        bus_load_kvar=s.background_kvar.T.tolist(),
        communities=communities,
        trades=trades,
        dlmp=_dlmp(s, sol),
        totals=_totals(s, communities, trades),
        ac_check=r.NetworkCheck(**{k: ac_state(s, *v) for k, v in points.items()}),
        lindistflow_check=r.NetworkCheck(**{k: lindistflow_state(s, *v) for k, v in points.items()}),
        solver=r.SolverResult(
            name=sol.solver.name,
            status=sol.solver.status,
            iterations=sol.solver.iterations,
            converged=sol.solver.converged,
            wall_time_s=sol.solver.wall_time_s,
        ),
    )


def _feeder(s: Scenario) -> r.FeederInfo:
    f = s.feeder
    return r.FeederInfo(
        name=f.name,
        v0_pu=s.v0_pu,
        vmin_pu=s.vmin_pu,
        vmax_pu=s.vmax_pu,
        vmin_margin_pu=s.vmin_margin_pu,
        vmax_margin_pu=s.vmax_margin_pu,
        bus_ids=[int(b) for b in f.bus_ids],
        branches=[f.branch_label(int(k)) for k in f.branches],
        rating_kva=[None if np.isnan(f.rating_kva[k]) else float(f.rating_kva[k]) for k in f.branches],
    )


def _costs(s: Scenario, i: int, sol: Solution) -> r.CostBreakdown:
    c, sc, dt = s.communities[i], sol.schedules[i], s.dt_h
    price = sol.trade_price
    paid = sum(float(price[i, m, :] @ sc.buy[k]) for k, m in enumerate(sc.peers))
    received = sum(float(price[m, i, :] @ sc.sell[k]) for k, m in enumerate(sc.peers))
    fees = sum(
        float(0.5 * s.market.fee_eur_per_kwh[i, m] * (sc.buy[k] + sc.sell[k]).sum())
        for k, m in enumerate(sc.peers)
    )
    return r.CostBreakdown(
        grid_import_eur=float(s.price_import @ sc["imp"]) * dt,
        grid_export_eur=-float(s.price_export @ sc["exp"]) * dt,
        p2p_net_eur=(paid - received) * dt,
        network_fees_eur=fees * dt,
        discomfort_eur=float(c.flex.discomfort_eur_per_kw2h * np.sum((sc["lx"] - c.flex.preferred_kw) ** 2))
        * dt,
        battery_wear_eur=float(c.battery.wear_eur_per_kwh * np.sum(sc["ch"] + sc["dis"])) * dt,
    )


def _community(s: Scenario, i: int, sol: Solution) -> r.CommunityResult:
    c, sc, dt = s.communities[i], sol.schedules[i], s.dt_h
    costs = _costs(s, i, sol)
    width = sc["up"] - sc["lo"]
    value = c.envelope_value_eur_per_kwh * width - 0.5 * c.envelope_curvature_eur_per_kw2h * width**2
    return r.CommunityResult(
        id=c.id,
        bus=int(s.feeder.bus_ids[c.bus]),
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


def _trades(s: Scenario, sol: Solution) -> list[r.Trade]:
    out = []
    for buyer, sc in enumerate(sol.schedules):
        for k, seller in enumerate(sc.peers):
            for t in np.flatnonzero(sc.buy[k] > TRADE_EPS_KW):
                out.append(
                    r.Trade(
                        seller=s.communities[seller].id,
                        buyer=s.communities[buyer].id,
                        interval=int(t),
                        kw=float(sc.buy[k, t]),
                        price_eur_per_kwh=float(sol.trade_price[buyer, seller, t]),
                    )
                )
    return out


def _dlmp(s: Scenario, sol: Solution) -> list[r.DlmpResult]:
    d = sol.dlmp
    return [
        r.DlmpResult(
            id=c.id,
            export_eur_per_kwh=d.export_total[i].tolist(),
            export_voltage_eur_per_kwh=d.export_voltage[i].tolist(),
            export_congestion_eur_per_kwh=d.export_congestion[i].tolist(),
            import_eur_per_kwh=d.import_total[i].tolist(),
            import_voltage_eur_per_kwh=d.import_voltage[i].tolist(),
            import_congestion_eur_per_kwh=d.import_congestion[i].tolist(),
        )
        for i, c in enumerate(s.communities)
    ]


def _totals(s: Scenario, communities: list[r.CommunityResult], trades: list[r.Trade]) -> r.Totals:
    dt = s.dt_h
    p2p_payments = sum(t.kw * abs(t.price_eur_per_kwh) for t in trades) * dt
    gross = sum(
        abs(c.cost_breakdown.grid_import_eur) + abs(c.cost_breakdown.grid_export_eur) for c in communities
    )
    widths = [np.mean(np.subtract(c.envelope_up_kw, c.envelope_lo_kw)) for c in communities]
    usable = [_usable_width(data, c) for data, c in zip(s.communities, communities, strict=True)]
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


def _usable_width(data: CommunityData, c: r.CommunityResult) -> float:
    """Mean width of the envelope clipped to the technical range (a static box is wider than usable)."""
    x_min, x_max = data.technical_range_kw()
    top = np.minimum(np.asarray(c.envelope_up_kw), x_max)
    bottom = np.maximum(np.asarray(c.envelope_lo_kw), x_min)
    return float(np.mean(np.clip(top - bottom, 0.0, None)))
