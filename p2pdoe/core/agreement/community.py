"""A community's side of the agreement: its private QP, its copies of every coupling, no I/O.

Per iteration k it solves its QP with the augmented terms and publishes one `Proposal` (every peer's
trade proposal and its envelope request). When every peer's proposal k and the DSO's grant k are in,
it updates each coupling exactly as the counterpart does (the pairwise trade prices are the two
peers' own business), mixes them with the grant's Anderson weights if it has any, then solves
again, or stops if the grant says the round is over.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from p2pdoe.core.agreement.anderson import mixed
from p2pdoe.core.agreement.coupling import Agreed, augmented_linear, consensus_step, kept_rows
from p2pdoe.core.agreement.local_solver import OSQP_SETTINGS, SETTLE_EPS, LocalSolver
from p2pdoe.core.agreement.polish_exchange import SiteExchange
from p2pdoe.core.agreement.protocol import (
    DUPLICATE,
    INVALID,
    NO_ROUND,
    ROUND_OVER,
    STALE,
    TOO_EARLY,
    UNKNOWN_SENDER,
    Command,
    Finished,
    Inbox,
    Publish,
    Received,
)
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.messages import (
    DSO_ID,
    EnvelopeRequest,
    Grant,
    GrantedEnvelope,
    PolishPrices,
    PolishReport,
    Proposal,
    RoundOpen,
    TradeProposal,
)
from p2pdoe.core.solution import Schedule, schedule_from_z

M = TypeVar("M")


@dataclass(frozen=True)
class CommunityOutcome:
    """The community's result: its last schedule, agreed trades and prices, the envelope in force."""

    site: str
    round: str
    status: str
    iterations: int
    z: FloatArray
    agreed_buy_kw: FloatArray  # (peers, T)
    agreed_sell_kw: FloatArray
    buy_price: FloatArray  # (peers, T) EUR/kWh paid to each peer
    sell_price: FloatArray  # (peers, T) EUR/kWh received from each peer
    granted_lo_kw: FloatArray | None  # (T,) the envelope in force, None without envelopes
    granted_up_kw: FloatArray | None
    local_osqp_iterations: tuple[int, ...]
    final_solve: str  # what the final schedule was solved with pinned (see CommunityParticipant._settle)
    # the multipliers of its last iteration's solve (not the pinned one): where a polish starts
    multipliers: FloatArray | None = None


def agreed_schedule(qp: CommunityQP, out: CommunityOutcome) -> Schedule:
    """The community's last schedule, with the agreed trades and the envelope in force (the grant)."""
    return schedule_from_z(qp, agreed_z(qp, out))


def agreed_z(qp: CommunityQP, out: CommunityOutcome) -> FloatArray:
    """The decision vector as agreed: granted envelope and agreed trades in place of the proposals."""
    lay, z = qp.layout, out.z.copy()
    if out.granted_lo_kw is not None and out.granted_up_kw is not None:
        z[lay.block("lo")], z[lay.block("up")] = out.granted_lo_kw, out.granted_up_kw
        z[lay.block("wid")] = out.granted_up_kw - out.granted_lo_kw
    for k in range(len(lay.peers)):
        z[lay.buy(k)], z[lay.sell(k)] = out.agreed_buy_kw[k], out.agreed_sell_kw[k]
    return z


def _warm_trades(open_: RoundOpen, links: list[tuple[str, str]]) -> Agreed:
    """The couplings of `links` (buyer, seller), one row each: from the opening's warm start where it
    lists the link, else cold (zero at the initial trade price). The counterpart reads the same."""
    horizon = open_.intervals
    y = np.zeros((len(links), horizon))
    price = np.tile(np.asarray(open_.initial_trade_price_eur_per_kwh) * open_.dt_h, (len(links), 1))
    warm = {(t.buyer, t.seller): t for t in open_.warm_start.trades} if open_.warm_start else {}
    for i, link in enumerate(links):
        if link in warm:
            y[i], price[i] = np.asarray(warm[link].kw), np.asarray(warm[link].price_eur_per_kwh) * open_.dt_h
    return Agreed(y, price)


