"""Comparison figures (PNG) of the policies' results: envelopes, voltages, trades, storage, prices.

`write_plots` takes the `Results` of any subset of policies ("none", "static", "dynamic", or
others such as "admm") and writes one PNG per figure; figures that need data that is absent
(the "dynamic" DLMPs, any battery) are skipped. Piecewise-constant series are drawn as steps
over each interval [t dt, (t+1) dt); states of charge are end-of-interval values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from p2pdoe.analysis.markets import DesignMetrics
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.results import CommunityResult, Results
from p2pdoe.report.feeder_layout import hops_from_root, laterals
from p2pdoe.report.table import POLICY_ORDER

DPI = 110
LIMIT_ROOM_PU = 0.006  # kept beyond a voltage limit for its label
SOC_EPS_KWH = 1e-6
COINCIDE_KW = 0.5  # series this close are drawn as one, the later dashed over the earlier
COINCIDE_REL = 0.005  # or this close, relative to the series' range
TWIN_DASHES = (0, (3.0, 3.0))  # gaps as long as the dashes: the line underneath shows through
_COLOURS = {"none": "tab:red", "static": "tab:blue", "dynamic": "tab:green", "admm": "tab:purple"}
_SPARE_COLOURS = ("tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")

Figure = Any  # matplotlib is untyped here (ignore_missing_imports)
Axes = Any


def write_plots(results: Mapping[str, Results], out_dir: Path) -> list[Path]:
    """Write the comparison figures as PNG into out_dir; return their paths."""
    if not results:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = _ordered(results)
    builders: list[tuple[str, Callable[[], Figure | None]]] = [
        ("envelopes.png", lambda: _envelopes_figure(ordered)),
        ("voltages.png", lambda: _voltages_figure(ordered)),
        ("trades.png", lambda: _trades_figure(ordered)),
        ("soc.png", lambda: _soc_figure(ordered)),
        ("dlmp.png", lambda: _dlmp_figure(ordered["dynamic"]) if "dynamic" in ordered else None),
        ("residuals.png", lambda: _residuals_figure(ordered)),
        ("loading.png", lambda: _loading_figure(ordered)),
        ("corners.png", lambda: _corners_figure(ordered)),
        ("voltage_map.png", lambda: _voltage_map_figure(ordered)),
    ]
    written: list[Path] = []
    for name, build in builders:  # one figure open at a time
        fig = build()
        if fig is None:
            continue
        path = out_dir / name
        try:
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------- helpers


def _ordered(results: Mapping[str, Results]) -> dict[str, Results]:
    """Known policies in the usual order, then any others by name."""
    known = [p for p in POLICY_ORDER if p in results]
    others = sorted(p for p in results if p not in POLICY_ORDER)
    return {p: results[p] for p in [*known, *others]}


def _colour(policy: str, ordered: Sequence[str]) -> str:
    if policy in _COLOURS:
        return _COLOURS[policy]
    spare = [p for p in ordered if p not in _COLOURS]
    return _SPARE_COLOURS[spare.index(policy) % len(_SPARE_COLOURS)]


def _hours(r: Results) -> FloatArray:
    """Interval start times in hours, plus the end of the horizon (T + 1 points)."""
    return np.arange(r.intervals + 1, dtype=float) * r.dt_h


def _steps(values: Sequence[float] | FloatArray) -> FloatArray:
    """A series with its last value repeated, for `steps-post` drawing against `_hours`."""
    v = np.asarray(values, dtype=float)
    return np.r_[v, v[-1:]] if v.size else v


def _time_label(r: Results) -> str:
    return f"time (h from {r.start})"


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(n / cols), cols


def _subplots(n: int, width: float, height: float, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """A grid of n axes sharing x (unused cells hidden), in reading order."""
    rows, cols = _grid(n)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(width * cols, height * rows + 0.8),
        sharex=True,
        sharey=sharey,
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _bottom_labels(axes: Sequence[Axes], label: str) -> None:
    """x label and tick labels on the lowest visible axes of each column."""
    cols = _grid(len(axes))[1]
    for ax in axes[-cols:]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel(label)


def _figure_legend(fig: Figure, axes: Sequence[Axes], max_cols: int = 6) -> None:
    """One legend below the figure, from the labelled artists of all axes (first label wins)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for h, lab in zip(handles, labels, strict=True):
            seen.setdefault(lab, h)
    if seen:
        ncols = min(len(seen), max_cols)
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center", ncols=ncols)


