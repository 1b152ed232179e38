"""Plots of the real-time day: measured injection against the published envelopes and the state of
charge per site; voltages from the AC power flow of the measured injections; settlements."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from p2pdoe.core.schemas.results import Results

Readings = Mapping[str, Sequence[tuple[datetime, float, float | None]]]


def write_realtime_plots(results: Results, readings: Readings, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        _injection(results, readings, out / "realtime_injection.png"),
        _voltages(results, out / "realtime_voltages.png"),
        _settlements(results, out / "realtime_settlements.png"),
    ]


def _hours_since(start: datetime, moments: Sequence[datetime]) -> np.ndarray:
    return np.array([(m - start).total_seconds() / 3600.0 for m in moments])


def _day_start(results: Results) -> datetime:
    return datetime.fromisoformat(results.start)


def _injection(results: Results, readings: Readings, path: Path) -> Path:
    rt = results.realtime
    assert rt is not None
    sites = sorted(readings)
    fig, axes = plt.subplots(
        len(sites), 1, figsize=(10, 2.2 * max(len(sites), 1)), sharex=True, squeeze=False
    )
    start = _day_start(results)
    for ax, site in zip(axes[:, 0], sites, strict=True):
        rows = readings[site]
        h = _hours_since(start, [r[0] for r in rows])
        ax.plot(h, [r[1] for r in rows], lw=0.7, color="tab:blue", label="measured p (kW)")
        t0 = [
            _hours_since(start, [datetime.fromisoformat(i.start.replace("Z", "+00:00"))])[0]
            for i in rt.intervals
        ]
        lo = [i.lo_kw.get(site, np.nan) for i in rt.intervals]
        up = [i.up_kw.get(site, np.nan) for i in rt.intervals]
        if t0:
            edges = [*t0, t0[-1] + results.dt_h]
            ax.stairs(up, edges, color="tab:red", lw=0.9, label="envelope")
            ax.stairs(lo, edges, color="tab:red", lw=0.9)
        soc = [r[2] for r in rows]
        if any(s is not None for s in soc):
            twin = ax.twinx()
            twin.plot(h, [np.nan if s is None else s for s in soc], lw=0.6, color="tab:green")
            twin.set_ylabel("SOC kWh", fontsize=7, color="tab:green")
        ax.set_ylabel(site, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("hours into the day (simulated)")
    fig.suptitle("measured net injection (export +) against the published envelopes; state of charge")
    return _save(fig, path)


def _voltages(results: Results, path: Path) -> Path:
    rt = results.realtime
    assert rt is not None
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ac = rt.measured_ac
    if ac is not None and ac.voltage_pu:
        v = np.array(ac.voltage_pu)
        x = np.arange(v.shape[0])
        ax.fill_between(x, v.min(axis=1), v.max(axis=1), alpha=0.3, label="range over buses")
        ax.axhline(results.feeder.vmin_pu, color="tab:red", lw=0.8, ls="--")
        ax.axhline(results.feeder.vmax_pu, color="tab:red", lw=0.8, ls="--", label="limits")
        ax.legend(fontsize=8)
    ax.set_xlabel("interval of the real-time day")
    ax.set_ylabel("voltage (p.u.)")
    ax.set_title("AC power flow of the measured mean injections")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _settlements(results: Results, path: Path) -> Path:
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
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
