"""Scenario file schema (version 1): what a user writes, validated before anything is built.

Units are in the field names. Everything is frozen and rejects unknown keys, so a typo fails
at load time with the key's path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from p2pdoe.core.bidding import MARKUP_GRID_EUR_PER_KWH, MAX_SWEEPS
from p2pdoe.core.calendar import ZoneName

SCENARIO_SCHEMA_VERSION = 1

NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Profiles: a shape per unit (of kWp, rated kW or peak kW) for each interval.
class PvProfile(Model):
    """Clear-sky bell between sunrise and sunset, with seeded cloud dips."""

    kind: Literal["pv"] = "pv"
    sunrise_h: float = Field(6.0, ge=0, le=24)
    sunset_h: float = Field(20.0, ge=0, le=24)
    cloudiness: Fraction = 0.1
    seed: int = 0


class WindProfile(Model):
    """Seeded AR(1) wind speed through a cut-in / rated / cut-out power curve."""

    kind: Literal["wind"] = "wind"
    mean_speed_m_s: Pos = 7.0
    seed: int = 0


class LoadProfile(Model):
    """Typical daily shapes, peak 1.0: residential (morning and evening peaks), commercial, flat."""

    kind: Literal["load"] = "load"
    shape: Literal["residential", "commercial", "evening", "flat"] = "residential"
    noise: Fraction = 0.03
    seed: int = 0


class ValuesProfile(Model):
    kind: Literal["values"] = "values"
    values: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=1)


class CsvProfile(Model):
    """A column of a CSV file (path relative to the scenario file); `intervals` rows or a divisor of it."""

    kind: Literal["csv"] = "csv"
    path: str
    column: str


Profile = Annotated[
    PvProfile | WindProfile | LoadProfile | ValuesProfile | CsvProfile, Field(discriminator="kind")
]


class LineRatings(Model):
    """Branch ratings. `nominal_plus`: AC apparent flow at nominal load plus `margin_kva`;
    `file`: the case file's rateA; `per_branch` overrides either, keyed 'from-to' (bus numbers)."""

    rule: Literal["nominal_plus", "file"] = "nominal_plus"
    margin_kva: NonNeg = 800.0
    per_branch_kva: dict[str, Pos] = Field(default_factory=dict)


class VoltageMargin(Model):
    """Margins (p.u.) kept inside the band for the LinDistFlow error."""

    lower_pu: Annotated[float, Field(ge=0, le=0.05)] = 0.004
    upper_pu: Annotated[float, Field(ge=0, le=0.05)] = 0.0


class BackgroundLoad(Model):
    """Non-community load: the case file's bus loads times `peak_factor` times the profile."""

    peak_factor: NonNeg = 0.8
    profile: Profile = LoadProfile(shape="residential", noise=0.0)


class FeederSpec(Model):
    source: str = "ieee33"
    v0_pu: Annotated[float, Field(ge=0.9, le=1.1)] = 1.03
    vmin_pu: Annotated[float, Field(ge=0.8, le=1.0)] = 0.95
    vmax_pu: Annotated[float, Field(ge=1.0, le=1.2)] = 1.05
    voltage_margin: VoltageMargin = VoltageMargin()
    rating_margin: Annotated[float, Field(ge=0, lt=0.5)] = 0.05
    line_ratings: LineRatings = LineRatings()
    background_load: BackgroundLoad = BackgroundLoad()


class Horizon(Model):
    intervals: Annotated[int, Field(ge=1, le=2880)] = 24
    dt_h: Annotated[float, Field(gt=0, le=24)] = 1.0
    start: str = "2026-06-21T00:00:00Z"
    # The DSO's local time (IANA name): where its days begin, and the clock its profiles follow on a
    # day of their own (p2pdoe.core.calendar); the scenario's own horizon starts at `start` anyway.
    timezone: ZoneName = "UTC"


class TimeOfUse(Model):
    """A price per clock hour: `base` everywhere, `windows` override [start_h, end_h)."""

    base_eur_per_kwh: NonNeg
    windows: list[
        tuple[Annotated[float, Field(ge=0, le=24)], Annotated[float, Field(ge=0, le=24)], NonNeg]
    ] = Field(default_factory=list)


