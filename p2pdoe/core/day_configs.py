"""The configurations of any date, from those of one day: pure.

A site's or the coordinator's configuration describes one typical day. For another date each series
is read by local clock hour (the interval of the typical day at the nearest clock hour), so the day
has its own 23, 24 or 25 hours of intervals (p2pdoe.core.calendar); the flexible load's daily energy
scales with the day's hours. The date's own forecasts then come on top: a site's integrator feeds
them (p2pdoe.core.edge.forecast), a simulated bench draws them from the scenario of that date.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from itertools import pairwise

import numpy as np

from p2pdoe.core.calendar import Calendar, utc_moment, utc_text
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.runtime import Registration, SiteForecast
from p2pdoe.core.schemas.site import SiteConfig


def calendar_of(config: SiteConfig | CoordinatorConfig, gate_closure: str = "12:00") -> Calendar:
    return Calendar(config.timezone, round(config.dt_h * 3600), gate_closure)


def daily_calendar(config: SiteConfig | CoordinatorConfig, intervals: int | None = None) -> Calendar | None:
    """The calendar `config`'s days follow, if `intervals` of it (default: its own) make one whole
    day on intervals that divide an hour (else None: it holds for its own horizon only)."""
    dt_s = round(config.dt_h * 3600)
    n = len(config.price_import_eur_per_kwh) if intervals is None else intervals
    if n * dt_s != 86_400 or 3600 % dt_s:
        return None
    return calendar_of(config)


def registration_on(reg: Registration, cfg: CoordinatorConfig) -> Registration:
    """`reg` on the coordinator's day: the ranges it gives that date of its own if it does, else those
    of the site's configured day read by local clock hour (as the site's configuration of that date
    gives them). Unchanged where it is already that day's, says no start, or either is not one whole
    day. The entries of other dates are dropped."""
    start = utc_moment(cfg.start)
    own = next((d for d in reg.days if d.start == start and len(d.technical_min_kw) == cfg.intervals), None)
    if own is not None:
        return reg.model_copy(update={**own.model_dump(), "days": []})
    reg = reg.model_copy(update={"days": []})
    cal = daily_calendar(cfg, len(reg.technical_min_kw))
    if reg.start is None or reg.start == start or cal is None:
        return reg
    day = cal.day_of(start)
    if cal.intervals(day) != cfg.intervals or cal.start(day) != start:
        return reg
    k = clock_hour_map(cal, utc_text(reg.start), len(reg.technical_min_kw), day)
    names = ("technical_min_kw", "technical_max_kw", "reactive_min_kvar", "reactive_max_kvar")
    update: dict[str, object] = {n: _pick(getattr(reg, n), k) for n in names}
    return reg.model_copy(update={**update, "start": start})


def clock_hour_map(calendar: Calendar, start: str, intervals: int, day: date) -> np.ndarray:
    """For each interval of `day`, the interval of the typical day (from `start`) at the nearest local
    clock hour (cyclic; the earlier on a tie)."""
    own = utc_moment(start)
    source = calendar.clock_hours(own, intervals)
    target = calendar.local_hours(day)
    gap = np.abs(target[:, None] - source[None, :])
    return np.asarray(np.argmin(np.minimum(gap, 24.0 - gap), axis=1))


def _pick(values: Sequence[float], k: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=float)[k]]


def site_config_on(config: SiteConfig, day: date, calendar: Calendar | None = None) -> SiteConfig:
    """`config`'s typical day on `day`: series by local clock hour, the flexible energy scaled."""
    cal = calendar or calendar_of(config)
    c = config.community
    k = clock_hour_map(cal, config.start, len(c.pv_kw), day)
    f = c.flexible_load
    flex = f.model_copy(
        update={
            "preferred_kw": _pick(f.preferred_kw, k),
            "energy_kwh": f.energy_kwh if len(k) == len(c.pv_kw) else f.energy_kwh * len(k) / len(c.pv_kw),
        }
    )
    community = c.model_copy(
        update={
            "pv_kw": _pick(c.pv_kw, k),
            "wind_kw": _pick(c.wind_kw, k),
            "fixed_load_kw": _pick(c.fixed_load_kw, k),
            "flexible_load": flex,
        }
    )
    return config.model_copy(
        update={
            "start": utc_text(cal.start(day)),
            "price_import_eur_per_kwh": _pick(config.price_import_eur_per_kwh, k),
            "price_export_eur_per_kwh": _pick(config.price_export_eur_per_kwh, k),
            "community": community,
        }
    )


def coordinator_config_on(
    cfg: CoordinatorConfig, day: date, calendar: Calendar | None = None
) -> CoordinatorConfig:
    """`cfg`'s typical day on `day`: background load, tariffs and needs by local clock hour."""
    cal = calendar or calendar_of(cfg)
    k = clock_hour_map(cal, cfg.start, cfg.intervals, day)
    sites = [
        s
        if s.stay_whole_import_kw is None
        else s.model_copy(update={"stay_whole_import_kw": _pick(s.stay_whole_import_kw, k)})
        for s in cfg.sites
    ]
    update = {
        "start": utc_text(cal.start(day)),
        "intervals": len(k),
        "background_kw": [_pick(row, k) for row in cfg.background_kw],
        "background_kvar": [_pick(row, k) for row in cfg.background_kvar],
        "price_import_eur_per_kwh": _pick(cfg.price_import_eur_per_kwh, k),
        "price_export_eur_per_kwh": _pick(cfg.price_export_eur_per_kwh, k),
        "sites": sites,
    }
    return CoordinatorConfig.model_validate({**cfg.model_dump(), **update})


def scenario_forecast(days: Sequence[Scenario], site: str, issued: datetime) -> SiteForecast:
    """`site`'s forecast over consecutive `days`, each its date's scenario (its own seeded profiles):
    what a simulated bench feeds the site as its integrator's forecast and its meter as the truth."""
    if not days:
        raise ValueError("a forecast of no day")
    step_s = round(days[0].dt_h * 3600)
    for a, b in pairwise(days):
        if b.start != a.start + timedelta(seconds=a.horizon * step_s) or round(b.dt_h * 3600) != step_s:
            raise ValueError(f"the days {a.start.date()} and {b.start.date()} do not follow one another")
    series = [next(c for c in s.communities if c.id == site) for s in days]
    return SiteForecast(
        site=site, issued=issued, start=days[0].start, step_s=step_s,
        pv_kw=[float(v) for c in series for v in c.pv_kw],
        wind_kw=[float(v) for c in series for v in c.wind_kw],
        fixed_load_kw=[float(v) for c in series for v in c.fixed_load_kw],
    )  # fmt: skip
