"""Market designs side by side on one day (docs/markets.md): each community's gain over trading
alone, whether every community is better off (individual rationality), how evenly the gains fall
(Jain's index and the Gini coefficient), and what the agreement cost in rounds and bytes.

A community's cost is its money: grid energy, payments to and from peers, network fees, discomfort
and battery wear (`CommunityResult.cost_eur`); the value it puts on its envelope's width is not
money and is left out. Its gain under a design is Delta_i = C0_i - C_i, with C0_i its cost under
`standalone` (the same envelope policy, no peer-to-peer trade).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from p2pdoe.analysis.coalitions import (
    CoalitionValues,
    largest_core_excess,
    own_costs,
    shapley_exact,
    shapley_sampled,
    within,
)
from p2pdoe.analysis.network_charges import merchandising_surplus, network_charges
from p2pdoe.core.agreement.payments import bargain
from p2pdoe.core.allocation import jain_index
from p2pdoe.core.bargaining import Bargain
from p2pdoe.core.scenario import CommunityData, Scenario
from p2pdoe.core.schemas.results import MarketOutcome, Payment, Results
from p2pdoe.core.schemas.scenario import DESIGNS, SCHEDULE_DESIGNS
from p2pdoe.core.shapley import needed_coalitions, shapley_outcome

# every design `compare --markets` sets side by side
COMPARED = (*SCHEDULE_DESIGNS, "nash-bargaining", "shapley", "noncooperative")

__all__ = [
    "COMPARED",
    "DESIGNS",
    "SCHEDULE_DESIGNS",
    "DesignMetrics",
    "bargained_market",
    "design_metrics",
    "gini_coefficient",
    "mean_trade_price",
    "nash_bargaining",
    "shapley",
    "shapley_market",
    "standalone_of",
    "trading_partners",
    "with_core_excess",
    "with_network_charges",
]
RATIONAL_TOLERANCE_EUR = 0.01  # a gain above minus a cent counts as no loss
MARKUPS_EUR_PER_KWH = (0.01, 0.02, 0.05)  # the misreports tried, one community at a time


@dataclass(frozen=True)
class Manipulation:
    """The most one community gains by bidding its sales dearer than they cost it (a markup), and
    what that costs everyone."""

    site: str
    markup_eur_per_kwh: float
    gain_eur: float  # its own, in money, over bidding honestly
    welfare_loss_eur: float  # the total cost's rise
    gains_by_design: dict[str, float]  # the same misreport's gain under each markup-priced design


@dataclass(frozen=True)
class DesignMetrics:
    design: str
    total_cost_eur: float
    saving_eur: float  # against standalone
    gains_eur: dict[str, float]  # per community: C0_i - C_i
    individually_rational: bool  # no community loses by taking part
    jain: float | None  # of the gains, where every gain is >= 0 and one is > 0
    gini: float | None  # likewise
    p2p_traded_kwh: float
    mean_p2p_price_eur_per_kwh: float | None  # weighted by energy; None without trade
    status: str
    iterations: int | None
    messages_per_iteration: float | None
    bytes_per_iteration: float | None
    stage2_iterations: int | None = None  # a second stage's rounds (payments), where it has one
    coalition_solves: int | None = None  # welfare problems solved for the coalitions' values
    sampling_error_eur: float | None = None  # Shapley by sampling: the largest standard error
    core_excess_eur: float | None = None  # max_S v(S) - sum of its gains: <= 0 is in the core
    core_blocking: tuple[str, ...] | None = None  # the coalition S of the largest excess
    manipulation: Manipulation | None = None  # the most a markup on its sales gains one community
    # DLMP network charges (p2pdoe.analysis.network_charges), each community's for its envelope
    network_charges_eur: dict[str, float] | None = None
    merchandising_surplus_eur: float | None = None  # what the DSO collects: the charges' sum
    gains_after_charges_eur: dict[str, float] | None = None  # the gain, net of the charge's change
    rational_after_charges: bool | None = None  # no community loses once charges are paid
    # the non-cooperative readings (p2pdoe.analysis.equilibrium, p2pdoe.analysis.bidding)
    best_response_gap_eur: float | None = None  # the most one community saves deviating at the prices
    price_of_anarchy: float | None = None  # the optimal saving over this design's (worst) saving
    bids: tuple[dict[str, float], ...] | None = None  # strategic bidders: the equilibrium, or a cycle


def design_metrics(
    design: str,
    results: Results,
    standalone: Results,
    costs: Mapping[str, float] | None = None,
    stage2_iterations: int | None = None,
) -> DesignMetrics:
    """`results` of `design` measured against `standalone`'s, community by community; `costs`: each
    community's cost where the design pays otherwise than `results` says (a second stage)."""
    alone = {c.id: c.cost_eur for c in standalone.communities}
    own = costs or {c.id: c.cost_eur for c in results.communities}
    if set(alone) != set(own):
        raise ValueError("the designs were solved for different communities")
    gains = {c: alone[c] - own[c] for c in own}
    values = np.array(list(gains.values()))
    even = bool(np.all(values >= 0) and np.any(values > 0))
    sv = results.solver
    return DesignMetrics(
        design=design,
        total_cost_eur=float(sum(own.values())),
        saving_eur=float(sum(alone.values()) - sum(own.values())),
        gains_eur=gains,
        individually_rational=bool(np.all(values >= -RATIONAL_TOLERANCE_EUR)),
        jain=jain_index(values) if even else None,
        gini=gini_coefficient(values) if even else None,
        p2p_traded_kwh=results.totals.p2p_traded_kwh,
        mean_p2p_price_eur_per_kwh=mean_trade_price(results) if costs is None else None,
        status=sv.status,
        iterations=sv.iterations,
        messages_per_iteration=sv.messages_per_iteration,
        bytes_per_iteration=sv.bytes_per_iteration,
        stage2_iterations=stage2_iterations,
    )