def _community(r: Results, cid: str) -> CommunityResult | None:
    return next((c for c in r.communities if c.id == cid), None)


def _community_ids(ordered: Mapping[str, Results]) -> list[str]:
    ids: list[str] = []
    for r in ordered.values():
        ids.extend(c.id for c in r.communities if c.id not in ids)
    return ids


def _first(ordered: Mapping[str, Results]) -> Results:
    return next(iter(ordered.values()))


# -------------------------------------------------------------------------------------------- envelopes


def _envelopes_figure(ordered: Mapping[str, Results]) -> Figure | None:
    ids = _community_ids(ordered)
    if not ids:
        return None
    ref = _first(ordered)
    twins = _coinciding(ordered, _envelope_series)
    fig, axes = _subplots(len(ids), 5.0, 3.0)
    for ax, cid in zip(axes, ids, strict=True):
        _envelope_axes(ax, cid, ordered, twins)
    _bottom_labels(axes, _time_label(ref))
    fig.suptitle(
        "Operating envelopes (thin step lines: lower and upper edge) and scheduled net injection "
        "(thick); export positive"
    )
    _figure_legend(fig, axes, max_cols=4)
    return fig


def _envelope_series(c: CommunityResult) -> list[float]:
    return [*c.envelope_lo_kw, *c.envelope_up_kw, *c.net_injection_kw]


def _coinciding(
    ordered: Mapping[str, Results], series: Callable[[CommunityResult], Sequence[float]]
) -> dict[str, str]:
    """policy -> an earlier policy whose series it matches in every community (within
    COINCIDE_KW, or COINCIDE_REL of the series' range), so that it is drawn dashed over it."""
    twins: dict[str, str] = {}
    names = list(ordered)
    for k, policy in enumerate(names):
        for earlier in names[:k]:
            if earlier not in twins and _same_series(ordered[policy], ordered[earlier], series):
                twins[policy] = earlier
                break
    return twins


def _same_series(a: Results, b: Results, series: Callable[[CommunityResult], Sequence[float]]) -> bool:
    if [c.id for c in a.communities] != [c.id for c in b.communities]:
        return False
    for ca, cb in zip(a.communities, b.communities, strict=True):
        x, y = np.asarray(series(ca), dtype=float), np.asarray(series(cb), dtype=float)
        if x.shape != y.shape:
            return False
        span = float(np.ptp(np.r_[x, y])) if x.size else 0.0
        if x.size and np.abs(x - y).max() > max(COINCIDE_KW, COINCIDE_REL * span):
            return False
    return True


def _policy_style(policy: str, twins: Mapping[str, str]) -> tuple[Any, str]:
    """(line style, label) of a policy: dashed, and saying so, when it coincides with another."""
    if policy in twins:
        return TWIN_DASHES, f"{policy} (dashed: = {twins[policy]})"
    return "-", policy


def _envelope_axes(ax: Axes, cid: str, ordered: Mapping[str, Results], twins: Mapping[str, str]) -> None:
    bus = None
    for policy, r in ordered.items():
        c = _community(r, cid)
        if c is None:
            continue
        bus, colour, t = c.bus, _colour(policy, list(ordered)), _hours(r)
        style, label = _policy_style(policy, twins)
        if len(ordered) == 1:  # one band alone: shading it cannot stack into an unexplained colour
            lo, up = _steps(c.envelope_lo_kw), _steps(c.envelope_up_kw)
            ax.fill_between(t, lo, up, step="post", color=colour, alpha=0.12, linewidth=0)
        for k, edge in enumerate((c.envelope_lo_kw, c.envelope_up_kw)):
            ax.plot(
                t,
                _steps(edge),
                drawstyle="steps-post",
                color=colour,
                linestyle=style,
                linewidth=1.4,
                label=f"{label}: envelope" if k == 0 else None,
            )
        ax.plot(
            t,
            _steps(c.net_injection_kw),
            drawstyle="steps-post",
            color=colour,
            linestyle=style,
            linewidth=2.2,
            label=f"{label}: net injection",
        )
    ax.axhline(0.0, color="black", linewidth=0.7)
    ax.set_title(f"{cid} (bus {bus})")
    ax.set_ylabel("power (kW)")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------- voltages


