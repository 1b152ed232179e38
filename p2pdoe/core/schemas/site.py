"""An edge agent's configuration (schema version 1): its own community only, resolved to series.

Written by `p2pdoe site-config` from a scenario; an edge agent never sees another community's data.
What it learns of others is their ids and the network fee it pays to trade with each.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from p2pdoe.core.calendar import ZoneName

Series = list[Annotated[float, Field(allow_inf_nan=False)]]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatteryConfig(Model):
    energy_kwh: NonNeg
    power_kw: NonNeg
    soc_init_kwh: NonNeg
    soc_min_kwh: NonNeg
    soc_max_kwh: NonNeg
    eta_charge: Annotated[float, Field(gt=0, le=1)]
    eta_discharge: Annotated[float, Field(gt=0, le=1)]
    wear_eur_per_kwh: NonNeg
    soc_end_min_kwh: NonNeg | None = None  # the final state of charge's floor; None: max(min, init)


class FlexConfig(Model):
    energy_kwh: NonNeg
    min_kw: NonNeg
    max_kw: NonNeg
    preferred_kw: Series
    discomfort_eur_per_kw2h: NonNeg


class CommunityConfig(Model):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    bus: Annotated[int, Field(ge=1)]  # the feeder's own bus number
    pv_kw: Series  # forecasts per interval
    wind_kw: Series
    fixed_load_kw: Series
    flexible_load: FlexConfig
    battery: BatteryConfig
    tan_phi: NonNeg
    envelope_value_eur_per_kwh: NonNeg
    envelope_curvature_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PeerConfig(Model):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    fee_eur_per_kwh: NonNeg  # the network fee of trading with this peer


class MarketConfig(Model):
    trade_limit_kw: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    trade_quadratic_eur_per_kw2h: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    regularization_eur_per_kw2h: NonNeg
    envelope_proximal_eur_per_kw2h: NonNeg


class SiteConfig(Model):
    schema_version: Literal[1] = 1
    kind: Literal["site_config"] = "site_config"
    scenario: str
    start: str
    timezone: ZoneName = "UTC"  # the DSO's local time: its days run from local midnight (core.calendar)

    dt_h: Annotated[float, Field(gt=0)]
    price_import_eur_per_kwh: Series
    price_export_eur_per_kwh: Series
    community: CommunityConfig
    peers: list[PeerConfig]
    market: MarketConfig
