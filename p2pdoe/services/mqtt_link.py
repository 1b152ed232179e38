"""`MqttLink`: one MQTT connection, paho-mqtt's protocol engine driven from the running asyncio loop.

paho parses and builds the packets, tracks QoS 1 flows and keeps the connection alive; this module only
moves bytes: the socket's reader callback runs paho's read, whatever paho queued is written at once
(paho writes a packet as it is queued when no socket callbacks are registered), and a writer callback
is registered only while the socket's buffer is full. No thread after the connect, no task per message:
a received message goes straight to `on_message`, an acknowledgement straight to its future.

Measured against aiomqtt, which registers a writer through the loop's self-pipe for every packet and
runs a task per publish and per received message: see "What an MQTT client costs per message" in
docs/benchmarks.md. `MqttTransport` (p2pdoe.services.transport) adds reconnects and delivery on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)
Props = Properties | None
MISC_PERIOD_S = 1.0  # how often paho checks the keep-alive (a PINGREQ due, a PINGRESP overdue)


class LinkError(Exception):
    """A connection that failed or ended. `rc`: a refused CONNACK's return (3.1.1) or reason (v5) code."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


@dataclass(frozen=True)
class LinkOptions:
    """What one connection is opened with."""

    host: str
    port: int
    client_id: str
    v5: bool = True
    username: str | None = None
    password: str | None = None
    will: tuple[str, bytes] | None = None  # (topic, payload), sent retained at QoS 1
    clean_session: bool | None = None  # 3.1.1 only
    clean_start: paho.CleanStartOption = paho.MQTT_CLEAN_START_FIRST_ONLY  # v5 only
    properties: Properties | None = None  # the v5 CONNECT's
    keepalive_s: int = 30
    timeout_s: float = 10.0  # for a CONNACK, SUBACK, UNSUBACK or the DISCONNECT to go out
    tls: ssl.SSLContext | None = None


def _code(reason: ReasonCode | int) -> int:
    return int(reason.value) if isinstance(reason, ReasonCode) else int(reason)


