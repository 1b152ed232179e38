"""The MQTT transport against real brokers: Mosquitto (v5) and the embedded amqtt (3.1.1 fallback).

Every broker test runs over both brokers (`broker` is parametrized); each is bounded by `asyncio.wait_for`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import sys
import textwrap
from asyncio.subprocess import PIPE
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from p2pdoe.services.broker import (
    REQUIRE_MOSQUITTO_ENV,
    Broker,
    BrokerUnavailableError,
    broker_for_tests,
    find_mosquitto,
    free_port,
    mosquitto_config,
)
from p2pdoe.services.mqtt_link import LinkError
from p2pdoe.services.transport import (
    Backoff,
    InboundMessage,
    LastWill,
    MqttTransport,
    Transport,
    TransportError,
    parse_broker_url,
)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
FAST = Backoff(initial_s=0.05, cap_s=0.3, max_attempts=100)
STEP_S = 5.0  # the bound on any single wait


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def transport(broker: Broker, client_id: str, **kwargs: Any) -> MqttTransport:
    kwargs.setdefault("backoff", FAST)
    return MqttTransport(broker.url, client_id, **kwargs)


async def next_message(t: MqttTransport, timeout_s: float = STEP_S) -> InboundMessage:
    return await asyncio.wait_for(anext(t.messages()), timeout_s)


async def nothing_within(t: MqttTransport, seconds: float) -> bool:
    try:
        await asyncio.wait_for(anext(t.messages()), seconds)
    except TimeoutError:
        return True
    return False


async def until(predicate: Callable[[], bool], timeout_s: float = STEP_S) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.fixture(
    params=[pytest.param("mosquitto", marks=pytest.mark.mosquitto), pytest.param("embedded")],
)
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each broker test once over Mosquitto and once over the embedded broker."""
    fixture = "mosquitto_broker" if request.param == "mosquitto" else "embedded_broker"
    b: Broker = request.getfixturevalue(fixture)
    return b


# -- pure units -----------------------------------------------------------------------------------------


def test_backoff_schedule_is_capped_jittered_and_deterministic() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=8.0, factor=2.0, jitter=0.5)
    ceilings = [backoff.ceiling(k) for k in range(8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    delays = backoff.schedule(200, random.Random(7))
    for k, d in enumerate(delays):
        ceiling = backoff.ceiling(k)
        assert 0.5 * ceiling <= d <= ceiling <= backoff.cap_s
    assert delays == backoff.schedule(200, random.Random(7))
    assert delays != backoff.schedule(200, random.Random(8))
    assert len({round(d, 9) for d in delays[10:]}) > 100  # jittered, not a constant cap
    assert Backoff(jitter=0.0).schedule(3, random.Random(1)) == [0.5, 1.0, 2.0]
    assert backoff.ceiling(10**9) == 8.0  # no overflow on a very long outage


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": 2.0, "cap_s": 1.0},
        {"factor": 0.5},
        {"jitter": 1.5},
        {"max_attempts": 0},
    ],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)


def test_broker_url_parsing() -> None:
    a = parse_broker_url("mqtt://user:p%40ss@broker.local:1884")
    assert (a.host, a.port, a.username, a.password) == ("broker.local", 1884, "user", "p@ss")
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
    for bad in ("tcp://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/x"):
        with pytest.raises(TransportError):
            parse_broker_url(bad)


def test_mqtt_transport_satisfies_the_protocol() -> None:
    assert isinstance(MqttTransport("mqtt://127.0.0.1:1", "x"), Transport)


def test_mosquitto_config_turns_nagle_off_and_persistence_off() -> None:
    conf = mosquitto_config(1884, extra_config="max_packet_size 65536")
    assert "listener 1884 127.0.0.1\n" in conf
    assert "set_tcp_nodelay true\n" in conf
    assert "persistence false\n" in conf
    assert conf.endswith("max_packet_size 65536\n")


def test_missing_mosquitto_is_an_error_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("p2pdoe.services.broker.find_mosquitto", lambda: None)
    monkeypatch.setenv(REQUIRE_MOSQUITTO_ENV, "1")
    with pytest.raises(BrokerUnavailableError, match=REQUIRE_MOSQUITTO_ENV):
        broker_for_tests()


