"""The edge's real-time controller as a pure state machine: fed meter readings (and what the edge
hears of envelopes and the coordinator), it gives the set-points for the next step, the telemetry,
envelope switches and each interval's settlement. The edge service persists and publishes them.

Per reading at ts (the end of the step it measured, and the start of the next):
1. its energy is added to its interval; the first reading of a new interval settles the last one
   (readings before or after the day are enforced and judged but belong to no interval);
2. the envelope for the next step is chosen by the fallback rules (`fallback.choose` at ts);
3. the schedule of the agreement in force at ts gives the set-points, which `enforcement.enforce`
   corrects where the predicted injection would leave the envelope;
4. the telemetry judges the measured p against the envelope that was in force over its step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import numpy as np

from p2pdoe.core.day_configs import daily_calendar, site_config_on
from p2pdoe.core.network import FloatArray
from p2pdoe.core.realtime.book import EnvelopeBook
from p2pdoe.core.realtime.enforcement import (
    Box,
    Compliance,
    FlexRange,
    Measured,
    costs_from_config,
    default_margin_kw,
    enforce,
)
from p2pdoe.core.realtime.fallback import Choice, FallbackConfig, Heard, choose, describe_switch, is_switch
from p2pdoe.core.realtime.plant import PlantSpec, SetPoints, limits
from p2pdoe.core.realtime.settlement import AgreedTrade, IntervalEnergy, Settlement, settle
from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.core.schemas.site import SiteConfig

_WITHIN_STEP = timedelta(milliseconds=1)


@dataclass(frozen=True)
class Plan:
    """An agreement the site follows: its schedule from `start`, one column per interval."""

    round: str
    start: datetime
    dt_s: int
    battery_kw: FloatArray  # + discharge
    pv_kw: FloatArray
    wind_kw: FloatArray
    flex_kw: FloatArray
    net_kw: FloatArray
    pv_forecast_kw: FloatArray
    wind_forecast_kw: FloatArray
    peers: tuple[str, ...]
    bought_kw: FloatArray  # (peers, T)
    sold_kw: FloatArray
    buy_price: FloatArray  # (peers, T) EUR/kWh
    sell_price: FloatArray

    def index(self, moment: datetime) -> int | None:
        t = int((moment - self.start).total_seconds() // self.dt_s)
        return t if 0 <= t < self.net_kw.shape[0] else None

    def set_points(self, t: int) -> SetPoints:
        """The schedule's set-points: a cap where it curtails, none where it takes all it forecast."""
        return SetPoints(
            battery_kw=float(self.battery_kw[t]),
            pv_cap_kw=_cap(self.pv_kw[t], self.pv_forecast_kw[t]),
            wind_cap_kw=_cap(self.wind_kw[t], self.wind_forecast_kw[t]),
            flex_kw=float(self.flex_kw[t]),
        )

    def trades(self, t: int) -> list[AgreedTrade]:
        h = self.dt_s / 3600.0
        return [
            AgreedTrade(
                peer,
                float(self.bought_kw[k, t]) * h,
                float(self.sold_kw[k, t]) * h,
                float(self.buy_price[k, t]),
                float(self.sell_price[k, t]),
            )
            for k, peer in enumerate(self.peers)
        ]

    def scheduled_kwh(self, t: int) -> float:
        return float(self.net_kw[t]) * self.dt_s / 3600.0


def _cap(scheduled_kw: float, forecast_kw: float) -> float | None:
    return float(max(scheduled_kw, 0.0)) if scheduled_kw < forecast_kw - 1e-3 else None


@dataclass(frozen=True)
class Settled:
    settlement: Settlement
    round: str | None
    energy: IntervalEnergy
    choice: Choice | None


@dataclass(frozen=True)
class Switch:
    previous: Choice | None
    choice: Choice
    text: str


@dataclass(frozen=True)
class Step:
    """What one reading gave."""

    set_points: SetPoints
    choice: Choice
    compliance: Compliance
    judged: Choice  # the envelope in force over the measured step
    excess_kw: float  # of the measured p over `judged` (0 inside)
    plan: Plan | None
    switch: Switch | None = None
    settled: Settled | None = None


@dataclass
class Means:
    """Running means of one interval's measured resources (for the forecast update)."""

    seconds: float = 0.0
    pv_kw: float = 0.0
    wind_kw: float = 0.0
    fixed_load_kw: float = 0.0

    def add(self, r: MeterReading, step_s: float) -> None:
        total = self.seconds + step_s
        w = step_s / total
        pv = r.pv_available_kw if r.pv_available_kw is not None else (r.pv_kw or 0.0)
        wind = r.wind_available_kw if r.wind_available_kw is not None else (r.wind_kw or 0.0)
        self.pv_kw += w * (pv - self.pv_kw)
        self.wind_kw += w * (wind - self.wind_kw)
        self.fixed_load_kw += w * ((r.fixed_load_kw or 0.0) - self.fixed_load_kw)
        self.seconds = total


