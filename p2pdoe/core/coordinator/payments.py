"""Nash bargaining's payment round at the coordinator (stage 2, docs/markets.md): set up from the
standalone and welfare rounds' reports, its chair fed with the sites' payment proposals, its
grants published, the iteration's patience renewed at every grant. Pure, like `RoundRun`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from p2pdoe.core import topics
from p2pdoe.core.agreement.payments import PaymentChair, PaymentResult, Publish, payment_open
from p2pdoe.core.bargaining import rho_for_saving
from p2pdoe.core.effects import Patience, Relieve, Send
from p2pdoe.core.reader import payment_topic_of
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.payments import PaymentGrant, PaymentProposal, encode_payment
from p2pdoe.core.schemas.results import MarketOutcome, Payment
from p2pdoe.core.schemas.runtime import SiteReport

PAYMENT_ITERATION = "payment_iteration"  # the patience key of a payment iteration's proposals
Effect = Send | Patience | Relieve


def cost_before_payments(report: SiteReport) -> float:
    """C*: the site's cost in the welfare round less what it paid its peers for energy."""
    return report.community.cost_eur - report.community.cost_breakdown.p2p_net_eur


@dataclass
class PaymentRun:
    chair: PaymentChair
    patience_s: float
    baseline_cost_eur: dict[str, float]
    before_eur: dict[str, float]
    result: PaymentResult | None = None
    proposals: int = 0
    grants: int = 0
    bytes: int = 0
    _last: Send | None = field(default=None, repr=False)
    _repeated: Send | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.chair.open.round

    def open(self) -> list[Effect]:
        self._last = Send(topics.payment_open(self.id), encode_payment(self.chair.open), retain=True)
        return [self._last, Patience(PAYMENT_ITERATION, self.patience_s)]

    def repeat(self) -> list[Effect]:
        """At an iteration's deadline: the opening or the latest grant once more (a party answers it
        with its latest proposal); empty if already repeated."""
        if self._last is None or self._repeated is self._last:
            return []
        self._repeated = self._last
        return [self._last, Patience(PAYMENT_ITERATION, self.patience_s)]

    def proposal(self, msg: PaymentProposal, size: int) -> list[Effect]:
        self.proposals += 1
        self.bytes += size
        out: list[Effect] = []
        for cmd in self.chair.handle(msg):
            if isinstance(cmd, Publish) and isinstance(cmd.message, PaymentGrant):
                payload = encode_payment(cmd.message)
                self.grants += 1
                self.bytes += len(payload)
                self._last = Send(payment_topic_of(cmd.message), payload)
                out += [self._last, Patience(PAYMENT_ITERATION, self.patience_s)]
            elif isinstance(cmd, PaymentResult):
                self.result = cmd
                out.append(Relieve(PAYMENT_ITERATION))
        return out

    def missing(self) -> tuple[str, ...]:
        return self.chair.waiting_for()

    def withdraw(self) -> Send:
        return Send(topics.payment_open(self.id), b"", retain=True)

    def outcome(self, baseline_round: str) -> MarketOutcome:
        res, o = self.result, self.chair.open
        assert res is not None
        net = res.net_payment_eur
        return MarketOutcome(
            design="nash-bargaining",
            baseline_round=baseline_round,
            payment_round=o.round,
            status=res.status,
            iterations=res.iterations,
            weights=dict(o.weights),
            baseline_cost_eur=self.baseline_cost_eur,
            cost_before_payments_eur=self.before_eur,
            payments=[Payment(payer=a, payee=b, eur=v) for (a, b), v in res.payments.items()],
            net_payment_eur=net,
            gains_eur={s: self.baseline_cost_eur[s] - (self.before_eur[s] + net[s]) for s in net},
            messages_per_iteration=(self.proposals + self.grants) / max(1, res.iterations),
            bytes_per_iteration=self.bytes / max(1, res.iterations),
        )


def payment_run(
    cfg: CoordinatorConfig,
    sites: tuple[str, ...],
    baseline: Mapping[str, SiteReport],
    welfare: Mapping[str, SiteReport],
    rounds: tuple[str, str, str],
    patience_s: float,
) -> PaymentRun | str:
    """The payment round among `sites` (the welfare round's), or why there is none. `rounds`: the
    standalone round, the welfare round and the payment round's ids. The saving to share, and so
    the penalty, follows from the reports' costs; each site's own gain it computes itself."""
    missing = [s for s in sites if s not in baseline or s not in welfare]
    if missing:
        return f"no report of both rounds from {', '.join(missing)}"
    c0 = {s: baseline[s].community.cost_eur for s in sites}
    before = {s: cost_before_payments(welfare[s]) for s in sites}
    saving = sum(c0.values()) - sum(before.values())
    if saving <= 0:
        return f"there is no gain to share (the saving is {saving:.2f} EUR)"
    weights = {s: cfg.bargaining_weights.get(s, 1.0) for s in sites}
    taking_part = set(sites)
    peers = {s.id: [p for p in s.peers if p in taking_part] for s in cfg.sites if s.id in taking_part}
    open_ = payment_open(rounds[2], rounds[0], rounds[1], weights, peers, rho_for_saving(weights, saving))
    return PaymentRun(PaymentChair(open_), patience_s, c0, before)
