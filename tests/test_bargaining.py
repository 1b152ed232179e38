"""Nash-bargaining payments (p2pdoe.core.bargaining): the decentralized stage 2 reaches the closed
form, in which every community gains its weight's share of the total (with equal weights, the same),
on a complete graph and on a line; the first-order conditions of the Nash product hold at the
answer; and a day without a gain to share is refused."""

from __future__ import annotations

import math

import pytest

from p2pdoe.core.agreement.payments import bargain
from p2pdoe.core.bargaining import BargainingError, closed_form_gains, links_of
from p2pdoe.errors import P2PDoeError
from p2pdoe.io.scenarios import load_scenario

# A day's own gains before any payment: the sellers' are negative (they export at the grid's price
# and would be paid by the buyers), the total 300 EUR.
GAINS = {"a": -50.0, "b": 120.0, "c": 230.0}
COMPLETE = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
LINE = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}  # a and c trade only through b


@pytest.mark.parametrize("peers", [COMPLETE, LINE], ids=["complete", "line"])
def test_equal_weights_give_every_community_the_same_gain(peers: dict[str, list[str]]) -> None:
    deal = bargain(GAINS, dict.fromkeys(GAINS, 1.0), peers)
    assert deal.converged
    for c in GAINS:
        assert deal.gains[c] == pytest.approx(100.0, abs=1e-3), c
    assert sum(deal.gains.values()) == pytest.approx(sum(GAINS.values()), abs=1e-6)  # payments net to 0
    assert set(deal.payments) == set(links_of(peers))


def test_a_community_weighing_three_times_gains_three_times_as_much() -> None:
    weights = {"a": 1.0, "b": 1.0, "c": 3.0}
    deal = bargain(GAINS, weights, LINE)
    expected = closed_form_gains(GAINS, weights)
    assert expected == pytest.approx({"a": 60.0, "b": 60.0, "c": 180.0})
    for c in GAINS:
        assert deal.gains[c] == pytest.approx(expected[c], abs=1e-3), c


def test_the_nash_products_first_order_conditions_hold_at_the_answer() -> None:
    """d/d(pi_e) of sum_i w_i ln(u_i) on link e = (i, j) is -w_i/u_i + w_j/u_j: zero on every link."""
    weights = {"a": 2.0, "b": 1.0, "c": 1.0}
    deal = bargain(GAINS, weights, COMPLETE)
    for payer, payee in deal.payments:
        slope = -weights[payer] / deal.gains[payer] + weights[payee] / deal.gains[payee]
        assert abs(slope) < 1e-6, (payer, payee, slope)
    product = sum(weights[c] * math.log(deal.gains[c]) for c in GAINS)
    nudged = dict(deal.gains, a=deal.gains["a"] + 1.0, b=deal.gains["b"] - 1.0)  # any other split
    assert product > sum(weights[c] * math.log(nudged[c]) for c in GAINS)


def test_nothing_to_share_is_refused() -> None:
    with pytest.raises(BargainingError, match="no gain to share"):
        bargain({"a": -10.0, "b": 5.0}, {"a": 1.0, "b": 1.0}, {"a": ["b"], "b": ["a"]})


def test_weights_of_a_community_the_scenario_does_not_have_are_refused() -> None:
    with pytest.raises(P2PDoeError, match="nobody-1 is not a community"):
        load_scenario("default", {"market": {"bargaining_weights": {"nobody-1": 2.0}}})
    s = load_scenario("default", {"market": {"bargaining_weights": {"campus-30": 2.0}}})
    assert s.market.bargaining_weights == {"campus-30": 2.0}


def test_a_community_that_understates_its_gain_is_paid_the_difference_less_a_share() -> None:
    """Its gain is private, so nothing stops a community from bargaining as if it gained less: b
    claiming 60 EUR less ends with 60 (1 - 1/3) = 40 EUR more, taken from the others."""
    honest = bargain(GAINS, dict.fromkeys(GAINS, 1.0), COMPLETE)
    claimed = bargain(dict(GAINS, b=GAINS["b"] - 60.0), dict.fromkeys(GAINS, 1.0), COMPLETE)
    paid_by_b = GAINS["b"] - 60.0 - claimed.gains["b"]  # what b pays, from its claim
    true_gain_b = GAINS["b"] - paid_by_b
    assert true_gain_b - honest.gains["b"] == pytest.approx(40.0, abs=1e-2)
    assert claimed.gains["a"] == pytest.approx(honest.gains["a"] - 20.0, abs=1e-2)
