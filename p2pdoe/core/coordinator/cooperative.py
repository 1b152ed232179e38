"""The rounds some designs agree before the round in force, at the coordinator: pure.

Nash bargaining, Shapley and the noncooperative design first agree a standalone round
(`<round>-standalone`, nobody trades): each site's cost alone, C0. Shapley then agrees one round per
coalition its values need (`<round>-cNN`, only the coalition's members trade, among themselves;
every site still agrees its envelope), each giving the members' costs in that coalition. The
noncooperative design agrees one round per bid profile its best responses try (`<round>-bNN`, each
site bidding the sale markup the opening names for it; p2pdoe.core.bidding), each giving every
site's money in that market. Then comes the round in force: the welfare round, on the bids where
best responses ended for the noncooperative design. None of the rounds before it publishes
envelopes (they are `trial` rounds). A stage whose round cannot be agreed is given up: the welfare
round follows on honest bids, and the design's payments are not made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from p2pdoe.core.bidding import BestResponses, Profile, bidding_outcome
from p2pdoe.core.coordinator.payments import cost_before_payments
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.results import MarketOutcome
from p2pdoe.core.schemas.runtime import SiteReport
from p2pdoe.core.shapley import Coalition, needed_coalitions, shapley_outcome

STANDALONE, COALITION, BIDDING, WELFARE = "standalone", "coalition", "bidding", "welfare"
BEFORE_IN_FORCE = ("nash-bargaining", "shapley", "noncooperative")  # the designs with a standalone round


class RoundSpec(NamedTuple):
    id: str  # before any `.2` of a second attempt
    traders: frozenset[str] | None  # who trades (None: every site)
    markups: Profile | None  # each site's sale markup (None: honest bids)
    trial: bool  # its envelopes are never in force


@dataclass
class Stages:
    design: str
    exact_up_to: int = 8
    orders: int = 200
    seed: int = 0
    stage: str = WELFARE
    baseline_round: str | None = None
    baseline: dict[str, SiteReport] = field(default_factory=dict)
    sites: tuple[str, ...] = ()  # those of the standalone round: the players
    left: list[Coalition] = field(default_factory=list)
    current: Coalition | None = None
    coalitions: dict[Coalition, dict[str, SiteReport]] = field(default_factory=dict)
    coalition_rounds: int = 0
    failure: str | None = None
    order: tuple[str, ...] = ()  # the configuration's order of the sites
    grid: tuple[float, ...] = ()  # the noncooperative design's markups
    max_sweeps: int = 1
    bidding: BestResponses | None = None
    profile: Profile | None = None  # the bid profile of the current round
    bid_rounds: int = 0

    @classmethod
    def of(cls, cfg: CoordinatorConfig) -> Stages:
        stage = STANDALONE if cfg.market in BEFORE_IN_FORCE else WELFARE
        return cls(cfg.market, cfg.shapley_exact_up_to, cfg.shapley_orders, cfg.shapley_seed, stage,
                   order=tuple(s.id for s in cfg.sites), grid=tuple(cfg.bid_markups_eur_per_kwh),
                   max_sweeps=cfg.bid_max_sweeps)  # fmt: skip

    def round_spec(self, base: str) -> RoundSpec:
        """The current stage's round: its id, who trades, the bids, whether it is a trial."""
        if self.stage == STANDALONE:
            return RoundSpec(f"{base}-standalone", frozenset(), None, True)
        if self.stage == COALITION and self.current is not None:
            return RoundSpec(f"{base}-c{self.coalition_rounds:02d}", self.current, None, True)
        if self.stage == BIDDING:
            return RoundSpec(f"{base}-b{self.bid_rounds:02d}", None, self.profile, True)
        return RoundSpec(base, None, self.profile, False)

    @property
    def publishes_envelopes(self) -> bool:
        return self.stage == WELFARE

    def done(self, round_id: str, reports: Mapping[str, SiteReport]) -> None:
        """The current stage's round is over and its reports are in: on to the next stage."""
        if self.stage == STANDALONE:
            self.baseline, self.baseline_round = dict(reports), round_id
            self.sites = tuple(s for s in self.order if s in reports)
            if self.design == "shapley":
                self.left = needed_coalitions(self.sites, self.exact_up_to, self.orders, self.seed)
            if self.design == "noncooperative":
                self.bidding = BestResponses(self.sites, self.grid, self.max_sweeps)
        elif self.stage == COALITION and self.current is not None:
            self.coalitions[self.current] = dict(reports)
        elif self.stage == BIDDING and self.bidding is not None and self.profile is not None:
            missing = [s for s in self.sites if s not in reports]
            if missing:
                return self.give_up(f"no report of {', '.join(missing)} in round {round_id}")
            self.bidding.cleared(self.profile, {s: reports[s].community.cost_eur for s in self.sites})
        self._next()

    def give_up(self, why: str) -> None:
        """The current stage cannot be agreed: straight to the welfare round, on honest bids and
        without payments."""
        self.failure = why
        self.left, self.current, self.stage, self.profile, self.bidding = [], None, WELFARE, None, None

    def _next(self) -> None:
        wanted = None if self.bidding is None else self.bidding.wanted()
        if self.left:
            self.current, self.stage = self.left.pop(0), COALITION
            self.coalition_rounds += 1
        elif wanted is not None:
            self.profile, self.stage = wanted, BIDDING
            self.bid_rounds += 1
        else:
            self.current, self.stage = None, WELFARE
            self.profile = None if self.bidding is None else self.bidding.worst()

    def shapley(self, welfare: Mapping[str, SiteReport]) -> MarketOutcome | str:
        """Each site's Shapley value of the coalition game the rounds' reports give, as
        results.json's market section; or why it cannot be computed."""
        players = [s for s in self.sites if s in welfare]
        rounds = [*self.coalitions.items(), (frozenset(players), welfare)]
        try:
            alone = {s: self.baseline[s].community.cost_eur for s in players}
            costs = {
                c: {i: cost_before_payments(reports[i]) for i in players if i in c} for c, reports in rounds
            }
            return shapley_outcome(players, alone, costs, (self.exact_up_to, self.orders, self.seed),
                                   self.baseline_round or "", self.coalition_rounds)  # fmt: skip
        except KeyError as exc:
            return f"no report or value for {exc.args[0]}"

    def noncooperative(self, in_force: Mapping[str, SiteReport]) -> MarketOutcome | str:
        """Where the bids' best responses ended, from the rounds' reports, as results.json's market
        section; or why it cannot be given."""
        if self.bidding is None or self.bidding.found is None:
            return self.failure or "best responses did not end"
        try:
            alone = {s: self.baseline[s].community.cost_eur for s in self.sites}
            money = {s: (in_force[s].community.cost_eur, in_force[s].community.cost_breakdown.p2p_net_eur)
                     for s in self.sites}  # fmt: skip
        except KeyError as exc:
            return f"no report of {exc.args[0]}"
        return bidding_outcome(self.bidding, alone, money, self.baseline_round or "")
