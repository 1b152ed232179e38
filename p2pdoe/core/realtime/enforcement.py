"""One step of envelope enforcement at meter rate: follow the schedule, and where that would put the
net injection outside the envelope in force, move the site's levers by the least-cost amount.

The measured net injection p (export positive) is net of the fixed load, which is not controllable:
p = pv + wind + battery - flex - fixed_load. Everything else in it follows a set-point, so
rest = p - (pv + wind + battery - flex) is what the step cannot change, and any set-points predict
rest + pv_out + wind_out + battery - flex, where pv_out = min(pv_available, pv_cap). The plant is
taken to respond within one step, so every lever is linear in kW and one step restores compliance
whenever the levers suffice.

The step is stateless: it predicts the schedule's injection from the measurement and corrects the
schedule, never its own earlier output. A correction therefore lasts exactly as long as the
schedule alone would be outside the target band [lo + margin, up - margin], and the site returns to
its schedule as soon as the schedule is inside again. Judging the measured p instead would drop a
correction the moment it worked and oscillate.

Outside the band, the injection is moved to the band's nearer edge by the levers in ascending
marginal cost (EUR per kWh moved), so the cheapest kWh are used first:
- too high (export excess): charge more / discharge less (battery wear), raise the flexible load
  (discomfort at its current point), curtail PV then wind (the export price forgone);
- too low (import excess): remove curtailment first (it earns the export price back), then
  discharge more / charge less, then lower the flexible load.
Ties keep that listed order. The margin keeps measurement noise and the next step's drift from
crossing the envelope: by default max(0.5 kW, 1 % of the box width), never more than half the width;
the real-time controller widens it to two standard deviations of its measured one-step prediction
error (`p2pdoe.core.realtime.controller.PredictionError`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from p2pdoe.core.realtime.plant import SetPoints
from p2pdoe.core.schemas.site import SiteConfig

Lever = Literal["battery", "flex", "pv", "wind"]
INSIDE_TOLERANCE_KW = 1e-3  # a watt: below what a meter resolves (a reading 7e-5 kW over is inside)
MARGIN_FLOOR_KW = 0.5
MARGIN_FRACTION = 0.01


@dataclass(frozen=True)
class Box:
    """An envelope on the net injection, export positive: lo_kw <= p <= up_kw, both finite."""

    lo_kw: float
    up_kw: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo_kw) and math.isfinite(self.up_kw)):
            raise ValueError(f"an envelope's bounds must be finite, not [{self.lo_kw}, {self.up_kw}]")
        if self.lo_kw > self.up_kw:
            raise ValueError(f"an envelope needs lo_kw <= up_kw, not [{self.lo_kw}, {self.up_kw}]")

    @property
    def width_kw(self) -> float:
        return self.up_kw - self.lo_kw

    def excess_kw(self, p_kw: float) -> float:
        """Positive above up, negative below lo, 0 inside (within INSIDE_TOLERANCE_KW)."""
        if p_kw > self.up_kw + INSIDE_TOLERANCE_KW:
            return p_kw - self.up_kw
        if p_kw < self.lo_kw - INSIDE_TOLERANCE_KW:
            return p_kw - self.lo_kw
        return 0.0


@dataclass(frozen=True)
class Measured:
    """The meter and the assets now; the battery's reachable limits over this step (both >= 0)."""

    p_kw: float  # net injection, export positive
    pv_kw: float
    pv_available_kw: float  # what PV could produce uncapped
    wind_kw: float
    wind_available_kw: float
    flex_kw: float
    battery_kw: float  # + discharge
    max_charge_kw: float
    max_discharge_kw: float


@dataclass(frozen=True)
class FlexRange:
    min_kw: float
    max_kw: float

    def __post_init__(self) -> None:
        if not self.min_kw <= self.max_kw:
            raise ValueError(f"the flexible load needs min_kw <= max_kw, not [{self.min_kw}, {self.max_kw}]")


@dataclass(frozen=True)
class LeverCosts:
    """Marginal cost per kWh of moving each lever (any sign: a negative cost is a gain)."""

    battery_eur_per_kwh: float  # more charge or less discharge, and the reverse
    flex_up_eur_per_kwh: float  # raising the flexible load
    flex_down_eur_per_kwh: float  # lowering it
    curtail_eur_per_kwh: float  # the export price forgone, or a configured value


