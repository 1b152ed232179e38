"""Telemetry and settlements on their way to the broker, never blocking the control loop.

Telemetry goes straight out (QoS 0) while the broker is there; while it is away it is kept in the
journal's outbox (bounded: the oldest telemetry is dropped first, and counted) and forwarded, in
order and at QoS 1, once the connection is back. Settlements always pass through the journal
first, so a crash never loses one: they leave the outbox only once the broker has them (QoS 1).
While the journal refuses writes (a full disk), a settlement it could not take is sent straight away
at QoS 1 as well (the journal writes it later, and it is sent again then: the coordinator keeps one
per interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edge_agent.journal import Journal
from p2pdoe.services.transport import Transport

log = logging.getLogger("edge_agent.outbox")
MAX_BUFFERED = 20_000
RETRY_S = 0.5  # with something waiting in the outbox, how often to look for the broker


class Outbox:
    def __init__(self, transport: Transport, journal: Journal, max_buffered: int = MAX_BUFFERED):
        self.transport = transport
        self.journal = journal
        self.max_buffered = max_buffered
        self.buffered = 0  # telemetry kept while the broker was away
        self.forwarded = 0
        self.dropped = 0  # telemetry dropped beyond `max_buffered`
        self._queue: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())  # first forwards what a previous run left behind

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def telemetry(self, topic: str, payload: bytes) -> None:
        self._queue.put_nowait((topic, payload, False))

    def durable(self, topic: str, payload: bytes) -> None:
        """Journal first, then deliver (settlements); straight away if the journal refused it."""
        if self.journal.queue(topic, payload):
            self._queue.put_nowait(("", b"", True))  # wake the loop: it forwards what is pending
        else:
            self._queue.put_nowait((topic, payload, True))

    @property
    def connected(self) -> bool:
        return bool(getattr(self.transport, "connected", True))

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a journal that cannot even be read, a refused message: go on
                log.error("outbox: %s; trying again in %g s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def _step(self) -> None:
        """Forward the backlog if the broker is there, then take one message (or time out)."""
        backlog = bool(self.journal.pending(1))
        if self.connected and backlog:
            await self._forward()
            backlog = bool(self.journal.pending(1))
        try:  # with a backlog, look again for the broker every RETRY_S; else just wait for work
            topic, payload, durable = await asyncio.wait_for(self._queue.get(), RETRY_S if backlog else None)
        except TimeoutError:
            return
        if not topic:
            return  # a wake-up: the durable record is pending already
        if durable:  # the journal refused it: straight to the broker, which acknowledges it
            await self.transport.publish(topic, payload, qos=1)
            self.forwarded += 1
        elif self.connected and not self.journal.pending(1):
            try:
                await asyncio.wait_for(self.transport.publish(topic, payload, qos=0), 2.0)
            except Exception:
                self._buffer(topic, payload)
        else:
            self._buffer(topic, payload)

    def _buffer(self, topic: str, payload: bytes) -> None:
        if self.journal.pending_count() >= self.max_buffered:
            self.dropped += 1
            return
        self.journal.queue(topic, payload)
        self.buffered += 1

    async def _forward(self) -> None:
        """Everything pending, oldest first, at QoS 1; stops at the first failure."""
        while self.connected:
            batch = self.journal.pending(100)
            if not batch:
                return
            for i, topic, payload in batch:
                try:
                    await asyncio.wait_for(self.transport.publish(topic, payload, qos=1), 5.0)
                except (TimeoutError, Exception) as exc:  # the broker went away again
                    log.info("forwarding paused: %s", exc)
                    return
                self.journal.delivered([i])
                self.forwarded += 1