def _warm_envelope(open_: RoundOpen, site: str) -> tuple[Agreed, Agreed]:
    """The site's (lo, up) couplings: from the opening's warm start where it lists the site, else zero."""
    zero = np.zeros(open_.intervals)
    mine = [e for e in open_.warm_start.envelopes if e.site == site] if open_.warm_start else []
    if not mine:
        return Agreed(zero, zero.copy()), Agreed(zero.copy(), zero.copy())
    e, dt = mine[0], open_.dt_h
    return (
        Agreed(np.asarray(e.lo_kw), np.asarray(e.lo_price_eur_per_kwh) * dt),
        Agreed(np.asarray(e.up_kw), np.asarray(e.up_price_eur_per_kwh) * dt),
    )


@dataclass
class _Ledger:
    """Bounded-staleness bookkeeping (a round with `max_behind` > 0): the grants, handled strictly in
    order, and each peer's proposals by label until used. A site's proposal answers the grant it was
    last used at (label = that iteration + 1); a grant that freezes a site uses none of its proposals."""

    sites: tuple[str, ...]  # the peers, then this site
    max_behind: int
    grant: int = 0  # the iteration of the next grant to handle
    grants: dict[int, Grant] = field(default_factory=dict)
    proposals: dict[str, dict[int, Proposal]] = field(default_factory=dict)
    used_at: dict[str, int] = field(default_factory=dict)  # per site, -1 before its first use

    def __post_init__(self) -> None:
        self.proposals = {site: {} for site in self.sites[:-1]}
        self.used_at = dict.fromkeys(self.sites, -1)

    def offer(self, msg: Proposal | Grant) -> str | None:
        """Keep a message, or say why not (a key of `Inbox.ignored`)."""
        if isinstance(msg, Grant):
            if msg.iteration > self.grant + self.max_behind + 1:
                return TOO_EARLY
            return self._keep(self.grants, msg.iteration, msg)
        if msg.iteration <= self.used_at[msg.sender]:
            return STALE
        if msg.iteration > self.grant + self.max_behind + 1:  # a peer may be as far ahead
            return TOO_EARLY
        return self._keep(self.proposals[msg.sender], msg.iteration, msg)

    @staticmethod
    def _keep(box: dict[int, M], key: int, msg: M) -> str | None:
        if key in box:
            return DUPLICATE
        box[key] = msg
        return None

    def ready(self, extra: Proposal | Grant | None = None) -> Grant | None:
        """The next grant, if it and every proposal it uses are in (counting `extra` as in)."""
        g = self.grants.get(self.grant)
        if g is None and isinstance(extra, Grant) and extra.iteration == self.grant:
            g = extra
        if g is None:
            return None
        for peer in self.sites[:-1]:
            label = self.used_at[peer] + 1
            extra_is_it = isinstance(extra, Proposal) and extra.sender == peer and extra.iteration == label
            if peer not in g.frozen and label not in self.proposals[peer] and not extra_is_it:
                return None
        return g

    def take(self, g: Grant) -> dict[str, Proposal]:
        """Hand over grant g's proposals (one per peer it does not freeze) and move to the next."""
        fresh = [site for site in self.sites if site not in g.frozen]
        taken = {p: self.proposals[p].pop(self.used_at[p] + 1) for p in fresh if p in self.proposals}
        for site in fresh:
            self.used_at[site] = g.iteration
        del self.grants[g.iteration]
        self.grant += 1
        return taken