@dataclass(frozen=True)
class Action:
    lever: Lever
    delta_kw: float  # the change of net injection it brings (negative lowers it)
    eur_per_kwh: float


@dataclass(frozen=True)
class Compliance:
    """The telemetry's account of one step. `inside_before` and `excess_kw` judge the measured p
    against the envelope (None and 0 without one); `residual_kw` is the corrected prediction's
    excess, non-zero only when the levers could not restore compliance."""

    inside_before: bool | None
    excess_kw: float
    actions: tuple[Action, ...]
    predicted_kw: float
    residual_kw: float


@dataclass(frozen=True)
class Enforcement:
    set_points: SetPoints
    compliance: Compliance


@dataclass(frozen=True)
class _Move:
    lever: Lever
    capacity_kw: float  # how far it can move the injection, >= 0
    eur_per_kwh: float
    apply: Callable[[SetPoints, float], SetPoints]


def enforce(
    measured: Measured,
    schedule: SetPoints,
    flex: FlexRange,
    envelope: Box | None,
    costs: LeverCosts,
    margin_kw: float | None = None,
) -> Enforcement:
    """The set-points for this step: the schedule (clipped to what the assets can reach), corrected
    if it would leave the target band of `envelope`. No envelope: the schedule."""
    planned = reachable(schedule, measured, flex)
    if envelope is None:
        return Enforcement(planned, _compliance(measured, planned, None, ()))
    band = target_band(envelope, default_margin_kw(envelope) if margin_kw is None else margin_kw)
    need_kw = -band.excess_kw(predicted_kw(measured, planned))
    if need_kw == 0:
        return Enforcement(planned, _compliance(measured, planned, envelope, ()))
    moves = (
        _raising(measured, planned, flex, costs) if need_kw > 0 else _lowering(measured, planned, flex, costs)
    )
    corrected, actions = _move(planned, moves, need_kw)
    corrected = reachable(corrected, measured, flex)  # absorbs rounding at a limit
    return Enforcement(corrected, _compliance(measured, corrected, envelope, actions))


def default_margin_kw(envelope: Box) -> float:
    return max(MARGIN_FLOOR_KW, MARGIN_FRACTION * envelope.width_kw)


def target_band(envelope: Box, margin_kw: float) -> Box:
    """The envelope shrunk by the margin on each side, at most to its middle."""
    if not margin_kw >= 0:
        raise ValueError(f"the safety margin must be >= 0, not {margin_kw}")
    if margin_kw >= envelope.width_kw / 2:
        middle = (envelope.lo_kw + envelope.up_kw) / 2
        return Box(middle, middle)
    return Box(envelope.lo_kw + margin_kw, envelope.up_kw - margin_kw)


def predicted_kw(measured: Measured, sp: SetPoints) -> float:
    """The net injection once the plant follows `sp`, at the measured resources and fixed load."""
    m = measured
    rest = m.p_kw - (m.pv_kw + m.wind_kw + m.battery_kw - m.flex_kw)
    pv = _output(m.pv_available_kw, sp.pv_cap_kw)
    wind = _output(m.wind_available_kw, sp.wind_cap_kw)
    return rest + pv + wind + sp.battery_kw - sp.flex_kw


def reachable(sp: SetPoints, measured: Measured, flex: FlexRange) -> SetPoints:
    """`sp` with the battery and the flexible load clipped to what they can do this step."""
    battery = _clamp(sp.battery_kw, -measured.max_charge_kw, measured.max_discharge_kw)
    return replace(sp, battery_kw=battery, flex_kw=_clamp(sp.flex_kw, flex.min_kw, flex.max_kw))


