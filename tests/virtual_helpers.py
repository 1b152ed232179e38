"""What the broker of a virtual day accepted, decoded (`Tape`), for the tests of the real-time day on
the virtual clock (tests/test_virtual_day.py, tests/test_faults_virtual.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from realtime_helpers import quarter_hour_day

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core import topics
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.runtime import Doe, MeterReading, Runtime, Telemetry, decode_runtime

S = quarter_hour_day()
RATE_S = 30.0  # simulated seconds between meter readings
DT_S = 900  # simulated seconds per interval
PER_INTERVAL = round(DT_S / RATE_S)
WITHIN_STEP = timedelta(milliseconds=1)
M = TypeVar("M", bound=Runtime)


# -- what the broker accepted ------------------------------------------------------------------------


@dataclass(frozen=True)
class Heard(Generic[M]):
    at: datetime  # the moment of the day the broker accepted it
    topic: str
    kind: str  # the site topic's kind ("doe", "meter", ...), or "dso/status"
    msg: M
    retained: bool


@dataclass
class Tape:
    """Every site and coordinator message a broker accepts (not the market's), decoded, in order."""

    day: VirtualDay | None = None
    heard: list[Heard[Runtime]] = field(default_factory=list)
    raw: list[tuple[str, bytes]] = field(default_factory=list)  # every accepted message, market's too
    then: Callable[[str, bytes], None] | None = None  # the test's own look at each (topic, payload)

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        self.raw.append((topic, payload))
        if self.then is not None:
            self.then(topic, payload)
        parsed = topics.parse(topic)
        if not payload or parsed is None or parsed.area not in ("site", "dso") or parsed.kind == "progress":
            return
        assert self.day is not None
        kind = parsed.kind if parsed.area == "site" else "dso/status"
        self.heard.append(Heard(self.day.clock.now(), topic, kind, decode_runtime(payload), retained))

    def of(self, kind: type[M], site: str | None = None, topic_kind: str | None = None) -> list[Heard[M]]:
        return [
            cast(Heard[M], h)
            for h in self.heard
            if isinstance(h.msg, kind)
            and (site is None or getattr(h.msg, "site", None) == site)
            and (topic_kind is None or h.kind == topic_kind)
        ]

    def readings(self, site: str) -> list[MeterReading]:
        return [h.msg for h in self.of(MeterReading, site)]

    def telemetry(self, site: str, start: datetime) -> list[Heard[Telemetry]]:
        """The site's telemetry of the day's readings (the meter also reads during its lead-in)."""
        return [h for h in self.of(Telemetry, site) if h.msg.ts > start]

    def dynamic(self, site: str) -> list[Heard[Doe]]:
        return self.of(Doe, site, "doe")


def day_of(
    root: Path, hours: float, scenario: Scenario | None = None, **options: Any
) -> tuple[VirtualDay, Tape]:
    """A virtual day of `scenario` (default S) and the tape of what its broker accepted."""
    tape = Tape()
    day = VirtualDay(scenario or S, root, hours=hours, record=tape, **options)
    tape.day = day
    return day, tape
