"""The noncooperative design's rounds at the coordinator, the pure parts (p2pdoe.core.bidding,
p2pdoe.core.coordinator.cooperative): a standalone round, then a trial round per bid profile the
best responses ask for, each profile once and each site bidding the markup the opening names for
it, then the round in force on the profile where they ended. On games whose equilibria are known
(a prisoner's dilemma in money, matching pennies), the rounds end where the in-process dynamics
do; a stage given up falls back to honest bids."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from bidding_games import Game, Player

from p2pdoe.analysis.bidding import best_responses
from p2pdoe.core.coordinator.cooperative import BIDDING, STANDALONE, WELFARE, Stages
from p2pdoe.core.schemas.results import CommunityResult, CostBreakdown
from p2pdoe.core.schemas.runtime import SiteReport

SITES = ("a", "b")
ALONE = {"a": 30.0, "b": 30.0}
Money = Callable[[Mapping[str, float]], dict[str, float]]


def _dilemma(bids: Mapping[str, float]) -> dict[str, float]:
    """Each one's money falls with its own markup whatever the other bids."""
    a, b = bids["a"], bids["b"]
    return {"a": 10 - 60 * a + 100 * b, "b": 10 - 60 * b + 100 * a}


def _pennies(bids: Mapping[str, float]) -> dict[str, float]:
    """a gains by matching b's markup, b by differing from a's."""
    same = bids["a"] == bids["b"]
    return {"a": 0.0 if same else 1.0, "b": 1.0 if same else 0.0}


def _report(site: str, money: float, p2p_net: float = 0.0) -> SiteReport:
    breakdown = CostBreakdown.model_construct(p2p_net_eur=p2p_net)
    community = CommunityResult.model_construct(cost_eur=money, cost_breakdown=breakdown)
    return SiteReport.model_construct(site=site, community=community)


def _rounds(game: Money, grid: tuple[float, ...]) -> tuple[Stages, list[tuple[str, Any, bool]]]:
    """Every round the stages open, answered with each site's money in `game` on its bids."""
    stages = Stages("noncooperative", order=SITES, stage=STANDALONE, grid=grid, max_sweeps=10)
    seen: list[tuple[str, Any, bool]] = []
    while stages.stage != WELFARE:
        spec = stages.round_spec("day-ahead")
        seen.append((spec.id, spec.markups, spec.trial))
        assert spec.traders is None if stages.stage == BIDDING else spec.traders == frozenset()
        money = ALONE if spec.markups is None else game(spec.markups)
        stages.done(spec.id, {s: _report(s, money[s]) for s in SITES})
    spec = stages.round_spec("day-ahead")
    seen.append((spec.id, spec.markups, spec.trial))
    return stages, seen


def _in_process(game: Money, grid: tuple[float, ...]) -> Any:
    def market(g: Any) -> Any:
        money = game({p.id: p.sell_markup_eur_per_kwh for p in g.communities})
        rows = [SimpleNamespace(id=i, cost_eur=c) for i, c in money.items()]
        return SimpleNamespace(communities=rows, totals=SimpleNamespace(cost_eur=sum(money.values())))

    return best_responses(Game(tuple(Player(s) for s in SITES)), market, grid=grid)  # type: ignore[arg-type]


def test_a_dilemma_ends_at_its_equilibrium_each_profile_once_then_the_round_in_force() -> None:
    stages, seen = _rounds(_dilemma, (0.0, 0.05))
    assert seen == [
        ("day-ahead-standalone", None, True),
        ("day-ahead-b01", {"a": 0.0, "b": 0.0}, True),
        ("day-ahead-b02", {"a": 0.05, "b": 0.0}, True),
        ("day-ahead-b03", {"a": 0.05, "b": 0.05}, True),
        ("day-ahead-b04", {"a": 0.0, "b": 0.05}, True),  # a's check that it still does best
        ("day-ahead", {"a": 0.05, "b": 0.05}, False),
    ]
    own = _in_process(_dilemma, (0.0, 0.05))
    assert stages.bidding is not None
    assert stages.bidding.found is not None
    assert stages.bidding.found.profiles == own.profiles
    assert len(stages.bidding.money) == own.solves
    at = _dilemma({"a": 0.05, "b": 0.05})
    made = stages.noncooperative({s: _report(s, at[s], p2p_net=2.0) for s in SITES})
    assert not isinstance(made, str)
    assert (made.design, made.status, made.equilibrium, made.profiles_cleared) == (
        "noncooperative", "equilibrium", True, 4,
    )  # fmt: skip
    assert made.gains_eur == {"a": 30.0 - 12.0, "b": 30.0 - 12.0}
    assert made.cost_before_payments_eur == {"a": 10.0, "b": 10.0}  # its money less its trades' net
    assert made.price_of_anarchy == pytest.approx((60.0 - 20.0) / (60.0 - 24.0))


def test_matching_pennies_cycles_and_the_round_in_force_takes_the_costlier_profile() -> None:
    stages, seen = _rounds(_pennies, (0.0, 0.01))
    own = _in_process(_pennies, (0.0, 0.01))
    assert stages.bidding is not None
    assert stages.bidding.found is not None
    assert stages.bidding.found.profiles == own.profiles
    assert not stages.bidding.found.equilibrium
    assert seen[-1] == ("day-ahead", own.profiles[0], False)  # both profiles cost 1 in all: the first
    assert len([r for r, _, trial in seen if trial]) == 1 + own.solves


def test_a_bid_round_without_every_report_gives_the_stage_up_on_honest_bids() -> None:
    stages = Stages("noncooperative", order=SITES, stage=STANDALONE, grid=(0.0, 0.05), max_sweeps=10)
    stages.done("r-standalone", {s: _report(s, ALONE[s]) for s in SITES})
    assert stages.round_spec("r").id == "r-b01"
    stages.done("r-b01", {"a": _report("a", 10.0)})
    assert stages.stage == WELFARE
    assert stages.round_spec("r") == ("r", None, None, False)
    assert stages.failure == "no report of b in round r-b01"
    assert stages.noncooperative({}) == "no report of b in round r-b01"
