"""What the coordinator builds from its configuration and the sites' registrations (no I/O): its
network view, the default envelopes, and each round's DSO participant.

A site left out of a round (late, missing, or gone mid-round) sits on its default envelope: its box is
fixed in the safe set (`with_sites_fixed`), so whatever the others are granted stays safe with it
anywhere inside its default. The defaults themselves are a box per site and interval (or one for the
whole day), safe with every site anywhere inside its own, each holding the site's need to stay whole
where the network allows, the rest of the room shared by the DSO's rule (`allocation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np

from p2pdoe.core.agreement.dso import DsoParticipant, Ranges, RoundPlan, with_rho
from p2pdoe.core.agreement.grid_solver import Bounds, GridSolver
from p2pdoe.core.allocation import Shortfall, allocate_defaults
from p2pdoe.core.envelope import GridView, SafeSet, safe_set, with_sites_fixed
from p2pdoe.core.feeder_config import check_offset, shifted_start
from p2pdoe.core.network import Feeder, FloatArray
from p2pdoe.core.scenario import admm_settings
from p2pdoe.core.schemas.coordinator import ConnectedSite, CoordinatorConfig
from p2pdoe.core.schemas.messages import WarmStart, ranges_digest
from p2pdoe.core.schemas.runtime import Registration


@dataclass(frozen=True)
class SiteFacts:
    """A site's public facts, per interval: net injection range and reactive injection range."""

    id: str
    bus: int  # index into the feeder's arrays
    x_min: FloatArray
    x_max: FloatArray
    q_min: FloatArray
    q_max: FloatArray


@dataclass(frozen=True)
class Defaults:
    """The default envelope of every connected site (config order): a profile of boxes, or one box."""

    sites: tuple[str, ...]
    lo_kw: FloatArray  # (C, T): a box per interval (the same in every interval if static)
    up_kw: FloatArray
    need_kw: FloatArray  # (C, T) import to stay whole
    shortfalls: tuple[Shortfall, ...] = ()  # sites whose default cannot hold that need

    def from_interval(self, offset: int) -> Defaults:
        """The defaults over intervals offset..T-1 (a rolling round's remaining horizon)."""
        cut = {name: getattr(self, name)[:, offset:] for name in ("lo_kw", "up_kw", "need_kw")}
        return replace(self, **cut)


@dataclass(frozen=True)
class RoundSetup:
    dso: DsoParticipant
    sites: tuple[str, ...]  # taking part, in config order
    excluded: tuple[str, ...]  # on their defaults
    view: GridView  # every connected site
    safe: SafeSet | None  # of the participants' boxes (excluded ones fixed); None without envelopes


def registration_problem(cfg: CoordinatorConfig, reg: Registration) -> str | None:
    """Why a registration does not match the coordinator's records, or None."""
    known = {s.id: s for s in cfg.sites}
    if reg.site not in known:
        return "not a connected site"
    site = known[reg.site]
    if reg.bus != site.bus:
        return f"registered at bus {reg.bus}, connected at bus {site.bus}"
    if set(reg.peers) != set(site.peers):
        return "its peers differ from the market's trading graph"
    if len(reg.technical_min_kw) != cfg.intervals:
        return f"its ranges cover {len(reg.technical_min_kw)} intervals, not {cfg.intervals}"
    return None


def facts_of(reg: Registration, feeder: Feeder) -> SiteFacts:
    return SiteFacts(
        id=reg.site,
        bus=feeder.index_of(reg.bus),
        x_min=np.array(reg.technical_min_kw),
        x_max=np.array(reg.technical_max_kw),
        q_min=np.array(reg.reactive_min_kvar),
        q_max=np.array(reg.reactive_max_kvar),
    )


def connection_facts(site: ConnectedSite, feeder: Feeder, horizon: int) -> SiteFacts:
    """A site known only by its connection agreement: capacities and worst-case reactive range."""

    def const(v: float) -> FloatArray:
        return np.full(horizon, v)

    return SiteFacts(
        id=site.id,
        bus=feeder.index_of(site.bus),
        x_min=const(-site.import_capacity_kw),
        x_max=const(site.export_capacity_kw),
        q_min=const(site.reactive_min_kvar),
        q_max=const(site.reactive_max_kvar),
    )


