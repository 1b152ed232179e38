"""The non-cooperative readings of the market (docs/markets.md, "Non-cooperative"): the welfare
optimum is the price-taking variational equilibrium (no community lowers its own cost by deviating
alone at the agreed trade prices and DLMPs), and strategic bidders are followed by best responses to
an equilibrium or a cycle, with the price of anarchy of the worst."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from bidding_games import Game, Player

from p2pdoe.analysis.bidding import best_responses, price_of_anarchy
from p2pdoe.analysis.equilibrium import best_response_gaps
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import run_admm

WELFARE = load_scenario("default")


@pytest.mark.slow
def test_the_welfare_agreement_is_a_price_taking_equilibrium() -> None:
    """At the decentralized answer's prices every community's own best schedule is the agreed one
    (within cents); with a price left out, some community would gain by deviating."""
    sol = run_admm(WELFARE, Policy.DYNAMIC).solution
    gaps = best_response_gaps(WELFARE, sol)
    assert set(gaps) == set(WELFARE.ids)
    assert max(gaps.values()) < 0.05, gaps
    assert min(gaps.values()) > -0.05, gaps  # the agreed schedule is no better than a best response
    unpriced_trades = best_response_gaps(WELFARE, replace(sol, trade_price=np.zeros_like(sol.trade_price)))
    assert min(unpriced_trades.values()) > 100.0  # every community would trade otherwise
    free = np.zeros_like(sol.dlmp.export_voltage)
    unpriced_grid = replace(sol.dlmp, export_voltage=free, export_congestion=free, import_voltage=free,
                            import_congestion=free)  # fmt: skip
    assert max(best_response_gaps(WELFARE, replace(sol, dlmp=unpriced_grid)).values()) > 10.0


def test_the_centralized_optimum_is_one_too_and_so_is_standalone() -> None:
    for s in (WELFARE, load_scenario("default", {"market": {"design": "standalone"}})):
        gaps = best_response_gaps(s, solve_centralized(s, Policy.DYNAMIC))
        assert max(abs(g) for g in gaps.values()) < 0.05, gaps


# --- strategic bidders on games whose equilibria are known -------------------------------------------


def _cleared(costs: dict[str, float]) -> Any:
    rows = [SimpleNamespace(id=i, cost_eur=c) for i, c in costs.items()]
    return SimpleNamespace(communities=rows, totals=SimpleNamespace(cost_eur=sum(costs.values())))


def test_a_dominant_markup_is_every_players_equilibrium() -> None:
    """Each player's money falls with its own markup whatever the other does (a prisoner's dilemma
    in money): both bid the most, after one round that moves and one that does not."""
    solves: list[tuple[float, float]] = []

    def market(g: Any) -> Any:
        a, b = (p.sell_markup_eur_per_kwh for p in g.communities)
        solves.append((a, b))
        return _cleared({"a": 10 - 60 * a + 100 * b, "b": 10 - 60 * b + 100 * a})

    found = best_responses(Game((Player("a"), Player("b"))), market, grid=(0.0, 0.05))  # type: ignore[arg-type]
    assert found.equilibrium
    assert found.profiles == ({"a": 0.05, "b": 0.05},)
    assert found.sweeps == 2
    assert found.solves == len(set(solves))  # each profile cleared once
    # both honest would cost each 10; both at 0.05 costs each 12: strategy loses the pair 4 of 20
    assert found.outcomes[0].totals.cost_eur == pytest.approx(24.0)


def test_matching_pennies_has_no_pure_equilibrium_and_its_cycle_is_reported() -> None:
    """a gains by matching b's markup, b by differing from a's: best responses go round for ever."""

    def market(g: Any) -> Any:
        a, b = (p.sell_markup_eur_per_kwh for p in g.communities)
        same = a == b
        return _cleared({"a": 0.0 if same else 1.0, "b": 1.0 if same else 0.0})

    found = best_responses(Game((Player("a"), Player("b"))), market, grid=(0.0, 0.01))  # type: ignore[arg-type]
    assert not found.equilibrium
    assert found.profiles == ({"a": 0.0, "b": 0.01}, {"a": 0.01, "b": 0.0})


def test_the_price_of_anarchy_is_the_optimal_saving_over_the_equilibriums() -> None:
    assert price_of_anarchy(100.0, 80.0) == pytest.approx(1.25)
    assert price_of_anarchy(100.0, 100.0) == 1.0
    assert price_of_anarchy(100.0, 0.0) is None
