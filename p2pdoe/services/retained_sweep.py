"""`RetainedSweep`: the coordinator's transport deletes what a site left retained on its proposal and
report topics (`p2pdoe.core.coordinator.retained`) before anything reads it, signature checks
included: such a message is never believed whoever signed it, and a replayed one must go too."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType

from p2pdoe.core.coordinator.retained import REASON, misused
from p2pdoe.services.transport_api import InboundMessage, Transport, TransportError
from p2pdoe.services.transport_layer import TransportLayer

log = logging.getLogger("dso_coordinator")
_LOUD = 5  # warnings per site before only one in a hundred is logged


class RetainedSweep(TransportLayer):
    """`inner` whose inbound retained proposals and reports are deleted (an empty retained message),
    counted per site in `deleted` (and in the counters of `count_into`) and logged, not passed on."""

    def __init__(self, inner: Transport):
        super().__init__(inner)
        self.deleted: Counter[str] = Counter()
        self.also_count: list[Counter[str]] = []
        self._deleting: set[asyncio.Task[None]] = set()

    def count_into(self, counter: Counter[str]) -> None:
        if self.deleted:
            counter[REASON] += sum(self.deleted.values())
        self.also_count.append(counter)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        async for m in self.inner.messages():
            site = misused(m.topic, m.retained, m.payload)
            if site is None:
                yield m
            else:
                self._delete(site, m.topic)

    def _delete(self, site: str, topic: str) -> None:
        self.deleted[site] += 1
        for counter in self.also_count:
            counter[REASON] += 1
        n = self.deleted[site]
        if n <= _LOUD or n % 100 == 0:
            log.warning("deleted a message %s left retained on %s (%d so far)", site, topic, n)
        task = asyncio.ensure_future(self._publish_empty(topic))  # not while reading: a stall waits
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)

    async def _publish_empty(self, topic: str) -> None:
        try:
            await self.inner.publish(topic, b"", qos=1, retain=True)
        except TransportError as exc:  # the next sweep finds it again
            log.warning("could not delete the retained message on %s: %s", topic, exc)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in list(self._deleting):
            task.cancel()
        await super().__aexit__(kind, exc, tb)
