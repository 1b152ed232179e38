"""Why the model's small terms and the ADMM settings are what they are: the same day solved centrally
and by ADMM under variants, and the model facts docs/agreement.md quotes. Prints Markdown.

    .venv/bin/python benchmarks/model_choices.py                      # the documented variants
    .venv/bin/python benchmarks/model_choices.py --scenario synthetic-50 \\
        --variant "eps 3e-4" admm.eps_abs_kw=0.0003                     # one variant of your own

A variant is a label and `section.key=value` settings of the scenario's top-level sections (market,
admm, ...); `communities.key.subkey=value` sets a key of every community (e.g. the envelope
curvature).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from p2pdoe.analysis.results import build_results
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import data_path, load_scenario
from p2pdoe.io.synthetic import synthetic_from_name
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import run_admm

SCHEDULE = ("pv", "wd", "lx", "ch", "dis", "imp", "exp")
DOCUMENTED: list[tuple[str, list[str]]] = [
    ("as shipped", []),
    ("trade friction 1e-6 (was)", ["market.trade_quadratic_eur_per_kw2h=1e-6"]),
    ("envelope curvature 2e-5 (was)", ["communities.envelope.curvature_eur_per_kw2h=2e-5"]),
    ("eps_abs 0.003", ["admm.eps_abs_kw=0.003"]),
]


def spec_document(name: str) -> dict[str, Any]:
    generated = synthetic_from_name(name)
    if generated is not None:
        return generated
    path = data_path("scenarios", "default.yaml") if name == "default" else Path(name)
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def with_settings(doc: dict[str, Any], settings: list[str]) -> dict[str, Any]:
    for item in settings:
        path, _, text = item.partition("=")
        keys = path.split(".")
        value = yaml.safe_load(text)
        targets = doc["communities"] if keys[0] == "communities" else [doc.setdefault(keys[0], {})]
        for target in targets:
            node = target
            for key in keys[1:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value
    return doc


def scenario_of(doc: dict[str, Any]) -> Scenario:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "variant.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return load_scenario(str(path))


def model_facts(s: Scenario) -> list[str]:
    """Shares of the small terms in the centralized objective, the DSO rows kept, range widths."""
    out = []
    for policy in Policy:
        r = build_results(s, solve_centralized(s, policy), "centralized")
        eps = s.market.trade_quadratic_eur_per_kw2h * s.dt_h
        friction = eps * 2.0 * sum(t.kw**2 for t in r.trades)
        regularisers = (
            r.objective_eur - sum(c.cost_eur - c.envelope_value_eur for c in r.communities) - friction
        )
        gross = r.totals.gross_energy_eur
        out.append(
            f"- {policy.value}: regularisers {100 * regularisers / gross:.2f} %, trade friction "
            f"{100 * friction / gross:.2f} % of the gross energy cost"
        )
    grid = participants(s, Policy.DYNAMIC, "facts").dso.grid
    assert grid is not None
    up, lo = grid.rows_kept()
    out.append(f"- DSO projection keeps {up[0]} of {up[1]} upper-corner rows and {lo[0]} of {lo[1]} lower")
    widths = [float(np.max(hi - lo_)) for lo_, hi in (c.technical_range_kw() for c in s.communities)]
    out.append(f"- widest technical range of any community: {max(widths):,.0f} kW")
    return out


def variant_row(label: str, s: Scenario) -> str:
    ref = solve_centralized(s, Policy.DYNAMIC)
    gross = build_results(s, ref, "centralized").totals.gross_energy_eur
    started = time.perf_counter()
    run = run_admm(s, Policy.DYNAMIC)
    wall = time.perf_counter() - started
    sol = run.solution
    pairs = list(zip(sol.schedules, ref.schedules, strict=True))
    schedule = max(float(np.abs(a[n] - b[n]).max()) for a, b in pairs for n in SCHEDULE)
    width = max(float(np.abs((a["up"] - a["lo"]) - (b["up"] - b["lo"])).max()) for a, b in pairs)
    gap = 100 * (sol.objective_eur - ref.objective_eur) / gross
    return (
        f"| {label} | {sol.solver.iterations} ({sol.solver.status}) | {wall:.2f} | {gap:.4f} | "
        f"{schedule:.2f} | {width:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--variant", nargs="+", action="append", metavar=("LABEL", "SETTING"))
    parser.add_argument("--no-facts", action="store_true", help="skip the model facts")
    args = parser.parse_args()
    variants = [(v[0], v[1:]) for v in args.variant] if args.variant else DOCUMENTED
    base = spec_document(args.scenario)
    if not args.no_facts:
        print(f"Model facts, {args.scenario} as shipped:\n")
        print("\n".join(model_facts(scenario_of(with_settings(base, [])))) + "\n")
    print(
        "| variant | ADMM iterations | ADMM s | objective gap % | max schedule diff kW | max width diff kW |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    for label, settings in variants:
        print(
            variant_row(label, scenario_of(with_settings(spec_document(args.scenario), settings))), flush=True
        )


if __name__ == "__main__":
    main()