def _voltages_figure(ordered: Mapping[str, Results]) -> Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.0, 4.8), layout="constrained")
    _voltage_extremes_axes(left, ordered)
    _voltage_profile_axes(right, ordered)
    fig.suptitle("AC voltages of the scheduled operating point")
    return fig


def _band(ax: Axes, r: Results) -> None:
    """The voltage limits as dashed lines, each labelled inside the axes on the side away from the
    data (below vmax, above vmin), with room kept for the labels."""
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, r.feeder.vmin_pu - LIMIT_ROOM_PU), max(high, r.feeder.vmax_pu + LIMIT_ROOM_PU))
    for v, name, offset, va in (
        (r.feeder.vmin_pu, "vmin", 2, "bottom"),
        (r.feeder.vmax_pu, "vmax", -2, "top"),
    ):
        ax.axhline(v, color="black", linestyle="--", linewidth=0.9)
        ax.annotate(
            f"{name} {v:.3f}",
            (0.0, v),
            xycoords=("axes fraction", "data"),
            xytext=(3, offset),
            textcoords="offset points",
            ha="left",
            va=va,
            fontsize=8,
        )


def _voltage_extremes_axes(ax: Axes, ordered: Mapping[str, Results]) -> None:
    """Max (solid) and min (dash-dot) per policy; a policy that coincides with another is drawn thin
    and dotted over it, the other drawn thick to show around it."""
    ref = _first(ordered)
    twins = _coinciding(ordered, _envelope_series)
    for policy, r in ordered.items():
        v = np.asarray(r.ac_check.schedule.voltage_pu, dtype=float)
        colour, t = _colour(policy, list(ordered)), _hours(r)
        name = f"{policy} (= {twins[policy]})" if policy in twins else policy
        width = 2.8 if policy in twins.values() else 1.3
        styles = (":", ":") if policy in twins else ("-", "-.")
        for series, style, extreme in ((v.max(axis=1), styles[0], "max"), (v.min(axis=1), styles[1], "min")):
            ax.plot(
                t,
                _steps(series),
                drawstyle="steps-post",
                color=colour,
                ls=style,
                lw=width,
                label=f"{name} {extreme}",
            )
    _band(ax, ref)
    ax.set_title("Feeder minimum and maximum voltage per interval")
    ax.set_xlabel(_time_label(ref))
    ax.set_ylabel("voltage (p.u.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def _voltage_profile_axes(ax: Axes, ordered: Mapping[str, Results]) -> None:
    """Voltage against distance from the substation, one line per lateral from its branching bus,
    at the reference policy's highest (solid) and lowest (dash-dot) voltage intervals."""
    ref_name = "none" if "none" in ordered else next(iter(ordered))
    ref = ordered[ref_name]
    ref_v = np.asarray(ref.ac_check.schedule.voltage_pu, dtype=float)
    moments = ((int(ref_v.max(axis=1).argmax()), "-"), (int(ref_v.min(axis=1).argmin()), "-."))
    twins = _coinciding(ordered, _envelope_series)
    for policy, r in ordered.items():
        v = np.asarray(r.ac_check.schedule.voltage_pu, dtype=float)
        name = f"{policy} (= {twins[policy]})" if policy in twins else policy
        width = 2.8 if policy in twins.values() else 1.0 if policy in twins else 1.2  # a twin thin on top
        for t, style in moments:
            if t < len(v):  # a shorter horizon than the reference's leaves it out
                label = f"{name}, {t * r.dt_h:g} h"
                _lateral_lines(ax, r, v[t], (_colour(policy, list(ordered)), style, width), label)
    _lateral_ends(ax, ref, ref_v[moments[0][0]])
    _band(ax, ref)
    (t_high, _), (t_low, _) = moments
    ax.set_title(
        f"Voltage along each lateral at the intervals where '{ref_name}' has its highest"
        f"\n({t_high * ref.dt_h:g} h, solid) and lowest ({t_low * ref.dt_h:g} h, dash-dot) voltage",
        fontsize=10,
    )
    ax.set_xlabel("branches from the substation")
    ax.set_ylabel("voltage (p.u.)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2)


def _lateral_lines(ax: Axes, r: Results, v: FloatArray, look: tuple[str, str, float], label: str) -> None:
    """One line per lateral (gid "lateral:" and its buses), the first one labelled; `look`: colour,
    line style and width."""
    hops, index = hops_from_root(r.feeder), {b: k for k, b in enumerate(r.feeder.bus_ids)}
    colour, style, width = look
    for k, path in enumerate(laterals(r.feeder)):
        ax.plot(
            [hops[b] for b in path],
            [v[index[b]] for b in path],
            color=colour,
            linestyle=style,
            marker=".",
            markersize=4,
            linewidth=width,
            label=label if k == 0 else None,
            gid="lateral:" + ",".join(map(str, path)),
        )


def _lateral_ends(ax: Axes, r: Results, v: FloatArray) -> None:
    """Each lateral's last bus named at its end; ends at the same distance named one above the other."""
    hops, index = hops_from_root(r.feeder), {b: k for k, b in enumerate(r.feeder.bus_ids)}
    ends = sorted((hops[p[-1]], v[index[p[-1]]], p[-1]) for p in laterals(r.feeder))
    for k, (x, y, end) in enumerate(ends):
        same_place = k > 0 and ends[k - 1][0] == x
        ax.annotate(
            f"bus {end}",
            (x, y),
            xytext=(3, 5 if same_place else -1),
            textcoords="offset points",
            fontsize=7,
            va="center",
        )


# ---------------------------------------------------------------------------------------------- loading


def _loading_figure(ordered: Mapping[str, Results]) -> Figure | None:
    """Branch loading in % of rating (AC, scheduled operating point): the most loaded branch per
    interval for each policy, and the reference policy's most loaded branches over time."""
    if not any(_loading(r).size for r in ordered.values()):
        return None
    ref_name = "none" if "none" in ordered else next(iter(ordered))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.0, 4.8), layout="constrained")
    twins = _coinciding(ordered, lambda c: c.net_injection_kw)
    for policy, r in ordered.items():
        style, label = _policy_style(policy, twins)
        t, worst = _hours(r), _loading(r).max(axis=1)
        left.plot(
            t,
            _steps(worst),
            drawstyle="steps-post",
            color=_colour(policy, list(ordered)),
            ls=style,
            label=label,
        )
    left.set_title("Most loaded branch per interval")
    _top_branches(right, ordered[ref_name], ref_name)
    for ax in (left, right):
        ax.axhline(100.0, color="black", linestyle="--", linewidth=0.9, label="rating")
        ax.set_xlabel(_time_label(ordered[ref_name]))
        ax.set_ylabel("loading (% of rating)")
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Branch loading against rating, AC power flow of the scheduled operating point")
    return fig


