"""The meter simulator's settings (environment prefix P2PDOE_METER_); see p2pdoe.services.settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from p2pdoe.services.settings import ServiceSettings


class MeterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="P2PDOE_METER_", extra="forbid")

    site_config: Path  # the site's configuration (`p2pdoe site-config`): forecasts and assets
    rate_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # simulated seconds between readings
    lead_in_s: Annotated[float | None, Field(ge=0, le=86400)] = (
        None  # readings before the day (default: one interval)
    )
    seed: int | None = None  # forecast errors (default: derived from the site's id)
    days: Annotated[int, Field(ge=1, le=3660)] = 1  # whole days one after another, each its date's
    # the weather and load the plant sees (a SiteForecast of the days, e.g. each date's scenario from
    # `p2pdoe demo --dated`) over the intervals it covers, before the seeded errors
    profile_file: Path | None = None
    # Serve the readings as SunSpec Modbus devices on this TCP port too (p2pdoe.services.sunspec;
    # None: only MQTT), on `modbus_host`
    modbus_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    modbus_host: str = "127.0.0.1"
