"""The shared simulated clock: simulated time runs `speed` times faster than wall time from a common
origin, so a 24 h day runs in minutes (speed 1 is wall time). Pure: wall times are passed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class SimClock:
    sim_origin: datetime  # the simulated time at `wall_origin`
    wall_origin: datetime
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"the clock's speed must be positive, not {self.speed}")
        if self.sim_origin.utcoffset() is None or self.wall_origin.utcoffset() is None:
            raise ValueError("the clock's origins need a time zone")

    def sim_at(self, wall: datetime) -> datetime:
        return self.sim_origin + (wall - self.wall_origin) * self.speed

    def wall_at(self, sim: datetime) -> datetime:
        return self.wall_origin + (sim - self.sim_origin) / self.speed

    def wall_seconds(self, sim_seconds: float) -> float:
        """How long `sim_seconds` of simulated time last on the wall."""
        return sim_seconds / self.speed

    def sim_delta(self, wall_seconds: float) -> timedelta:
        return timedelta(seconds=wall_seconds * self.speed)