def _loading(r: Results) -> FloatArray:
    return np.asarray(r.ac_check.schedule.loading_pct, dtype=float).reshape(r.intervals, -1)


def _top_branches(ax: Axes, r: Results, name: str, count: int = 5) -> None:
    loading, t = _loading(r), _hours(r)
    for k in np.argsort(loading.max(axis=0))[::-1][:count]:
        rating = r.feeder.rating_kva[k]
        rated = f"{rating:,.0f} kVA" if rating is not None else "no rating"
        ax.plot(t, _steps(loading[:, k]), drawstyle="steps-post", label=f"{r.feeder.branches[k]} ({rated})")
    ax.set_title(f"The {count} most loaded branches under '{name}'")


# ---------------------------------------------------------------------------------------------- corners


def _corners_figure(ordered: Mapping[str, Results]) -> Figure:
    """The envelopes' safety claim: voltages with every community at the upper edge of its envelope
    (all exporting their most: the highest voltage) and at the lower edge (the lowest voltage)."""
    ref = _first(ordered)
    fig, ax = plt.subplots(figsize=(11.0, 4.8), layout="constrained")
    twins = _coinciding(ordered, _envelope_series)
    for policy, r in ordered.items():
        style, label = _policy_style(policy, twins)
        colour, t = _colour(policy, list(ordered)), _hours(r)
        upper = np.asarray(r.ac_check.upper_corner.voltage_pu, dtype=float).max(axis=1)
        lower = np.asarray(r.ac_check.lower_corner.voltage_pu, dtype=float).min(axis=1)
        for values, width, corner in ((upper, 1.6, "upper corner: max"), (lower, 0.9, "lower corner: min")):
            ax.plot(
                t,
                _steps(values),
                drawstyle="steps-post",
                color=colour,
                ls=style,
                lw=width,
                label=f"{label}, {corner}",
            )
    _band(ax, ref)
    ax.set_title(
        "AC voltages at the envelopes' corners: every community at the upper edge of its envelope"
        "\n(thick: the highest bus) or at the lower edge (thin: the lowest bus), against the limits",
        fontsize=10,
    )
    ax.set_xlabel(_time_label(ref))
    ax.set_ylabel("voltage (p.u.)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------ voltage map


def _voltage_map_figure(ordered: Mapping[str, Results]) -> Figure:
    """Bus x time AC voltages per policy, buses lateral by lateral; beyond the limits in solid colours."""
    ref = _first(ordered)
    fig, axes = _subplots(len(ordered), 5.0 if len(ordered) > 1 else 9.0, 3.6)
    cmap = plt.get_cmap("RdBu_r").with_extremes(over="magenta", under="black")
    image = None
    for ax, (policy, r) in zip(axes, ordered.items(), strict=True):
        image = _voltage_map_axes(ax, r, cmap)
        ax.set_title(policy)
    _bottom_labels(axes, _time_label(ref))
    fig.colorbar(
        image,
        ax=axes,
        extend="both",
        shrink=0.8,
        label="voltage (p.u.)",
    )
    fig.suptitle(
        "AC voltage by bus and interval (scheduled operating point), buses lateral by lateral"
        "\nmagenta: above vmax, black: below vmin"
    )
    return fig


def _voltage_map_axes(ax: Axes, r: Results, cmap: Any) -> Any:
    order = _buses_by_lateral(r)
    index = {b: k for k, b in enumerate(r.feeder.bus_ids)}
    v = np.asarray(r.ac_check.schedule.voltage_pu, dtype=float)[:, [index[b] for b in order]]
    image = ax.imshow(
        v.T,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=cmap,
        vmin=r.feeder.vmin_pu,
        vmax=r.feeder.vmax_pu,
        extent=(0.0, r.intervals * r.dt_h, -0.5, len(order) - 0.5),
    )
    starts = _lateral_starts(r, order)
    for k in starts[1:]:
        ax.axhline(k - 0.5, color="white", linewidth=1.2)
    ax.set_yticks(starts, [f"bus {order[k]}" for k in starts], fontsize=7)
    return image


def _buses_by_lateral(r: Results) -> list[int]:
    """Each lateral's buses after its branching bus (the main line with the substation)."""
    paths = laterals(r.feeder)
    return [*paths[0], *(b for path in paths[1:] for b in path[1:])]


def _lateral_starts(r: Results, order: Sequence[int]) -> list[int]:
    paths = laterals(r.feeder)
    return [0, *(order.index(path[1]) for path in paths[1:])]


# ----------------------------------------------------------------------------------------------- trades


def _trade_series(r: Results) -> tuple[FloatArray, FloatArray]:
    """(energy kWh, volume-weighted mean price EUR/kWh or NaN without trades) per interval."""
    energy = np.zeros(r.intervals)
    value = np.zeros(r.intervals)
    for tr in r.trades:
        energy[tr.interval] += tr.kw * r.dt_h
        value[tr.interval] += tr.kw * r.dt_h * tr.price_eur_per_kwh
    price = np.full(r.intervals, np.nan)
    traded = energy > 0
    price[traded] = value[traded] / energy[traded]
    return energy, price


def _trades_figure(ordered: Mapping[str, Results]) -> Figure:
    ref = _first(ordered)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11.0, 7.0), sharex=True, layout="constrained")
    n = len(ordered)
    for k, (policy, r) in enumerate(ordered.items()):
        energy, price = _trade_series(r)
        centres = (np.arange(r.intervals) + 0.5) * r.dt_h
        width = 0.8 * r.dt_h / n
        colour = _colour(policy, list(ordered))
        top.bar(
            centres + (k - (n - 1) / 2) * width,
            energy,
            width=width,
            color=colour,
            label=f"{policy} ({energy.sum():,.0f} kWh)",
        )
        bottom.plot(centres, price, color=colour, marker="o", markersize=3.5, linewidth=1.2, label=policy)
    top.set_title("P2P energy traded per interval")
    top.set_ylabel("energy (kWh)")
    top.legend(fontsize=8)
    bottom.set_title("Volume-weighted mean P2P price (intervals without trades left out)")
    bottom.set_ylabel("price (EUR/kWh)")
    bottom.set_xlabel(_time_label(ref))
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return fig


