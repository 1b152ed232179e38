"""The clock as a port: where a service's time comes from.

Every service reads the day's time only through a `Clock` and waits for a moment of the day only
through `sleep_until`; no decision reads the wall clock. The pure machines take `now` as an input.

- `WallClock`: wall time, for deployments and real meters.
- `ScaledClock`: simulated time running `speed` times wall time from a shared origin (the
  accelerated day for those who want real-time pressure).
- `VirtualClock`: virtual time in one process (`VirtualTimeLoop`): time jumps to the next timer
  whenever every task waits, so a whole day runs in seconds and the same way every run.
- `LockstepClock` (p2pdoe.services.lockstep): simulated time moves to the next step only when every
  participant has said over MQTT that it has finished the current one.

Patience (how long to wait for a peer: a registration, an iteration's proposals, a report) is not
the day's time: it is measured on the event loop's clock (`asyncio` timeouts), which is wall time
except on the `VirtualTimeLoop`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import selectors
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, TypeVarTuple, runtime_checkable

from p2pdoe.core.realtime.clock import SimClock

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

ClockKind = Literal["wall", "scaled", "virtual", "lockstep"]


@runtime_checkable
class Clock(Protocol):
    kind: ClockKind

    def now(self) -> datetime:
        """The day's time now (UTC)."""
        ...

    async def sleep_until(self, moment: datetime) -> None:
        """Return once `now() >= moment` (at once if it already is). On a lockstep clock, waiting is
        also how a participant says it has finished the current step (see `idle`)."""
        ...

    def expiry_s(self, until: datetime) -> int | None:
        """The broker's message expiry (seconds of the broker's clock) for a message valid until
        `until` (the day's time); None: no expiry (past already, or unknown on a lockstep clock)."""
        ...

    def idle(self, holding: bool) -> None:
        """The service has handled everything it has been given; `holding`: it still needs the
        current moment to last (a round under way). Only a lockstep clock acts on it (it reports the
        step finished when not holding); the others ignore it."""
        ...


class _ClockOnLoop:
    """A clock whose waits are sleeps on the event loop: a subclass gives `now` and how many seconds of
    the loop's clock lie between now and a moment of the day."""

    kind: ClockKind

    def now(self) -> datetime:
        raise NotImplementedError

    def _loop_s_until(self, moment: datetime) -> float:
        raise NotImplementedError

    async def sleep_until(self, moment: datetime) -> None:
        # Loop: a timer may fire a little early (the loop's clock resolution, wall clock adjustments).
        while (left_s := self._loop_s_until(moment)) > 0:
            await asyncio.sleep(left_s)

    def expiry_s(self, until: datetime) -> int | None:
        left_s = self._loop_s_until(until)
        return math.ceil(left_s) if left_s >= 1 else None

    def idle(self, holding: bool) -> None:
        pass


class ScaledClock(_ClockOnLoop):
    """Simulated time `sim.speed` times wall time; `offset_s` (simulated seconds) shifts this clock alone,
    to inject clock skew. The broker's and the loop's clock are the wall's."""

    kind: ClockKind = "scaled"

    def __init__(self, sim: SimClock, offset_s: float = 0.0) -> None:
        self.sim = sim
        self.offset = timedelta(seconds=offset_s)

    def now(self) -> datetime:
        return self.sim.sim_at(datetime.now(UTC)) + self.offset

    def _loop_s_until(self, moment: datetime) -> float:
        return self.sim.wall_seconds((moment - self.now()).total_seconds())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class WallClock(ScaledClock):
    """Wall time (UTC), shifted by `offset_s` to inject clock skew."""

    kind: ClockKind = "wall"

    def __init__(self, offset_s: float = 0.0) -> None:
        super().__init__(SimClock(_EPOCH, _EPOCH), offset_s)


