"""Split a scenario into one edge configuration per community plus the coordinator's, and build a
community's QP from its configuration alone (what an edge agent does): the same matrices as from the
whole scenario. `remaining_config` gives a site's configuration over the rest of the day (a rolling
horizon's round), from its measured state."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from p2pdoe.core.calendar import utc_moment
from p2pdoe.core.community import CommunityQP, build_community_qp, envelope_margins
from p2pdoe.core.feeder_config import check_offset, feeder_config, shifted_start
from p2pdoe.core.market import envelope_bounds
from p2pdoe.core.scenario import AdmmSettings, Battery, CommunityData, FlexibleLoad, MarketData, Scenario
from p2pdoe.core.schemas import site as cfg
from p2pdoe.core.schemas.coordinator import ConnectedSite, CoordinatorConfig
from p2pdoe.core.schemas.runtime import DayRanges, Registration
from p2pdoe.core.schemas.scenario import AdaptiveRho, Admm, Anderson, Polish, Staleness
from p2pdoe.core.solution import Policy


def site_config(s: Scenario, c: int) -> cfg.SiteConfig:
    data = s.communities[c]
    b, f = data.battery, data.flex
    return cfg.SiteConfig(
        scenario=s.name,
        start=s.start.isoformat().replace("+00:00", "Z"),
        timezone=s.timezone,
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


def site_qp(
    config: cfg.SiteConfig, policy: Policy, margins: tuple[float, float] | None = None, markup: float = 0.0
) -> CommunityQP:
    """The community's QP from its configuration; peers are numbered 0..P-1 in configuration order.
    `margins`: (load share, PV and wind share) the schedule keeps inside its envelope (real time,
    see `envelope_margins`); None: none (the day-ahead agreement and the centralized reference).
    `markup`: what it bids on its sales above their cost, EUR/kWh (the noncooperative design)."""
    m = config.market
    data = replace(community_data(config), sell_markup_eur_per_kwh=markup)
    if margins is not None:
        data = replace(data, margin_kw=envelope_margins(data, *margins))
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
        data,
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
        start=utc_moment(config.start),
    )


def day_ranges(config: cfg.SiteConfig) -> DayRanges:
    """The ranges of `config`'s day, as a registration's entry for that date."""
    reg = registration(config)
    names = ("technical_min_kw", "technical_max_kw", "reactive_min_kvar", "reactive_max_kvar")
    return DayRanges(start=utc_moment(config.start), **{n: getattr(reg, n) for n in names})


def coordinator_config(s: Scenario, policy: Policy = Policy.DYNAMIC) -> CoordinatorConfig:
    return CoordinatorConfig(
        scenario=s.name,
        start=s.start.isoformat().replace("+00:00", "Z"),
        timezone=s.timezone,
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
        market=s.market.design,  # type: ignore[arg-type]
        bargaining_weights=dict(s.market.bargaining_weights),
        shapley_exact_up_to=s.market.shapley[0],
        shapley_orders=s.market.shapley[1],
        shapley_seed=s.market.shapley[2],
        bid_markups_eur_per_kwh=list(s.market.bidding[0]),
        bid_max_sweeps=s.market.bidding[1],
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
        stay_whole_import_kw=data.stay_whole_import_kw().tolist(),
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
        eps_price_eur_per_kwh=a.eps_price,
        max_iterations=a.max_iterations,
        adaptive_rho=AdaptiveRho(
            enabled=a.adaptive,
            ratio=a.adapt_ratio,
            factor=a.adapt_factor,
            every=a.adapt_every,
            until=a.adapt_until,
        ),
        anderson=Anderson(
            memory=a.anderson.memory,
            regularization=a.anderson.regularization,
            safeguard_factor=a.anderson.safeguard_factor,
        ),
        staleness=Staleness(max_behind=a.staleness.max_behind, min_fresh_share=a.staleness.min_fresh_share),
        relay_trades=a.relay_trades,
        polish=Polish(first=a.polish.first, every=a.polish.every, max_rounds=a.polish.max_rounds),
    )


FORECAST_ERROR_TAU_H = 1.0  # a measured forecast error fades as exp(-hours ahead / tau)


@dataclass(frozen=True)
class Recent:
    """Measured means over the last complete interval, the one just before the remaining horizon."""

    pv_kw: float
    wind_kw: float
    fixed_load_kw: float


def remaining_config(
    config: cfg.SiteConfig,
    offset: int,
    soc_kwh: float,
    flex_used_kwh: float,
    recent: Recent | None = None,
) -> cfg.SiteConfig:
    """The site's configuration over intervals offset..T-1 of its day: series sliced, the battery from
    its measured state of charge (`soc_kwh`, clipped into its range) towards the day's terminal target
    (as far as it can still be reached), the flexible load with what it has left of the day's energy
    (`flex_used_kwh` used so far; clipped to what the remaining intervals can serve), and the
    forecasts updated by the last interval's measurements (`recent`, see `updated_forecast`)."""
    c = config.community
    check_offset(offset, len(c.fixed_load_kw))
    if not (math.isfinite(soc_kwh) and math.isfinite(flex_used_kwh)):
        raise ValueError("the measured state of charge and flexible energy must be finite")
    if recent is not None and offset == 0:
        raise ValueError("at offset 0 no interval of the day has been measured yet")
    hours = (len(c.fixed_load_kw) - offset) * config.dt_h

    def series(values: list[float], measured: float | None) -> list[float]:
        return updated_forecast(values, offset, measured, config.dt_h)

    community = c.model_copy(
        update={
            "pv_kw": series(c.pv_kw, recent.pv_kw if recent else None),
            "wind_kw": series(c.wind_kw, recent.wind_kw if recent else None),
            "fixed_load_kw": series(c.fixed_load_kw, recent.fixed_load_kw if recent else None),
            "flexible_load": remaining_flex(c.flexible_load, offset, flex_used_kwh, hours),
            "battery": remaining_battery(c.battery, soc_kwh, hours),
        }
    )
    return config.model_copy(
        update={
            "start": shifted_start(config.start, offset, config.dt_h),
            "price_import_eur_per_kwh": config.price_import_eur_per_kwh[offset:],
            "price_export_eur_per_kwh": config.price_export_eur_per_kwh[offset:],
            "community": community,
        }
    )


