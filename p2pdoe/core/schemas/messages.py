"""Wire messages of the agreement (schema version 1): what travels between participants.

Strict pydantic models: unknown keys, NaN, infinity and numbers given as strings are rejected. A
message carries proposals, grants and prices only, never a party's costs, assets or profiles
(docs/agreement.md lists what each party learns). Powers in kW, export positive; prices in EUR/kWh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from p2pdoe.core.schemas.wire import checked_json

MESSAGE_SCHEMA_VERSION = 1
DSO_ID = "dso"
MAX_ANDERSON_MEMORY = 20
MAX_BEHIND = 20
MAX_MATRIX_SIDE = 100_000
MAX_RESPONSE_PARTS = 64

SiteId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
RoundId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Kw = Annotated[float, Field(allow_inf_nan=False)]
Series = list[Kw]
# "stopped": the coordinator ended the round early (a deadline); it settles like "max_iterations"
Status = Literal["running", "converged", "max_iterations", "stopped"]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AdmmParameters(Message):
    rho_trade_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    rho_envelope_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    over_relaxation: Annotated[float, Field(ge=1.0, le=1.9)]
    max_iterations: Annotated[int, Field(ge=1)]
    # Anderson acceleration: how many past updates a grant's weights may reach back (0: none)
    anderson_memory: Annotated[int, Field(ge=0, le=MAX_ANDERSON_MEMORY)] = 0
    # bounded staleness: the most iterations in a row a site's couplings may stay frozen (0: none)
    max_behind: Annotated[int, Field(ge=0, le=MAX_BEHIND)] = 0
    # the grants carry each peer's trade entry for their recipient: sites need no peer's proposal
    relay_trades: bool = False


class WarmTrade(Message):
    """Where the coupling buyer-buys-from-seller starts: its agreed amount and price (EUR/kWh)."""

    buyer: SiteId
    seller: SiteId
    kw: Series
    price_eur_per_kwh: Series


class WarmEnvelope(Message):
    """Where a site's envelope couplings start: the agreed lo and up and their consensus prices
    (EUR/kWh: the price per kW and interval divided by dt_h, signed as the community's copy)."""

    site: SiteId
    lo_kw: Series
    up_kw: Series
    lo_price_eur_per_kwh: Series
    up_price_eur_per_kwh: Series


class WarmStart(Message):
    """The agreed values and prices every coupling starts from (docs/agreement.md, "Warm start").
    Both parties of a coupling read them from the same opening, so their copies start identical;
    a coupling not listed starts cold."""

    trades: list[WarmTrade]
    envelopes: list[WarmEnvelope]

    @model_validator(mode="after")
    def _distinct(self) -> WarmStart:
        links = [(t.buyer, t.seller) for t in self.trades]
        if len(set(links)) != len(links) or any(b == s for b, s in links):
            raise ValueError("warm trades must be distinct links between two different sites")
        sites = [e.site for e in self.envelopes]
        if len(set(sites)) != len(sites):
            raise ValueError("one warm envelope per site")
        return self


def warm_start_problem(warm: WarmStart, sites: list[str] | tuple[str, ...], intervals: int) -> str | None:
    """Why `warm` does not fit a round among `sites` over `intervals`, or None."""
    known = set(sites)
    named = {s for t in warm.trades for s in (t.buyer, t.seller)} | {e.site for e in warm.envelopes}
    if not named <= known:
        return f"the warm start names sites outside the round: {sorted(named - known)}"
    series = [s for t in warm.trades for s in (t.kw, t.price_eur_per_kwh)] + [
        s for e in warm.envelopes for s in (e.lo_kw, e.up_kw, e.lo_price_eur_per_kwh, e.up_price_eur_per_kwh)
    ]
    if any(len(s) != intervals for s in series):
        return "every warm-start series needs one value per interval"
    return None


Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


def ranges_digest(x_min: Sequence[float], x_max: Sequence[float]) -> str:
    """A short digest of a site's technical ranges over a round, to the watt's thousandth."""
    text = ";".join(f"{v:.6f}" for v in (*x_min, *x_max))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    warm_start: WarmStart | None = None  # where the couplings start; None: cold (zero, the price above)
    epoch: RoundId | None = None  # the coordinator's run that opened it: another run's is a new round
    # per site, the digest of the technical ranges its envelope requests are checked against
    # (`ranges_digest`): the registration the coordinator holds, which the site meets
    ranges: dict[SiteId, Digest] = Field(default_factory=dict)
    # who trades in this round, with those of its peers listed too: None, every site; [] none (a
    # standalone round, the cooperative designs' baseline); else a coalition (Shapley's values)
    traders: list[SiteId] | None = None
    # per site, the markup it bids on its sales, EUR/kWh (the noncooperative design's bid profiles);
    # None: every site bids honestly
    markups: dict[SiteId, Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]] | None = None
    # a round that only measures (standalone, coalition, bid trial): its envelopes are never in force
    trial: bool = False

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
        if self.warm_start is not None:
            problem = warm_start_problem(self.warm_start, self.sites, self.intervals)
            if problem is not None:
                raise ValueError(problem)
            if self.policy == "none" and self.warm_start.envelopes:
                raise ValueError("a round without envelopes has no warm envelopes")
        if not set(self.ranges) <= set(self.sites):
            raise ValueError("ranges are given only for the round's sites")
        if self.traders is not None and not set(self.traders) <= set(self.sites):
            raise ValueError("traders are sites of the round")
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
    """The box granted to a site and the price of its capacity (the network part of a DLMP)."""

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
    """The DSO's message to one site per iteration: the envelope granted to it (always network-safe
    with every other site's) and its prices, the residuals of this iteration, the verdict, and rho
    for the next iteration. Every site of the round gets its own, on its own topic."""

    schema_version: Literal[1] = 1
    kind: Literal["grant"] = "grant"
    round: RoundId
    iteration: Annotated[int, Field(ge=0)]
    sender: Literal["dso"] = "dso"
    recipient: SiteId
    status: Status
    envelope: GrantedEnvelope | None  # None when the round has no envelopes (policy "none")
    residuals: ResidualReport
    next_rho_trade_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    next_rho_envelope_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    # the next state is sum_j w_j of the last len(w) updates of every coupling (docs/agreement.md);
    # None: the plain update
    anderson_weights: (
        Annotated[
            list[Annotated[float, Field(allow_inf_nan=False)]],
            Field(min_length=1, max_length=MAX_ANDERSON_MEMORY + 1),
        ]
        | None
    ) = None
    # the sites whose proposals this iteration did not use (bounded staleness): their couplings keep
    # their values and prices; a site's next proposal used answers the grant it was last used at
    frozen: list[SiteId] = []
    # relayed rounds: by peer, that peer's entry for the recipient (`peer` is the recipient) in the
    # proposal this iteration used, exactly as sent; None in a round whose sites hear their peers
    relayed: dict[SiteId, TradeProposal] | None = None
    # a certified polish starts: the recipient answers with its response (`PolishReport`) instead
    # of a proposal, its couplings updated as for any running grant (docs/agreement.md)
    polish: bool = False


