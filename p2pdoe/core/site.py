"""Split a scenario into one edge configuration per community plus the coordinator's, and build a
community's QP from its configuration alone (what an edge agent does): the same matrices as from the
whole scenario."""

from __future__ import annotations

import numpy as np

from p2pdoe.core.agreement.coordination import feeder_config
from p2pdoe.core.community import CommunityQP, build_community_qp
from p2pdoe.core.market import envelope_bounds
from p2pdoe.core.scenario import AdmmSettings, Battery, CommunityData, FlexibleLoad, MarketData, Scenario
from p2pdoe.core.schemas import site as cfg
from p2pdoe.core.schemas.coordinator import ConnectedSite, CoordinatorConfig
from p2pdoe.core.schemas.runtime import Registration
from p2pdoe.core.schemas.scenario import AdaptiveRho, Admm
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


def with_peers(config: cfg.SiteConfig, peer_ids: set[str]) -> cfg.SiteConfig:
    """The configuration trading only with `peer_ids` (a round without some of its peers)."""
    return config.model_copy(update={"peers": [p for p in config.peers if p.id in peer_ids]})


def registration(config: cfg.SiteConfig) -> Registration:
    """What a site tells the coordinator: its bus, peers and ranges, nothing about its costs."""
    data = community_data(config)
    x_min, x_max = data.technical_range_kw()
    q_min, q_max = data.reactive_range_kvar()
    return Registration(
        site=data.id,
        bus=config.community.bus,
        peers=[p.id for p in config.peers],
        technical_min_kw=x_min.tolist(),
        technical_max_kw=x_max.tolist(),
        reactive_min_kvar=q_min.tolist(),
        reactive_max_kvar=q_max.tolist(),
    )


def coordinator_config(s: Scenario, policy: Policy = Policy.DYNAMIC) -> CoordinatorConfig:
    return CoordinatorConfig(
        scenario=s.name,
        start=s.start.isoformat().replace("+00:00", "Z"),
        dt_h=s.dt_h,
        intervals=s.horizon,
        policy=policy.value,
        feeder=feeder_config(s.feeder),
        v0_pu=s.v0_pu,
        vmin_pu=s.vmin_pu,
        vmax_pu=s.vmax_pu,
        vmin_margin_pu=s.vmin_margin_pu,
        vmax_margin_pu=s.vmax_margin_pu,
        rating_margin=s.rating_margin,
        background_kw=s.background_kw.tolist(),
        background_kvar=s.background_kvar.tolist(),
        price_import_eur_per_kwh=s.price_import.tolist(),
        price_export_eur_per_kwh=s.price_export.tolist(),
        admm=admm_spec(s.admm),
        sites=[_connected(s, c) for c in range(len(s.communities))],
    )


def _connected(s: Scenario, c: int) -> ConnectedSite:
    data = s.communities[c]
    x_min, x_max = data.technical_range_kw()
    q_min, q_max = data.reactive_range_kvar()
    return ConnectedSite(
        id=data.id,
        bus=int(s.feeder.bus_ids[data.bus]),
        peers=[s.communities[m].id for m in s.market.peers[c]],
        import_capacity_kw=max(0.0, -float(x_min.min())),
        export_capacity_kw=max(0.0, float(x_max.max())),
        reactive_min_kvar=float(q_min.min()),
        reactive_max_kvar=float(q_max.max()),
    )


def admm_spec(a: AdmmSettings) -> Admm:
    return Admm(
        rho_trade_eur_per_kw2h=a.rho_trade,
        rho_envelope_eur_per_kw2h=a.rho_envelope,
        over_relaxation=a.over_relaxation,
        eps_abs_kw=a.eps_abs_kw,
        eps_rel=a.eps_rel,
        max_iterations=a.max_iterations,
        adaptive_rho=AdaptiveRho(
            enabled=a.adaptive,
            ratio=a.adapt_ratio,
            factor=a.adapt_factor,
            every=a.adapt_every,
            until=a.adapt_until,
        ),
    )
