"""The transport the services talk through: a small protocol of ours, and its MQTT implementation.

`Transport` is all a service sees: publish bytes to a topic, subscribe to a filter, iterate over what
arrives. `MqttTransport` implements it on aiomqtt (paho-mqtt 2.x):

- `mqtt://` or `mqtts://` (TLS 1.2 or later, the broker verified against a CA certificate), with a
  user name and password where the broker asks for them.
- MQTT v5, falling back to 3.1.1 when the broker refuses v5 (amqtt, the embedded broker, does);
  v5-only features (message expiry) are used only on a v5 connection and silently left out on 3.1.1.
- A last will (retained, QoS 1) that the broker publishes if the connection drops without a DISCONNECT.
- Reconnection in the background with capped, jittered exponential backoff; every subscription made so
  far is renewed after a reconnect (clean sessions: the broker keeps nothing for us between them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from p2pdoe.errors import P2PDoeError

__all__ = [
    "Backoff",
    "BrokerAddress",
    "InboundMessage",
    "LastWill",
    "MqttTransport",
    "Transport",
    "TransportError",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

ProtocolChoice = Literal["auto", "v5", "v311"]
# CONNACK codes that mean "I do not speak this protocol version": 3.1.1's 1, v5's 0x84.
_UNSUPPORTED_PROTOCOL_CODES = frozenset({1, 0x84})


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


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt k waits in [(1 - jitter) d_k, d_k],
    d_k = min(cap_s, initial_s * factor**k). `max_attempts` consecutive failures end the retries
    (None: retry forever)."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.cap_s):
            raise ValueError("backoff needs 0 < initial_s <= cap_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("backoff max_attempts must be >= 1 or None")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry number `attempt` (0-based)."""
        # Stop growing once past the cap, so a long outage never overflows a float.
        delay = self.initial_s
        for _ in range(attempt):
            if delay >= self.cap_s:
                break
            delay *= self.factor
        return min(self.cap_s, delay)

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling * (1.0 - self.jitter * rng.random())

    def schedule(self, attempts: int, rng: random.Random) -> list[float]:
        return [self.delay(k, rng) for k in range(attempts)]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False


