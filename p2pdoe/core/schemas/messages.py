"""Wire messages of the agreement (schema version 1): what travels between participants.

Strict pydantic models: unknown keys, NaN, infinity and numbers given as strings are rejected. A
message carries proposals, grants and prices only, never a party's costs, assets or profiles
(docs/agreement.md lists what each party learns). Powers in kW, export positive; prices in EUR/kWh.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from p2pdoe.core.schemas.wire import checked_json

MESSAGE_SCHEMA_VERSION = 1
DSO_ID = "dso"

SiteId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
RoundId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Kw = Annotated[float, Field(allow_inf_nan=False)]
Series = list[Kw]
Status = Literal["running", "converged", "max_iterations"]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AdmmParameters(Message):
    rho_trade_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    rho_envelope_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    over_relaxation: Annotated[float, Field(ge=1.0, le=1.9)]
    max_iterations: Annotated[int, Field(ge=1)]


class RoundOpen(Message):
    """The DSO opens a round: who takes part, the horizon, the envelope policy, the ADMM settings."""

    schema_version: Literal[1] = 1
    kind: Literal["round_open"] = "round_open"
    round: RoundId
    sender: Literal["dso"] = "dso"
    policy: Literal["dynamic", "static", "none"]
    start: str
    dt_h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    intervals: Annotated[int, Field(ge=1)]
    sites: list[SiteId] = Field(min_length=2)
    admm: AdmmParameters
    initial_trade_price_eur_per_kwh: Series  # every pair starts from this price (a warm start)

    @field_validator("start")
    @classmethod
    def _utc_time(cls, value: str) -> str:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("start must be an ISO 8601 time") from exc
        if moment.tzinfo is None:
            raise ValueError("start must carry a time zone")
        return value

    @model_validator(mode="after")
    def _distinct_sites(self) -> RoundOpen:
        if len(set(self.sites)) != len(self.sites) or DSO_ID in self.sites:
            raise ValueError("sites must be distinct and none may be called 'dso'")
        if len(self.initial_trade_price_eur_per_kwh) != self.intervals:
            raise ValueError("one initial trade price per interval")
        return self


class TradeProposal(Message):
    """What the sender proposes to buy from and sell to one peer, per interval."""

    peer: SiteId
    buy_kw: Series
    sell_kw: Series


class EnvelopeRequest(Message):
    lo_kw: Series
    up_kw: Series


class Proposal(Message):
    """A community's one message per iteration: all its trade proposals and its envelope request."""

    schema_version: Literal[1] = 1
    kind: Literal["proposal"] = "proposal"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    sender: SiteId
    trades: list[TradeProposal]
    envelope: EnvelopeRequest | None  # None when the round has no envelopes (policy "none")


class GrantedEnvelope(Message):
    """The box granted to one site and the price of its capacity (the network part of a DLMP)."""

    site: SiteId
    lo_kw: Series
    up_kw: Series
    import_price_eur_per_kwh: Series
    export_price_eur_per_kwh: Series


class ResidualReport(Message):
    primal_trade_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    dual_trade_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    primal_envelope_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    dual_envelope_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Grant(Message):
    """The DSO's one message per iteration: granted (always network-safe) envelopes, their prices,
    the residuals of this iteration, the verdict, and rho for the next iteration."""

    schema_version: Literal[1] = 1
    kind: Literal["grant"] = "grant"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    sender: Literal["dso"] = "dso"
    status: Status
    envelopes: list[GrantedEnvelope]
    residuals: ResidualReport
    next_rho_trade_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    next_rho_envelope_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]


AgreementMessage = Annotated[RoundOpen | Proposal | Grant, Field(discriminator="kind")]
MESSAGE_ADAPTER: TypeAdapter[RoundOpen | Proposal | Grant] = TypeAdapter(AgreementMessage)


def encode(message: RoundOpen | Proposal | Grant) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode(payload: bytes) -> RoundOpen | Proposal | Grant:
    """Parse and validate; raises `WireError` (too large, not JSON, a repeated key) or
    pydantic.ValidationError (anything else malformed), both ValueErrors."""
    return MESSAGE_ADAPTER.validate_json(checked_json(payload))