class _Round:
    """Per-round state: the agreed values and prices of every coupling this community holds."""

    def __init__(self, open_: RoundOpen, site: str, peer_ids: tuple[str, ...]):
        self.id = open_.round
        self.dt_h = open_.dt_h
        self.alpha = open_.admm.over_relaxation
        self.rho_trade = open_.admm.rho_trade_eur_per_kw2h
        self.rho_envelope = open_.admm.rho_envelope_eur_per_kw2h
        self.relay = open_.admm.relay_trades  # the peers' entries come in the grants
        self.buy = _warm_trades(open_, [(site, peer) for peer in peer_ids])
        self.sell = _warm_trades(open_, [(peer, site) for peer in peer_ids])
        self.lo: Agreed | None = None
        self.up: Agreed | None = None
        if open_.policy != "none":
            self.lo, self.up = _warm_envelope(open_, site)
        self.z: FloatArray | None = None
        self.multipliers: FloatArray | None = None
        self.granted: tuple[FloatArray, FloatArray] | None = None
        self.final_solve = ""
        self.osqp_iterations: list[int] = []
        self.inbox: Inbox[Proposal | Grant] = Inbox(frozenset())
        self.ledger: _Ledger | None = None  # bounded staleness (None: every iteration complete)
        self.sent: list[Proposal] = []  # the last two proposals, sent again when the DSO repeats itself
        self.memory = open_.admm.anderson_memory
        self.polishing: SiteExchange | None = None  # a try of the certified polish under way
        # the last updates of (buy, sell, lo, up), which a grant's Anderson weights mix
        self.updates: deque[tuple[Agreed, Agreed, Agreed | None, Agreed | None]] = deque(
            maxlen=self.memory + 1
        )


SETTLED = ("solved", "solved inaccurate")


