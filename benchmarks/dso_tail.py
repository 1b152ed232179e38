"""What makes the DSO's slow steps slow: its projections' OSQP iterations, and the garbage collector.

    .venv/bin/python benchmarks/dso_tail.py [--scenario synthetic-200-peers4] [--gc on|off]

Runs `run_admm` in process and records every projection of the DSO's grid solver (wall time, OSQP
iterations, OSQP's own ρ updates) and every collection of Python's garbage collector. A projection
is slow when it takes over 3 times the median. Times depend on the machine and its load; the OSQP
iteration counts do not. `--gc off` collects once and disables the collector
for the run, to see how much of the tail it makes. Prints Markdown.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import numpy as np

from p2pdoe.core.agreement.grid_solver import PROJECTION_MAX_ITER, GridSolver
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

SLOW = 3.0  # x the median projection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="synthetic-200-peers4")
    parser.add_argument("--gc", choices=("on", "off"), default="on")
    args = parser.parse_args(argv)
    projections: list[tuple[float, int, int]] = []
    collections: list[float] = []
    _record_projections(projections)
    _record_collections(collections)
    s = load_scenario(args.scenario)
    if args.gc == "off":
        gc.collect()
        gc.disable()
    run = run_admm(s, Policy.DYNAMIC)
    gc.enable()
    print(_table(args, run, projections, collections))
    return 0


def _record_projections(out: list[tuple[float, int, int]]) -> None:
    plain = GridSolver._run

    def timed(self: GridSolver) -> Any:
        t0 = time.perf_counter()
        res = plain(self)
        out.append((time.perf_counter() - t0, int(res.info.iter), int(res.info.rho_updates)))
        return res

    GridSolver._run = timed  # type: ignore[method-assign]


def _record_collections(out: list[float]) -> None:
    started: list[float] = []

    def callback(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            out.append(time.perf_counter() - started[0])

    gc.callbacks.append(callback)


def _table(
    args: argparse.Namespace, run: Any, projections: list[tuple[float, int, int]], gcs: list[float]
) -> str:
    steps = np.asarray(run.timings.dso) * 1e3
    p = np.asarray(projections, dtype=float)
    ms, iters, rho_updates = p[:, 0] * 1e3, p[:, 1], p[:, 2]
    slow = ms > SLOW * np.median(ms)
    rows = [
        ("scenario, garbage collector", f"{args.scenario}, {args.gc}"),
        ("ADMM iterations", f"{run.solution.solver.iterations}"),
        (
            "DSO step ms, median / p95 / max",
            f"{np.median(steps):.1f} / {np.percentile(steps, 95):.1f} / {steps.max():.1f}",
        ),
        ("projections", f"{len(ms)}"),
        ("projection ms, median / p95", f"{np.median(ms):.1f} / {np.percentile(ms, 95):.1f}"),
        ("OSQP iterations per projection, median / p95 / max", _spread(iters)),
        (
            f"projections at or past the cap of {PROJECTION_MAX_ITER} iterations",
            f"{int((iters >= PROJECTION_MAX_ITER).sum())}",
        ),
        ("OSQP iterations, fast projections: median", f"{np.median(iters[~slow]):.0f}"),
        (f"slow projections (> {SLOW:g} x median)", f"{int(slow.sum())}"),
        ("OSQP iterations, slow projections: median / min", _median_min(iters[slow])),
        ("slow projections with an OSQP ρ update", f"{int((rho_updates[slow] > 0).sum())}"),
        (
            "garbage collections, total ms / longest ms",
            f"{len(gcs)}, {1e3 * sum(gcs):.0f} / {1e3 * max(gcs, default=0):.1f}",
        ),
    ]
    return "| | |\n|---|--:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _spread(values: np.ndarray) -> str:
    return f"{np.median(values):.0f} / {np.percentile(values, 95):.0f} / {values.max():.0f}"


def _median_min(values: np.ndarray) -> str:
    return f"{np.median(values):.0f} / {values.min():.0f}" if values.size else "-"


if __name__ == "__main__":
    raise SystemExit(main())
