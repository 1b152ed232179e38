"""The envelopes a party has heard for one site, kept by start time: the coordinator publishes the
next interval's envelope before that interval starts, so the one in force now and the next one are
both held. Used by the edge controller and by the broker-only violation observer alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from p2pdoe.core.schemas.runtime import Doe

KEEP = 8  # dynamic envelopes kept per site (the one in force, the next ones, a few expired)


@dataclass
class EnvelopeBook:
    dynamic: dict[datetime, Doe] = field(default_factory=dict)  # by start
    default: Doe | None = None

    def add(self, doe: Doe) -> None:
        """A dynamic envelope (or the coordinator's default for an interval, round None, published on
        `doe`) is kept by its start; a later one for the same start replaces it."""
        self.dynamic[doe.start] = doe
        if len(self.dynamic) > KEEP:
            del self.dynamic[min(self.dynamic)]

    def set_default(self, doe: Doe | None) -> None:
        self.default = doe

    def dynamic_at(self, now: datetime) -> Doe | None:
        """The dynamic envelope valid at `now`; else the latest that started before `now` (expired, for
        the reason given), else the earliest still to come; None if nothing was heard."""
        valid = [d for d in self.dynamic.values() if d.valid_at(now)]
        if valid:
            return max(valid, key=lambda d: d.start)
        past = [d for d in self.dynamic.values() if d.start <= now]
        if past:
            return max(past, key=lambda d: d.start)
        return min(self.dynamic.values(), key=lambda d: d.start, default=None)

    def all(self) -> list[Doe]:
        return sorted(self.dynamic.values(), key=lambda d: d.start) + (
            [] if self.default is None else [self.default]
        )
