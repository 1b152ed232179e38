"""The asyncio shell around a service's pure machine: it moves bytes, timers and solves, and decides
nothing.

One loop: every message from the transport becomes a `Heard` event, the machine's `next_wake()`
becomes a `Woke` when the clock reaches it, and each `Patience` a `PatienceOver` on the event loop's
clock; each event is handed to the machine with the clock's `now()` (in a worker thread when the
machine says it may solve, so the MQTT keep-alive never starves), and the commands it returns are
carried out in order. Before it waits, the shell tells the clock it is idle (a lockstep clock then
reports the step finished unless the machine holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from p2pdoe.core.effects import (
    Exit,
    Heard,
    Patience,
    PatienceOver,
    Relieve,
    Send,
    Subscribe,
    Unsubscribe,
    Woke,
)
from p2pdoe.errors import P2PDoeError
from p2pdoe.services.clock import Clock
from p2pdoe.services.transport import InboundMessage, Transport, TransportError

log = logging.getLogger(__name__)
Event = Heard | Woke | PatienceOver


class Machine(Protocol):
    def handle(self, event: Any, now: datetime) -> Sequence[object]: ...

    def next_wake(self) -> datetime | None: ...

    def holding(self) -> bool: ...

    def heavy(self, event: Any) -> bool: ...


def clock_divert(clock: Clock) -> Callable[[InboundMessage], bool] | None:
    """A lockstep clock's own messages go to it (its `on_message`); other clocks have none."""
    take = getattr(clock, "on_message", None)
    if take is None:
        return None
    return lambda m: bool(take(m.topic, m.payload))


class StoppedError(P2PDoeError):
    """The machine asked to stop with a non-zero status."""


