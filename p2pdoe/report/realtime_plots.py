"""Plots of the real-time day, all against hours into the day: measured injection against the
envelope in force per site (the agreed one, and the default one where a site fell back to it, those
periods shaded, sustained violations shaded and readings outside the envelope marked), with the state
of charge of sites that have a battery; voltages from the AC power flow of the measured injections;
settlements.

The agreed envelope of an interval is the rolling round's (`realtime.intervals`), or where no rolling
round set it, the day-ahead agreement's (`communities[].envelope_*_kw`). The y range of an injection
panel is the measured data's and the envelopes' within ENVELOPE_VIEW data scales of the data (an
envelope edge far beyond the site's swing, such as a huge placeholder bound, is left off the panel and
named in it rather than allowed to flatten the data).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from p2pdoe.core.realtime.observer import outside_by_kw
from p2pdoe.core.schemas.results import Results

Readings = Mapping[str, Sequence[tuple[datetime, float, float | None]]]
Axes = Any  # matplotlib is untyped here (ignore_missing_imports)

SOC_EPS_KWH = 1e-6  # a site whose state of charge never leaves zero has no battery
ENVELOPE_VIEW = 50.0  # envelope edges within this many data scales of the data set the y range
MIN_SCALE_KW = 10.0  # the data scale assumed for a site whose injection hardly moves
MIN_SOC_SPAN_KWH = 1.0  # a state of charge that hardly moves is drawn on at least this span
Y_MARGIN = 0.08  # of the y range, above and below
FALLBACK_COLOUR = "tab:orange"
VIOLATION_COLOUR = "tab:red"


def write_realtime_plots(results: Results, readings: Readings, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        _save(injection_figure(results, readings), out / "realtime_injection.png"),
        _save(voltages_figure(results), out / "realtime_voltages.png"),
        _save(_settlements(results), out / "realtime_settlements.png"),
    ]


# ------------------------------------------------------------------------------------------ time


def _day_start(results: Results) -> datetime:
    return _moment(results.start)


def _moment(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _hours_since(start: datetime, moments: Sequence[datetime]) -> np.ndarray:
    return np.array([(m - start).total_seconds() / 3600.0 for m in moments])


def _hour_of(results: Results, iso: str) -> float:
    return float(_hours_since(_day_start(results), [_moment(iso)])[0])


# ------------------------------------------------------------------------------------- envelopes


@dataclass(frozen=True)
class SiteEnvelopes:
    """One site's envelopes per interval of the day (NaN where there is none)."""

    edges_h: np.ndarray  # interval boundaries, hours into the day (n + 1)
    agreed_lo: np.ndarray
    agreed_up: np.ndarray
    default_lo: np.ndarray
    default_up: np.ndarray
    fallbacks: list[tuple[float, float, str]]  # (from h, to h, the envelope in force instead)


def site_envelopes(results: Results, site: str, until_h: float) -> SiteEnvelopes:
    n = max(1, min(results.intervals, int(np.ceil(until_h / results.dt_h - 1e-9))))
    edges = np.arange(n + 1) * results.dt_h
    lo, up = _agreed(results, site, n)
    d_lo, d_up = _defaults(results, site, n)
    return SiteEnvelopes(edges, lo, up, d_lo, d_up, fallback_periods(results, site, until_h))