class Matrix(Message):
    """Rows of a dense matrix of 8-byte floats, row-major, little-endian, in base64."""

    rows: Annotated[int, Field(ge=0, le=MAX_MATRIX_SIDE)]
    cols: Annotated[int, Field(ge=0, le=MAX_MATRIX_SIDE)]
    data: str

    @model_validator(mode="after")
    def _fits(self) -> Matrix:
        self.array()
        return self

    def array(self) -> np.ndarray:
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError("matrix data is not base64") from exc
        if len(raw) != 8 * self.rows * self.cols:
            raise ValueError(f"matrix data of {len(raw)} bytes is not {self.rows} x {self.cols} floats")
        values = np.frombuffer(raw, dtype="<f8").reshape(self.rows, self.cols)
        if not np.isfinite(values).all():
            raise ValueError("matrix data must be finite")
        return values


def matrix_of(values: np.ndarray) -> Matrix:
    rows, cols = values.shape
    data = base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")
    return Matrix(rows=rows, cols=cols, data=data)


class ResponsePart(Message):
    """Part of a community's response to coupling prices, w(nu) = base - F F' nu (docs/agreement.md):
    rows first_row.. of F; the first part also carries `base`. A response is cut into parts to stay
    under the message size limit."""

    part: Annotated[int, Field(ge=0)]
    parts: Annotated[int, Field(ge=1, le=MAX_RESPONSE_PARTS)]
    first_row: Annotated[int, Field(ge=0)]
    base: Series  # empty in every part but the first
    factor: Matrix

    @model_validator(mode="after")
    def _part_of(self) -> ResponsePart:
        if self.part >= self.parts:
            raise ValueError("part must be below parts")
        if (self.part == 0) != bool(self.base):
            raise ValueError("the first part, and only it, carries the base")
        return self


class PolishReport(Message):
    """A community's message in a certified polish (to the DSO only). Step 0: its response (exchange 0
    only); steps 1..R: the correction of its coupling values and the values themselves; step R + 1:
    its values after the exchange, how its check of its own rows changed its active set, and, if it
    changed, its new response for the next exchange. Coupling values: its trades (buys, then sells,
    in peer order), then its envelope's lower and upper corners, each a horizon long. `declined`: it
    cannot take part in this try (its response too large for the wire, or its numbers not finite);
    the try is abandoned."""

    schema_version: Literal[1] = 1
    kind: Literal["polish_report"] = "polish_report"
    round: RoundId
    sender: SiteId
    iteration: Annotated[int, Field(ge=0)]  # the try's: the ADMM iterations done when it started
    exchange: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    values: Series = []
    correction: Series = []
    joined: Annotated[int, Field(ge=0)] = 0  # its rows violated
    left: Annotated[int, Field(ge=0)] = 0  # its rows whose multiplier had the wrong sign
    response: ResponsePart | None = None
    declined: bool = False


class PolishPrices(Message):
    """The DSO's message to one community in a certified polish: step 0, its coupling prices
    (EUR per kW and interval, in the order of its coupling values); steps 1..R, their refinement;
    or the verdict: "certified" (the round is over, at the optimum) or "abandoned" (ADMM goes on
    where it was)."""

    schema_version: Literal[1] = 1
    kind: Literal["polish_prices"] = "polish_prices"
    round: RoundId
    sender: Literal["dso"] = "dso"
    recipient: SiteId
    iteration: Annotated[int, Field(ge=0)]  # the try's: the ADMM iterations done when it started
    exchange: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    prices: Series = []
    verdict: Literal["solve", "certified", "abandoned"] = "solve"
    # with "certified": the recipient's envelope in force and its prices, as a final grant's
    envelope: GrantedEnvelope | None = None


AgreementMessage = Annotated[
    RoundOpen | Proposal | Grant | PolishReport | PolishPrices, Field(discriminator="kind")
]
MESSAGE_ADAPTER: TypeAdapter[RoundOpen | Proposal | Grant | PolishReport | PolishPrices] = TypeAdapter(
    AgreementMessage
)
Wire = RoundOpen | Proposal | Grant | PolishReport | PolishPrices


def encode(message: Wire) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode(payload: bytes) -> Wire:
    """Parse and validate; raises `WireError` (too large, not JSON, a repeated key) or
    pydantic.ValidationError (anything else malformed), both ValueErrors."""
    return MESSAGE_ADAPTER.validate_json(checked_json(payload))
