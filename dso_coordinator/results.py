"""The coordinator's results.json: the documented `Results`, from the sites' reports and its own view.

The communities' part is what each site reported of itself; the network checks run on the
coordinator's network model with every connected site: the reported schedules (a site left out is
counted at 0 kW), and both corners of the granted boxes (a site left out at its default's corners).
"""

from __future__ import annotations

import numpy as np

from dso_coordinator.service import Agreement
from p2pdoe.analysis.admm import residual_points, solve_times, summed
from p2pdoe.analysis.results import Day, assemble_results, dlmp_results
from p2pdoe.core.agreement.coordination import Defaults
from p2pdoe.core.agreement.outcome import dlmp
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas import results as r
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.messages import DSO_ID
from p2pdoe.core.schemas.runtime import SiteReport


def distributed_results(cfg: CoordinatorConfig, defaults: Defaults, a: Agreement) -> r.Results:
    setup, out = a.setup, a.outcome
    reported = [a.reports[s] for s in setup.sites if s in a.reports]
    view = setup.view
    day = Day(cfg.scenario, cfg.start, cfg.dt_h, cfg.intervals, cfg.policy)
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
    ).model_copy(update={"runtime": _runtime(ids, defaults, a)})


def _boxes(
    ids: list[str],
    sites: tuple[str, ...],
    defaults: Defaults,
    granted_lo: FloatArray | None,
    granted_up: FloatArray | None,
    horizon: int,
) -> tuple[FloatArray, FloatArray]:
    lo = np.repeat(defaults.lo_kw[:, None], horizon, axis=1)
    up = np.repeat(defaults.up_kw[:, None], horizon, axis=1)
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
        messages_per_iteration=(t.proposals + len(t.iteration_wall_s)) / iterations,
        bytes_per_iteration=(t.proposal_bytes + t.grant_bytes) / iterations,
        reciprocity_max_kw=last.reciprocity_max_kw,
        envelope_gap_max_kw=last.envelope_gap_max_kw,
        final_solve={rep.site: rep.final_solve for rep in reported},
        ignored_messages=summed([rep.ignored for rep in reported] + [a.setup.dso.ignored]),
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
            )
            for site in ids
        ],
        default_envelopes=[
            r.DefaultEnvelope(id=site, lo_kw=float(defaults.lo_kw[c]), up_kw=float(defaults.up_kw[c]))
            for c, site in enumerate(defaults.sites)
        ],
        iteration_wall_ms={
            "median": float(np.median(walls)) if walls.size else 0.0,
            "p95": float(np.percentile(walls, 95)) if walls.size else 0.0,
            "max": float(walls.max()) if walls.size else 0.0,
        },
        dropped_messages=summed([a.dropped] + [rep.dropped for rep in a.reports.values()]),
    )
