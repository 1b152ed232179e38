"""The coordinator's books of the real-time day, kept from what the broker shows: meter readings
and envelopes (its own violation count and meter integral), the sites' settlements, and each
site's switches of envelope as its status reports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from p2pdoe.core.realtime.metering import MeterIntegral
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas.results import FallbackEvent
from p2pdoe.core.schemas.runtime import Doe, MeterReading, SettlementRecord, SiteStatus


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class DayBooks:
    metering: MeterIntegral
    observer: ViolationObserver = field(default_factory=ViolationObserver)
    settlements: dict[tuple[str, datetime], SettlementRecord] = field(default_factory=dict)
    fallback_events: list[FallbackEvent] = field(default_factory=list)
    _applied: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # site -> (kind, alarms)
    _heard: dict[str, list[tuple[datetime, str, tuple[str, ...]]]] = field(default_factory=dict)

    def reading(self, msg: MeterReading) -> None:
        self.observer.reading(msg)
        self.metering.add(msg)

    def envelope(self, kind: str, msg: Doe) -> None:
        self.observer.envelope(kind, msg)

    def settlement(self, msg: SettlementRecord) -> None:
        self.settlements[(msg.site, msg.interval_start)] = msg  # a redelivery replaces itself

    def status(self, msg: SiteStatus, now: datetime) -> None:
        """A site's status, heard at `now`: an event when its envelope or its alarms change."""
        alarms = tuple(msg.alarms)
        self._heard.setdefault(msg.site, []).append((now, msg.state, alarms))
        if msg.state != "online" or self._applied.get(msg.site) == (msg.envelope, alarms):
            return
        self._applied[msg.site] = (msg.envelope, alarms)
        self.fallback_events.append(
            FallbackEvent(
                site=msg.site, ts=iso(msg.ts), envelope=msg.envelope, reason=msg.reason, alarm=msg.alarm,
                alarms=list(alarms),
            )
        )  # fmt: skip

    def why_unsettled(self, site: str, start: datetime, end: datetime) -> str:
        """Why (site, interval) has no settlement, from what was heard: its readings, its status."""
        t = self.metering.interval_of(start)
        said = "readings came, no settlement" if (site, t) in self.metering.cells else "no meter readings"
        last = [h for h in self._heard.get(site, []) if h[0] <= end]
        if not last:
            return f"{said}; no status from the edge agent"
        _, state, alarms = last[-1]
        if state == "offline":
            return f"{said}; the edge agent was offline"
        return f"{said}; the edge agent reported {', '.join(alarms)}" if alarms else said

    def unsettled(self, sites: list[str], starts: list[datetime]) -> list[tuple[str, datetime]]:
        return [(s, t) for t in starts for s in sites if (s, t) not in self.settlements]
