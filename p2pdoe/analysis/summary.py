"""A day's summary from its results (p2pdoe.core.schemas.results.DaySummary)."""

from __future__ import annotations

from datetime import timedelta

from p2pdoe.core.calendar import utc_moment, zone
from p2pdoe.core.schemas.results import DaySummary, RealtimeInfo, Results


def day_summary(results: Results, timezone: str = "UTC") -> DaySummary:
    start = utc_moment(results.start)
    end = start + timedelta(hours=results.dt_h * results.intervals)
    runtime = results.runtime
    final = runtime.attempts[-1] if runtime is not None and runtime.attempts else None
    agreed = [s for s in runtime.sites if s.state == "agreed"] if runtime is not None else []
    rt = results.realtime
    summary: dict[str, object] = {
        "date": start.astimezone(zone(timezone)).date().isoformat(),
        "timezone": timezone,
        "start": results.start,
        "end": end.isoformat().replace("+00:00", "Z"),
        "intervals": results.intervals,
        "day_ahead_round": None if final is None else final.round,
        "day_ahead_status": None if final is None else final.status,
        "day_ahead_iterations": 0 if final is None else final.iterations,
        "sites_agreed": len(agreed),
        "sites_excluded": 0 if runtime is None else len(runtime.sites) - len(agreed),
        "objective_eur": results.objective_eur,
        "p2p_traded_kwh": results.totals.p2p_traded_kwh,
        "rolling_rounds": 0 if rt is None else len(rt.intervals),
        "failed_rounds": 0 if rt is None else len(rt.failed_rounds),
        "settlements": 0 if rt is None else len(rt.settlements),
        "missing_settlements": 0 if rt is None else sum(len(v) for v in rt.missing_settlements.values()),
    }
    return DaySummary.model_validate({**summary, **_measured(rt)})


def _measured(rt: RealtimeInfo | None) -> dict[str, float | int | None]:
    if rt is None:
        keys = (
            "sustained_violations", "worst_violation_kw", "envelope_switches", "measured_grid_import_kwh",
            "measured_grid_export_kwh", "net_cost_eur", "measured_vmin_pu", "measured_vmax_pu",
            "measured_max_loading_pct",
        )  # fmt: skip
        return dict.fromkeys(keys)
    v, ac = rt.envelope_violations, rt.measured_ac
    grid = [s.grid_kwh for s in rt.settlements]
    return {
        "sustained_violations": v.count,
        "worst_violation_kw": max((e.worst_kw for e in v.events), default=None),
        "envelope_switches": len(rt.fallback_events),
        "measured_grid_import_kwh": -sum(g for g in grid if g < 0),
        "measured_grid_export_kwh": sum(g for g in grid if g > 0),
        "net_cost_eur": sum(s.net_eur for s in rt.settlements),
        "measured_vmin_pu": None if ac is None else ac.vmin_pu,
        "measured_vmax_pu": None if ac is None else ac.vmax_pu,
        "measured_max_loading_pct": None if ac is None else ac.max_loading_pct,
    }
