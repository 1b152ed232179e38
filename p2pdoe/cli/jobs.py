"""The jobs behind `p2pdoe solve` and `p2pdoe compare`, with progress on the console."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2pdoe.analysis.coalitions import CoalitionValues
from p2pdoe.analysis.defaults import RuleDefaults, compare_sharing
from p2pdoe.analysis.markets import DesignMetrics
from p2pdoe.analysis.results import build_results
from p2pdoe.cli.console import make_console
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy
from p2pdoe.errors import P2PDoeError
from p2pdoe.io.results import write_results
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.report.table import (
    Row,
    comparison_rows,
    p2p_gain_pct,
    sharing_markdown,
    sharing_rows,
    to_markdown,
)

console = make_console(soft_wrap=True)


def run_policy(s: Scenario, policy: Policy, mode: str = "centralized") -> Results:
    """`s` solved under `policy`; under Nash bargaining and Shapley, with the design's payments
    (`Results.market`) from the same day solved standalone (and by each coalition, for Shapley);
    under the noncooperative design, on the bids where best responses end (`Results.market`)."""
    if s.market.design == "noncooperative":
        from p2pdoe.analysis.markets import bid_market

        return bid_market(s, lambda x: _solve(x, policy, mode))
    results = _solve(s, policy, mode)
    if s.market.design not in ("nash-bargaining", "shapley"):
        return results
    from p2pdoe.analysis.markets import bargained_market, shapley_market, standalone_of, trading_partners
    from p2pdoe.core.bargaining import BargainingError

    alone = _solve(standalone_of(s), policy, mode)
    if s.market.design == "shapley":
        solved = shapley_market(s, results, alone, lambda coalition: _solve(coalition, policy, mode))
        return results.model_copy(update={"market": solved})
    try:
        market = bargained_market(results, alone, trading_partners(s), s.market.bargaining_weights)
    except BargainingError as exc:
        raise P2PDoeError(f"nash-bargaining: {exc}") from exc
    return results.model_copy(update={"market": market})


def _solve(s: Scenario, policy: Policy, mode: str) -> Results:
    if mode == "admm":
        from p2pdoe.services.inprocess import admm_results, run_admm

        return admm_results(s, run_admm(s, policy))
    from p2pdoe.reference.centralized import solve_centralized

    return build_results(s, solve_centralized(s, policy), "centralized")


def solve_one(scenario: str, overrides: dict[str, Any], envelope: str, mode: str, out: Path) -> Results:
    s = load_scenario(scenario, overrides)
    with _progress() as progress:
        progress.add_task(
            f"solving {s.name} ({envelope} envelopes, {s.horizon} intervals, {mode})", total=None
        )
        results = run_policy(s, Policy(envelope), mode)
    path = write_results(results, out)
    t = results.totals
    console.print(
        f"{envelope} ({mode}): objective {results.objective_eur:.2f} EUR, P2P {t.p2p_traded_kwh:.0f} kWh, "
        f"curtailed {t.curtailed_kwh:.0f} kWh, cost {t.cost_eur:.2f} EUR "
        f"({results.solver.wall_time_s:.2f} s)"
    )
    if mode == "admm":
        console.print(_admm_line(results))
    console.print(f"wrote {path}")
    return results


def _admm_line(r: Results) -> str:
    sv = r.solver
    return (
        f"ADMM {sv.status} after {sv.iterations} iterations; critical path {sv.critical_path_s or 0:.2f} s; "
        f"{sv.messages_per_iteration or 0:.0f} messages, {(sv.bytes_per_iteration or 0) / 1e3:.0f} kB "
        "per iteration"
    )


def compare(scenario: str, overrides: dict[str, Any], out: Path, plots: bool = True) -> dict[str, Results]:
    s = load_scenario(scenario, overrides)
    console.print(
        f"[bold]{s.name}[/]: {len(s.communities)} communities on {s.feeder.name}, {s.horizon} x {s.dt_h:g} h"
    )
    results: dict[str, Results] = {}
    with _progress() as progress:
        task = progress.add_task("solving", total=len(Policy) + 1 + (1 if plots else 0))
        for policy in (Policy.NONE, Policy.STATIC, Policy.DYNAMIC):
            progress.update(task, description=f"solving with {policy.value} envelopes")
            results[policy.value] = run_policy(s, policy)
            write_results(results[policy.value], out / policy.value)
            progress.advance(task)
        progress.update(task, description="agreeing on dynamic envelopes by ADMM")
        results["admm"] = run_policy(s, Policy.DYNAMIC, "admm")
        write_results(results["admm"], out / "admm")
        progress.advance(task)
        figures: list[Path] = []
        if plots:
            progress.update(task, description="drawing plots")
            from p2pdoe.report.plots import write_plots

            figures = write_plots(results, out)
            progress.advance(task)
    rules = compare_sharing(s)
    _write_summary(results, out, rules)
    _print_summary(results, out, figures)
    _print_sharing(rules)
    page = _write_report(results, out, figures, rules)
    console.print(f"report: {page} (and report.md)")
    return results


def _write_report(
    results: dict[str, Results], out: Path, figures: Sequence[Path], rules: Sequence[RuleDefaults]
) -> Path:
    """The comparison's one-page report (report.md, report.html) in `out`."""
    from p2pdoe import __version__
    from p2pdoe.report.page import Check, Page, Table, day_facts, network_checks, write_page

    names, rows = comparison_rows(results)
    s_names, s_rows = sharing_rows(rules)
    admm = results["admm"].solver
    checks = [
        *network_checks("dynamic", results["dynamic"]),
        Check(
            "admm: the decentralized agreement",
            admm.converged,
            f"{admm.status} after {admm.iterations} iterations; objective {_gap_pct(results):.3f} % of the "
            "gross energy cost above the centralized optimum",
        ),
    ]
    tables = [
        Table("Envelope policies compared", ["metric", *names], [[r.label, *r.values] for r in rows]),
        Table(
            "Default envelopes by sharing rule", ["site", *s_names], [[r.label, *r.values] for r in s_rows]
        ),
    ]
    page = Page(
        f"{results['dynamic'].scenario}: envelope policies compared",
        command_line(),
        __version__,
        day_facts(results["dynamic"]),
        tables,
        checks,
        figures,
    )
    return write_page(page, out)[1]