def network_view(cfg: CoordinatorConfig, feeder: Feeder, facts: list[SiteFacts]) -> GridView:
    return GridView(
        feeder=feeder,
        v0_pu=cfg.v0_pu,
        vmin_pu=cfg.vmin_pu,
        vmax_pu=cfg.vmax_pu,
        vmin_margin_pu=cfg.vmin_margin_pu,
        vmax_margin_pu=cfg.vmax_margin_pu,
        rating_margin=cfg.rating_margin,
        background_kw=np.array(cfg.background_kw),
        background_kvar=np.array(cfg.background_kvar),
        site_bus=np.array([f.bus for f in facts], dtype=int),
        q_min_kvar=np.array([f.q_min for f in facts]),
        q_max_kvar=np.array([f.q_max for f in facts]),
    )


def bounds_from_ranges(x_min: FloatArray, x_max: FloatArray, static: bool) -> Bounds:
    """Each site's envelope bounds from its technical range (C, T), as its own QP states them: the
    box contains zero where the assets reach it; a static box lies within the day's hull."""
    if static:
        x_min = np.repeat(x_min.min(axis=1, keepdims=True), x_min.shape[1], axis=1)
        x_max = np.repeat(x_max.max(axis=1, keepdims=True), x_max.shape[1], axis=1)
    middle = np.minimum(0.0, x_max)
    return Bounds(lo_min=x_min, lo_max=middle, up_min=middle, up_max=x_max)


def default_envelopes(cfg: CoordinatorConfig, feeder: Feeder) -> Defaults:
    """A box per site and interval (or one for the day), safe with every site anywhere in its own: its
    need to stay whole where the network allows it, the rest shared by `cfg.default_sharing`."""
    facts = [connection_facts(s, feeder, cfg.intervals) for s in cfg.sites]
    zero = [0.0] * cfg.intervals
    need = np.array([s.stay_whole_import_kw or zero for s in cfg.sites])
    a = allocate_defaults(
        safe_set(network_view(cfg, feeder, facts)),
        import_cap_kw=np.array([s.import_capacity_kw for s in cfg.sites]),
        export_cap_kw=np.array([s.export_capacity_kw for s in cfg.sites]),
        need_kw=need,
        sharing=cfg.default_sharing,
        profile=cfg.default_profile,
    )
    return Defaults(tuple(s.id for s in cfg.sites), a.lo_kw, a.up_kw, need, a.shortfalls)


def round_setup(
    cfg: CoordinatorConfig,
    feeder: Feeder,
    registrations: Mapping[str, Registration],
    excluded: set[str],
    defaults: Defaults,
    round_id: str,
    *,
    warm: WarmStart | None = None,
    rho: tuple[float, float] | None = None,
    epoch: str | None = None,
    traders: frozenset[str] | None = None,
    markups: Mapping[str, float] | None = None,
    trial: bool = False,
) -> RoundSetup:
    """The DSO participant of a round among every registered site not in `excluded`, in config order.
    `warm`: where the couplings start (`warm.warm_start_from`); `rho`: (rho_trade, rho_envelope) to
    start from instead of the configuration's, e.g. the previous round's final values; `traders`:
    who trades (None: every site; empty: a standalone round; else a coalition, trading among its
    members only); `markups`: each site's sale markup (None: honest bids); `trial`: a round whose
    envelopes are never in force."""
    ids = [s.id for s in cfg.sites]
    taking_part = [i for i, sid in enumerate(ids) if sid in registrations and sid not in excluded]
    facts = [_facts(cfg, feeder, s, registrations.get(s.id)) for s in cfg.sites]
    view = network_view(cfg, feeder, facts)
    grid, safe = None, None
    if cfg.policy != "none":
        safe = safe_set(view)
        if len(taking_part) < len(ids):
            if defaults.lo_kw.shape[1] != cfg.intervals:
                raise ValueError(
                    f"defaults of {defaults.lo_kw.shape[1]} intervals, a round of {cfg.intervals}"
                )
            safe = with_sites_fixed(safe, view, np.array(taking_part), defaults.lo_kw, defaults.up_kw)
        x_min = np.array([facts[i].x_min for i in taking_part])
        x_max = np.array([facts[i].x_max for i in taking_part])
        static = cfg.policy == "static"
        grid = GridSolver(safe, bounds_from_ranges(x_min, x_max, static), static)
    position = {i: k for k, i in enumerate(taking_part)}
    trades = {ids.index(sid) for sid in ids if traders is None or sid in traders} & set(position)
    peers = tuple(
        tuple(sorted(position[ids.index(p)] for p in cfg.sites[i].peers if ids.index(p) in trades))
        if i in trades
        else ()
        for i in taking_part
    )
    prices = 0.5 * (np.array(cfg.price_import_eur_per_kwh) + np.array(cfg.price_export_eur_per_kwh))
    sites = tuple(ids[i] for i in taking_part)
    ranges = Ranges(
        np.array([facts[i].x_min for i in taking_part]), np.array([facts[i].x_max for i in taking_part])
    )
    plan = RoundPlan(
        round=round_id,
        policy=cfg.policy,
        start=cfg.start,
        dt_h=cfg.dt_h,
        sites=sites,
        peers=peers,
        initial_trade_price=tuple(float(v) for v in prices),
        warm=warm,
        epoch=epoch,
        ranges=tuple(ranges_digest(lo, hi) for lo, hi in zip(ranges.x_min, ranges.x_max, strict=True)),
        traders=None if traders is None else tuple(sid for sid in sites if sid in traders),
        markups=None if markups is None else {sid: markups.get(sid, 0.0) for sid in sites},
        trial=trial,
    )
    dso = DsoParticipant(plan, cfg.intervals, with_rho(admm_settings(cfg.admm), rho), grid, ranges)
    left_out = tuple(sid for sid in ids if sid not in sites)
    return RoundSetup(dso, sites, left_out, view, safe)


