"""`PrefixedTransport`: one feeder's tree as read on the DSO's core broker, where its bridge puts it
under `feeder/<id>/` (p2pdoe.services.bridges). Below it every topic carries the prefix; above it
none does, so the signatures (which cover the topic as its sender published it) check as on the
feeder's own broker, and readers such as the monitor work unchanged."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

from p2pdoe.services.transport_api import InboundMessage, Transport
from p2pdoe.services.transport_layer import TransportLayer


class PrefixedTransport(TransportLayer):
    def __init__(self, inner: Transport, prefix: str):
        super().__init__(inner)
        self.prefix = prefix
        self.refused: Counter[str] = Counter()  # messages whose topic lacked the prefix (dropped)
        self._also: list[Counter[str]] = []

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        await self.inner.publish(self.prefix + topic, payload, qos, retain, expiry_s)

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        await self.inner.publish_state(self.prefix + topic, payload, expiry_s)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        await self.inner.subscribe(self.prefix + topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        await self.inner.unsubscribe(self.prefix + topic_filter)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        async for m in self.inner.messages():
            if m.topic.startswith(self.prefix):
                yield InboundMessage(m.topic[len(self.prefix) :], m.payload, m.retained)
            else:
                for counter in (self.refused, *self._also):
                    counter["outside_prefix"] += 1

    def count_into(self, counter: Counter[str]) -> None:
        counter.update(self.refused)
        self._also.append(counter)