def command_line() -> str:
    """The command as the user typed it (however `p2pdoe` was started)."""
    return shlex.join(["p2pdoe", *sys.argv[1:]])


def _write_summary(results: dict[str, Results], out: Path, rules: Sequence[RuleDefaults]) -> None:
    sharing = "\n## Default envelopes by sharing rule\n\n" + sharing_markdown(rules)
    (out / "comparison.md").write_text(to_markdown(results) + sharing, encoding="utf-8")
    names, rows = comparison_rows(results)
    table = {row.label: dict(zip(names, row.values, strict=True)) for row in rows}
    (out / "comparison.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    defaults = {r.sharing: {"jain_index": r.jain, "sites": [asdict(x) for x in r.sites]} for r in rules}
    (out / "defaults.json").write_text(json.dumps(defaults, indent=1), encoding="utf-8")


def _print_sharing(rules: Sequence[RuleDefaults]) -> None:
    names, rows = sharing_rows(rules)
    table = Table(
        title="Default envelopes by sharing rule: usable width (kW, day mean) / hours short of need"
    )
    table.add_column("site")
    for name in names:
        table.add_column(name.replace("-", "-\n", 1) if len(name) > 8 else name, justify="right")
    for row in rows:
        table.add_row(row.label, *row.values)
    console.print(table)


def _print_summary(results: dict[str, Results], out: Path, figures: list[Path]) -> None:
    names, rows = comparison_rows(results)
    _print_rows("Envelope policies compared (centralized optimum; admm: dynamic, decentralized)", names, rows)
    gain = p2p_gain_pct(results)
    dyn = results["dynamic"].ac_check
    safe = all(
        st.voltage_violations == 0 and st.thermal_violations == 0
        for st in (dyn.schedule, dyn.upper_corner, dyn.lower_corner)
    )
    console.print(
        f"Dynamic envelopes trade {gain:+.1f} % P2P energy against static ones; "
        f"AC check of dynamic schedule and both corners: {'all limits hold' if safe else 'VIOLATIONS'}."
    )
    console.print(_admm_line(results["admm"]) + f"; objective gap to centralized {_gap_pct(results):.3f} %")
    console.print(f"results: {out}/{{none,static,dynamic,admm}}/results.json, {out}/comparison.md")
    for path in figures:
        console.print(f"plot: {path}")


def _gap_pct(results: dict[str, Results]) -> float:
    """ADMM's objective above the centralized dynamic one, in % of the gross energy cost."""
    ref = results["dynamic"]
    return 100.0 * (results["admm"].objective_eur - ref.objective_eur) / ref.totals.gross_energy_eur


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def compare_markets(
    scenario: str, overrides: dict[str, Any], out: Path, plots: bool = True
) -> dict[str, DesignMetrics]:
    """Every market design on the same day, decentralized (ADMM in-process) under dynamic envelopes,
    each checked against its centralized optimum; Nash bargaining's and Shapley's payments on top of
    the welfare agreement; strategic bidders (noncooperative). A table of the gains over standalone."""
    from p2pdoe.analysis.markets import SCHEDULE_DESIGNS, design_metrics, with_network_charges

    w = load_scenario(scenario, {**overrides, "market": {"design": "welfare"}})
    solved, central, gaps_at_prices = _solve_designs(scenario, overrides, out)
    gaps = {d: _objective_gap_pct(solved[d], central[d]) for d in SCHEDULE_DESIGNS}
    metrics = {
        d: replace(
            design_metrics(d, solved[d], solved["standalone"]), best_response_gap_eur=gaps_at_prices[d]
        )
        for d in SCHEDULE_DESIGNS
    }
    metrics["welfare"] = replace(metrics["welfare"], price_of_anarchy=1.0)
    metrics["noncooperative"], solved["noncooperative"], gaps["noncooperative"] = _strategic(
        w, central, solved
    )
    write_results(solved["noncooperative"], out / "noncooperative")
    extra = _cooperative(w, solved, central, metrics)  # the core excess of every design so far too
    for d in metrics:
        gaps.setdefault(d, gaps["welfare"])  # the cooperative designs share the welfare schedule
        schedule = solved.get(d, solved["welfare"])
        metrics[d] = with_network_charges(metrics[d], schedule, solved["standalone"])
    _write_markets(metrics, gaps, extra, out, plots)
    return metrics


def _solve_designs(
    scenario: str, overrides: dict[str, Any], out: Path
) -> tuple[dict[str, Results], dict[str, Results], dict[str, float]]:
    """Each design of its own schedule by ADMM, its centralized optimum, and the most one community
    would save by deviating alone at the agreed prices (p2pdoe.analysis.equilibrium)."""
    from p2pdoe.analysis.equilibrium import best_response_gaps
    from p2pdoe.analysis.markets import SCHEDULE_DESIGNS
    from p2pdoe.services.inprocess import admm_results, run_admm

    solved: dict[str, Results] = {}
    central: dict[str, Results] = {}
    gaps: dict[str, float] = {}
    with _progress() as progress:
        task = progress.add_task("solving", total=len(SCHEDULE_DESIGNS))
        for design in SCHEDULE_DESIGNS:
            progress.update(task, description=f"agreeing on the {design} design by ADMM")
            s = load_scenario(scenario, {**overrides, "market": {"design": design}})
            run = run_admm(s, Policy.DYNAMIC)
            solved[design] = admm_results(s, run)
            gaps[design] = max(best_response_gaps(s, run.solution).values())
            central[design] = _central(s)
            write_results(solved[design], out / design)
            progress.advance(task)
    return solved, central, gaps


def _strategic(
    w: Scenario, central: dict[str, Results], solved: dict[str, Results]
) -> tuple[DesignMetrics, Results, float]:
    """Strategic bidders (p2pdoe.analysis.bidding; centralized clearings): the metrics of their
    equilibrium, or of the worst profile of their cycle, agreed by ADMM, and its gap to the
    centralized clearing."""
    from p2pdoe.analysis.bidding import best_responses, price_of_anarchy
    from p2pdoe.analysis.markets import design_metrics

    with _progress() as progress:
        progress.add_task("each community choosing its bid against the others' (centralized)", total=None)
        bidding = best_responses(w, _central)
    savings = bidding.savings_eur(central["standalone"])
    worst = savings.index(min(savings))
    bids = bidding.profiles[worst]
    agreed = run_policy(replace(w, communities=tuple(
        replace(c, sell_markup_eur_per_kwh=bids[c.id]) for c in w.communities
    )), Policy.DYNAMIC, "admm")  # fmt: skip
    optimal = central["standalone"].totals.cost_eur - central["welfare"].totals.cost_eur
    m = replace(
        design_metrics("noncooperative", agreed, solved["standalone"]),
        bids=bidding.profiles,
        price_of_anarchy=price_of_anarchy(optimal, savings[worst]),
    )
    return m, agreed, _objective_gap_pct(agreed, bidding.outcomes[worst])


def _cooperative(
    w: Scenario, solved: dict[str, Results], central: dict[str, Results], metrics: dict[str, DesignMetrics]
) -> dict[str, Any]:
    """Add Nash bargaining (unless there is no gain to share) and Shapley to `metrics`, and each
    design's core excess where every coalition was solved; what markets.json adds for them."""
    from p2pdoe.analysis.markets import nash_bargaining, shapley, trading_partners, with_core_excess
    from p2pdoe.core.bargaining import BargainingError

    welfare, alone = solved["welfare"], solved["standalone"]
    peers = trading_partners(w)
    weights = {c: w.market.bargaining_weights.get(c, 1.0) for c in peers}
    extra: dict[str, Any] = {}
    try:
        metrics["nash-bargaining"], deal = nash_bargaining(welfare, alone, peers, weights)
        payments = [{"payer": a, "payee": b, "eur": v} for (a, b), v in deal.payments.items()]
        extra["nash-bargaining"] = {"payments": payments, "weights": weights}
    except BargainingError as exc:
        console.print(f"nash-bargaining left out: {exc}")
    exact_up_to, orders, seed = w.market.shapley
    n = len(w.ids)
    how = (
        f"exact: {2**n - 1 - n} coalitions"
        if n <= exact_up_to
        else f"{orders} sampled orders: up to {orders * (n - 1)} coalitions"
    )
    with _progress() as progress:
        progress.add_task(f"Shapley, {how}, each a welfare problem (centralized)", total=None)
        values = CoalitionValues(w, _central, central["standalone"])
        metrics["shapley"] = shapley(welfare, alone, values, exact_up_to, orders, seed)
        if len(w.ids) <= exact_up_to:
            metrics.update({d: with_core_excess(m, values) for d, m in metrics.items()})
    _manipulability(w, central, metrics, values)
    return extra


def _manipulability(
    w: Scenario, central: dict[str, Results], metrics: dict[str, DesignMetrics], values: CoalitionValues
) -> None:
    """Each community in turn bidding its sales dearer (centralized solves; under Shapley in every
    coalition that holds it): the most one gains."""
    from p2pdoe.analysis.markets import manipulability

    with _progress() as progress:
        progress.add_task("each community bidding its sales dearer, in turn (centralized)", total=None)
        found = manipulability(w, central["standalone"], _central, honest=central["welfare"], values=values)
    for design, m in found.items():
        if design in metrics:
            metrics[design] = replace(metrics[design], manipulation=m)


def _write_markets(
    metrics: dict[str, DesignMetrics], gaps: dict[str, float], extra: dict[str, Any], out: Path, plots: bool
) -> None:
    from p2pdoe.analysis.markets import COMPARED, SCHEDULE_DESIGNS
    from p2pdoe.report.table import market_rows, rows_markdown

    shown = [d for d in COMPARED if d in metrics]
    names, rows = market_rows([metrics[d] for d in shown])
    rows.append(Row("Objective gap to centralized (%)", [f"{gaps[d]:.3f}" for d in shown]))
    (out / "markets.md").write_text(rows_markdown("metric", names, rows), encoding="utf-8")
    table = {d: asdict(metrics[d]) | {"objective_gap_pct": gaps[d]} | extra.get(d, {}) for d in shown}
    (out / "markets.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    _print_rows("Market designs (dynamic envelopes, decentralized): gains over standalone", names, rows)
    figures = []
    if plots:
        from p2pdoe.report.plots import plot_market_gains

        figures.append(plot_market_gains([metrics[d] for d in shown], out))
    written = ", ".join(str(f) for f in figures)
    designs = ",".join((*SCHEDULE_DESIGNS, "noncooperative"))
    console.print(f"results: {out}/{{{designs}}}/results.json, {out}/markets.md {written}")


def _central(s: Scenario) -> Results:
    """The centralized optimum under dynamic envelopes."""
    return run_policy(s, Policy.DYNAMIC)


def _objective_gap_pct(admm: Results, central: Results) -> float:
    return 100.0 * abs(admm.objective_eur - central.objective_eur) / max(abs(central.objective_eur), 1.0)


def _print_rows(title: str, names: Sequence[str], rows: Sequence[Row]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(row.label, *row.values)
    console.print(table)