def nash_bargaining(
    welfare: Results, standalone: Results, peers: Mapping[str, Sequence[str]], weights: Mapping[str, float]
) -> tuple[DesignMetrics, Bargain]:
    """The cooperative design with Nash-bargaining payoffs: the welfare agreement (stage 1), then the
    payments over its trading links that maximise the weighted Nash product (stage 2,
    p2pdoe.core.bargaining). Community i's cost is its welfare cost before any payment to peers,
    plus what it pays in stage 2."""
    alone, _, gains = _bargaining_costs(welfare, standalone)
    b = bargain(gains, {c: weights.get(c, 1.0) for c in gains}, peers)
    costs = {c: alone[c] - b.gains[c] for c in gains}
    return design_metrics("nash-bargaining", welfare, standalone, costs, b.iterations), b


def _bargaining_costs(
    welfare: Results, standalone: Results
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Each community's cost alone (C0), its welfare cost before any payment to peers (C*), and its
    gain before the bargained payments, C0 - C* (each community's own, kept at home)."""
    alone = {c.id: c.cost_eur for c in standalone.communities}
    before = {c.id: c.cost_eur - c.cost_breakdown.p2p_net_eur for c in welfare.communities}
    return alone, before, {c: alone[c] - before[c] for c in before}


def shapley_market(
    s: Scenario, welfare: Results, standalone: Results, solve: Callable[[Scenario], Results]
) -> MarketOutcome:
    """What results.json reports of Shapley (`Results.market`): each coalition's day solved with
    `solve` (its members trading among themselves only), as the coordinator's coalition rounds do."""
    players = list(s.ids)
    exact_up_to, orders, seed = s.market.shapley
    needed = needed_coalitions(players, exact_up_to, orders, seed)
    costs: dict[frozenset[str], dict[str, float]] = {}
    for c in needed:
        own = own_costs(solve(within(s, c)))  # one solve per coalition
        costs[c] = {i: own[i] for i in players if i in c}
    costs[frozenset(players)] = own_costs(welfare)
    return shapley_outcome(players, own_costs(standalone), costs, s.market.shapley, "standalone", len(needed))


def bid_market(s: Scenario, solve: Callable[[Scenario], Results]) -> Results:
    """The noncooperative design as the coordinator's rounds run it: the day standalone, each bid
    profile best responses ask for cleared by `solve` once, then the market cleared again on the
    profile in force, with the bids' outcome as its market section."""
    from p2pdoe.analysis.bidding import best_responses, with_bids
    from p2pdoe.core.bidding import bidding_outcome

    alone = solve(standalone_of(s))
    grid, sweeps = s.market.bidding
    machine = best_responses(s, solve, grid, sweeps).machine
    results = solve(with_bids(s, machine.worst()))
    money = {c.id: (c.cost_eur, c.cost_breakdown.p2p_net_eur) for c in results.communities}
    outcome = bidding_outcome(machine, {c.id: c.cost_eur for c in alone.communities}, money, "standalone")
    return results.model_copy(update={"market": outcome})


def trading_partners(s: Scenario) -> dict[str, list[str]]:
    """Each community's trading partners, by id."""
    return {s.ids[c]: [s.ids[m] for m in s.market.peers[c]] for c in range(len(s.ids))}


def standalone_of(s: Scenario) -> Scenario:
    """The same day without any trading link (the `standalone` design)."""
    market = replace(s.market, peers=tuple(() for _ in s.ids), design="standalone")
    return replace(s, market=market)


def bargained_market(
    welfare: Results, standalone: Results, peers: Mapping[str, Sequence[str]], weights: Mapping[str, float]
) -> MarketOutcome:
    """What results.json reports of Nash bargaining (`Results.market`), computed in-process by the
    machines the services run (p2pdoe.core.agreement.payments); raises BargainingError without a gain
    to share."""
    alone, before, gains = _bargaining_costs(welfare, standalone)
    w = {c: weights.get(c, 1.0) for c in gains}
    b = bargain(gains, w, peers)
    net = {c: gains[c] - b.gains[c] for c in gains}
    return MarketOutcome(
        design="nash-bargaining",
        baseline_round="standalone",
        payment_round="payments",
        status="converged" if b.converged else "max_iterations",
        iterations=b.iterations,
        weights=w,
        baseline_cost_eur=alone,
        cost_before_payments_eur=before,
        payments=[Payment(payer=a, payee=p, eur=v) for (a, p), v in b.payments.items()],
        net_payment_eur=net,
        gains_eur=dict(b.gains),
    )


def gini_coefficient(values: np.ndarray) -> float:
    """Mean absolute difference over twice the mean: 0 when all equal, (n - 1) / n when one takes
    all (non-negative values, not all zero)."""
    x = np.asarray(values, dtype=float)
    if np.any(x < 0) or not np.any(x > 0):
        raise ValueError("the Gini coefficient needs non-negative values, not all zero")
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * x.mean()))


