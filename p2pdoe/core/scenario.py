"""A resolved scenario: the feeder, the horizon, prices and every community as numpy arrays.

`build_scenario` turns a validated `ScenarioSpec` plus its resolved feeder and CSV columns into
frozen dataclasses. Shapes: T intervals, N buses, C communities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np

from p2pdoe.core import profiles
from p2pdoe.core.bidding import MARKUP_GRID_EUR_PER_KWH, MAX_SWEEPS
from p2pdoe.core.calendar import Calendar, CalendarError, clock_hours, day_seed, zone
from p2pdoe.core.network import Feeder, FloatArray, electrical_distance_ohm
from p2pdoe.core.powerflow import run_power_flow
from p2pdoe.core.schemas import scenario as spec
from p2pdoe.errors import FeederError, ScenarioError


@dataclass(frozen=True)
class Battery:
    energy_kwh: float
    power_kw: float
    soc_init_kwh: float
    soc_min_kwh: float
    soc_max_kwh: float
    eta_charge: float
    eta_discharge: float
    wear_eur_per_kwh: float
    soc_end_min_kwh: float | None = None  # the last interval's lower bound; None: max(soc_min, soc_init)

    @property
    def soc_end_floor_kwh(self) -> float:
        """What the state of charge must be at least at the end of the horizon."""
        if self.soc_end_min_kwh is None:
            return max(self.soc_min_kwh, self.soc_init_kwh)
        return max(self.soc_min_kwh, self.soc_end_min_kwh)


@dataclass(frozen=True)
class FlexibleLoad:
    energy_kwh: float
    min_kw: float
    max_kw: float
    preferred_kw: FloatArray  # (T,)
    discomfort_eur_per_kw2h: float


@dataclass(frozen=True)
class CommunityData:
    """Private data of one community (only its own edge agent holds it)."""

    id: str
    bus: int  # array index into the feeder
    pv_kw: FloatArray  # (T,) forecast
    wind_kw: FloatArray  # (T,) forecast
    fixed_load_kw: FloatArray  # (T,)
    flex: FlexibleLoad
    battery: Battery
    tan_phi: float
    envelope_value_eur_per_kwh: float
    envelope_curvature_eur_per_kw2h: float
    # Real time: how far inside its envelope the schedule stays, (below up, above lo) per interval;
    # None: on the bounds (see `envelope_margins`).
    margin_kw: tuple[FloatArray, FloatArray] | None = None
    # A misreport, for measuring a design's manipulability: the community bids as if each kWh it
    # sells to a peer cost it this much more (its money is unchanged; docs/markets.md)
    sell_markup_eur_per_kwh: float = 0.0

    @property
    def horizon(self) -> int:
        return int(self.fixed_load_kw.shape[0])

    def technical_range_kw(self) -> tuple[FloatArray, FloatArray]:
        """(X_min, X_max) per interval: the net injection the assets can physically reach."""
        low = -(self.fixed_load_kw + self.flex.max_kw + self.battery.power_kw)
        high = self.pv_kw + self.wind_kw + self.battery.power_kw - self.fixed_load_kw - self.flex.min_kw
        return low, high

    def stay_whole_import_kw(self) -> FloatArray:
        """(T,) the import the site needs to keep its fixed load and its flexible load's minimum with
        its own generation alone: its battery is not counted, as a site may fall back on its default
        with the battery flat."""
        return np.maximum(0.0, self.fixed_load_kw + self.flex.min_kw - self.pv_kw - self.wind_kw)

    def reactive_range_kvar(self) -> tuple[FloatArray, FloatArray]:
        """(q_min, q_max) per interval of the reactive injection q = -tan(phi) (fixed + flexible load)."""
        q_min = -self.tan_phi * (self.fixed_load_kw + self.flex.max_kw)
        q_max = -self.tan_phi * (self.fixed_load_kw + self.flex.min_kw)
        return q_min, q_max


@dataclass(frozen=True)
class MarketData:
    trade_limit_kw: float
    fee_eur_per_kwh: FloatArray  # (C, C), symmetric, zero diagonal
    peers: tuple[tuple[int, ...], ...]  # trading partners of each community, sorted, symmetric
    trade_quadratic_eur_per_kw2h: float
    regularization_eur_per_kw2h: float
    envelope_proximal_eur_per_kw2h: float
    bargaining_weights: Mapping[str, float] = field(default_factory=dict)  # Nash bargaining's; else 1
    design: str = "welfare"  # docs/markets.md
    shapley: tuple[int, int, int] = (8, 200, 0)  # exact up to n communities, else (orders, seed)
    bidding: tuple[tuple[float, ...], int] = (MARKUP_GRID_EUR_PER_KWH, MAX_SWEEPS)  # (markups, sweeps)


@dataclass(frozen=True)
class StalenessSettings:
    """See `schemas.scenario.Staleness`."""

    max_behind: int = 0  # tau: the most iterations a site's couplings may stay frozen in a row
    min_fresh_share: float = 0.5  # of the sites whose new proposals an iteration needs to close early


@dataclass(frozen=True)
class PolishSettings:
    """See `schemas.scenario.Polish` and `agreement.polish`."""

    first: int = 0  # the iteration of the first try; 0: no polish
    every: int = 20  # then this many iterations after a failed try, doubled after each
    max_rounds: int = 8  # of exchanges per try

    def due(self, done: int, failed: int) -> bool:
        """Whether a try is due after `done` iterations, `failed` tries having failed before."""
        if not self.first:
            return False
        return done == self.first + self.every * ((1 << failed) - 1)


@dataclass(frozen=True)
class AndersonSettings:
    """See `schemas.scenario.Anderson` and `agreement.anderson`."""

    memory: int = 0  # m, the updates a step combines besides the latest; 0: no acceleration
    regularization: float = 1e-8  # relative to |Y|^2 + |S|^2 (A2DR's adaptive regularisation)
    safeguard_factor: float = 1.0  # a mixed state stands if its residual is at most this times the last


@dataclass(frozen=True)
class AdmmSettings:
    """See `schemas.scenario.Admm`; rho here is per hour of interval, EUR/(kW^2 h)."""

    rho_trade: float
    rho_envelope: float
    over_relaxation: float
    eps_abs_kw: float
    eps_rel: float
    eps_price: float  # EUR/kWh: the most any price may move in the iteration a round stops at
    max_iterations: int
    adaptive: bool
    adapt_ratio: float
    adapt_factor: float
    adapt_every: int
    adapt_until: int
    anderson: AndersonSettings = AndersonSettings()
    staleness: StalenessSettings = StalenessSettings()
    relay_trades: bool = False  # the grants carry the peers' trade entries (schemas.scenario.Admm)
    polish: PolishSettings = PolishSettings()


@dataclass(frozen=True)
class Scenario:
    name: str
    feeder: Feeder
    v0_pu: float
    vmin_pu: float
    vmax_pu: float
    vmin_margin_pu: float
    vmax_margin_pu: float
    rating_margin: float
    dt_h: float
    start: datetime
    background_kw: FloatArray  # (N, T) consumption
    background_kvar: FloatArray  # (N, T) consumption
    price_import: FloatArray  # (T,) EUR/kWh
    price_export: FloatArray  # (T,) EUR/kWh
    communities: tuple[CommunityData, ...]
    market: MarketData
    admm: AdmmSettings
    timezone: str = "UTC"  # the DSO's local time: where its days begin (p2pdoe.core.calendar)

    @property
    def horizon(self) -> int:
        return int(self.price_import.shape[0])

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.communities]


def build_scenario(
    s: spec.ScenarioSpec,
    feeder: Feeder,
    columns: Mapping[tuple[str, str], FloatArray],
    day: date | None = None,
) -> Scenario:
    """Resolve a spec against its feeder; `columns` maps (csv path, column) to values. `day`: the
    scenario of that local date in the horizon's time zone instead of its own horizon: local midnight
    to midnight (23 or 25 hours across a daylight-saving change), each generated profile under a seed
    of that date (the horizon's own date keeps its seeds), fixed profiles read by local clock hour."""
    start = _parse_start(s.horizon.start)
    if day is None:  # its own horizon, on the local clock
        h = s.horizon
        hours = clock_hours(zone(h.timezone), start, h.dt_h * 3600.0, h.intervals)
        shape = _ProfileResolver(hours, h.intervals, columns)
    else:
        calendar = _calendar(s.horizon)
        start, hours = calendar.start(day), calendar.local_hours(day)
        anchor = calendar.day_of(_parse_start(s.horizon.start))
        shape = _ProfileResolver(hours, len(hours), columns, lambda seed: day_seed(seed, day, anchor))
    fs = s.feeder
    rated = feeder.with_ratings(_ratings(feeder, fs.line_ratings, fs.v0_pu))
    bg = shape(fs.background_load.profile) * fs.background_load.peak_factor
    communities = tuple(_community(c, rated, shape, s.horizon.dt_h) for c in s.communities)
    return Scenario(
        name=s.name,
        feeder=rated,
        v0_pu=fs.v0_pu,
        vmin_pu=fs.vmin_pu,
        vmax_pu=fs.vmax_pu,
        vmin_margin_pu=fs.voltage_margin.lower_pu,
        vmax_margin_pu=fs.voltage_margin.upper_pu,
        rating_margin=fs.rating_margin,
        dt_h=s.horizon.dt_h,
        start=start,
        background_kw=np.outer(rated.load_kw, bg),
        background_kvar=np.outer(rated.load_kvar, bg),
        price_import=_tou(s.prices.import_eur_per_kwh, hours),
        price_export=_tou(s.prices.export_eur_per_kwh, hours),
        communities=communities,
        market=_market(s.market, communities, rated),
        admm=admm_settings(s.admm),
        timezone=s.horizon.timezone,
    )


def _calendar(h: spec.Horizon) -> Calendar:
    if h.intervals * h.dt_h != 24:
        raise ScenarioError(f"a day of its own needs a horizon of 24 hours, not {h.intervals} x {h.dt_h} h")
    try:
        return Calendar(h.timezone, round(h.dt_h * 3600))
    except CalendarError as exc:
        raise ScenarioError(f"horizon: {exc}") from None


class _ProfileResolver:
    """`seed_of`: a generated profile's seed on the day resolved (None: its own; by clock hour, then)."""

    def __init__(
        self,
        hours: FloatArray,
        intervals: int,
        columns: Mapping[tuple[str, str], FloatArray],
        seed_of: Callable[[int], int] | None = None,
    ):
        self.hours, self.intervals, self.columns = hours, intervals, columns
        self.seed_of = seed_of

    def __call__(self, p: spec.Profile) -> FloatArray:
        seed = getattr(p, "seed", 0) if self.seed_of is None else self.seed_of(getattr(p, "seed", 0))
        if isinstance(p, spec.PvProfile):
            return profiles.pv_shape(self.hours, p.sunrise_h, p.sunset_h, p.cloudiness, seed)
        if isinstance(p, spec.WindProfile):
            return profiles.wind_shape(self.hours, p.mean_speed_m_s, seed)
        if isinstance(p, spec.LoadProfile):
            return profiles.load_shape(p.shape, self.hours, p.noise, seed)
        values = np.asarray(p.values, dtype=float) if isinstance(p, spec.ValuesProfile) else self._csv(p)
        if self.seed_of is not None:
            return profiles.by_clock_hour(values, self.hours)
        try:
            return profiles.resample(values, self.intervals)
        except ValueError as exc:
            raise ScenarioError(str(exc)) from exc

    def _csv(self, p: spec.CsvProfile) -> FloatArray:
        key = (p.path, p.column)
        if key not in self.columns:
            raise ScenarioError(f"profile column {p.column!r} of {p.path} was not loaded")
        return self.columns[key]


def _community(c: spec.Community, feeder: Feeder, shape: _ProfileResolver, dt_h: float) -> CommunityData:
    t = shape.intervals
    zero = np.zeros(t)
    try:
        bus = feeder.index_of(c.bus)
    except FeederError as exc:
        raise ScenarioError(
            f"community {c.id!r} sits on bus {c.bus}, which feeder {feeder.name!r} "
            f"does not have (buses {feeder.bus_id_range})"
        ) from exc
    if bus == feeder.root:
        raise ScenarioError(f"community {c.id!r} sits on the slack bus {c.bus}")
    flex = c.flexible_load or spec.FlexibleLoad(energy_kwh=0.0, max_kw=0.0)
    bat = c.battery or spec.Battery(energy_kwh=0.0, power_kw=0.0)
    return CommunityData(
        id=c.id,
        bus=bus,
        pv_kw=c.pv.rated_kw * shape(c.pv.profile) if c.pv else zero,
        wind_kw=c.wind.rated_kw * shape(c.wind.profile) if c.wind else zero,
        fixed_load_kw=c.fixed_load.rated_kw * shape(c.fixed_load.profile),
        flex=_flex(c.id, flex, shape, dt_h),
        battery=Battery(
            energy_kwh=bat.energy_kwh,
            power_kw=bat.power_kw,
            soc_init_kwh=bat.soc_init * bat.energy_kwh,
            soc_min_kwh=bat.soc_min * bat.energy_kwh,
            soc_max_kwh=bat.soc_max * bat.energy_kwh,
            eta_charge=bat.eta_charge,
            eta_discharge=bat.eta_discharge,
            wear_eur_per_kwh=bat.wear_eur_per_kwh,
        ),
        tan_phi=float(np.tan(np.arccos(c.power_factor))),
        envelope_value_eur_per_kwh=c.envelope.value_eur_per_kwh,
        envelope_curvature_eur_per_kw2h=c.envelope.curvature_eur_per_kw2h,
    )


def _flex(cid: str, f: spec.FlexibleLoad, shape: _ProfileResolver, dt_h: float) -> FlexibleLoad:
    t = shape.intervals
    if not f.min_kw * t * dt_h <= f.energy_kwh <= f.max_kw * t * dt_h:
        raise ScenarioError(
            f"community {cid!r}: flexible energy {f.energy_kwh:g} kWh cannot be served between "
            f"{f.min_kw:g} and {f.max_kw:g} kW over {t * dt_h:g} h"
        )
    pref = shape(f.preferred)
    total = float(pref.sum()) * dt_h
    preferred = pref / total * f.energy_kwh if total > 0 else np.full(t, f.energy_kwh / (t * dt_h))
    return FlexibleLoad(
        energy_kwh=f.energy_kwh,
        min_kw=f.min_kw,
        max_kw=f.max_kw,
        preferred_kw=preferred,
        discomfort_eur_per_kw2h=f.discomfort_eur_per_kw2h,
    )


def _market(m: spec.Market, communities: tuple[CommunityData, ...], feeder: Feeder) -> MarketData:
    c = len(communities)
    dist = np.zeros((c, c))
    for i in range(c):
        for j in range(i + 1, c):
            dist[i, j] = dist[j, i] = electrical_distance_ohm(feeder, communities[i].bus, communities[j].bus)
    fee = m.fee_base_eur_per_kwh + m.fee_eur_per_kwh_per_ohm * dist
    np.fill_diagonal(fee, 0.0)
    return MarketData(
        trade_limit_kw=m.trade_limit_kw,
        fee_eur_per_kwh=fee,
        peers=tuple(() for _ in range(c)) if m.design == "standalone" else _trading_graph(dist, m.max_peers),
        trade_quadratic_eur_per_kw2h=m.trade_quadratic_eur_per_kw2h,
        regularization_eur_per_kw2h=m.regularization_eur_per_kw2h,
        envelope_proximal_eur_per_kw2h=m.envelope_proximal_eur_per_kw2h,
        bargaining_weights=_weights(m.bargaining_weights, [x.id for x in communities]),
        shapley=(m.shapley_exact_up_to, m.shapley_orders, m.shapley_seed),
        bidding=(tuple(m.bid_markups_eur_per_kwh), m.bid_max_sweeps),
        design=m.design,
    )


def _weights(weights: Mapping[str, float], ids: list[str]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(ids))
    if unknown:
        raise ScenarioError(f"market.bargaining_weights: {', '.join(unknown)} is not a community")
    return dict(weights)


def _trading_graph(dist: FloatArray, max_peers: int | None) -> tuple[tuple[int, ...], ...]:
    """Everyone with everyone, or each community's `max_peers` electrically nearest (ties by order),
    made symmetric: if c picks m, m trades with c too."""
    c = dist.shape[0]
    if max_peers is None or max_peers >= c - 1:
        return tuple(tuple(m for m in range(c) if m != i) for i in range(c))
    links: list[set[int]] = [set() for _ in range(c)]
    for i in range(c):
        order = [int(m) for m in np.argsort(dist[i], kind="stable") if m != i]
        for m in order[:max_peers]:
            links[i].add(m)
            links[m].add(i)
    return tuple(tuple(sorted(p)) for p in links)


def admm_settings(a: spec.Admm) -> AdmmSettings:
    r = a.adaptive_rho
    return AdmmSettings(
        rho_trade=a.rho_trade_eur_per_kw2h,
        rho_envelope=a.rho_envelope_eur_per_kw2h,
        over_relaxation=a.over_relaxation,
        eps_abs_kw=a.eps_abs_kw,
        eps_rel=a.eps_rel,
        eps_price=a.eps_price_eur_per_kwh,
        max_iterations=a.max_iterations,
        adaptive=r.enabled,
        adapt_ratio=r.ratio,
        adapt_factor=r.factor,
        adapt_every=r.every,
        adapt_until=r.until,
        anderson=AndersonSettings(
            memory=a.anderson.memory,
            regularization=a.anderson.regularization,
            safeguard_factor=a.anderson.safeguard_factor,
        ),
        staleness=StalenessSettings(a.staleness.max_behind, a.staleness.min_fresh_share),
        relay_trades=a.relay_trades,
        polish=PolishSettings(a.polish.first, a.polish.every, a.polish.max_rounds),
    )


def _ratings(feeder: Feeder, r: spec.LineRatings, v0_pu: float) -> FloatArray:
    if r.rule == "nominal_plus":
        flow = run_power_flow(feeder, -feeder.load_kw, -feeder.load_kvar, v0_pu=v0_pu)
        rating = flow.branch_s_kva + r.margin_kva
        rating[feeder.root] = np.nan
    else:
        rating = feeder.rating_kva.copy()
    labels = {feeder.branch_label(k): k for k in feeder.branches}
    for label, kva in r.per_branch_kva.items():
        if label not in labels:
            raise ScenarioError(f"line rating given for branch {label!r}, which the feeder does not have")
        rating[labels[label]] = kva
    return np.asarray(rating)


def _tou(t: spec.TimeOfUse, hours: FloatArray) -> FloatArray:
    price = np.full(hours.shape, t.base_eur_per_kwh)
    for lo, hi, value in t.windows:
        inside = (hours >= lo) & (hours < hi) if lo <= hi else (hours >= lo) | (hours < hi)
        price[inside] = value
    return price


def _parse_start(text: str) -> datetime:
    try:
        start = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ScenarioError(f"horizon.start {text!r} is not an ISO 8601 time") from exc
    if start.tzinfo is None:
        raise ScenarioError(f"horizon.start {text!r} has no time zone (use Z for UTC)")
    return start
