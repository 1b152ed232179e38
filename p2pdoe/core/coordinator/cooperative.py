"""The cooperative designs' rounds before the welfare round, at the coordinator: pure.

Nash bargaining and Shapley first agree a standalone round (`<round>-standalone`, nobody trades):
each site's cost alone, C0. Shapley then agrees one round per coalition its values need
(`<round>-cNN`, only the coalition's members trade, among themselves; every site still agrees its
envelope), each giving the members' costs in that coalition. Then comes the welfare round, whose
envelopes are the ones in force. None of these rounds publishes envelopes. A stage whose round
cannot be agreed is given up: the welfare round follows, and the design's payments are not made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from p2pdoe.core.coordinator.payments import cost_before_payments
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.results import MarketOutcome
from p2pdoe.core.schemas.runtime import SiteReport
from p2pdoe.core.shapley import Coalition, needed_coalitions, shapley_outcome

STANDALONE, COALITION, WELFARE = "standalone", "coalition", "welfare"


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

    @classmethod
    def of(cls, cfg: CoordinatorConfig) -> Stages:
        cooperative = cfg.market in ("nash-bargaining", "shapley")
        stage = STANDALONE if cooperative else WELFARE
        return cls(cfg.market, cfg.shapley_exact_up_to, cfg.shapley_orders, cfg.shapley_seed, stage,
                   order=tuple(s.id for s in cfg.sites))  # fmt: skip

    def round_spec(self, base: str) -> tuple[str, frozenset[str] | None]:
        """The current stage's round id (before any `.2` of a second attempt) and who trades."""
        if self.stage == STANDALONE:
            return f"{base}-standalone", frozenset()
        if self.stage == COALITION and self.current is not None:
            return f"{base}-c{self.coalition_rounds:02d}", self.current
        return base, None

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
        elif self.stage == COALITION and self.current is not None:
            self.coalitions[self.current] = dict(reports)
        self._next()

    def give_up(self, why: str) -> None:
        """The current stage cannot be agreed: straight to the welfare round, without payments."""
        self.failure = why
        self.left, self.current, self.stage = [], None, WELFARE

    def _next(self) -> None:
        if self.left:
            self.current, self.stage = self.left.pop(0), COALITION
            self.coalition_rounds += 1
        else:
            self.current, self.stage = None, WELFARE

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
