"""Strategic bidders' best responses, a pure machine (docs/markets.md, "Non-cooperative").

Each community chooses the markup it bids on its sales from a grid (0: an honest bid) to lower its
own money, given the others' bids; the market clears on the bids. Round-robin best responses start
from honest bids: each community in turn takes the markup that lowers its money most (by more than
a cent), given the others' current ones. They end at a round that moves no one (a pure Nash
equilibrium of the grid game), at a round that ends where an earlier one did (a cycle), or after
`max_sweeps` rounds (reported as a cycle of the rounds since the first).

The machine asks for one clearing at a time (`wanted`) and is told each community's money in it
(`cleared`); it asks for each profile once. In-process a solve answers it
(p2pdoe.analysis.bidding); over MQTT the coordinator runs a round per profile and reads the money
from the sites' reports (p2pdoe.core.coordinator.cooperative).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

from p2pdoe.core.schemas.results import MarketOutcome

MARKUP_GRID_EUR_PER_KWH = (0.0, 0.01, 0.02, 0.05)  # each community's choices (0: an honest bid)
MOVE_EUR = 0.01  # a community changes its bid only for a gain above a cent
MAX_SWEEPS = 10  # rounds of best responses, every community once per round

Profile = dict[str, float]  # each community's sale markup, EUR/kWh


@dataclass(frozen=True)
class Found:
    """Where best responses led: an equilibrium (one profile) or a cycle (the profile at the end
    of each round of it, in order)."""

    equilibrium: bool
    profiles: tuple[Profile, ...]
    sweeps: int


@dataclass
class BestResponses:
    players: tuple[str, ...]
    grid: tuple[float, ...] = MARKUP_GRID_EUR_PER_KWH
    max_sweeps: int = MAX_SWEEPS
    money: dict[tuple[float, ...], dict[str, float]] = field(default_factory=dict)  # per profile cleared
    found: Found | None = None
    _pending: Profile | None = None
    _steps: Generator[Profile, None, None] | None = None

    def wanted(self) -> Profile | None:
        """The next profile to clear; None once best responses have ended (`found`)."""
        if self._steps is None:
            self._steps = self._dynamics()
        if self._pending is None and self.found is None:
            self._pending = next(self._steps, None)
        return self._pending

    def cleared(self, profile: Mapping[str, float], money: Mapping[str, float]) -> None:
        """Each community's money in the market cleared on `profile`."""
        self.money[self.key(profile)] = {p: money[p] for p in self.players}
        if self._pending is not None and self.key(self._pending) == self.key(profile):
            self._pending = None

    def key(self, profile: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(profile[p] for p in self.players)

    def total(self, profile: Mapping[str, float]) -> float:
        """Every community's money together in the market cleared on `profile`."""
        return sum(self.money[self.key(profile)].values())

    def worst(self) -> Profile:
        """The profile where best responses ended (of a cycle, the one at which the communities'
        money together is highest, the first on a tie)."""
        assert self.found is not None
        totals = [self.total(p) for p in self.found.profiles]
        return self.found.profiles[totals.index(max(totals))]

    def _dynamics(self) -> Generator[Profile, None, None]:
        profile = dict.fromkeys(self.players, 0.0)
        rounds: list[Profile] = []
        while len(rounds) < self.max_sweeps:
            for site in self.players:
                best = yield from self._best_markup(site, profile)
                profile = {**profile, site: best}
            if rounds and profile == rounds[-1]:
                self.found = Found(True, (profile,), len(rounds) + 1)
                return
            if profile in rounds:
                self.found = Found(False, tuple(rounds[rounds.index(profile) :]), len(rounds) + 1)
                return
            rounds.append(profile)
        self.found = Found(False, tuple(rounds), len(rounds))

    def _best_markup(self, site: str, profile: Profile) -> Generator[Profile, None, float]:
        yield from self._needed(profile)
        best, lowest = profile[site], self.money[self.key(profile)][site]
        for markup in self.grid:
            trial = {**profile, site: markup}
            yield from self._needed(trial)
            cost = self.money[self.key(trial)][site]
            if cost < lowest - MOVE_EUR:
                best, lowest = markup, cost
        return best

    def _needed(self, profile: Profile) -> Generator[Profile, None, None]:
        while self.key(profile) not in self.money:
            yield profile


def price_of_anarchy(optimal_saving_eur: float, equilibrium_saving_eur: float) -> float | None:
    """The optimum's saving over the equilibrium's (>= 1 when strategy costs welfare); None where the
    equilibrium saves nothing."""
    if equilibrium_saving_eur <= 0:
        return None
    return optimal_saving_eur / equilibrium_saving_eur


def bidding_outcome(
    machine: BestResponses,
    alone: Mapping[str, float],
    in_force: Mapping[str, tuple[float, float]],
    baseline_round: str,
) -> MarketOutcome:
    """The noncooperative design as results.json's market section. `alone`: each community's money
    trading with no one (C0); `in_force`: its (money, net paid to peers) in the round cleared on the
    profile in force. The price of anarchy compares with the honest profile's saving (the welfare
    optimum's, cleared first)."""
    found = machine.found
    assert found is not None
    players = machine.players
    c0 = sum(alone[p] for p in players)
    honest = dict.fromkeys(players, 0.0)
    saving = c0 - sum(in_force[p][0] for p in players)
    return MarketOutcome(
        design="noncooperative",
        baseline_round=baseline_round,
        payment_round=None,
        status="equilibrium" if found.equilibrium else "cycle",
        iterations=found.sweeps,
        weights={},
        baseline_cost_eur={p: alone[p] for p in players},
        cost_before_payments_eur={p: in_force[p][0] - in_force[p][1] for p in players},
        payments=[],
        net_payment_eur={p: in_force[p][1] for p in players},
        gains_eur={p: alone[p] - in_force[p][0] for p in players},
        equilibrium=found.equilibrium,
        bids=[dict(b) for b in found.profiles],
        bids_in_force=machine.worst(),
        profiles_cleared=len(machine.money),
        price_of_anarchy=price_of_anarchy(c0 - machine.total(honest), saving),
    )