def test_unreachable_broker_gives_up_after_max_attempts() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"

    async def main() -> None:
        t = MqttTransport(url, "lonely", backoff=Backoff(initial_s=0.01, cap_s=0.02, max_attempts=3))
        with pytest.raises(TransportError, match="cannot connect"):
            await t.start()

    run(main(), 10)


def test_cancelled_start_leaves_nothing_running() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"

    async def main() -> None:
        t = MqttTransport(url, "impatient", backoff=Backoff(initial_s=0.05, cap_s=0.1))  # retries forever
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(t.start(), 0.3)
        assert not t.connected
        assert not [task for task in asyncio.all_tasks() if task.get_name() == "mqtt-impatient"]

    run(main(), 10)


class _DropsItsFirstConnection(MqttTransport):
    """Its first connection ends the moment it is ready, before `start` can look: what a broker
    that closes a fresh connection (amqtt 0.12.1 did, on a race of its own) does."""

    async def _receive(self, client: Any) -> None:
        if self.connections == 1:
            raise LinkError("dropped at once")
        await super()._receive(client)


def test_a_connection_that_drops_at_once_is_still_a_start(mqtt_broker: Broker) -> None:
    """`start` returns once a connection was ready, even if it dropped since: the transport reconnects
    by itself. (It used to report "cannot connect" and stop the service.)"""

    async def main() -> None:
        t = _DropsItsFirstConnection(mqtt_broker.url, "flaky", backoff=FAST)
        try:
            await t.start()
            await t.publish("p2pdoe/test/flaky", b"sent on the second connection")
            assert t.connections == 2
        finally:
            await t.close()

    run(main())


def test_the_embedded_broker_survives_subscriptions_while_a_client_connects(embedded_broker: Broker) -> None:
    """amqtt 0.12.1 sends a new client retained messages in a loop over every subscription filter,
    awaiting inside; a filter added meanwhile ended the loop with "dictionary changed size during
    iteration" and closed the new client's connection. Many filters, retained messages and clients
    connecting while another subscribes make that race likely; none of them may lose a connection."""

    async def main() -> None:
        async with transport(embedded_broker, "loader") as loader:
            for i in range(60):
                await loader.publish(f"p2pdoe/test/r/{i}", b"kept", retain=True)
                await loader.subscribe(f"p2pdoe/test/r/{i}")

            async def subscribe_more() -> None:
                await asyncio.gather(*(loader.subscribe(f"p2pdoe/test/n/{i}") for i in range(300)))

            clients = [transport(embedded_broker, f"late-{i}") for i in range(6)]
            try:
                await asyncio.gather(subscribe_more(), *(c.start() for c in clients))
                await asyncio.gather(*(c.subscribe("p2pdoe/test/late") for c in clients))
                await asyncio.sleep(0.5)
                assert [c.connections for c in clients] == [1] * 6
            finally:
                await asyncio.gather(*(c.close() for c in clients))

    run(main(), 40)


# -- over a broker ----------------------------------------------------------------------------------------


def test_publish_subscribe_round_trip_qos1(broker: Broker) -> None:
    async def main() -> None:
        async with transport(broker, "sub") as sub, transport(broker, "pub") as pub:
            assert sub.protocol == ("v5" if broker.supports_v5 else "v311")
            await sub.subscribe("p2pdoe/test/+/x", qos=1)
            for i in range(20):
                await pub.publish(f"p2pdoe/test/{i}/x", f"m{i}".encode(), qos=1)
            got = [await next_message(sub) for _ in range(20)]
            assert [m.payload for m in got] == [f"m{i}".encode() for i in range(20)]
            assert [m.topic for m in got] == [f"p2pdoe/test/{i}/x" for i in range(20)]
            assert not any(m.retained for m in got)

    run(main())


