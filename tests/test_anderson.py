"""Anderson acceleration of the agreement: the weights, the safeguard, and the round with it on.

The weights and the safeguard are checked on affine maps, where the fixed point has a closed form;
the round with acceleration against the centralized optimum and against the round without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from p2pdoe.core.agreement.anderson import Accelerator, anderson_weights, mixed
from p2pdoe.core.agreement.coupling import Agreed
from p2pdoe.core.scenario import AndersonSettings, Scenario
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import AdmmRun, run_admm

SCHEDULE_KW = 1.0
OBJECTIVE_REL = 1e-3


def _affine_map(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F(x) = A x + b with A symmetric, eigenvalues in [0.5, 0.99]: slow plain iteration. Returns
    A, b and the fixed point (I - A)^-1 b."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(rng.uniform(0.5, 0.99, n)) @ q.T
    b = rng.normal(size=n)
    return a, b, np.linalg.solve(np.eye(n) - a, b)


def _states(settings: AndersonSettings | None, steps: int, seed: int = 0) -> list[np.ndarray]:
    """The states after each step, mixed as the participants mix them."""
    a, b, _ = _affine_map(8, seed)
    accelerator = None if settings is None else Accelerator(settings)
    history: list[Agreed] = []
    x = np.zeros(8)
    states = []
    for _ in range(steps):
        f = a @ x + b
        history = [*history[-(settings.memory if settings else 0) :], Agreed(f, np.zeros(8))]
        w = None if accelerator is None else accelerator.weights(x, f)
        x = f if w is None else mixed(history, w).y
        states.append(x)
    return states


def _iterate(settings: AndersonSettings | None, steps: int, seed: int = 0) -> list[float]:
    """Distance to the fixed point after each step."""
    fixed = _affine_map(8, seed)[2]
    return [float(np.linalg.norm(x - fixed)) for x in _states(settings, steps, seed)]


def test_weights_sum_to_one_and_minimise_the_mixed_residual() -> None:
    rng = np.random.default_rng(1)
    residuals = rng.normal(size=(20, 4))  # g_0 .. g_3
    y, s = np.diff(residuals, axis=1), rng.normal(size=(20, 3))
    w = anderson_weights(y, s, residuals[:, -1], 0.0)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    best = np.linalg.norm(residuals @ w)
    for _ in range(200):  # no other affine combination mixes the residuals smaller
        other = w + rng.normal(scale=0.1, size=4)
        other[-1] += 1.0 - other.sum()
        assert np.linalg.norm(residuals @ other) >= best - 1e-12


def test_anderson_reaches_the_fixed_point_of_an_affine_map_in_far_fewer_steps() -> None:
    plain = _iterate(None, 3000)
    fast = _iterate(AndersonSettings(memory=8), 300)
    steps = [next(k for k, e in enumerate(errors) if e < 1e-8) for errors in (plain, fast)]
    assert steps[1] * 5 < steps[0], steps


def test_a_mixed_step_the_safeguard_refuses_is_undone() -> None:
    """With a safeguard no mixed step passes, each is undone at the next step: the state goes back
    to the plain update of the state before it, so every other state is a plain iterate."""
    strict = AndersonSettings(memory=8, safeguard_factor=1e-12)
    plain = _states(None, 40)
    guarded = _states(strict, 60)
    # plain, mixed, undone (= the next plain iterate), then again from there
    assert all(np.array_equal(guarded[3 * i], plain[2 * i]) for i in range(20))
    assert all(np.array_equal(guarded[3 * i + 2], plain[2 * i + 1]) for i in range(20))
    assert not any(np.array_equal(guarded[3 * i + 1], p) for i in range(20) for p in plain)


def test_mixing_is_the_same_for_a_whole_array_and_for_its_rows() -> None:
    """The DSO mixes every coupling at once, a community its own rows: bit for bit the same."""
    rng = np.random.default_rng(2)
    history = [Agreed(rng.normal(size=(5, 24)), rng.normal(size=(5, 24))) for _ in range(4)]
    w = [0.3, -0.2, 0.6, 0.3]
    whole = mixed(history, w)
    row = mixed([Agreed(h.y[2:3], h.price[2:3]) for h in history], w)
    assert np.array_equal(whole.y[2:3], row.y)
    assert np.array_equal(whole.price[2:3], row.price)


@dataclass(frozen=True)
class Rounds:
    scenario: Scenario
    central: Solution
    plain: AdmmRun
    fast: AdmmRun


@pytest.fixture(scope="module")
def rounds() -> Rounds:
    fast_s = load_scenario("default", {"admm": {"anderson": {"memory": 10}}})
    return Rounds(
        scenario=fast_s,
        central=solve_centralized(fast_s, Policy.DYNAMIC),
        plain=run_admm(load_scenario("default"), Policy.DYNAMIC),
        fast=run_admm(fast_s, Policy.DYNAMIC),
    )


def test_anderson_round_takes_fewer_iterations(rounds: Rounds) -> None:
    assert rounds.fast.dso.status == "converged"
    assert rounds.fast.dso.iterations < rounds.plain.dso.iterations


def test_anderson_round_reaches_the_centralized_optimum(rounds: Rounds) -> None:
    central, run = rounds.central, rounds.fast
    for a, b in zip(central.schedules, run.solution.schedules, strict=True):
        for key in ("pv", "wd", "ch", "dis", "imp", "exp"):
            assert np.abs(a[key] - b[key]).max() <= SCHEDULE_KW, key
    gap = abs(run.solution.objective_eur - central.objective_eur)
    assert gap <= OBJECTIVE_REL * abs(central.objective_eur)


def test_both_copies_of_every_trade_stay_equal_under_mixing(rounds: Rounds) -> None:
    """A buyer's and a seller's agreed trade are computed apart; mixing keeps them identical."""
    s = rounds.scenario
    by_site = {c.site: c for c in rounds.fast.communities}
    for c, peers in zip(s.communities, s.market.peers, strict=True):
        mine = by_site[c.id]
        for k, m in enumerate(peers):
            theirs = by_site[s.ids[m]]
            j = s.market.peers[m].index(s.ids.index(c.id))
            assert np.array_equal(mine.agreed_buy_kw[k], theirs.agreed_sell_kw[j])
            assert np.array_equal(mine.buy_price[k], theirs.sell_price[j])