class Shell:
    """Runs `machine` on `transport` and `clock`; `extra` carries out the service's own commands.
    `offload=False` handles every event inline (a virtual clock: no threads)."""

    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        extra: Callable[[object], Awaitable[None]] | None = None,
        offload: bool = True,
        divert: Callable[[InboundMessage], bool] | None = None,
        hold: Callable[[], bool] | None = None,
    ):
        self.transport = transport
        self.clock = clock
        self.extra = extra
        self.offload = offload
        self.divert = divert  # True: the message was taken elsewhere (a lockstep clock's, a second lane's)
        self.hold = hold  # the shell's own reason to hold a lockstep step (beside the machine's)
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.handled = 0
        self.unsent = 0  # messages the transport failed to publish
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._background: dict[str, asyncio.Task[None]] = {}
        self._getter: asyncio.Future[Event] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._exit: Exit | None = None
        self._error: BaseException | None = None

    def start_reading(self) -> None:
        """Read the transport from now on (before the machine exists: a lockstep clock's first grant
        comes through here); what arrives waits for the machine."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="shell-reader")

    async def run(
        self, machine: Machine, first: Sequence[object], subscriptions: Sequence[tuple[str, int]]
    ) -> int:
        """Carry out `first` (the machine's start), subscribe, then serve until the machine exits or
        the transport closes. A non-zero exit raises `StoppedError` with the machine's reason."""
        self.start_reading()
        reader = self._reader
        assert reader is not None
        await self.execute(first)
        for topic_filter, qos in subscriptions:
            await self.transport.subscribe(topic_filter, qos)
        try:
            while self._exit is None:
                event = await self._next_event(machine)
                if event is not None:
                    await self.execute(await self._handle(machine, event))
                elif reader.done() and self.inbox.empty() and self._getter is None:
                    reader.result()  # a transport that gave up raises here
                    break
        finally:
            await self._cleanup(reader)
        if self._error is not None:
            raise self._error
        if self._exit is not None and self._exit.status != 0:
            raise StoppedError(self._exit.why)
        return 0 if self._exit is None else self._exit.status

    async def _read(self) -> None:
        async for m in self.transport.messages():
            if self.divert is not None and self.divert(m):
                continue
            self.inbox.put_nowait(Heard(m.topic, m.payload, m.retained))

    def feed(self, event: object) -> None:
        """An event from elsewhere (a second lane, a meter on its own connection), in arrival order."""
        self.inbox.put_nowait(event)  # type: ignore[arg-type]

    def stop(self, status: int = 0, why: str = "", error: BaseException | None = None) -> None:
        """End the loop (from another task); `error` is raised from `run`."""
        self._exit = Exit(status, why)
        self._error = error
        self.inbox.put_nowait(Woke())  # wake the loop if it waits

    async def _handle(self, machine: Machine, event: Event) -> Sequence[object]:
        now = self.clock.now()
        self.handled += 1
        if self.offload and machine.heavy(event):
            return await asyncio.to_thread(machine.handle, event, now)
        return machine.handle(event, now)

    # --- waiting ---------------------------------------------------------------------------------

    async def _next_event(self, machine: Machine) -> Event | None:
        """The next event: one already queued, else (after telling the clock the shell is idle) the
        first of a message, a patience running out, or the machine's wake-up time."""
        if self._getter is not None and self._getter.done():
            event, self._getter = self._getter.result(), None
            return event
        if self._getter is None and not self.inbox.empty():
            return self.inbox.get_nowait()
        wake = machine.next_wake()
        if wake is not None and self.clock.now() >= wake:
            await self.clock.sleep_until(wake)  # at once; a ranked virtual clock lets this instant settle
            return Woke()
        self.clock.idle(machine.holding() or (self.hold is not None and self.hold()))
        if self._getter is None:
            self._getter = asyncio.ensure_future(self.inbox.get())
        waits: set[asyncio.Future[Any]] = {self._getter}
        if self._reader is not None:
            waits.add(self._reader)
        sleeper = None if wake is None else asyncio.ensure_future(self.clock.sleep_until(wake))
        if sleeper is not None:
            waits.add(sleeper)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if sleeper is not None and not sleeper.done():
            sleeper.cancel()
        if self._getter.done():
            event, self._getter = self._getter.result(), None
            return event
        return None  # loop again: take the message, or check the wake-up time

    # --- commands --------------------------------------------------------------------------------

    async def execute(self, commands: Sequence[object]) -> None:
        """Carry out `commands` in order; consecutive waiting `Send`s go out back to back and are
        acknowledged together, so a coordinator's N grants cost one broker round trip, not N."""
        sends: list[Send] = []
        for cmd in commands:
            if isinstance(cmd, Send) and cmd.wait:
                sends.append(cmd)
                continue
            await self._send_together(sends)
            sends = []
            await self._execute(cmd)
        await self._send_together(sends)

    async def _send_together(self, sends: list[Send]) -> None:
        if len(sends) == 1:
            await self._send(sends[0])
        elif sends:  # tasks start in order, so the messages leave in order
            await asyncio.gather(*(self._send(s) for s in sends))

    async def _execute(self, cmd: object) -> None:
        if isinstance(cmd, Send):
            await self._send(cmd)
        elif isinstance(cmd, Patience):
            self._relieve(cmd.key)
            loop = asyncio.get_running_loop()
            self._timers[cmd.key] = loop.call_later(cmd.seconds, self.inbox.put_nowait, PatienceOver(cmd.key))
        elif isinstance(cmd, Relieve):
            self._relieve(cmd.key)
        elif isinstance(cmd, Subscribe):
            await self.transport.subscribe(cmd.topic_filter, cmd.qos)
        elif isinstance(cmd, Unsubscribe):
            await self.transport.unsubscribe(cmd.topic_filter)
        elif isinstance(cmd, Exit):
            self._exit = cmd
        elif self.extra is not None:
            await self.extra(cmd)

    def _relieve(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def _send(self, s: Send) -> None:
        expiry = None if s.until is None else self.clock.expiry_s(s.until)
        if not s.wait:
            previous = self._background.pop(s.topic, None)
            if previous is not None and not previous.done():
                previous.cancel()  # superseded: the latest wins
            self._background[s.topic] = asyncio.create_task(self._publish(s, expiry))
            return
        await self._publish(s, expiry)

    async def _publish(self, s: Send, expiry: int | None) -> None:
        """Publish; a failure the transport could not ride through is logged and counted, never fatal
        (the transport waits through stalls and reconnects by itself)."""
        try:
            if s.state:
                await self.transport.publish_state(s.topic, s.payload, expiry_s=expiry)
            else:
                await self.transport.publish(s.topic, s.payload, qos=s.qos, retain=s.retain, expiry_s=expiry)
        except TransportError as exc:
            self.unsent += 1
            log.error("not published on %s: %s", s.topic, exc)

    async def _cleanup(self, reader: asyncio.Task[None]) -> None:
        for timer in self._timers.values():
            timer.cancel()
        tasks = [reader, *self._background.values()]
        if self._getter is not None:
            tasks.append(self._getter)  # type: ignore[arg-type]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