def test_a_hundred_publishes_in_flight_together_log_no_warning(
    mqtt_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """What a coordinator does with its grants at 100 sites: every publish in flight at once, all
    delivered, and aiomqtt's warning per pending call beyond 10 not written once per grant."""

    async def main() -> None:
        async with transport(mqtt_broker, "sub") as sub, transport(mqtt_broker, "pub") as pub:
            await sub.subscribe("p2pdoe/test/+/g", qos=1)
            await asyncio.gather(*(pub.publish(f"p2pdoe/test/{i}/g", b"x", qos=1) for i in range(100)))
            got = {(await next_message(sub)).topic for _ in range(100)}
            assert got == {f"p2pdoe/test/{i}/g" for i in range(100)}

    with caplog.at_level(logging.WARNING):
        run(main())
    assert not [r for r in caplog.records if "pending" in r.getMessage()]


def test_retained_message_reaches_a_late_subscriber(broker: Broker) -> None:
    async def main() -> None:
        async with transport(broker, "pub") as pub:
            await pub.publish("p2pdoe/test/doe", b"envelope", retain=True)
            await pub.publish("p2pdoe/test/live", b"gone")  # not retained: a late subscriber misses it
        async with transport(broker, "late") as late:
            await late.subscribe("p2pdoe/test/#")
            m = await next_message(late)
            assert (m.topic, m.payload, m.retained) == ("p2pdoe/test/doe", b"envelope", True)
            assert await nothing_within(late, 0.3)

    run(main())


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from p2pdoe.services.transport import LastWill, MqttTransport

    async def main() -> None:
        will = LastWill("p2pdoe/test/site/a/status", b"offline")
        async with MqttTransport(sys.argv[1], "site-a", will=will) as t:
            await t.publish("p2pdoe/test/site/a/status", b"online", retain=True)
            print("ready", flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_last_will_is_published_retained_when_a_client_dies(broker: Broker) -> None:
    async def main() -> None:
        async with transport(broker, "watcher") as watcher:
            await watcher.subscribe("p2pdoe/test/site/+/status")
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, broker.url, stdout=PIPE, stderr=PIPE
            )
            try:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), 15)
                assert line.strip() == b"ready"
                m = await next_message(watcher)
                assert m.payload == b"online"
                child.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
                m = await next_message(watcher)
                assert (m.topic, m.payload) == ("p2pdoe/test/site/a/status", b"offline")
            finally:
                if child.returncode is None:
                    child.kill()
                await asyncio.wait_for(child.wait(), 5)
        async with transport(broker, "late") as late:
            await late.subscribe("p2pdoe/test/site/+/status")
            m = await next_message(late)
            assert (m.payload, m.retained) == (b"offline", True)

    run(main(), 30)


def test_clean_close_does_not_publish_the_will(broker: Broker) -> None:
    async def main() -> None:
        async with transport(broker, "watcher") as watcher:
            await watcher.subscribe("p2pdoe/test/status")
            async with transport(broker, "site", will=LastWill("p2pdoe/test/status", b"offline")) as site:
                await site.publish("p2pdoe/test/status", b"online", retain=True)
            assert (await next_message(watcher)).payload == b"online"
            assert await nothing_within(watcher, 0.5)

    run(main())


def test_reconnects_and_resubscribes_after_a_broker_restart(broker: Broker) -> None:
    async def main() -> None:
        async with transport(broker, "sub") as sub, transport(broker, "pub") as pub:
            await sub.subscribe("p2pdoe/test/r")
            await pub.publish("p2pdoe/test/r", b"before")
            assert (await next_message(sub)).payload == b"before"

            await asyncio.to_thread(broker.restart)  # same port, empty broker: no sessions survive
            # Published while the link may still be down: held until the publisher reconnects.
            await pub.publish("p2pdoe/test/r", b"after-1")
            await until(lambda: sub.connections == 2 and sub.connected)
            await until(lambda: pub.connections == 2)
            # The subscriber may have renewed its subscription after "after-1" went out; what follows must
            # arrive.
            await pub.publish("p2pdoe/test/r", b"after-2")
            payloads = set()
            while b"after-2" not in payloads:
                payloads.add((await next_message(sub)).payload)

    run(main(), 30)