def _agreed(results: Results, site: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo, up = np.full(n, np.nan), np.full(n, np.nan)
    community = next((c for c in results.communities if c.id == site), None)
    if community is not None:  # the day-ahead agreement, where no rolling round replaced it
        lo[:] = community.envelope_lo_kw[:n]
        up[:] = community.envelope_up_kw[:n]
    assert results.realtime is not None
    for i in results.realtime.intervals:
        if i.interval < n and site in i.lo_kw:
            lo[i.interval], up[i.interval] = i.lo_kw[site], i.up_kw[site]
    return lo, up


def _defaults(results: Results, site: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    lo, up = np.full(n, np.nan), np.full(n, np.nan)
    runtime = results.runtime
    d = next((d for d in runtime.default_envelopes if d.id == site), None) if runtime else None
    if d is not None:  # its profile, or its one box all day
        lo_kw, up_kw = (d.lo_profile_kw or [d.lo_kw] * n)[:n], (d.up_profile_kw or [d.up_kw] * n)[:n]
        lo[: len(lo_kw)], up[: len(up_kw)] = lo_kw, up_kw
    return lo, up


def fallback_periods(results: Results, site: str, until_h: float) -> list[tuple[float, float, str]]:
    """Periods the site ran on another envelope than the agreed one, from the statuses heard."""
    assert results.realtime is not None
    events = sorted(
        (_hour_of(results, e.ts), e.envelope) for e in results.realtime.fallback_events if e.site == site
    )
    periods = []
    for (h, kind), (h_next, _) in zip(events, [*events[1:], (until_h, "")], strict=True):
        if kind != "dynamic" and h_next > h:
            periods.append((h, h_next, kind))
    return periods


def _envelope_at(env: SiteEnvelopes, hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The envelope in force at each moment: the default one in a fallback to it, else the agreed."""
    k = np.searchsorted(env.edges_h, hours, side="left") - 1  # a reading ends its step: judged in it
    inside = (k >= 0) & (k < len(env.agreed_lo))
    kk = np.clip(k, 0, len(env.agreed_lo) - 1)
    lo, up = np.where(inside, env.agreed_lo[kk], np.nan), np.where(inside, env.agreed_up[kk], np.nan)
    for h0, h1, kind in env.fallbacks:
        during = (hours > h0) & (hours <= h1)
        lo[during] = env.default_lo[kk[during]] if kind == "default" else np.nan
        up[during] = env.default_up[kk[during]] if kind == "default" else np.nan
    return lo, up


# ------------------------------------------------------------------------------------- injection


def injection_figure(results: Results, readings: Readings) -> Figure:
    assert results.realtime is not None
    sites = sorted(readings)
    fig, axes = plt.subplots(
        len(sites), 1, figsize=(10, 2.3 * max(len(sites), 1)), sharex=True, squeeze=False
    )
    for ax, site in zip(axes[:, 0], sites, strict=True):
        _injection_axes(ax, results, site, readings[site])
    axes[-1, 0].set_xlabel("hours into the day (simulated)")
    handles = _unique_handles(fig)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncols=4, fontsize=8)
    fig.suptitle("measured net injection (export +) against the envelope in force; state of charge")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def _injection_axes(ax: Axes, results: Results, site: str, rows: Sequence[Any]) -> None:
    h = _hours_since(_day_start(results), [r[0] for r in rows])
    p = np.array([r[1] for r in rows], dtype=float)
    until = float(h.max()) if h.size else results.dt_h
    env = site_envelopes(results, site, until)
    _shade_fallbacks(ax, env)
    _shade_violations(ax, results, site)
    ax.plot(h, p, lw=0.7, color="tab:blue", label="measured p")
    ax.stairs(env.agreed_up, env.edges_h, baseline=None, color="tab:red", lw=0.9, label="agreed envelope")
    ax.stairs(env.agreed_lo, env.edges_h, baseline=None, color="tab:red", lw=0.9)
    _draw_defaults(ax, env)
    _mark_outside(ax, h, p, env)
    ax.set_ylim(*injection_ylim(p, env))
    _name_edges_off_panel(ax, env)
    ax.set_ylabel(f"{site}\nkW", fontsize=8)
    ax.grid(alpha=0.3)
    soc = [r[2] for r in rows]
    if has_battery(soc):
        _soc_twin(ax, h, soc)


def _shade_fallbacks(ax: Axes, env: SiteEnvelopes) -> None:
    for h0, h1, kind in env.fallbacks:
        ax.axvspan(h0, h1, color=FALLBACK_COLOUR, alpha=0.15, lw=0, label="fallback period (shaded)")
        ax.annotate(kind, (h0, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                    textcoords="offset points", va="top", fontsize=6, color=FALLBACK_COLOUR)  # fmt: skip


def _draw_defaults(ax: Axes, env: SiteEnvelopes) -> None:
    """The default envelope, dashed, over exactly the periods a site fell back to it."""
    for h0, h1, kind in env.fallbacks:
        if kind != "default":
            continue
        for k in range(len(env.default_lo)):
            a, b = max(env.edges_h[k], h0), min(env.edges_h[k + 1], h1)
            if a < b:
                edges = [env.default_lo[k], env.default_up[k]]
                ax.hlines(
                    edges,
                    a,
                    b,
                    color=FALLBACK_COLOUR,
                    ls="--",
                    lw=1.0,
                    label="default envelope (in a fallback)",
                )


def _shade_violations(ax: Axes, results: Results, site: str) -> None:
    assert results.realtime is not None
    for v in results.realtime.envelope_violations.events:
        if v.site == site:
            h0, h1 = _hour_of(results, v.start), _hour_of(results, v.end)
            ax.axvspan(h0, h1, color=VIOLATION_COLOUR, alpha=0.25, lw=0, label="sustained violation")


def _mark_outside(ax: Axes, h: np.ndarray, p: np.ndarray, env: SiteEnvelopes) -> None:
    lo, up = _envelope_at(env, h)
    judged = np.isfinite(lo) & np.isfinite(up)
    outside = np.array(
        [j and outside_by_kw(x, a, b) > 0.0 for x, a, b, j in zip(p, lo, up, judged, strict=True)]
    )
    if outside.any():
        ax.plot(
            h[outside], p[outside], "x", color=VIOLATION_COLOUR, ms=4, label="reading outside the envelope"
        )


def injection_ylim(p: np.ndarray, env: SiteEnvelopes) -> tuple[float, float]:
    """The data's range and the envelopes' within ENVELOPE_VIEW data scales of it (the larger of
    its span and its largest magnitude), with a margin."""
    data = p[np.isfinite(p)]
    if not data.size:
        return -1.0, 1.0
    low, high = float(data.min()), float(data.max())
    reach = ENVELOPE_VIEW * max(high - low, float(np.abs(data).max()), MIN_SCALE_KW)
    edges = np.r_[env.agreed_lo, env.agreed_up, _defaults_shown(env)]
    near = edges[np.isfinite(edges) & (edges > low - reach) & (edges < high + reach)]
    if near.size:
        low, high = min(low, float(near.min())), max(high, float(near.max()))
    pad = Y_MARGIN * max(high - low, MIN_SCALE_KW)
    return low - pad, high + pad


def _name_edges_off_panel(ax: Axes, env: SiteEnvelopes) -> None:
    low, high = ax.get_ylim()
    edges = np.r_[env.agreed_lo, env.agreed_up]
    off = edges[np.isfinite(edges) & ((edges < low) | (edges > high))]
    if off.size:
        ax.annotate(f"envelope edge off the panel, up to {np.abs(off).max():,.0f} kW", (0.99, 0.97),
                    xycoords="axes fraction", ha="right", va="top", fontsize=6, color="tab:red")  # fmt: skip


def _defaults_shown(env: SiteEnvelopes) -> np.ndarray:
    if not any(kind == "default" for _, _, kind in env.fallbacks):
        return np.array([])
    return np.concatenate([env.default_lo, env.default_up])


def has_battery(soc: Sequence[float | None]) -> bool:
    return any(s is not None and abs(s) > SOC_EPS_KWH for s in soc)


def _soc_twin(ax: Axes, h: np.ndarray, soc: Sequence[float | None]) -> None:
    twin = ax.twinx()
    twin.plot(
        h, [np.nan if s is None else s for s in soc], lw=0.8, color="tab:green", label="state of charge"
    )
    twin.set_ylabel("SOC kWh", fontsize=7, color="tab:green")
    values = [s for s in soc if s is not None]
    middle, half = (max(values) + min(values)) / 2, max(max(values) - min(values), MIN_SOC_SPAN_KWH) / 2
    twin.set_ylim(middle - 1.1 * half, middle + 1.1 * half)
    twin.set_gid("soc")


def _unique_handles(fig: Figure) -> dict[str, Any]:
    """Every labelled artist of the figure (twins too), first label wins."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return seen


# -------------------------------------------------------------------------------------- voltages


def voltages_figure(results: Results) -> Figure:
    rt = results.realtime
    assert rt is not None
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ac = rt.measured_ac
    if ac is not None and ac.voltage_pu:
        _shade_day_events(ax, results, len(ac.voltage_pu) * results.dt_h)
        _voltage_range(ax, results, np.array(ac.voltage_pu))
    ax.set_xlabel("hours into the day (simulated)")
    ax.set_ylabel("voltage (p.u.)")
    ax.set_title("AC power flow of the measured mean injections, per interval")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _shade_day_events(ax: Axes, results: Results, until_h: float) -> None:
    """Within the day: where any site ran on a fallback envelope (one shade however many sites), and
    every sustained violation."""
    assert results.realtime is not None
    periods = [
        (max(h0, 0.0), h1)
        for site in sorted({e.site for e in results.realtime.fallback_events})
        for h0, h1, _ in fallback_periods(results, site, until_h)
        if h1 > 0.0
    ]
    for k, (h0, h1) in enumerate(merged(periods)):
        ax.axvspan(h0, h1, color=FALLBACK_COLOUR, alpha=0.15, lw=0,
                   label="a site on a fallback envelope" if k == 0 else None)  # fmt: skip
    for k, v in enumerate(results.realtime.envelope_violations.events):
        h0, h1 = _hour_of(results, v.start), _hour_of(results, v.end)
        ax.axvspan(
            h0, h1, color=VIOLATION_COLOUR, alpha=0.25, lw=0, label="sustained violation" if k == 0 else None
        )


def merged(periods: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of periods, as disjoint periods in order."""
    union: list[tuple[float, float]] = []
    for h0, h1 in sorted(periods):
        if union and h0 <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], h1))
        else:
            union.append((h0, h1))
    return union


def _voltage_range(ax: Axes, results: Results, v: np.ndarray) -> None:
    """Rows are the day's intervals from its first; the bus that sets each minimum is named."""
    edges = np.arange(v.shape[0] + 1) * results.dt_h
    ax.stairs(v.max(axis=1), edges, baseline=v.min(axis=1), fill=True, alpha=0.3, label="range over buses")
    ax.stairs(v.min(axis=1), edges, baseline=None, color="tab:blue", lw=1.2, label="minimum")
    for value, name in ((results.feeder.vmin_pu, "vmin"), (results.feeder.vmax_pu, "vmax")):
        ax.axhline(value, color="tab:red", lw=0.8, ls="--", label="limits" if name == "vmax" else None)
    _name_minimum(ax, results, v, edges)
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, results.feeder.vmin_pu - 0.005), max(high, results.feeder.vmax_pu + 0.005))
    ax.legend(fontsize=8, loc="lower right")


def _name_minimum(ax: Axes, results: Results, v: np.ndarray, edges: np.ndarray) -> None:
    t, b = np.unravel_index(int(v.argmin()), v.shape)
    buses = [results.feeder.bus_ids[int(k)] for k in v.argmin(axis=1)]
    setters = ", ".join(f"bus {bus} ({buses.count(bus)} intervals)" for bus in sorted(set(buses)))
    x = (edges[t] + edges[t + 1]) / 2
    ax.annotate(
        f"lowest {v[t, b]:.4f} p.u. at bus {results.feeder.bus_ids[int(b)]}, interval from {edges[t]:g} h"
        f"\nminimum set by {setters}",
        (x, v[t, b]),
        xytext=(0, -22),
        textcoords="offset points",
        fontsize=8,
        ha="left" if x < edges[-1] / 2 else "right",
        arrowprops={"arrowstyle": "->", "lw": 0.7},
    )


# ----------------------------------------------------------------------------------- settlements


def _settlements(results: Results) -> Figure:
    rt = results.realtime
    assert rt is not None
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in rt.settlements:
        totals[s.site]["P2P paid"] += s.p2p_paid_eur
        totals[s.site]["P2P received"] -= s.p2p_received_eur
        totals[s.site]["grid"] += s.grid_eur
    sites = sorted(totals)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = np.arange(len(sites))
    for k, part in enumerate(("P2P paid", "P2P received", "grid")):
        ax.bar(x + (k - 1) * 0.27, [totals[s][part] for s in sites], width=0.27, label=part)
    ax.set_xticks(x, sites, fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("EUR over the day (+ paid)")
    ax.set_title("settlements: P2P at the agreed prices, the rest with the grid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
