"""The certified polish on the wire (issue 18): what a round costs with it and without, per case, in
the participants' own messages (in one process, every message encoded and decoded as over MQTT).

    .venv/bin/python benchmarks/polish_wire.py [--cases default "default, 15 min"] \
        [--first 20] [--every 20] [--max-rounds 8] [--margins]

Per case, one row without the polish and one with it (`admm.polish`). Columns: ADMM iterations;
the polish's tries, rounds and steps (each step a round trip through the broker, like an
iteration) and the iteration its certified try started from; round trips in all (iterations plus
steps); messages and MB both ways; the critical path (slowest community plus the coordinator, per
iteration and per polish step, s); the objective's gap to the centralized reference (% of the gross
energy cost; negative: below it); the worst schedule difference from it (kW). `--margins`: every
community keeps the real-time controller's envelope margins, the problem edge agents solve in a
deployment (`p2pdoe.core.market.with_margins`, REALTIME_MARGINS). One BLAS thread
(docs/benchmarks.md, "The certified polish"). The 1-minute load average is printed before each row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from admm_scaling import FULL, Case, _footer, _log, _warm_up, chosen_cases
from threadpoolctl import threadpool_limits

from p2pdoe.analysis.results import build_results
from p2pdoe.core.community import REALTIME_MARGINS
from p2pdoe.core.market import with_margins
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import AdmmRun, run_admm

DEFAULT_CASES = ("default", "default, 15 min", "synthetic-10-peers4", "synthetic-20-peers4")
KEYS = ("pv", "wd", "lx", "ch", "dis", "imp", "exp", "lo", "up")
COLUMNS = (
    "case",
    "polish",
    "iterations",
    "tries / rounds / steps",
    "certified at",
    "round trips",
    "messages",
    "MB",
    "critical path (s)",
    "gap (% gross)",
    "worst kW",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--first", type=int, default=20)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--margins", action="store_true", help="the edge agents' problem (envelope margins)")
    args = parser.parse_args()
    cases = chosen_cases(parser, args.cases) if args.cases else list(FULL)
    polish = {"first": args.first, "every": args.every, "max_rounds": args.max_rounds}
    started = time.perf_counter()
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        _warm_up()
        for case in cases:
            rows += _rows(case, polish, args.margins)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" if i < 2 else "--:" for i in range(len(COLUMNS))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(_footer(time.perf_counter() - started, quick=False))
    return 0


def _rows(case: Case, polish: dict[str, int], margins: bool) -> list[list[str]]:
    s = _scenario(case, None, margins)
    _log(f"{case.label}: centralized ...")
    central = solve_centralized(s, Policy.DYNAMIC)
    gross = build_results(s, central, "centralized").totals.gross_energy_eur
    rows = []
    for label, settings in (("off", None), (_label(polish), polish)):
        _log(f"{case.label}: polish {label}; load {os.getloadavg()[0]:.2f} ...")
        run = run_admm(_scenario(case, settings, margins), Policy.DYNAMIC)
        rows.append([case.label, label, *_cells(run, central, gross)])
    return rows


def _scenario(case: Case, polish: dict[str, int] | None, margins: bool) -> Scenario:
    overrides = dict(case.overrides or {})
    if polish is not None:
        overrides["admm"] = {**overrides.get("admm", {}), "polish": polish}
    s = load_scenario(case.scenario, overrides)
    return with_margins(s, REALTIME_MARGINS) if margins else s


def _label(polish: dict[str, int]) -> str:
    return f"{polish['first']}+{polish['every']}k, {polish['max_rounds']} rounds"


def _cells(run: AdmmRun, central: Solution, gross: float) -> list[str]:
    p, t = run.dso.polish, run.timings
    iterations = run.dso.iterations
    messages = sum(t.messages) + t.polish_messages
    size = sum(t.bytes) + t.polish_bytes
    gap = 100 * (run.solution.objective_eur - central.objective_eur) / gross
    worst = max(
        float(np.max(np.abs(a[k] - b[k])))
        for a, b in zip(run.solution.schedules, central.schedules, strict=True)
        for k in KEYS
    )
    return [
        str(iterations),
        f"{p.tries} / {p.rounds} / {p.steps}",
        "-" if p.certified_at is None else str(p.certified_at),
        str(iterations + p.steps),
        str(messages),
        f"{size / 1e6:.1f}",
        f"{t.critical_path_s():.2f}",
        f"{gap:+.4f}",
        f"{worst:.2f}",
    ]


if __name__ == "__main__":
    sys.exit(main())