def mean_trade_price(results: Results) -> float | None:
    """The energy-weighted mean price of the day's peer-to-peer trades (EUR/kWh), or None."""
    kw = np.array([t.kw for t in results.trades])
    if kw.sum() <= 0:
        return None
    return float(np.dot(kw, [t.price_eur_per_kwh for t in results.trades]) / kw.sum())


def shapley(
    welfare: Results, standalone: Results, values: CoalitionValues, exact_up_to: int, orders: int, seed: int
) -> DesignMetrics:
    """The cooperative design with Shapley-value payoffs: the welfare schedule, each community paid so
    that it gains its Shapley value of the coalition game (p2pdoe.analysis.coalitions), exact up to
    `exact_up_to` communities, else sampled over `orders` seeded orders of arrival."""
    ids = [c.id for c in welfare.communities]
    phi, error = shapley_values(ids, values, (exact_up_to, orders, seed))
    alone = {c.id: c.cost_eur for c in standalone.communities}
    m = design_metrics("shapley", welfare, standalone, {c: alone[c] - phi[c] for c in ids})
    return replace(m, coalition_solves=values.solves, sampling_error_eur=error)


def shapley_values(
    ids: Sequence[str], v: Callable[[Iterable[str]], float], how: tuple[int, int, int]
) -> tuple[dict[str, float], float | None]:
    """Each community's Shapley value, exact up to `how[0]` communities, else sampled over `how[1]`
    orders seeded with `how[2]`; and the largest sampling error (None when exact)."""
    exact_up_to, orders, seed = how
    if len(ids) <= exact_up_to:
        return shapley_exact(ids, v), None
    sampled = shapley_sampled(ids, v, orders, seed)
    return sampled.phi, max(sampled.standard_error.values())