def _facts(
    cfg: CoordinatorConfig, feeder: Feeder, site: ConnectedSite, reg: Registration | None
) -> SiteFacts:
    return connection_facts(site, feeder, cfg.intervals) if reg is None else facts_of(reg, feeder)


def remaining_coordinator_config(cfg: CoordinatorConfig, offset: int) -> CoordinatorConfig:
    """The configuration over intervals offset..T-1 of the day: start shifted, series sliced."""
    check_offset(offset, cfg.intervals)
    return cfg.model_copy(
        update={
            "start": shifted_start(cfg.start, offset, cfg.dt_h),
            "intervals": cfg.intervals - offset,
            "background_kw": [row[offset:] for row in cfg.background_kw],
            "background_kvar": [row[offset:] for row in cfg.background_kvar],
            "price_import_eur_per_kwh": cfg.price_import_eur_per_kwh[offset:],
            "price_export_eur_per_kwh": cfg.price_export_eur_per_kwh[offset:],
            "sites": [_remaining_site(s, offset) for s in cfg.sites],
        }
    )


def _remaining_site(site: ConnectedSite, offset: int) -> ConnectedSite:
    need = site.stay_whole_import_kw
    return site if need is None else site.model_copy(update={"stay_whole_import_kw": need[offset:]})


def remaining_registration(reg: Registration, offset: int, interval_s: int) -> Registration:
    """The registration's ranges over intervals offset..T-1 of the day (`interval_s` long each)."""
    check_offset(offset, len(reg.technical_min_kw))
    names = ("technical_min_kw", "technical_max_kw", "reactive_min_kvar", "reactive_max_kvar")
    update: dict[str, object] = {name: getattr(reg, name)[offset:] for name in names}
    if reg.start is not None:
        update["start"] = reg.start + timedelta(seconds=offset * interval_s)
    return reg.model_copy(update=update)


def shortfall_lines(defaults: Defaults, feeder: Feeder, start: datetime, interval_s: int) -> list[str]:
    """One line per site whose default envelope cannot hold its need to stay whole, and why."""

    def at(t: int) -> str:
        return (start + timedelta(seconds=t * interval_s)).strftime("%H:%M")

    lines = []
    for x in defaults.shortfalls:
        kind, element = x.limit
        where = (
            f"bus {int(feeder.bus_ids[element])}"
            if kind.startswith("v")
            else f"branch {feeder.branch_label(element)}"
        )
        spans = ", ".join(f"{at(a)}-{at(b)}" for a, b in _runs(x.intervals))
        lines.append(
            f"the default envelope of {defaults.sites[x.site]} cannot hold what it needs to stay whole "
            f"(import up to {x.granted_kw:.1f} of {x.need_kw:.1f} kW): every site's need together breaks "
            f"the {kind} limit at {where} at {spans} UTC"
        )
    return lines


def _runs(intervals: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive intervals as [first, last + 1) runs."""
    runs: list[tuple[int, int]] = []
    for t in intervals:
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs
