"""What makes the DSO's slow steps slow: its projections' OSQP iterations, and the garbage collector.

    .venv/bin/python benchmarks/dso_tail.py [--scenario synthetic-200-peers4] [--gc on|off]
        [--per-interval-from N]

Runs `run_admm` in process and records every OSQP solve of the DSO's projection (wall time, OSQP
iterations, OSQP's own ρ updates; a dynamic projection is one solve per interval, a static one a
single solve) and every collection of Python's garbage collector. A solve is slow when it takes over
3 times the median. Times depend on the machine and its load; the OSQP
iteration counts do not. `--gc off` collects once and disables the collector
for the run, to see how much of the tail it makes. `--per-interval-from N` solves dynamic projections
one QP per interval from N sites on instead of the default (`PER_INTERVAL_FROM_SITES`): 1 for always,
a large N for never. Prints Markdown.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import numpy as np

from p2pdoe.core.agreement import grid_solver
from p2pdoe.core.agreement.grid_solver import PROJECTION_MAX_ITER, _Block
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

SLOW = 3.0  # x the median solve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="synthetic-200-peers4")
    parser.add_argument("--gc", choices=("on", "off"), default="on")
    parser.add_argument("--per-interval-from", type=int, default=grid_solver.PER_INTERVAL_FROM_SITES)
    args = parser.parse_args(argv)
    grid_solver.PER_INTERVAL_FROM_SITES = args.per_interval_from
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
    plain = _Block._run

    def timed(self: _Block) -> Any:
        t0 = time.perf_counter()
        res = plain(self)
        out.append((time.perf_counter() - t0, int(res.info.iter), int(res.info.rho_updates)))
        return res

    _Block._run = timed  # type: ignore[method-assign]


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
        ("one QP per interval from", f"{args.per_interval_from} sites"),
        ("ADMM iterations", f"{run.solution.solver.iterations}"),
        (
            "DSO step ms, median / p95 / max",
            f"{np.median(steps):.1f} / {np.percentile(steps, 95):.1f} / {steps.max():.1f}",
        ),
        ("DSO steps, total s", f"{steps.sum() / 1e3:.2f}"),
        ("OSQP solves", f"{len(ms)}"),
        ("OSQP solves' share of the DSO steps", f"{ms.sum() / steps.sum():.0%}"),
        ("solve ms, median / p95", f"{np.median(ms):.2f} / {np.percentile(ms, 95):.2f}"),
        ("OSQP iterations per solve, median / p95 / max", _spread(iters)),
        (
            f"solves at or past the cap of {PROJECTION_MAX_ITER} iterations",
            f"{int((iters >= PROJECTION_MAX_ITER).sum())}",
        ),
        ("OSQP iterations, fast solves: median", f"{np.median(iters[~slow]):.0f}"),
        (f"slow solves (> {SLOW:g} x median)", f"{int(slow.sum())}"),
        ("OSQP iterations, slow solves: median / min", _median_min(iters[slow])),
        ("slow solves with an OSQP ρ update", f"{int((rho_updates[slow] > 0).sum())}"),
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
