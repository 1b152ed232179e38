"""A site's simulated meter and plant as a pure machine: the plant (p2pdoe.core.realtime.plant) under
seeded forecast errors (p2pdoe.core.realtime.weather), stepped every `rate_s` of the day's time.

Sample k covers [k, k + 1) * rate_s from the day's start and its reading is stamped at its end; the
machine wakes at each end and publishes the readings due. It follows the latest `SetPointMessage`
from the next step on; until one arrives the battery idles, nothing is curtailed and the flexible
load follows its preferred profile. Like a real meter it runs before and after the day: from
`lead_in_s` before the day's start (the plant then sees the day's first sample of weather and load)
to `trail` samples past its end (the last sample's weather), so the day's first step follows
set-points and its last interval is settled by a reading that comes after it.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np

from p2pdoe.core import topics
from p2pdoe.core.day_configs import daily_calendar, site_config_on
from p2pdoe.core.edge.forecast import with_forecast
from p2pdoe.core.effects import Exit, Heard, Send, Woke
from p2pdoe.core.network import FloatArray
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.realtime.plant import Reading, Resources, SetPoints, plant_spec, step
from p2pdoe.core.realtime.weather import Actuals, actuals
from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage, SiteForecast
from p2pdoe.core.schemas.site import SiteConfig


class SimulatedMeter:
    def __init__(
        self,
        config: SiteConfig,
        day_start: datetime,
        rate_s: float,
        seed: int,
        lead_in_s: float = 0.0,
        trail: int = 1,
        days: int = 1,
        truth: SiteForecast | None = None,
    ):
        """`days`: the day from `day_start` and the days after it, each its date's configuration
        (p2pdoe.core.day_configs), one after another; `truth`: the weather and load of the intervals
        it covers instead (before the seeded errors), e.g. each date's scenario
        (p2pdoe.core.day_configs.scenario_forecast)."""
        c = config.community
        if not (math.isfinite(lead_in_s) and lead_in_s >= 0):
            raise ValueError(f"the lead-in must be a finite number of seconds >= 0, not {lead_in_s}")
        self.config = config
        self.site = c.id
        self.day_start = day_start
        self.rate_s = rate_s
        self.spec = plant_spec(config)
        self.soc_kwh = self.spec.soc_init_kwh
        series = _days(config, day_start, days, truth)
        self.preferred_kw = series["preferred_kw"]
        self.actuals: Actuals = actuals(
            series["pv_kw"], series["wind_kw"], series["fixed_load_kw"], config.dt_h, rate_s, seed
        )
        self.first_sample = -math.ceil(lead_in_s / rate_s - 1e-9)
        self.last_sample = self.actuals.samples - 1 + trail
        self.set_points: SetPoints | None = None
        self.reader = MarketReader(f"meter-sim-{c.id}")
        self.dropped = self.reader.dropped
        self.published = 0
        self._next: int | None = None  # the next sample to publish

    # --- the plant -------------------------------------------------------------------------------

    def reading(self, k: int) -> MeterReading:
        """Step the plant over sample k; outside the day the weather and load are those of its
        nearest sample."""
        t_s = k * self.rate_s
        sp = self.set_points or self._idle(t_s)
        res = self.actuals.at(min(max(t_s, 0.0), self.actuals.horizon_s - self.rate_s))
        self.soc_kwh, r = step(self.spec, self.soc_kwh, sp, res, self.rate_s)
        return _message(self.site, self.end_of(k), r, res)

    def end_of(self, k: int) -> datetime:
        return self.day_start + timedelta(seconds=(k + 1) * self.rate_s)

    def _idle(self, t_s: float) -> SetPoints:
        t = min(max(int(t_s // (self.config.dt_h * 3600)), 0), len(self.preferred_kw) - 1)
        return SetPoints(0.0, None, None, float(self.preferred_kw[t]))

    def apply(self, payload: bytes) -> None:
        msg = self.reader.runtime(payload)
        if msg is None:
            return
        if not isinstance(msg, SetPointMessage) or msg.site != self.site:
            self.dropped["sender_not_topic"] += 1
            return
        self.set_points = SetPoints(msg.battery_kw, msg.pv_cap_kw, msg.wind_cap_kw, msg.flex_kw)

    # --- the machine -----------------------------------------------------------------------------

    def start(self, now: datetime) -> list[Send | Exit]:
        """From the first sample that ends after `now` (none before the lead-in)."""
        since_start = (now - self.day_start).total_seconds()
        self._next = max(self.first_sample, math.ceil(since_start / self.rate_s - 1e-9))
        return [] if self._next <= self.last_sample else [Exit(0)]

    def next_wake(self) -> datetime | None:
        return None if self._next is None or self._next > self.last_sample else self.end_of(self._next)

    def holding(self) -> bool:
        return False

    def heavy(self, event: object) -> bool:
        return False

    def handle(self, event: Heard | Woke, now: datetime) -> list[Send | Exit]:
        if isinstance(event, Heard):
            self.apply(event.payload)
            return []
        out: list[Send | Exit] = []
        while self._next is not None and self._next <= self.last_sample and self.end_of(self._next) <= now:
            payload = self.reading(self._next).model_dump_json().encode()
            out.append(Send(topics.site(self.site, "meter"), payload, qos=0))
            self._next += 1
            self.published += 1
        return out if self.next_wake() is not None else [*out, Exit(0)]


def _array(values: list[float]) -> FloatArray:
    return np.array(values, dtype=float)


def _days(
    config: SiteConfig, day_start: datetime, days: int, truth: SiteForecast | None = None
) -> dict[str, FloatArray]:
    """The series of `days` days from `day_start`, each its date's (one day: the configuration's),
    with `truth` over the intervals it covers."""
    names = ("pv_kw", "wind_kw", "fixed_load_kw")
    if days == 1:
        dated = [config.community if truth is None else with_forecast(config, truth)[0].community]
    else:
        calendar = daily_calendar(config)
        if calendar is None:
            raise ValueError("a meter runs several days only on a configuration of one whole day")
        first = calendar.day_of(day_start)
        configs = [site_config_on(config, first + timedelta(days=k), calendar) for k in range(days)]
        dated = [(c if truth is None else with_forecast(c, truth)[0]).community for c in configs]
    out = {n: np.concatenate([_array(getattr(c, n)) for c in dated]) for n in names}
    return {**out, "preferred_kw": np.concatenate([_array(c.flexible_load.preferred_kw) for c in dated])}


def _message(site: str, ts: datetime, r: Reading, res: Resources) -> MeterReading:
    return MeterReading(
        site=site, ts=ts, p_kw=r.p_kw, q_kvar=r.q_kvar, pv_kw=r.pv_kw, wind_kw=r.wind_kw,
        fixed_load_kw=r.fixed_load_kw, flex_kw=r.flex_kw, battery_kw=r.battery_kw, soc_kwh=r.soc_kwh,
        pv_available_kw=res.pv_kw, wind_available_kw=res.wind_kw,
    )  # fmt: skip
