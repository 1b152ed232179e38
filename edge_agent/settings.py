"""The edge agent's settings (environment prefix P2PDOE_EDGE_); see p2pdoe.services.settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from p2pdoe.core.community import REALTIME_MARGINS
from p2pdoe.services.settings import ServiceSettings

Kw = Annotated[float, Field(allow_inf_nan=False)]


class EdgeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="P2PDOE_EDGE_", extra="forbid")

    site_config: Path  # this site's configuration (`p2pdoe site-config`): its own data only
    # a clean session by default: what an edge hears is retained state or live, and a message queued
    # while it was away is stale (a coordinator status queued for a restarted edge read as clock skew)
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 86_400)] = 0
    rounds: Annotated[int, Field(ge=0)] = 0  # stop after this many finished rounds (0: run until stopped)
    report_every_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # re-check the envelope, send telemetry
    # The integrator's forecast (a SiteForecast as JSON), read again at each opening when it changed;
    # the topic site/<id>/forecast carries the same (docs/runtime.md, "Forecasts").
    forecast_file: Path | None = None
    # The real-time controller (see docs/realtime.md).
    meter: bool = False  # read the site's meter and enforce the envelope (else: agreement only)
    meter_broker: str | None = None  # the meter's MQTT broker (default: `broker`)
    meter_step_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # the meter's nominal reading period
    # Read the meter and inverters as SunSpec Modbus TCP devices at HOST:PORT instead of on MQTT
    # (edge_agent.sunspec_meter), polled every `meter_step_s`; their units as role=unit,... (default:
    # meter=1 and pv=2, wind=3, battery=4 for the assets the site has, as `meter-sim --modbus-port`)
    meter_modbus: str | None = None
    meter_modbus_units: str | None = None
    meter_modbus_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # the meter's W is positive when the site exports (default: when it imports, as most meters)
    meter_modbus_export_positive: bool = False
    journal: Path | None = None  # the SQLite journal (default with a meter: journal-<site>.db here)
    journal_retention_days: Annotated[int, Field(ge=1, le=3660)] = 35  # days of records the journal keeps
    fixed_default_lo_kw: Kw | None = None  # the local fixed default (default: no export, import up to
    fixed_default_up_kw: Kw | None = None  # the largest preferred consumption)
    # With a meter, every schedule stays inside its envelope by these shares of its forecast load
    # (both sides) and PV and wind (the import side): forecast errors no lever may be left to meet.
    margin_load: Annotated[float, Field(ge=0, lt=1)] = REALTIME_MARGINS[0]
    margin_res: Annotated[float, Field(ge=0, lt=1)] = REALTIME_MARGINS[1]
    skew_tolerance_s: Annotated[float, Field(ge=0, le=86400)] = 60.0
    # No reading for this long (simulated s): alarm meter_silent, and the site runs on its schedule.
    meter_silent_s: Annotated[float, Field(gt=0, le=86400)] = 120.0
    # A reading stamped this far (simulated s) ahead of the clock is rejected (alarm reading_rejected).
    reading_ahead_s: Annotated[float, Field(ge=0, le=86400)] = 60.0
    clock_offset_s: Annotated[float, Field(ge=-86400, le=86400)] = 0.0  # fault injection: a wrong clock
    solve_delay_ms: Annotated[float, Field(ge=0, le=600000)] = 0.0  # fault injection: a slow gateway

    @model_validator(mode="after")
    def _fixed_default_whole(self) -> EdgeSettings:
        lo, up = self.fixed_default_lo_kw, self.fixed_default_up_kw
        if (lo is None) != (up is None):
            raise ValueError("fixed_default_lo_kw and fixed_default_up_kw go together")
        if lo is not None and up is not None and lo > up:
            raise ValueError("fixed_default_lo_kw exceeds fixed_default_up_kw")
        return self
