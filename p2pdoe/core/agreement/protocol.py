"""Events, commands and the per-iteration inbox shared by both kinds of participant.

A participant is driven by `handle(Received(message)) -> list[Command]` and never does I/O. Messages
for the current iteration are kept until every expected sender has spoken; messages for the next
iteration (a fast peer may already be there) are buffered; everything else is ignored and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from p2pdoe.core.schemas.messages import Grant, PolishPrices, PolishReport, Proposal, RoundOpen

Message = RoundOpen | Proposal | Grant | PolishReport | PolishPrices
M = TypeVar("M")


@dataclass(frozen=True)
class Received:
    message: Message


@dataclass(frozen=True)
class Publish:
    message: Message


@dataclass(frozen=True)
class Finished:
    """The round is over; `outcome` is the participant's own result."""

    outcome: object


Command = Publish | Finished

# Why an incoming message was not used (the keys of `Inbox.ignored`).
DUPLICATE = "duplicate"
STALE = "stale_iteration"
TOO_EARLY = "too_early"
UNKNOWN_SENDER = "unknown_sender"
WRONG_ROUND = "wrong_round"
INVALID = "invalid"
NO_ROUND = "no_round"
ROUND_OVER = "round_over"


@dataclass
class Inbox(Generic[M]):
    """The messages of iteration `iteration` (and the next), one per expected sender."""

    expected: frozenset[str]
    iteration: int = 0
    current: dict[str, M] = field(default_factory=dict)
    upcoming: dict[str, M] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)

    def offer(self, sender: str, iteration: int, message: M) -> bool:
        """Keep or ignore (and count) a message; True if it was kept."""
        reason = self._rejection(sender, iteration)
        if reason is not None:
            self.ignored[reason] += 1
            return False
        box = self.current if iteration == self.iteration else self.upcoming
        if sender in box:
            self.ignored[DUPLICATE] += 1
            return False
        box[sender] = message
        return True

    def _rejection(self, sender: str, iteration: int) -> str | None:
        if sender not in self.expected:
            return UNKNOWN_SENDER
        if iteration < self.iteration:
            return STALE
        if iteration > self.iteration + 1:
            return TOO_EARLY
        return None

    @property
    def complete(self) -> bool:
        return self.expected <= self.current.keys()

    def advance(self) -> dict[str, M]:
        """Hand over this iteration's messages and move to the next."""
        done = self.current
        self.current, self.upcoming = self.upcoming, {}
        self.iteration += 1
        return done