# -------------------------------------------------------------------------------------------------- soc


def _has_storage(cid: str, ordered: Mapping[str, Results]) -> bool:
    for r in ordered.values():
        c = _community(r, cid)
        if c is not None and c.soc_kwh and max(abs(x) for x in c.soc_kwh) > SOC_EPS_KWH:
            return True
    return False


def _soc_figure(ordered: Mapping[str, Results]) -> Figure | None:
    ids = [cid for cid in _community_ids(ordered) if _has_storage(cid, ordered)]
    if not ids:
        return None
    ref = _first(ordered)
    twins = _coinciding(ordered, lambda c: c.soc_kwh)
    fig, axes = _subplots(len(ids), 5.0, 2.8)
    for ax, cid in zip(axes, ids, strict=True):
        bus = None
        for policy, r in ordered.items():
            c = _community(r, cid)
            if c is None:
                continue
            bus, ends = c.bus, (np.arange(r.intervals) + 1.0) * r.dt_h
            style, label = _policy_style(policy, twins)
            colour = _colour(policy, list(ordered))
            ax.plot(ends, c.soc_kwh, color=colour, ls=style, lw=1.6, marker=".", ms=4, label=label)
        ax.set_title(f"{cid} (bus {bus})")
        ax.set_ylabel("state of charge (kWh)")
        ax.set_ylim(bottom=0.0)
        ax.grid(alpha=0.3)
    _bottom_labels(axes, _time_label(ref) + ", end of interval")
    fig.suptitle("Battery state of charge")
    _figure_legend(fig, axes)
    return fig