@dataclass
class PredictionError:
    """The one-step prediction's error, as an exponentially weighted mean of |measured - predicted|
    over about 1/weight readings. The enforcement's safety margin covers about two standard
    deviations of it (sigma = sqrt(pi/2) * mean |error| for a normal error): the fixed load's noise
    and gusts a site cannot foresee, measured at the site instead of assumed."""

    weight: float = 0.05
    sigmas: float = 2.0
    mean_abs_kw: float = 0.0
    predicted_kw: float | None = None  # for the step under way

    def measured(self, p_kw: float) -> None:
        if self.predicted_kw is not None:
            self.mean_abs_kw += self.weight * (abs(p_kw - self.predicted_kw) - self.mean_abs_kw)

    def margin_kw(self, envelope: Box) -> float:
        sigma = math.sqrt(math.pi / 2.0) * self.mean_abs_kw
        return max(default_margin_kw(envelope), self.sigmas * sigma)


@dataclass
class Controller:
    config: SiteConfig
    spec: PlantSpec
    fallback: FallbackConfig
    day_start: datetime
    nominal_step_s: float
    book: EnvelopeBook = field(default_factory=EnvelopeBook)
    plans: list[Plan] = field(default_factory=list)
    coordinator_online: bool = False
    skew_s: float | None = None
    energy: IntervalEnergy | None = None
    choice: Choice | None = None  # for the step that starts at the last reading
    judged: Choice | None = None  # in force over the step that ended at the last reading
    last_ts: datetime | None = None
    soc_kwh: float | None = None
    flex_used_kwh: float = 0.0
    means: Means = field(default_factory=Means)
    last_means: tuple[int, Means] | None = None  # (interval, its means) of the last complete one
    duplicates: int = 0
    errors: PredictionError = field(default_factory=PredictionError)
    next_day: tuple[datetime, SiteConfig] | None = None  # agreed ahead; it begins at its start
    base: SiteConfig | None = None  # the configured day, which every date reads by clock hour

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = self.config

    @property
    def dt_s(self) -> int:
        return round(self.config.dt_h * 3600)

    @property
    def intervals(self) -> int:
        return len(self.config.price_import_eur_per_kwh)

    def interval_of(self, moment: datetime) -> int:
        return int((moment - self.day_start).total_seconds() // self.dt_s)

    def interval_start(self, t: int) -> datetime:
        return self.day_start + timedelta(seconds=t * self.dt_s)

    def start_day(self, start: datetime, config: SiteConfig | None = None) -> None:
        """A round over a whole day sets that day's start (and configuration: its own intervals and
        series). The day after the one under way waits: this day runs to its end, its last interval
        is settled, and the first reading from `start` on begins the next (`on_reading`)."""
        if start >= self.interval_start(self.intervals):
            self.next_day = (start, config or self.config)
            return
        self.day_start = start
        if config is not None:
            self.config = config

    def _day_turns(self, moment: datetime) -> bool:
        """The next day begins at `moment` if it has started: the one agreed ahead, else (no round
        reached this site in time) the configured day on the next date. The daily counts reset."""
        if self.next_day is None and moment >= self.interval_start(self.intervals):
            self.next_day = self._following_day()
        if self.next_day is None or moment < self.next_day[0]:
            return False
        (self.day_start, self.config), self.next_day = self.next_day, None
        self.flex_used_kwh, self.last_means = 0.0, None
        return True

    def _following_day(self) -> tuple[datetime, SiteConfig] | None:
        """The day after this one, if the configuration describes whole days and this one ends at
        local midnight (else readings after the day belong to no interval)."""
        base = self.base or self.config
        calendar = daily_calendar(base)
        end = self.interval_start(self.intervals)
        if calendar is None or calendar.start(calendar.day_of(end)) != end:
            return None
        return end, site_config_on(base, calendar.day_of(end), calendar)

    def heard_coordinator(self, online: bool, skew_s: float | None = None) -> None:
        """The coordinator's status: online or not, and (from a live one) the clock skew it shows."""
        self.coordinator_online = online
        if skew_s is not None:
            self.skew_s = skew_s

    def count_from(self, ts: datetime) -> None:
        """The next reading counts its own step only: after a restart, the readings missed while the
        agent was not running are a gap in the interval's coverage, not estimated from that reading."""
        if self.last_ts is not None and ts > self.last_ts:
            self.last_ts = max(self.last_ts, ts - timedelta(seconds=self.nominal_step_s))

    def adopt(self, plan: Plan) -> None:
        """A settled agreement: it governs from its start (later plans win where they overlap)."""
        self.plans = [*[p for p in self.plans if p.start < plan.start][-3:], plan]

    def plan_at(self, moment: datetime) -> Plan | None:
        for plan in reversed(self.plans):
            if plan.index(moment) is not None:
                return plan
        return None

    def choose_at(self, moment: datetime) -> Choice:
        heard = Heard(self.book.dynamic_at(moment), self.book.default, self.coordinator_online, self.skew_s)
        return choose(heard, self.fallback, moment)

    def on_reading(self, r: MeterReading) -> Step | None:
        """One reading; None for a repeated or older one (at-least-once delivery)."""
        if self.last_ts is not None and r.ts <= self.last_ts:
            self.duplicates += 1
            return None
        t = self.interval_of(r.ts - _WITHIN_STEP)
        settled = self._roll_to(t)  # past the day's end: its last interval is settled here
        if self._day_turns(r.ts - _WITHIN_STEP):
            self._roll_to(self.interval_of(r.ts - _WITHIN_STEP))
        step_s = self._step_s(r.ts, None if self.energy is None else self.energy.start)
        if self.energy is not None:
            self.energy.add(r.ts, r.p_kw, step_s)
            self.means.add(r, step_s)
            self.flex_used_kwh += (r.flex_kw or 0.0) * step_s / 3600.0
        self.last_ts, self.soc_kwh = r.ts, r.soc_kwh
        self.errors.measured(r.p_kw)
        judged = self.judged = self.choose_at(r.ts - _WITHIN_STEP)
        choice = self.choose_at(r.ts)
        switch = None
        if is_switch(self.choice, choice):
            switch = Switch(self.choice, choice, describe_switch(self.choice, choice))
        self.choice = choice
        plan = self.plan_at(r.ts)
        enforced = self._enforce(r, step_s, plan, choice)
        return Step(
            enforced.set_points,
            choice,
            enforced.compliance,
            judged,
            judged.box.excess_kw(r.p_kw),
            plan,
            switch,
            settled,
        )

    def _step_s(self, ts: datetime, interval_start: datetime | None) -> float:
        since_start = math.inf if interval_start is None else (ts - interval_start).total_seconds()
        if self.last_ts is None:
            return min(self.nominal_step_s, since_start)
        return min((ts - self.last_ts).total_seconds(), since_start)

    def _roll_to(self, t: int) -> Settled | None:
        """Start interval t's accumulation; settle the one before if it was under way. Readings
        outside the day (a meter runs before and after it) are enforced but belong to no interval."""
        if self.energy is not None and self.interval_of(self.energy.start) == t:
            return None
        settled = None
        if self.energy is not None:
            settled = self.settle(self.energy)
            self.last_means = (self.interval_of(self.energy.start), self.means)
        self.means = Means()
        in_day = 0 <= t < self.intervals
        self.energy = IntervalEnergy(self.interval_start(t), self.interval_start(t + 1)) if in_day else None
        return settled

    def resume(self, energy: IntervalEnergy | None, flex_used_kwh: float) -> None:
        """Continue an interval's accumulation saved before a restart (None: none under way), with the
        flexible energy used so far."""
        if energy is not None:
            self.energy, self.last_ts = energy, energy.last_ts
        self.flex_used_kwh = flex_used_kwh

    def settle(self, e: IntervalEnergy) -> Settled:
        t = self.interval_of(e.start)
        plan = self.plan_at(e.start)
        k = None if plan is None else plan.index(e.start)
        scheduled = 0.0 if plan is None or k is None else plan.scheduled_kwh(k)
        trades = [] if plan is None or k is None else plan.trades(k)
        day_t = min(max(t, 0), self.intervals - 1)
        s = settle(
            e.start,
            e.energy_kwh,
            scheduled,
            trades,
            self.config.price_import_eur_per_kwh[day_t],
            self.config.price_export_eur_per_kwh[day_t],
        )
        return Settled(s, None if plan is None else plan.round, e, self.judged or self.choice)

    def _enforce(self, r: MeterReading, step_s: float, plan: Plan | None, choice: Choice) -> _Enforced:
        day_t = min(max(self.interval_of(r.ts), 0), self.intervals - 1)
        k = None if plan is None else plan.index(r.ts)
        schedule = self._idle(day_t) if plan is None or k is None else plan.set_points(k)
        soc = r.soc_kwh if r.soc_kwh is not None else self.spec.soc_init_kwh
        lim = limits(self.spec, soc, step_s if step_s > 0 else self.nominal_step_s)
        measured = Measured(
            p_kw=r.p_kw,
            pv_kw=r.pv_kw or 0.0,
            pv_available_kw=r.pv_available_kw if r.pv_available_kw is not None else (r.pv_kw or 0.0),
            wind_kw=r.wind_kw or 0.0,
            wind_available_kw=r.wind_available_kw if r.wind_available_kw is not None else (r.wind_kw or 0.0),
            flex_kw=r.flex_kw or 0.0,
            battery_kw=r.battery_kw or 0.0,
            max_charge_kw=lim.charge_kw,
            max_discharge_kw=lim.discharge_kw,
        )
        flex = FlexRange(self.spec.flex_min_kw, self.spec.flex_max_kw)
        costs = costs_from_config(self.config, day_t, measured.flex_kw)
        e = enforce(measured, schedule, flex, choice.box, costs, self.errors.margin_kw(choice.box))
        self.errors.predicted_kw = e.compliance.predicted_kw
        return _Enforced(e.set_points, e.compliance)

    def blind_set_points(self, moment: datetime) -> SetPoints:
        """Without readings: the plan's set-points at `moment` (its margins kept it inside the
        envelope against the forecast), else idle."""
        plan = self.plan_at(moment)
        k = None if plan is None else plan.index(moment)
        if plan is None or k is None:
            return self._idle(min(max(self.interval_of(moment), 0), self.intervals - 1))
        sp = plan.set_points(k)
        flex = min(max(sp.flex_kw, self.spec.flex_min_kw), self.spec.flex_max_kw)  # a solver's -1e-7
        return replace(sp, flex_kw=flex)

    def _idle(self, t: int) -> SetPoints:
        """Without an agreement: the battery idles, nothing is curtailed, the flexible load as preferred."""
        return SetPoints(0.0, None, None, self.config.community.flexible_load.preferred_kw[t])

    def projected_soc(self, moment: datetime) -> float:
        """The state of charge at `moment` if the battery follows the plan from the last reading on."""
        soc = self.soc_kwh if self.soc_kwh is not None else self.spec.soc_init_kwh
        for kw, hours in self._plan_ahead(moment, "battery"):
            charge, discharge = max(-kw, 0.0), max(kw, 0.0)
            soc += (self.spec.eta_charge * charge - discharge / self.spec.eta_discharge) * hours
        return min(max(soc, self.spec.soc_min_kwh), self.spec.soc_max_kwh)

    def projected_flex_kwh(self, moment: datetime) -> float:
        """The flexible load's energy from the last reading to `moment`, as planned."""
        return sum(kw * hours for kw, hours in self._plan_ahead(moment, "flex"))

    def _plan_ahead(self, moment: datetime, what: str) -> list[tuple[float, float]]:
        """(planned kW, hours) pieces from the last reading to `moment`, interval by interval."""
        now = self.last_ts
        if now is None:
            return []
        pieces = []
        while now < moment:
            t = self.interval_of(now)
            end = min(self.interval_start(t + 1), moment)
            plan = self.plan_at(now)
            k = None if plan is None else plan.index(now)
            if plan is not None and k is not None:
                kw = plan.battery_kw[k] if what == "battery" else plan.flex_kw[k]
            else:
                day_t = min(max(t, 0), self.intervals - 1)
                kw = 0.0 if what == "battery" else self.config.community.flexible_load.preferred_kw[day_t]
            pieces.append((float(kw), (end - now).total_seconds() / 3600.0))
            now = end
        return pieces


@dataclass(frozen=True)
class _Enforced:
    set_points: SetPoints
    compliance: Compliance


def plan_from(
    round_id: str,
    start: datetime,
    dt_h: float,
    values: dict[str, FloatArray],
    peers: Sequence[str],
    bought_kw: FloatArray,
    sold_kw: FloatArray,
    buy_price: FloatArray,
    sell_price: FloatArray,
    net_kw: FloatArray,
    pv_forecast_kw: FloatArray,
    wind_forecast_kw: FloatArray,
) -> Plan:
    """A plan from an agreed schedule's blocks (p2pdoe.core.solution.Schedule.values)."""
    return Plan(
        round=round_id,
        start=start,
        dt_s=round(dt_h * 3600),
        battery_kw=np.asarray(values["dis"]) - np.asarray(values["ch"]),
        pv_kw=np.asarray(values["pv"]),
        wind_kw=np.asarray(values["wd"]),
        flex_kw=np.asarray(values["lx"]),
        net_kw=np.asarray(net_kw),
        pv_forecast_kw=np.asarray(pv_forecast_kw),
        wind_forecast_kw=np.asarray(wind_forecast_kw),
        peers=tuple(peers),
        bought_kw=np.asarray(bought_kw),
        sold_kw=np.asarray(sold_kw),
        buy_price=np.asarray(buy_price),
        sell_price=np.asarray(sell_price),
    )
