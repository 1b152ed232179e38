"""What the services' machines hear and what they ask for, as plain values (no I/O here).

A service's decisions live in a pure machine: `handle(event, now) -> list of commands`, with the
day's time `now` passed in. The asyncio shell around it moves bytes and timers and carries the
commands out: it publishes, waits, persists. The events and commands all services share are here;
each machine adds its own (a journal record, a checkpoint, the day's results).

Two kinds of waiting:
- the day's schedule (an interval starts, a round must stop): the machine's `next_wake()`, a moment
  of the day's time, reached through the service's clock (wall, scaled, virtual or lockstep);
- patience with a peer (a registration, an iteration's proposals, a report): `Patience(key, s)`,
  seconds of the event loop's clock, after which the shell hands back `PatienceOver(key)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Heard:
    """A message from the broker."""

    topic: str
    payload: bytes
    retained: bool = False


@dataclass(frozen=True)
class Woke:
    """The moment the machine asked for (`next_wake()`) has come."""


@dataclass(frozen=True)
class PatienceOver:
    key: str


@dataclass(frozen=True)
class Fault:
    """What the shell saw and the machine cannot: alarm `name` raised with `detail` (a disk that
    refuses writes, say), or cleared (`detail` None)."""

    name: str
    detail: str | None


@dataclass(frozen=True)
class Send:
    """Publish `payload` on `topic`. `state`: retained, and published again after every reconnect;
    `until`: valid until that moment of the day (the broker's message expiry); `wait`: False sends it
    in the background (the latest per topic wins), so a broker that is away never holds the machine."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    state: bool = False
    until: datetime | None = None
    wait: bool = True


@dataclass(frozen=True)
class Patience:
    """Wait at most `seconds` (event-loop time) for something; then `PatienceOver(key)`. A new
    `Patience` with the same key replaces the old one."""

    key: str
    seconds: float


@dataclass(frozen=True)
class Relieve:
    """Stop waiting for `key` (what was awaited came)."""

    key: str


@dataclass(frozen=True)
class Subscribe:
    topic_filter: str
    qos: int = 1


@dataclass(frozen=True)
class Unsubscribe:
    topic_filter: str


@dataclass(frozen=True)
class Exit:
    """The service is done: stop with `status` (0: as planned), saying `why` in one line if not 0."""

    status: int = 0
    why: str = ""
