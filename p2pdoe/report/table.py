"""The none / static / dynamic comparison, and the default envelopes' sharing rules, as rows of numbers
rendered as Markdown or a rich table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pdoe.analysis.defaults import RuleDefaults
from p2pdoe.analysis.markets import DesignMetrics
from p2pdoe.core.schemas.results import Results
from p2pdoe.report.numbers import fixed

POLICY_ORDER = ("none", "static", "dynamic", "admm")


@dataclass(frozen=True)
class Row:
    label: str
    values: list[str]


def _fmt(value: float, digits: int) -> str:
    return fixed(value, digits, thousands=True)


Metric = tuple[str, Callable[[Results], str]]


def _num(label: str, get: Callable[[Results], float], digits: int = 1) -> Metric:
    return label, lambda r: _fmt(get(r), digits)


def _dlmp_max(r: Results, attr: str) -> float:
    values = [max(getattr(d, attr)) for d in r.dlmp]
    return float(max(values)) if values else 0.0


def _schedule_violations(r: Results) -> str:
    s = r.ac_check.schedule
    return f"{s.voltage_violations} / {s.thermal_violations}"


def _corner_violations(r: Results) -> str:
    a = r.ac_check
    volts = a.upper_corner.voltage_violations + a.lower_corner.voltage_violations
    thermal = a.upper_corner.thermal_violations + a.lower_corner.thermal_violations
    return f"{volts} / {thermal}"


METRICS: list[Metric] = [
    _num("P2P energy traded (kWh)", lambda r: r.totals.p2p_traded_kwh, 0),
    _num("Total cost (EUR)", lambda r: r.totals.cost_eur, 2),
    _num("RES curtailed (kWh)", lambda r: r.totals.curtailed_kwh, 0),
    _num("Grid import (kWh)", lambda r: r.totals.grid_import_kwh, 0),
    _num("Grid export (kWh)", lambda r: r.totals.grid_export_kwh, 0),
    _num("Mean envelope width, usable (kW)", lambda r: r.totals.mean_usable_envelope_width_kw, 0),
    _num("Min voltage, LinDistFlow (p.u.)", lambda r: r.lindistflow_check.schedule.vmin_pu, 4),
    _num("Min voltage, AC (p.u.)", lambda r: r.ac_check.schedule.vmin_pu, 4),
    _num("Max voltage, LinDistFlow (p.u.)", lambda r: r.lindistflow_check.schedule.vmax_pu, 4),
    _num("Max voltage, AC (p.u.)", lambda r: r.ac_check.schedule.vmax_pu, 4),
    _num("Max branch loading, LinDistFlow (%)", lambda r: r.lindistflow_check.schedule.max_loading_pct, 1),
    _num("Max branch loading, AC (%)", lambda r: r.ac_check.schedule.max_loading_pct, 1),
    ("AC violations at schedule (V / thermal)", _schedule_violations),
    ("AC violations at envelope corners (V / thermal)", _corner_violations),
    _num("Min voltage at lower corner, AC (p.u.)", lambda r: r.ac_check.lower_corner.vmin_pu, 4),
    _num("Max voltage at upper corner, AC (p.u.)", lambda r: r.ac_check.upper_corner.vmax_pu, 4),
    _num("Max export DLMP (EUR/kWh)", lambda r: _dlmp_max(r, "export_eur_per_kwh"), 3),
    _num("Max import DLMP (EUR/kWh)", lambda r: _dlmp_max(r, "import_eur_per_kwh"), 3),
    ("Solver iterations", lambda r: str(r.solver.iterations)),
    _num("Solve time (s)", lambda r: r.solver.wall_time_s, 2),
]


def comparison_rows(results: Mapping[str, Results]) -> tuple[list[str], list[Row]]:
    """Column headers and rows; per-community costs follow the totals."""
    names = [n for n in POLICY_ORDER if n in results] + [n for n in results if n not in POLICY_ORDER]
    cells: dict[str, list[str]] = {}
    for name in names:
        r = results[name]
        for label, get in METRICS:
            cells.setdefault(label, []).append(get(r))
        for c in r.communities:
            cells.setdefault(f"Cost {c.id} (EUR)", []).append(_fmt(c.cost_eur, 2))
    return names, [Row(label, values) for label, values in cells.items()]


def to_markdown(results: Mapping[str, Results]) -> str:
    names, rows = comparison_rows(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {row.label} | " + " | ".join(row.values) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def p2p_gain_pct(results: Mapping[str, Results]) -> float:
    """How much more P2P energy dynamic envelopes trade than static ones, in percent."""
    static = results["static"].totals.p2p_traded_kwh
    return (
        float(100.0 * (results["dynamic"].totals.p2p_traded_kwh / static - 1.0))
        if static > 0
        else float(np.inf)
    )


def sharing_rows(rules: Sequence[RuleDefaults]) -> tuple[list[str], list[Row]]:
    """Per site and sharing rule: usable default width (kW, mean over the day) / hours short of its
    need to stay whole; then Jain's fairness index of the widths."""
    names = [r.sharing for r in rules]
    sites = [x.site for x in rules[0].sites] if rules else []
    rows = [
        Row(site, [f"{_fmt(r.sites[c].usable_kw, 0)} / {r.sites[c].short_h:g}" for r in rules])
        for c, site in enumerate(sites)
    ]
    rows.append(Row("Jain index", [f"{r.jain:.3f}" for r in rules]))
    return names, rows


