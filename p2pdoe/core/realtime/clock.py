"""The shared simulated clock: simulated time runs `speed` times faster than wall time from a common
origin, so a 24 h day runs in minutes (speed 1 is wall time). Pure: wall times are passed in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from p2pdoe.errors import P2PDoeError


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


def day_start(setting: str, scenario_start: str, dt_h: float, now: datetime) -> datetime:
    """The first interval's start: "today" (the scenario's time of day on the latest date that has
    begun, so profiles keep their clock hours), "now" (the current interval), "scenario" (its own
    date), or a given time."""
    scenario = datetime.fromisoformat(scenario_start.replace("Z", "+00:00")).astimezone(UTC)
    if setting == "scenario":
        return scenario
    if setting == "today":
        today = datetime.combine(now.astimezone(UTC).date(), scenario.timetz())
        return today if today <= now else today - timedelta(days=1)
    if setting == "now":
        step = dt_h * 3600.0
        epoch = now.timestamp() // step * step
        return datetime.fromtimestamp(epoch, UTC)
    try:
        moment = datetime.fromisoformat(setting.replace("Z", "+00:00"))
    except ValueError:
        raise P2PDoeError(
            f"start {setting!r} is not 'today', 'now', 'scenario' or an ISO 8601 time"
        ) from None
    if moment.utcoffset() is None:
        raise P2PDoeError(f"start {setting!r} needs a time zone (e.g. Z)")
    return moment.astimezone(UTC)
