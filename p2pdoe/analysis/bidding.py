"""The non-cooperative market with strategic bidders: each community chooses the markup it bids on
its sales (a linear term on them in its own problem, `CommunityData.sell_markup_eur_per_kwh`; its
money is unchanged) to lower its own money, knowing the welfare market clears on the bids. A pure
Nash equilibrium of that game, found by best responses over a grid of markups, and what it costs
against the price-taking optimum: the price of anarchy (docs/markets.md, "Non-cooperative").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from p2pdoe.core.bidding import MARKUP_GRID_EUR_PER_KWH, MAX_SWEEPS, BestResponses, price_of_anarchy
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results

__all__ = ["MARKUP_GRID_EUR_PER_KWH", "Bidding", "best_responses", "money", "price_of_anarchy", "with_bids"]


@dataclass(frozen=True)
class Bidding:
    """Where best responses led: a pure Nash equilibrium (one profile), or a cycle of them (the
    profile at the end of each round of it, in order)."""

    equilibrium: bool
    profiles: tuple[dict[str, float], ...]  # each community's bid markup, EUR/kWh
    outcomes: tuple[Results, ...]  # the market cleared on each profile's bids
    sweeps: int
    solves: int  # welfare problems solved (one per markup profile tried)
    machine: BestResponses  # every profile's money, and the worst profile

    def savings_eur(self, standalone: Results) -> list[float]:
        return [standalone.totals.cost_eur - r.totals.cost_eur for r in self.outcomes]


def best_responses(
    s: Scenario,
    solve: Callable[[Scenario], Results],
    grid: Sequence[float] = MARKUP_GRID_EUR_PER_KWH,
    max_sweeps: int = MAX_SWEEPS,
) -> Bidding:
    """Round-robin best responses from honest bids (p2pdoe.core.bidding), each profile's market
    cleared by `solve` once."""
    machine = BestResponses(tuple(c.id for c in s.communities), tuple(grid), max_sweeps)
    cleared: dict[tuple[float, ...], Results] = {}
    while (profile := machine.wanted()) is not None:
        r = cleared[machine.key(profile)] = solve(with_bids(s, profile))
        machine.cleared(profile, {c.id: c.cost_eur for c in r.communities})
    found = machine.found
    assert found is not None
    outcomes = tuple(cleared[machine.key(p)] for p in found.profiles)
    return Bidding(found.equilibrium, found.profiles, outcomes, found.sweeps, len(cleared), machine)


def with_bids(s: Scenario, profile: Mapping[str, float]) -> Scenario:
    """`s` with each community bidding its markup of `profile` on its sales."""
    bids = tuple(replace(c, sell_markup_eur_per_kwh=profile.get(c.id, 0.0)) for c in s.communities)
    return replace(s, communities=bids)


def money(r: Results, site: str) -> float:
    return next(c.cost_eur for c in r.communities if c.id == site)
