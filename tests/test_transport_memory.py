"""The in-memory transport: MQTT semantics (wildcards, retained, wills, expiry, order) and its faults.

Each test runs its coroutine with `asyncio.run` (bounded by `asyncio.wait_for`); the expiry tests run on
`VirtualLoop`, whose clock jumps to the next timer (seconds pass at once): the broker reads only it.
"""

from __future__ import annotations

import asyncio
import inspect
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

import p2pdoe.services.transport_memory as transport_memory
from p2pdoe.services.transport import InboundMessage, LastWill, Transport, TransportError
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport, topic_matches

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")
Seen = tuple[str, bytes, bool]


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 5.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class _VirtualSelector(selectors.DefaultSelector):
    """Never sleeps: when nothing is ready, the virtual clock jumps to the next timer instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now_s = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready and timeout:
            self.now_s += timeout
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time, as a day's simulation would run on."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now_s


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualLoop) as runner:
        return runner.run(asyncio.wait_for(coro, 60.0))


async def received(t: MemoryTransport, quiet_s: float = 0.01) -> list[Seen]:
    """Everything `t` has received so far (deliveries are immediate: a short quiet time ends it)."""
    out: list[Seen] = []
    while True:
        try:
            m: InboundMessage = await asyncio.wait_for(anext(t.messages()), quiet_s)
        except (TimeoutError, StopAsyncIteration):
            return out
        out.append((m.topic, m.payload, m.retained))


# -- pure ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),  # `+` does not cross levels
        ("a/+", "a", False),
        ("a/+/c", "a/b/c", True),
        ("+/+", "a/b", True),
        ("a/#", "a", True),  # `#` matches the parent level
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b/c", True),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+/#", "a", True),
        ("#", "$SYS/x", False),  # wildcards do not reach `$` topics
        ("$SYS/#", "$SYS/x", True),
    ],
)
def test_topic_filter_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_memory_transport_satisfies_the_protocol() -> None:
    transport: Transport = MemoryTransport(MemoryBroker(), "x")
    assert isinstance(transport, Transport)
    assert isinstance(transport, MemoryTransport)
    assert (transport.protocol, transport.is_v5, transport.connections, transport.connected) == (
        "memory",
        True,
        0,
        False,
    )


def test_no_wall_clock_and_no_threads() -> None:
    source = inspect.getsource(transport_memory)
    for banned in ("import time", "time.", "datetime", "threading", "to_thread"):
        assert banned not in source.replace("loop().time()", "")


# -- routing -----------------------------------------------------------------------------------------------


def test_bad_filters_topics_qos_and_publishing_before_start_are_refused() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        idle = MemoryTransport(broker, "idle")
        with pytest.raises(TransportError, match="not running"):
            await idle.publish("a", b"x")
        async with MemoryTransport(broker, "t") as t:
            for bad_filter in ("a/#/b", "a/b#", "a+/b"):
                with pytest.raises(ValueError, match="filter"):
                    await t.subscribe(bad_filter)
            for bad_topic in ("a/+", "a/#", ""):
                with pytest.raises(ValueError, match="topic"):
                    await t.publish(bad_topic, b"x")
            with pytest.raises(ValueError, match="QoS"):
                await t.publish("a", b"x", qos=2)

    run(main())


def test_routing_by_filter_and_once_per_client() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with (
            MemoryTransport(broker, "both") as both,
            MemoryTransport(broker, "other") as other,
            MemoryTransport(broker, "pub") as pub,
        ):
            await both.subscribe("a/+")
            await both.subscribe("a/#")  # overlaps "a/+": a message matching both arrives once
            await both.subscribe("a/#", qos=0)  # once per filter: this replaces the first
            await other.subscribe("b/+")
            for topic in ("a/x", "a", "a/x/y", "b/x", "b/x/y", "c"):
                await pub.publish(topic, topic.encode())
            assert await received(both) == [
                ("a/x", b"a/x", False),
                ("a", b"a", False),
                ("a/x/y", b"a/x/y", False),
            ]
            assert await received(other) == [("b/x", b"b/x", False)]
            assert await received(pub) == []

    run(main())


def test_retained_on_subscribe_live_otherwise_and_empty_payload_deletes() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub, MemoryTransport(broker, "sub") as sub:
            await pub.publish("r/one", b"1", retain=True)
            await pub.publish("r/two", b"2", retain=True)
            await pub.publish("r/one", b"1b", retain=True)  # replaces, and is now the latest
            await pub.publish("r/plain", b"p")  # not retained: missed by a late subscriber
            assert broker.retained("r/one") == b"1b"
            await sub.subscribe("r/#")
            assert await received(sub) == [("r/two", b"2", True), ("r/one", b"1b", True)]
            await pub.publish("r/two", b"2b", retain=True)  # live: retained=False despite retain
            await pub.publish("r/two", b"", retain=True)  # deletes, and still reaches live subscribers
            assert await received(sub) == [("r/two", b"2b", False), ("r/two", b"", False)]
            assert broker.retained("r/two") is None
            await sub.subscribe("r/#")  # subscribing again sends the retained messages again
            assert await received(sub) == [("r/one", b"1b", True)]

    run(main())


def test_each_subscriber_sees_the_brokers_order_across_publishers() -> None:
    async def main() -> None:
        order: list[bytes] = []
        broker = MemoryBroker(on_publish=lambda topic, payload, retain: order.append(payload))
        subs = [MemoryTransport(broker, f"sub{i}") for i in range(2)]
        pubs = [MemoryTransport(broker, f"pub{i}") for i in range(3)]
        for t in subs + pubs:
            await t.start()
        for s in subs:
            await s.subscribe("fifo/#")

        async def publish(t: MemoryTransport) -> None:
            for k in range(20):
                await t.publish(f"fifo/{t.client_id}", f"{t.client_id}-{k}".encode())

        await asyncio.gather(*(publish(p) for p in pubs))
        assert len(order) == 60
        assert {order[0][:4], order[1][:4], order[2][:4]} == {b"pub0", b"pub1", b"pub2"}  # interleaved
        for s in subs:
            assert [payload for _, payload, _ in await received(s)] == order

    run(main())


def test_unsubscribe_stops_delivery_also_after_a_reconnect() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub, MemoryTransport(broker, "sub") as sub:
            await pub.publish("u/state", b"s", retain=True)
            await sub.subscribe("u/#")
            await pub.publish("u/x", b"1")
            assert await received(sub) == [("u/state", b"s", True), ("u/x", b"1", False)]
            await sub.unsubscribe("u/#")
            await sub.unsubscribe("never/subscribed")  # harmless
            await pub.publish("u/x", b"2")
            broker.outage()
            broker.restore()
            assert sub.connections == 2
            await pub.publish("u/x", b"3")
            assert await received(sub) == []

    run(main())


# -- lifecycle, wills and takeover --------------------------------------------------------------------------


def test_messages_end_on_close() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub:
            sub = MemoryTransport(broker, "sub")
            await sub.start()
            await sub.subscribe("m")

            async def collect() -> list[bytes]:
                return [m.payload async for m in sub.messages()]

            reader = asyncio.create_task(collect())
            await pub.publish("m", b"1")
            await pub.publish("m", b"2")
            await asyncio.sleep(0.01)
            assert not reader.done()
            await sub.close()
            assert await asyncio.wait_for(reader, 1.0) == [b"1", b"2"]
            assert not sub.connected
            assert [m async for m in sub.messages()] == []  # every later reader ends too
            with pytest.raises(TransportError):
                await sub.start()

    run(main())


def test_kill_publishes_the_will_and_a_clean_close_does_not() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "watcher") as watcher:
            await watcher.subscribe("site/+/status")
            async with MemoryTransport(broker, "a", will=LastWill("site/a/status", b"offline")) as a:
                await a.publish("site/a/status", b"online", retain=True)
            b = MemoryTransport(broker, "b", will=LastWill("site/b/status", b"offline"))
            await b.start()
            await b.publish("site/b/status", b"online", retain=True)
            broker.kill("b")
            assert not b.connected
            assert [m async for m in b.messages()] == []  # ended
            with pytest.raises(TransportError):
                await b.publish("site/b/status", b"zombie")
            with pytest.raises(TransportError, match="no open client"):
                broker.kill("b")
            assert await received(watcher) == [
                ("site/a/status", b"online", False),
                ("site/b/status", b"online", False),
                ("site/b/status", b"offline", False),
            ]
            assert (broker.retained("site/a/status"), broker.retained("site/b/status")) == (
                b"online",
                b"offline",
            )

    run(main())


def test_a_duplicate_client_id_takes_over() -> None:
    async def main() -> None:
        seen: list[tuple[str, bytes, bool]] = []
        broker = MemoryBroker(on_publish=lambda *published: seen.append(published))
        first = MemoryTransport(broker, "site", will=LastWill("site/status", b"offline"))
        await first.start()
        await first.publish("site/status", b"online", retain=True)
        async with MemoryTransport(broker, "site") as second:
            assert not first.connected
            assert second.connected
            assert [m async for m in first.messages()] == []  # the first is closed for good
            with pytest.raises(TransportError):
                await first.publish("site/x", b"late")
            await first.close()  # closing the old one leaves the new one alone
            assert second.connected
            await second.subscribe("site/#")
            await second.publish("site/status", b"online again", retain=True)
            assert await received(second) == [
                ("site/status", b"offline", True),
                ("site/status", b"online again", False),
            ]
        assert seen == [
            ("site/status", b"online", True),
            ("site/status", b"offline", True),  # the first one's will, as Mosquitto does
            ("site/status", b"online again", True),
        ]

    run(main())


# -- outage and restore -------------------------------------------------------------------------------------


def test_outage_holds_publishes_and_restore_reconnects_resubscribes_and_republishes_state() -> None:
    async def main() -> None:
        recorded: list[bytes] = []
        broker = MemoryBroker(on_publish=lambda topic, payload, retain: recorded.append(payload))
        sub, owner, pub = (MemoryTransport(broker, name) for name in ("sub", "owner", "pub"))
        for t in (sub, owner, pub):
            await t.start()
        await sub.subscribe("o/#")
        await owner.publish_state("o/state", b"v1")
        await owner.publish("o/plain", b"p", retain=True)  # not state: lost with the retained messages
        assert await received(sub) == [("o/state", b"v1", False), ("o/plain", b"p", False)]

        broker.outage()
        assert not any(t.connected for t in (sub, owner, pub))
        held = [
            asyncio.create_task(pub.publish("o/q1", b"q1", qos=1)),
            asyncio.create_task(pub.publish("o/q0", b"q0", qos=0)),
        ]
        await sub.subscribe("late/#")  # made while down: taken to the broker on reconnecting
        assert await received(sub, quiet_s=0.05) == []
        assert not any(task.done() for task in held)
        assert recorded == [b"v1", b"p"]

        broker.restore(keep_retained=False)
        await asyncio.gather(*held)
        assert [t.connections for t in (sub, owner, pub)] == [2, 2, 2]
        # sub reconnected first (nothing retained left), then owner republished its state, then the held.
        assert await received(sub) == [
            ("o/state", b"v1", False),
            ("o/q1", b"q1", False),
            ("o/q0", b"q0", False),
        ]
        assert (broker.retained("o/state"), broker.retained("o/plain")) == (b"v1", None)

        broker.outage()
        broker.restore()  # retained kept: renewed subscriptions get it again, then the state is republished
        assert await received(sub) == [("o/state", b"v1", True), ("o/state", b"v1", False)]
        await pub.publish("late/x", b"l")
        assert await received(sub) == [("late/x", b"l", False)]

    run(main())


def test_a_publish_held_by_an_outage_fails_if_its_client_closes_and_none_is_queued_for_subscribers() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "sub") as sub:
            await sub.subscribe("h/#")
            pub = MemoryTransport(broker, "pub")
            await pub.start()
            broker.outage()
            held = asyncio.create_task(pub.publish("h/x", b"never"))
            cancelled = asyncio.create_task(sub.publish("h/y", b"cancelled"))
            await asyncio.sleep(0.01)
            await pub.close()
            with pytest.raises(TransportError, match="closed before"):
                await held
            cancelled.cancel()
            waiter = MemoryTransport(broker, "waiter")
            starting = asyncio.create_task(waiter.start())  # connecting waits for the broker
            await asyncio.sleep(0.01)
            assert not starting.done()
            broker.restore()
            await starting
            assert waiter.connected
            assert waiter.connections == 1
            assert await received(sub) == []
            await waiter.close()

    run(main())


# -- expiry on the loop's clock -----------------------------------------------------------------------------


def test_expired_retained_messages_are_dropped_on_the_loops_clock() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub:
            await pub.publish("e/stale", b"expires", retain=True, expiry_s=1)
            await pub.publish("e/fresh", b"stays", retain=True)
            await asyncio.sleep(0.5)  # virtual: no wall time passes
            assert broker.retained("e/stale") == b"expires"
            await asyncio.sleep(0.6)
            assert broker.retained("e/stale") is None
            async with MemoryTransport(broker, "late") as late:
                await late.subscribe("e/#")
                assert await received(late) == [("e/fresh", b"stays", True)]

    run_virtual(main())


def test_state_is_republished_with_what_is_left_of_its_expiry() -> None:
    async def main() -> None:
        republished: list[str] = []
        broker = MemoryBroker()
        async with MemoryTransport(broker, "owner") as owner:
            await owner.publish_state("s/long", b"L", expiry_s=3)
            await owner.publish_state("s/short", b"S", expiry_s=2)
            await asyncio.sleep(1.2)
            broker.outage()
            broker.on_publish = lambda topic, payload, retain: republished.append(topic)
            broker.restore(keep_retained=False)
            # s/short had under a second left: not republished; s/long gets int(1.8) = 1 s more.
            assert republished == ["s/long"]
            assert (broker.retained("s/long"), broker.retained("s/short")) == (b"L", None)
            await asyncio.sleep(0.9)
            assert broker.retained("s/long") == b"L"
            await asyncio.sleep(0.2)
            assert broker.retained("s/long") is None

    run_virtual(main())


@pytest.mark.parametrize("expiry_s", [0, 60])
def test_a_session_with_an_expiry_gets_the_qos_1_messages_sent_while_it_was_away(expiry_s: int) -> None:
    """As with Mosquitto (tests/test_transport_faults.py): killed or closed, a client with a session
    expiry finds on its return, before anything else, what matched its QoS 1 subscriptions at QoS 1
    meanwhile, and is subscribed again; with a clean session (0) nothing was kept."""

    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub:
            keeper = MemoryTransport(broker, "keeper", session_expiry_s=expiry_s)
            await keeper.start()
            await keeper.subscribe("s/+/settlement")
            await keeper.subscribe("s/+/meter", qos=0)
            broker.kill("keeper")
            await pub.publish("s/a/settlement", b"1")
            await pub.publish("s/a/settlement", b"qos 0", qos=0)
            await pub.publish("s/a/meter", b"at qos 0 subscription")
            await pub.publish("s/b/settlement", b"2", retain=True)
            async with MemoryTransport(broker, "keeper", session_expiry_s=expiry_s) as back:
                await pub.publish("s/c/settlement", b"3")
                got = await received(back)
            kept = [("s/a/settlement", b"1", False), ("s/b/settlement", b"2", False)]
            renewed = [("s/b/settlement", b"2", True)]  # its subscriptions renewed, as MqttTransport's
            assert got == ([*kept, *renewed, ("s/c/settlement", b"3", False)] if expiry_s else [])

    run(main())


def test_a_session_expires_on_the_loops_clock() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub") as pub:
            async with MemoryTransport(broker, "keeper", session_expiry_s=10) as keeper:
                await keeper.subscribe("s/#")
            await pub.publish("s/early", b"kept")
            await asyncio.sleep(11)
            await pub.publish("s/late", b"no session to keep it")
            async with MemoryTransport(broker, "keeper", session_expiry_s=10) as back:
                assert await received(back) == []

    run_virtual(main())
