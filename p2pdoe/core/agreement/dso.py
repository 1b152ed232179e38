"""The DSO's side of the agreement: grants safe envelopes, paces the iterations, no I/O.

It opens a round, then per iteration k: waits for every community's proposal k, updates its copies
of the envelope couplings (and mirrors the trade couplings, only to measure residuals), decides
whether the round has converged, adapts rho, publishes one `Grant`, and projects the new targets
onto the safe set for iteration k + 1. Every grant is network-safe, converged or not. With Anderson
acceleration on, it also computes the weights every party mixes its couplings with (`anderson`) and
sends them in the grants.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from p2pdoe.core.agreement.anderson import Accelerator, mixed
from p2pdoe.core.agreement.coupling import (
    Agreed,
    Residuals,
    ResidualSums,
    consensus_step,
    kept_rows,
    rebalanced_rho,
    residual_sums,
    residuals,
)
from p2pdoe.core.agreement.grid_solver import GridSolve, GridSolver, safe_within
from p2pdoe.core.agreement.polish import CouplingRows
from p2pdoe.core.agreement.polish_exchange import OUT_OF_STEP, DsoExchange, coupling_rows_of
from p2pdoe.core.agreement.protocol import (
    INVALID,
    UNKNOWN_SENDER,
    WRONG_ROUND,
    Command,
    Finished,
    Inbox,
    Publish,
    Received,
)
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import AdmmSettings
from p2pdoe.core.schemas.messages import (
    AdmmParameters,
    Grant,
    GrantedEnvelope,
    PolishReport,
    Proposal,
    ResidualReport,
    RoundOpen,
    Status,
    TradeProposal,
    WarmStart,
    warm_start_problem,
)

log = logging.getLogger(__name__)
PLAUSIBLE_SLACK_KW = 1.0  # what a solver's tolerance may add to a registered range, plus ...
PLAUSIBLE_SLACK_REL = 0.01  # ... this share of it


@dataclass(frozen=True)
class IterationRecord:
    iteration: int
    trade: Residuals
    envelope: Residuals
    rho_trade: float
    rho_envelope: float
    reciprocity_max_kw: float  # max |buy - sell| over every pair and interval
    envelope_gap_max_kw: float  # max |request - grant|
    price_change_max_eur_per_kwh: float = 0.0  # the most any trade or envelope price moved
    frozen: tuple[str, ...] = ()  # sites whose couplings kept their values (bounded staleness)


@dataclass(frozen=True)
class PolishRecord:
    """The certified polish's tries in a round (docs/agreement.md, "A certified polish")."""

    tries: int = 0
    rounds: int = 0  # over every try: each a solve at the parties' active sets and their checks
    steps: int = 0  # over every try: the coordinator's answers, each a round trip through the broker
    certified_at: int | None = None  # the ADMM iterations before the certified try


@dataclass(frozen=True)
class DsoOutcome:
    round: str
    status: Status
    iterations: int
    granted_lo_kw: FloatArray | None  # (C, T)
    granted_up_kw: FloatArray | None
    grid: GridSolve | None  # the last projection (row duals give the DLMP parts)
    rho_envelope: float  # EUR/(kW^2 h), at the last grant
    history: tuple[IterationRecord, ...]
    rho_trade: float  # EUR/(kW^2 h), at the last grant
    trades: Agreed  # (links, T) in `links_of(plan.peers)` order; price in EUR per kW and interval
    lo: Agreed | None  # (C, T) the envelope couplings after the last update; None without envelopes
    up: Agreed | None
    polish: PolishRecord = PolishRecord()


@dataclass(frozen=True)
class RoundPlan:
    """What the DSO announces when it opens a round (all public)."""

    round: str
    policy: str  # "dynamic", "static" or "none"
    start: str
    dt_h: float
    sites: tuple[str, ...]
    peers: tuple[tuple[int, ...], ...]  # trading graph, by site index
    initial_trade_price: tuple[float, ...]  # EUR/kWh per interval, public (from the retail tariffs)
    warm: WarmStart | None = None  # where the couplings start (announced in the opening); None: cold
    epoch: str | None = None  # the coordinator's run (a restarted one opens the same ids anew)
    ranges: tuple[str, ...] = ()  # per site, the digest of the ranges its requests are checked against
    traders: tuple[str, ...] | None = None  # who trades (None: every site); `peers` among them only
    markups: Mapping[str, float] | None = None  # each site's sale markup (None: honest bids)
    trial: bool = False  # a round that only measures: its envelopes are never in force


