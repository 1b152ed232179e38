"""Check operating points against the network limits, in AC (backward/forward sweep) and LinDistFlow.

An operating point is every community's net injection x and reactive injection q, shape (C, T),
on top of the background load of the network view (the scenario's, or the coordinator's).
"""

from __future__ import annotations

import numpy as np

from p2pdoe.core.envelope import GridView
from p2pdoe.core.network import FloatArray, LinDistFlow
from p2pdoe.core.powerflow import run_power_flow
from p2pdoe.core.schemas.results import NetworkState

VOLTAGE_TOL_PU = 1e-5
LOADING_TOL = 1e-4


def bus_injections(s: GridView, x_kw: FloatArray, q_kvar: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Net injections per bus (N, T): communities' x and q minus the background load."""
    p = -s.background_kw.copy()
    q = -s.background_kvar.copy()
    np.add.at(p, s.site_bus, x_kw)  # several communities may share a bus
    np.add.at(q, s.site_bus, q_kvar)
    return p, q


def ac_state(s: GridView, x_kw: FloatArray, q_kvar: FloatArray, dt_h: float) -> NetworkState:
    p, q = bus_injections(s, x_kw, q_kvar)
    pf = run_power_flow(s.feeder, p, q, v0_pu=s.v0_pu)
    loading = pf.loading(s.feeder.rating_kva)
    return _state(s, pf.converged, pf.v_pu, loading, float(pf.losses_kw.sum() * dt_h))


def lindistflow_state(s: GridView, x_kw: FloatArray, q_kvar: FloatArray) -> NetworkState:
    p, q = bus_injections(s, x_kw, q_kvar)
    model = LinDistFlow(s.feeder)
    v = model.voltages(s.v0_pu, p, q)
    flow = np.hypot(model.branch_flows_kw(p), model.branch_flows_kw(q))
    with np.errstate(invalid="ignore", divide="ignore"):
        loading = flow / s.feeder.rating_kva[:, None]
    return _state(s, True, v, loading, 0.0)


def _state(
    s: GridView, converged: bool, v: FloatArray, loading: FloatArray, losses_kwh: float
) -> NetworkState:
    ids = s.feeder.bus_ids
    jmin, tmin = np.unravel_index(int(np.argmin(v)), v.shape)
    jmax, tmax = np.unravel_index(int(np.argmax(v)), v.shape)
    load = np.nan_to_num(loading, nan=0.0)
    kl, tl = np.unravel_index(int(np.argmax(load)), load.shape)
    low = v < s.vmin_pu - VOLTAGE_TOL_PU
    high = v > s.vmax_pu + VOLTAGE_TOL_PU
    return NetworkState(
        converged=converged,
        vmin_pu=float(v[jmin, tmin]),
        vmin_bus=int(ids[jmin]),
        vmin_interval=int(tmin),
        vmax_pu=float(v[jmax, tmax]),
        vmax_bus=int(ids[jmax]),
        vmax_interval=int(tmax),
        max_loading_pct=float(100.0 * load[kl, tl]),
        max_loading_branch=s.feeder.branch_label(int(kl)) if kl != s.feeder.root else "-",
        max_loading_interval=int(tl),
        voltage_violations=int(np.count_nonzero(low | high)),
        thermal_violations=int(np.count_nonzero(load > 1.0 + LOADING_TOL)),
        losses_kwh=losses_kwh,
        voltage_pu=v.T.tolist(),
        loading_pct=(100.0 * load[s.feeder.branches]).T.tolist(),
    )
