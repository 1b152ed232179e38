"""Shapley's rounds at the coordinator, the pure parts (p2pdoe.core.coordinator.cooperative,
p2pdoe.core.shapley): the sequence of rounds and who trades in each, the coalitions needed (every one,
or those the seeded orders pass through), a stage given up, and the values from the rounds' reports
against the three-player formula written out by hand."""

from __future__ import annotations

import itertools

import pytest

from p2pdoe.core.coordinator.cooperative import COALITION, STANDALONE, WELFARE, Stages
from p2pdoe.core.schemas.results import CommunityResult, CostBreakdown
from p2pdoe.core.schemas.runtime import SiteReport
from p2pdoe.core.shapley import needed_coalitions, sampled_orders, shapley_outcome

SITES = ("a", "b", "c")
ALONE = {"a": 100.0, "b": 50.0, "c": -40.0}
# each member's cost before payments when only the coalition trades (v(S) = sum of C0 - C(S))
WITH = {
    frozenset("ab"): {"a": 80.0, "b": 45.0},  # v = 25
    frozenset("ac"): {"a": 70.0, "c": -35.0},  # v = 25
    frozenset("bc"): {"b": 40.0, "c": -38.0},  # v = 8
    frozenset("abc"): {"a": 60.0, "b": 38.0, "c": -30.0},  # v = 42
}


def _report(site: str, cost: float, p2p_net: float = 0.0) -> SiteReport:
    breakdown = CostBreakdown.model_construct(p2p_net_eur=p2p_net)
    community = CommunityResult.model_construct(cost_eur=cost + p2p_net, cost_breakdown=breakdown)
    return SiteReport.model_construct(site=site, community=community)


def test_the_rounds_go_standalone_then_every_coalition_then_welfare() -> None:
    stages = Stages("shapley", order=SITES, stage=STANDALONE)
    seen = []
    while True:
        base, traders, markups, trial = stages.round_spec("day-ahead")
        assert (markups, trial) == (None, stages.stage != WELFARE)
        seen.append((base, None if traders is None else "".join(sorted(traders))))
        assert stages.publishes_envelopes == (stages.stage == WELFARE)
        if stages.stage == WELFARE:
            break
        members = SITES if traders is None or not traders else sorted(traders)
        stages.done(base, {s: _report(s, ALONE[s]) for s in members} if stages.stage == STANDALONE else {})
    assert seen == [
        ("day-ahead-standalone", ""),
        ("day-ahead-c01", "ab"),
        ("day-ahead-c02", "ac"),
        ("day-ahead-c03", "bc"),
        ("day-ahead", None),
    ]


def test_nash_bargaining_has_only_the_standalone_round_before_and_welfare_none() -> None:
    nash = Stages("nash-bargaining", order=SITES, stage=STANDALONE)
    assert nash.round_spec("r") == ("r-standalone", frozenset(), None, True)
    nash.done("r-standalone", {s: _report(s, ALONE[s]) for s in SITES})
    assert (nash.stage, nash.round_spec("r")) == (WELFARE, ("r", None, None, False))
    assert Stages("welfare").round_spec("r") == ("r", None, None, False)


def test_a_stage_given_up_goes_straight_to_welfare() -> None:
    stages = Stages("shapley", order=SITES, stage=STANDALONE)
    stages.done("r-standalone", {s: _report(s, ALONE[s]) for s in SITES})
    assert stages.stage == COALITION
    stages.give_up("no agreement of r-c01 after 3 attempts")
    assert (stages.stage, stages.left, stages.failure) == (
        WELFARE,
        [],
        "no agreement of r-c01 after 3 attempts",
    )


def test_the_values_from_the_reports_are_the_three_player_formula() -> None:
    stages = Stages("shapley", order=SITES, stage=STANDALONE)
    stages.done("r-standalone", {s: _report(s, ALONE[s]) for s in SITES})
    while stages.stage == COALITION:
        assert stages.current is not None
        # a member's report carries its trades' net apart: C(S) is its cost less that net
        stages.done("r-c", {s: _report(s, WITH[stages.current][s], p2p_net=3.0) for s in stages.current})
    out = stages.shapley({s: _report(s, WITH[frozenset(SITES)][s], p2p_net=-1.0) for s in SITES})
    assert not isinstance(out, str)
    v = {"ab": 25.0, "ac": 25.0, "bc": 8.0, "abc": 42.0}
    # phi_a = 1/3 v(a) + 1/6 (v(ab) - v(b)) + 1/6 (v(ac) - v(c)) + 1/3 (v(abc) - v(bc)), v(i) = 0
    phi_a = v["ab"] / 6 + v["ac"] / 6 + (v["abc"] - v["bc"]) / 3
    phi_b = v["ab"] / 6 + v["bc"] / 6 + (v["abc"] - v["ac"]) / 3
    phi_c = v["ac"] / 6 + v["bc"] / 6 + (v["abc"] - v["ab"]) / 3
    assert out.gains_eur == pytest.approx({"a": phi_a, "b": phi_b, "c": phi_c})
    assert sum(out.gains_eur.values()) == pytest.approx(v["abc"])  # efficient
    for s in SITES:  # its money is its cost alone less its value
        assert out.baseline_cost_eur[s] == ALONE[s]
        assert out.cost_before_payments_eur[s] + out.net_payment_eur[s] == pytest.approx(
            ALONE[s] - out.gains_eur[s]
        )
    assert {frozenset(c.members): c.value_eur for c in out.coalitions} == pytest.approx(
        {frozenset(k): x for k, x in v.items()}
    )
    assert out.iterations == 3  # coalition rounds


def test_a_missing_report_is_named_instead_of_a_value() -> None:
    stages = Stages("shapley", order=SITES, stage=STANDALONE)
    stages.done("r-standalone", {s: _report(s, ALONE[s]) for s in SITES})
    while stages.stage == COALITION:
        stages.done("r-c", {})  # nobody reported
    assert stages.shapley({s: _report(s, 0.0) for s in SITES}) == "no report or value for a"


def test_beyond_the_exact_size_the_coalitions_are_those_the_orders_pass_through() -> None:
    sites = [f"s{k}" for k in range(6)]
    assert len(needed_coalitions(sites, 8, 200, 0)) == 2**6 - 2 - 6
    sampled = needed_coalitions(sites, 3, 5, 7)
    expected = {frozenset(o[:k]) for o in sampled_orders(sites, 5, 7) for k in range(2, 6)}
    assert set(sampled) == expected
    assert len(sampled) == len(set(sampled))
    assert needed_coalitions(sites, 3, 5, 7) == sampled  # the same on every run
    # the sampled values come from exactly those coalitions
    alone = dict.fromkeys(sites, 10.0)
    costs = {c: dict.fromkeys(c, 10.0 - len(c)) for c in [*sampled, frozenset(sites)]}
    out = shapley_outcome(sites, alone, costs, (3, 5, 7), "r", len(sampled))
    assert out.sampling_error_eur is not None
    assert sum(out.gains_eur.values()) == pytest.approx(36.0)  # v(N) = 6 x 6, efficient on every order
    with pytest.raises(KeyError):
        shapley_outcome(
            sites,
            alone,
            dict(itertools.islice(costs.items(), 1)) | {frozenset(sites): costs[frozenset(sites)]},
            (3, 5, 7),
            "r",
            1,
        )
