"""Stand-ins for a scenario in tests of the bidding dynamics: players that carry only an id and a
sale markup, as `best_responses` reads them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Player:
    id: str
    sell_markup_eur_per_kwh: float = 0.0


@dataclass(frozen=True)
class Game:
    communities: tuple[Player, ...]