def with_rho(settings: AdmmSettings, rho: tuple[float, float] | None) -> AdmmSettings:
    """The settings starting from `rho` = (rho_trade, rho_envelope) instead, e.g. a previous round's."""
    return settings if rho is None else replace(settings, rho_trade=rho[0], rho_envelope=rho[1])


def links_of(peers: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """(buyer, seller) of every trade coupling, buyer-major: the order proposals stack in."""
    return [(b, s) for b in range(len(peers)) for s in peers[b]]


def warm_plan_problem(plan: RoundPlan, horizon: int) -> str | None:
    """Why the plan's warm start does not fit its round, or None."""
    if plan.warm is None:
        return None
    problem = warm_start_problem(plan.warm, plan.sites, horizon)
    links = {(plan.sites[b], plan.sites[s]) for b, s in links_of(plan.peers)}
    if problem is None and any((t.buyer, t.seller) not in links for t in plan.warm.trades):
        problem = "the warm start names a trade outside the trading graph"
    if problem is None and plan.policy == "none" and plan.warm.envelopes:
        problem = "a round without envelopes has no warm envelopes"
    return problem


@dataclass(frozen=True)
class _Parsed:
    """A proposal as arrays, parsed when it arrives (off the critical path): rows in the plan's peer
    order of its sender."""

    buy: FloatArray  # (peers, T)
    sell: FloatArray
    lo: FloatArray | None  # (T,)
    up: FloatArray | None
    entries: tuple[TradeProposal, ...] = ()  # the trade entries as sent, in the same order


def _warm_trades(plan: RoundPlan, links: list[tuple[int, int]], cold: Agreed) -> Agreed:
    """The trade couplings the warm start lists, from it (prices times dt_h, as the communities do)."""
    if plan.warm is None:
        return cold
    y, price = cold.y.copy(), cold.price.copy()
    position = {(plan.sites[b], plan.sites[s]): i for i, (b, s) in enumerate(links)}
    for t in plan.warm.trades:
        i = position[(t.buyer, t.seller)]
        y[i], price[i] = np.asarray(t.kw), np.asarray(t.price_eur_per_kwh) * plan.dt_h
    return Agreed(y, price)


def _warm_envelopes(plan: RoundPlan, horizon: int) -> tuple[Agreed, Agreed]:
    """(lo, up) couplings of every site: zero, or from the warm start where it lists the site."""
    n = len(plan.sites)
    lo_y, lo_p, up_y, up_p = (np.zeros((n, horizon)) for _ in range(4))
    for e in plan.warm.envelopes if plan.warm is not None else []:
        c = plan.sites.index(e.site)
        lo_y[c], up_y[c] = np.asarray(e.lo_kw), np.asarray(e.up_kw)
        lo_p[c] = np.asarray(e.lo_price_eur_per_kwh) * plan.dt_h
        up_p[c] = np.asarray(e.up_price_eur_per_kwh) * plan.dt_h
    return Agreed(lo_y, lo_p), Agreed(up_y, up_p)


class _State:
    def __init__(self, plan: RoundPlan, settings: AdmmSettings, horizon: int):
        links = links_of(plan.peers)
        n_links = len(links)
        self.links = links
        # links are sender-major, so stacked proposals give buy[b -> s] in link order; sell[s -> b]
        # sits at the position of the reversed link
        self.reverse = np.array([links.index((s, b)) for b, s in links], dtype=int)
        self.rho_trade = settings.rho_trade
        self.rho_envelope = settings.rho_envelope
        start_price = np.tile(np.asarray(plan.initial_trade_price) * plan.dt_h, (n_links, 1))
        self.trades = _warm_trades(plan, links, Agreed(np.zeros((n_links, horizon)), start_price))
        self.lo, self.up = _warm_envelopes(plan, horizon)
        self.grant: GridSolve | None = None
        self.history: list[IterationRecord] = []
        self.updates: deque[tuple[Agreed, Agreed, Agreed]] = deque(maxlen=settings.anderson.memory + 1)
        self.weights: list[float] | None = None  # Anderson's, for the next state (None: plain step)
        self.inbox: Inbox[_Parsed] = Inbox(frozenset(plan.sites))
        self.finished = False
        # bounded staleness: per site, the iteration its proposal was last used at, and that proposal
        self.used_at = dict.fromkeys(plan.sites, -1)
        self.last_used: dict[str, _Parsed] = {}


@dataclass(frozen=True)
class Ranges:
    """What each site registered: its technical range of net injection per interval, (C, T) in the
    plan's site order. A proposal beyond it (`implausible`) is refused before it reaches the ADMM."""

    x_min: FloatArray
    x_max: FloatArray

    @cached_property
    def _spans(self) -> FloatArray:
        """(C, T): each site's largest magnitude per interval."""
        return np.maximum(np.abs(self.x_min), np.abs(self.x_max))

    @cached_property
    def _everyone(self) -> FloatArray:
        """(T,): all the sites' spans together, the most any trade could carry."""
        everyone: FloatArray = self._spans.sum(axis=0)
        return everyone

    def implausible(self, c: int, p: _Parsed, peers: Sequence[str]) -> str | None:
        """Why site c's proposal (parsed; its trade rows with `peers`) cannot come from its registered
        assets, or None. Envelope requests lie in [x_min, x_max] of its own range; each trade in
        [0, the sum of every site's range] (a site may pass on what it buys, so its own range does not
        bound its trades, but no trade carries more than all the sites could inject); both with a
        solver's slack."""
        slack = PLAUSIBLE_SLACK_KW + PLAUSIBLE_SLACK_REL * self._spans[c]
        most = self._everyone * (1 + PLAUSIBLE_SLACK_REL) + slack
        for side, v in (("buy", p.buy), ("sell", p.sell)):
            beyond = (v < -slack) | (v > most)
            if beyond.any():
                k, t = divmod(int(np.argmax(beyond)), v.shape[1])
                return f"{side}_kw[{t}] with {peers[k]} = {v[k, t]:.6g} kW, beyond its registered range"
        envelope = () if p.lo is None or p.up is None else (("lo", p.lo), ("up", p.up))
        for side, w in envelope:
            outside = (w < self.x_min[c] - slack) | (w > self.x_max[c] + slack)
            if outside.any():
                t = int(np.argmax(outside))
                lo, hi = self.x_min[c, t], self.x_max[c, t]
                return f"envelope {side}_kw[{t}] = {w[t]:.6g} kW outside its range [{lo:.6g}, {hi:.6g}]"
        return None


class DsoParticipant:
    """`ranges`: what the sites registered, to refuse implausible proposals (None: no such check)."""

    def __init__(
        self,
        plan: RoundPlan,
        horizon: int,
        settings: AdmmSettings,
        grid: GridSolver | None,
        ranges: Ranges | None = None,
    ):
        if (grid is None) != (plan.policy == "none"):
            raise ValueError("a grid solver is needed exactly when the round has envelopes")
        problem = warm_plan_problem(plan, horizon)
        if problem is not None:
            raise ValueError(problem)
        if settings.staleness.max_behind and settings.anderson.memory:
            raise ValueError("bounded staleness needs Anderson acceleration off")
        if settings.staleness.max_behind and settings.polish.first:
            raise ValueError("bounded staleness needs the polish off")
        self.plan = plan
        self.horizon = horizon
        self.settings = settings
        self.grid = grid
        self.ranges = ranges
        self.rejected = 0
        self.implausible: dict[str, str] = {}  # site -> why its last refused proposal was implausible
        self._s = _State(plan, settings, horizon)
        self._stop_requested = False
        self._index = {site: c for c, site in enumerate(plan.sites)}
        self._peer_ids = tuple(tuple(plan.sites[m] for m in peers) for peers in plan.peers)
        self._peer_sets = tuple(frozenset(ids) for ids in self._peer_ids)
        # (peer m, its row for site c) for every site c: where c's relayed entries come from
        self._relay_rows = tuple(
            tuple((m, plan.peers[m].index(c)) for m in peers) for c, peers in enumerate(plan.peers)
        )
        self._accelerator = Accelerator(settings.anderson) if settings.anderson.memory else None
        self._polishing: DsoExchange | None = None
        self._polish_ignored_total: Counter[str] = Counter()
        self.polish_record = PolishRecord()

    @property
    def ignored(self) -> dict[str, int]:
        counts = dict(self._s.inbox.ignored + self._polish_ignored + self._polish_ignored_total)
        if self.rejected:
            counts[INVALID] = counts.get(INVALID, 0) + self.rejected
        return counts

    @property
    def last_record(self) -> IterationRecord | None:
        """The latest iteration's record (residuals and thresholds), None before the first."""
        return self._s.history[-1] if self._s.history else None

    @property
    def iteration(self) -> int:
        """The iteration whose proposals the DSO is waiting for."""
        return self._s.inbox.iteration

    def waiting_for(self) -> tuple[str, ...]:
        """Sites whose proposal of the current iteration has not arrived (empty once finished)."""
        if self._s.finished:
            return ()
        if self._polishing is not None:
            return self._polishing.waiting_for()
        return tuple(site for site in self.plan.sites if site not in self._s.inbox.current)

    def stop_at_next_iteration(self) -> None:
        """End the round early (a deadline): the grant of the iteration now awaited says "stopped"
        (unless it converges), and every community settles on it as at `max_iterations`."""
        self._stop_requested = True

    def may_step(self, msg: Proposal | PolishReport) -> bool:
        """Whether handling `msg` may run an iteration's step (it completes the current iteration),
        or a step of the polish."""
        if isinstance(msg, PolishReport):
            return self._polishing is not None and self._polishing.waiting_for() == (msg.sender,)
        inbox = self._s.inbox
        if self._s.finished or msg.round != self.plan.round or msg.sender not in self._index:
            return False
        if self._iteration_of(msg.sender, msg.iteration) != inbox.iteration:
            return False
        return msg.sender not in inbox.current and len(inbox.expected - inbox.current.keys()) == 1

    def _iteration_of(self, site: str, label: int) -> int:
        """The iteration a proposal counts for: its own, or with bounded staleness the current one for
        a site whose proposal answers the grant it was last used at (it arrives late)."""
        st = self._s
        late = self.settings.staleness.max_behind and label == st.used_at[site] + 1 < st.inbox.iteration
        return st.inbox.iteration if late else label

    def may_close_early(self) -> bool:
        """Whether the iteration may close now without the sites still missing (bounded staleness):
        enough sites have proposed, and each missing one has been used before (the first iteration
        waits for everyone) and would not be frozen for more than `max_behind` iterations in a row.
        Complete iterations close by themselves."""
        st, rule = self._s, self.settings.staleness
        missing = self.waiting_for()
        if not rule.max_behind or not missing or len(missing) == len(self.plan.sites):
            return False
        fresh = len(self.plan.sites) - len(missing)
        if fresh < rule.min_fresh_share * len(self.plan.sites):
            return False
        k = st.inbox.iteration
        return all(st.used_at[site] >= max(0, k - rule.max_behind) for site in missing)

    def close_early(self) -> list[Command]:
        """Close the current iteration with the proposals in (see `may_close_early`): the missing
        sites' couplings keep their values and prices, and their grants say so."""
        if not self.may_close_early():
            return []
        st = self._s
        iteration = st.inbox.iteration
        return self._iterate(iteration, st.inbox.advance())

    def open_round(self) -> list[Command]:
        self._project(accurate=True)  # from a warm start the first target is far from the last one
        s = self.settings
        return [
            Publish(
                RoundOpen(
                    round=self.plan.round,
                    policy=self.plan.policy,  # type: ignore[arg-type]
                    start=self.plan.start,
                    dt_h=self.plan.dt_h,
                    intervals=self.horizon,
                    sites=list(self.plan.sites),
                    admm=AdmmParameters(
                        rho_trade_eur_per_kw2h=s.rho_trade,
                        rho_envelope_eur_per_kw2h=s.rho_envelope,
                        over_relaxation=s.over_relaxation,
                        max_iterations=s.max_iterations,
                        anderson_memory=s.anderson.memory,
                        max_behind=s.staleness.max_behind,
                        relay_trades=s.relay_trades,
                    ),
                    initial_trade_price_eur_per_kwh=list(self.plan.initial_trade_price),
                    warm_start=self.plan.warm,
                    epoch=self.plan.epoch,
                    ranges=dict(zip(self.plan.sites, self.plan.ranges, strict=False)),
                    traders=None if self.plan.traders is None else list(self.plan.traders),
                    markups=None if self.plan.markups is None else dict(self.plan.markups),
                    trial=self.plan.trial,
                )
            )
        ]

    def handle(self, event: Received) -> list[Command]:
        msg = event.message
        st = self._s
        if isinstance(msg, PolishReport):
            if self._polishing is not None and not st.finished:
                return self._polish_step(self._polishing, msg)
            self._polish_ignored_total[OUT_OF_STEP] += 1  # late: its try is over
            return []
        if not isinstance(msg, Proposal) or st.finished:
            st.inbox.ignored["not_for_dso" if not st.finished else "after_round"] += 1
            return []
        if msg.round != self.plan.round:
            st.inbox.ignored[WRONG_ROUND] += 1
            return []
        c = self._index.get(msg.sender)
        if c is None:
            st.inbox.ignored[UNKNOWN_SENDER] += 1
            return []
        parsed = self._parsed(c, msg)
        if parsed is None:
            self.rejected += 1
            return []
        why = None if self.ranges is None else self.ranges.implausible(c, parsed, self._peer_ids[c])
        if why is not None:
            self.rejected += 1
            self.implausible[msg.sender] = why
            log.warning(
                "round %s: implausible proposal from %s refused: %s", self.plan.round, msg.sender, why
            )
            return []
        st.inbox.offer(msg.sender, self._iteration_of(msg.sender, msg.iteration), parsed)
        if not st.inbox.complete:
            return []
        iteration = st.inbox.iteration
        return self._iterate(iteration, st.inbox.advance())

    def _parsed(self, c: int, p: Proposal) -> _Parsed | None:
        """Site c's proposal as arrays, or None if it lacks what the DSO needs: one trade entry per
        peer of the plan and no other, every series a horizon long, an envelope exactly when the
        round has envelopes."""
        by_peer = {e.peer: e for e in p.trades}
        if len(by_peer) != len(p.trades) or by_peer.keys() != self._peer_sets[c]:
            return None
        env = p.envelope
        if (env is None) != (self.grid is None):
            return None
        trades = [by_peer[peer] for peer in self._peer_ids[c]]
        buy = _series([e.buy_kw for e in trades], self.horizon)
        sell = _series([e.sell_kw for e in trades], self.horizon)
        box = None if env is None else _series([env.lo_kw, env.up_kw], self.horizon)
        if buy is None or sell is None or (env is not None and box is None):
            return None
        lo, up = (None, None) if box is None else (box[0], box[1])
        return _Parsed(buy, sell, lo, up, tuple(trades))

    # --- one iteration ---------------------------------------------------------------------------

    def _iterate(self, iteration: int, proposals: dict[str, _Parsed]) -> list[Command]:
        st = self._s
        before = None if self._accelerator is None else self._state_vector()  # Anderson's x_k
        frozen = [site for site in self.plan.sites if site not in proposals]
        record = self._update(iteration, self._used(iteration, proposals))
        st.history.append(record)
        status = self._verdict(record, iteration, every_new=not frozen)
        if status == "running":
            if before is not None:
                self._accelerate(before)
            if not frozen:  # a frozen site solved with the rho it was last used with
                self._adapt_rho(record, iteration)
        polish = status == "running" and not frozen and self._polish_due(iteration + 1)
        relayed = self._relayed(proposals)
        grants: list[Command] = [
            Publish(g) for g in self._grants(iteration, status, record, frozen, relayed, polish)
        ]
        if status != "running":
            st.finished = True
            return [*grants, Finished(self._outcome(status, iteration + 1))]
        if polish:
            self._start_polish()
        self._project()
        return grants

    def _used(self, iteration: int, proposals: dict[str, _Parsed]) -> dict[str, _Parsed]:
        """Every site's proposal for the update: the new ones, else (frozen) the last one used."""
        st = self._s
        for site in proposals:
            st.used_at[site] = iteration
        st.last_used.update(proposals)
        return {site: st.last_used[site] for site in self.plan.sites}

    def _update(self, iteration: int, proposals: dict[str, _Parsed]) -> IterationRecord:
        """One step of every coupling; those of a frozen site (its proposal not new) keep their
        values and prices."""
        st, dt, alpha = self._s, self.plan.dt_h, self.settings.over_relaxation
        frozen = [c for c, site in enumerate(self.plan.sites) if st.used_at[site] != iteration]
        ordered = [proposals[site] for site in self.plan.sites]
        shape = st.trades.y.shape
        buy = np.concatenate([p.buy for p in ordered]).reshape(shape)
        sell = np.concatenate([p.sell for p in ordered]).reshape(shape)[st.reverse]
        rho_t = st.rho_trade * dt
        stale_links = [i for i, (b, s) in enumerate(st.links) if b in frozen or s in frozen]
        new_trades = kept_rows(consensus_step(buy, sell, st.trades, rho_t, alpha), st.trades, stale_links)
        trade_sums = residual_sums(buy, sell, st.trades, new_trades, rho_t) if st.links else ResidualSums()
        moved = _price_change(st.trades, new_trades)
        st.trades = new_trades
        env_sums, gap = ResidualSums(), 0.0
        if st.grant is not None:
            req_lo = np.array([p.lo for p in ordered])
            req_up = np.array([p.up for p in ordered])
            rho_e = st.rho_envelope * dt
            new_lo = kept_rows(consensus_step(req_lo, st.grant.lo, st.lo, rho_e, alpha), st.lo, frozen)
            new_up = kept_rows(consensus_step(req_up, st.grant.up, st.up, rho_e, alpha), st.up, frozen)
            env_sums = residual_sums(req_lo, st.grant.lo, st.lo, new_lo, rho_e) + residual_sums(
                req_up, st.grant.up, st.up, new_up, rho_e
            )
            moved = max(moved, _price_change(st.lo, new_lo), _price_change(st.up, new_up))
            st.lo, st.up = new_lo, new_up
            gap = float(max(np.abs(req_lo - st.grant.lo).max(), np.abs(req_up - st.grant.up).max()))
        eps_abs, eps_rel = self.settings.eps_abs_kw, self.settings.eps_rel
        return IterationRecord(
            iteration=iteration,
            trade=residuals(trade_sums, eps_abs, eps_rel),
            envelope=residuals(env_sums, eps_abs, eps_rel),
            rho_trade=st.rho_trade,
            rho_envelope=st.rho_envelope,
            reciprocity_max_kw=float(np.abs(buy - sell).max(initial=0.0)),
            envelope_gap_max_kw=gap,
            price_change_max_eur_per_kwh=moved / dt,
            frozen=tuple(self.plan.sites[c] for c in frozen),
        )

    def _state_vector(self) -> FloatArray:
        """Every coupling's value and price / rho (kW), the point Anderson's residuals are taken at."""
        st, dt = self._s, self.plan.dt_h
        parts = [st.trades.y.ravel(), st.trades.price.ravel() / (st.rho_trade * dt)]
        if st.grant is not None:
            rho_e = st.rho_envelope * dt
            parts += [
                st.lo.y.ravel(),
                st.lo.price.ravel() / rho_e,
                st.up.y.ravel(),
                st.up.price.ravel() / rho_e,
            ]
        return np.concatenate(parts)

    def _accelerate(self, before: FloatArray) -> None:
        """Anderson's mix of the last updates, the same the communities make with the grant's weights."""
        st = self._s
        assert self._accelerator is not None
        st.updates.append((st.trades, st.lo, st.up))
        st.weights = self._accelerator.weights(before, self._state_vector())
        if st.weights is None:
            return
        st.trades = mixed([u[0] for u in st.updates], st.weights)
        if st.grant is not None:
            st.lo = mixed([u[1] for u in st.updates], st.weights)
            st.up = mixed([u[2] for u in st.updates], st.weights)

    def _verdict(self, record: IterationRecord, iteration: int, every_new: bool = True) -> Status:
        """Converged only in an iteration that used a new proposal of every site."""
        prices_settled = record.price_change_max_eur_per_kwh <= self.settings.eps_price
        if every_new and record.trade.converged and record.envelope.converged and prices_settled:
            return "converged"
        if self._stop_requested:
            return "stopped"
        if iteration + 1 >= self.settings.max_iterations:
            return "max_iterations"
        return "running"

    def _adapt_rho(self, record: IterationRecord, iteration: int) -> None:
        """Residual balancing per family (Boyd §3.4.1): prices keep their value, only rho moves."""
        s, st = self.settings, self._s
        done = iteration + 1
        if not s.adaptive or done % s.adapt_every or done > s.adapt_until:
            return
        rho = (st.rho_trade, st.rho_envelope)
        st.rho_trade = rebalanced_rho(st.rho_trade, record.trade, s.adapt_ratio, s.adapt_factor)
        if st.grant is not None:
            st.rho_envelope = rebalanced_rho(st.rho_envelope, record.envelope, s.adapt_ratio, s.adapt_factor)
        if self._accelerator is not None and rho != (st.rho_trade, st.rho_envelope):
            self._accelerator.restart()

    def _project(self, accurate: bool = False) -> None:
        """The DSO's own step: the safe box nearest to y + price / rho (its copy carries -price)."""
        st = self._s
        if self.grid is None:
            return
        rho_e = st.rho_envelope * self.plan.dt_h
        st.grant = self.grid.solve(st.lo.y + st.lo.price / rho_e, st.up.y + st.up.price / rho_e, accurate)

    # --- messages and outcome --------------------------------------------------------------------

    def _relayed(self, proposals: dict[str, _Parsed]) -> list[dict[str, TradeProposal]] | None:
        """Per site, by peer, that peer's entry for it in the proposal this iteration used (a frozen
        peer's is left out), the very entry it sent; None unless the round relays trades."""
        if not self.settings.relay_trades:
            return None
        names = self.plan.sites
        return [
            {names[m]: proposals[names[m]].entries[k] for m, k in rows if names[m] in proposals}
            for rows in self._relay_rows
        ]

    def _grants(
        self,
        iteration: int,
        status: Status,
        record: IterationRecord,
        frozen: list[str],
        relayed: list[dict[str, TradeProposal]] | None = None,
        polish: bool = False,
    ) -> list[Grant]:
        """One grant per site of the round, each with that site's envelope alone (and its peers'
        entries for it, in a relayed round)."""
        st, dt = self._s, self.plan.dt_h
        residuals = ResidualReport(
            primal_trade_kw=record.trade.primal_kw,
            dual_trade_kw=record.trade.dual_kw,
            primal_envelope_kw=record.envelope.primal_kw,
            dual_envelope_kw=record.envelope.dual_kw,
        )
        envelopes: list[GrantedEnvelope | None] = [None] * len(self.plan.sites)
        if st.grant is not None:
            lo, up = st.grant.lo.tolist(), st.grant.up.tolist()
            import_price, export_price = (-st.lo.price / dt).tolist(), (st.up.price / dt).tolist()
            envelopes = [
                GrantedEnvelope(
                    lo_kw=lo[c],
                    up_kw=up[c],
                    import_price_eur_per_kwh=import_price[c],
                    export_price_eur_per_kwh=export_price[c],
                )
                for c in range(len(self.plan.sites))
            ]
        return [
            Grant(
                round=self.plan.round,
                iteration=iteration,
                recipient=site,
                status=status,
                envelope=envelope,
                residuals=residuals,
                next_rho_trade_eur_per_kw2h=st.rho_trade,
                next_rho_envelope_eur_per_kw2h=st.rho_envelope,
                anderson_weights=st.weights if status == "running" else None,
                frozen=frozen,
                relayed=None if relayed is None else relayed[c],
                polish=polish,
            )
            for c, (site, envelope) in enumerate(zip(self.plan.sites, envelopes, strict=True))
        ]

    def _outcome(self, status: Status, iterations: int) -> DsoOutcome:
        st = self._s
        return DsoOutcome(
            round=self.plan.round,
            status=status,
            iterations=iterations,
            granted_lo_kw=None if st.grant is None else st.grant.lo,
            granted_up_kw=None if st.grant is None else st.grant.up,
            grid=st.grant,
            rho_envelope=st.rho_envelope,
            history=tuple(st.history),
            rho_trade=st.rho_trade,
            trades=st.trades,
            lo=None if self.grid is None else st.lo,
            up=None if self.grid is None else st.up,
            polish=self.polish_record,
        )

    # --- the certified polish --------------------------------------------------------------------

    @property
    def _polish_ignored(self) -> Counter[str]:
        return self._polishing.ignored if self._polishing is not None else Counter()

    @cached_property
    def _polish_rows(self) -> CouplingRows:
        """The round's coupling rows (the same for every try)."""
        assert self.grid is not None
        return coupling_rows_of(self.plan.peers, self.horizon, self.grid.safe)

    def _polish_due(self, done: int) -> bool:
        """A try after `done` iterations: due by the settings, in a round of dynamic envelopes."""
        failed = self.polish_record.tries  # every try so far failed: a certified one ends the round
        wanted = self.plan.policy == "dynamic" and not self._stop_requested
        return wanted and self.settings.polish.due(done, failed)

    def _start_polish(self) -> None:
        """A try from the grants just sent (the projection before this iteration's) and the trade
        prices after this iteration's update."""
        st = self._s
        assert st.grant is not None
        assert self.grid is not None
        self._polishing = DsoExchange.start(
            self.plan.round,
            self.plan.sites,
            self.iteration,
            self._polish_rows,
            (st.grant.lo, st.grant.up),
            st.trades.price,
            self.settings.polish.max_rounds,
        )
        self.polish_record = replace(self.polish_record, tries=self.polish_record.tries + 1)

    def _polish_step(self, ex: DsoExchange, msg: PolishReport) -> list[Command]:
        answers = ex.offer(msg)
        if answers and self._stop_requested and ex.verdict is None:
            answers = ex.abandon()  # a deadline: ADMM's next grant says "stopped"
        if not answers:
            return []
        rec = self.polish_record
        rounds = rec.rounds + (answers[0].step == 0 and answers[0].verdict == "solve")
        self.polish_record = replace(rec, rounds=rounds, steps=rec.steps + 1)
        if ex.verdict is not None:
            self._polish_ignored_total.update(ex.ignored)
            self._polishing = None
        if ex.verdict != "certified":
            return [Publish(a) for a in answers]
        self.polish_record = replace(self.polish_record, certified_at=self.iteration)
        self._s.finished = True
        outcome = self._certified(ex)
        envelopes = self._grants(self.iteration - 1, "converged", self._s.history[-1], [])
        verdicts = [
            a.model_copy(update={"envelope": g.envelope}) for a, g in zip(answers, envelopes, strict=True)
        ]
        ex.sent = verdicts
        return [*(Publish(v) for v in verdicts), Finished(outcome)]

    def _certified(self, ex: DsoExchange) -> DsoOutcome:
        """The round's outcome at the polished optimum: the sites' envelope corners as granted (made
        safe to the projection's tolerance), the trades and their prices as the rows' multipliers
        say (the buyer's values)."""
        st, horizon = self._s, self.horizon
        assert self.grid is not None
        lo, up = safe_within(
            self.grid.safe,
            np.array([v[-2 * horizon : -horizon] for v in ex.values]),
            np.array([v[-horizon:] for v in ex.values]),
        )
        prices = ex.dso.coupling_prices()
        buy = [v[: len(self.plan.peers[c]) * horizon].reshape(-1, horizon) for c, v in enumerate(ex.values)]
        trade_y = np.array([buy[b][self.plan.peers[b].index(s)] for b, s in st.links]).reshape(
            st.trades.y.shape
        )
        trade_price = ex.dso.multipliers[: ex.dso.rows.reciprocity].reshape(st.trades.y.shape)
        st.grant = self._polished_grant(ex, lo, up)
        st.trades = Agreed(trade_y, trade_price)
        st.lo = Agreed(lo, np.array([p[-2 * horizon : -horizon] for p in prices]))
        st.up = Agreed(up, np.array([p[-horizon:] for p in prices]))
        return self._outcome("converged", self.iteration)

    def _polished_grant(self, ex: DsoExchange, lo: FloatArray, up: FloatArray) -> GridSolve:
        """The grant with the safe rows' multipliers as its row duals (scaled as the projection's:
        dlmp() multiplies them by rho_envelope; EUR/kWh = multiplier / dt_h)."""
        assert self.grid is not None
        horizon, rho_e = self.horizon, self._s.rho_envelope * self.plan.dt_h
        k_up = self.grid.safe.upper.g.shape[0]
        safe_rows = ex.dso.multipliers[ex.dso.rows.reciprocity :]
        return GridSolve(
            lo=lo,
            up=up,
            row_duals_up=safe_rows[: k_up * horizon].reshape(k_up, horizon) / rho_e,
            row_duals_lo=-safe_rows[k_up * horizon :].reshape(-1, horizon) / rho_e,
            status="certified polish",
            iterations=0,  # no projection solved it
        )


def _price_change(before: Agreed, after: Agreed) -> float:
    """The most any price of a family moved in one iteration, in EUR/kW per interval (/ dt_h: EUR/kWh)."""
    return float(np.abs(after.price - before.price).max(initial=0.0))


def _series(rows: list[list[float]], horizon: int) -> FloatArray | None:
    """(len(rows), horizon) floats, or None if any row is not a horizon long."""
    if any(len(row) != horizon for row in rows):
        return None
    return np.array(rows, dtype=float).reshape(len(rows), horizon)
