"""The payment agreement of Nash bargaining (stage 2) as message-driven machines: pure.

`PaymentParty` is one community's part (p2pdoe.core.bargaining.BargainingCommunity: its gain stays
inside), `PaymentChair` the coordinator's: it hears every proposal, and grants each iteration its
verdict from the copies alone. An iteration k ends for a community when it holds its peers' copies
of iteration k and the grant of k: it agrees on each link (the mean of the two copies), takes its
dual step, and proposes k + 1 while the grant says "running". `bargain` runs the same machines
in-process, so the figures of `compare --markets` come from the messages the services exchange.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from p2pdoe.core.agreement.protocol import INVALID, ROUND_OVER, TOO_EARLY, WRONG_ROUND, Inbox
from p2pdoe.core.bargaining import (
    Bargain,
    BargainingCommunity,
    Link,
    closed_form_gains,
    default_rho,
    links_of,
)
from p2pdoe.core.schemas.messages import Status
from p2pdoe.core.schemas.payments import (
    LinkPayment,
    PaymentGrant,
    PaymentLink,
    PaymentMessage,
    PaymentOpen,
    PaymentProposal,
)

__all__ = ["PaymentChair", "PaymentOutcome", "PaymentParty", "PaymentResult", "bargain", "run_payments"]


@dataclass(frozen=True)
class Publish:
    message: PaymentMessage


@dataclass(frozen=True)
class PaymentOutcome:
    """A community's result: the agreed payments on its links and what it pays in all."""

    site: str
    round: str
    status: str
    iterations: int
    payments: dict[Link, float]
    net_payment_eur: float


@dataclass(frozen=True)
class PaymentResult:
    """The coordinator's result: every link's agreed payment and each site's net payment."""

    round: str
    status: str
    iterations: int
    payments: dict[Link, float]
    net_payment_eur: dict[str, float]


Command = Publish | PaymentOutcome | PaymentResult


def _links(open_: PaymentOpen) -> list[Link]:
    return [link.ends for link in open_.links]


def _net(site: str, payments: Mapping[Link, float]) -> float:
    return sum(v if e[0] == site else -v for e, v in payments.items() if site in e)


@dataclass
class PaymentParty:
    """One community in the payment round; `gain_eur` (C0 - C*, from its own two rounds) is private."""

    site: str
    open: PaymentOpen
    gain_eur: float
    ignored: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mine = [e for e in _links(self.open) if self.site in e]
        self.party = BargainingCommunity(
            self.site, float(self.gain_eur), self.open.weights[self.site], mine, self.open.rho_per_eur2
        )
        self.peer_of = {e: e[1] if e[0] == self.site else e[0] for e in mine}
        self.inbox: Inbox[PaymentProposal] = Inbox(frozenset(self.peer_of.values()))
        self.grants: dict[int, PaymentGrant] = {}
        self.latest: PaymentProposal | None = None
        self.done = False

    def start(self) -> list[Command]:
        return [self._propose()]

    def handle(self, msg: PaymentMessage) -> list[Command]:
        if msg.round != self.open.round:
            return self._ignore(WRONG_ROUND)
        if self.done:
            return self._ignore(ROUND_OVER)
        if isinstance(msg, PaymentOpen) or (
            isinstance(msg, PaymentGrant) and msg.iteration < self.inbox.iteration
        ):
            return [] if self.latest is None else [Publish(self.latest)]  # a repeat: say it again
        if isinstance(msg, PaymentGrant):
            if msg.iteration > self.inbox.iteration:
                return self._ignore(TOO_EARLY)
            self.grants[msg.iteration] = msg
        elif msg.sender != self.site:
            if not self._covers_our_links(msg):
                return self._ignore(INVALID)
            self.inbox.offer(msg.sender, msg.iteration, msg)
        return self._advance()

    def _covers_our_links(self, msg: PaymentProposal) -> bool:
        theirs = {(p.payer, p.payee) for p in msg.payments}
        return all(e in theirs for e, peer in self.peer_of.items() if peer == msg.sender)

    def _advance(self) -> list[Command]:
        out: list[Command] = []
        while self.inbox.complete and self.inbox.iteration in self.grants:
            grant = self.grants.pop(self.inbox.iteration)
            proposals = self.inbox.advance()
            theirs = {e: _copy(proposals[peer], e) for e, peer in self.peer_of.items()}
            self.party.agree(theirs)
            if grant.status != "running":
                self.done = True
                out.append(self._outcome(grant))
                break
            out.append(self._propose())
        return out

    def _propose(self) -> Publish:
        copies = self.party.propose()
        self.latest = PaymentProposal(
            round=self.open.round,
            iteration=self.inbox.iteration,
            sender=self.site,
            payments=[LinkPayment(payer=e[0], payee=e[1], eur=float(v)) for e, v in copies.items()],
        )
        return Publish(self.latest)

    def _outcome(self, grant: PaymentGrant) -> PaymentOutcome:
        agreed = dict(self.party.agreed)
        return PaymentOutcome(
            self.site, self.open.round, grant.status, grant.iteration + 1, agreed, _net(self.site, agreed)
        )

    def _ignore(self, reason: str) -> list[Command]:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        return []


def _copy(msg: PaymentProposal, e: Link) -> float:
    return next(p.eur for p in msg.payments if (p.payer, p.payee) == e)


