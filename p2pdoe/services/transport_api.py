"""What the services see of a message broker, pure: the `Transport` protocol, its message types and
its error. Both implementations speak it: `MqttTransport` (p2pdoe.services.transport, on paho-mqtt) and
`MemoryTransport` (p2pdoe.services.transport_memory, in one process); this module imports neither
asyncio nor an MQTT library. `p2pdoe.services.transport` re-exports all of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from p2pdoe.errors import P2PDoeError

__all__ = ["InboundMessage", "LastWill", "Transport", "TransportError"]


class TransportError(P2PDoeError):
    """The transport cannot do what was asked: a bad URL, or the broker stayed unreachable."""


@dataclass(frozen=True)
class InboundMessage:
    """A message as received: its topic, payload and whether the broker delivered it as retained."""

    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class LastWill:
    """What the broker publishes (retained, QoS 1) when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes


@runtime_checkable
class Transport(Protocol):
    """What the services need from a message broker, and nothing more."""

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        """Publish `payload`; `expiry_s` is a message expiry where the connection supports it."""
        ...

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Receive messages matching `topic_filter` from now on (also across reconnects)."""
        ...

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish a retained message now and again after every reconnect (the latest per topic)."""
        ...

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving `topic_filter` (and do not renew it after a reconnect)."""
        ...

    def messages(self) -> AsyncIterator[InboundMessage]:
        """Every message received on the subscriptions, in arrival order."""
        ...
