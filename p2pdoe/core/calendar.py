"""The DSO's operating calendar: days that begin at local midnight, their intervals in UTC, and the
day-ahead gate closure. Pure: every moment is passed in.

A day is a local date in the DSO's time zone. Its intervals run from that midnight to the next, so a
day with a daylight-saving change has 23 or 25 hours of them; everything is stored and reported in
UTC. The day-ahead round for day D opens at the gate closure, a local time of day on D - 1 (as
day-ahead markets close at noon the day before).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from pydantic import AfterValidator

from p2pdoe.errors import P2PDoeError

DAY_AHEAD = "day-ahead"


class CalendarError(P2PDoeError, ValueError):
    """A time zone, gate closure or interval length the calendar cannot work with."""


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name` (e.g. Europe/Amsterdam), or a CalendarError that names it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        example = "e.g. Europe/Amsterdam"
        raise CalendarError(f"time zone {name!r} is not an IANA time zone name ({example})") from None


def known_zone(name: str) -> str:
    zone(name)
    return name


# An IANA time zone name, checked where a configuration is read.
ZoneName = Annotated[str, AfterValidator(known_zone)]


def clock_time(text: str) -> time:
    """A local time of day written HH:MM."""
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        return time(hours, minutes)
    except ValueError:
        raise CalendarError(f"gate closure {text!r} is not a time of day written HH:MM") from None


@dataclass(frozen=True)
class Calendar:
    timezone: str = "UTC"
    dt_s: int = 3600  # an interval's length; it must divide an hour, so DST days have whole intervals
    gate_closure: str = "12:00"  # local time on the day before, when the day-ahead round opens

    def __post_init__(self) -> None:
        zone(self.timezone)
        clock_time(self.gate_closure)
        if self.dt_s <= 0 or 3600 % self.dt_s != 0:
            raise CalendarError(f"an interval of {self.dt_s} s does not divide an hour")

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)

    def start(self, day: date) -> datetime:
        """Local midnight beginning `day`, in UTC."""
        return datetime.combine(day, time(0), self.tz).astimezone(UTC)

    def end(self, day: date) -> datetime:
        return self.start(day + timedelta(days=1))

    def hours(self, day: date) -> float:
        """23, 24 or 25: the length of `day` on the wall."""
        return (self.end(day) - self.start(day)).total_seconds() / 3600.0

    def intervals(self, day: date) -> int:
        seconds = int((self.end(day) - self.start(day)).total_seconds())
        if seconds % self.dt_s:
            length = f"{day} lasts {seconds / 3600:g} h in {self.timezone}"
            raise CalendarError(f"{length}: not a whole number of {self.dt_s} s intervals")
        return seconds // self.dt_s

    def interval_start(self, day: date, t: int) -> datetime:
        return self.start(day) + timedelta(seconds=t * self.dt_s)

    def local_hours(self, day: date) -> np.ndarray:
        """The local clock hour (0-24) at the middle of each interval of `day`: profiles follow the
        local clock, so on a 25 h day the hour after 02:00 repeats."""
        return self.clock_hours(self.start(day), self.intervals(day))

    def clock_hours(self, start: datetime, intervals: int) -> np.ndarray:
        return clock_hours(self.tz, start, self.dt_s, intervals)

    def day_of(self, moment: datetime) -> date:
        """The local date in force at `moment`."""
        return moment.astimezone(self.tz).date()

    def gate_closure_at(self, day: date) -> datetime:
        """When the day-ahead round for `day` opens: the gate closure's local time on the day before."""
        before = day - timedelta(days=1)
        return datetime.combine(before, clock_time(self.gate_closure), self.tz).astimezone(UTC)

    def next_day_ahead(self, now: datetime) -> date:
        """The first day whose day-ahead round has not yet opened at `now`."""
        day = self.day_of(now) + timedelta(days=1)
        return day if now < self.gate_closure_at(day) else day + timedelta(days=1)


def clock_hours(tz: ZoneInfo, start: datetime, step_s: float, intervals: int) -> np.ndarray:
    """The local clock hour (0-24) at the middle of each of `intervals` steps from `start`."""
    hours = []
    for t in range(intervals):
        local = (start + timedelta(seconds=(t + 0.5) * step_s)).astimezone(tz).replace(tzinfo=None)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        hours.append((local - midnight).total_seconds() / 3600.0)
    return np.array(hours)


def utc_moment(text: str) -> datetime:
    """An ISO 8601 time of a configuration (UTC written with Z), as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def utc_text(moment: datetime) -> str:
    """`moment` as configurations write it: ISO 8601, UTC with Z."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def round_id(day: date, kind: str = DAY_AHEAD) -> str:
    """A round id that carries its day, e.g. day-ahead-2026-06-22."""
    return f"{kind}-{day.isoformat()}"


def day_seed(seed: int, day: date, anchor: date) -> int:
    """A profile's seed on `day`: its own on the scenario's date (`anchor`, so that day is unchanged),
    a seed drawn from (seed, day) on every other date."""
    if day == anchor:
        return seed
    return int(np.random.SeedSequence([seed % (1 << 64), day.toordinal()]).generate_state(1)[0])