class CommunityParticipant:
    """`dt_h` is the interval length the QP was built for; a round announcing another is refused."""

    def __init__(self, site: str, peer_ids: tuple[str, ...], qp: CommunityQP, dt_h: float):
        if len(peer_ids) != len(qp.layout.peers):
            raise ValueError("one peer id per peer of the QP")
        if site == DSO_ID or DSO_ID in peer_ids:
            raise ValueError(f"{DSO_ID!r} is the coordinator's id, not a site's")
        self.site = site
        self.peer_ids = peer_ids
        self.qp = qp
        self.dt_h = dt_h
        self.horizon = qp.layout.horizon
        self._solver: LocalSolver | None = None
        self._round: _Round | None = None
        self._finished: set[str] = set()
        self.repeats_answered = 0  # openings and grants the coordinator repeated at a deadline
        self._early: list[Proposal | Grant] = []  # arrived before their round opened (bounded)
        self._ignored: Counter[str] = Counter()  # of rounds already over, and outside any round

    @property
    def ignored(self) -> dict[str, int]:
        counts = Counter(self._ignored)
        if self._round is not None:
            counts.update(self._round.inbox.ignored)
        return dict(counts)

    def may_solve(self, msg: RoundOpen | Proposal | Grant | PolishReport | PolishPrices) -> bool:
        """Whether handling `msg` may run a solve: an opening, the message that completes the
        current iteration, or the coordinator's message in a polish. Anything else is handled in
        microseconds (a service may keep it on its event loop instead of a worker thread)."""
        r = self._round
        if isinstance(msg, PolishReport):
            return False
        if isinstance(msg, PolishPrices):
            return r is not None and r.polishing is not None and msg.round == r.id
        if isinstance(msg, RoundOpen) or r is None or msg.round != r.id:
            return isinstance(msg, RoundOpen)
        if r.relay and isinstance(msg, Proposal):
            return False
        if isinstance(msg, Grant) and msg.recipient != self.site:
            return False
        if r.ledger is not None:
            g = r.ledger.ready(msg)
            return g is not None and (self.site not in g.frozen or g.status != "running")
        inbox = r.inbox
        if msg.iteration != inbox.iteration or msg.sender in inbox.current:
            return False
        if isinstance(msg, Grant) and msg.recipient != self.site:
            return False
        return len(inbox.expected - inbox.current.keys()) == 1

    def handle(self, event: Received) -> list[Command]:
        msg = event.message
        if isinstance(msg, RoundOpen):
            return self._open(msg)
        if isinstance(msg, PolishReport):  # the coordinator's alone
            self._ignored[UNKNOWN_SENDER] += 1
            return []
        if isinstance(msg, PolishPrices):
            return self._polish_step(msg)
        if not self._from_counterpart(msg):
            self._ignored[UNKNOWN_SENDER] += 1
            return []
        if not self._fits(msg):
            self._ignored[INVALID] += 1
            return []
        r = self._round
        if r is None or msg.round != r.id:
            return self._outside_round(msg)
        if not _fits_round(r, msg, self.site, self.peer_ids):
            self._ignored[INVALID] += 1
            return []
        if r.relay and isinstance(msg, Proposal):  # sent on before this site left the peers' topics
            return []
        if r.ledger is not None:
            return self._offer_late(r, r.ledger, msg)
        repeated = isinstance(msg, Grant) and _seen(r.inbox, msg.iteration)
        r.inbox.offer(msg.sender, msg.iteration, msg)
        if repeated:  # the coordinator repeats itself when a proposal is missing: send ours again
            return self._again(r)
        return self._step_while_complete(r)

    # --- round lifecycle -------------------------------------------------------------------------

    def _outside_round(self, msg: Proposal | Grant) -> list[Command]:
        """A message of a round not open here: one already over (ignored), or one whose opening has
        not arrived yet (kept, up to one iteration's worth, and replayed when it opens)."""
        if msg.round in self._finished:
            self._ignored[ROUND_OVER] += 1
        elif len(self._early) < 2 * (len(self.peer_ids) + 1):
            self._early.append(msg)
        else:
            self._ignored[NO_ROUND] += 1
        return []

    def _open(self, msg: RoundOpen) -> list[Command]:
        if self._round is not None and msg.round == self._round.id:
            self._ignored[DUPLICATE] += 1
            return self._again(self._round)  # repeated: a proposal went missing somewhere
        if msg.round in self._finished:
            self._ignored[DUPLICATE] += 1
            return []
        if not self._accepts(msg):
            self._ignored[INVALID] += 1
            return []
        if self._round is not None:  # a new round supersedes the one in progress
            self._ignored.update(self._round.inbox.ignored)
        r = _Round(msg, self.site, self.peer_ids)
        heard = () if r.relay else self.peer_ids  # whose proposals this site waits for
        r.inbox = Inbox(frozenset(heard) | {DSO_ID})
        if msg.admm.max_behind:
            r.ledger = _Ledger((*heard, self.site), msg.admm.max_behind)
        self._round = r
        self._solver = LocalSolver(self.qp, self._rho_diagonal(r))
        out: list[Command] = [self._solve_and_propose(r, 0)]
        early, self._early = [m for m in self._early if m.round == r.id], []
        for m in early:
            if not _fits_round(r, m, self.site, self.peer_ids):
                self._ignored[INVALID] += 1
            elif r.relay and isinstance(m, Proposal):
                continue
            elif r.ledger is not None:
                self._ignored.update(filter(None, [r.ledger.offer(m)]))
            else:
                r.inbox.offer(m.sender, m.iteration, m)
        return out + (self._step_while_ready(r, r.ledger) if r.ledger else self._step_while_complete(r))

    def _again(self, r: _Round) -> list[Command]:
        """The last two proposals once more (the same numbers: no solve), for a coordinator or a peer
        that lost one (a broker that restarted without persistence loses what it had not delivered).
        Two, because a peer one iteration behind still needs the previous one to catch up."""
        self.repeats_answered += 1
        again: list[Proposal | PolishReport] = [*r.sent, *(r.polishing.sent if r.polishing else [])]
        return [Publish(p) for p in again]  # with a try under way a peer may still miss a proposal

    def _accepts(self, msg: RoundOpen) -> bool:
        return (
            self.site in msg.sites
            and set(self.peer_ids) <= set(msg.sites)
            and msg.intervals == self.horizon
            and abs(msg.dt_h - self.dt_h) < 1e-9
            and len(msg.initial_trade_price_eur_per_kwh) == self.horizon
        )

    def _close(self, r: _Round) -> None:
        self._ignored.update(r.inbox.ignored)
        self._finished.add(r.id)
        self._round = None

    def _offer_late(self, r: _Round, ledger: _Ledger, msg: Proposal | Grant) -> list[Command]:
        if isinstance(msg, Grant) and (msg.iteration < ledger.grant or msg.iteration in ledger.grants):
            r.inbox.ignored[STALE if msg.iteration < ledger.grant else DUPLICATE] += 1
            return self._again(r)  # a repeat: the coordinator misses a proposal
        why = ledger.offer(msg)
        if why is not None:
            r.inbox.ignored[why] += 1
            return []
        return self._step_while_ready(r, ledger)

    def _step_while_ready(self, r: _Round, ledger: _Ledger) -> list[Command]:
        """Bounded staleness: every grant in order, each once the proposals it uses are in. A grant
        that freezes this site moves none of its couplings and asks for no new proposal."""
        out: list[Command] = []
        while (grant := ledger.ready()) is not None:
            mine = self.site not in grant.frozen
            proposals = ledger.take(grant)
            if mine:
                self._update(r, _theirs(r, self.site, proposals, grant), grant)
            elif grant.envelope is not None:  # the latest grant is the one in force, frozen or not
                r.granted = (np.asarray(grant.envelope.lo_kw), np.asarray(grant.envelope.up_kw))
            if grant.status != "running":
                self._settle(r)
                out.append(Finished(self._outcome(r, grant.status, grant.iteration + 1)))
                self._close(r)
                break
            if mine:
                self._set_rho(r, grant)
                out.append(self._solve_and_propose(r, grant.iteration + 1))
        return out

    def _set_rho(self, r: _Round, grant: Grant) -> None:
        r.rho_trade = grant.next_rho_trade_eur_per_kw2h
        r.rho_envelope = grant.next_rho_envelope_eur_per_kw2h
        assert self._solver is not None
        self._solver.set_rho(self._rho_diagonal(r))

    def _step_while_complete(self, r: _Round) -> list[Command]:
        out: list[Command] = []
        while r.inbox.complete:
            iteration = r.inbox.iteration
            messages = r.inbox.advance()
            grant = messages.pop(DSO_ID)
            assert isinstance(grant, Grant)
            proposals = {m.sender: m for m in messages.values() if isinstance(m, Proposal)}
            self._update(r, _theirs(r, self.site, proposals, grant), grant)
            if grant.status != "running":
                self._settle(r)
                out.append(Finished(self._outcome(r, grant.status, iteration + 1)))
                self._close(r)
                break
            self._set_rho(r, grant)
            if grant.polish:
                assert r.multipliers is not None  # from the solve that grant answers
                r.polishing = SiteExchange.start(r.id, self.site, iteration + 1, self.qp, r.multipliers)
                out += [Publish(p) for p in r.polishing.opening()]
                break
            out.append(self._solve_and_propose(r, iteration + 1))
        return out

    # --- the certified polish --------------------------------------------------------------------

    def _polish_step(self, msg: PolishPrices) -> list[Command]:
        r = self._round
        if msg.recipient != self.site:
            self._ignored[INVALID] += 1
            return []
        if r is None or msg.round != r.id:
            self._ignored[ROUND_OVER if msg.round in self._finished else NO_ROUND] += 1
            return []
        if r.polishing is None:  # the coordinator repeats its verdict: a proposal went missing
            r.inbox.ignored[DUPLICATE] += 1
            return self._again(r)
        ex = r.polishing
        reports, verdict = ex.offer(msg)
        out: list[Command] = [Publish(p) for p in reports]
        if verdict is None:
            return out
        if verdict == "certified" and not _fits_envelope(msg.envelope, r.lo is not None, self.horizon):
            self._ignored[INVALID] += 1  # wait for the coordinator's repeat
            return out
        self._ignored.update(ex.ignored)
        r.polishing = None
        if verdict == "abandoned":  # ADMM goes on where it was
            out.append(self._solve_and_propose(r, r.inbox.iteration))
            return out + self._step_while_complete(r)
        self._take_polished(r, ex, msg.envelope)
        out.append(Finished(self._outcome(r, "converged", r.inbox.iteration)))
        self._close(r)
        return out

    def _take_polished(self, r: _Round, ex: SiteExchange, granted: GrantedEnvelope | None) -> None:
        """The certified optimum: its schedule, its trades at the rows' prices, the envelope the
        coordinator grants (its own corners, made safe to the projection's tolerance)."""
        lay, z, nu = self.qp.layout, ex.polish.schedule(), ex.polish.prices
        n = len(self.peer_ids)
        shape = r.buy.y.shape
        trades = n * self.horizon
        r.z, r.multipliers, r.final_solve = z, ex.polish.multipliers(), "certified polish"
        r.buy = Agreed(z[lay.trades][:trades].reshape(shape), nu[:trades].reshape(shape))
        r.sell = Agreed(z[lay.trades][trades:].reshape(shape), -nu[trades : 2 * trades].reshape(shape))
        if r.lo is not None and granted is not None:
            r.granted = (np.asarray(granted.lo_kw), np.asarray(granted.up_kw))

    # --- the maths -------------------------------------------------------------------------------

    def _rho_diagonal(self, r: _Round) -> FloatArray:
        lay = self.qp.layout
        rho = np.zeros(lay.size)
        rho[lay.trades] = r.rho_trade * r.dt_h
        if r.lo is not None:
            rho[lay.block("lo")] = r.rho_envelope * r.dt_h
            rho[lay.block("up")] = r.rho_envelope * r.dt_h
        return rho

    def _linear_term(self, r: _Round) -> FloatArray:
        lay = self.qp.layout
        q = self.qp.q.copy()
        rho_t = r.rho_trade * r.dt_h
        for k in range(len(self.peer_ids)):
            q[lay.buy(k)] += augmented_linear(r.buy.price[k], r.buy.y[k], rho_t, first=True)
            q[lay.sell(k)] += augmented_linear(r.sell.price[k], r.sell.y[k], rho_t, first=False)
        if r.lo is not None and r.up is not None:
            rho_e = r.rho_envelope * r.dt_h
            q[lay.block("lo")] += augmented_linear(r.lo.price, r.lo.y, rho_e, first=True)
            q[lay.block("up")] += augmented_linear(r.up.price, r.up.y, rho_e, first=True)
        return q

    def _solve_and_propose(self, r: _Round, label: int) -> Publish:
        """Solve and propose; `label`: the grant the proposal answers plus 1."""
        assert self._solver is not None
        result = self._solver.solve(self._linear_term(r))
        r.z, r.multipliers = result.z, result.y
        r.osqp_iterations.append(result.iterations)
        proposal = self._proposal(r, label)
        r.sent = [*r.sent[-1:], proposal]
        return Publish(proposal)

    def _proposal(self, r: _Round, iteration: int) -> Proposal:
        assert r.z is not None
        lay, z = self.qp.layout, r.z
        trades = [
            TradeProposal(peer=peer, buy_kw=z[lay.buy(k)].tolist(), sell_kw=z[lay.sell(k)].tolist())
            for k, peer in enumerate(self.peer_ids)
        ]
        envelope = None
        if r.lo is not None:
            envelope = EnvelopeRequest(lo_kw=z[lay.block("lo")].tolist(), up_kw=z[lay.block("up")].tolist())
        return Proposal(round=r.id, iteration=iteration, sender=self.site, trades=trades, envelope=envelope)

    def _update(self, r: _Round, theirs: dict[str, TradeProposal], grant: Grant) -> None:
        """Every coupling of this community, from its own last proposal and its counterparts' entries
        for it (`theirs`, by peer). A peer without one here (frozen by the grant) keeps its couplings
        with this site as they are."""
        assert r.z is not None
        lay, z = self.qp.layout, r.z
        mine_buy = np.array([z[lay.buy(k)] for k in range(len(self.peer_ids))]).reshape(r.buy.y.shape)
        mine_sell = np.array([z[lay.sell(k)] for k in range(len(self.peer_ids))]).reshape(r.sell.y.shape)
        frozen = [k for k, p in enumerate(self.peer_ids) if p not in theirs]
        theirs_sell = np.array(
            [theirs[p].sell_kw if p in theirs else r.buy.y[k] for k, p in enumerate(self.peer_ids)]
        ).reshape(r.buy.y.shape)
        theirs_buy = np.array(
            [theirs[p].buy_kw if p in theirs else r.sell.y[k] for k, p in enumerate(self.peer_ids)]
        ).reshape(r.sell.y.shape)
        rho_t = r.rho_trade * r.dt_h
        # canonical order: buyer's copy first, as the peer computes it
        r.buy = kept_rows(consensus_step(mine_buy, theirs_sell, r.buy, rho_t, r.alpha), r.buy, frozen)
        r.sell = kept_rows(consensus_step(theirs_buy, mine_sell, r.sell, rho_t, r.alpha), r.sell, frozen)
        if r.lo is not None and r.up is not None:
            mine = grant.envelope
            assert mine is not None  # checked on arrival against the round
            rho_e = r.rho_envelope * r.dt_h
            r.lo = consensus_step(z[lay.block("lo")], np.asarray(mine.lo_kw), r.lo, rho_e, r.alpha)
            r.up = consensus_step(z[lay.block("up")], np.asarray(mine.up_kw), r.up, rho_e, r.alpha)
            r.granted = (np.asarray(mine.lo_kw), np.asarray(mine.up_kw))
        if r.memory:
            r.updates.append((r.buy, r.sell, r.lo, r.up))
        if grant.anderson_weights is not None and grant.status == "running":
            self._mix(r, grant.anderson_weights)

    def _mix(self, r: _Round, weights: list[float]) -> None:
        """Anderson's step: every coupling a combination of its last updates, as the DSO mixes its copy."""
        r.buy = mixed([u[0] for u in r.updates], weights)
        r.sell = mixed([u[1] for u in r.updates], weights)
        if r.lo is not None:
            r.lo = mixed([u[2] for u in r.updates], weights)  # type: ignore[misc]
            r.up = mixed([u[3] for u in r.updates], weights)  # type: ignore[misc]

    def _settle(self, r: _Round) -> None:
        """The final schedule: re-solve with the agreed trades and the granted envelope pinned, so the
        schedule balances, trades are reciprocal and the net injection lies inside the grant. If
        the assets cannot reach the grant, the envelope alone is pinned; failing that, the last
        proposal stands (and `final_solve` says so)."""
        assert self._solver is not None
        lay = self.qp.layout
        limit = self.qp.upper[-lay.size :][lay.trades]
        trades = np.clip(np.concatenate([r.buy.y.ravel(), r.sell.y.ravel()]), 0.0, limit)
        r.buy = Agreed(trades[: r.buy.y.size].reshape(r.buy.y.shape), r.buy.price)
        r.sell = Agreed(trades[r.buy.y.size :].reshape(r.sell.y.shape), r.sell.price)
        envelope: list[tuple[slice, FloatArray]] = []
        if r.granted is not None:
            envelope = [(lay.block("lo"), r.granted[0]), (lay.block("up"), r.granted[1])]
        pinned = [(lay.trades, trades), *envelope]
        for eps in (SETTLE_EPS, float(str(OSQP_SETTINGS["eps_abs"]))):
            result = self._solver.solve_fixed(self.qp.q, pinned, eps)
            if result.status in SETTLED:
                r.z, r.final_solve = result.z, "trades and envelope"
                return
        # trades free again, at the agreed prices and without augmented terms
        self._solver.set_rho(np.zeros(lay.size))
        result = self._solver.solve_fixed(self._priced_linear_term(r), envelope, SETTLE_EPS)
        if result.status in SETTLED:
            r.z, r.final_solve = result.z, "envelope"
            return
        r.final_solve = "last proposal"

    def _priced_linear_term(self, r: _Round) -> FloatArray:
        """The community's own linear term plus what it pays and earns at the agreed trade prices."""
        lay = self.qp.layout
        q = self.qp.q.copy()
        for k in range(len(self.peer_ids)):
            q[lay.buy(k)] += r.buy.price[k]
            q[lay.sell(k)] -= r.sell.price[k]
        return q

    def _outcome(self, r: _Round, status: str, iterations: int) -> CommunityOutcome:
        assert r.z is not None
        granted = r.granted or (None, None)
        return CommunityOutcome(
            site=self.site,
            round=r.id,
            status=status,
            iterations=iterations,
            z=r.z,
            agreed_buy_kw=r.buy.y,
            agreed_sell_kw=r.sell.y,
            buy_price=r.buy.price / r.dt_h,
            sell_price=r.sell.price / r.dt_h,
            granted_lo_kw=granted[0],
            granted_up_kw=granted[1],
            local_osqp_iterations=tuple(r.osqp_iterations),
            final_solve=r.final_solve,
            multipliers=r.multipliers,
        )

    def _from_counterpart(self, msg: Proposal | Grant) -> bool:
        """Proposals only from this community's peers, grants only from the DSO."""
        return msg.sender in self.peer_ids if isinstance(msg, Proposal) else msg.sender == DSO_ID

    def _fits(self, msg: Proposal | Grant) -> bool:
        """The message has what this community needs, with the right lengths."""
        t = self.horizon
        if isinstance(msg, Proposal):
            entries = [e for e in msg.trades if e.peer == self.site]
            return len(entries) == 1 and len(entries[0].buy_kw) == t and len(entries[0].sell_kw) == t
        if msg.recipient != self.site:
            return False
        e = msg.envelope  # None: a round without envelopes; checked against the round when used
        return e is None or (len(e.lo_kw) == t and len(e.up_kw) == t)


