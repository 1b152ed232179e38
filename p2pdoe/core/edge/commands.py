"""The edge machines' own events and commands (beside p2pdoe.core.effects): what the shell feeds
between the two lanes, hands to the meter, writes into the journal and sends through its outbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from p2pdoe.core.realtime.controller import Plan
from p2pdoe.core.realtime.plant import SetPoints
from p2pdoe.core.realtime.settlement import AgreedTrade, IntervalEnergy, Settlement
from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.core.schemas.site import SiteConfig

# --- events of the real-time machine ---


@dataclass(frozen=True)
class MeterRead:
    reading: MeterReading


@dataclass(frozen=True)
class PlanAgreed:
    """A round settled: its schedule governs from its start."""

    plan: Plan


@dataclass(frozen=True)
class DayStarts:
    """A round over a whole day sets that day's start and configuration (the day after the one
    under way waits for its start: p2pdoe.core.realtime.controller)."""

    start: datetime
    config: SiteConfig | None = None


@dataclass(frozen=True)
class Restored:
    """What the journal kept of a previous run: envelopes heard (key, payload), interval
    accumulations, the starts already settled, and the flexible energy used."""

    envelopes: list[tuple[str, bytes]] = field(default_factory=list)
    intervals: list[IntervalEnergy] = field(default_factory=list)
    settled: set[datetime] = field(default_factory=set)
    flex_used_kwh: float | None = None


# --- commands ---


@dataclass(frozen=True)
class Actuate:
    """Ask the site's assets for `set_points` (through the meter adapter)."""

    set_points: SetPoints
    ts: datetime


@dataclass(frozen=True)
class SaveInterval:
    energy: IntervalEnergy
    scheduled_kwh: float | None
    envelope: str
    lo_kw: float
    up_kw: float
    state: dict[str, str]


@dataclass(frozen=True)
class SaveEnvelope:
    key: str
    payload: bytes
    keep: frozenset[str]  # every other saved envelope is forgotten


@dataclass(frozen=True)
class SaveSettlement:
    settlement: Settlement
    round: str | None
    trades: list[AgreedTrade]
    message: bytes = b""  # the settlement as sent, kept to send again (`SettlementsAgain`)


@dataclass(frozen=True)
class SettlementsAgain:
    """A coordinator run other than the one heard last opened a round: it may have lost what was
    sent before it started, so the settlements journaled since `since` go out again
    (the coordinator keeps one per site and interval, so a repeat changes nothing)."""

    since: datetime


@dataclass(frozen=True)
class Durable:
    """Journal first, then deliver at QoS 1 (a settlement: never lost to a crash or an outage)."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Telemetry:
    """Straight out while the broker is there, kept in the journal while it is away."""

    topic: str
    payload: bytes
