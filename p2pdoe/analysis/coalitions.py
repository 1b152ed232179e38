"""Coalitions of communities: what each coalition saves by trading among its members, Shapley-value
payoffs (exact, or by seeded sampling of orders beyond a size), and how far an allocation of the
gains is from the core (docs/markets.md).

A coalition S trades over the links among its members only; every other community trades with no
one, and the whole feeder and its limits stay as they are. Its value is what its members save
together against trading alone:

    v(S) = sum_{i in S} (C0_i - C_i(S))

with C_i(S) community i's cost before any payment to peers in the welfare optimum of that problem
(payments among members cancel in the sum). A coalition of one trades with no one, so v({i}) = 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results

Coalition = frozenset[str]
Solve = Callable[[Scenario], Results]


def within(s: Scenario, members: Coalition) -> Scenario:
    """`s` with trading links only among `members`."""
    ids = s.ids
    peers = tuple(
        tuple(m for m in s.market.peers[c] if ids[m] in members) if ids[c] in members else ()
        for c in range(len(ids))
    )
    return replace(s, market=replace(s.market, peers=peers))


def own_costs(r: Results) -> dict[str, float]:
    """Each community's cost before any payment to peers."""
    return {c.id: c.cost_eur - c.cost_breakdown.p2p_net_eur for c in r.communities}


class CoalitionValues:
    """v(S) on demand, each coalition solved once (`solve`: e.g. the centralized welfare optimum)."""

    def __init__(self, s: Scenario, solve: Solve, alone: Results | None = None):
        """`alone`: the day solved without any trading link, if already at hand."""
        self.s = s
        self.solve = solve
        self.alone = own_costs(alone or solve(within(s, frozenset())))
        self._values: dict[Coalition, float] = {}

    @property
    def solves(self) -> int:
        return len(self._values)

    def __call__(self, members: Iterable[str]) -> float:
        key = frozenset(members)
        if len(key) <= 1:
            return 0.0
        if key not in self._values:
            costs = own_costs(self.solve(within(self.s, key)))
            self._values[key] = sum(self.alone[i] - costs[i] for i in key)
        return self._values[key]


def shapley_exact(ids: Sequence[str], v: Callable[[Iterable[str]], float]) -> dict[str, float]:
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


def shapley_sampled(
    ids: Sequence[str], v: Callable[[Iterable[str]], float], orders: int, seed: int
) -> Sampled:
    """The mean marginal contribution over `orders` (at least 2) random orders of arrival (seeded)."""
    if orders < 2:
        raise ValueError("a sampling error needs at least 2 orders")
    rng = np.random.default_rng(seed)
    marginal = {i: np.empty(orders) for i in ids}
    for k in range(orders):
        joined: list[str] = []
        for i in rng.permutation(list(ids)):
            before = v(joined)
            joined.append(str(i))
            marginal[str(i)][k] = v(joined) - before
    errors = {i: float(m.std(ddof=1) / math.sqrt(orders)) for i, m in marginal.items()}
    return Sampled({i: float(m.mean()) for i, m in marginal.items()}, errors, orders)


def largest_core_excess(
    ids: Sequence[str], v: Callable[[Iterable[str]], float], gains: Mapping[str, float]
) -> tuple[float, Coalition]:
    """max over coalitions S of v(S) - sum_{i in S} gain_i, and the coalition: <= 0 means no
    coalition would do better on its own (the allocation is in the core)."""
    best, worst = -math.inf, frozenset[str]()
    for size in range(1, len(ids) + 1):
        for members in itertools.combinations(ids, size):
            excess = v(members) - sum(gains[i] for i in members)
            if excess > best:
                best, worst = excess, frozenset(members)
    return best, worst
