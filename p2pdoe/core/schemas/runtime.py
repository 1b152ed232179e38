"""Wire messages of the runtime (schema version 1): envelopes in force, status, registration,
progress. Strict like the agreement's messages (p2pdoe.core.schemas.messages): unknown keys, NaN,
infinity, numbers as strings and times without a time zone are refused.

A `Doe` carries the signed envelope (`lo_kw` <= `up_kw`, export positive) and its CSIP-AUS form in
watts, both non-negative: opModImpLimW = max(0, -lo) * 1000 and opModExpLimW = max(0, up) * 1000.
A box that does not contain zero (possible only where a site cannot reach zero, e.g. a load with no
generation: up < 0) keeps its exact bounds in `lo_kw` / `up_kw`; the CSIP limits then read as
"export 0 W" and the import limit, and the minimum import is not expressible in CSIP-AUS.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal, Protocol

from pydantic import Field, TypeAdapter, field_validator, model_validator

from p2pdoe.core.schemas.messages import (
    Grant,
    Message,
    PolishPrices,
    PolishReport,
    Proposal,
    RoundId,
    RoundOpen,
    Series,
    SiteId,
    Status,
)
from p2pdoe.core.schemas.payments import PaymentGrant, PaymentOpen, PaymentProposal
from p2pdoe.core.schemas.results import CommunityResult, SolveTimes, Trade
from p2pdoe.core.schemas.wire import Moment, checked_json

Finite = Annotated[float, Field(allow_inf_nan=False)]  # a finite number, in the unit its field names
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # the same, and not negative
PriceMove = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # EUR/kWh
WATT_TOLERANCE = 1.0


def _utc(value: datetime) -> datetime:
    if value.utcoffset() != timedelta(0):
        raise ValueError("times are given in UTC")
    return value


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


class Doe(Message):
    """The dynamic operating envelope of one site for one interval; or a default envelope, one box
    for its whole validity or a profile of boxes (`steps_kw`, each `step_s` long). With a profile,
    lo_kw/up_kw (and the CSIP-AUS limits) are the box inside every step: safe for a reader that
    ignores the profile."""

    schema_version: Literal[1] = 1
    kind: Literal["doe"] = "doe"
    site: SiteId
    round: RoundId | None  # the round that set it; None for a default envelope
    start: Moment
    duration_s: Annotated[int, Field(gt=0)]
    lo_kw: Finite
    up_kw: Finite
    opModImpLimW: NonNegative  # noqa: N815 (CSIP-AUS name)
    opModExpLimW: NonNegative  # noqa: N815 (CSIP-AUS name)
    steps_kw: list[tuple[Finite, Finite]] | None = None  # a profile: (lo_kw, up_kw) per step
    step_s: Annotated[int, Field(gt=0)] | None = None

    _start_utc = field_validator("start")(_utc)

    @model_validator(mode="after")
    def _consistent(self) -> Doe:
        if self.lo_kw > self.up_kw:
            raise ValueError("lo_kw exceeds up_kw")
        if (self.steps_kw is None) != (self.step_s is None):
            raise ValueError("steps_kw and step_s go together")
        if self.steps_kw is not None and self.step_s is not None:
            _check_profile(self.steps_kw, self.step_s, self.duration_s, self.lo_kw, self.up_kw)
        if abs(self.opModImpLimW - max(0.0, -self.lo_kw) * 1e3) > WATT_TOLERANCE:
            raise ValueError("opModImpLimW must equal max(0, -lo_kw) in W")
        if abs(self.opModExpLimW - max(0.0, self.up_kw) * 1e3) > WATT_TOLERANCE:
            raise ValueError("opModExpLimW must equal max(0, up_kw) in W")
        return self

    @classmethod
    def from_box(
        cls, site: str, round_id: str | None, start: datetime, duration_s: int, lo_kw: float, up_kw: float
    ) -> Doe:
        return cls(
            site=site,
            round=round_id,
            start=start,
            duration_s=duration_s,
            lo_kw=lo_kw,
            up_kw=up_kw,
            opModImpLimW=max(0.0, -lo_kw) * 1e3,
            opModExpLimW=max(0.0, up_kw) * 1e3,
        )

    @classmethod
    def from_profile(
        cls, site: str, start: datetime, step_s: int, lo_kw: Sequence[float], up_kw: Sequence[float]
    ) -> Doe:
        """A default envelope of one box per step (lo_kw[k] <= 0 <= up_kw[k])."""
        firm_lo, firm_up = max(lo_kw), min(up_kw)
        doe = cls.from_box(site, None, start, step_s * len(lo_kw), firm_lo, firm_up)
        steps = [(float(lo), float(up)) for lo, up in zip(lo_kw, up_kw, strict=True)]
        return doe.model_copy(update={"steps_kw": steps, "step_s": step_s})

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_s)

    def joined(self, after: Doe) -> Doe:
        """This default followed by `after`, which starts where this one ends: one default over both
        (a profile on the steps both share), so a reader holding only the latest has both days."""
        if after.site != self.site or after.start != self.end:
            raise ValueError("a default is joined only to the same site's next one, from its end")
        step = math.gcd(self.step_s or self.duration_s, after.step_s or after.duration_s)
        steps = _split(self, step) + _split(after, step)
        return Doe.from_profile(self.site, self.start, step, [a for a, _ in steps], [b for _, b in steps])

    def valid_at(self, moment: datetime) -> bool:
        """In force at `moment` (UTC): an envelope past its validity is never applied."""
        return self.start <= moment.astimezone(UTC) < self.end

    def box_at(self, moment: datetime) -> tuple[float, float]:
        """(lo_kw, up_kw) in force at `moment`: its profile's step then, or its one box."""
        if self.steps_kw is None or self.step_s is None:
            return self.lo_kw, self.up_kw
        k = int((moment.astimezone(UTC) - self.start).total_seconds() // self.step_s)
        return self.steps_kw[min(max(k, 0), len(self.steps_kw) - 1)]


def _split(doe: Doe, step: int) -> list[tuple[float, float]]:
    if doe.steps_kw is None or doe.step_s is None:
        return [(doe.lo_kw, doe.up_kw)] * (doe.duration_s // step)
    return [box for box in doe.steps_kw for _ in range(doe.step_s // step)]


def _check_profile(
    steps: list[tuple[float, float]], step_s: int, duration_s: int, lo: float, up: float
) -> None:
    if len(steps) * step_s != duration_s:
        raise ValueError("the profile's steps must cover duration_s exactly")
    if any(a > b for a, b in steps):
        raise ValueError("a step's lo exceeds its up")
    if any(lo < a - WATT_TOLERANCE / 1e3 or up > b + WATT_TOLERANCE / 1e3 for a, b in steps):
        raise ValueError("lo_kw/up_kw must lie inside every step of the profile")


class _FourRanges(Protocol):
    technical_min_kw: list[float]
    technical_max_kw: list[float]
    reactive_min_kvar: list[float]
    reactive_max_kvar: list[float]


def _check_ranges(r: _FourRanges) -> None:
    """Four series of one length, each minimum at most its maximum."""
    n = len(r.technical_min_kw)
    pairs = (
        ("technical", r.technical_min_kw, r.technical_max_kw),
        ("reactive", r.reactive_min_kvar, r.reactive_max_kvar),
    )
    for name, low, high in pairs:
        if len(low) != n or len(high) != n:
            raise ValueError("every range needs one value per interval, the same for all four")
        if any(lo > hi for lo, hi in zip(low, high, strict=True)):
            raise ValueError(f"{name} minimum exceeds its maximum")


class DayRanges(Message):
    """A site's ranges over one day of its own (its forecast for that date), from `start`."""

    start: Moment
    technical_min_kw: Series
    technical_max_kw: Series
    reactive_min_kvar: Series
    reactive_max_kvar: Series

    _start_utc = field_validator("start")(_utc)

    @model_validator(mode="after")
    def _ranges(self) -> DayRanges:
        _check_ranges(self)
        return self


MAX_DAYS_REGISTERED = 7


class Registration(Message):
    """What a site tells the coordinator about itself: public facts only."""

    schema_version: Literal[1] = 1
    kind: Literal["register"] = "register"
    site: SiteId
    bus: Annotated[int, Field(ge=1)]  # the feeder's own bus number
    peers: list[SiteId]
    technical_min_kw: Series  # X_min per interval of the day-ahead horizon
    technical_max_kw: Series  # X_max
    reactive_min_kvar: Series  # q_min: the reactive injection's worst cases per interval
    reactive_max_kvar: Series  # q_max
    # the ranges' first interval: the site's configured day, which the coordinator reads by local
    # clock hour on any other date (None: the coordinator's own day)
    start: Moment | None = None
    # dates of their own (the site's forecast for them): the coordinator takes a day's entry, by its
    # start, over the typical day read by clock hour
    days: list[DayRanges] = Field(default_factory=list, max_length=MAX_DAYS_REGISTERED)

    _start_utc = field_validator("start")(_utc_or_none)

    @model_validator(mode="after")
    def _ranges(self) -> Registration:
        _check_ranges(self)
        if len({d.start for d in self.days}) != len(self.days):
            raise ValueError("one entry per day")
        return self


# meter_silent: no reading for the configured time (the site runs on its schedule); reading_rejected:
# the last reading was stamped beyond the clock tolerance; journal_unwritable: the disk refuses writes.
# duplicate_process: another running edge agent publishes this site's status.
SiteAlarm = Literal[
    "clock_skew", "meter_silent", "reading_rejected", "journal_unwritable", "duplicate_process"
]
SiteFault = Literal["meter_silent", "reading_rejected", "journal_unwritable", "duplicate_process"]
Instance = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class SiteStatus(Message):
    schema_version: Literal[1] = 1
    kind: Literal["site_status"] = "site_status"
    site: SiteId
    state: Literal["online", "offline"]
    envelope: Literal["dynamic", "default", "fixed_default", "none"]  # which envelope is applied
    ts: Moment
    reason: str | None = None  # why this envelope applies (set by the real-time controller)
    alarm: Literal["clock_skew"] | None = None
    reading_age_s: float | None = None  # how old the last meter reading was when handled (simulated s)
    envelope_lead_s: float | None = None  # the envelope in force came this long before its start
    alarms: list[SiteAlarm] = Field(default_factory=list)  # every alarm raised now, clock_skew included
    faults: dict[SiteFault, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)  # since the start
    instance: Instance | None = None  # this run of the edge agent (a fresh token at every start)

    _ts_utc = field_validator("ts")(_utc)


class DsoStatus(Message):
    schema_version: Literal[1] = 1
    kind: Literal["dso_status"] = "dso_status"
    state: Literal["online", "offline"]
    round: RoundId | None
    ts: Moment
    phase: str | None = None  # registering, agreeing, reporting, following, rolling, closing, over
    envelope_lead_s: float | None = None  # the last interval's envelopes came this far ahead (simulated s)
    failed_rounds: Annotated[int, Field(ge=0)] = 0  # rolling rounds that failed today
    last_failure: str | None = None
    # Running day after day: the day in force (its local date), and the next day's round and phase
    # while that day is agreed ahead (from its gate closure to its start).
    day: date | None = None
    next_round: RoundId | None = None
    next_phase: str | None = None

    _ts_utc = field_validator("ts")(_utc)


class Progress(Message):
    """The coordinator's view of a round, once per iteration."""

    schema_version: Literal[1] = 1
    kind: Literal["progress"] = "progress"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    status: Status
    primal_trade_kw: NonNegative
    dual_trade_kw: NonNegative
    primal_envelope_kw: NonNegative
    dual_envelope_kw: NonNegative
    eps_trade_kw: NonNegative  # the primal stopping thresholds
    eps_envelope_kw: NonNegative
    # the most any trade or envelope price moved this iteration, and the bound a round needs to stop
    # (absent from coordinators before the price test)
    price_change_max_eur_per_kwh: PriceMove | None = None
    eps_price_eur_per_kwh: PriceMove | None = None
    sites: list[SiteId]  # taking part in this round
    excluded_sites: list[SiteId]  # on their default envelopes
    missing_sites: list[SiteId] = Field(default_factory=list)  # awaited past the iteration deadline
    # closed without their new proposals (bounded staleness): their couplings did not move
    frozen_sites: list[SiteId] = Field(default_factory=list)

    @property
    def prices_settled(self) -> bool | None:
        """Whether the price move is within its bound; None when the coordinator does not say."""
        moved, eps = self.price_change_max_eur_per_kwh, self.eps_price_eur_per_kwh
        return None if moved is None or eps is None else moved <= eps


class Telemetry(Message):
    """What an edge agent reports about its site now: its net injection (scheduled or measured),
    the envelope it applies and whether the injection is inside it."""

    schema_version: Literal[1] = 1
    kind: Literal["telemetry"] = "telemetry"
    site: SiteId
    ts: Moment
    source: Literal["schedule", "meter"]
    p_kw: Finite  # net injection, export positive
    envelope: Literal["dynamic", "default", "fixed_default", "none"]
    lo_kw: Finite | None
    up_kw: Finite | None
    inside: bool | None  # lo_kw <= p_kw <= up_kw; None without an envelope
    round: RoundId | None
    # From the real-time controller (source "meter"): the excess of the measured p over the
    # envelope (0 inside), the levers it moved, the injection it expects next and what remains
    # outside after its correction (non-zero only when its levers cannot restore compliance).
    excess_kw: Finite | None = None
    actions: list[Literal["battery", "flex", "pv", "wind"]] = Field(default_factory=list)
    predicted_kw: Finite | None = None
    residual_kw: Finite | None = None
    soc_kwh: NonNegative | None = None

    _ts_utc = field_validator("ts")(_utc)


class MeterReading(Message):
    """One reading of a site's meter (real or simulated): `ts` is the reading's time (simulated time
    on a simulated bench), powers in kW, the net injection export positive."""

    schema_version: Literal[1] = 1
    kind: Literal["meter"] = "meter"
    site: SiteId
    ts: Moment
    p_kw: Finite  # net injection, export positive
    q_kvar: Finite | None = None
    pv_kw: Finite | None = None
    wind_kw: Finite | None = None
    fixed_load_kw: Finite | None = None
    flex_kw: Finite | None = None
    battery_kw: Finite | None = None  # discharge positive
    soc_kwh: NonNegative | None = None
    pv_available_kw: NonNegative | None = None  # what PV could produce uncurtailed (inverters report it)
    wind_available_kw: NonNegative | None = None

    _ts_utc = field_validator("ts")(_utc)


class SetPointMessage(Message):
    """What the edge controller asks of the site's assets (a plant, or its simulator)."""

    schema_version: Literal[1] = 1
    kind: Literal["setpoints"] = "setpoints"
    site: SiteId
    ts: Moment
    battery_kw: Finite  # discharge positive, charge negative
    pv_cap_kw: NonNegative | None  # curtailment cap; None: no cap
    wind_cap_kw: NonNegative | None
    flex_kw: NonNegative

    _ts_utc = field_validator("ts")(_utc)


class SiteReport(Message):
    """A site's account of a round it finished: its agreed schedule, costs and purchases (what the
    coordinator's results.json holds per community), and how its agent ran."""

    schema_version: Literal[1] = 1
    kind: Literal["site_report"] = "site_report"
    site: SiteId
    round: RoundId
    status: Status
    iterations: Annotated[int, Field(ge=0)]
    objective_eur: Finite  # its QP's objective at the agreed point (the sum over sites is ADMM's)
    community: CommunityResult
    purchases: list[Trade]
    final_solve: str
    solve_times: SolveTimes
    rss_mb: NonNegative  # the agent's peak resident memory
    cpu_s: NonNegative  # the agent's process CPU time (user + system) from the round's opening to its end
    # Parts of cpu_s, each in the thread that spent it (None from an agent that does not measure
    # them): its participant's steps (solves, coupling updates), and decoding and encoding the
    # agreement's messages. The rest is the client stack, the event loop and everything else.
    cpu_steps_s: NonNegative | None = None
    cpu_codec_s: NonNegative | None = None
    ignored: dict[str, int]  # agreement messages its participant ignored, by reason
    dropped: dict[str, int]  # messages its service dropped before the participant, by reason

    @model_validator(mode="after")
    def _finite(self) -> SiteReport:
        json.dumps(self.model_dump(), allow_nan=False)  # ValueError on NaN or infinity anywhere
        return self


class SettlementRecord(Message):
    """One interval settled by a site (p2pdoe.core.realtime.settlement): measured and scheduled
    energy (kWh, export positive), the P2P payments at the agreed prices, the rest with the grid."""

    schema_version: Literal[1] = 1
    kind: Literal["settlement"] = "settlement"
    site: SiteId
    interval_start: Moment
    duration_s: Annotated[int, Field(gt=0)]
    round: RoundId | None  # the agreement in force (None: no agreement, everything with the grid)
    measured_kwh: Finite
    scheduled_kwh: Finite
    deviation_kwh: Finite
    p2p_paid_eur: Finite
    p2p_received_eur: Finite
    grid_kwh: Finite
    grid_eur: Finite
    net_eur: Finite
    readings: Annotated[int, Field(ge=0)]
    covered_s: NonNegative  # seconds of the interval the readings cover
    envelope: Literal["dynamic", "default", "fixed_default", "none"]  # in force at the interval's end
    lo_kw: Finite | None
    up_kw: Finite | None

    _ts_utc = field_validator("interval_start")(_utc)


class SiteForecast(Message):
    """A site's own forecast, fed by its integrator (topic site/<id>/forecast, retained, or a file):
    `step_s`-long steps from `start`, each series optional (None: the configured profile stays).
    The edge agent uses it in its next round, for the intervals it covers (docs/runtime.md)."""

    schema_version: Literal[1] = 1
    kind: Literal["forecast"] = "forecast"
    site: SiteId
    issued: Moment
    start: Moment
    step_s: Annotated[int, Field(gt=0, le=86_400)]
    pv_kw: Annotated[list[NonNegative], Field(min_length=1, max_length=10_000)] | None = None
    wind_kw: Annotated[list[NonNegative], Field(min_length=1, max_length=10_000)] | None = None
    fixed_load_kw: Annotated[list[NonNegative], Field(min_length=1, max_length=10_000)] | None = None

    _utc_times = field_validator("issued", "start")(_utc)

    @model_validator(mode="after")
    def _one_length(self) -> SiteForecast:
        lengths = {len(s) for s in (self.pv_kw, self.wind_kw, self.fixed_load_kw) if s is not None}
        if not lengths:
            raise ValueError("a forecast carries at least one of pv_kw, wind_kw, fixed_load_kw")
        if len(lengths) > 1:
            raise ValueError("every series of a forecast has one value per step")
        return self

    @property
    def steps(self) -> int:
        return len(next(s for s in (self.pv_kw, self.wind_kw, self.fixed_load_kw) if s is not None))


Runtime = (
    Doe
    | Registration
    | SiteStatus
    | DsoStatus
    | Progress
    | Telemetry
    | SiteReport
    | MeterReading
    | SetPointMessage
    | SettlementRecord
    | SiteForecast
)
RuntimeMessage = Annotated[Runtime, Field(discriminator="kind")]
RUNTIME_ADAPTER: TypeAdapter[Runtime] = TypeAdapter(RuntimeMessage)
ALL_MESSAGES: tuple[type[Message], ...] = (
    RoundOpen,
    Proposal,
    Grant,
    PolishReport,
    PolishPrices,
    Doe,
    Registration,
    SiteStatus,
    DsoStatus,
    Progress,
    Telemetry,
    SiteReport,
    MeterReading,
    SetPointMessage,
    SettlementRecord,
    SiteForecast,
    PaymentOpen,
    PaymentProposal,
    PaymentGrant,
)


def decode_runtime(payload: bytes) -> Runtime:
    return RUNTIME_ADAPTER.validate_json(checked_json(payload))
