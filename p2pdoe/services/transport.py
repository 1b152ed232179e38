"""`MqttTransport`: the `Transport` of the services over MQTT, on paho-mqtt 2.x driven from asyncio.

`mqtt://` or `mqtts://` (TLS 1.2 or later, the broker verified against a CA certificate), with a user
name and password where the broker asks for them; MQTT v5, or 3.1.1 where the broker refuses v5 (then
v5-only features such as message expiry are left out); a retained last will; a background task that
reconnects, each connection an `MqttLink` (p2pdoe.services.mqtt_link). A shell: it moves bytes and
timers, and asks a sans-I/O `MqttSession` (p2pdoe.services.mqtt_session) every decision: which
protocol, when to retry or give up, what to renew after a reconnect. `Transport` and its types
(p2pdoe.services.transport_api) are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType

from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from p2pdoe.services.broker_url import BrokerAddress, parse_broker_url, without_password
from p2pdoe.services.mqtt_delivery import Delivery
from p2pdoe.services.mqtt_link import LinkError, LinkOptions, MqttLink
from p2pdoe.services.mqtt_session import (
    STABLE_S,
    Attempt,
    Backoff,
    GiveUp,
    MqttSession,
    MqttVersion,
    ProtocolChoice,
    Subscribe,
)
from p2pdoe.services.transport_api import InboundMessage, LastWill, Transport, TransportError

__all__ = [
    "Backoff",
    "BrokerAddress",
    "InboundMessage",
    "LastWill",
    "MqttTransport",
    "ProtocolChoice",
    "Transport",
    "TransportError",
    "connect_within",
    "parse_broker_url",
    "tls_context",
    "without_password",
]

log = logging.getLogger(__name__)


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """A client context for `mqtts://`: TLS 1.2 or later, the broker's certificate verified against
    `ca_cert` (default: the system's CAs) and its name against the URL's host."""
    try:
        context = ssl.create_default_context(cafile=None if ca_cert is None else str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load the CA certificate {ca_cert}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class MqttTransport:
    """`Transport` over MQTT. Use as `async with MqttTransport(...) as t:`.

    Entering connects (retrying with the backoff) and starts a background task that receives messages
    and reconnects; leaving disconnects cleanly, so the last will is *not* published.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        username: str | None = None,
        password: str | Callable[[], str] | None = None,
        ca_cert: Path | None = None,
        will: LastWill | None = None,
        protocol: ProtocolChoice = "auto",
        backoff: Backoff | None = None,
        keepalive_s: int = 30,
        timeout_s: float = 10.0,
        rng: random.Random | None = None,
        session_expiry_s: int = 0,
    ) -> None:
        self._address = parse_broker_url(url)
        self.url = url
        self.client_id = client_id
        self._username = username if username is not None else self._address.username
        # a callable is asked at every connection: a rotated password file is taken on reconnecting
        self._password = password if password is not None else self._address.password
        if ca_cert is not None and not self._address.tls:
            raise TransportError(f"a CA certificate needs an mqtts:// broker, not {without_password(url)!r}")
        self._tls = tls_context(ca_cert) if self._address.tls else None
        self._will = will
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._session_expiry_s = session_expiry_s  # > 0: the broker keeps the session this long
        self._session = MqttSession(
            protocol, has_will=will is not None, backoff=backoff or Backoff(), rng=rng or random.Random()
        )
        self._inbox: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
        self._client: MqttLink | None = None
        self._connected = asyncio.Event()
        self._failure: BaseException | None = None
        self._gave_up = False
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None  # set when the current connection drops
        self.slow_acks = 0  # publishes whose acknowledgement took longer than `timeout_s`
        self.resent = 0  # publishes sent again after a lost connection

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> MqttTransport:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (retrying per the backoff) and start receiving in the background."""
        if self._task is not None:
            return
        task = self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        try:
            await self._connected_or_ended(task)
        except BaseException:  # cancelled while connecting: leave nothing running
            await self.close()
            raise
        # Connected once is started, even if that connection has dropped since: it reconnects itself.
        if task.done():
            failure = self._failure
            await self.close()
            raise TransportError(f"cannot connect to {without_password(self.url)}: {failure}") from failure

    async def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the background task."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def protocol(self) -> MqttVersion | None:
        """The protocol settled on ("v5" or "v311"), None before the first connection."""
        return self._session.protocol

    @property
    def is_v5(self) -> bool:
        return self.protocol == "v5"

    @property
    def connections(self) -> int:
        """How many connections became ready so far (2 after the first reconnect)."""
        return self._session.connections

    # -- the Transport protocol ---------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        """Publish once connected and, at QoS 1, wait for the broker's acknowledgement: through a broker
        that stalls (the wait goes on, logged and counted in `slow_acks`) and across reconnects (sent
        again on the new connection: QoS 1 is at-least-once anyway). Raises `TransportError` only for
        what waiting cannot mend (a message the client refuses) or once the transport is closed."""
        while True:
            client = await self._ready()
            lost = self._lost
            assert lost is not None  # set before the connection counts as ready
            properties = self._expiry(expiry_s)  # once connected: on 3.1.1 there is no expiry
            sending = client.publish(topic, payload, qos, retain, properties)
            delivery = Delivery(self.client_id, topic, self._timeout_s, 2 * self._keepalive_s, self._slow_ack)
            try:
                if await delivery.acknowledged(sending, lost, client.is_connected):
                    return
            finally:
                if not sending.done():
                    sending.cancel()
            self.resent += 1
            log.info("%s: publish to %s interrupted by a disconnect; sending again", self.client_id, topic)

    def _slow_ack(self) -> None:
        self.slow_acks += 1

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish a retained message (QoS 1) and publish it again after every reconnect, so the state
        survives a broker that lost its retained messages. Only the latest per topic is kept."""
        self._session.keep_state(topic, payload, expiry_s, now_s=time.monotonic())
        await self.publish(topic, payload, qos=1, retain=True, expiry_s=expiry_s)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected; in any case again after every reconnect."""
        self._session.subscribe(topic_filter, qos)
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(LinkError):  # a reconnect will renew it
                await client.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._session.unsubscribe(topic_filter)
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(LinkError):
                await client.unsubscribe(topic_filter)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Messages from every subscription, across reconnects. Ends when the transport is closed; raises
        `TransportError` if it gave up reconnecting. Safe to cancel: no message is lost."""
        while True:
            item = await self._inbox.get()
            if item is None:  # the receive loop ended: let every other reader see it too
                self._inbox.put_nowait(None)
                if self._gave_up:
                    raise TransportError(f"{self.client_id}: gave up reconnecting: {self._failure}")
                return
            yield item

    def _connect_properties(self) -> Properties:
        """A v5 CONNECT that asks the broker to keep the session (and queue QoS 1 messages) for
        `session_expiry_s` after a disconnect."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry_s
        return properties

    def _expiry(self, expiry_s: int | None) -> Properties | None:
        """The PUBLISH properties for a message expiry: on v5 only (3.1.1 has no such thing)."""
        if expiry_s is None or not self.is_v5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = int(expiry_s)
        return properties

    # -- the connection loop ----------------------------------------------------------------------

    async def _ready(self) -> MqttLink:
        while True:
            if self._task is None or self._task.done():
                raise TransportError(f"{self.client_id}: transport not running ({self._failure})")
            client = self._client
            if client is not None and self._connected.is_set():
                return client
            await self._connected_or_ended(self._task)

    async def _connected_or_ended(self, task: asyncio.Task[None]) -> None:
        """Wait until connected, or until the background task has ended."""
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def _link_options(self, attempt: Attempt) -> LinkOptions:
        will = self._will if attempt.will else None
        v5 = attempt.protocol == "v5"
        keep = self._session_expiry_s > 0 and not attempt.probe
        return LinkOptions(
            self._address.host,
            self._address.port,
            # a probe only asks whether the broker speaks v5: under an id of its own, so it neither
            # takes over nor resumes (nor, being clean, wipes) this client's session
            f"{self.client_id}-probe" if attempt.probe else self.client_id,
            v5=v5,
            username=self._username,
            password=self._password() if callable(self._password) else self._password,
            will=None if will is None else (will.topic, will.payload),
            clean_session=None if v5 else not keep,
            clean_start=(not keep) if v5 else mqtt_client.MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties() if v5 and keep else None,
            keepalive_s=self._keepalive_s,
            timeout_s=self._timeout_s,
            tls=self._tls,
        )

    async def _open(self, attempt: Attempt) -> MqttLink:
        link = MqttLink(self._link_options(attempt), self._deliver)
        await link.open()
        return link

    def _deliver(self, topic: str, payload: bytes, retained: bool) -> None:
        self._inbox.put_nowait(InboundMessage(topic, payload, retained=retained))

    async def _connect(self) -> MqttLink:
        """One attempt to connect: open what the session asks for (a v5 probe, a fallback to 3.1.1)."""
        attempt = self._session.next_attempt()
        while True:
            try:
                client = await self._open(attempt)
            except LinkError as exc:
                fallback = self._session.refused(attempt, exc.rc)
                if fallback is None:
                    raise
                log.info("%s: broker refused MQTT v5; using 3.1.1", self.client_id)
                attempt = fallback
                continue
            if attempt.probe:  # it only asked whether the broker speaks v5
                await client.close()
            follow_up = self._session.opened(attempt)
            if follow_up is None:
                return client
            attempt = follow_up

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except Exception as exc:  # a bug or a bad setting, not a network fault: stop and say why
            log.exception("%s: transport failed", self.client_id)
            self._failure = exc
            self._gave_up = True
        finally:
            self._inbox.put_nowait(None)

    async def _connection_loop(self) -> None:
        while True:
            try:
                client = await self._connect()
            except LinkError as exc:
                self._failure = exc
                if await self._retry_after(exc):
                    continue
                return
            try:
                await self._renew(client)
                self._lost = asyncio.get_running_loop().create_future()
                self._client = client
                self._session.renewed(time.monotonic())
                self._connected.set()
                if self._session.connections > 1:
                    log.info("%s: connected again (connection %d)", self.client_id, self._session.connections)
                await self._receive(client)
            except LinkError as exc:
                self._failure = exc
                log.info("%s: connection lost (%s); reconnecting", self.client_id, exc)
            finally:
                await self._drop(client)
            await asyncio.sleep(self._lost_for())

    def _lost_for(self) -> float:
        """The wait before reconnecting; said loudly while connections end as soon as they are made."""
        delay_s = self._session.lost(time.monotonic())
        if self._session.flapping >= 2:
            log.warning(
                "%s: %d connections in a row ended within %g s (another process with this client id?); "
                "reconnecting in %.1f s",
                self.client_id, self._session.flapping, STABLE_S, delay_s,
            )  # fmt: skip
        return delay_s

    async def _retry_after(self, exc: LinkError) -> bool:
        """Wait as long as the session says after a failed attempt; False when it says to give up."""
        decision = self._session.connect_failed(exc.rc, str(exc))
        if isinstance(decision, GiveUp):
            log.warning("%s: giving up after %d attempts: %s", self.client_id, decision.attempts, exc)
            self._gave_up = True
            return False
        level = logging.ERROR if decision.refused else logging.INFO
        log.log(level, "%s: connect failed (%s); retrying in %.2f s", self.client_id, exc, decision.delay_s)
        await asyncio.sleep(decision.delay_s)
        return True

    async def _renew(self, client: MqttLink) -> None:
        """Send what the session renews on a fresh connection: subscriptions, then retained state."""
        for renewal in self._session.connected(time.monotonic()):
            if isinstance(renewal, Subscribe):
                await client.subscribe(renewal.topic_filter, qos=renewal.qos)
            else:
                expiry = self._expiry(renewal.expiry_s)
                await client.publish(renewal.topic, renewal.payload, qos=1, retain=True, properties=expiry)

    async def _receive(self, client: MqttLink) -> None:
        """Wait while the link delivers into the inbox; raise when it ends."""
        reason = await asyncio.shield(client.ended)
        raise LinkError(f"disconnected: {reason}")

    async def _drop(self, client: MqttLink) -> None:
        self._connected.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._client = None
        # Clean DISCONNECT when we are closing; a no-op error when the link is already gone.
        with contextlib.suppress(LinkError, asyncio.CancelledError):
            await asyncio.shield(client.close())


async def connect_within(url: str, client_id: str, timeout_s: float, **kwargs: object) -> MqttTransport:
    """A started transport, or TransportError (one line) if the broker stays unreachable for `timeout_s`.
    Use it where a person waits (a command line); services retry forever instead."""
    transport = MqttTransport(url, client_id, backoff=Backoff(initial_s=0.2, cap_s=2.0), **kwargs)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(timeout_s):
            await transport.start()
    except TimeoutError:
        raise TransportError(
            f"cannot reach the broker at {without_password(url)} within {timeout_s:g} s"
        ) from None
    return transport
