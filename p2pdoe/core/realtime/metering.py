"""A party's own integral of meter readings per site and interval (the coordinator's check on the
sites' settlements, and the measured injections for the AC power flow). Same step rule as the
edge's controller: a reading's p is the mean over the step since the site's previous reading,
clipped at its interval's start; a repeated time stamp counts once."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from p2pdoe.core.schemas.runtime import MeterReading

_WITHIN_STEP = timedelta(milliseconds=1)


@dataclass
class Integral:
    kwh: float = 0.0
    kvarh: float = 0.0
    seconds: float = 0.0


@dataclass
class MeterIntegral:
    day_start: datetime
    dt_s: float
    nominal_step_s: float
    cells: dict[tuple[str, int], Integral] = field(default_factory=dict)
    readings: int = 0
    _last: dict[str, datetime] = field(default_factory=dict)

    def interval_of(self, moment: datetime) -> int:
        return int((moment - self.day_start).total_seconds() // self.dt_s)

    def add(self, r: MeterReading) -> None:
        last = self._last.get(r.site)
        if last is not None and r.ts <= last:
            return
        t = self.interval_of(r.ts - _WITHIN_STEP)
        since_start = (r.ts - self.day_start).total_seconds() - t * self.dt_s
        step = self.nominal_step_s if last is None else (r.ts - last).total_seconds()
        step = min(step, since_start)
        self._last[r.site] = r.ts
        self.readings += 1
        cell = self.cells.setdefault((r.site, t), Integral())
        cell.kwh += r.p_kw * step / 3600.0
        cell.kvarh += (r.q_kvar or 0.0) * step / 3600.0
        cell.seconds += step

    def energy_kwh(self, site: str, t: int) -> float | None:
        cell = self.cells.get((site, t))
        return None if cell is None else cell.kwh

    def mean_kw(self, site: str, t: int) -> tuple[float, float] | None:
        """Mean p and q over the part of interval t the readings cover."""
        cell = self.cells.get((site, t))
        if cell is None or cell.seconds <= 0:
            return None
        return cell.kwh * 3600.0 / cell.seconds, cell.kvarh * 3600.0 / cell.seconds
