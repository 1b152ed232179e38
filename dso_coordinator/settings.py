"""The coordinator's settings (environment prefix P2PDOE_DSO_); see p2pdoe.services.settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from p2pdoe.core.calendar import clock_time
from p2pdoe.core.schemas.coordinator import DefaultSharing
from p2pdoe.services.settings import ServiceSettings

Seconds = Annotated[float, Field(gt=0, le=86400)]


class CoordinatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="P2PDOE_DSO_", extra="forbid")

    coordinator_config: Path  # the network and the connected sites (`p2pdoe site-config`)
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 86_400)] = 86_400
    round: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")] = "day-ahead"
    policy: Literal["dynamic", "static", "none"] | None = None  # default: the configuration's
    default_sharing: DefaultSharing | None = None  # default: the configuration's
    default_profile: bool | None = (
        None  # a default box per interval, or one a day (default: the configuration's)
    )
    registration_timeout_s: Seconds = 30.0  # wait this long for every site, then go on without the rest
    iteration_timeout_s: Seconds = 10.0  # a site silent this long in an iteration is left out
    report_timeout_s: Seconds = 10.0  # wait this long for the sites' reports after the round
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3  # rounds opened before giving up
    out: Path | None = None  # write results.json here
    # bounded staleness (docs/agreement.md): overrides the configuration's admm.staleness.max_behind
    max_behind: Annotated[int, Field(ge=0, le=20)] | None = None
    straggler_wait: Annotated[float, Field(gt=0, le=100)] = 1.0  # times the rest's time, then close
    # the grants relay the peers' trade entries (docs/agreement.md): overrides admm.relay_trades
    relay_trades: bool | None = None
    exit_after_round: bool = False  # stop once the day-ahead round is done (else publish DOEs all day)
    # The real-time day (see docs/realtime.md).
    rolling: bool = False  # a round every interval over the rest of the day (else: the day-ahead DOEs)
    rolling_stop_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5  # of an interval: a round's deadline
    rolling_max_iterations: Annotated[int, Field(ge=1, le=100000)] = 200  # a rolling round's cap
    meter_step_s: Annotated[float, Field(gt=0, le=3600)] = 5.0  # the meters' nominal reading period
    hours: Annotated[float, Field(gt=0, le=24 * 366)] | None = (
        None  # the real-time day's length (default: the horizon)
    )
    checkpoint: Path | None = None  # save the standing agreement here; a restart mid-day resumes from it
    exit_after_day: bool = False  # stop (after writing results.json) once the day is over
    # Day after day: this many real-time days one after another (0: until stopped; docs/runtime.md).
    days: Annotated[int, Field(ge=0, le=3660)] = 1
    gate_closure: str = "12:00"  # local time on the day before: the next day's day-ahead round opens

    @field_validator("gate_closure")
    @classmethod
    def _time_of_day(cls, text: str) -> str:
        clock_time(text)  # a CalendarError (a ValueError) names it
        return text

    @model_validator(mode="after")
    def _days_are_real_time(self) -> CoordinatorSettings:
        if self.days != 1 and (not self.rolling or self.hours is not None):
            raise ValueError("days other than 1 run whole real-time days: they need rolling and no hours")
        return self
