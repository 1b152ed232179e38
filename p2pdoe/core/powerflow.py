"""AC power flow of a radial feeder by backward/forward sweep (constant-power loads).

Backward: branch currents are subtree sums of load currents (I_br = A.T I_load).
Forward: bus voltages drop along each path (V = V0 - A (Z * I_br)). Repeat until the largest
voltage change is below `tol_pu`. Vectorised over intervals: injections may be (N,) or (N, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from p2pdoe.core.network import Feeder, FloatArray

ComplexArray = npt.NDArray[np.complex128]


@dataclass(frozen=True)
class PowerFlowResult:
    """Solution of one sweep run; arrays shaped like the injections ((N,) or (N, T))."""

    converged: bool
    iterations: int
    max_mismatch_pu: float
    v_pu: FloatArray
    branch_p_kw: FloatArray
    branch_q_kvar: FloatArray
    branch_s_kva: FloatArray
    losses_kw: FloatArray
    losses_kvar: FloatArray

    def loading(self, rating_kva: FloatArray) -> FloatArray:
        """Branch apparent power over rating (NaN where unrated); shape like v_pu."""
        rating = rating_kva.reshape((-1,) + (1,) * (self.branch_s_kva.ndim - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(self.branch_s_kva / rating)


def run_power_flow(
    feeder: Feeder,
    p_inj_kw: FloatArray,
    q_inj_kvar: FloatArray,
    v0_pu: float = 1.0,
    tol_pu: float = 1e-10,
    max_iter: int = 100,
) -> PowerFlowResult:
    """Solve the AC power flow for net injections per bus (generation positive), kW / kvar."""
    s_base = feeder.s_base_kw
    s_inj = (np.asarray(p_inj_kw, dtype=float) + 1j * np.asarray(q_inj_kvar, dtype=float)) / s_base
    a = feeder.path_matrix
    z = (feeder.r_pu + 1j * feeder.x_pu).reshape((-1,) + (1,) * (s_inj.ndim - 1))
    v = np.full(s_inj.shape, v0_pu, dtype=complex)
    mismatch = np.inf
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        i_load = np.conj(-s_inj / v)
        i_branch = a.T @ i_load
        v_new = v0_pu - a @ (z * i_branch)
        mismatch = float(np.max(np.abs(v_new - v)))
        v = v_new
        if mismatch < tol_pu:
            break
    i_branch = a.T @ np.conj(-s_inj / v)
    return _result(feeder, v, i_branch, z, mismatch < tol_pu, iterations, mismatch)


def _result(
    feeder: Feeder,
    v: ComplexArray,
    i_branch: ComplexArray,
    z: ComplexArray,
    converged: bool,
    iterations: int,
    mismatch: float,
) -> PowerFlowResult:
    s_base = feeder.s_base_kw
    v_parent = v[feeder.parent]
    s_send = v_parent * np.conj(i_branch) * s_base
    root = feeder.root
    s_send[root] = 0.0
    loss = z * np.abs(i_branch) ** 2 * s_base
    loss[root] = 0.0
    return PowerFlowResult(
        converged=converged,
        iterations=iterations,
        max_mismatch_pu=mismatch,
        v_pu=np.abs(v),
        branch_p_kw=s_send.real,
        branch_q_kvar=s_send.imag,
        branch_s_kva=np.abs(s_send),
        losses_kw=loss.real.sum(axis=0),
        losses_kvar=loss.imag.sum(axis=0),
    )
