"""Wire messages of the payment agreement (schema version 1): stage 2 of the Nash-bargaining design.

After the standalone and the welfare rounds of a day, the coordinator opens a payment round over
the trading links; each community proposes its copy of every payment on its links, its peers read
the copies on theirs, and the coordinator grants each iteration its verdict. What crosses the wire
is proposed payments and the agreement's residuals, never a community's gain (docs/markets.md).
Amounts in EUR, positive when the link's payer pays its payee.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, model_validator

from p2pdoe.core.schemas.messages import DSO_ID, Message, RoundId, SiteId, Status
from p2pdoe.core.schemas.wire import checked_json

Eur = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PaymentLink(Message):
    """A trading link, oriented: `payer` pays `payee` when the payment is positive."""

    payer: SiteId
    payee: SiteId

    @model_validator(mode="after")
    def _two_ends(self) -> PaymentLink:
        if self.payer == self.payee:
            raise ValueError("a link joins two different sites")
        return self

    @property
    def ends(self) -> tuple[str, str]:
        return (self.payer, self.payee)


class PaymentOpen(Message):
    """The coordinator opens the payment round: the links, the weights and the ADMM settings, and the
    two rounds whose costs give each community its (private) gain."""

    schema_version: Literal[1] = 1
    kind: Literal["payment_open"] = "payment_open"
    round: RoundId
    sender: Literal["dso"] = "dso"
    baseline_round: RoundId  # standalone: each community's C0
    agreement_round: RoundId  # welfare: each community's C*, before payments to peers
    links: list[PaymentLink]
    weights: dict[SiteId, Positive] = Field(min_length=2)  # every site of the round, its weight
    rho_per_eur2: Positive
    tol_eur: Positive
    max_iterations: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _links_among_sites(self) -> PaymentOpen:
        if DSO_ID in self.weights:
            raise ValueError("no site may be called 'dso'")
        ends = [link.ends for link in self.links]
        if len(set(map(frozenset, ends))) != len(ends):
            raise ValueError("each link is listed once")
        if not {s for e in ends for s in e} <= set(self.weights):
            raise ValueError("every link joins two sites of the round")
        return self


class LinkPayment(Message):
    payer: SiteId
    payee: SiteId
    eur: Eur


class PaymentProposal(Message):
    """A community's copy of the payment on each of its links, one message per iteration."""

    schema_version: Literal[1] = 1
    kind: Literal["payment_proposal"] = "payment_proposal"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    sender: SiteId
    payments: list[LinkPayment]


class PaymentGrant(Message):
    """The coordinator's verdict on an iteration: the largest gap between a link's two copies and the
    largest move of a link's agreement (the mean of its copies) since the iteration before."""

    schema_version: Literal[1] = 1
    kind: Literal["payment_grant"] = "payment_grant"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    sender: Literal["dso"] = "dso"
    status: Status
    gap_eur: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    moved_eur: Annotated[float, Field(ge=0, allow_inf_nan=False)]


PaymentMessage = PaymentOpen | PaymentProposal | PaymentGrant
PAYMENT_ADAPTER: TypeAdapter[PaymentMessage] = TypeAdapter(
    Annotated[PaymentMessage, Field(discriminator="kind")]
)


def encode_payment(message: PaymentMessage) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode_payment(payload: bytes) -> PaymentMessage:
    """Parse and validate; raises `WireError` or pydantic.ValidationError, both ValueErrors."""
    return PAYMENT_ADAPTER.validate_json(checked_json(payload))
