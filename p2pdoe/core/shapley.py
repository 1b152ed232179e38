"""Shapley values of a coalition game and its core, pure: exact by enumeration, or by seeded sampling of
orders of arrival with the standard error of each mean (docs/markets.md). `v` maps a coalition (any
iterable of ids) to its value; a coalition of one or none is worth what `v` says (0 in our game).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pdoe.core.schemas.results import CoalitionValue, MarketOutcome

Coalition = frozenset[str]
Value = Callable[[Iterable[str]], float]


def coalitions_between(ids: Sequence[str], smallest: int, largest: int) -> list[Coalition]:
    """Every coalition of `smallest` to `largest` members, by size then in the order of `ids`."""
    return [
        frozenset(members)
        for size in range(smallest, largest + 1)
        for members in itertools.combinations(ids, size)
    ]


def needed_coalitions(sites: Sequence[str], exact_up_to: int, orders: int, seed: int) -> list[Coalition]:
    """The coalitions of two to n - 1 members whose values `shapley_outcome` needs: every one up to
    `exact_up_to` sites, else those the seeded orders of arrival pass through."""
    n = len(sites)
    if n <= exact_up_to:
        return coalitions_between(sites, 2, n - 1)
    seen: dict[Coalition, None] = {}
    for order in sampled_orders(sites, orders, seed):
        for size in range(2, n):
            seen.setdefault(frozenset(order[:size]), None)
    return sorted(seen, key=lambda c: (len(c), sorted(sites.index(s) for s in c)))


def sampled_orders(ids: Sequence[str], orders: int, seed: int) -> list[list[str]]:
    """`orders` random orders of arrival, drawn with `seed` (the same on every run)."""
    rng = np.random.default_rng(seed)
    return [[str(i) for i in rng.permutation(list(ids))] for _ in range(orders)]


def shapley_exact(ids: Sequence[str], v: Value) -> dict[str, float]:
    """phi_i = sum over S not holding i of |S|! (n - |S| - 1)! / n! (v(S + i) - v(S))."""
    n = len(ids)
    phi = dict.fromkeys(ids, 0.0)
    for i in ids:
        others = [j for j in ids if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for rest in itertools.combinations(others, size):
                phi[i] += weight * (v((*rest, i)) - v(rest))
    return phi


@dataclass(frozen=True)
class Sampled:
    phi: dict[str, float]
    standard_error: dict[str, float]  # of each mean, EUR
    orders: int


def shapley_sampled(ids: Sequence[str], v: Value, orders: int, seed: int) -> Sampled:
    """The mean marginal contribution over `orders` (at least 2) random orders of arrival (seeded)."""
    if orders < 2:
        raise ValueError("a sampling error needs at least 2 orders")
    marginal = {i: np.empty(orders) for i in ids}
    for k, order in enumerate(sampled_orders(ids, orders, seed)):
        joined: list[str] = []
        for i in order:
            before = v(joined)
            joined.append(i)
            marginal[i][k] = v(joined) - before
    errors = {i: float(m.std(ddof=1) / math.sqrt(orders)) for i, m in marginal.items()}
    return Sampled({i: float(m.mean()) for i, m in marginal.items()}, errors, orders)


def largest_core_excess(ids: Sequence[str], v: Value, gains: Mapping[str, float]) -> tuple[float, Coalition]:
    """max over coalitions S of v(S) - sum_{i in S} gain_i, and the coalition: <= 0 means no
    coalition would do better on its own (the allocation is in the core)."""
    best, worst = -math.inf, frozenset[str]()
    for size in range(1, len(ids) + 1):
        for members in itertools.combinations(ids, size):
            excess = v(members) - sum(gains[i] for i in members)
            if excess > best:
                best, worst = excess, frozenset(members)
    return best, worst


def shapley_outcome(
    players: Sequence[str],
    alone: Mapping[str, float],
    costs: Mapping[Coalition, Mapping[str, float]],
    how: tuple[int, int, int],
    baseline_round: str,
    coalition_rounds: int,
) -> MarketOutcome:
    """Shapley's payoffs as results.json's market section. `alone`: each player's cost trading with
    no one (C0); `costs`: per coalition of two or more (the grand one included), each member's cost
    before payments to peers when only the coalition trades; `how`: (exact up to n players, sampled
    orders, seed). v(S) = sum over S of C0 - C(S); a player's money is C0 less its value."""
    values = {
        c: sum(alone[i] - member_costs[i] for i in players if i in c) for c, member_costs in costs.items()
    }

    def v(members: Iterable[str]) -> float:
        key = frozenset(members)
        return 0.0 if len(key) <= 1 else values[key]

    exact_up_to, orders, seed = how
    errors = None
    if len(players) <= exact_up_to:
        phi = shapley_exact(players, v)
    else:
        sampled = shapley_sampled(players, v, orders, seed)
        phi, errors = sampled.phi, sampled.standard_error
    before = dict(costs[frozenset(players)])
    return MarketOutcome(
        design="shapley",
        baseline_round=baseline_round,
        payment_round=None,
        status="converged",
        iterations=coalition_rounds,
        weights={},
        baseline_cost_eur=dict(alone),
        cost_before_payments_eur=before,
        payments=[],
        net_payment_eur={s: alone[s] - phi[s] - before[s] for s in players},
        gains_eur=phi,
        coalitions=[
            CoalitionValue(members=[s for s in players if s in c], value_eur=x) for c, x in values.items()
        ],
        sampling_error_eur=errors,
    )
