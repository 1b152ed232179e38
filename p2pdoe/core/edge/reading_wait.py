"""Whether an edge agent on a lockstep clock holds its step until the step's meter reading comes.

It holds while the reading can still come: the meter takes part, a reading came before, the latest is
older than the step, and the meter's connection has not been renewed since that reading arrived. A
reading published while the connection was down never comes (a clean session keeps nothing), and the
plant phase publishes a step's reading before the control phase hears that step's grant, so "renewed
since the last reading" (not "renewed during this step") is what says a reading may have been lost:
holding then would keep the whole day waiting for ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class ReadingWait:
    connections_at_reading: int | None = None  # the meter transport's connection count then

    def reading_arrived(self, connections: int | None) -> None:
        self.connections_at_reading = connections

    def holds(self, last_reading: datetime | None, now: datetime, connections: int | None) -> bool:
        """`connections`: how many connections the meter's transport has made so far."""
        if last_reading is None or self.connections_at_reading is None:
            return False  # no reading heard by this process yet (a journal's aside)
        return last_reading < now and connections == self.connections_at_reading