@dataclass
class PaymentChair:
    """The coordinator's part: collects every site's copies per iteration and grants the verdict."""

    open: PaymentOpen
    ignored: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.links = _links(self.open)
        self.inbox: Inbox[PaymentProposal] = Inbox(frozenset(self.open.weights))
        self.agreed: dict[Link, float] = dict.fromkeys(self.links, 0.0)
        self.last: PaymentGrant | None = None
        self.done = False

    def handle(self, msg: PaymentProposal) -> list[Command]:
        if msg.round != self.open.round or self.done:
            return self._ignore(ROUND_OVER if self.done else WRONG_ROUND)
        mine = {e for e in self.links if msg.sender in e}
        if {(p.payer, p.payee) for p in msg.payments} != mine or len(msg.payments) != len(mine):
            return self._ignore(INVALID)
        self.inbox.offer(msg.sender, msg.iteration, msg)
        out: list[Command] = []
        while self.inbox.complete and not self.done:
            out += self._grant(self.inbox.iteration, self.inbox.advance())
        return out

    def _ignore(self, reason: str) -> list[Command]:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        return []

    def waiting_for(self) -> tuple[str, ...]:
        return tuple(sorted(self.inbox.expected - self.inbox.current.keys()))

    def _grant(self, k: int, proposals: dict[str, PaymentProposal]) -> list[Command]:
        gap = moved = 0.0
        for e in self.links:
            a, b = _copy(proposals[e[0]], e), _copy(proposals[e[1]], e)
            mean = 0.5 * (a + b)
            gap, moved = max(gap, abs(a - b)), max(moved, abs(mean - self.agreed[e]))
            self.agreed[e] = mean
        tol = self.open.tol_eur
        status: Status = "running"
        if gap <= tol and moved <= tol:
            status = "converged"
        elif k + 1 >= self.open.max_iterations:
            status = "max_iterations"
        self.last = PaymentGrant(
            round=self.open.round, iteration=k, status=status, gap_eur=gap, moved_eur=moved
        )
        out: list[Command] = [Publish(self.last)]
        if status != "running":
            self.done = True
            net = {s: _net(s, self.agreed) for s in self.open.weights}
            out.append(PaymentResult(self.open.round, status, k + 1, dict(self.agreed), net))
        return out


def payment_open(
    round_id: str,
    baseline_round: str,
    agreement_round: str,
    weights: Mapping[str, float],
    peers: Mapping[str, Sequence[str]],
    rho: float,
    tol_eur: float = 1e-4,
    max_iterations: int = 5000,
) -> PaymentOpen:
    return PaymentOpen(
        round=round_id,
        baseline_round=baseline_round,
        agreement_round=agreement_round,
        links=[PaymentLink(payer=a, payee=b) for a, b in links_of(peers)],
        weights={c: float(w) for c, w in weights.items()},
        rho_per_eur2=float(rho),
        tol_eur=tol_eur,
        max_iterations=max_iterations,
    )


def run_payments(
    open_: PaymentOpen, gains: Mapping[str, float]
) -> tuple[PaymentResult, dict[str, PaymentOutcome]]:
    """The payment round in-process: every message delivered in the order it was sent, a proposal to
    the chair and the sender's peers, a grant to every party."""
    chair = PaymentChair(open_)
    parties = {s: PaymentParty(s, open_, gains[s]) for s in open_.weights}
    queue: deque[Command] = deque(c for p in parties.values() for c in p.start())
    result: PaymentResult | None = None
    outcomes: dict[str, PaymentOutcome] = {}
    while queue:
        cmd = queue.popleft()
        if isinstance(cmd, PaymentResult):
            result = cmd
        elif isinstance(cmd, PaymentOutcome):
            outcomes[cmd.site] = cmd
        elif isinstance(cmd.message, PaymentProposal):
            sender = cmd.message.sender
            queue += chair.handle(cmd.message)
            for p in parties.values():
                if sender in p.peer_of.values():
                    queue += p.handle(cmd.message)
        else:
            for p in parties.values():
                queue += p.handle(cmd.message)
    if result is None:  # pragma: no cover - every party proposes each iteration until a verdict
        raise RuntimeError("the payment round ended without a verdict")
    return result, outcomes


def bargain(
    gains: Mapping[str, float],
    weights: Mapping[str, float],
    peers: Mapping[str, Sequence[str]],
    rho: float | None = None,
    tol_eur: float = 1e-4,
    max_iterations: int = 5000,
) -> Bargain:
    """Stage 2 in-process through the machines above, each community seeing only its own gain and its
    peers' proposals; stops when every link's copies agree and the agreement stops moving (`tol_eur`).
    `rho` (1/EUR^2): by default `default_rho`, a public figure once the welfare saving is announced."""
    w = {c: weights[c] for c in gains}
    shares = closed_form_gains(gains, w)  # a total to share: a seller's own g_i may be negative
    open_ = payment_open(
        "payments", "standalone", "welfare", w, peers, rho or default_rho(w, shares), tol_eur, max_iterations
    )
    result, outcomes = run_payments(open_, gains)
    after = {c: gains[c] - outcomes[c].net_payment_eur for c in gains}
    return Bargain(result.payments, after, result.iterations, result.status == "converged")
