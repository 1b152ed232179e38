"""The pure maths of one coupling family (coupling.py): the consensus step, the augmented term,
residuals with Boyd's sqrt(n) scaling and the adaptive rho."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from p2pdoe.core.agreement.coupling import (
    Agreed,
    Residuals,
    ResidualSums,
    augmented_linear,
    consensus_step,
    rebalanced_rho,
    residual_sums,
    residuals,
)

FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
RHO = st.floats(1e-6, 10.0)
ALPHA = st.floats(1.0, 1.9)


def vectors(n: int) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.float64, n, elements=FINITE)


def wire(a: np.ndarray) -> np.ndarray:
    """Through a message and back, as a peer receives a proposal."""
    return np.asarray(json.loads(json.dumps(a.tolist())), dtype=float)


# --- consensus_step ---------------------------------------------------------------------------


def test_without_relaxation_the_step_averages_and_moves_the_price_by_half_the_gap() -> None:
    a, b = np.array([4.0, -2.0, 0.0]), np.array([2.0, 2.0, 0.0])
    prev = Agreed(y=np.array([100.0, 100.0, 100.0]), price=np.array([0.5, -0.25, 1.0]))
    new = consensus_step(a, b, prev, rho=0.5, alpha=1.0)
    assert np.array_equal(new.y, [3.0, 0.0, 0.0])  # the previous y plays no part
    assert np.array_equal(new.price, [0.5 + 0.5 * 2.0 / 2, -0.25 + 0.5 * -4.0 / 2, 1.0])


@settings(max_examples=100, derandomize=True, database=None)
@given(data=st.data(), n=st.integers(1, 8), rho=RHO)
def test_without_relaxation_the_step_is_the_average(data: st.DataObject, n: int, rho: float) -> None:
    a, b, y, price = (data.draw(vectors(n)) for _ in range(4))
    new = consensus_step(a, b, Agreed(y, price), rho, 1.0)
    assert np.allclose(new.y, (a + b) / 2, rtol=1e-12, atol=1e-9)
    assert np.allclose(new.price, price + rho * (a - b) / 2, rtol=1e-12, atol=1e-9)


def test_over_relaxation_mixes_in_the_previous_agreement() -> None:
    a, b = np.array([1.0]), np.array([3.0])
    prev = Agreed(y=np.array([10.0]), price=np.array([0.0]))
    new = consensus_step(a, b, prev, rho=2.0, alpha=1.5)
    a_rel, b_rel = 1.5 * 1.0 - 0.5 * 10.0, 1.5 * 3.0 - 0.5 * 10.0  # -3.5, -0.5
    assert np.array_equal(new.y, [(a_rel + b_rel) / 2])
    assert np.array_equal(new.price, [2.0 * (a_rel - b_rel) / 2])


def test_agreement_is_a_fixed_point() -> None:
    y, price = np.array([1.25, -3.0]), np.array([0.1, 0.2])
    new = consensus_step(y.copy(), y.copy(), Agreed(y, price), rho=0.3, alpha=1.6)
    assert np.allclose(new.y, y, rtol=1e-15, atol=0.0)  # 1 - 1.6 is not exact in binary
    assert np.array_equal(new.price, price)


@settings(max_examples=100, derandomize=True, database=None)
@given(data=st.data(), n=st.integers(1, 8), rho=RHO, alpha=ALPHA)
def test_both_parties_get_bitwise_identical_agreements(
    data: st.DataObject, n: int, rho: float, alpha: float
) -> None:
    """Each party holds its own proposal as computed and the other's as received over the wire; both
    call the step in canonical order (buyer's copy first) and must agree bit for bit."""
    buyer_z, seller_z, y, price = (data.draw(vectors(n)) for _ in range(4))
    prev = Agreed(y, price)
    at_buyer = consensus_step(buyer_z, wire(seller_z), prev, rho, alpha)
    at_seller = consensus_step(wire(buyer_z), seller_z, Agreed(wire(y), wire(price)), rho, alpha)
    assert np.array_equal(at_buyer.y, at_seller.y)
    assert np.array_equal(at_buyer.price, at_seller.price)


@settings(max_examples=100, derandomize=True, database=None)
@given(data=st.data(), n=st.integers(1, 8), rho=RHO, alpha=ALPHA)
def test_swapping_the_roles_negates_the_price_exactly(
    data: st.DataObject, n: int, rho: float, alpha: float
) -> None:
    """The canonical order matters only for the sign of the price: in IEEE arithmetic the mirrored
    step gives the same y and exactly the negated price."""
    a, b, y, price = (data.draw(vectors(n)) for _ in range(4))
    one = consensus_step(a, b, Agreed(y, price), rho, alpha)
    other = consensus_step(b, a, Agreed(y, -price), rho, alpha)
    assert np.array_equal(one.y, other.y)
    assert np.array_equal(one.price, -other.price)


def test_augmented_linear_signs() -> None:
    price, y = np.array([0.2, -0.1]), np.array([3.0, 4.0])
    assert np.array_equal(augmented_linear(price, y, 0.5, first=True), [0.2 - 1.5, -0.1 - 2.0])
    assert np.array_equal(augmented_linear(price, y, 0.5, first=False), [-0.2 - 1.5, 0.1 - 2.0])


# --- residuals --------------------------------------------------------------------------------


def test_residual_sums_by_hand() -> None:
    a, b = np.array([1.0, 3.0]), np.array([3.0, 1.0])
    prev = Agreed(y=np.array([0.0, 0.0]), price=np.array([0.0, 0.0]))
    new = consensus_step(a, b, prev, rho=2.0, alpha=1.0)  # y = (2, 2), price = (-2, 2)
    sums = residual_sums(a, b, prev, new, rho=2.0)
    assert sums == ResidualSums(primal=4.0, dual=16.0, proposals=20.0, agreed=16.0, prices=4.0, count=4)


def test_residual_sums_add_up() -> None:
    one = ResidualSums(1.0, 2.0, 3.0, 4.0, 5.0, 6)
    assert one + one == ResidualSums(2.0, 4.0, 6.0, 8.0, 10.0, 12)
    assert one + ResidualSums() == one


def test_residuals_use_sqrt_n_scaling() -> None:
    sums = ResidualSums(primal=9.0, dual=16.0, proposals=100.0, agreed=64.0, prices=4.0, count=16)
    r = residuals(sums, eps_abs_kw=0.5, eps_rel=0.01)
    assert r.primal_kw == 3.0
    assert r.dual_kw == 4.0
    assert r.eps_primal_kw == r.eps_dual_kw == pytest.approx(math.sqrt(16) * 0.5 + 0.01 * 10.0)
    assert r.relative_primal == pytest.approx(3.0 / 10.0)
    assert r.relative_dual == pytest.approx(4.0 / 2.0)


@pytest.mark.parametrize("count", [2, 8, 50, 200])
def test_the_absolute_tolerance_grows_with_the_square_root_of_the_count(count: int) -> None:
    r = residuals(ResidualSums(count=count), eps_abs_kw=0.003, eps_rel=0.0)
    assert r.eps_primal_kw == pytest.approx(0.003 * math.sqrt(count))


@pytest.mark.parametrize(
    ("primal", "dual", "converged"),
    [(0.0, 0.0, True), (2.0, 2.0, True), (2.0001, 1.0, False), (1.0, 2.0001, False), (3.0, 3.0, False)],
)
def test_converged_needs_both_residuals_within_the_bound(primal: float, dual: float, converged: bool) -> None:
    sums = ResidualSums(primal=primal**2, dual=dual**2, count=4)
    r = residuals(sums, eps_abs_kw=1.0, eps_rel=0.0)  # eps = sqrt(4) * 1 = 2 kW
    assert r.eps_primal_kw == 2.0
    assert r.converged is converged


def test_an_empty_family_is_converged() -> None:
    r = residuals(ResidualSums(), eps_abs_kw=0.003, eps_rel=0.0)
    assert r.converged
    assert r.relative_primal == 0.0
    assert r.relative_dual == 0.0


# --- adaptive rho -----------------------------------------------------------------------------


def with_ratio(relative_primal: float, relative_dual: float) -> Residuals:
    return Residuals(1.0, 1.0, 0.1, 0.1, relative_primal=relative_primal, relative_dual=relative_dual)


@pytest.mark.parametrize("factor", [1.0, 4.99, 1 / 4.99, 2.0, 0.5])
def test_rho_stays_within_the_threshold(factor: float) -> None:
    assert rebalanced_rho(0.25, with_ratio(factor**2, 1.0), threshold=5.0, max_factor=2.0) == 0.25


@pytest.mark.parametrize(
    ("factor", "max_factor", "expected"),
    [
        (6.0, 10.0, 0.25 * 6.0),  # beyond the threshold: rho times the factor
        (6.0, 2.0, 0.25 * 2.0),  # capped
        (1 / 6.0, 10.0, 0.25 / 6.0),
        (1 / 6.0, 2.0, 0.25 / 2.0),
        (1000.0, 2.0, 0.5),
        (5.0, 10.0, 0.25 * 5.0),  # the threshold itself counts as beyond
    ],
)
def test_rho_moves_beyond_the_threshold_by_at_most_max_factor(
    factor: float, max_factor: float, expected: float
) -> None:
    rho = rebalanced_rho(0.25, with_ratio(factor**2, 1.0), threshold=5.0, max_factor=max_factor)
    assert rho == pytest.approx(expected, rel=1e-12)


def test_rho_uses_the_square_root_of_the_relative_residual_ratio() -> None:
    # relative primal / relative dual = 49: factor 7, beyond a threshold of 5 (not 49 vs 5)
    assert rebalanced_rho(1.0, with_ratio(4.9, 0.1), threshold=5.0, max_factor=100.0) == pytest.approx(7.0)
    # a ratio of 20 is beyond 5 but its square root (4.47) is not: rho stays
    assert rebalanced_rho(1.0, with_ratio(2.0, 0.1), threshold=5.0, max_factor=100.0) == 1.0


@pytest.mark.parametrize(("relative_primal", "relative_dual"), [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_rho_stays_when_a_residual_is_zero(relative_primal: float, relative_dual: float) -> None:
    r = with_ratio(relative_primal, relative_dual)
    assert rebalanced_rho(0.25, r, threshold=5.0, max_factor=2.0) == 0.25


@settings(max_examples=200, derandomize=True, database=None)
@given(
    rho=st.floats(1e-6, 1e3),
    relative_primal=st.floats(1e-9, 1e9),
    relative_dual=st.floats(1e-9, 1e9),
    threshold=st.floats(1.01, 20.0),
    max_factor=st.floats(1.01, 20.0),
)
def test_rho_never_moves_more_than_max_factor(
    rho: float, relative_primal: float, relative_dual: float, threshold: float, max_factor: float
) -> None:
    new = rebalanced_rho(rho, with_ratio(relative_primal, relative_dual), threshold, max_factor)
    assert rho / max_factor * (1 - 1e-12) <= new <= rho * max_factor * (1 + 1e-12)
    factor = math.sqrt(relative_primal / relative_dual)
    if 1 / threshold < factor < threshold:
        assert new == rho
    elif factor >= threshold:
        assert new > rho
    else:
        assert new < rho