def without_password(url: str) -> str:
    """The URL with any user and password replaced by `***`: fit for an error message or a log."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"  # up to the last @: even a password with a '/'


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]host[:port]` (port 1883 by default), or `mqtts://` for TLS (8883)."""
    parts = urlsplit(url)
    shown = without_password(url)  # an error message never shows the password
    if parts.scheme not in _DEFAULT_PORTS:
        raise TransportError(f"broker URL {shown!r}: only mqtt://host:port or mqtts://host:port is supported")
    if not parts.hostname:
        raise TransportError(f"broker URL {shown!r} has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise TransportError(f"broker URL {shown!r}: {exc}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"broker URL {shown!r}: no path, query or fragment expected")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "mqtts",
    )


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """A client context for `mqtts://`: TLS 1.2 or later, the broker's certificate verified against
    `ca_cert` (default: the system's CAs) and its name against the URL's host."""
    try:
        context = ssl.create_default_context(cafile=None if ca_cert is None else str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load the CA certificate {ca_cert}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _no_delay(client: aiomqtt.Client) -> None:
    """Send small packets at once. paho leaves Nagle's algorithm on, and with the peer's delayed ACK
    every hop of a request/response waited ~40 ms (measured here: a ping-pong through Mosquitto took
    87 ms a round trip before, see tests/test_transport.py)."""
    sock = client._client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connack_code(exc: aiomqtt.MqttError) -> int | None:
    """The CONNACK's return (3.1.1) or reason (v5) code of a refused connection, else None."""
    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    return int(rc.value) if isinstance(rc, ReasonCode) else rc


def _refuses_protocol(exc: aiomqtt.MqttError) -> bool:
    return _connack_code(exc) in _UNSUPPORTED_PROTOCOL_CODES


def _refused_us(exc: aiomqtt.MqttError) -> bool:
    """A failure that retrying will not mend by itself: the broker's certificate failed verification
    (a wrong --ca-cert, or not our broker), or the broker refused our credentials."""
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return True
    return _connack_code(exc) in (4, 5, 0x86, 0x87)  # bad user name or password, not authorized


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


class MqttTransport:
    """`Transport` over MQTT with aiomqtt. Use as `async with MqttTransport(...) as t:`.

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
    ) -> None:
        address = parse_broker_url(url)
        self.url = url
        self.client_id = client_id
        self._host = address.host
        self._port = address.port
        self._username = username if username is not None else address.username
        # a callable is asked at every connection: a rotated password file is taken on reconnecting
        self._password = password if password is not None else address.password
        if ca_cert is not None and not address.tls:
            raise TransportError(f"a CA certificate needs an mqtts:// broker, not {without_password(url)!r}")
        self._tls = tls_context(ca_cert) if address.tls else None
        self._will = will
        self._choice: ProtocolChoice = protocol
        self._backoff = backoff or Backoff()
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._subscriptions: dict[str, int] = {}
        self._retained_state: dict[str, tuple[bytes, float | None]] = {}  # topic -> payload, expires at
        self._inbox: asyncio.Queue[InboundMessage | None] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._failure: BaseException | None = None
        self._gave_up = False
        self._task: asyncio.Task[None] | None = None
        self.protocol: Literal["v5", "v311"] | None = None
        self.connections = 0

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
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        waiter = asyncio.create_task(self._connected.wait())
        try:
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while connecting: leave nothing running
            await self.close()
            raise
        finally:
            waiter.cancel()
        if not self._connected.is_set():
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
    def is_v5(self) -> bool:
        return self.protocol == "v5"

    # -- the Transport protocol ---------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        """Publish once connected; if the connection drops mid-publish, publish again after reconnecting
        (QoS 1 is at-least-once anyway). Bound the wait with `asyncio.timeout` if needed."""
        while True:
            client = await self._ready()
            properties: Properties | None = None
            if expiry_s is not None and self.is_v5:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.MessageExpiryInterval = int(expiry_s)
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            except aiomqtt.MqttError as exc:
                # Let the receive loop notice a lost connection before deciding what this error was.
                for _ in range(3):
                    await asyncio.sleep(0)
                if self._client is client and self._connected.is_set():
                    raise TransportError(f"publish to {topic!r} failed: {exc}") from exc
                log.info("%s: publish to %s interrupted by a disconnect; retrying", self.client_id, topic)
                continue
            return

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish a retained message (QoS 1) and publish it again after every reconnect, so the state
        survives a broker that lost its retained messages. Only the latest per topic is kept."""
        expires_at = None if expiry_s is None else time.monotonic() + expiry_s
        self._retained_state[topic] = (payload, expires_at)
        await self.publish(topic, payload, qos=1, retain=True, expiry_s=expiry_s)

    async def _republish_state(self, client: aiomqtt.Client) -> None:
        now = time.monotonic()
        for topic, (payload, expires_at) in list(self._retained_state.items()):
            if expires_at is not None and expires_at - now < 1:
                continue  # expired meanwhile: the broker would drop it anyway
            properties: Properties | None = None
            if expires_at is not None and self.is_v5:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.MessageExpiryInterval = int(expires_at - now)
            await client.publish(topic, payload, qos=1, retain=True, properties=properties)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected; in any case again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):  # a reconnect will renew it
                await client.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
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

    # -- the connection loop ----------------------------------------------------------------------

    async def _ready(self) -> aiomqtt.Client:
        while True:
            if self._task is None or self._task.done():
                raise TransportError(f"{self.client_id}: transport not running ({self._failure})")
            client = self._client
            if client is not None and self._connected.is_set():
                return client
            waiter = asyncio.ensure_future(self._connected.wait())
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    def _make_client(self, protocol: Literal["v5", "v311"], *, will: bool = True) -> aiomqtt.Client:
        last_will = None
        if will and self._will is not None:
            last_will = aiomqtt.Will(self._will.topic, self._will.payload, qos=1, retain=True)
        v5 = protocol == "v5"
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password() if callable(self._password) else self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=last_will,
            clean_session=None if v5 else True,
            clean_start=True if v5 else mqtt_client.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self._keepalive_s,
            timeout=self._timeout_s,
            tls_context=self._tls,
        )

    async def _open(self, protocol: Literal["v5", "v311"], *, will: bool = True) -> aiomqtt.Client:
        client = self._make_client(protocol, will=will)
        await client.__aenter__()
        _no_delay(client)
        return client

    async def _negotiate(self) -> Literal["v5", "v311"]:
        """Does the broker speak v5? Asked without a will: amqtt misreads a v5 CONNECT that carries one
        and never answers, whereas a plain v5 CONNECT gets a prompt "unsupported protocol version"."""
        try:
            probe = await self._open("v5", will=False)
        except aiomqtt.MqttError as exc:
            if _refuses_protocol(exc):
                log.info("%s: broker refused MQTT v5; using 3.1.1", self.client_id)
                return "v311"
            raise
        await probe.__aexit__(None, None, None)
        return "v5"

    async def _connect(self) -> aiomqtt.Client:
        """One connection attempt. In auto mode the protocol is settled once, on the first connection,
        and kept for reconnects (falling back to 3.1.1 if a v5 broker is replaced by one that refuses it).
        """
        if self._choice != "auto":
            client = await self._open(self._choice)
            self.protocol = self._choice
            return client
        if self.protocol is None:
            if self._will is None:  # the connection itself is the probe
                try:
                    client = await self._open("v5")
                except aiomqtt.MqttError as exc:
                    if not _refuses_protocol(exc):
                        raise
                    log.info("%s: broker refused MQTT v5; using 3.1.1", self.client_id)
                    self.protocol = "v311"
                else:
                    self.protocol = "v5"
                    return client
            else:
                self.protocol = await self._negotiate()
        try:
            return await self._open(self.protocol)
        except aiomqtt.MqttError as exc:
            if self.protocol == "v5" and _refuses_protocol(exc):
                self.protocol = "v311"
                return await self._open("v311")
            raise

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
        failures = 0
        while True:
            try:
                client = await self._connect()
            except aiomqtt.MqttError as exc:
                failures += 1
                self._failure = exc
                limit = self._backoff.max_attempts
                if limit is not None and failures >= limit:
                    log.warning("%s: giving up after %d attempts: %s", self.client_id, failures, exc)
                    self._gave_up = True
                    return
                delay = self._backoff.delay(failures - 1, self._rng)
                level = logging.ERROR if _refused_us(exc) else logging.INFO
                log.log(level, "%s: connect failed (%s); retrying in %.2f s", self.client_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                for topic_filter, qos in list(self._subscriptions.items()):
                    await client.subscribe(topic_filter, qos=qos)
                if self.connections:  # a reconnect: the broker may have lost our retained state
                    await self._republish_state(client)
                self._client = client
                self.connections += 1
                self._connected.set()
                async for message in client.messages:
                    self._inbox.put_nowait(
                        InboundMessage(
                            topic=message.topic.value,
                            payload=_as_bytes(message.payload),
                            retained=bool(message.retain),
                        )
                    )
            except aiomqtt.MqttError as exc:
                self._failure = exc
                log.info("%s: connection lost (%s); reconnecting", self.client_id, exc)
            finally:
                self._connected.clear()
                self._client = None
                # Clean DISCONNECT when we are closing; a no-op error when the link is already gone.
                with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError):
                    await asyncio.shield(client.__aexit__(None, None, None))
            await asyncio.sleep(self._backoff.delay(0, self._rng))


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
