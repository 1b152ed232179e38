"""What one ADMM iteration costs in process, per participant: the community step and the DSO's CPU.
Prints Markdown.

    .venv/bin/python benchmarks/iteration_cost.py [--scenarios default synthetic-20-peers4 ...]

Per scenario, one `run_admm` (every message encoded and decoded as on the wire): iterations, the
objective of the settled schedules, the community step's median (the timings `run_admm` returns),
the DSO step's median (the call that completes an iteration), and the DSO's CPU per iteration read
from the thread CPU clock around every call of its participant (each proposal parsed and checked as
it arrives, then the iteration), of which its projection onto the safe set and building the grant,
and that CPU per community. To compare two commits, run this file with PYTHONPATH pointing at the
other commit's checkout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from p2pdoe.core.agreement.dso import DsoParticipant
from p2pdoe.core.agreement.grid_solver import GridSolver
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

SPENT = {"dso": 0.0, "projection": 0.0, "grant": 0.0}


def _counted(cls: type, name: str, key: str) -> None:
    """Wrap `cls.name` so that its thread CPU time adds to SPENT[key]."""
    inner: Callable[..., Any] = getattr(cls, name)

    def counted(self: object, *args: object, **kwargs: object) -> object:
        t0 = time.thread_time()
        try:
            return inner(self, *args, **kwargs)
        finally:
            SPENT[key] += time.thread_time() - t0

    setattr(cls, name, counted)


def row(name: str) -> str:
    for key in SPENT:
        SPENT[key] = 0.0
    s = load_scenario(name)
    r = run_admm(s, Policy.DYNAMIC)
    n, it = len(s.ids), r.dso.iterations
    steps = [t for times in r.timings.community.values() for t in times]

    def ms(key: str) -> float:
        return SPENT[key] / it * 1e3

    return (
        f"| {name} | {n} | {it} | {r.solution.objective_eur:.4f} | {statistics.median(steps) * 1e3:.2f} | "
        f"{statistics.median(r.timings.dso) * 1e3:.2f} | {ms('dso'):.2f} | {ms('projection'):.2f} | "
        f"{ms('grant'):.2f} | {ms('dso') / n * 1e3:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenarios", nargs="+", default=["default", "synthetic-20-peers4"])
    args = parser.parse_args()
    _counted(DsoParticipant, "handle", "dso")
    _counted(GridSolver, "solve", "projection")
    _counted(DsoParticipant, "_grants", "grant")
    columns = (
        "scenario", "communities", "iterations", "objective EUR", "community step median ms",
        "DSO step median ms", "DSO CPU ms per iteration", "of which projection", "grant messages",
        "DSO CPU µs per community",
    )  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name in args.scenarios:
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
