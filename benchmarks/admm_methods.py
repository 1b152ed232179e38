"""ADMM settings against the iteration and accuracy targets: a table of every method x every case.

    .venv/bin/python benchmarks/admm_methods.py [--cases default "default, 15 min"] [--methods today or1.8]
                                                [--out FILE.md]

Each method is a set of `admm` settings a scenario can carry (over-relaxation, the penalties ρ,
adaptive ρ, the stopping tolerance); each case is a scenario of `benchmarks/admm_scaling.py`. For
every case the centralized reference is solved once, then `run_admm` once per method, in process,
one after the other. A cell is: iterations / worst schedule difference from the centralized one
(kW) / objective gap (% of the centralized gross energy cost, as in admm_scaling) / worst trade
price difference from the centralized duals (EUR/MWh; 1 EUR/MWh is 0.1 ct/kWh) over the trades of at
least 0.1 kW in the centralized answer. A cell is in
bold where it misses a target of issue 18: at most 60 iterations on the default day (either
resolution), at most 100 elsewhere, every answer within 1 kW and 0.01 %. Iterations and gaps do not
depend on the machine's speed or load: the participants are deterministic. docs/benchmarks.md has a
run and its reading. `--where` also logs, per cell, where the largest schedule differences lie (site,
quantity, interval).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from admm_scaling import (
    FULL,
    SCHEDULE_KEYS,
    Case,
    Centralized,
    _centralized,
    _footer,
    _log,
    _max_schedule_diff,
    _warm_up,
)

from p2pdoe.analysis.results import build_results, trade_price_errors
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

DEFAULT_RHO = (2.5e-3, 2.5e-4)  # schemas.scenario.Admm: trade, envelope, EUR/(kW^2 h)
MAX_KW, MAX_GAP_PCT = 1.0, 0.01
TRADED_KW = 0.1  # a trade whose price is compared with the centralized dual


def _rho(scale: float) -> dict[str, float]:
    trade, envelope = DEFAULT_RHO
    return {"rho_trade_eur_per_kw2h": trade * scale, "rho_envelope_eur_per_kw2h": envelope * scale}


def _adaptive(ratio: float, every: int) -> dict[str, dict[str, float]]:
    return {"adaptive_rho": {"ratio": ratio, "every": every}}


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    admm: dict[str, Any]


METHODS = (
    Method(
        "today", "today's settings (over-relaxation 1.6, adaptive ρ, eps_abs_kw 0.002, eps_price 1e-5)", {}
    ),
    Method("or1.0", "no over-relaxation (1.0)", {"over_relaxation": 1.0}),
    Method("or1.8", "over-relaxation 1.8", {"over_relaxation": 1.8}),
    Method("rho0.5", "ρ x 0.5 (both families)", _rho(0.5)),
    Method("rho2", "ρ x 2 (both families)", _rho(2.0)),
    Method("fixed", "adaptive ρ off", {"adaptive_rho": {"enabled": False}}),
    Method("adapt2", "adaptive ρ at a ratio of 2, every 5 iterations", _adaptive(2.0, 5)),
    Method("adapt1.2", "adaptive ρ at a ratio of 1.2, every 5 iterations", _adaptive(1.2, 5)),
    Method("eps0.005", "eps_abs_kw 0.005", {"eps_abs_kw": 0.005}),
    Method("eps0.01", "eps_abs_kw 0.01", {"eps_abs_kw": 0.01}),
    Method("eps0.02", "eps_abs_kw 0.02", {"eps_abs_kw": 0.02}),
    Method(
        "noprice",
        "the residual test alone (eps_price 1 EUR/kWh, never binding)",
        {"eps_price_eur_per_kwh": 1.0},
    ),
    Method("price1e-4", "eps_price 1e-4 EUR/kWh", {"eps_price_eur_per_kwh": 1e-4}),
    Method("price2e-5", "eps_price 2e-5 EUR/kWh", {"eps_price_eur_per_kwh": 2e-5}),
    Method("aa5", "Anderson acceleration, memory 5", {"anderson": {"memory": 5}}),
    Method("aa10", "Anderson acceleration, memory 10", {"anderson": {"memory": 10}}),
    Method("aa20", "Anderson acceleration, memory 20", {"anderson": {"memory": 20}}),
    Method(
        "aa10-or1.0",
        "Anderson acceleration, memory 10, no over-relaxation",
        {"anderson": {"memory": 10}, "over_relaxation": 1.0},
    ),
    Method(
        "aa10-fixed",
        "Anderson acceleration, memory 10, adaptive ρ off",
        {"anderson": {"memory": 10}, "adaptive_rho": {"enabled": False}},
    ),
)
DEFAULT_CASES = (
    "default",
    "default, 15 min",
    "synthetic-10-peers4",
    "synthetic-20-peers4",
    "synthetic-50-peers4",
    "synthetic-50",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="case labels of admm_scaling")
    parser.add_argument("--methods", nargs="+", default=[m.key for m in METHODS], help="method keys")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    parser.add_argument("--where", action="store_true", help="log the largest schedule differences per cell")
    args = parser.parse_args(argv)
    try:
        cases = _pick({c.label: c for c in FULL}, args.cases, "--cases")
        methods = _pick({m.key: m for m in METHODS}, args.methods, "--methods")
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    _warm_up()
    cells = {case.label: _run_case(case, methods, args.where) for case in cases}
    text = _markdown(cases, methods, cells) + "\n" + _footer(time.perf_counter() - started, False)
    if args.out is None:
        sys.stdout.write(text)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        _log(f"table written to {args.out}")
    return 0


def _pick(known: dict[str, Any], names: list[str], flag: str) -> list[Any]:
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown {', '.join(unknown) or '(none given)'}; known: {'; '.join(known)}")
    return [known[n] for n in names]


def _run_case(case: Case, methods: list[Method], where: bool) -> dict[str, str]:
    _log(f"{case.label}: centralized ...")
    central = _centralized(case, 900.0)
    out = {}
    for m in methods:
        overrides = {**(case.overrides or {}), "admm": m.admm}
        s = load_scenario(case.scenario, overrides)
        run = run_admm(s, Policy.DYNAMIC)
        out[m.key] = _cell(case, s, run, central)
        _log(f"  {m.key}: {out[m.key]}")
        if where and isinstance(central, Centralized):
            _log_largest_differences(s, run.solution, central.solution)
    return out


def _log_largest_differences(s: Scenario, a: Solution, b: Solution, count: int = 5) -> None:
    found = [
        (float(abs(sa[key][t] - sb[key][t])), c.id, key, t, float(sa[key][t]), float(sb[key][t]))
        for c, sa, sb in zip(s.communities, a.schedules, b.schedules, strict=True)
        for key in SCHEDULE_KEYS
        for t in [int(np.argmax(np.abs(sa[key] - sb[key])))]
    ]
    for kw, site, key, t, ours, theirs in sorted(found, reverse=True)[:count]:
        _log(f"    {kw:.2f} kW: {site} {key} at interval {t} (ADMM {ours:.2f}, centralized {theirs:.2f})")


def _cell(case: Case, s: Any, run: Any, central: Centralized | str) -> str:
    sv = run.solution.solver
    iterations = f"{sv.iterations}" if sv.status == "converged" else f"{sv.iterations} ({sv.status})"
    target = 60 if case.scenario == "default" else 100
    if sv.iterations > target or sv.status != "converged":
        iterations = f"**{iterations}**"
    if not isinstance(central, Centralized):
        return f"{iterations} / {central}"
    ref = central.solution
    gross = build_results(s, ref, "centralized").totals.gross_energy_eur
    kw = _max_schedule_diff(run.solution, ref)
    gap = 100.0 * (run.solution.objective_eur - ref.objective_eur) / gross
    kw_text = f"**{kw:.2f}**" if kw > MAX_KW else f"{kw:.2f}"
    gap_text = f"**{gap:.4f}**" if abs(gap) > MAX_GAP_PCT else f"{gap:.4f}"
    price = 1000.0 * max(trade_price_errors(s, run.solution, ref, TRADED_KW), default=0.0)
    return f"{iterations} / {kw_text} / {gap_text} / {price:.2f}"


def _markdown(cases: list[Case], methods: list[Method], cells: dict[str, dict[str, str]]) -> str:
    lines = [
        "| method | " + " | ".join(c.label for c in cases) + " |",
        "|---|" + "--:|" * len(cases),
    ]
    for m in methods:
        lines.append(f"| {m.label} | " + " | ".join(cells[c.label][m.key] for c in cases) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
