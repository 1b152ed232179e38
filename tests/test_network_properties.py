"""Property tests of LinDistFlow and the AC sweep on random radial feeders.

The DSO's safe set rests on two facts (FORMULATION.md, p2pdoe/core/envelope.py): LinDistFlow is lossless
(branch flow = net consumption of the subtree) and monotone (R, X, subtree incidence >= 0), so a box of
envelopes is safe for every point inside it iff it is safe at its two corners. These tests check the facts
on random trees, and the conclusion on the default scenario's granted envelopes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdoe.core.network import Feeder, LinDistFlow
from p2pdoe.core.powerflow import run_power_flow

BASE_MVA, BASE_KV = 10.0, 12.66
PROPS = settings(max_examples=60, deadline=None)


@dataclass(frozen=True)
class Case:
    feeder: Feeder
    rng: np.random.Generator  # seeded by hypothesis, for the numeric arrays


@st.composite
def radial_feeders(draw: st.DrawFn, min_bus: int = 2, max_bus: int = 30) -> Case:
    """A random tree: bus k's parent drawn from 0..k-1 (before relabelling), random r, x in p.u.

    Bus indices are then shuffled, so the root is not always index 0 and parents do not always precede
    their children; bus numbers are random distinct positive integers.
    """
    n = draw(st.integers(min_bus, max_bus))
    parent_tree = [0] + [draw(st.integers(0, k - 1)) for k in range(1, n)]
    impedance = st.floats(1e-4, 0.05, allow_nan=False, allow_infinity=False)
    r = [0.0] + [draw(impedance) for _ in range(1, n)]
    x = [0.0] + [draw(impedance) for _ in range(1, n)]
    perm = np.array(draw(st.permutations(range(n))), dtype=np.int64)  # tree node k -> array index perm[k]
    ids = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    parent = np.empty(n, dtype=np.int64)
    r_pu = np.empty(n)
    x_pu = np.empty(n)
    for k in range(n):
        parent[perm[k]] = perm[parent_tree[k]]
        r_pu[perm[k]], x_pu[perm[k]] = r[k], x[k]
    seed = draw(st.integers(0, 2**32 - 1))
    feeder = Feeder(
        name="random",
        base_mva=BASE_MVA,
        base_kv=BASE_KV,
        bus_ids=np.asarray(ids, dtype=np.int64),
        root=int(perm[0]),
        parent=parent,
        r_pu=r_pu,
        x_pu=x_pu,
        load_kw=np.zeros(n),
        load_kvar=np.zeros(n),
        rating_kva=np.full(n, np.nan),
    )
    return Case(feeder, np.random.default_rng(seed))


def _subtrees(f: Feeder) -> list[set[int]]:
    """subtree[k]: bus k and every bus downstream of it, computed by walking parent pointers."""
    out: list[set[int]] = [set() for _ in range(f.n_bus)]
    for i in range(f.n_bus):
        k = i
        while True:
            out[k].add(i)
            if k == f.root:
                break
            k = int(f.parent[k])
    return out


def _non_root(f: Feeder) -> np.ndarray:
    return np.array([k for k in range(f.n_bus) if k != f.root], dtype=np.int64)


# --- topology and matrices ----------------------------------------------------------------------------


@PROPS
@given(radial_feeders())
def test_matrices_match_the_tree(case: Case) -> None:
    f = case.feeder
    model = LinDistFlow(f)
    sub = _subtrees(f)
    r, x = model.r_matrix, model.x_matrix
    s = model.subtree.toarray()
    assert sorted(f.order.tolist()) == list(range(f.n_bus))
    assert int(f.order[0]) == f.root
    assert sorted(f.branches.tolist()) == _non_root(f).tolist()
    np.testing.assert_array_equal(r, r.T)
    np.testing.assert_array_equal(x, x.T)
    assert np.all(r >= 0)
    assert np.all(x >= 0)
    assert np.all(s >= 0)
    for k in range(f.n_bus):
        expected_row = np.zeros(f.n_bus)
        if k != f.root:
            expected_row[list(sub[k])] = 1.0
        np.testing.assert_array_equal(s[k], expected_row)
    for i in range(f.n_bus):
        for j in range(f.n_bus):
            shared = [k for k in _non_root(f) if i in sub[k] and j in sub[k]]
            assert r[i, j] == pytest.approx(float(f.r_pu[shared].sum()), rel=1e-12, abs=1e-15)
            assert x[i, j] == pytest.approx(float(f.x_pu[shared].sum()), rel=1e-12, abs=1e-15)


# --- a. LinDistFlow is lossless -----------------------------------------------------------------------


@PROPS
@given(radial_feeders())
def test_lindistflow_is_lossless(case: Case) -> None:
    f, rng = case.feeder, case.rng
    model = LinDistFlow(f)
    load = rng.uniform(0.0, 500.0, f.n_bus)
    injection = rng.uniform(0.0, 500.0, f.n_bus) * (rng.random(f.n_bus) < 0.5)
    p_inj = injection - load
    flows = model.branch_flows_kw(p_inj)
    assert flows.shape == (f.n_bus,)
    assert flows[f.root] == 0.0
    below = _non_root(f)
    out_of_root = [k for k in below if f.parent[k] == f.root]
    # Everything below the substation is served through the root's branches, with no losses.
    total = float(load[below].sum() - injection[below].sum())
    assert float(flows[out_of_root].sum()) == pytest.approx(total, abs=1e-8)
    sub = _subtrees(f)
    for k in below:
        assert flows[k] == pytest.approx(-float(p_inj[list(sub[k])].sum()), abs=1e-8)
        # Conservation at bus k: in = own net consumption + out to children.
        children = [c for c in below if f.parent[c] == k]
        assert flows[k] == pytest.approx(-p_inj[k] + float(flows[children].sum()), abs=1e-8)


@PROPS
@given(radial_feeders(), st.integers(1, 6))
def test_lindistflow_vectorises_over_intervals(case: Case, t: int) -> None:
    f, rng = case.feeder, case.rng
    model = LinDistFlow(f)
    p = rng.uniform(-300.0, 300.0, (f.n_bus, t))
    q = rng.uniform(-100.0, 100.0, (f.n_bus, t))
    w = model.squared_voltages(1.02, p, q)
    flows = model.branch_flows_kw(p)
    assert w.shape == flows.shape == (f.n_bus, t)
    for i in range(t):
        np.testing.assert_allclose(w[:, i], model.squared_voltages(1.02, p[:, i], q[:, i]), rtol=1e-13)
        np.testing.assert_allclose(flows[:, i], model.branch_flows_kw(p[:, i]), rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(w[f.root], 1.02**2, rtol=1e-14)


# --- b. monotonicity ----------------------------------------------------------------------------------


@PROPS
@given(radial_feeders())
def test_injections_never_lower_voltage_nor_raise_flow(case: Case) -> None:
    f, rng = case.feeder, case.rng
    model = LinDistFlow(f)
    p = rng.uniform(-500.0, 500.0, f.n_bus)
    q = rng.uniform(-200.0, 200.0, f.n_bus)
    extra = rng.uniform(0.0, 300.0, f.n_bus) * (rng.random(f.n_bus) < 0.6)
    extra_q = rng.uniform(0.0, 100.0, f.n_bus) * (rng.random(f.n_bus) < 0.6)
    w0 = model.squared_voltages(1.0, p, q)
    w1 = model.squared_voltages(1.0, p + extra, q)
    w2 = model.squared_voltages(1.0, p + extra, q + extra_q)
    assert np.all(w1 >= w0 - 1e-12)
    assert np.all(w2 >= w1 - 1e-12)
    f0, f1 = model.branch_flows_kw(p), model.branch_flows_kw(p + extra)
    assert np.all(f1 <= f0 + 1e-9)
    # Strict where it must be: an injection at a non-root bus raises its own voltage.
    k = int(rng.choice(_non_root(f)))
    bump = np.zeros(f.n_bus)
    bump[k] = 100.0
    assert model.squared_voltages(1.0, p + bump, q)[k] > w0[k]
    assert model.branch_flows_kw(p + bump)[k] == pytest.approx(f0[k] - 100.0, abs=1e-9)


# --- c. a box is safe iff its corners are -------------------------------------------------------------


@PROPS
@given(radial_feeders(min_bus=3), st.integers(1, 5))
def test_every_point_in_a_box_lies_between_the_corners(case: Case, n_comm: int) -> None:
    f, rng = case.feeder, case.rng
    model = LinDistFlow(f)
    buses = rng.choice(_non_root(f), size=min(n_comm, f.n_bus - 1), replace=False)
    lo = rng.uniform(-800.0, 400.0, buses.size)
    up = lo + rng.uniform(0.0, 800.0, buses.size) * (rng.random(buses.size) < 0.9)  # some zero-width boxes
    bg_p = rng.uniform(0.0, 300.0, f.n_bus)
    bg_q = rng.uniform(0.0, 100.0, f.n_bus)

    def state(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = -bg_p.copy()
        p[buses] += x
        return model.squared_voltages(1.0, p, -bg_q), model.branch_flows_kw(p)

    w_up, flow_up = state(up)
    w_lo, flow_lo = state(lo)
    points = [rng.uniform(lo, up) for _ in range(8)]
    points += [np.where(rng.random(buses.size) < 0.5, lo, up) for _ in range(8)]  # vertices
    points += [(lo + up) / 2]
    for x in points:
        assert np.all(lo <= x)
        assert np.all(x <= up)
        w, flow = state(x)
        assert np.all(w_lo - 1e-12 <= w)
        assert np.all(w <= w_up + 1e-12)
        assert np.all(flow_up - 1e-9 <= flow)
        assert np.all(flow <= flow_lo + 1e-9)
        v = np.sqrt(w)
        assert np.all(np.sqrt(w_lo) - 1e-12 <= v)
        assert np.all(v <= np.sqrt(w_up) + 1e-12)


# --- d. AC against LinDistFlow ------------------------------------------------------------------------


@PROPS
@given(radial_feeders(), st.booleans())
def test_ac_close_to_lindistflow_for_light_load(case: Case, with_generation: bool) -> None:
    f, rng = case.feeder, case.rng
    model = LinDistFlow(f)
    p = -rng.uniform(0.0, 100.0, f.n_bus)
    q = -rng.uniform(0.0, 50.0, f.n_bus)
    if with_generation:
        p += rng.uniform(0.0, 100.0, f.n_bus) * (rng.random(f.n_bus) < 0.3)
    # "Light": scale so that LinDistFlow moves no voltage by more than 0.08 p.u.
    spread = float(np.max(np.abs(model.voltages(1.0, p, q) - 1.0)))
    scale = min(1.0, 0.08 / spread) if spread > 0 else 1.0
    p, q = p * scale, q * scale
    pf = run_power_flow(f, p, q, v0_pu=1.0)
    v_lin = model.voltages(1.0, p, q)
    assert pf.converged
    assert pf.v_pu.shape == (f.n_bus,)
    assert pf.v_pu[f.root] == pytest.approx(1.0, abs=1e-12)
    assert np.max(np.abs(pf.v_pu - v_lin)) <= 0.02
    # Exact DistFlow: w_j = w_i - 2(rP + xQ) + (r^2 + x^2) l with P, Q including losses downstream, so
    # the lossless LinDistFlow voltage is an upper bound on the AC voltage (r, x >= 0).
    assert np.all(pf.v_pu <= v_lin + 1e-9)
    assert float(pf.losses_kw) >= 0.0
    assert float(pf.losses_kvar) >= 0.0
    below = _non_root(f)
    out_of_root = [k for k in below if f.parent[k] == f.root]
    # Power balance at the substation: it supplies the net load below it plus the losses.
    supplied = float(pf.branch_p_kw[out_of_root].sum())
    assert supplied == pytest.approx(-float(p[below].sum()) + float(pf.losses_kw), abs=1e-6)


@PROPS
@given(radial_feeders(), st.integers(2, 4))
def test_ac_vectorised_matches_columns(case: Case, t: int) -> None:
    f, rng = case.feeder, case.rng
    p = -rng.uniform(0.0, 30.0, (f.n_bus, t))
    q = -rng.uniform(0.0, 15.0, (f.n_bus, t))
    pf = run_power_flow(f, p, q, v0_pu=1.01)
    assert pf.converged
    assert pf.v_pu.shape == (f.n_bus, t)
    assert pf.losses_kw.shape == (t,)
    for i in range(t):
        one = run_power_flow(f, p[:, i], q[:, i], v0_pu=1.01)
        np.testing.assert_allclose(pf.v_pu[:, i], one.v_pu, atol=1e-9)
        assert float(pf.losses_kw[i]) == pytest.approx(float(one.losses_kw), abs=1e-7)


# --- the default scenario's granted envelopes ---------------------------------------------------------


@pytest.fixture(scope="module")
def granted() -> tuple:
    from p2pdoe.core.solution import Policy
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.reference.centralized import solve_centralized

    s = load_scenario("default")
    sol = solve_centralized(s, Policy.DYNAMIC)
    lo = np.array([sc["lo"] for sc in sol.schedules])
    up = np.array([sc["up"] for sc in sol.schedules])
    return s, lo, up


def test_granted_boxes_satisfy_the_corner_rows(granted: tuple) -> None:
    from p2pdoe.core.envelope import safe_set

    s, lo, up = granted
    safe = safe_set(s)
    assert lo.shape == up.shape == (len(s.communities), s.horizon)
    assert np.all(lo <= up + 1e-6)
    assert np.all(safe.upper.g @ up <= safe.upper.h + 1e-6)
    assert np.all(safe.lower.g @ lo >= safe.lower.h - 1e-6)


def test_every_point_in_the_granted_boxes_is_network_safe(granted: tuple) -> None:
    from p2pdoe.analysis.network_check import lindistflow_state
    from p2pdoe.core.envelope import grid_view

    s, lo, up = granted
    view = grid_view(s)
    up = np.maximum(up, lo)  # solver round-off
    rng = np.random.default_rng(20260621)
    ranges = [c.reactive_range_kvar() for c in s.communities]
    q_min = np.array([r[0] for r in ranges])
    q_max = np.array([r[1] for r in ranges])
    assert np.all(q_min <= q_max)
    shape = lo.shape
    cases = [(up, q_max), (lo, q_min)]  # the two corners
    for _ in range(25):
        x = rng.uniform(lo, up)
        if rng.random() < 0.5:  # a random vertex of every interval's box
            x = np.where(rng.random(shape) < 0.5, lo, up)
        cases.append((x, rng.uniform(q_min, q_max)))
    v_low = s.vmin_pu + s.vmin_margin_pu - 1e-6
    v_high = s.vmax_pu - s.vmax_margin_pu + 1e-6
    max_loading = 100.0 * (1.0 - s.rating_margin) + 1e-4
    for x, q in cases:
        st_ = lindistflow_state(view, x, q)
        assert st_.voltage_violations == 0
        assert st_.thermal_violations == 0
        v = np.array(st_.voltage_pu)
        assert v.shape == (s.horizon, s.feeder.n_bus)
        assert v.min() >= v_low, (v.min(), st_.vmin_bus, st_.vmin_interval)
        assert v.max() <= v_high, (v.max(), st_.vmax_bus, st_.vmax_interval)
        assert st_.max_loading_pct <= max_loading, st_.max_loading_branch
