"""Counting envelope violations from what the broker shows alone: meter readings and envelopes.

A reading is judged against the envelope in force for its site over the step it measured (its
`p_kw` is the mean over the step ending at `ts`), by the fallback rules a site follows: the dynamic
envelope valid then, else the default valid then. A site with neither is not judged. A reading is
outside when it exceeds a bound by more than max(1 kW, 2 % of that bound); a violation is sustained
when three readings in a row are outside, and it lasts until a reading is back within tolerance.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from p2pdoe.core.realtime.book import EnvelopeBook
from p2pdoe.core.schemas.runtime import Doe, MeterReading

TOLERANCE_FLOOR_KW = 1.0
TOLERANCE_FRACTION = 0.02
SUSTAINED_READINGS = 3
KEPT_OUTSIDE = 500  # single outside readings kept for the report
_WITHIN_STEP = timedelta(milliseconds=1)  # a reading at ts measured the step just before ts


def tolerance_kw(bound_kw: float) -> float:
    return max(TOLERANCE_FLOOR_KW, TOLERANCE_FRACTION * abs(bound_kw))


def outside_by_kw(p_kw: float, lo_kw: float, up_kw: float) -> float:
    """How far p lies beyond the tolerance band of [lo, up] (0 within it)."""
    if p_kw > up_kw + tolerance_kw(up_kw):
        return p_kw - up_kw
    if p_kw < lo_kw - tolerance_kw(lo_kw):
        return lo_kw - p_kw
    return 0.0


@dataclass
class Violation:
    site: str
    start: datetime  # ts of the first outside reading
    end: datetime  # ts of the last outside reading
    readings: int
    worst_kw: float


@dataclass(frozen=True)
class Outside:
    """One reading beyond its tolerance band."""

    site: str
    ts: datetime
    p_kw: float
    lo_kw: float
    up_kw: float
    excess_kw: float


@dataclass
class _Run:
    readings: list[tuple[datetime, float]] = field(default_factory=list)


@dataclass
class ViolationObserver:
    books: dict[str, EnvelopeBook] = field(default_factory=lambda: defaultdict(EnvelopeBook))
    violations: list[Violation] = field(default_factory=list)
    judged: int = 0
    unjudged: int = 0  # readings with no envelope in force
    outside: int = 0  # single readings outside their tolerance
    outside_readings: list[Outside] = field(default_factory=list)  # the first KEPT_OUTSIDE of them
    _runs: dict[str, _Run] = field(default_factory=lambda: defaultdict(_Run))
    _open: dict[str, Violation] = field(default_factory=dict)

    def envelope(self, kind: str, doe: Doe) -> None:
        if kind == "doe/default":
            self.books[doe.site].set_default(doe)
        else:
            self.books[doe.site].add(doe)

    def reading(self, r: MeterReading) -> None:
        box = self.in_force(r.site, r.ts - _WITHIN_STEP)
        if box is None:
            self.unjudged += 1
            return
        self.judged += 1
        lo, up = box.box_at(r.ts - _WITHIN_STEP)
        excess = outside_by_kw(r.p_kw, lo, up)
        if excess == 0.0:
            self._runs[r.site].readings.clear()
            self._open.pop(r.site, None)
            return
        self.outside += 1
        if len(self.outside_readings) < KEPT_OUTSIDE:
            self.outside_readings.append(Outside(r.site, r.ts, r.p_kw, lo, up, excess))
        self._outside(r.site, r.ts, excess)

    def in_force(self, site: str, moment: datetime) -> Doe | None:
        book = self.books.get(site)
        if book is None:
            return None
        dynamic = book.dynamic_at(moment)
        if dynamic is not None and dynamic.valid_at(moment):
            return dynamic
        if book.default is not None and book.default.valid_at(moment):
            return book.default
        return None

    def _outside(self, site: str, ts: datetime, excess: float) -> None:
        open_ = self._open.get(site)
        if open_ is not None:
            open_.end, open_.readings = ts, open_.readings + 1
            open_.worst_kw = max(open_.worst_kw, excess)
            return
        run = self._runs[site].readings
        run.append((ts, excess))
        if len(run) >= SUSTAINED_READINGS:
            v = Violation(site, run[0][0], ts, len(run), max(e for _, e in run))
            self.violations.append(v)
            self._open[site] = v
            run.clear()

    def by_site(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for v in self.violations:
            counts[v.site] += 1
        return dict(counts)
