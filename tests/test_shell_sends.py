"""The shell's sends: consecutive waiting `Send`s are all in flight before the first acknowledgement
(a coordinator's N grants cost one broker round trip), they leave in order, and any other command
between them still waits for what came before it."""

from __future__ import annotations

import asyncio
from typing import Any

from p2pdoe.core.effects import Send, Subscribe
from p2pdoe.services.clock import WallClock
from p2pdoe.services.shell import Shell


class AckingTransport:
    """Records every call in order; a publish returns only when the test acknowledges it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.acks: dict[str, asyncio.Future[None]] = {}

    async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        self.calls.append(f"publish {topic}")
        self.acks[topic] = asyncio.get_running_loop().create_future()
        await self.acks[topic]

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        await self.publish(topic, payload)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.calls.append(f"subscribe {topic_filter}")

    def ack(self, *topics: str) -> None:
        for t in topics:
            self.acks[t].set_result(None)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _shell(t: AckingTransport) -> Shell:
    return Shell(t, WallClock(), offload=False)  # type: ignore[arg-type]


def test_consecutive_sends_are_in_flight_together_and_leave_in_order() -> None:
    async def main() -> None:
        t = AckingTransport()
        done = asyncio.ensure_future(_shell(t).execute([Send(f"g/{i}", b"x") for i in range(5)]))
        await _settle()
        assert t.calls == [f"publish g/{i}" for i in range(5)]  # all sent, none acknowledged yet
        assert not done.done()
        t.ack("g/0", "g/1", "g/2", "g/3")
        await _settle()
        assert not done.done()  # waits for every acknowledgement
        t.ack("g/4")
        await asyncio.wait_for(done, 1.0)

    asyncio.run(main())


def test_a_command_between_sends_waits_for_the_sends_before_it() -> None:
    async def main() -> None:
        t = AckingTransport()
        commands = [Send("a", b"x"), Send("b", b"x"), Subscribe("c/#"), Send("d", b"x")]
        done = asyncio.ensure_future(_shell(t).execute(commands))
        await _settle()
        assert t.calls == ["publish a", "publish b"]
        t.ack("a", "b")
        await _settle()
        assert t.calls == ["publish a", "publish b", "subscribe c/#", "publish d"]
        t.ack("d")
        await asyncio.wait_for(done, 1.0)

    asyncio.run(main())


def test_a_background_send_does_not_join_the_batch() -> None:
    async def main() -> None:
        t = AckingTransport()
        shell = _shell(t)
        done = asyncio.ensure_future(
            shell.execute([Send("a", b"x"), Send("s", b"x", wait=False), Send("b", b"x")])
        )
        await _settle()
        assert t.calls[0] == "publish a"
        assert "publish b" not in t.calls  # b waits for a
        t.ack("a")
        await _settle()
        assert "publish b" in t.calls
        t.ack("b", "s")
        await asyncio.wait_for(done, 1.0)

    asyncio.run(main())
