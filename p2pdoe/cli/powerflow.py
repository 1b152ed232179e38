"""`p2pdoe powerflow`: the AC power flow of a feeder at (a multiple of) its nominal load."""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pdoe.core.network import LinDistFlow
from p2pdoe.core.powerflow import run_power_flow
from p2pdoe.errors import P2PDoeError
from p2pdoe.io.scenarios import load_feeder


def powerflow_report(source: str, v0_pu: float, load_scale: float) -> dict[str, Any]:
    if not (0.5 <= v0_pu <= 1.5) or not np.isfinite(load_scale) or load_scale < 0:
        raise P2PDoeError("--v0-pu must lie in [0.5, 1.5] and --load-scale must be a non-negative number")
    feeder = load_feeder(source)
    p, q = -load_scale * feeder.load_kw, -load_scale * feeder.load_kvar
    pf = run_power_flow(feeder, p, q, v0_pu=v0_pu)
    ldf = LinDistFlow(feeder).voltages(v0_pu, p, q)
    jmin, jmax = int(np.argmin(pf.v_pu)), int(np.argmax(pf.v_pu))
    ids = [int(b) for b in feeder.bus_ids]
    return {
        "feeder": feeder.name,
        "converged": pf.converged,
        "iterations": pf.iterations,
        "v0_pu": v0_pu,
        "load_kw": float(load_scale * feeder.load_kw.sum()),
        "load_kvar": float(load_scale * feeder.load_kvar.sum()),
        "losses_kw": round(float(pf.losses_kw), 4),
        "losses_kvar": round(float(pf.losses_kvar), 4),
        "vmin_pu": round(float(pf.v_pu[jmin]), 6),
        "vmin_bus": ids[jmin],
        "vmax_pu": round(float(pf.v_pu[jmax]), 6),
        "vmax_bus": ids[jmax],
        "lindistflow_vmin_pu": round(float(ldf.min()), 6),
        "lindistflow_vmin_bus": ids[int(np.argmin(ldf))],
        "buses": [
            {"bus": b, "v_pu": round(float(v), 6), "lindistflow_v_pu": round(float(w), 6)}
            for b, v, w in zip(ids, pf.v_pu, ldf, strict=True)
        ],
    }


def print_powerflow(report: dict[str, Any]) -> None:
    print(
        f"feeder {report['feeder']}: {'converged' if report['converged'] else 'NOT converged'} "
        f"in {report['iterations']} sweeps"
    )
    print(
        f"load {report['load_kw']:.1f} kW / {report['load_kvar']:.1f} kvar, "
        f"losses {report['losses_kw']:.2f} kW / {report['losses_kvar']:.2f} kvar"
    )
    print(
        f"min voltage {report['vmin_pu']:.4f} p.u. at bus {report['vmin_bus']} "
        f"(LinDistFlow {report['lindistflow_vmin_pu']:.4f} at bus {report['lindistflow_vmin_bus']})"
    )
    print("bus  V AC (p.u.)  V LinDistFlow (p.u.)")
    for row in report["buses"]:
        print(f"{row['bus']:>3}  {row['v_pu']:.4f}       {row['lindistflow_v_pu']:.4f}")
