"""The coordinator machine's own commands (beside p2pdoe.core.effects): what its shell persists and
writes. The shell computes results (AC power flows) off the event loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from p2pdoe.core.coordinator.books import DayBooks
from p2pdoe.core.coordinator.context import Context
from p2pdoe.core.coordinator.rounds import Agreement
from p2pdoe.core.coordinator.standing import Standing
from p2pdoe.core.schemas.results import RealtimeInterval


@dataclass(frozen=True)
class Save:
    """Save the standing agreement (the checkpoint a restarted coordinator resumes from); `day`: the
    day's own file, when a coordinator runs day after day."""

    standing: Standing
    day: date | None = None


@dataclass(frozen=True)
class Agreed:
    """The day-ahead agreement, reports in; `write`: write results.json now (no real-time day).
    `ctx`: the day's (a coordinator running day after day has two at a time)."""

    agreement: Agreement
    write: bool
    ctx: Context


@dataclass(frozen=True)
class DayReport:
    agreement: Agreement | None  # None: a coordinator restarted mid-day has only its part of the day
    books: DayBooks
    intervals: list[RealtimeInterval]
    hours: float
    failures: list[str] = field(default_factory=list)  # rounds that failed, and why
    day_ahead_late_s: float = 0.0  # how long after the day's start the day-ahead envelopes came
    dropped: dict[str, int] = field(default_factory=dict)  # messages dropped all day, by reason


@dataclass(frozen=True)
class DayOver:
    """The real-time day is over: write its results."""

    report: DayReport
    ctx: Context