def with_network_charges(m: DesignMetrics, schedule: Results, standalone: Results) -> DesignMetrics:
    """`m` with each community paying its DLMPs for the envelope `schedule` granted it, and standalone
    for its own: a gain moves by the change of the community's charge."""
    own, alone = network_charges(schedule), network_charges(standalone)
    after = {c: g - (own[c].total_eur - alone[c].total_eur) for c, g in m.gains_eur.items()}
    return replace(
        m,
        network_charges_eur={c: x.total_eur for c, x in own.items()},
        merchandising_surplus_eur=merchandising_surplus(own),
        gains_after_charges_eur=after,
        rational_after_charges=all(g >= -RATIONAL_TOLERANCE_EUR for g in after.values()),
    )


def with_core_excess(m: DesignMetrics, values: CoalitionValues) -> DesignMetrics:
    excess, who = largest_core_excess(list(m.gains_eur), values, m.gains_eur)
    return replace(m, core_excess_eur=excess, core_blocking=tuple(c for c in m.gains_eur if c in who))


def manipulability(
    s: Scenario,
    standalone: Results,
    solve: Callable[[Scenario], Results],
    markups: Sequence[float] = MARKUPS_EUR_PER_KWH,
    honest: Results | None = None,
    values: CoalitionValues | None = None,
) -> dict[str, Manipulation]:
    """Per design (welfare; nash-bargaining with equal-share payoffs from the true gains; shapley
    when the honest coalition `values` are given), each community in turn bidding each markup: the
    largest gain any of them gets, by whom and at which markup. Under Nash bargaining a community's
    payoff is its weight's share of the true saving, so a markup that shrinks the saving can only
    cost it. Under Shapley its payoff is its Shapley value of the coalitions' true savings, each
    coalition holding it cleared on its bids (`CoalitionValues.with_bids_of`)."""
    honest = honest or solve(s)
    weights = {c.id: s.market.bargaining_weights.get(c.id, 1.0) for c in s.communities}
    share = {c: w / sum(weights.values()) for c, w in weights.items()}
    saving = standalone.totals.cost_eur - honest.totals.cost_eur
    fair = None if values is None else shapley_values(s.ids, values, s.market.shapley)[0]
    best: dict[str, Manipulation] = {}
    for k, community in enumerate(s.communities):
        for markup in markups:
            misled = replace(s, communities=_with_markup(s.communities, k, markup))
            r = solve(misled)
            site = community.id
            loss = r.totals.cost_eur - honest.totals.cost_eur
            gains = {
                "welfare": _cost(honest, site) - _cost(r, site),
                "nash-bargaining": share[site] * (standalone.totals.cost_eur - r.totals.cost_eur - saving),
            }
            if values is not None and fair is not None:
                phi, _ = shapley_values(s.ids, values.with_bids_of(misled, site), s.market.shapley)
                gains["shapley"] = phi[site] - fair[site]
            for design, gain in gains.items():
                if design not in best or gain > best[design].gain_eur:
                    best[design] = Manipulation(site, markup, gain, loss, gains)
    return best


def _with_markup(communities: Sequence[CommunityData], k: int, markup: float) -> tuple[CommunityData, ...]:
    return tuple(
        replace(c, sell_markup_eur_per_kwh=markup) if i == k else c for i, c in enumerate(communities)
    )


def _cost(r: Results, site: str) -> float:
    return next(c.cost_eur for c in r.communities if c.id == site)
