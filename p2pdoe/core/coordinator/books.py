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
    _applied: dict[str, str] = field(default_factory=dict)  # site -> envelope kind it applies

    def reading(self, msg: MeterReading) -> None:
        self.observer.reading(msg)
        self.metering.add(msg)

    def envelope(self, kind: str, msg: Doe) -> None:
        self.observer.envelope(kind, msg)

    def settlement(self, msg: SettlementRecord) -> None:
        self.settlements[(msg.site, msg.interval_start)] = msg  # a redelivery replaces itself

    def status(self, msg: SiteStatus) -> None:
        if msg.state != "online" or self._applied.get(msg.site) == msg.envelope:
            return
        self._applied[msg.site] = msg.envelope
        self.fallback_events.append(
            FallbackEvent(
                site=msg.site, ts=iso(msg.ts), envelope=msg.envelope, reason=msg.reason, alarm=msg.alarm
            )
        )

    def unsettled(self, sites: list[str], starts: list[datetime]) -> list[tuple[str, datetime]]:
        return [(s, t) for t in starts for s in sites if (s, t) not in self.settlements]
