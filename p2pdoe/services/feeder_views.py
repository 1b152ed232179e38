"""`FeederViews`: one connection to the DSO's core broker read as one transport per feeder.

On the core, each feeder's tree is under `feeder/<id>/` (p2pdoe.services.bridges). A feeder's view
subscribes and publishes with the prefix and hands on its messages without it, so the signatures
(which cover the topic as its sender published it) check as on the feeder's own broker, and readers
such as the monitor work unchanged. One connection serves every feeder: the core lets an identity
hold one connection only. The bridges' own state (`feeder/<id>/bridge/state`) is kept aside.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from p2pdoe.core import topics
from p2pdoe.services.bridges import BRIDGE_STATE
from p2pdoe.services.transport_api import InboundMessage, Transport
from p2pdoe.services.transport_layer import TransportLayer


class FeederViews:
    def __init__(self, inner: Transport, feeders: Sequence[str]):
        self.inner = inner
        self._inboxes: dict[str, asyncio.Queue[InboundMessage]] = {f: asyncio.Queue() for f in feeders}
        self.bridge: dict[str, bool | None] = dict.fromkeys(feeders)  # None: not heard yet
        self.refused: Counter[str] = Counter()  # messages of no feeder asked for

    def view(self, feeder: str) -> FeederView:
        return FeederView(self.inner, topics.feeder_prefix(feeder), self._inboxes[feeder])

    async def watch_bridges(self) -> None:
        for feeder in self._inboxes:
            await self.inner.subscribe(topics.feeder_prefix(feeder) + BRIDGE_STATE)

    async def run(self) -> None:
        """Hand each message to its feeder's view (until the connection's messages end)."""
        async for m in self.inner.messages():
            self.route(m)

    def route(self, m: InboundMessage) -> None:
        split = topics.split_feeder(m.topic)
        if split is None or split[0] not in self._inboxes:
            self.refused["outside_feeders"] += 1
            return
        feeder, rest = split
        if rest == BRIDGE_STATE:
            self.bridge[feeder] = m.payload == b"1"
            return
        self._inboxes[feeder].put_nowait(InboundMessage(rest, m.payload, m.retained))


class FeederView(TransportLayer):
    """One feeder's tree as its own; its messages come from `FeederViews.run`."""

    def __init__(self, inner: Transport, prefix: str, inbox: asyncio.Queue[InboundMessage]):
        super().__init__(inner)
        self.prefix = prefix
        self._inbox = inbox

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
        while True:
            yield await self._inbox.get()