# ------------------------------------------------------------------------------------------------- dlmp


def _dlmp_figure(r: Results) -> Figure | None:
    if not r.dlmp:
        return None
    fig, axes = _subplots(len(r.dlmp), 5.0, 2.8, sharey=True)
    t = _hours(r)
    buses = {c.id: c.bus for c in r.communities}
    for ax, d in zip(axes, r.dlmp, strict=True):
        ax.plot(
            t,
            _steps(d.export_eur_per_kwh),
            drawstyle="steps-post",
            color="tab:orange",
            label="export (UP capacity)",
        )
        ax.plot(
            t,
            _steps(d.import_eur_per_kwh),
            drawstyle="steps-post",
            color="tab:blue",
            label="import (LO capacity)",
        )
        ax.set_title(f"{d.id} (bus {buses.get(d.id, '?')})")
        ax.set_ylabel("DLMP (EUR/kWh)")
        ax.grid(alpha=0.3)
    _bottom_labels(axes, _time_label(r))
    fig.suptitle(f"Envelope-capacity DLMPs at each community's bus ('{r.envelope}' envelope)")
    _figure_legend(fig, axes)
    return fig


def _residuals_figure(ordered: Mapping[str, Results]) -> Figure | None:
    """ADMM residuals per iteration (log scale) with their stopping thresholds, and the adaptive
    penalty on a log axis with its changes marked; a penalty that never changed is only named."""
    runs = {name: r for name, r in ordered.items() if r.solver.residual_history}
    if not runs:
        return None
    name, r = next(iter(runs.items()))
    h = r.solver.residual_history or []
    k = np.array([p.iteration for p in h]) + 1
    rho = {"trades": [p.rho_trade for p in h], "envelopes": [p.rho_envelope for p in h]}
    adapted = any(len(set(v)) > 1 for v in rho.values())
    fig, axes = _subplots(2 if adapted else 1, 6.0 if adapted else 7.5, 3.6)
    _residual_axes(axes[0], k, h)
    title = f"{name}: {r.solver.status} after {r.solver.iterations} iterations"
    if adapted:
        _penalty_axes(axes[1], k, rho)
    else:
        fixed = ", ".join(f"{v[0]:.3g} {label}" for label, v in rho.items())
        title += f"\npenalty rho fixed, never adapted: {fixed} (EUR/kW²h)"
    axes[0].set_title(title, fontsize=10)
    _bottom_labels(axes, "iteration")
    return fig


