"""Split a scenario into one edge configuration per community, and build a community's QP from its
configuration alone (what an edge agent does): the same matrices as from the whole scenario."""

from __future__ import annotations

import numpy as np

from p2pdoe.core.community import CommunityQP, build_community_qp
from p2pdoe.core.market import envelope_bounds
from p2pdoe.core.scenario import Battery, CommunityData, FlexibleLoad, MarketData, Scenario
from p2pdoe.core.schemas import site as cfg
from p2pdoe.core.solution import Policy


def site_config(s: Scenario, c: int) -> cfg.SiteConfig:
    data = s.communities[c]
    b, f = data.battery, data.flex
    return cfg.SiteConfig(
        scenario=s.name,
        start=s.start.isoformat().replace("+00:00", "Z"),
        dt_h=s.dt_h,
        price_import_eur_per_kwh=s.price_import.tolist(),
        price_export_eur_per_kwh=s.price_export.tolist(),
        community=cfg.CommunityConfig(
            id=data.id,
            bus=int(s.feeder.bus_ids[data.bus]),
            pv_kw=data.pv_kw.tolist(),
            wind_kw=data.wind_kw.tolist(),
            fixed_load_kw=data.fixed_load_kw.tolist(),
            flexible_load=cfg.FlexConfig(
                energy_kwh=f.energy_kwh,
                min_kw=f.min_kw,
                max_kw=f.max_kw,
                preferred_kw=f.preferred_kw.tolist(),
                discomfort_eur_per_kw2h=f.discomfort_eur_per_kw2h,
            ),
            battery=cfg.BatteryConfig(**vars(b)),
            tan_phi=data.tan_phi,
            envelope_value_eur_per_kwh=data.envelope_value_eur_per_kwh,
            envelope_curvature_eur_per_kw2h=data.envelope_curvature_eur_per_kw2h,
        ),
        peers=[
            cfg.PeerConfig(id=s.communities[m].id, fee_eur_per_kwh=float(s.market.fee_eur_per_kwh[c, m]))
            for m in s.market.peers[c]
        ],
        market=cfg.MarketConfig(
            trade_limit_kw=s.market.trade_limit_kw,
            trade_quadratic_eur_per_kw2h=s.market.trade_quadratic_eur_per_kw2h,
            regularization_eur_per_kw2h=s.market.regularization_eur_per_kw2h,
            envelope_proximal_eur_per_kw2h=s.market.envelope_proximal_eur_per_kw2h,
        ),
    )


def community_data(config: cfg.SiteConfig) -> CommunityData:
    """The community's own data; `bus` is -1 because an edge agent has no feeder to index into."""
    c, f = config.community, config.community.flexible_load
    return CommunityData(
        id=c.id,
        bus=-1,
        pv_kw=np.array(c.pv_kw),
        wind_kw=np.array(c.wind_kw),
        fixed_load_kw=np.array(c.fixed_load_kw),
        flex=FlexibleLoad(
            f.energy_kwh, f.min_kw, f.max_kw, np.array(f.preferred_kw), f.discomfort_eur_per_kw2h
        ),
        battery=Battery(**c.battery.model_dump()),
        tan_phi=c.tan_phi,
        envelope_value_eur_per_kwh=c.envelope_value_eur_per_kwh,
        envelope_curvature_eur_per_kw2h=c.envelope_curvature_eur_per_kw2h,
    )


def site_qp(config: cfg.SiteConfig, policy: Policy) -> CommunityQP:
    """The community's QP from its configuration; peers are numbered 0..P-1 in configuration order."""
    m = config.market
    n_peers = len(config.peers)
    market = MarketData(
        trade_limit_kw=m.trade_limit_kw,
        fee_eur_per_kwh=np.zeros((0, 0)),  # fees come per peer below
        peers=(),
        trade_quadratic_eur_per_kw2h=m.trade_quadratic_eur_per_kw2h,
        regularization_eur_per_kw2h=m.regularization_eur_per_kw2h,
        envelope_proximal_eur_per_kw2h=m.envelope_proximal_eur_per_kw2h,
    )
    return build_community_qp(
        community_data(config),
        tuple(range(n_peers)),
        market,
        np.array([p.fee_eur_per_kwh for p in config.peers]),
        np.array(config.price_import_eur_per_kwh),
        np.array(config.price_export_eur_per_kwh),
        config.dt_h,
        envelope_bounds(policy),
    )
