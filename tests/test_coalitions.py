"""Coalitions (p2pdoe.analysis.coalitions): Shapley values by enumeration against the formula written
out by hand for three players, on a game with known values and on three communities of the default
day; sampling within its reported error; the core excess against a game whose core is known."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from p2pdoe.analysis.coalitions import (
    CoalitionValues,
    largest_core_excess,
    shapley_exact,
    shapley_sampled,
    within,
)
from p2pdoe.cli.jobs import run_policy
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario

# A glove game: a holds a left glove, b and c a right one each; a pair is worth 1.
GLOVES = {frozenset("ab"): 1.0, frozenset("ac"): 1.0, frozenset("abc"): 1.0}


def gloves(members: Iterable[str]) -> float:
    return GLOVES.get(frozenset(members), 0.0)


def by_hand(v: Callable[[Iterable[str]], float], a: str, b: str, c: str) -> float:
    """phi_a for three players whose coalitions of one are worth nothing: 1/6 v(ab) + 1/6 v(ac)
    + 1/3 (v(abc) - v(bc))."""
    return v((a, b)) / 6 + v((a, c)) / 6 + (v((a, b, c)) - v((b, c))) / 3


def test_the_glove_game_shares_as_the_formula_says() -> None:
    phi = shapley_exact(["a", "b", "c"], gloves)
    assert phi == pytest.approx({"a": 2 / 3, "b": 1 / 6, "c": 1 / 6})
    assert phi["a"] == pytest.approx(by_hand(gloves, "a", "b", "c"))


def test_three_communities_of_the_default_day_by_enumeration_and_by_hand() -> None:
    s = load_scenario("default")
    three = ["wind-25", "campus-30", "village-22"]
    v = CoalitionValues(s, lambda x: run_policy(x, Policy.DYNAMIC))
    phi = shapley_exact(three, v)
    assert v.solves == 4  # the pairs and the three; a coalition of one trades with no one
    for a in three:
        b, c = (x for x in three if x != a)
        assert phi[a] == pytest.approx(by_hand(v, a, b, c), abs=1e-9), a
    assert sum(phi.values()) == pytest.approx(v(three))  # efficient
    assert v(three) > 0


def test_a_coalition_trades_only_among_its_members() -> None:
    s = load_scenario("default")
    members = frozenset({"wind-25", "campus-30"})
    peers = within(s, members).market.peers
    for c, sid in enumerate(s.ids):
        names = {s.ids[m] for m in peers[c]}
        assert names == (members - {sid} if sid in members else set()), sid


def test_sampling_lands_within_its_error_and_repeats_with_its_seed() -> None:
    players = ["a", "b", "c"]
    exact = shapley_exact(players, gloves)
    sampled = shapley_sampled(players, gloves, 400, seed=3)
    for i in players:
        assert abs(sampled.phi[i] - exact[i]) <= 4 * sampled.standard_error[i] + 1e-12, i
    assert shapley_sampled(players, gloves, 400, seed=3) == sampled
    with pytest.raises(ValueError, match="at least 2 orders"):
        shapley_sampled(players, gloves, 1, seed=3)


def test_the_core_excess_finds_the_coalition_that_would_leave() -> None:
    """The glove game's core gives everything to a: (1, 0, 0) is in it, the Shapley value is not
    (a and b alone make 1, more than their 2/3 + 1/6)."""
    in_core, _ = largest_core_excess(["a", "b", "c"], gloves, {"a": 1.0, "b": 0.0, "c": 0.0})
    assert in_core == pytest.approx(0.0)
    excess, who = largest_core_excess(["a", "b", "c"], gloves, shapley_exact(["a", "b", "c"], gloves))
    assert excess == pytest.approx(1 / 6)
    assert who in (frozenset("ab"), frozenset("ac"))


def test_beyond_the_exact_limit_shapley_samples_and_reports_its_error() -> None:
    """Six communities with the exact limit at 2: two seeded orders, at most 2 x 5 coalitions solved,
    the sampling error reported, and the gains still summing to the grand coalition's saving (each
    order's marginal contributions do)."""
    from p2pdoe.analysis.markets import shapley

    s = load_scenario("default")
    alone = run_policy(load_scenario("default", {"market": {"design": "standalone"}}), Policy.DYNAMIC)
    welfare = run_policy(s, Policy.DYNAMIC)
    v = CoalitionValues(s, lambda x: run_policy(x, Policy.DYNAMIC))
    m = shapley(welfare, alone, v, exact_up_to=2, orders=2, seed=5)
    assert m.sampling_error_eur is not None
    assert m.sampling_error_eur > 0
    assert m.coalition_solves is not None
    assert m.coalition_solves <= 10
    assert sum(m.gains_eur.values()) == pytest.approx(v(s.ids), abs=1e-6)
