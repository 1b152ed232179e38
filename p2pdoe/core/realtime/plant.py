"""The simulated plant of one site, stepped at meter rate: a battery that follows its set-point within
its power and energy limits with efficiency losses, curtailable PV and wind, a flexible load.

Signs follow `p2pdoe.core.scenario`: net injection is export-positive,
p = pv + wind + discharge - charge - fixed_load - flex_load; the battery's power is +discharge.
Pure: the caller holds the state of charge and passes it in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pdoe.core.schemas.site import SiteConfig


@dataclass(frozen=True)
class SetPoints:
    battery_kw: float  # + discharge, - charge
    pv_cap_kw: float | None  # curtailment cap; None = no cap
    wind_cap_kw: float | None
    flex_kw: float  # flexible load consumption


@dataclass(frozen=True)
class Resources:
    """What nature and the fixed load give at this instant."""

    pv_kw: float
    wind_kw: float
    fixed_load_kw: float


@dataclass(frozen=True)
class Reading:
    p_kw: float  # net injection, export positive
    pv_kw: float
    wind_kw: float
    fixed_load_kw: float
    flex_kw: float
    battery_kw: float  # + discharge
    soc_kwh: float  # after the step
    q_kvar: float  # -tan_phi * (fixed + flex)


@dataclass(frozen=True)
class BatteryLimits:
    """The largest charge and discharge power (both >= 0) the battery can hold over one step."""

    charge_kw: float
    discharge_kw: float


@dataclass(frozen=True)
class PlantSpec:
    battery_power_kw: float
    soc_min_kwh: float
    soc_max_kwh: float
    soc_init_kwh: float
    eta_charge: float
    eta_discharge: float
    flex_min_kw: float
    flex_max_kw: float
    tan_phi: float

    def __post_init__(self) -> None:
        if not self.battery_power_kw >= 0:
            raise ValueError(f"the battery's power must be >= 0, not {self.battery_power_kw}")
        if not self.soc_min_kwh <= self.soc_init_kwh <= self.soc_max_kwh:
            raise ValueError("the battery needs soc_min_kwh <= soc_init_kwh <= soc_max_kwh")
        if not (0 < self.eta_charge <= 1 and 0 < self.eta_discharge <= 1):
            raise ValueError("the battery's efficiencies must lie in (0, 1]")
        if not 0 <= self.flex_min_kw <= self.flex_max_kw:
            raise ValueError("the flexible load needs 0 <= flex_min_kw <= flex_max_kw")


def plant_spec(config: SiteConfig) -> PlantSpec:
    b, f = config.community.battery, config.community.flexible_load
    return PlantSpec(
        battery_power_kw=b.power_kw,
        soc_min_kwh=b.soc_min_kwh,
        soc_max_kwh=b.soc_max_kwh,
        soc_init_kwh=b.soc_init_kwh,
        eta_charge=b.eta_charge,
        eta_discharge=b.eta_discharge,
        flex_min_kw=f.min_kw,
        flex_max_kw=f.max_kw,
        tan_phi=config.community.tan_phi,
    )


def limits(spec: PlantSpec, soc_kwh: float, dt_s: float) -> BatteryLimits:
    """Power limits this step: the rating, and what keeps the SOC in [soc_min, soc_max] after dt."""
    _check_state(soc_kwh, dt_s)
    dt_h = dt_s / 3600.0
    room_kwh = max(spec.soc_max_kwh - soc_kwh, 0.0)
    stored_kwh = max(soc_kwh - spec.soc_min_kwh, 0.0)
    return BatteryLimits(
        charge_kw=min(spec.battery_power_kw, room_kwh / (spec.eta_charge * dt_h)),
        discharge_kw=min(spec.battery_power_kw, stored_kwh * spec.eta_discharge / dt_h),
    )


def step(
    spec: PlantSpec, soc_kwh: float, sp: SetPoints, res: Resources, dt_s: float
) -> tuple[float, Reading]:
    """Follow the set-points for dt_s seconds; returns the new SOC and the meter reading."""
    _check_set_points(sp)
    _check_resources(res)
    lim = limits(spec, soc_kwh, dt_s)
    battery_kw = _clamp(sp.battery_kw, -lim.charge_kw, lim.discharge_kw)
    new_soc = _soc_after(spec, soc_kwh, battery_kw, dt_s / 3600.0)
    pv_kw = _curtailed(res.pv_kw, sp.pv_cap_kw)
    wind_kw = _curtailed(res.wind_kw, sp.wind_cap_kw)
    flex_kw = _clamp(sp.flex_kw, spec.flex_min_kw, spec.flex_max_kw)
    consumption_kw = res.fixed_load_kw + flex_kw
    return new_soc, Reading(
        p_kw=pv_kw + wind_kw + battery_kw - consumption_kw,
        pv_kw=pv_kw,
        wind_kw=wind_kw,
        fixed_load_kw=res.fixed_load_kw,
        flex_kw=flex_kw,
        battery_kw=battery_kw,
        soc_kwh=new_soc,
        q_kvar=-spec.tan_phi * consumption_kw,
    )


def _soc_after(spec: PlantSpec, soc_kwh: float, battery_kw: float, dt_h: float) -> float:
    charge_kw, discharge_kw = max(-battery_kw, 0.0), max(battery_kw, 0.0)
    soc = soc_kwh + (spec.eta_charge * charge_kw - discharge_kw / spec.eta_discharge) * dt_h
    # Absorb rounding at a limit; a SOC already outside the bounds may stay there.
    return _clamp(soc, min(soc_kwh, spec.soc_min_kwh), max(soc_kwh, spec.soc_max_kwh))


def _curtailed(available_kw: float, cap_kw: float | None) -> float:
    return available_kw if cap_kw is None else min(available_kw, cap_kw)


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def _check_state(soc_kwh: float, dt_s: float) -> None:
    if not math.isfinite(soc_kwh):
        raise ValueError(f"the state of charge must be finite, not {soc_kwh}")
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ValueError(f"a plant step must last a positive, finite time, not dt_s={dt_s}")


def _check_set_points(sp: SetPoints) -> None:
    for name, value in (("battery_kw", sp.battery_kw), ("flex_kw", sp.flex_kw)):
        if not math.isfinite(value):
            raise ValueError(f"set-point {name} must be finite, not {value}")
    for name, cap in (("pv_cap_kw", sp.pv_cap_kw), ("wind_cap_kw", sp.wind_cap_kw)):
        if cap is not None and not cap >= 0:  # NaN fails too; +inf means no cap
            raise ValueError(f"set-point {name} must be >= 0 or None, not {cap}")


def _check_resources(res: Resources) -> None:
    for name, value in vars(res).items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"resource {name} must be finite and >= 0, not {value}")