class _JumpingSelector(selectors.BaseSelector):
    """A real selector that, where the loop would wait `timeout` s for a timer with nothing ready, moves
    virtual time on by `timeout` and returns at once. With no timer (timeout None), or while executor
    jobs run (`threads`), it blocks on the real selector: a thread's call_soon_threadsafe wakes it."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now_s = 0.0  # the loop's virtual time
        self.threads = 0  # executor jobs under way
        self.idle: list[tuple[int, int, Callable[[], object]]] = []  # (rank, order, callback), a heap
        self.schedule: Callable[[Callable[[], object]], object] | None = None  # the loop's call_soon
        self._order = 0

    def when_idle(self, rank: int, callback: Callable[[], object]) -> None:
        self._order += 1
        heapq.heappush(self.idle, (rank, self._order, callback))

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)  # I/O and the self-pipe (call_soon_threadsafe) first
        if ready or timeout == 0:  # 0: callbacks are ready
            return ready
        if self.threads > 0:
            return self._real.select(None)
        if self.idle and self.schedule is not None:  # this instant is quiet: its next rank goes on
            self._release_rank(self.schedule)
            return []
        if timeout is None:
            return self._real.select(None)
        self.now_s += timeout
        return []

    def _release_rank(self, schedule: Callable[[Callable[[], object]], object]) -> None:
        rank = self.idle[0][0]
        while self.idle and self.idle[0][0] == rank:
            schedule(heapq.heappop(self.idle)[2])

    def register(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: FileDescriptorLike, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: `time()` starts at 0.0 and, whenever every task waits for a timer,
    jumps to the next timer instead of sleeping, so sleeps and timeouts (asyncio.sleep, wait_for,
    timeout) cost no wall time and a run is the same every time.

    Work in the executor (asyncio.to_thread, run_in_executor) takes no virtual time: the clock stands
    still until it is done (or its future is cancelled). Other threads break virtual time (it runs on
    while they work; their call_soon_threadsafe still wakes the loop), and so does real I/O: use
    in-process fakes.

    A task that ends with a BaseException other than a cancellation (a test's timeout raised from a
    signal handler into whatever task was running) stops the loop, and `run_virtual` raises it:
    asyncio would keep it in the dead task and the day would go on without it."""

    def __init__(self) -> None:
        self._jumps = _JumpingSelector()
        super().__init__(self._jumps)
        self._jumps.schedule = self.call_soon
        self.fatal: BaseException | None = None  # what stopped the loop from inside a task
        stop_on_fatal(self)
        # _run_once fires a timer when `when < time() + _clock_resolution` (monotonic's, 1 ns): past 2**24 s
        # floats are > 2 ns apart and a timer landed on exactly would never fire. 1 µs holds to 2**33 s.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self._jumps.now_s

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._jumps.threads += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._jumps.threads -= 1

    def call_when_quiet(self, rank: int, callback: Callable[[], object]) -> None:
        """Call `callback` once nothing else is ready at this instant, before time moves on; callbacks
        of a lower rank first (then whatever they set off), like the phases of a lockstep step."""
        self._jumps.when_idle(rank, callback)


def stop_on_fatal(loop: asyncio.AbstractEventLoop) -> None:
    """From now on, a task of `loop` that ends with a BaseException other than a cancellation (a
    test's timeout, raised from a signal handler into whatever task was running) stops `loop` and is
    kept in its `fatal` attribute. asyncio itself keeps it in the dead task and runs on without it."""
    if not hasattr(loop, "fatal"):
        loop.fatal = None  # type: ignore[attr-defined]

    def ended(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, Exception | KeyboardInterrupt | SystemExit):
            return  # raised to its awaiter; the last two asyncio raises out of the loop itself
        if loop.fatal is None and loop.is_running():  # type: ignore[attr-defined]
            loop.fatal = exc  # type: ignore[attr-defined]
            loop.stop()

    def watched(lp: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=lp, **kwargs)
        task.add_done_callback(ended)
        return task

    loop.set_task_factory(watched)


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh VirtualTimeLoop, like asyncio.run: leftover tasks are
    cancelled and the loop closed."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        try:
            return runner.run(main)
        except RuntimeError:
            fatal = runner.get_loop().fatal  # type: ignore[attr-defined]
            if fatal is None:
                raise
            raise fatal from None


def _virtual_loop() -> VirtualTimeLoop:
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if not isinstance(loop, VirtualTimeLoop):
        raise RuntimeError("a VirtualClock needs a running VirtualTimeLoop (see run_virtual)")
    return loop


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class VirtualClock(_ClockOnLoop):
    """The day's time is `origin` plus the running VirtualTimeLoop's time in seconds; using it outside
    one raises RuntimeError. An in-memory broker on the same loop expires messages on the same clock.

    `rank` orders services woken at the same instant as the lockstep phases do: a clock of rank r
    returns from `sleep_until` only once everything of a lower rank at that instant, and all it set
    off, is done (meters 0, edge agents 1, the coordinator 2)."""

    kind: ClockKind = "virtual"

    def __init__(self, origin: datetime, rank: int = 0) -> None:
        if origin.utcoffset() is None:
            raise ValueError("a VirtualClock's origin needs a time zone")
        self.origin = origin
        self.rank = rank

    async def sleep_until(self, moment: datetime) -> None:
        await super().sleep_until(moment)
        if self.rank > 0:
            quiet: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            _virtual_loop().call_when_quiet(self.rank, lambda: _settle(quiet))
            await quiet

    def now(self) -> datetime:
        return self.origin + timedelta(seconds=_virtual_loop().time())

    def _loop_s_until(self, moment: datetime) -> float:
        return (moment - self.now()).total_seconds()
