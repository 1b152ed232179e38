"""The edge agent's settings (environment prefix P2PDOE_EDGE_); see p2pdoe.services.settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from p2pdoe.services.settings import ServiceSettings


class EdgeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="P2PDOE_EDGE_", extra="forbid")

    site_config: Path  # this site's configuration (`p2pdoe site-config`): its own data only
    rounds: Annotated[int, Field(ge=0)] = 0  # stop after this many finished rounds (0: run until stopped)
    report_every_s: Annotated[float, Field(gt=0, le=3600)] = 10.0  # re-check the envelope, send telemetry
