"""The DSO's projection against the same QP solved by cvxpy and Clarabel, for dynamic boxes (one QP
per interval) and a static box (one QP over the day)."""

from __future__ import annotations

import copy

import cvxpy as cp
import numpy as np
import pytest
from agreement_helpers import scenario_from_spec
from test_agreement_safety import TOO_HEAVY

from p2pdoe.core.agreement import grid_solver
from p2pdoe.core.agreement.grid_solver import Bounds, GridSolver, is_safe
from p2pdoe.core.agreement.setup import envelope_bounds_of
from p2pdoe.core.envelope import SafeSet, safe_set
from p2pdoe.core.market import community_qps
from p2pdoe.core.network import FloatArray
from p2pdoe.core.solution import Policy
from p2pdoe.errors import InfeasibleError
from p2pdoe.io.scenarios import load_scenario

TOL_KW = 1e-5  # OSQP (polished) against Clarabel at tight tolerances (measured: 3e-7)


def _problem(policy: Policy) -> tuple[SafeSet, Bounds]:
    s = load_scenario("default")
    return safe_set(s), envelope_bounds_of(tuple(community_qps(s, policy)))


def _targets(b: Bounds) -> tuple[FloatArray, FloatArray]:
    """Boxes asking for more than the network allows: every site at its widest, plus noise."""
    rng = np.random.default_rng(7)
    noise = rng.uniform(-50.0, 50.0, size=(2, *b.lo_min.shape))
    return b.lo_min + noise[0], b.up_max + noise[1]


def _reference(safe: SafeSet, b: Bounds, t_lo: FloatArray, t_up: FloatArray, static: bool) -> FloatArray:
    shape = (b.lo_min.shape[0], 1) if static else b.lo_min.shape
    lo, up = cp.Variable(shape), cp.Variable(shape)
    ones = np.ones((1, b.lo_min.shape[1]))
    lo_t, up_t = (lo @ ones, up @ ones) if static else (lo, up)
    constraints = [
        safe.upper.g @ up_t <= safe.upper.h,
        safe.lower.g @ lo_t >= safe.lower.h,
        lo_t >= b.lo_min,
        lo_t <= b.lo_max,
        up_t >= b.up_min,
        up_t <= b.up_max,
    ]
    objective = cp.sum_squares(lo_t - t_lo) + cp.sum_squares(up_t - t_up)
    cp.Problem(cp.Minimize(objective), constraints).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    return np.stack([lo_t.value, up_t.value])


@pytest.mark.parametrize(
    ("policy", "split_from"),
    [(Policy.DYNAMIC, 1), (Policy.DYNAMIC, 10**6), (Policy.STATIC, 1)],
    ids=["dynamic, a QP per interval", "dynamic, one QP", "static"],
)
def test_the_projection_is_the_nearest_safe_box(
    policy: Policy, split_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grid_solver, "PER_INTERVAL_FROM_SITES", split_from)
    safe, b = _problem(policy)
    static = policy is Policy.STATIC
    t_lo, t_up = _targets(b)
    got = GridSolver(safe, b, static).solve(t_lo, t_up, accurate=True)
    want = _reference(safe, b, t_lo, t_up, static)
    assert np.abs(np.stack([got.lo, got.up]) - want).max() < TOL_KW
    assert is_safe(safe, got.lo, got.up, tol_kw=0.0)
    assert np.abs(got.up - t_up).max() > 10.0  # the network binds: the targets were not safe


def test_the_first_interval_no_box_can_serve_is_named() -> None:
    heavy_late = {"kind": "values", "values": [0.1, 0.1, 1, 1]}  # too heavy from interval 2 on
    spec = copy.deepcopy(TOO_HEAVY)
    for c in spec["communities"]:
        c["fixed_load"]["profile"] = heavy_late
    s = scenario_from_spec(spec)
    b = envelope_bounds_of(tuple(community_qps(s, Policy.DYNAMIC)))
    with pytest.raises(InfeasibleError, match=r"no envelope box .* \(first at interval 2\)"):
        GridSolver(safe_set(s), b, static=False)