class MqttLink:
    """One connection: `await open()`, then `publish`, `subscribe`, `unsubscribe`; `ended` completes
    with the reason when the connection ends (whoever ended it); `await close()` sends a DISCONNECT.
    Not reusable: a reconnect is a new link. All methods run on the loop's thread."""

    def __init__(self, options: LinkOptions, on_message: Callable[[str, bytes, bool], None]) -> None:
        self.options = options
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = self._loop.create_future()
        self.ended: asyncio.Future[str] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._fd: int | None = None  # the socket's descriptor while the loop watches it
        self._writing = False
        self._misc: asyncio.Task[None] | None = None
        self._client = self._paho_client()

    def _paho_client(self) -> paho.Client:
        o = self.options
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            o.client_id,
            clean_session=None if o.v5 else o.clean_session,
            protocol=paho.MQTTv5 if o.v5 else paho.MQTTv311,
            reconnect_on_failure=False,
        )
        if log.isEnabledFor(logging.DEBUG):  # paho checks its logger on every packet otherwise
            client.enable_logger(log)
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.will is not None:
            client.will_set(o.will[0], o.will[1], qos=1, retain=True)
        if o.tls is not None:
            client.tls_set_context(o.tls)
        client.on_connect = self._connack
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_publish = self._puback
        client.on_subscribe = self._suback
        client.on_unsubscribe = self._suback
        client.on_socket_close = self._socket_closing
        return client

    # -- opening and closing ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (the TCP and TLS handshakes in a thread: they block), then wait for the CONNACK."""
        o = self.options
        connecting = asyncio.ensure_future(asyncio.to_thread(
            self._client.connect, o.host, o.port, o.keepalive_s,
            clean_start=o.clean_start, properties=o.properties,
        ))  # fmt: skip
        try:
            await asyncio.shield(connecting)
        except (OSError, ValueError) as exc:
            raise LinkError(str(exc) or type(exc).__name__) from None
        except asyncio.CancelledError:  # the thread goes on: close what it opens once it is done
            connecting.add_done_callback(self._closed_after_handshake)
            raise
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            raise LinkError("the connection closed while opening")
        with contextlib.suppress(OSError):  # no Nagle: a request/response would wait for delayed ACKs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)
        self._flush()  # a CONNECT the socket's buffer did not take at once
        self._misc = self._loop.create_task(self._keep_alive(), name=f"mqtt-keepalive-{o.client_id}")
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), o.timeout_s)
        except TimeoutError:
            self._abort("no CONNACK")
            raise LinkError(f"no CONNACK within {o.timeout_s:g} s") from None
        except BaseException as exc:  # refused, or cancelled while waiting: leave nothing behind
            self._abort("refused" if isinstance(exc, LinkError) else "cancelled while connecting")
            raise

    def _closed_after_handshake(self, connecting: asyncio.Future[Any]) -> None:
        if not connecting.cancelled() and connecting.exception() is None:
            self._client._sock_close()
        self._end("cancelled while connecting")

    async def close(self) -> None:
        """A clean DISCONNECT (so the broker does not publish the last will), then the socket closed."""
        if self.ended.done():
            return
        if self._client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.ended), self.options.timeout_s)
        self._abort("closed")

    def _abort(self, reason: str) -> None:
        """Close the socket now, without a DISCONNECT."""
        self._client._sock_close()  # paho has no public way to drop a link it still calls connected
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self._misc is not None and asyncio.current_task() is not self._misc:
            self._misc.cancel()
        if not self.ended.done():
            self.ended.set_result(reason)
        if not self._connected.done():
            self._connected.set_exception(LinkError(f"the connection ended: {reason}"))
            self._connected.exception()  # retrieved: `open` reports it, or nobody waits
        self._acks.clear()  # a publish in flight is the transport's to resend
        for waiter in self._subacks.values():
            waiter.cancel()
        self._subacks.clear()

    def is_connected(self) -> bool:
        return self._connected.done() and not self._connected.exception() and not self.ended.done()

    def socket(self) -> Any:
        return self._client.socket()

    # -- requests ---------------------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Props = None
    ) -> asyncio.Future[None]:
        """Send a message; the future completes with the broker's PUBACK (at QoS 0, once written), or
        holds a `LinkError` if paho refused it (not connected, a bad topic)."""
        acked: asyncio.Future[None] = self._loop.create_future()
        try:
            info = self._client.publish(topic, payload, qos, retain, properties)
        except ValueError as exc:
            acked.set_exception(LinkError(f"publish refused: {exc}"))
            return acked
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            acked.set_exception(LinkError(f"publish refused: {paho.error_string(info.rc)}"))
        elif info.is_published():
            acked.set_result(None)
        else:
            self._acks[info.mid] = acked
        self._flush()
        return acked

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        rc, mid = self._client.subscribe(topic_filter, qos)
        await self._acknowledged(rc, mid, f"subscribe to {topic_filter!r}")

    async def unsubscribe(self, topic_filter: str) -> None:
        rc, mid = self._client.unsubscribe(topic_filter)
        await self._acknowledged(rc, mid, f"unsubscribe from {topic_filter!r}")

    async def _acknowledged(self, rc: MQTTErrorCode, mid: int | None, what: str) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise LinkError(f"{what} refused: {paho.error_string(rc)}")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._subacks[mid] = waiter
        self._flush()
        try:
            await asyncio.wait_for(waiter, self.options.timeout_s)
        except TimeoutError:
            raise LinkError(f"{what}: no acknowledgement within {self.options.timeout_s:g} s") from None
        except asyncio.CancelledError:
            if self.ended.done():  # cancelled by `_end`, not by the caller
                raise LinkError(f"{what}: the connection ended") from None
            raise
        finally:
            self._subacks.pop(mid, None)

    # -- the socket -------------------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            while True:
                if self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return  # paho closed the socket and said why in `_disconnected`
                sock = self._client.socket()
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                    break  # TLS may hold decrypted bytes the descriptor no longer signals
            self._flush()  # the acknowledgements paho queued while it read
        except Exception as exc:  # a broken link (a TLS alert, a reset): end it, keep the loop going
            self._abort(f"{type(exc).__name__}: {exc}")

    def _flush(self) -> None:
        """Write what paho queued; watch for a writable socket only while some of it is left."""
        client = self._client
        if client.want_write():
            client.loop_write()
        waiting = client.want_write() and self._fd is not None
        if waiting and not self._writing:
            self._loop.add_writer(self._fd, self._writable)  # type: ignore[arg-type]
        elif not waiting and self._writing and self._fd is not None:
            self._loop.remove_writer(self._fd)
        self._writing = waiting

    def _writable(self) -> None:
        try:
            self._flush()
        except Exception as exc:
            self._abort(f"{type(exc).__name__}: {exc}")

    async def _keep_alive(self) -> None:
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._flush()  # a PINGREQ
            await asyncio.sleep(MISC_PERIOD_S)

    # -- paho's callbacks (all on the loop's thread once open; `_socket_closing` also while connecting) --

    def _socket_closing(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:  # only set on the loop's thread, after the connect
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
            self._writing = False

    def _connack(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Props
    ) -> None:
        if self._connected.done():
            return
        code = _code(reason)
        if code == 0:
            self._connected.set_result(None)
        else:
            self._connected.set_exception(LinkError(f"connection refused: {reason}", rc=code))

    def _disconnected(
        self, client: paho.Client, data: Any, flags: Any, reason: ReasonCode, props: Props
    ) -> None:
        self._end(str(reason))

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._on_message(message.topic, bytes(message.payload), bool(message.retain))

    def _puback(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        acked = self._acks.pop(mid, None)
        if acked is not None and not acked.done():
            acked.set_result(None)

    def _suback(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        refused = [r for r in reasons if _code(r) >= 0x80] if isinstance(reasons, list) else []
        if refused:
            log.warning("%s: the broker refused a (un)subscription: %s", self.options.client_id, refused)
        waiter = self._subacks.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
