"""The certified polish (`p2pdoe.core.agreement.polish`): from how many ADMM iterations does it land
on the optimum, with every party's own rows certifying it? (issue 18, items 1 and 2; in one
process, the parties' exchange emulated)

    .venv/bin/python benchmarks/certified_polish.py [--cases default synthetic-10-peers4] \
        [--at 20 30 40] [--first]

For each case and iteration K (`--at`), ADMM runs in process cut at K; each community's side of the
polish starts from its outcome's multipliers, the coordinator's from its grants and trade prices;
the exchange runs (at most `MAX_ROUNDS` rounds, each a response from every community, the prices,
then `REFINEMENTS` small corrections). A cell: ADMM's worst schedule difference from the optimum
(kW) → the polished one's / the polished objective's gap (% of the gross energy cost) / rounds /
"certified" or "not certified". `--first` instead cuts at 10, 15, 20, ... up to where ADMM stops by
itself today and reports the first K whose polish is certified. The optimum is the same QP solved
by Clarabel at 1e-12 (`polish_explore.day_qp`). The last columns: the largest community's coupling
values and the width of its response's factor (what it would send once per round, as 8-byte
floats), and the certified trade prices' largest difference from the reference's and from ADMM's
own at that cut (EUR/kWh; the day's trade prices are not unique, see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np
from admm_scaling import FULL, Case, _footer, _log, _warm_up
from polish_explore import OPTIMUM_TOL, DayQP, _objective, clarabel_solve, day_qp, schedule_diff
from threadpoolctl import threadpool_limits

from p2pdoe.analysis.results import build_results
from p2pdoe.core.agreement.polish import REFINEMENTS, DsoPolish, Polished, SitePolish, coupling_rows, polish
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.market import community_qps, trade_links
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import AdmmRun, run_admm

DEFAULT_CASES = ("default", "default, 15 min", "synthetic-10-peers4", "synthetic-20-peers4")
FIRST_STEP = 5  # --first tries K = 10, 15, 20, ...


@dataclass(frozen=True)
class Day:
    s: Scenario
    qps: list[CommunityQP]
    d: DayQP
    optimum: FloatArray
    gross_eur: float
    reference_prices: FloatArray  # (C, C, T) EUR/kWh
    natural_stop: int  # ADMM's iterations with today's settings


def load_day(case: Case) -> Day:
    s = load_scenario(case.scenario, case.overrides)
    qps = community_qps(s, Policy.DYNAMIC)
    d = day_qp(s, qps)
    central = solve_centralized(s, Policy.DYNAMIC)
    gross = build_results(s, central, "centralized").totals.gross_energy_eur
    natural = run_admm(s, Policy.DYNAMIC).solution.solver.iterations
    return Day(s, qps, d, clarabel_solve(d, OPTIMUM_TOL), gross, central.trade_price, natural)


def cut_at(case: Case, k: int) -> AdmmRun:
    overrides = {**(case.overrides or {}), "admm": {"eps_abs_kw": 1e-9, "max_iterations": k}}
    return run_admm(load_scenario(case.scenario, overrides), Policy.DYNAMIC)


def polished(day: Day, run: AdmmRun) -> tuple[Polished, list[SitePolish]]:
    sites = []
    for qp, out in zip(day.qps, run.communities, strict=True):
        assert out.multipliers is not None
        sites.append(SitePolish.from_multipliers(qp, out.multipliers))
    lo, up = run.dso.granted_lo_kw, run.dso.granted_up_kw
    assert lo is not None
    assert up is not None
    rows = coupling_rows([qp.layout for qp in day.qps], safe_set(day.s))
    return polish(sites, DsoPolish.from_grants(rows, lo, up, run.dso.trades.price)), sites


def cell(day: Day, run: AdmmRun) -> tuple[str, Polished, list[SitePolish]]:
    p, sites = polished(day, run)
    x0, x = np.concatenate(run.solution.z), np.concatenate(p.z)
    gap = 100.0 * (_objective(day.d, x) - _objective(day.d, day.optimum)) / day.gross_eur
    verdict = "certified" if p.certified else "not certified"
    text = (
        f"{schedule_diff(day.qps, day.d, x0, day.optimum):.2f} → "
        f"{schedule_diff(day.qps, day.d, x, day.optimum):.2f} / {gap:.4f} / {p.rounds} / {verdict}"
    )
    return text, p, sites


def price_differences(day: Day, p: Polished, run: AdmmRun) -> str:
    links = trade_links(tuple(qp.layout.peers for qp in day.qps))
    pairs = [(link.buyer, link.seller) for link in links]
    mine = p.trade_prices / day.s.dt_h
    ref = np.array([day.reference_prices[b, m] for b, m in pairs])
    admm = np.array([run.solution.trade_price[b, m] for b, m in pairs])
    return f"{np.max(np.abs(mine - ref)):.4f} / {np.max(np.abs(mine - admm)):.4f}"


def sizes(sites: list[SitePolish]) -> str:
    largest = max(sites, key=lambda site: site.response().base.size)
    response = largest.response()
    m, r = response.factor.shape
    return f"{m:,} / {r:,} ({8 * m * (r + 1) / 1000:.0f} kB)"


def run_case(case: Case, at: list[int], first: bool) -> list[str]:
    _log(f"{case.label}: the optimum ...")
    day = load_day(case)
    cells: list[str] = []
    tail: list[str] = []
    if first:
        k, text = 10, "none"
        while k <= day.natural_stop:
            run = cut_at(case, k)
            text, p, sites = cell(day, run)
            _log(f"  cut at {k}: {text}")
            if p.certified:
                text = f"{k}: {text}"
                tail = [sizes(sites), price_differences(day, p, run)]
                break
            k += FIRST_STEP
        else:
            text = f"none up to {day.natural_stop}"
        cells = [f"{day.natural_stop}", text]
    for k in at:
        run = cut_at(case, k)
        text, p, sites = cell(day, run)
        _log(f"  cut at {k}: {text}")
        cells.append(text)
        if not tail and p.certified:
            tail = [sizes(sites), price_differences(day, p, run)]
    return [*cells, *(tail or ["–", "–"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="case labels of admm_scaling")
    parser.add_argument("--at", nargs="*", type=int, default=[], help="iterations to cut rounds at")
    parser.add_argument("--first", action="store_true", help="the first cut whose polish is certified")
    args = parser.parse_args(argv)
    known = {c.label: c for c in FULL}
    cases = [known[c] for c in args.cases]
    header = ["case"]
    if args.first:
        header += [
            "ADMM alone (today's settings), iterations",
            "first certified cut: K: kW → kW / % / rounds",
        ]
    header += [f"cut at {k}: kW → kW / % / rounds" for k in args.at]
    header += [
        "largest community: coupling values / factor width (one response)",
        "certified trade prices from the reference's / from ADMM's, EUR/kWh",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|--:" * (len(header) - 1) + "|"]
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):  # see tests/test_polish.py
        _warm_up()
        for case in cases:
            lines.append(f"| {case.label} | " + " | ".join(run_case(case, args.at, args.first)) + " |")
    note = f"A round: one response from each community, the prices, {REFINEMENTS} corrections.\n"
    sys.stdout.write("\n".join(lines) + "\n\n" + note + _footer(time.perf_counter() - started, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
