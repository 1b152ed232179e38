"""Plausibility at the coordinator's door: what a site reports, settles or reads must be within what
its registration says its assets can do. Each check answers why a message is implausible, or None;
the machine drops what fails and counts it, so no value from one site reaches results.json as an
absurd figure. The bounds are generous (a meter's noise, a solver's slack, trade prices beyond the
tariffs); they catch what no honest site sends, such as a proposal or report scaled by 1000.
"""

from __future__ import annotations

from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.runtime import MeterReading, Registration, SettlementRecord, SiteReport

SLACK_KW = 10.0  # added to a site's largest technical magnitude ...
SLACK_SHARE = 0.5  # ... with this share of it: a meter's noise, a plant briefly past its rating
PRICE_SPAN = 10.0  # a cost beyond this many times the dearest tariff on the whole range is implausible


def largest_kw(reg: Registration) -> float:
    """The largest magnitude of net injection the site registered, over its horizon."""
    return max(max(abs(v) for v in reg.technical_min_kw), max(abs(v) for v in reg.technical_max_kw))


def _bound_kw(reg: Registration) -> float:
    return largest_kw(reg) * (1 + SLACK_SHARE) + SLACK_KW


def reading_problem(msg: MeterReading, reg: Registration) -> str | None:
    bound = _bound_kw(reg)
    if abs(msg.p_kw) > bound:
        return f"a reading of {msg.p_kw:.6g} kW, beyond {bound:.6g} kW (its registered range)"
    return None


def settlement_problem(msg: SettlementRecord, reg: Registration) -> str | None:
    bound_kwh = _bound_kw(reg) * msg.duration_s / 3600.0
    for name, kwh in (
        ("measured", msg.measured_kwh),
        ("scheduled", msg.scheduled_kwh),
        ("grid", msg.grid_kwh),
    ):
        if abs(kwh) > bound_kwh:
            return f"{name} {kwh:.6g} kWh in {msg.duration_s} s, beyond {bound_kwh:.6g} kWh (its range)"
    return None


def report_problem(msg: SiteReport, reg: Registration, cfg: CoordinatorConfig) -> str | None:
    """A report's schedule within the registered range, per interval; its cost within what the
    whole range could cost at the dearest tariff, `PRICE_SPAN` times over."""
    c = msg.community
    bound = _bound_kw(reg)
    for name, series in (
        ("net injection", c.net_injection_kw),
        ("envelope", c.envelope_lo_kw + c.envelope_up_kw),
    ):
        worst = max((abs(v) for v in series), default=0.0)
        if worst > bound:
            return f"{name} of {worst:.6g} kW, beyond {bound:.6g} kW (its registered range)"
    dearest = max(max(cfg.price_import_eur_per_kwh), max(abs(p) for p in cfg.price_export_eur_per_kwh))
    cost_bound = PRICE_SPAN * dearest * bound * cfg.dt_h * cfg.intervals + 1.0
    for name, eur in (("cost", c.cost_eur), ("objective", msg.objective_eur)):
        if abs(eur) > cost_bound:
            return f"{name} of {eur:.6g} EUR, beyond {cost_bound:.6g} EUR for its range at any tariff"
    return None