def _fits_round(r: _Round, msg: Proposal | Grant, site: str, peer_ids: tuple[str, ...]) -> bool:
    """A grant has an envelope exactly when the round has envelopes, no more Anderson weights than
    the round's memory, and in a relayed round an entry for `site`, a horizon long, from every peer
    it does not freeze and from no one else."""
    if not isinstance(msg, Grant):
        return True
    w = msg.anderson_weights
    if (r.lo is None) != (msg.envelope is None) or (w is not None and len(w) > r.memory + 1):
        return False
    if not r.relay:
        return True
    if msg.relayed is None:
        return False
    horizon = r.buy.y.shape[1]
    expected = {p for p in peer_ids if p not in msg.frozen}
    entries = msg.relayed.values()
    fits = all(e.peer == site and len(e.buy_kw) == horizon and len(e.sell_kw) == horizon for e in entries)
    return fits and msg.relayed.keys() == expected


def _fits_envelope(e: GrantedEnvelope | None, wanted: bool, horizon: int) -> bool:
    """A certified verdict's envelope: there exactly when the round has envelopes, a horizon long."""
    if e is None:
        return not wanted
    return wanted and all(len(v) == horizon for v in (e.lo_kw, e.up_kw))


def _theirs(r: _Round, site: str, proposals: dict[str, Proposal], grant: Grant) -> dict[str, TradeProposal]:
    """Each peer's entry for `site`, by peer: relayed in the grant, or from the peer's own proposal."""
    if r.relay:
        assert grant.relayed is not None  # checked on arrival (`_fits_round`)
        return grant.relayed
    return {p: _entry(m, site) for p, m in proposals.items()}


def _entry(p: Proposal, site: str) -> TradeProposal:
    return next(e for e in p.trades if e.peer == site)


def _seen(inbox: Inbox[Proposal | Grant], iteration: int) -> bool:
    """Whether the grant of `iteration` was already taken (handled, or waiting in this iteration)."""
    return iteration < inbox.iteration or (iteration == inbox.iteration and DSO_ID in inbox.current)
