"""`TransportLayer`: a transport around another (`inner`) that passes on whatever it does not change:
publishing, subscribing, the context manager and every attribute of the inner one (`connections`,
`protocol`, ...). `SignedTransport` and `RetainedSweep` are layers."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

from p2pdoe.services.transport_api import InboundMessage, Transport


class TransportLayer:
    def __init__(self, inner: Transport):
        self.inner = inner

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        await self.inner.publish(topic, payload, qos, retain, expiry_s)

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        await self.inner.publish_state(topic, payload, expiry_s)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        await self.inner.subscribe(topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        await self.inner.unsubscribe(topic_filter)

    def messages(self) -> AsyncIterator[InboundMessage]:
        return self.inner.messages()

    def count_into(self, counter: Counter[str]) -> None:
        """Add what this layer refused or deleted to `counter` (nothing, unless a layer says)."""

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.inner.__aexit__(kind, exc, tb)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
