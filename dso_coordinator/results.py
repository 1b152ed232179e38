"""The coordinator's results.json: the documented `Results`, from the sites' reports and its own view.

The communities' part is what each site reported of itself; the network checks run on the
coordinator's network model with every connected site: the reported schedules (a site left out is
counted at 0 kW), and both corners of the granted boxes (a site left out at its default's corners).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import numpy as np

from p2pdoe.analysis.admm import polish_result, residual_points, solve_times, summed
from p2pdoe.analysis.network_check import ac_state
from p2pdoe.analysis.results import Day as ResultsDay
from p2pdoe.analysis.results import assemble_results, dlmp_results
from p2pdoe.core.agreement.coordination import Defaults
from p2pdoe.core.agreement.outcome import dlmp
from p2pdoe.core.coordinator.books import DayBooks
from p2pdoe.core.coordinator.commands import DayReport
from p2pdoe.core.coordinator.context import Context
from p2pdoe.core.coordinator.rounds import Agreement, Timings
from p2pdoe.core.envelope import GridView
from p2pdoe.core.network import FloatArray
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas import results as r
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.messages import DSO_ID
from p2pdoe.core.schemas.runtime import SiteReport


def distributed_results(cfg: CoordinatorConfig, defaults: Defaults, a: Agreement) -> r.Results:
    setup, out = a.setup, a.outcome
    reported = [a.reports[s] for s in setup.sites if s in a.reports]
    view = setup.view
    day = ResultsDay(cfg.scenario, cfg.start, cfg.dt_h, cfg.intervals, cfg.policy)
    horizon = cfg.intervals
    ids = [s.id for s in cfg.sites]
    x = np.zeros((len(ids), horizon))
    q = np.zeros((len(ids), horizon))
    for rep in reported:
        x[ids.index(rep.site)] = rep.community.net_injection_kw
        q[ids.index(rep.site)] = rep.community.q_kvar
    lo, up = _boxes(ids, setup.sites, defaults, out.granted_lo_kw, out.granted_up_kw, horizon)
    points = {
        "schedule": (x, q),
        "upper_corner": (up, view.q_max_kvar),
        "lower_corner": (lo, view.q_min_kvar),
    }
    return assemble_results(
        day,
        "distributed",
        view,
        [rep.community for rep in reported],
        [t for rep in reported for t in rep.purchases],
        dlmp_results(list(setup.sites), dlmp(out, setup.safe, len(setup.sites), horizon)),
        points,
        [_range(a, rep.site) for rep in reported],
        float(sum(rep.objective_eur for rep in reported)),
        _solver(a, reported),
    ).model_copy(update={"runtime": _runtime(ids, defaults, a), "market": a.market})


def _boxes(
    ids: list[str],
    sites: tuple[str, ...],
    defaults: Defaults,
    granted_lo: FloatArray | None,
    granted_up: FloatArray | None,
    horizon: int,
) -> tuple[FloatArray, FloatArray]:
    lo, up = defaults.lo_kw[:, :horizon].copy(), defaults.up_kw[:, :horizon].copy()
    if granted_lo is not None and granted_up is not None:
        for c, site in enumerate(sites):
            lo[ids.index(site)], up[ids.index(site)] = granted_lo[c], granted_up[c]
    return lo, up


def _range(a: Agreement, site: str) -> tuple[FloatArray, FloatArray]:
    """The technical range the site registered."""
    reg = a.registrations[site]
    return np.array(reg.technical_min_kw), np.array(reg.technical_max_kw)


def _solver(a: Agreement, reported: list[SiteReport]) -> r.SolverResult:
    out, t = a.outcome, a.timings
    last = out.history[-1]
    iterations = max(1, out.iterations)
    return r.SolverResult(
        name="ADMM over MQTT",
        status=out.status,
        iterations=out.iterations,
        converged=out.status == "converged",
        wall_time_s=t.round_wall_s,
        residual_history=residual_points(out.history),
        solve_times=[rep.solve_times for rep in reported] + [solve_times(DSO_ID, "dso", t.dso_step_s)],
        messages_per_iteration=(t.proposals + t.grants) / iterations,
        bytes_per_iteration=(t.proposal_bytes + t.grant_bytes) / iterations,
        reciprocity_max_kw=last.reciprocity_max_kw,
        envelope_gap_max_kw=last.envelope_gap_max_kw,
        final_solve={rep.site: rep.final_solve for rep in reported},
        ignored_messages=summed([rep.ignored for rep in reported] + [a.setup.dso.ignored]),
        polish=polish_result(out.polish, t.polish_messages, t.polish_bytes),
    )


def _runtime(ids: list[str], defaults: Defaults, a: Agreement) -> r.RuntimeInfo:
    walls = np.asarray(a.timings.iteration_wall_s) * 1e3
    return r.RuntimeInfo(
        protocol=a.protocol,
        registration_wait_s=a.timings.registration_wait_s,
        attempts=a.attempts,
        sites=[
            r.SiteRuntime(
                id=site,
                state="agreed" if site in a.setup.sites else "excluded",
                reason=a.excluded.get(site),
                reported=site in a.reports,
                rss_mb=a.reports[site].rss_mb if site in a.reports else None,
                cpu_s=a.reports[site].cpu_s if site in a.reports else None,
                cpu_steps_s=a.reports[site].cpu_steps_s if site in a.reports else None,
                cpu_codec_s=a.reports[site].cpu_codec_s if site in a.reports else None,
            )
            for site in ids
        ],
        default_envelopes=[
            r.DefaultEnvelope(
                id=site,
                lo_kw=float(defaults.lo_kw[c].max()),
                up_kw=float(defaults.up_kw[c].min()),
                need_kw=float(defaults.need_kw[c].max()),
                lo_profile_kw=defaults.lo_kw[c].tolist(),
                up_profile_kw=defaults.up_kw[c].tolist(),
                need_profile_kw=defaults.need_kw[c].tolist(),
            )
            for c, site in enumerate(defaults.sites)
        ],
        iteration_wall_ms={
            "median": float(np.median(walls)) if walls.size else 0.0,
            "p95": float(np.percentile(walls, 95)) if walls.size else 0.0,
            "max": float(walls.max()) if walls.size else 0.0,
        },
        dropped_messages=summed([a.dropped] + [rep.dropped for rep in a.reports.values()]),
        coordinator_cpu=_coordinator_cpu(a.timings),
    )


def _coordinator_cpu(t: Timings) -> r.CoordinatorCpu | None:
    """None where nothing was measured (a machine given no CPU clocks)."""
    if t.cpu_s == 0.0:
        return None
    return r.CoordinatorCpu(round_s=t.cpu_s, dso_steps_s=t.dso_cpu_s, codec_s=t.codec_cpu_s)


def realtime_results(ctx: Context, report: DayReport, clock: str, speed: float) -> r.RealtimeInfo:
    """The real-time day as the coordinator saw it on the broker: its rolling rounds, the sites'
    settlements against its own meter integral, violations and envelope switches, and an AC power
    flow of the measured mean injections."""
    books = report.books
    settlements = []
    worst = 0.0
    for (site, start), rec in sorted(books.settlements.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        t = books.metering.interval_of(start)
        meter = books.metering.energy_kwh(site, t)
        if meter is not None and abs(meter) > 1e-6:
            worst = max(worst, 100.0 * abs(rec.measured_kwh - meter) / abs(meter))
        settlements.append(
            r.SettlementResult(
                **rec.model_dump(include=_SETTLEMENT_FIELDS),
                interval_start=rec.interval_start.isoformat().replace("+00:00", "Z"),
                meter_kwh=meter,
            )
        )
    return r.RealtimeInfo(
        speed=speed,
        hours=report.hours,
        meter_readings=books.metering.readings,
        intervals=report.intervals,
        settlements=settlements,
        envelope_violations=_violations(books.observer),
        fallback_events=books.fallback_events,
        missing_settlements=_missing(ctx, books),
        unsettled=_unsettled(ctx, books),
        energy_mismatch_max_pct=worst,
        measured_ac=_measured_ac(ctx, books),
        clock=clock,
        day_ahead_late_s=report.day_ahead_late_s,
        failed_rounds=report.failures,
        dropped_messages=report.dropped,
    )


_SETTLEMENT_FIELDS = {
    "site", "round", "measured_kwh", "scheduled_kwh", "deviation_kwh", "p2p_paid_eur", "p2p_received_eur",
    "grid_kwh", "grid_eur", "net_eur", "readings", "covered_s", "envelope",
}  # fmt: skip


def _violations(o: ViolationObserver) -> r.EnvelopeViolations:
    return r.EnvelopeViolations(
        count=len(o.violations),
        by_site=o.by_site(),
        judged_readings=o.judged,
        outside_readings=o.outside,
        events=[
            r.ViolationResult(
                site=v.site, start=v.start.isoformat(), end=v.end.isoformat(), readings=v.readings,
                worst_kw=v.worst_kw,
            )
            for v in o.violations
        ],
    )  # fmt: skip


def _day_intervals(books: DayBooks) -> list[int]:
    """The intervals the real-time day ran through (those with readings)."""
    return sorted({t for (_, t) in books.metering.cells})


def _missing(ctx: Context, books: DayBooks) -> dict[str, list[str]]:
    """Per site, the intervals of the day without a settlement."""
    out: dict[str, list[str]] = {}
    for u in _unsettled(ctx, books):
        out.setdefault(u.site, []).append(u.interval_start)
    return out


def _unsettled(ctx: Context, books: DayBooks) -> list[r.Unsettled]:
    """Every interval of the real-time day from the coordinator's first reading to the day's end
    without a settlement from a site that took part (a reading or a settlement heard), each with its
    cause. To the day's end: a coordinator away at the end (frozen, cut off) lists what it missed."""
    cells = books.metering.cells
    present = {site for site, _ in cells} | {site for site, _ in books.settlements}
    heard = [t for _, t in cells]  # a coordinator started mid-day judges from its first reading on
    ran = range(max(min(heard, default=0), 0), ctx.last_interval() if heard else 0)
    out = []
    for site in sorted(present):
        for t in ran:
            start = ctx.interval_start(t)
            if (site, start) in books.settlements:
                continue
            end = start + timedelta(seconds=ctx.interval_s)
            cause = books.why_unsettled(site, start, end)
            out.append(
                r.Unsettled(site=site, interval_start=start.isoformat().replace("+00:00", "Z"), cause=cause)
            )
    return out


def _measured_ac(ctx: Context, books: DayBooks) -> r.NetworkState | None:
    intervals = [t for t in _day_intervals(books) if 0 <= t < ctx.cfg.intervals]
    if not intervals:
        return None
    view = round_view(ctx)
    x = np.zeros((len(ctx.site_ids), len(intervals)))
    q = np.zeros_like(x)
    for k, t in enumerate(intervals):
        for i, site in enumerate(ctx.site_ids):
            mean = books.metering.mean_kw(site, t)
            if mean is not None:
                x[i, k], q[i, k] = mean
    cols = np.array(intervals)
    sliced = replace(
        view,
        background_kw=view.background_kw[:, cols],
        background_kvar=view.background_kvar[:, cols],
        q_min_kvar=view.q_min_kvar[:, cols],
        q_max_kvar=view.q_max_kvar[:, cols],
    )
    return ac_state(sliced, x, q, ctx.cfg.dt_h)


def round_view(ctx: Context) -> GridView:
    from p2pdoe.core.agreement.coordination import connection_facts, network_view

    facts = [connection_facts(s, ctx.feeder, ctx.cfg.intervals) for s in ctx.cfg.sites]
    return network_view(ctx.cfg, ctx.feeder, facts)