class Prices(Model):
    import_eur_per_kwh: TimeOfUse
    export_eur_per_kwh: TimeOfUse

    @model_validator(mode="after")
    def _export_below_import(self) -> Prices:
        lowest_import = min(
            [self.import_eur_per_kwh.base_eur_per_kwh] + [w[2] for w in self.import_eur_per_kwh.windows]
        )
        highest_export = max(
            [self.export_eur_per_kwh.base_eur_per_kwh] + [w[2] for w in self.export_eur_per_kwh.windows]
        )
        if highest_export >= lowest_import:
            raise ValueError("export prices must stay below import prices at every hour")
        return self


MarketDesign = Literal["standalone", "welfare", "nash-bargaining", "shapley", "noncooperative"]
DESIGNS: tuple[str, ...] = get_args(MarketDesign)
SCHEDULE_DESIGNS = ("standalone", "welfare")  # the designs that agree on a schedule of their own


class Market(Model):
    trade_limit_kw: Pos = 1000.0
    fee_base_eur_per_kwh: NonNeg = 0.004
    fee_eur_per_kwh_per_ohm: NonNeg = 0.001
    trade_quadratic_eur_per_kw2h: Pos = 3e-5
    regularization_eur_per_kw2h: NonNeg = 1e-6
    envelope_proximal_eur_per_kw2h: NonNeg = 1e-7
    max_peers: Annotated[int, Field(ge=1)] | None = None  # None: everyone trades with everyone
    # the market design (docs/markets.md): `welfare`, the social optimum with bilateral trades;
    # `standalone`, no peer-to-peer trade, each community against the grid under the same envelopes;
    # `nash-bargaining`, the welfare schedule with payments over the links that share its saving;
    # `shapley`, the welfare schedule with each community paid its Shapley value;
    # `noncooperative`, strategic bidders: the market clears on the bids best responses end at
    design: MarketDesign = "welfare"
    # Nash bargaining's weight per community id (docs/markets.md); a community left out weighs 1
    bargaining_weights: dict[str, Pos] = Field(default_factory=dict)
    # Shapley payoffs: exact over every coalition up to this many communities, else the mean over
    # `shapley_orders` random orders of arrival drawn with `shapley_seed`
    shapley_exact_up_to: Annotated[int, Field(ge=1, le=12)] = 8
    shapley_orders: Annotated[int, Field(ge=2)] = 200
    shapley_seed: int = 0
    # noncooperative: the sale markups each community chooses from (EUR/kWh), and how many rounds of
    # best responses at most
    bid_markups_eur_per_kwh: list[NonNeg] = Field(
        default_factory=lambda: list(MARKUP_GRID_EUR_PER_KWH), min_length=1
    )
    bid_max_sweeps: Annotated[int, Field(ge=1, le=100)] = MAX_SWEEPS


class AdaptiveRho(Model):
    """Adaptive rho per coupling family (trades, envelopes), OSQP's rule: every `every` iterations up to
    `until`, rho is scaled by sqrt(relative primal / relative dual residual) when that factor is
    beyond `ratio` either way, by at most `factor` per step (docs/agreement.md)."""

    enabled: bool = True
    ratio: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 5.0
    factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 2.0
    every: Annotated[int, Field(ge=1)] = 10
    until: Annotated[int, Field(ge=0)] = 400


class Anderson(Model):
    """Safeguarded type-II Anderson acceleration (docs/agreement.md): each step mixes the last
    `memory` + 1 updates (0: off); a mixed state stands if the residual it produces is at most
    `safeguard_factor` times the one before, else it is undone."""

    memory: Annotated[int, Field(ge=0, le=20)] = 0
    regularization: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-8
    safeguard_factor: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


class Staleness(Model):
    """Bounded-staleness rounds (docs/agreement.md): the DSO may close an iteration without a site's
    proposal, freezing that site's couplings, once `min_fresh_share` of the sites have proposed and no
    site is more than `max_behind` iterations behind. 0: every iteration waits for every site."""

    max_behind: Annotated[int, Field(ge=0, le=20)] = 0
    min_fresh_share: Annotated[float, Field(gt=0, le=1)] = 0.5


class Polish(Model):
    """The certified polish (docs/agreement.md, "A certified polish"): after `first` iterations the
    parties stop iterating and solve the day's KKT system at the active set their last step shows,
    in at most `max_rounds` rounds of exchanges; a certified answer ends the round at the optimum,
    else ADMM goes on where it was and tries again `every` iterations later, the wait doubled after
    each failed try (20, 40, 80, 160 ... with the defaults). `first` 0: off."""

    first: Annotated[int, Field(ge=0)] = 0
    every: Annotated[int, Field(ge=1)] = 20
    max_rounds: Annotated[int, Field(ge=1, le=50)] = 8


