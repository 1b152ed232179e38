"""The DSO's subproblem two ways, on the same targets: OSQP directly (what p2pdoe uses) and cvxpy with
parameters (DPP, compiled once, re-solved with OSQP and with Clarabel). Prints a Markdown table.

    .venv/bin/python benchmarks/dso_subproblem.py [--scenario default] [--intervals 96 --dt-h 0.25]

The targets are the ones a real ADMM run hands the DSO, recorded iteration by iteration.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import cvxpy as cp
import numpy as np

from p2pdoe.core.agreement.grid_solver import GridSolver
from p2pdoe.core.agreement.setup import envelope_bounds_of, participants
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.network import FloatArray
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario

Targets = list[tuple[FloatArray, FloatArray]]


def recorded_targets(s: Any) -> Targets:
    """Run the agreement once, recording every (target_lo, target_up) the DSO projects."""
    from p2pdoe.services import inprocess

    seen: Targets = []
    original = GridSolver.solve

    def spy(self: GridSolver, lo: FloatArray, up: FloatArray) -> Any:
        seen.append((lo.copy(), up.copy()))
        return original(self, lo, up)

    GridSolver.solve = spy  # type: ignore[method-assign]
    try:
        inprocess.run_admm(s, Policy.DYNAMIC)
    finally:
        GridSolver.solve = original  # type: ignore[method-assign]
    return seen


def time_osqp(s: Any, targets: Targets) -> tuple[list[float], FloatArray]:
    qps = participants(s, Policy.DYNAMIC, "bench").qps
    grid = GridSolver(safe_set(s), envelope_bounds_of(qps), static=False)
    times, last = [], np.zeros(0)
    for lo, up in targets:
        t0 = time.perf_counter()
        out = grid.solve(lo, up)
        times.append(time.perf_counter() - t0)
        last = out.up
    return times, last


def time_cvxpy(s: Any, targets: Targets, solver: str) -> tuple[list[float], FloatArray]:
    qps = participants(s, Policy.DYNAMIC, "bench").qps
    safe, b = safe_set(s), envelope_bounds_of(qps)
    shape = b.lo_min.shape
    lo, up = cp.Variable(shape), cp.Variable(shape)
    t_lo, t_up = cp.Parameter(shape), cp.Parameter(shape)
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(lo - t_lo) + 0.5 * cp.sum_squares(up - t_up)),
        [
            safe.upper.g @ up <= safe.upper.h,
            safe.lower.g @ lo >= safe.lower.h,
            lo >= b.lo_min,
            lo <= b.lo_max,
            up >= b.up_min,
            up <= b.up_max,
        ],
    )
    assert problem.is_dpp()
    times = []
    for target_lo, target_up in targets:
        t_lo.value, t_up.value = target_lo, target_up
        t0 = time.perf_counter()
        problem.solve(solver=solver, warm_start=True)
        times.append(time.perf_counter() - t0)
    return times, np.asarray(up.value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--intervals", type=int)
    parser.add_argument("--dt-h", type=float)
    args = parser.parse_args()
    horizon = {k: v for k, v in (("intervals", args.intervals), ("dt_h", args.dt_h)) if v is not None}
    s = load_scenario(args.scenario, {"horizon": horizon} if horizon else {})
    targets = recorded_targets(s)
    osqp_times, reference = time_osqp(s, targets)
    rows = [("OSQP, direct (p2pdoe)", osqp_times, reference)]
    for solver in ("OSQP", "CLARABEL"):
        times, up = time_cvxpy(s, targets, solver)
        rows.append((f"cvxpy DPP + {solver}", times, up))
    print(f"DSO subproblem, {s.name}, {s.horizon} intervals, {len(targets)} solves\n")
    print("| method | median (ms) | p95 (ms) | first (ms) | max diff in UP vs direct (kW) |")
    print("|---|---:|---:|---:|---:|")
    for name, times, up in rows:
        ms = np.asarray(times) * 1e3
        diff = float(np.abs(up - reference).max())
        print(f"| {name} | {np.median(ms):.2f} | {np.percentile(ms, 95):.2f} | {ms[0]:.1f} | {diff:.3f} |")


if __name__ == "__main__":
    main()
