"""One community's accounts from its own data and schedule alone: costs, the results.json entry,
what it bought. An edge agent reports with these, without the network checks of `results`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import CommunityData
from p2pdoe.core.schemas import results as r
from p2pdoe.core.solution import Schedule

TRADE_EPS_KW = 1e-3


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


def net_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(sc["pv"] + sc["wd"] + sc["dis"] - sc["lx"] - sc["ch"] - c.fixed_load_kw)


def reactive_injection(c: CommunityData, sc: Schedule) -> FloatArray:
    return np.asarray(-c.tan_phi * (c.fixed_load_kw + sc["lx"]))


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
