"""Scaling benchmark: the decentralized ADMM agreement against the centralized reference.

    .venv/bin/python benchmarks/admm_scaling.py [--quick] [--cases LABEL ...] [--relay-trades] [--out FILE.md]

For each case (the default scenario at 24 x 1 h and 96 x 15 min, synthetic scenarios with 5 to 50
communities, full mesh and with each community trading with its 4 electrically nearest, and 100 and
200 with the 4 nearest), it solves the dynamic-envelope problem twice, one after the other, never in
parallel:

- centralized: the whole `solve_centralized` call (cvxpy problem building, compilation and Clarabel),
  in a child process so that a solve beyond `--centralized-timeout` can be stopped and reported as
  skipped; the part inside cvxpy's `problem.solve` is shown in brackets;
- ADMM: `run_admm` in process (every message encoded and decoded), its wall time from building the
  participants to the settled schedules, the critical path (slowest community plus the DSO, per
  iteration), per-step times of the communities (all sites and iterations pooled) and of the DSO.

It prints progress to stderr and writes one Markdown table to --out (default stdout). `--quick` runs
only 5 and 10 communities (a smoke test), `--cases` the cases named; `--relay-trades` runs every
case with the grants relaying the trades (docs/agreement.md). docs/benchmarks.md has a run and its
reading.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import queue
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from p2pdoe.analysis.results import build_results
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.errors import InfeasibleError
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import AdmmRun, run_admm

SCHEDULE_KEYS = ("pv", "wd", "lx", "ch", "dis", "imp", "exp")
QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}


@dataclass(frozen=True)
class Case:
    label: str
    scenario: str
    overrides: dict[str, Any] | None = None


FULL = (
    Case("default", "default"),
    Case("default, 15 min", "default", QUARTER_HOURS),
    Case("synthetic-5", "synthetic-5"),
    Case("synthetic-10", "synthetic-10"),
    Case("synthetic-10-peers4", "synthetic-10-peers4"),
    Case("synthetic-20", "synthetic-20"),
    Case("synthetic-20-peers4", "synthetic-20-peers4"),
    Case("synthetic-50", "synthetic-50"),
    Case("synthetic-50-peers4", "synthetic-50-peers4"),
    Case("synthetic-100-peers4", "synthetic-100-peers4"),
    Case("synthetic-200-peers4", "synthetic-200-peers4"),
)
QUICK = (Case("synthetic-5", "synthetic-5"), Case("synthetic-10", "synthetic-10"))

COLUMNS = (
    "scenario",
    "communities",
    "trading links",
    "intervals",
    "centralized s (solve)",
    "ADMM iterations",
    "ADMM s",
    "ADMM / centr.",
    "critical path s",
    "critical / centr.",
    "community step median / p95 ms",
    "DSO step median / p95 ms",
    "ms / iteration",
    "ms / iteration / community",
    "messages / iteration",
    "kB / iteration",
    "objective gap %",
    "max schedule diff kW",
    "max width diff kW",
)


@dataclass(frozen=True)
class Centralized:
    wall_s: float  # the whole solve_centralized call
    solve_s: float  # cvxpy's problem.solve (compilation and Clarabel)
    solution: Solution


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 5 and 10 communities (smoke test)")
    parser.add_argument("--cases", nargs="+", help="case labels (default: every case)")
    parser.add_argument("--relay-trades", action="store_true", help="the grants relay the trades")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (default: stdout)")
    parser.add_argument(
        "--centralized-timeout",
        type=float,
        default=900.0,
        help="seconds after which a centralized solve is stopped and reported as skipped (default 900)",
    )
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else (chosen_cases(parser, args.cases) if args.cases else FULL)
    if args.relay_trades:
        cases = [relayed(c) for c in cases]
    started = time.perf_counter()
    _log("warming up (imports, first solves)")
    _warm_up()
    rows = []
    for i, case in enumerate(cases, 1):
        _log(f"[{i}/{len(cases)}] {case.label}")
        rows.append(_measure(case, args.centralized_timeout))
    total = time.perf_counter() - started
    relay = "Every round relayed its trades in the grants (--relay-trades).\n" if args.relay_trades else ""
    text = _markdown(rows) + "\n" + _footer(total, args.quick) + relay
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        _log(f"table written to {args.out}")
    _log(f"total run time {total:.0f} s")
    return 0


def _warm_up() -> None:
    s = load_scenario("synthetic-3", {"horizon": {"intervals": 4, "dt_h": 6.0}})
    solve_centralized(s, Policy.DYNAMIC)
    run_admm(s, Policy.DYNAMIC)


def _measure(case: Case, timeout_s: float) -> list[str]:
    s = load_scenario(case.scenario, case.overrides)
    n = len(s.communities)
    links = sum(len(p) for p in s.market.peers) // 2
    step = f"{s.dt_h:g} h" if s.dt_h >= 1 else f"{s.dt_h * 60:g} min"
    head = [case.label, str(n), str(links), f"{s.horizon} x {step}"]
    _log(f"  {n} communities, {links} trading links, {s.horizon} intervals; centralized ...")
    central = _centralized(case, timeout_s)
    if isinstance(central, Centralized):
        _log(f"  centralized {central.wall_s:.2f} s (problem.solve {central.solve_s:.2f} s); ADMM ...")
    else:
        _log(f"  centralized {central}; ADMM ...")
    t0 = time.perf_counter()
    run = run_admm(s, Policy.DYNAMIC)
    outer = time.perf_counter() - t0
    sv = run.solution.solver
    _log(
        f"  ADMM {sv.status} after {sv.iterations} iterations, {sv.wall_time_s:.2f} s ({outer:.2f} s outside)"
    )
    return head + _admm_cells(s, run, central)


def _centralized(case: Case, timeout_s: float) -> Centralized | str:
    """The centralized solve in a child process (forked, so already warm); a reason if there is none."""
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    results: Any = ctx.Queue()
    child = ctx.Process(target=_centralized_child, args=(case, results), daemon=True)
    child.start()
    deadline = time.monotonic() + timeout_s
    result: Centralized | str | None = None
    while result is None and time.monotonic() < deadline:
        try:
            result = results.get(timeout=1.0)
        except queue.Empty:
            if not child.is_alive() and results.empty():
                result = f"skipped (the solver process died, exit code {child.exitcode})"
    if result is None:
        child.terminate()
        result = f"skipped (over {timeout_s:.0f} s)"
    child.join()
    return result


def _centralized_child(case: Case, results: Any) -> None:
    s = load_scenario(case.scenario, case.overrides)
    t0 = time.perf_counter()
    try:
        sol = solve_centralized(s, Policy.DYNAMIC)
    except InfeasibleError as exc:
        results.put(f"skipped ({exc})")
        return
    wall = time.perf_counter() - t0
    results.put(Centralized(wall, sol.solver.wall_time_s, sol))


def _admm_cells(s: Scenario, run: AdmmRun, central: Centralized | str) -> list[str]:
    t = run.timings
    sv = run.solution.solver
    n = len(s.communities)
    wall = sv.wall_time_s
    critical = t.critical_path_s()
    community_ms = np.concatenate([np.asarray(v) for v in t.community.values()]) * 1e3
    dso_ms = np.asarray(t.dso) * 1e3
    per_iteration_ms = wall / max(sv.iterations, 1) * 1e3
    cells = [
        "" if not isinstance(central, Centralized) else f"{central.wall_s:.2f} ({central.solve_s:.2f})",
        f"{sv.iterations} ({sv.status})",
        f"{wall:.2f}",
        "",
        f"{critical:.2f}",
        "",
        f"{np.median(community_ms):.2f} / {np.percentile(community_ms, 95):.2f}",
        f"{np.median(dso_ms):.2f} / {np.percentile(dso_ms, 95):.2f}",
        f"{per_iteration_ms:.1f}",
        f"{per_iteration_ms / n:.2f}",
        f"{np.mean(t.messages):.0f}",
        f"{np.mean(t.bytes) / 1e3:.0f}",
        "",
        "",
        "",
    ]
    if not isinstance(central, Centralized):
        cells[0] = central
        return cells
    ref = central.solution
    gross = build_results(s, ref, "centralized").totals.gross_energy_eur
    cells[3] = f"{wall / central.wall_s:.1f}"
    cells[5] = f"{critical / central.wall_s:.2f}"
    cells[12] = f"{100.0 * (run.solution.objective_eur - ref.objective_eur) / gross:.4f}"
    cells[13] = f"{_max_schedule_diff(run.solution, ref):.3f}"
    cells[14] = f"{_max_width_diff(run.solution, ref):.3f}"
    return cells


def _max_schedule_diff(a: Solution, b: Solution) -> float:
    return max(
        float(np.max(np.abs(sa[key] - sb[key])))
        for sa, sb in zip(a.schedules, b.schedules, strict=True)
        for key in SCHEDULE_KEYS
    )


def _max_width_diff(a: Solution, b: Solution) -> float:
    return max(
        float(np.max(np.abs((sa["up"] - sa["lo"]) - (sb["up"] - sb["lo"]))))
        for sa, sb in zip(a.schedules, b.schedules, strict=True)
    )


def _markdown(rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _footer(total_s: float, quick: bool) -> str:
    libs = ", ".join(f"{name} {version(name)}" for name in ("numpy", "scipy", "cvxpy", "clarabel", "osqp"))
    return (
        f"Run {'--quick ' if quick else ''}on {platform.machine()}, Python {platform.python_version()}, "
        f"{mp.cpu_count()} CPUs; {libs}. Total run time {total_s:.0f} s.\n"
    )


def relayed(case: Case) -> Case:
    """The case with the grants relaying the trades (`admm.relay_trades`)."""
    return Case(case.label, case.scenario, {**(case.overrides or {}), "admm": {"relay_trades": True}})


def chosen_cases(parser: argparse.ArgumentParser, labels: list[str]) -> list[Case]:
    """The cases named by `--cases`, or the parser's error naming the unknown and the known."""
    known = {c.label: c for c in FULL}
    unknown = [label for label in labels if label not in known]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; known: {'; '.join(known)}")
    return [known[label] for label in labels]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
