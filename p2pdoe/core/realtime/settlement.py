"""Energy per interval from meter readings, and the settlement of one interval (pure).

A reading's `p_kw` is the mean net injection over the step that ends at its time stamp (what the
simulator publishes, and what an energy meter's interval register gives), so an interval's energy is
the sum of p times the step lengths of its readings. The settlement splits the measured energy into
the agreed P2P trades, paid at their agreed prices whatever happened, and the rest, exchanged with the
grid at the retail tariffs; the deviation is the measured energy minus the scheduled one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class IntervalEnergy:
    """Accumulates one interval's measured energy from its readings (export positive, kWh)."""

    start: datetime
    end: datetime
    energy_kwh: float = 0.0
    readings: int = 0
    covered_s: float = 0.0  # seconds of the interval the readings cover
    last_ts: datetime | None = None  # the latest reading's time stamp

    def add(self, ts: datetime, p_kw: float, step_s: float) -> None:
        """A reading at `ts` (the end of its step of `step_s` seconds); outside the interval, ValueError."""
        if not self.start < ts <= self.end:
            raise ValueError(f"a reading at {ts.isoformat()} is outside ({self.start}, {self.end}]")
        if self.last_ts is not None and ts <= self.last_ts:
            return  # a repeated or older reading (at-least-once delivery): counted once
        self.last_ts = ts
        self.energy_kwh += p_kw * step_s / 3600.0
        self.readings += 1
        self.covered_s += step_s

    @property
    def complete(self) -> bool:
        return self.covered_s >= (self.end - self.start).total_seconds() - 1e-6


@dataclass(frozen=True)
class AgreedTrade:
    """What the site bought from and sold to one peer in the interval, at the agreed prices (each
    direction is its own coupling, with its own price)."""

    peer: str
    bought_kwh: float
    sold_kwh: float
    buy_price_eur_per_kwh: float
    sell_price_eur_per_kwh: float


@dataclass(frozen=True)
class Settlement:
    interval_start: datetime
    measured_kwh: float  # export positive
    scheduled_kwh: float
    deviation_kwh: float  # measured - scheduled
    p2p_paid_eur: float  # to peers, for what it bought
    p2p_received_eur: float  # from peers, for what it sold
    grid_kwh: float  # the rest: exported (+) to or imported (-) from the grid
    grid_eur: float  # paid to the grid (negative: earned)

    @property
    def net_eur(self) -> float:
        """What the interval cost the site (negative: it earned)."""
        return self.p2p_paid_eur - self.p2p_received_eur + self.grid_eur


def settle(
    interval_start: datetime,
    measured_kwh: float,
    scheduled_kwh: float,
    trades: list[AgreedTrade],
    price_import: float,
    price_export: float,
) -> Settlement:
    bought = sum(t.bought_kwh for t in trades)
    sold = sum(t.sold_kwh for t in trades)
    grid_kwh = measured_kwh - (sold - bought)
    grid_eur = -grid_kwh * price_export if grid_kwh >= 0 else -grid_kwh * price_import
    return Settlement(
        interval_start=interval_start,
        measured_kwh=measured_kwh,
        scheduled_kwh=scheduled_kwh,
        deviation_kwh=measured_kwh - scheduled_kwh,
        p2p_paid_eur=sum(t.bought_kwh * t.buy_price_eur_per_kwh for t in trades),
        p2p_received_eur=sum(t.sold_kwh * t.sell_price_eur_per_kwh for t in trades),
        grid_kwh=grid_kwh,
        grid_eur=grid_eur,
    )
