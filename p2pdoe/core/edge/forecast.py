"""A site's own forecast over its configured profiles: pure. Each interval the forecast covers whole
gets the time-weighted mean of the steps over it; the others keep their configured values. The
ranges a forecast gives its days are registered (p2pdoe.core.edge.market.EdgeMarket.registration)."""

from __future__ import annotations

from datetime import datetime, timedelta

from p2pdoe.core.calendar import utc_moment
from p2pdoe.core.schemas.runtime import SiteForecast
from p2pdoe.core.schemas.site import SiteConfig

SERIES = ("pv_kw", "wind_kw", "fixed_load_kw")
PEAK_FACTOR = 10.0  # a forecast above this many times the configured peak is refused


def forecast_problem(config: SiteConfig, f: SiteForecast) -> str | None:
    """Why `f` cannot be this site's forecast, or None."""
    c = config.community
    if f.site != c.id:
        return f"it is {f.site}'s forecast"
    for name in SERIES:
        values, configured = getattr(f, name), getattr(c, name)
        if values is None:
            continue
        peak = max(configured, default=0.0)
        if peak == 0.0 and max(values) > 0.0:
            return f"{name} forecasts a generator or load the site's configuration does not have"
        if max(values) > PEAK_FACTOR * peak:
            over = f"over {PEAK_FACTOR:g} x its configured peak {peak:.1f} kW"
            return f"{name} reaches {max(values):.1f} kW, {over}"
    return None


def with_forecast(config: SiteConfig, f: SiteForecast) -> tuple[SiteConfig, int]:
    """`config` with `f` over the intervals it covers whole, and how many those are."""
    c = config.community
    start = utc_moment(config.start)
    dt = timedelta(hours=config.dt_h)
    covered = [t for t in range(len(c.pv_kw)) if _covers(f, start + t * dt, start + (t + 1) * dt)]
    update: dict[str, list[float]] = {}
    for name in SERIES:
        values = getattr(f, name)
        if values is None or not covered:
            continue
        series = list(getattr(c, name))
        for t in covered:
            series[t] = _mean(f, values, start + t * dt, start + (t + 1) * dt)
        update[name] = series
    if not update:
        return config, 0
    return config.model_copy(update={"community": c.model_copy(update=update)}), len(covered)


def _covers(f: SiteForecast, a: datetime, b: datetime) -> bool:
    return f.start <= a and b <= f.start + timedelta(seconds=f.steps * f.step_s)


def _mean(f: SiteForecast, values: list[float], a: datetime, b: datetime) -> float:
    """The time-weighted mean of the steps over [a, b)."""
    lo, hi = (a - f.start).total_seconds(), (b - f.start).total_seconds()
    total = 0.0
    for j in range(int(lo // f.step_s), min(int(-(-hi // f.step_s)), f.steps)):
        overlap = min(hi, (j + 1) * f.step_s) - max(lo, j * f.step_s)
        total += values[j] * max(overlap, 0.0)
    return total / (hi - lo)
