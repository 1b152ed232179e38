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

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.shapley import Sampled, largest_core_excess, shapley_exact, shapley_sampled

__all__ = [
    "CoalitionValues",
    "Sampled",
    "largest_core_excess",
    "own_costs",
    "shapley_exact",
    "shapley_sampled",
    "within",
]
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

    def __init__(self, s: Scenario, solve: Solve, alone: Results | Mapping[str, float] | None = None):
        """`alone`: the day solved without any trading link (or its costs), if already at hand."""
        self.s = s
        self.solve = solve
        if not isinstance(alone, Mapping):
            alone = own_costs(alone or solve(within(s, frozenset())))
        self.alone = dict(alone)
        self._values: dict[Coalition, float] = {}

    def with_bids_of(self, s: Scenario, site: str) -> Callable[[Iterable[str]], float]:
        """v(S) when `site` bids as in `s`: a coalition without it keeps its value; one with it is
        solved under `s`. Alone, `site` trades with no one, so its bids change nothing there."""
        misled = CoalitionValues(s, self.solve, self.alone)
        return lambda members: misled(members) if site in set(members) else self(members)

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
