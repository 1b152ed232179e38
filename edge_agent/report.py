"""A site's report of a round it finished (`SiteReport`): its agreed schedule, costs and purchases,
and how its agent ran (solve times, peak memory, CPU, dropped messages)."""

from __future__ import annotations

import resource

import numpy as np

from p2pdoe.analysis.accounts import Tariffs, community_result, purchases
from p2pdoe.analysis.admm import solve_times
from p2pdoe.core.agreement.community import CommunityOutcome, agreed_schedule, agreed_z
from p2pdoe.core.cpu import CpuParts
from p2pdoe.core.edge.market import RoundState
from p2pdoe.core.schemas.runtime import SiteReport
from p2pdoe.core.site import community_data


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def peak_rss_mb() -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def site_report(
    site: str, r: RoundState, out: CommunityOutcome, dropped: dict[str, int], parts: CpuParts
) -> SiteReport:
    """`parts`: the market's CPU parts since the round opened."""
    c = r.config
    schedule = agreed_schedule(r.qp, out)
    tariffs = Tariffs(
        price_import=np.array(c.price_import_eur_per_kwh),
        price_export=np.array(c.price_export_eur_per_kwh),
        pay=out.buy_price,
        receive=out.sell_price,
        fees=np.array([p.fee_eur_per_kwh for p in c.peers]),
        dt_h=c.dt_h,
    )
    return SiteReport(
        site=site,
        round=r.id,
        status=out.status,  # type: ignore[arg-type]
        iterations=out.iterations,
        objective_eur=float(r.qp.objective(agreed_z(r.qp, out))),
        community=community_result(community_data(c), c.community.bus, schedule, tariffs),
        purchases=purchases(site, [p.id for p in c.peers], schedule, out.buy_price),
        final_solve=out.final_solve,
        solve_times=solve_times(site, "community", r.steps),
        rss_mb=peak_rss_mb(),
        cpu_s=cpu_seconds() - r.cpu_at_open,
        cpu_steps_s=parts.steps_s,
        cpu_codec_s=parts.codec_s,
        ignored=r.participant.ignored,
        dropped=dropped,
    )
