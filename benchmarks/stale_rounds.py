"""Bounded-staleness rounds (issue 18, item 5) in process: does the agreement still reach the
centralized answer when one site is a straggler whose proposals the others do not wait for, and how
many iterations does that cost?

    .venv/bin/python benchmarks/stale_rounds.py [--cases default synthetic-20-peers4] [--every 1 2 3 5]
                                                [--slow 0]

It runs the participants as built (docs/agreement.md, "A straggler"): with
`admm.staleness.max_behind` = k - 1, every proposal of the slow site arrives only once the DSO has
closed k - 1 iterations without it (`p2pdoe.services.inprocess.Lateness`), so the slow site answers
every k-th iteration (`--every k`), from its couplings as they were when it was last used, which
did not move meanwhile. `--every 1` is today's synchronous round.

Per case and k: iterations, the iterations that froze the slow site, its solves, the worst schedule
difference from the centralized answer (kW), the objective gap (% of the centralized gross energy
cost), and the wall time a deployment would see relative to the synchronous round, if one iteration
of the others costs 1 and the straggler's step costs k: synchronous k x its iterations, stale 1 x
its iterations. Iterations and gaps do not depend on the machine's speed: the participants are
deterministic.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from admm_scaling import QUARTER_HOURS, _max_schedule_diff  # noqa: E402

from p2pdoe.analysis.results import build_results  # noqa: E402
from p2pdoe.core.scenario import Scenario, StalenessSettings  # noqa: E402
from p2pdoe.core.solution import Policy  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402
from p2pdoe.reference.centralized import solve_centralized  # noqa: E402
from p2pdoe.services.inprocess import AdmmRun, Lateness, run_admm  # noqa: E402

CASES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "default": ("default", None),
    "default, 15 min": ("default", QUARTER_HOURS),
    "synthetic-20-peers4": ("synthetic-20-peers4", None),
}


def run(s: Scenario, slow: str, every: int) -> tuple[AdmmRun, int, int]:
    """The round with `slow` answering every `every`-th iteration; its frozen iterations and solves."""
    if every == 1:
        result = run_admm(s, Policy.DYNAMIC)
    else:
        stale = replace(s, admm=replace(s.admm, staleness=StalenessSettings(every - 1, 0.5)))
        result = run_admm(stale, Policy.DYNAMIC, late=Lateness(slow, every - 1))
    frozen = sum(slow in h.frozen for h in result.dso.history)
    solves = len(next(c for c in result.communities if c.site == slow).local_osqp_iterations)
    return result, frozen, solves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["default", "synthetic-20-peers4"], choices=list(CASES))
    parser.add_argument("--every", nargs="+", type=int, default=[1, 2, 3, 5, 10])
    parser.add_argument("--slow", type=int, default=0, help="the straggler's index in the scenario's sites")
    parser.add_argument(
        "--admm", nargs="*", default=[], help="admm settings for every run, KEY=VALUE (e.g. adaptive=false)"
    )
    args = parser.parse_args()
    admm = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.admm)}
    print(
        "| case | straggler | every k-th iteration | iterations | frozen | straggler's solves | "
        "worst schedule difference kW | objective gap % | wall time / synchronous |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for label in args.cases:
        name, overrides = CASES[label]
        overrides = {**(overrides or {}), **({"admm": admm} if admm else {})}
        s = load_scenario(name, overrides)
        central = solve_centralized(s, Policy.DYNAMIC)
        gross = build_results(s, central, "centralized").totals.gross_energy_eur
        slow = s.ids[args.slow]
        sync_iterations: int | None = None
        for every in args.every:
            result, frozen, solves = run(s, slow, every)
            sol, dso = result.solution, result.dso
            if every == 1:
                sync_iterations = dso.iterations
            gap = 100.0 * (sol.objective_eur - central.objective_eur) / gross
            wall = "" if sync_iterations is None else f"{dso.iterations / (every * sync_iterations):.2f}"
            print(
                f"| {label} | {slow} | {every} | {dso.iterations} ({dso.status}) | {frozen} | {solves} | "
                f"{_max_schedule_diff(sol, central):.2f} | {gap:.4f} | {wall} |",
                flush=True,
            )


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


if __name__ == "__main__":
    main()
