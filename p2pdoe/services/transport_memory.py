"""An MQTT-like broker and its clients in one asyncio event loop: for tests and the one-process day.

`MemoryBroker` routes publishes between `MemoryTransport`s (the `Transport` protocol, behaving like
`MqttTransport` on a v5 broker) without sockets or threads, and reads only the event loop's clock, so a
day runs on a virtual-time loop. It keeps retained messages (an empty retained payload deletes one),
honours message expiry on them, publishes last wills, and injects faults: `outage`, `restore`, `kill`.

Order: the broker accepts publishes in call order (publishes waiting out an outage keep their place) and
puts each accepted message at once into every matching subscriber's FIFO inbox. Every subscriber thus
sees messages in the order the broker accepted them, whoever published them: callers rely on this.

Sessions: a client with a session expiry (`session_expiry_s` > 0, as MqttTransport's clean start off)
keeps its subscriptions when it goes away (killed or closed), and the broker queues for it every QoS 1
message matching a QoS 1 subscription until a client with its id comes back within the expiry: the
queue is delivered first, in the broker's order. A client without one starts clean and ends its
session when it goes. (Sessions, like retained messages, survive `outage`: a broker with persistence.)

It does not do: persistence to disk, authentication or ACLs, QoS 2 (refused), shared subscriptions.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from p2pdoe.services.transport_api import InboundMessage, LastWill, TransportError

__all__ = ["MemoryBroker", "MemoryTransport", "topic_matches"]

Recorder = Callable[[str, bytes, bool], None]  # (topic, payload, retain), for every accepted publish
_Kept = tuple[bytes, float | None]  # a payload and when it expires (the loop's clock), or never


def _check_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ValueError(f"invalid topic filter {topic_filter!r}")


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"invalid topic {topic!r}: no wildcards in a published topic")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` is one level, `#` the rest including the parent level (`a/#` matches `a`);
    a wildcard first level does not match a `$` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    retain: bool
    expiry_s: float | None
    qos: int = 1


@dataclass
class _Session:
    """What the broker keeps of a client that went away with a session expiry."""

    subscriptions: dict[str, int]
    expires_at: float  # the loop's clock
    queue: deque[InboundMessage]


MAX_QUEUED = 100_000  # messages queued per session (the oldest dropped beyond), as max_queued_messages


class MemoryBroker:
    """The broker: retained messages, routing, last wills and fault injection. Use it from the loop."""

    def __init__(self, on_publish: Recorder | None = None) -> None:
        self.on_publish = on_publish
        self._clients: dict[str, MemoryTransport] = {}  # open clients by id, connected while `up`
        self._sessions: dict[str, _Session] = {}  # clients away with their session kept, by id
        self._retained: dict[str, _Kept] = {}  # in the order last published
        self._waiting: deque[tuple[MemoryTransport, _Message, asyncio.Future[None]]] = deque()
        self._up = True
        # fault injection: a message for which this is true is accepted from its sender and then
        # delivered to no one, as one lost on its way to the subscribers; counted in `lost`
        self.lose: Callable[[str, bytes], bool] | None = None
        self.lost = 0

    @property
    def up(self) -> bool:
        return self._up

    def retained(self, topic: str) -> bytes | None:
        """The retained payload on `topic`, or None (never one that has expired)."""
        kept = self._live_retained().get(topic)
        return None if kept is None else kept[0]

    def retained_topics(self) -> list[str]:
        """Every topic with a retained message kept (one expired but not yet dropped too), in the order
        last published; callable after the day's loop has ended."""
        return list(self._retained)

    # -- faults ----------------------------------------------------------------------------------------

    def outage(self) -> None:
        """The broker goes down: every client is disconnected; publishes wait until `restore`."""
        self._up = False
        for client in self._clients.values():
            client._link_down()

    def restore(self, keep_retained: bool = True) -> None:
        """The broker is back: clients reconnect, renew their subscriptions (retained messages again)
        and republish their state, then the publishes that waited go out in call order. No-op if up."""
        if self._up:
            return
        if not keep_retained:
            self._retained.clear()
        self._up = True
        for client in list(self._clients.values()):
            self._connect(client)
        self._release_waiting()

    def kill(self, client_id: str) -> None:
        """Drop a client's connection without a DISCONNECT: the client is closed for good (its publishes
        waiting fail, its `messages()` ends) and, if the broker is up, its last will goes out."""
        client = self._clients.get(client_id)
        if client is None:
            raise TransportError(f"no open client {client_id!r} to kill")
        self._drop(client, will=True)

    # -- what the clients call -------------------------------------------------------------------------

    def _join(self, client: MemoryTransport) -> None:
        """A client opens; one with the same id is taken over: dropped with its will, as Mosquitto
        does (eclipse-mosquitto/mosquitto#904; HiveMQ and EMQX 5 publish no will on a takeover)."""
        old = self._clients.get(client.client_id)
        if old is not None:
            self._drop(old, will=True)
        session = self._live_sessions().pop(client.client_id, None)
        if session is not None and client.session_expiry_s > 0:  # resumed: subscriptions and queue
            client._subscriptions = {**session.subscriptions, **client._subscriptions}
            client._resumed = session.queue
        self._clients[client.client_id] = client
        if self._up:
            self._connect(client)

    def _leave(self, client: MemoryTransport) -> None:
        """A clean DISCONNECT: no will."""
        if self._clients.get(client.client_id) is client:
            self._drop(client, will=False)

    async def _submit(self, sender: MemoryTransport, message: _Message) -> None:
        """Accept now if connected, else wait in line for the connection (QoS 0 and 1 alike)."""
        if sender.connected:
            self._accept(message)
            await asyncio.sleep(0)  # a publish is a round trip: let others run
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((sender, message, done))
        await done

    def _subscribed(self, client: MemoryTransport, topic_filter: str) -> None:
        """A new (or renewed) subscription gets the matching retained messages at once."""
        for topic, (payload, _) in self._live_retained().items():
            if topic_matches(topic_filter, topic):
                client._deliver(InboundMessage(topic, payload, retained=True))

    # -- inside --------------------------------------------------------------------------------------

    def _connect(self, client: MemoryTransport) -> None:
        client._link_up()
        while client._resumed:
            client._deliver(client._resumed.popleft())
        for topic_filter in list(client._subscriptions):
            self._subscribed(client, topic_filter)
        for message in client._state_to_republish(self._now()):
            self._accept(message)

    def _drop(self, client: MemoryTransport, *, will: bool) -> None:
        was_connected = client.connected
        del self._clients[client.client_id]
        if client.session_expiry_s > 0:
            expires_at = self._now() + client.session_expiry_s
            self._sessions[client.client_id] = _Session(dict(client._subscriptions), expires_at, deque())
        client._end()
        self._fail_waiting(client)
        if will and was_connected and client.will is not None:
            self._accept(_Message(client.will.topic, client.will.payload, retain=True, expiry_s=None))

    def _accept(self, message: _Message) -> None:
        if message.retain:
            self._retain(message)
        if self.on_publish is not None:
            self.on_publish(message.topic, message.payload, message.retain)
        if self.lose is not None and self.lose(message.topic, message.payload):
            self.lost += 1
            return
        live = InboundMessage(message.topic, message.payload, retained=False)
        for client in self._clients.values():
            if client.connected and any(topic_matches(f, message.topic) for f in client._subscriptions):
                client._deliver(live)
        if message.qos >= 1:
            for session in self._live_sessions().values():
                if any(q >= 1 and topic_matches(f, message.topic) for f, q in session.subscriptions.items()):
                    if len(session.queue) >= MAX_QUEUED:
                        session.queue.popleft()
                    session.queue.append(live)

    def _retain(self, message: _Message) -> None:
        self._retained.pop(message.topic, None)  # re-inserted last: retained order is publish order
        if message.payload:
            expires_at = None if message.expiry_s is None else self._now() + message.expiry_s
            self._retained[message.topic] = (message.payload, expires_at)

    def _live_sessions(self) -> dict[str, _Session]:
        now = self._now()
        for client_id in [i for i, x in self._sessions.items() if x.expires_at <= now]:
            del self._sessions[client_id]
        return self._sessions

    def _live_retained(self) -> dict[str, _Kept]:
        now = self._now()
        expired = [t for t, (_, at) in self._retained.items() if at is not None and at <= now]
        for topic in expired:
            del self._retained[topic]
        return self._retained

    def _release_waiting(self) -> None:
        while self._waiting:
            _, message, done = self._waiting.popleft()
            if not done.done():  # not cancelled meanwhile
                self._accept(message)
                done.set_result(None)

    def _fail_waiting(self, client: MemoryTransport) -> None:
        for sender, _, done in self._waiting:
            if sender is client and not done.done():
                done.set_exception(TransportError(f"{client.client_id}: closed before it could publish"))
        self._waiting = deque(w for w in self._waiting if w[0] is not client)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


