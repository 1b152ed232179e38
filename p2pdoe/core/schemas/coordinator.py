"""The DSO coordinator's configuration (schema version 1): its network, the day's public facts, the
ADMM settings, and its records of the sites connected to it. No community's costs, assets or profiles.

Written by `p2pdoe site-config` beside the sites' configurations. Every array is resolved (the feeder
as the coordinator's network model, the background load per bus and interval), so the coordinator
builds exactly the safe set an in-process run builds from the whole scenario.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from p2pdoe.core.bidding import MARKUP_GRID_EUR_PER_KWH, MAX_SWEEPS
from p2pdoe.core.calendar import ZoneName
from p2pdoe.core.schemas.scenario import Admm, MarketDesign

Number = Annotated[float, Field(allow_inf_nan=False)]
Series = list[Number]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
SiteId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeederConfig(Model):
    """`p2pdoe.core.network.Feeder` field by field; arrays indexed by bus position."""

    name: str
    base_mva: Annotated[float, Field(gt=0)]
    base_kv: Annotated[float, Field(gt=0)]
    bus_ids: list[int]
    root: Annotated[int, Field(ge=0)]
    parent: list[int]  # -1 at the root
    r_pu: Series
    x_pu: Series
    load_kw: Series
    load_kvar: Series
    rating_kva: list[Number | None]  # None: no rating

    @model_validator(mode="after")
    def _lengths(self) -> FeederConfig:
        n = len(self.bus_ids)
        arrays = (self.parent, self.r_pu, self.x_pu, self.load_kw, self.load_kvar, self.rating_kva)
        if any(len(a) != n for a in arrays) or self.root >= n:
            raise ValueError("every feeder array needs one entry per bus")
        return self


# how the default envelopes share the network's room (p2pdoe.core.allocation, docs/formulation.md)
DefaultSharing = Literal["max-min", "equal", "proportional-capacity", "proportional-need"]


class ConnectedSite(Model):
    """What the DSO knows of a site without its registration: its connection agreement."""

    id: SiteId
    bus: Annotated[int, Field(ge=1)]  # the feeder's own bus number
    peers: list[SiteId]  # its trading partners (the market's public graph)
    import_capacity_kw: NonNeg
    export_capacity_kw: NonNeg
    # the import it needs to stay whole with its own generation (battery not counted), per interval:
    # every default envelope allows it where the network can (None: none)
    stay_whole_import_kw: list[NonNeg] | None = None
    reactive_min_kvar: Number  # the worst cases over the day
    reactive_max_kvar: Number


class CoordinatorConfig(Model):
    schema_version: Literal[1] = 1
    kind: Literal["coordinator_config"] = "coordinator_config"
    scenario: str
    start: str
    timezone: ZoneName = "UTC"  # the DSO's local time: its days run from local midnight (core.calendar)

    dt_h: Annotated[float, Field(gt=0)]
    intervals: Annotated[int, Field(ge=1)]
    policy: Literal["dynamic", "static", "none"] = "dynamic"
    # how the default envelopes share the network's room (docs/formulation.md)
    default_sharing: DefaultSharing = "max-min"
    default_profile: bool = True  # a default box per interval (else one box for the whole day)
    feeder: FeederConfig
    v0_pu: NonNeg
    vmin_pu: NonNeg
    vmax_pu: NonNeg
    vmin_margin_pu: NonNeg
    vmax_margin_pu: NonNeg
    rating_margin: NonNeg
    background_kw: list[Series]  # [bus][interval], consumption
    background_kvar: list[Series]
    price_import_eur_per_kwh: Series  # the public retail tariffs (they seed the trade prices)
    price_export_eur_per_kwh: Series
    admm: Admm
    sites: list[ConnectedSite]
    # the market design (docs/markets.md); nash-bargaining adds a standalone round before the
    # welfare round and a payment round after it, with these weights (a site left out weighs 1)
    market: MarketDesign = "welfare"
    bargaining_weights: dict[SiteId, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    # shapley: a round per coalition, every one up to this many sites, else those of sampled orders
    shapley_exact_up_to: Annotated[int, Field(ge=1, le=12)] = 8
    shapley_orders: Annotated[int, Field(ge=2)] = 200
    shapley_seed: int = 0
    # noncooperative: a round per bid profile best responses try, from these sale markups (EUR/kWh)
    bid_markups_eur_per_kwh: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: list(MARKUP_GRID_EUR_PER_KWH), min_length=1
    )
    bid_max_sweeps: Annotated[int, Field(ge=1, le=100)] = MAX_SWEEPS

    @model_validator(mode="after")
    def _consistent(self) -> CoordinatorConfig:
        n, t = len(self.feeder.bus_ids), self.intervals
        for name in ("background_kw", "background_kvar"):
            rows = getattr(self, name)
            if len(rows) != n or any(len(r) != t for r in rows):
                raise ValueError(f"{name} needs one row per bus of {t} intervals")
        for site in self.sites:
            if site.stay_whole_import_kw is not None and len(site.stay_whole_import_kw) != t:
                raise ValueError(f"sites: {site.id}: stay_whole_import_kw needs {t} intervals")
        if len(self.price_import_eur_per_kwh) != t or len(self.price_export_eur_per_kwh) != t:
            raise ValueError(f"the tariffs need {t} intervals")
        ids = [s.id for s in self.sites]
        if len(set(ids)) != len(ids) or "dso" in ids:
            raise ValueError("site ids must be distinct and none may be 'dso'")
        known = set(ids)
        for s in self.sites:
            if s.bus not in self.feeder.bus_ids:
                raise ValueError(f"site {s.id}: the feeder has no bus {s.bus}")
            if not set(s.peers) <= known or s.id in s.peers:
                raise ValueError(f"site {s.id}: peers must be other connected sites")
        by_id = {s.id: set(s.peers) for s in self.sites}
        if any(s.id not in by_id[p] for s in self.sites for p in s.peers):
            raise ValueError("the trading graph must be symmetric")
        return self