def updated_forecast(forecast: list[float], offset: int, measured: float | None, dt_h: float) -> list[float]:
    """The forecast over intervals offset..T-1; with `measured` (the mean of interval offset-1), the
    error there fades in: interval offset+k gets error * exp(-(k+1) dt_h / tau), never below zero."""
    tail = np.asarray(forecast[offset:], dtype=float)
    if measured is None:
        return [float(v) for v in tail]
    error = measured - forecast[offset - 1]
    ahead_h = np.arange(1, tail.size + 1) * dt_h
    updated = np.maximum(0.0, tail + error * np.exp(-ahead_h / FORECAST_ERROR_TAU_H))
    return [float(v) for v in updated]


def remaining_flex(f: cfg.FlexConfig, offset: int, used_kwh: float, hours: float) -> cfg.FlexConfig:
    """What is left of the day's flexible energy, within what `hours` at min_kw..max_kw can serve."""
    energy = min(max(f.energy_kwh - used_kwh, f.min_kw * hours), f.max_kw * hours)
    return f.model_copy(update={"energy_kwh": energy, "preferred_kw": f.preferred_kw[offset:]})


def remaining_battery(b: cfg.BatteryConfig, soc_kwh: float, hours: float) -> cfg.BatteryConfig:
    """Starting at the measured state of charge; the day's terminal target, or as near as charging at
    full power for the remaining `hours` gets."""
    soc = min(max(soc_kwh, b.soc_min_kwh), b.soc_max_kwh)
    reachable = soc + b.eta_charge * b.power_kw * hours
    target = min(_battery(b).soc_end_floor_kwh, reachable, b.soc_max_kwh)
    return b.model_copy(update={"soc_init_kwh": soc, "soc_end_min_kwh": target})


def _battery(b: cfg.BatteryConfig) -> Battery:
    return Battery(**b.model_dump())