class Admm(Model):
    """The decentralized agreement's settings. rho is per hour of interval (scaled by dt_h), in
    EUR/(kW^2 h); tolerances in kW (Boyd's l2 criteria, scaled by the square root of the number of
    coupled values). A round also stops only once no price moved by more than eps_price_eur_per_kwh
    in the last iteration."""

    rho_trade_eur_per_kw2h: Pos = 2.5e-3
    rho_envelope_eur_per_kw2h: Pos = 2.5e-4
    over_relaxation: Annotated[float, Field(ge=1.0, le=1.9)] = 1.6
    eps_abs_kw: Pos = 0.002
    eps_rel: NonNeg = 0.0
    eps_price_eur_per_kwh: Pos = 1e-5
    max_iterations: Annotated[int, Field(ge=1, le=100000)] = 2000
    adaptive_rho: AdaptiveRho = AdaptiveRho()
    anderson: Anderson = Anderson()
    staleness: Staleness = Staleness()
    # the DSO relays each peer's trade entry in the grants, so a site receives one message per
    # iteration instead of one per peer plus the grant (docs/agreement.md, "Relayed trades")
    relay_trades: bool = False
    polish: Polish = Polish()

    @model_validator(mode="after")
    def _no_anderson_with_staleness(self) -> Admm:
        if self.staleness.max_behind and self.anderson.memory:
            raise ValueError("staleness.max_behind > 0 needs anderson.memory 0")
        if self.staleness.max_behind and self.polish.first:
            raise ValueError("staleness.max_behind > 0 needs polish.first 0")
        return self


class Asset(Model):
    rated_kw: NonNeg
    profile: Profile


class FlexibleLoad(Model):
    energy_kwh: NonNeg
    min_kw: NonNeg = 0.0
    max_kw: NonNeg
    preferred: Profile = LoadProfile(shape="evening", noise=0.0)
    discomfort_eur_per_kw2h: NonNeg = 0.002

    @model_validator(mode="after")
    def _range(self) -> FlexibleLoad:
        if self.min_kw > self.max_kw:
            raise ValueError("flexible load min_kw exceeds max_kw")
        return self


class Battery(Model):
    energy_kwh: NonNeg
    power_kw: NonNeg
    soc_init: Fraction = 0.5
    soc_min: Fraction = 0.1
    soc_max: Fraction = 0.95
    eta_charge: Annotated[float, Field(gt=0, le=1)] = 0.95
    eta_discharge: Annotated[float, Field(gt=0, le=1)] = 0.95
    wear_eur_per_kwh: NonNeg = 0.01

    @model_validator(mode="after")
    def _soc_order(self) -> Battery:
        if not self.soc_min <= self.soc_init <= self.soc_max:
            raise ValueError("battery needs soc_min <= soc_init <= soc_max")
        return self


class EnvelopeValue(Model):
    """How the community values envelope width w = up - lo: -value*w + curvature/2 * w^2 per hour."""

    value_eur_per_kwh: NonNeg = 0.01
    curvature_eur_per_kw2h: Pos = 5e-6


class Community(Model):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    bus: int
    pv: Asset | None = None
    wind: Asset | None = None
    fixed_load: Asset
    flexible_load: FlexibleLoad | None = None
    battery: Battery | None = None
    power_factor: Annotated[float, Field(gt=0, le=1)] = 0.95
    envelope: EnvelopeValue = EnvelopeValue()


class ScenarioSpec(Model):
    schema_version: Literal[1] = 1
    kind: Literal["scenario"] = "scenario"
    name: str
    description: str = ""
    feeder: FeederSpec = FeederSpec()
    horizon: Horizon = Horizon()
    prices: Prices
    market: Market = Market()
    admm: Admm = Admm()
    communities: list[Community] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique_ids(self) -> ScenarioSpec:
        ids = [c.id for c in self.communities]
        if len(set(ids)) != len(ids):
            raise ValueError("community ids must be unique")
        if "dso" in ids:
            raise ValueError("community id 'dso' is reserved for the DSO coordinator")
        if self.feeder.vmin_pu + self.feeder.voltage_margin.lower_pu >= (
            self.feeder.vmax_pu - self.feeder.voltage_margin.upper_pu
        ):
            raise ValueError("voltage band is empty after margins")
        return self
