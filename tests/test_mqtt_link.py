"""The link under the MQTT transport (p2pdoe.services.mqtt_link): paho driven from the asyncio loop,
over a real broker (Mosquitto where it is on PATH)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from p2pdoe.services.broker import Broker
from p2pdoe.services.mqtt_link import LinkError, LinkOptions, MqttLink
from p2pdoe.services.transport import MqttTransport

BIG = 8 * 1024 * 1024  # well beyond a loopback socket's send buffer: the writer callback must finish it


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _options(broker: Broker, client_id: str, **kwargs: Any) -> LinkOptions:
    host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
    return LinkOptions(host, int(port), client_id, **kwargs)


def test_a_message_larger_than_the_socket_buffer_goes_out_whole(mqtt_broker: Broker) -> None:
    payload = bytes(range(256)) * (BIG // 256)

    async def scenario() -> bytes:
        async with MqttTransport(mqtt_broker.url, "big") as t:
            await t.subscribe("link/big")
            await t.publish("link/big", payload)
            async for message in t.messages():
                return message.payload
        raise AssertionError("the transport closed")

    assert _run(scenario()) == payload


def test_publishing_and_receiving_start_no_task(mqtt_broker: Broker) -> None:
    """A message out and one in cost no asyncio task (aiomqtt started one for each)."""

    async def scenario() -> int:
        async with MqttTransport(mqtt_broker.url, "tasks") as t:
            await t.subscribe("link/echo")
            loop = asyncio.get_running_loop()
            started = 0

            def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
                nonlocal started
                started += 1
                return asyncio.Task(coro, loop=loop, **kwargs)

            loop.set_task_factory(counting)
            received = t.messages()
            for n in range(50):
                await t.publish("link/echo", str(n).encode())
                assert (await anext(received)).payload == str(n).encode()
            loop.set_task_factory(None)
            return started

    assert _run(scenario()) == 0


def test_a_link_ends_with_the_reason_when_the_broker_goes(mqtt_broker: Broker) -> None:
    async def scenario() -> tuple[str, bool]:
        link = MqttLink(_options(mqtt_broker, "ending"), lambda *_: None)
        await link.open()
        assert link.is_connected()
        # a second client with the same id takes the session over: the broker drops the first
        thief = MqttLink(_options(mqtt_broker, "ending"), lambda *_: None)
        await thief.open()
        reason = await asyncio.wait_for(link.ended, 10)
        connected = link.is_connected()
        await thief.close()
        return reason, connected

    reason, connected = _run(scenario())
    assert reason
    assert not connected


def test_a_closed_link_refuses_to_publish_with_a_link_error(mqtt_broker: Broker) -> None:
    async def scenario() -> BaseException | None:
        link = MqttLink(_options(mqtt_broker, "closed"), lambda *_: None)
        await link.open()
        await link.close()
        sent = link.publish("link/closed", b"x")
        await asyncio.wait({sent}, timeout=5)
        return sent.exception()

    assert isinstance(_run(scenario()), LinkError)


def test_an_unreachable_broker_is_a_link_error() -> None:
    from p2pdoe.services.broker import free_port

    async def scenario() -> LinkError | None:
        link = MqttLink(LinkOptions("127.0.0.1", free_port(), "nobody"), lambda *_: None)
        try:
            await link.open()
        except LinkError as exc:
            return exc
        return None

    error = _run(scenario())
    assert error is not None
    assert error.rc is None


def test_a_link_cancelled_while_opening_leaves_nothing_behind() -> None:
    """Cancelled while it waits for a CONNACK that never comes (a TCP server that says nothing): no
    keep-alive task, no socket watched by the loop, the socket closed, `ended` with the reason."""

    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        async with server:
            link = MqttLink(LinkOptions("127.0.0.1", port, "mute"), lambda *_: None)
            opening = asyncio.ensure_future(link.open())
            while link._fd is None:  # the handshake is done; the CONNACK is awaited
                await asyncio.sleep(0.01)
            fd = link._fd
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            await asyncio.sleep(0)
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("mqtt-keepalive")]
            assert link.socket() is None
            assert link._fd is None
            assert not loop.remove_reader(fd)  # nothing was left registered
            assert link.ended.result() == "cancelled while connecting"

    _run(scenario())
