"""The meter simulator as an asyncio service: the site's plant (p2pdoe.core.realtime.plant) under
seeded forecast errors (p2pdoe.core.realtime.weather), stepped every `rate_s` of simulated time on the
shared clock. It publishes a `MeterReading` on `site/<id>/meter` per step and follows the latest
`SetPointMessage` on `site/<id>/setpoints`; until it hears one, the battery idles, nothing is
curtailed and the flexible load follows its preferred profile.

Like a real meter it is already running when the day starts: it publishes from `lead_in_s` before
the day's start (the plant then sees the day's first sample of weather and load), so the edge has
the plant under control, and the day's first step follows set-points, not the idle plant."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta

import numpy as np

from p2pdoe.core import topics
from p2pdoe.core.network import FloatArray
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.realtime.clock import SimClock
from p2pdoe.core.realtime.plant import Reading, Resources, SetPoints, plant_spec, step
from p2pdoe.core.realtime.weather import Actuals, actuals
from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.transport import InboundMessage, Transport

log = logging.getLogger("meter_sim")


class MeterSim:
    """One site's plant on the simulated clock; `day_start` is the simulated start of its horizon."""

    def __init__(
        self,
        config: SiteConfig,
        clock: SimClock,
        day_start: datetime,
        rate_s: float,
        seed: int,
        lead_in_s: float = 0.0,
    ):
        c = config.community
        if not (math.isfinite(lead_in_s) and lead_in_s >= 0):
            raise ValueError(f"the lead-in must be a finite number of seconds >= 0, not {lead_in_s}")
        self.config = config
        self.site = c.id
        self.clock = clock
        self.day_start = day_start
        self.rate_s = rate_s
        self.spec = plant_spec(config)
        self.soc_kwh = self.spec.soc_init_kwh
        self.actuals: Actuals = actuals(
            _array(c.pv_kw), _array(c.wind_kw), _array(c.fixed_load_kw), config.dt_h, rate_s, seed
        )
        self.first_sample = -math.ceil(lead_in_s / rate_s - 1e-9)
        self.set_points: SetPoints | None = None
        self.reader = MarketReader(f"meter-sim-{c.id}")
        self.dropped = self.reader.dropped

    def reading(self, k: int) -> MeterReading:
        """Step the plant over sample k (simulated [k, k + 1) * rate_s from the day's start); before
        the day (k < 0) the weather and load are those of the day's first sample."""
        t_s = k * self.rate_s
        sp = self.set_points or self._idle(t_s)
        res = self.actuals.at(max(t_s, 0.0))
        self.soc_kwh, r = step(self.spec, self.soc_kwh, sp, res, self.rate_s)
        return _message(self.site, self.day_start + timedelta(seconds=t_s + self.rate_s), r, res)

    def _idle(self, t_s: float) -> SetPoints:
        t = min(max(int(t_s // (self.config.dt_h * 3600)), 0), len(self.config.community.fixed_load_kw) - 1)
        return SetPoints(0.0, None, None, self.config.community.flexible_load.preferred_kw[t])

    def apply(self, m: InboundMessage) -> None:
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return
        if not isinstance(msg, SetPointMessage) or msg.site != self.site:
            self.dropped["sender_not_topic"] += 1
            return
        self.set_points = SetPoints(msg.battery_kw, msg.pv_cap_kw, msg.wind_cap_kw, msg.flex_kw)

    async def run(self, transport: Transport, now: datetime) -> int:
        """Publish readings from the current simulated time to the horizon's end; returns how many."""
        await transport.subscribe(topics.site(self.site, "setpoints"))
        listener = asyncio.create_task(self._listen(transport))
        since_start = (self.clock.sim_at(now) - self.day_start).total_seconds()
        first = max(self.first_sample, math.ceil(since_start / self.rate_s))
        published = 0
        try:
            for k in range(first, self.actuals.samples):
                due = self.clock.wall_at(self.day_start + timedelta(seconds=(k + 1) * self.rate_s))
                await asyncio.sleep(max(0.0, (due - datetime.now(due.tzinfo)).total_seconds()))
                payload = self.reading(k).model_dump_json().encode()
                await transport.publish(topics.site(self.site, "meter"), payload, qos=0)
                published += 1
        finally:
            listener.cancel()
        return published

    async def _listen(self, transport: Transport) -> None:
        async for m in transport.messages():
            self.apply(m)


def _array(values: list[float]) -> FloatArray:
    return np.array(values, dtype=float)


def _message(site: str, ts: datetime, r: Reading, res: Resources) -> MeterReading:
    return MeterReading(
        site=site,
        ts=ts,
        p_kw=r.p_kw,
        q_kvar=r.q_kvar,
        pv_kw=r.pv_kw,
        wind_kw=r.wind_kw,
        fixed_load_kw=r.fixed_load_kw,
        flex_kw=r.flex_kw,
        battery_kw=r.battery_kw,
        soc_kwh=r.soc_kwh,
        pv_available_kw=res.pv_kw,
        wind_available_kw=res.wind_kw,
    )