def test_state_is_published_again_after_a_broker_lost_it(broker: Broker) -> None:
    """`publish_state`: a broker restarted without persistence gets the retained state back."""

    async def retained(topic: str) -> bytes:
        async with transport(broker, "late") as late:
            await late.subscribe(topic)
            return (await next_message(late)).payload

    async def main() -> None:
        async with transport(broker, "owner") as owner:
            await owner.publish_state("p2pdoe/test/state", b"v1")
            await owner.publish_state("p2pdoe/test/state", b"v2")  # the latest per topic
            await owner.publish("p2pdoe/test/plain", b"x", retain=True)  # not state: lost with the broker
            assert await retained("p2pdoe/test/state") == b"v2"
            await asyncio.to_thread(broker.restart)
            await until(lambda: owner.connections == 2 and owner.connected)
            assert await retained("p2pdoe/test/state") == b"v2"
            if broker.kind == "mosquitto":  # (the embedded broker keeps retained messages on disk)
                async with transport(broker, "late2") as late:
                    await late.subscribe("p2pdoe/test/plain")
                    assert await nothing_within(late, 0.5)  # the restart did lose what was not state

    run(main(), 30)


@pytest.mark.mosquitto
def test_v5_message_expiry_hides_a_stale_retained_message(mosquitto_broker: Broker) -> None:
    async def main() -> None:
        async with transport(mosquitto_broker, "pub") as pub:
            assert pub.is_v5
            await pub.publish("p2pdoe/test/e/stale", b"expires", retain=True, expiry_s=1)
            await pub.publish("p2pdoe/test/e/fresh", b"stays", retain=True)
        await asyncio.sleep(2.0)
        async with transport(mosquitto_broker, "late") as late:
            await late.subscribe("p2pdoe/test/e/#")
            m = await next_message(late)
            assert (m.topic, m.payload, m.retained) == ("p2pdoe/test/e/fresh", b"stays", True)
            assert await nothing_within(late, 0.3)

    run(main())


def test_embedded_broker_falls_back_to_3_1_1_and_ignores_expiry(embedded_broker: Broker) -> None:
    async def main() -> None:
        async with transport(embedded_broker, "pub") as pub:
            assert pub.protocol == "v311"
            await pub.publish("p2pdoe/test/doe", b"kept", retain=True, expiry_s=1)
        async with transport(embedded_broker, "late") as late:
            assert late.protocol == "v311"
            await late.subscribe("p2pdoe/test/doe")
            m = await next_message(late)
            assert (m.payload, m.retained) == (b"kept", True)

    run(main())


def test_forced_v5_on_the_embedded_broker_is_refused(embedded_broker: Broker) -> None:
    async def main() -> None:
        t = transport(embedded_broker, "v5-only", protocol="v5", backoff=Backoff(0.01, 0.02, max_attempts=1))
        with pytest.raises(TransportError, match="cannot connect"):
            await t.start()

    run(main())


def test_mqtt_broker_fixture_prefers_mosquitto(mqtt_broker: Broker) -> None:
    assert mqtt_broker.kind == ("mosquitto" if find_mosquitto() else "embedded")
    assert mqtt_broker.running


def test_the_client_socket_sends_small_packets_at_once(mqtt_broker: Broker) -> None:
    """paho leaves Nagle's algorithm on; with delayed ACKs a ping-pong took 87 ms instead of 0.6 ms."""

    async def scenario() -> int:
        async with MqttTransport(mqtt_broker.url, "nodelay") as t:
            sock = t._client.socket()  # type: ignore[union-attr]
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    assert asyncio.run(scenario()) != 0


def test_services_reconnect_within_30_simulated_seconds_on_a_fast_clock() -> None:
    from p2pdoe.services.runner import reconnect_backoff

    assert reconnect_backoff(1.0).cap_s == 30.0  # wall time: the usual cap
    assert reconnect_backoff(10.0).cap_s == 3.0  # 30 simulated seconds
    assert reconnect_backoff(640.0).cap_s == 1.0  # never more often than once a wall second
    assert reconnect_backoff(640.0).initial_s == 0.5