_RESIDUAL_SERIES = {
    "trades": ("primal_trade_kw", "dual_trade_kw", "eps_trade_kw", "tab:blue"),
    "envelopes": ("primal_envelope_kw", "dual_envelope_kw", "eps_envelope_kw", "tab:green"),
}


def _residual_axes(ax: Axes, k: FloatArray, h: Sequence[Any]) -> None:
    for label, (primal, dual, eps, colour) in _RESIDUAL_SERIES.items():
        ax.semilogy(k, [getattr(p, primal) for p in h], color=colour, label=f"primal, {label}")
        ax.semilogy(k, [getattr(p, dual) for p in h], color=colour, ls="--", label=f"dual, {label}")
        ax.semilogy(k, [getattr(p, eps) for p in h], color=colour, ls=":", lw=1, label=f"tolerance, {label}")
    ax.set_ylabel("l2 residual (kW)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _penalty_axes(ax: Axes, k: FloatArray, rho: Mapping[str, Sequence[float]]) -> None:
    """rho per iteration as steps on a log axis, each change marked and counted in the legend."""
    for (label, values), colour in zip(rho.items(), ("tab:blue", "tab:green"), strict=True):
        v = np.asarray(values, dtype=float)
        changed = np.flatnonzero(np.diff(v)) + 1
        ax.step(k, v, where="post", color=colour, label=f"rho, {label} ({len(changed)} changes)")
        ax.plot(k[changed], v[changed], "o", color=colour, ms=4)
    ax.set_yscale("log")
    ax.set_ylabel("rho (EUR/kW²h)")
    ax.set_title("adaptive penalty (dots: where it changed)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_market_gains(designs: Sequence[DesignMetrics], out_dir: Path) -> Path:
    """Each community's gain over standalone, one group of bars per community, a bar per design
    (standalone itself gains nothing by definition and is left out)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sites = list(designs[0].gains_eur)
    designs = [d for d in designs if d.design != "standalone"]
    x = np.arange(len(sites))
    width = 0.8 / max(len(designs), 1)
    fig, ax = plt.subplots(figsize=(8.0, 4.0), layout="constrained")
    try:
        for k, d in enumerate(designs):
            gains = [d.gains_eur[s] for s in sites]
            ax.bar(x + (k - (len(designs) - 1) / 2) * width, gains, width, label=d.design)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, sites)
        ax.set_ylabel("gain over standalone (EUR per day)")
        ax.set_title("Each community's gain by market design")
        ax.legend(frameon=False)
        path = out_dir / "market_gains.png"
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
