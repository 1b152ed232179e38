"""The coordinator day after day, a pure machine: one CoordinatorMachine per day, two at a time.

Day D's machine runs D's real-time day (its rolling rounds to D's end, then the last settlements and
D's results). At D+1's gate closure (a local time on D, p2pdoe.core.calendar) D+1's machine is built
and starts: registration and D+1's day-ahead round run while D's rolling rounds go on; from D+1's
start its rolling rounds take over. The days share one connection, so here:

- each message goes to the day it belongs to: a round's messages by the round id (which carries
  the date), a reading, settlement or envelope by its time, registrations and statuses to both;
- each day's patience keys carry its date, so the two days' deadlines never replace each other;
- a day built later first hears every site's latest registration and status, as retained;
- D+1's default envelopes are published joined to D's (`Doe.joined`): the one retained default a
  site holds covers the rest of today and all of tomorrow;
- a day's request to unsubscribe is dropped (the other day still listens);
- the days' statuses go out as one: the day in force's, naming the next day's round and phase;
- when a day is over it is dropped, and after `days` days (None: never) the machine stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import date, datetime, timedelta

from p2pdoe.core import topics
from p2pdoe.core.calendar import Calendar
from p2pdoe.core.coordinator.commands import DayOver, Save
from p2pdoe.core.coordinator.machine import Command, CoordinatorMachine, Event
from p2pdoe.core.effects import Exit, Heard, Patience, PatienceOver, Relieve, Send, Unsubscribe, Woke
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, MeterReading, SettlementRecord, decode_runtime

log = logging.getLogger("dso_coordinator")
Build = Callable[[date, datetime], CoordinatorMachine]
_BOTH = ("register", "status", "doe/default")


class CoordinatorDays:
    """`build(day, now)`: the machine of `day`, built at `now`; `first`: the day in force at the start;
    `days`: how many days to run (None: until stopped)."""

    def __init__(self, calendar: Calendar, build: Build, first: date, days: int | None = None):
        self.calendar = calendar
        self.build = build
        self.first = first
        self.last = None if days is None else first + timedelta(days=days - 1)
        self.machines: dict[date, CoordinatorMachine] = {}
        self.built: date | None = None  # the latest day built
        self.finished: list[date] = []
        self.kept: dict[str, Heard] = {}  # the latest registration and status of each site, by topic
        self.statuses: dict[date, DsoStatus] = {}  # each day's latest status, joined into one

    # --- the shell's questions -------------------------------------------------------------------

    def next_wake(self) -> datetime | None:
        wakes = [w for m in self.machines.values() if (w := m.next_wake()) is not None]
        gate = self._next_gate()
        return min([*wakes, *([] if gate is None else [gate])], default=None)

    def holding(self) -> bool:
        return any(m.holding() for m in self.machines.values())

    def heavy(self, event: Event) -> bool:
        if not isinstance(event, Heard):
            return True
        return any(self.machines[d].heavy(event) for d in self._route(event))

    @property
    def days_in_hand(self) -> list[date]:
        return sorted(self.machines)

    # --- events ----------------------------------------------------------------------------------

    def start(self, now: datetime) -> list[Command]:
        out = self._open(self.first, now)
        return out + self._gates(now)

    def handle(self, event: Event, now: datetime) -> list[Command]:
        if isinstance(event, PatienceOver):
            text, _, key = event.key.partition("/")
            owner = date.fromisoformat(text)
            m = self.machines.get(owner)
            return [] if m is None else self._wrap(owner, m.handle(PatienceOver(key), now))
        if isinstance(event, Heard) and _is_state(event.topic):
            self.kept[event.topic] = event
        out = self._gates(now) if isinstance(event, Woke) else []
        for day in self.days_in_hand if isinstance(event, Woke) else self._route(event):
            out += self._wrap(day, self.machines[day].handle(event, now))
        return out

    # --- the days --------------------------------------------------------------------------------

    def _next_gate(self) -> datetime | None:
        """When the day after the latest built opens (None: no further day to run)."""
        if self.built is None:
            return None
        nxt = self.built + timedelta(days=1)
        if self.last is not None and nxt > self.last:
            return None
        return self.calendar.gate_closure_at(nxt)

    def _gates(self, now: datetime) -> list[Command]:
        out: list[Command] = []
        while (gate := self._next_gate()) is not None and now >= gate and self.built is not None:
            out += self._open(self.built + timedelta(days=1), now)
        return out

    def _open(self, day: date, now: datetime) -> list[Command]:
        """The day's machine starts and hears every site's registration and status so far, as a
        new subscriber hears them retained."""
        log.info("day %s: its machine starts (day-ahead round, then its real-time day)", day)
        machine = self.build(day, now)
        self.machines[day] = machine
        self.built = day
        out = self._wrap(day, machine.start(now))
        for heard in list(self.kept.values()):
            out += self._wrap(day, machine.handle(Heard(heard.topic, heard.payload, retained=True), now))
        return out

    def _wrap(self, day: date, commands: Iterable[Command]) -> list[Command]:
        out: list[Command] = []
        for cmd in commands:
            if isinstance(cmd, Patience):
                out.append(Patience(f"{day.isoformat()}/{cmd.key}", cmd.seconds))
            elif isinstance(cmd, Relieve):
                out.append(Relieve(f"{day.isoformat()}/{cmd.key}"))
            elif isinstance(cmd, Unsubscribe):
                continue
            elif isinstance(cmd, Send) and _is_default(cmd.topic):
                out.append(self._joined_default(day, cmd))
            elif isinstance(cmd, Save):
                out.append(Save(cmd.standing, day))
            elif isinstance(cmd, DayOver):
                out += [cmd, *self._over(day)]
            elif isinstance(cmd, Send) and cmd.topic == topics.DSO_STATUS:
                out.append(self._status(day, cmd))
            else:
                out.append(cmd)
        return out

    def _status(self, day: date, cmd: Send) -> Send:
        """One status for the days in hand: the day in force's, with the next day's round and phase."""
        msg = decode_runtime(cmd.payload)
        assert isinstance(msg, DsoStatus)
        self.statuses[day] = msg
        days = [d for d in self.days_in_hand if d in self.statuses]
        if msg.state != "online" or not days:
            return cmd
        today = self.statuses[days[0]]
        later = self.statuses[days[-1]] if len(days) > 1 else None
        joined = today.model_copy(
            update={
                "ts": msg.ts,
                "day": days[0],
                "next_round": None
                if later is None
                else later.round or self.machines[days[-1]].ctx.rules.round,
                "next_phase": None if later is None else later.phase,
            }
        )
        return replace(cmd, payload=joined.model_dump_json().encode())

    def _joined_default(self, day: date, cmd: Send) -> Send:
        """A later day's default joined to the earlier day's in force, when both are in hand."""
        earlier = [d for d in self.machines if d < day]
        if not earlier:
            return cmd
        doe = decode_runtime(cmd.payload)
        assert isinstance(doe, Doe)
        before = self.machines[max(earlier)].ctx.default_envelope(doe.site)
        if before.end != doe.start:
            return cmd
        joined = before.joined(doe)
        return Send(cmd.topic, joined.model_dump_json().encode(), cmd.qos, cmd.retain, cmd.state, joined.end)

    def _over(self, day: date) -> list[Command]:
        self.machines.pop(day, None)
        self.statuses.pop(day, None)
        self.finished.append(day)
        log.info("day %s is over; days in hand: %s", day, [d.isoformat() for d in self.days_in_hand])
        if not self.machines and self._next_gate() is None:
            return [Exit(0)]
        return []

    # --- routing ---------------------------------------------------------------------------------

    def _route(self, m: Heard) -> list[date]:
        """The days `m` belongs to (one, or every day in hand)."""
        days = self.days_in_hand
        if len(days) <= 1:
            return days
        parsed = topics.parse(m.topic)
        if parsed is None or (parsed.area == "site" and parsed.kind in _BOTH):
            return days
        if parsed.area == "market" and parsed.round is not None:
            return [self._day_of_round(parsed.round, days)]
        if parsed.area == "site":
            return [self._day_of_time(m.payload, days)]
        return days

    def _day_of_round(self, round_id: str, days: list[date]) -> date:
        for day in days:
            own = self.machines[day].ctx.rules.round
            if round_id == own or round_id.startswith((f"{own}.", f"{own}-")):
                return day
        return days[0]  # another run's: the earliest day deletes its opening

    def _day_of_time(self, payload: bytes, days: list[date]) -> date:
        """A reading, a settlement or an envelope goes to the day its time falls in."""
        try:
            msg = decode_runtime(payload)
        except ValueError:
            return days[0]  # malformed: counted once, by the day in force
        moment = (
            msg.ts
            if isinstance(msg, MeterReading)
            else msg.interval_start
            if isinstance(msg, SettlementRecord)
            else msg.start
            if isinstance(msg, Doe)
            else None
        )
        if moment is None:
            return days[0]
        later = [d for d in days if self.machines[d].ctx.start <= moment]
        return max(later) if later else days[0]


def _is_default(topic: str) -> bool:
    parsed = topics.parse(topic)
    return parsed is not None and parsed.area == "site" and parsed.kind == "doe/default"


def _is_state(topic: str) -> bool:
    """A site's registration or status: what a day built later must hear too."""
    parsed = topics.parse(topic)
    return parsed is not None and parsed.area == "site" and parsed.kind in ("register", "status")