class MemoryTransport:
    """`Transport` on a `MemoryBroker`. Use as `async with MemoryTransport(broker, "id") as t:`.

    Entering connects (waiting out an outage); leaving disconnects cleanly, so the will is not
    published. A closed transport stays closed. A second transport with the same id takes over: the
    first is dropped as by `kill` (its will is published, as Mosquitto does) and stays closed.
    """

    protocol: Literal["memory"] = "memory"
    is_v5 = True  # message expiry is honoured

    def __init__(
        self, broker: MemoryBroker, client_id: str, *, will: LastWill | None = None, session_expiry_s: int = 0
    ) -> None:
        self.client_id = client_id
        self.will = will
        self.session_expiry_s = session_expiry_s  # > 0: the broker keeps the session this long when away
        self._resumed: deque[InboundMessage] = deque()  # what the session queued, delivered on connect
        self.connections = 0
        self._broker = broker
        self._subscriptions: dict[str, int] = {}
        self._state: dict[str, _Kept] = {}  # topic -> payload, expires at
        self._inbox: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
        self._linked = asyncio.Event()  # set once connected or closed: what `start` waits for
        self._connected = False
        self._started = False
        self._closed = False

    async def __aenter__(self) -> MemoryTransport:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, waiting for the broker to be up."""
        if self._closed:
            raise TransportError(f"{self.client_id}: closed; make a new transport")
        if not self._started:
            self._started = True
            self._broker._join(self)
        await self._linked.wait()
        if self._closed:
            raise TransportError(f"{self.client_id}: dropped while connecting")

    async def close(self) -> None:
        """Disconnect cleanly (no last will); `messages()` ends."""
        self._broker._leave(self)
        self._end()

    @property
    def connected(self) -> bool:
        return self._connected

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        """Publish once connected (waiting out an outage, QoS 0 and 1 alike)."""
        _check_topic(topic)
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos}: the memory broker does QoS 0 and 1 only")
        if not self._started or self._closed:
            raise TransportError(f"{self.client_id}: transport not running")
        await self._broker._submit(self, _Message(topic, bytes(payload), retain, expiry_s, qos))

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish retained (QoS 1) now and again after every reconnect; the latest per topic is kept."""
        expires_at = None if expiry_s is None else self._broker._now() + expiry_s
        self._state[topic] = (bytes(payload), expires_at)
        await self.publish(topic, payload, qos=1, retain=True, expiry_s=expiry_s)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe (once per filter; again replaces the QoS) and get the retained messages now."""
        _check_filter(topic_filter)
        self._subscriptions[topic_filter] = qos
        if self._connected:
            self._broker._subscribed(self, topic_filter)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Messages from every subscription, across reconnects, in the broker's order; ends on close."""
        while True:
            item = await self._inbox.get()
            if item is None:  # closed: let every other reader see it too
                self._inbox.put_nowait(None)
                return
            yield item

    # -- called by the broker --------------------------------------------------------------------------

    def _link_up(self) -> None:
        self._connected = True
        self.connections += 1
        self._linked.set()

    def _link_down(self) -> None:
        self._connected = False

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._connected = False
            self._inbox.put_nowait(None)
            self._linked.set()

    def _deliver(self, message: InboundMessage) -> None:
        if not self._closed:
            self._inbox.put_nowait(message)

    def _state_to_republish(self, now: float) -> list[_Message]:
        """After a reconnect: the state not about to expire, with what is left of its expiry."""
        if self.connections <= 1:
            return []  # the first connection: nothing was published yet
        out = []
        for topic, (payload, expires_at) in self._state.items():
            if expires_at is not None and expires_at - now < 1:
                continue  # expired meanwhile, as MqttTransport skips it
            left_s = None if expires_at is None else int(expires_at - now)
            out.append(_Message(topic, payload, retain=True, expiry_s=left_s))
        return out