def sharing_markdown(rules: Sequence[RuleDefaults]) -> str:
    names, rows = sharing_rows(rules)
    head = "| site: usable kW / hours short | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    lines += [f"| {row.label} | " + " | ".join(row.values) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def market_rows(designs: Sequence[DesignMetrics]) -> tuple[list[str], list[Row]]:
    """Per market design: its total cost and saving against standalone, each community's gain, whether
    every community gains, how evenly (Jain, Gini), and what agreeing on it took."""

    def opt(value: float | None, digits: int) -> str:
        return "-" if value is None else _fmt(value, digits)

    names = [d.design for d in designs]
    sites = list(designs[0].gains_eur) if designs else []
    rows = [
        Row("Total cost (EUR)", [_fmt(d.total_cost_eur, 2) for d in designs]),
        Row("Saving against standalone (EUR)", [_fmt(d.saving_eur, 2) for d in designs]),
        Row("P2P energy traded (kWh)", [_fmt(d.p2p_traded_kwh, 0) for d in designs]),
        Row("Mean P2P price (EUR/kWh)", [opt(d.mean_p2p_price_eur_per_kwh, 3) for d in designs]),
        *(Row(f"Gain of {site} (EUR)", [_fmt(d.gains_eur[site], 2) for d in designs]) for site in sites),
        Row("Every community gains", ["yes" if d.individually_rational else "no" for d in designs]),
        Row("Jain index of the gains", [opt(d.jain, 3) for d in designs]),
        Row("Gini coefficient of the gains", [opt(d.gini, 3) for d in designs]),
        Row("ADMM status", [d.status for d in designs]),
        Row("ADMM rounds (iterations)", [str(d.iterations) for d in designs]),
        Row("Payment rounds (second stage)", [opt(d.stage2_iterations, 0) for d in designs]),
        Row("Coalitions solved", [opt(d.coalition_solves, 0) for d in designs]),
        Row("Sampling error, largest (EUR)", [opt(d.sampling_error_eur, 2) for d in designs]),
        Row("Largest core excess (EUR)", [opt(d.core_excess_eur, 2) for d in designs]),
        Row("Most a markup on its sales gains one community (EUR)", [_manipulated(d) for d in designs]),
        Row(
            "Most one community saves deviating at the prices (EUR)",
            [opt(d.best_response_gap_eur, 3) for d in designs],
        ),
        Row("Strategic bids (sale markups, EUR/kWh)", [_bids(d) for d in designs]),
        Row("Price of anarchy (optimal saving / saving)", [opt(d.price_of_anarchy, 4) for d in designs]),
        Row("DLMP charges = DSO surplus (EUR)", [opt(d.merchandising_surplus_eur, 2) for d in designs]),
        Row("Every community gains after charges", [_yes_no(d.rational_after_charges) for d in designs]),
        Row("Messages per iteration", [opt(d.messages_per_iteration, 0) for d in designs]),
        Row(
            "kB per iteration",
            [opt(None if d.bytes_per_iteration is None else d.bytes_per_iteration / 1e3, 1) for d in designs],
        ),
    ]
    return names, rows


def rows_markdown(first: str, names: Sequence[str], rows: Sequence[Row]) -> str:
    lines = [f"| {first} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {row.label} | " + " | ".join(row.values) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _bids(d: DesignMetrics) -> str:
    if d.bids is None:
        return "-"
    shown = [", ".join(f"{site} {m:g}" for site, m in p.items() if m > 0) or "all honest" for p in d.bids]
    return shown[0] if len(shown) == 1 else f"a cycle of {len(shown)}: " + " / ".join(shown)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _manipulated(d: DesignMetrics) -> str:
    m = d.manipulation
    if m is None:
        return "-"
    loss = f"welfare {-m.welfare_loss_eur:+.2f}"
    return f"{_fmt(m.gain_eur, 2)} ({m.site}, +{m.markup_eur_per_kwh:g} EUR/kWh; {loss})"