def costs_from_config(config: SiteConfig, interval: int, flex_kw: float) -> LeverCosts:
    """The site's own prices: battery wear, the discomfort's slope 2 a (flex - preferred) at
    `flex_kw`, and the export price forgone by curtailing, all of interval `interval`."""
    f = config.community.flexible_load
    slope = 2.0 * f.discomfort_eur_per_kw2h * (flex_kw - f.preferred_kw[interval])
    return LeverCosts(
        battery_eur_per_kwh=config.community.battery.wear_eur_per_kwh,
        flex_up_eur_per_kwh=slope,
        flex_down_eur_per_kwh=-slope,
        curtail_eur_per_kwh=config.price_export_eur_per_kwh[interval],
    )


def _lowering(m: Measured, sp: SetPoints, flex: FlexRange, costs: LeverCosts) -> list[_Move]:
    pv, wind = _output(m.pv_available_kw, sp.pv_cap_kw), _output(m.wind_available_kw, sp.wind_cap_kw)
    moves = [
        _Move("battery", sp.battery_kw + m.max_charge_kw, costs.battery_eur_per_kwh, _battery(-1.0)),
        _Move("flex", flex.max_kw - sp.flex_kw, costs.flex_up_eur_per_kwh, _flex(+1.0)),
        _Move("pv", pv, costs.curtail_eur_per_kwh, lambda s, kw: replace(s, pv_cap_kw=pv - kw)),
        _Move("wind", wind, costs.curtail_eur_per_kwh, lambda s, kw: replace(s, wind_cap_kw=wind - kw)),
    ]
    return sorted(moves, key=lambda move: move.eur_per_kwh)


def _raising(m: Measured, sp: SetPoints, flex: FlexRange, costs: LeverCosts) -> list[_Move]:
    pv, wind = _output(m.pv_available_kw, sp.pv_cap_kw), _output(m.wind_available_kw, sp.wind_cap_kw)
    pv_room, wind_room = m.pv_available_kw - pv, m.wind_available_kw - wind
    gain = -costs.curtail_eur_per_kwh
    moves = [
        _Move("pv", pv_room, gain, lambda s, kw: replace(s, pv_cap_kw=_released(pv, pv_room, kw))),
        _Move("wind", wind_room, gain, lambda s, kw: replace(s, wind_cap_kw=_released(wind, wind_room, kw))),
        _Move("battery", m.max_discharge_kw - sp.battery_kw, costs.battery_eur_per_kwh, _battery(+1.0)),
        _Move("flex", sp.flex_kw - flex.min_kw, costs.flex_down_eur_per_kwh, _flex(-1.0)),
    ]
    return sorted(moves, key=lambda move: move.eur_per_kwh)


def _released(output_kw: float, room_kw: float, kw: float) -> float | None:
    """The cap after giving back kw of curtailment: none once all of it is given back."""
    return None if kw >= room_kw else output_kw + kw


def _move(sp: SetPoints, moves: list[_Move], need_kw: float) -> tuple[SetPoints, tuple[Action, ...]]:
    """Take |need_kw| from the moves in order; need_kw > 0 raises the injection."""
    sign, left = math.copysign(1.0, need_kw), abs(need_kw)
    actions: list[Action] = []
    for move in moves:
        take = min(left, max(move.capacity_kw, 0.0))
        if take <= 0:
            continue
        sp = move.apply(sp, take)
        actions.append(Action(move.lever, sign * take, move.eur_per_kwh))
        left -= take
    return sp, tuple(actions)


def _battery(sign: float) -> Callable[[SetPoints, float], SetPoints]:
    return lambda sp, kw: replace(sp, battery_kw=sp.battery_kw + sign * kw)


def _flex(sign: float) -> Callable[[SetPoints, float], SetPoints]:
    return lambda sp, kw: replace(sp, flex_kw=sp.flex_kw + sign * kw)


def _compliance(
    measured: Measured, sp: SetPoints, envelope: Box | None, actions: tuple[Action, ...]
) -> Compliance:
    predicted = predicted_kw(measured, sp)
    if envelope is None:
        return Compliance(None, 0.0, actions, predicted, 0.0)
    excess = envelope.excess_kw(measured.p_kw)
    return Compliance(excess == 0.0, excess, actions, predicted, envelope.excess_kw(predicted))


def _output(available_kw: float, cap_kw: float | None) -> float:
    return available_kw if cap_kw is None else max(min(available_kw, cap_kw), 0.0)


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)
