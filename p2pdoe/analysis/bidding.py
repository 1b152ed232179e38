"""The non-cooperative market with strategic bidders: each community chooses the markup it bids on
its sales (a linear term on them in its own problem, `CommunityData.sell_markup_eur_per_kwh`; its
money is unchanged) to lower its own money, knowing the welfare market clears on the bids. A pure
Nash equilibrium of that game, found by best responses over a grid of markups, and what it costs
against the price-taking optimum: the price of anarchy (docs/markets.md, "Non-cooperative").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results

MARKUP_GRID_EUR_PER_KWH = (0.0, 0.01, 0.02, 0.05)  # each community's choices (0: an honest bid)
MOVE_EUR = 0.01  # a community changes its bid only for a gain above a cent
MAX_SWEEPS = 10  # rounds of best responses, every community once per round


@dataclass(frozen=True)
class Bidding:
    """Where best responses led: a pure Nash equilibrium (one profile), or a cycle of them (the
    profile at the end of each round of it, in order)."""

    equilibrium: bool
    profiles: tuple[dict[str, float], ...]  # each community's bid markup, EUR/kWh
    outcomes: tuple[Results, ...]  # the market cleared on each profile's bids
    sweeps: int
    solves: int  # welfare problems solved (one per markup profile tried)

    def savings_eur(self, standalone: Results) -> list[float]:
        return [standalone.totals.cost_eur - r.totals.cost_eur for r in self.outcomes]


def best_responses(
    s: Scenario,
    solve: Callable[[Scenario], Results],
    grid: Sequence[float] = MARKUP_GRID_EUR_PER_KWH,
    max_sweeps: int = MAX_SWEEPS,
) -> Bidding:
    """Round-robin best responses from honest bids: each community in turn takes the markup of the
    grid that lowers its own money most, given the others' current ones. Ends at a round that moves
    no one (a pure Nash equilibrium of the grid game), at a round that ends where an earlier one did
    (a cycle), or after `max_sweeps` rounds (reported as a cycle of the rounds since the first)."""
    ids = [c.id for c in s.communities]
    cleared: dict[tuple[float, ...], Results] = {}

    def market(profile: dict[str, float]) -> Results:
        key = tuple(profile[i] for i in ids)
        if key not in cleared:
            bids = tuple(replace(c, sell_markup_eur_per_kwh=profile[c.id]) for c in s.communities)
            cleared[key] = solve(replace(s, communities=bids))
        return cleared[key]

    profile = dict.fromkeys(ids, 0.0)
    rounds: list[dict[str, float]] = []
    while len(rounds) < max_sweeps:
        for site in ids:
            profile = {**profile, site: _best_markup(site, profile, grid, market)}
        if rounds and profile == rounds[-1]:
            return Bidding(True, (profile,), (market(profile),), len(rounds) + 1, len(cleared))
        if profile in rounds:
            cycle = rounds[rounds.index(profile) :]
            return Bidding(False, tuple(cycle), tuple(map(market, cycle)), len(rounds) + 1, len(cleared))
        rounds.append(profile)
    return Bidding(False, tuple(rounds), tuple(map(market, rounds)), len(rounds), len(cleared))


def _best_markup(
    site: str,
    profile: dict[str, float],
    grid: Sequence[float],
    market: Callable[[dict[str, float]], Results],
) -> float:
    best, lowest = profile[site], money(market(profile), site)
    for markup in grid:
        cost = money(market({**profile, site: markup}), site)
        if cost < lowest - MOVE_EUR:
            best, lowest = markup, cost
    return best


def price_of_anarchy(optimal_saving_eur: float, equilibrium_saving_eur: float) -> float | None:
    """The optimum's saving over the equilibrium's (>= 1 when strategy costs welfare); None where the
    equilibrium saves nothing."""
    if equilibrium_saving_eur <= 0:
        return None
    return optimal_saving_eur / equilibrium_saving_eur


def money(r: Results, site: str) -> float:
    return next(c.cost_eur for c in r.communities if c.id == site)
