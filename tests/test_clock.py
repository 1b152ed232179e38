"""The clock port: wall, scaled and virtual clocks, and the event loop that runs on virtual time."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from p2pdoe.core.realtime.clock import SimClock
from p2pdoe.services.clock import (
    Clock,
    ScaledClock,
    VirtualClock,
    VirtualTimeLoop,
    WallClock,
    run_virtual,
)

SIM0 = datetime(2026, 6, 21, tzinfo=UTC)
WALL0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY_S = 24 * 3600.0


def loop_time() -> float:
    return asyncio.get_running_loop().time()


# --- the virtual-time loop -------------------------------------------------------------------------


def test_a_day_of_sleep_takes_no_wall_time() -> None:
    async def main() -> float:
        await asyncio.sleep(DAY_S)
        return loop_time()

    started = time.perf_counter()
    assert run_virtual(main()) == DAY_S
    assert time.perf_counter() - started < 5.0  # milliseconds in fact; generous for a loaded machine


def test_a_wait_longer_than_the_loops_longest_select_still_lands() -> None:
    async def main() -> float:
        await asyncio.sleep(3 * DAY_S + 0.25)  # asyncio caps one select at 24 h
        return loop_time()

    assert run_virtual(main()) == 3 * DAY_S + 0.25


def test_timers_still_fire_a_year_on() -> None:
    """Past 2**24 s, floats are further apart than the monotonic clock's resolution."""

    async def main() -> float:
        await asyncio.sleep(3e7 + 0.3)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.sleep(0.0), 1.0)
        return loop_time()

    assert run_virtual(main()) == pytest.approx(3e7 + 0.4, abs=1e-6)


def test_timers_fire_in_order_at_their_times() -> None:
    fired: list[tuple[float, float]] = []

    def fire(delay_s: float) -> None:
        fired.append((delay_s, loop_time()))

    async def main() -> None:
        for delay_s in [5.0, 1.0, 3.0, 1e6, 0.5, 0.1, 0.3]:
            asyncio.get_running_loop().call_later(delay_s, fire, delay_s)
        await asyncio.sleep(2e6)

    run_virtual(main())
    assert [d for d, _ in fired] == [0.1, 0.3, 0.5, 1.0, 3.0, 5.0, 1e6]
    assert all(at == pytest.approx(d, abs=1e-9) for d, at in fired)


def test_wait_for_and_timeout_expire_on_virtual_time() -> None:
    async def main() -> list[float]:
        times = []
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 30.0)
        times.append(loop_time())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(10.0):
                await asyncio.sleep(3600.0)
        times.append(loop_time())
        assert await asyncio.wait_for(asyncio.sleep(5.0, result="done"), 30.0) == "done"
        times.append(loop_time())
        return times

    assert run_virtual(main()) == [30.0, 40.0, 45.0]


async def _two_tasks() -> list[tuple[float, str, int]]:
    """Two producers on different periods and a consumer: who runs when, and in which order."""
    log: list[tuple[float, str, int]] = []
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    async def produce(name: str, period_s: float) -> None:
        for i in range(6):
            await asyncio.sleep(period_s)
            log.append((loop_time(), name, i))
            await queue.put((name, i))

    async def consume() -> None:
        for _ in range(12):
            name, i = await queue.get()
            log.append((loop_time(), "got " + name, i))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce("a", 3.0))
        tg.create_task(produce("b", 2.0))
        tg.create_task(consume())
    return log


def test_two_tasks_interleave_the_same_way_every_run() -> None:
    first, second = run_virtual(_two_tasks()), run_virtual(_two_tasks())
    assert first == second
    assert first[:4] == [(2.0, "b", 0), (2.0, "got b", 0), (3.0, "a", 0), (3.0, "got a", 0)]
    assert first[-1][0] == 18.0


def test_call_soon_threadsafe_from_a_thread_wakes_the_loop() -> None:
    async def main() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[str] = loop.create_future()

        def later() -> None:
            time.sleep(0.02)
            loop.call_soon_threadsafe(answer.set_result, "woken")

        threading.Thread(target=later).start()
        return await answer, loop.time()

    assert run_virtual(main()) == ("woken", 0.0)


def test_executor_work_holds_virtual_time() -> None:
    async def main() -> tuple[float, bool]:
        sleeper = asyncio.create_task(asyncio.sleep(3600.0))
        await asyncio.to_thread(time.sleep, 0.02)  # a pending timer must not jump meanwhile
        at = loop_time()
        await sleeper
        return at, loop_time() == 3600.0

    assert run_virtual(main()) == (0.0, True)


def test_run_virtual_cancels_leftovers_and_closes_its_loop() -> None:
    seen: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(1e9)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> asyncio.AbstractEventLoop:
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(1.0)
        return asyncio.get_running_loop()

    loop = run_virtual(main())
    assert isinstance(loop, VirtualTimeLoop)
    assert loop.is_closed()
    assert seen == ["cancelled"]


class _Interrupt(BaseException):
    """Like pytest's timeout: raised from a signal handler into whatever task runs."""


def test_a_task_ended_by_a_base_exception_ends_the_run_with_it() -> None:
    """asyncio keeps such an exception in the dead task and the loop goes on without it (a day with a
    silent edge agent); on virtual time it ends the run instead, and no later timer fires."""
    fired: list[float] = []

    async def interrupted() -> None:
        await asyncio.sleep(5.0)
        raise _Interrupt("timeout")

    async def main() -> None:
        asyncio.get_running_loop().create_task(interrupted())
        for _ in range(100):
            await asyncio.sleep(1.0)
            fired.append(asyncio.get_running_loop().time())

    with pytest.raises(_Interrupt, match="timeout"):
        run_virtual(main())
    assert fired[-1] == 5.0  # the instant it was raised at, and nothing after


def test_a_tests_own_loop_stops_on_a_base_exception_too() -> None:
    """tests/conftest.py gives asyncio.run's loops the same guard: waiting for ever on what the dead
    task would have done becomes an error at once."""

    async def interrupted() -> None:
        raise _Interrupt("timeout")

    async def main() -> None:
        asyncio.get_running_loop().create_task(interrupted())
        await asyncio.Event().wait()  # set by nobody

    with pytest.raises(RuntimeError, match="stopped before Future completed"):
        asyncio.run(main())


def test_an_ordinary_exception_in_a_task_does_not_end_the_run() -> None:
    async def failing() -> None:
        raise ValueError("handled by whoever awaits it")

    async def main() -> float:
        task = asyncio.get_running_loop().create_task(failing())
        await asyncio.sleep(3.0)
        assert isinstance(task.exception(), ValueError)
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == 3.0


def test_a_runner_with_the_loop_factory_runs_on_virtual_time() -> None:
    async def main() -> float:
        await asyncio.sleep(600.0)
        return loop_time()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        assert runner.run(main()) == 600.0
        assert runner.run(main()) == 1200.0  # one loop, one clock across runs


# --- the virtual clock -----------------------------------------------------------------------------


def test_the_virtual_clock_follows_the_loop_and_lands_on_the_moment() -> None:
    clock = VirtualClock(SIM0)
    moment = SIM0 + timedelta(hours=1, minutes=2, seconds=3, microseconds=456789)

    async def main() -> None:
        assert clock.now() == SIM0
        await asyncio.sleep(90.0)
        assert clock.now() == SIM0 + timedelta(seconds=90)
        await clock.sleep_until(moment)
        assert clock.now() == moment
        assert loop_time() == pytest.approx(3723.456789, abs=1e-9)
        await clock.sleep_until(SIM0)  # the past: at once
        assert clock.now() == moment

    run_virtual(main())


def test_the_virtual_clocks_expiry_is_in_loop_seconds() -> None:
    clock = VirtualClock(SIM0)

    async def main() -> list[int | None]:
        await asyncio.sleep(10.0)
        now = clock.now()
        offsets_s = [-5.0, 0.0, 0.999, 1.0, 1.2, 3600.0]
        return [clock.expiry_s(now + timedelta(seconds=s)) for s in offsets_s]

    assert run_virtual(main()) == [None, None, None, 1, 2, 3600]


def test_the_virtual_clock_refuses_another_loop() -> None:
    clock = VirtualClock(SIM0)

    async def main() -> datetime:
        return clock.now()

    with pytest.raises(RuntimeError, match="VirtualTimeLoop"):
        asyncio.run(main())
    with pytest.raises(RuntimeError, match="VirtualTimeLoop"):
        clock.now()  # no loop at all
    with pytest.raises(ValueError, match="time zone"):
        VirtualClock(datetime(2026, 6, 21))


# --- wall and scaled clocks ------------------------------------------------------------------------


def test_every_clock_is_a_clock() -> None:
    clocks: list[Clock] = [WallClock(), ScaledClock(SimClock(SIM0, WALL0)), VirtualClock(SIM0)]
    assert [c.kind for c in clocks] == ["wall", "scaled", "virtual"]
    assert all(isinstance(c, Clock) for c in clocks)
    for c in clocks:
        c.idle(holding=True)


def test_the_scaled_clock_maps_wall_to_simulated_time() -> None:
    sim = SimClock(SIM0, WALL0, speed=100.0)
    clock, skewed = ScaledClock(sim), ScaledClock(sim, offset_s=30.0)
    before = datetime.now(UTC)
    now, now_skewed = clock.now(), skewed.now()
    after = datetime.now(UTC)
    assert sim.sim_at(before) <= now <= sim.sim_at(after)
    shift = timedelta(seconds=30)
    assert sim.sim_at(before) + shift <= now_skewed <= sim.sim_at(after) + shift


def test_the_scaled_clocks_expiry_is_in_wall_seconds() -> None:
    sim = SimClock(SIM0, WALL0, speed=100.0)
    clock = ScaledClock(sim)
    now = sim.sim_at(datetime.now(UTC))
    assert clock.expiry_s(now + timedelta(seconds=100 * 20.5)) == 21  # 20.5 wall s, minus a moment
    assert clock.expiry_s(now + timedelta(seconds=100 * 0.5)) is None
    assert clock.expiry_s(now - timedelta(hours=1)) is None


def test_the_scaled_clock_sleeps_until_the_simulated_moment() -> None:
    clock = ScaledClock(SimClock(SIM0, WALL0, speed=100.0))

    async def main() -> None:
        moment = clock.now() + timedelta(seconds=2)  # 20 ms of wall time
        await clock.sleep_until(moment)
        assert clock.now() >= moment

    started = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - started < 2.0


def test_the_wall_clock_reads_the_wall_with_its_offset() -> None:
    before = datetime.now(UTC)
    now, skewed = WallClock().now(), WallClock(offset_s=-60.0).now()
    after = datetime.now(UTC)
    assert before <= now <= after
    assert before - timedelta(minutes=1) <= skewed <= after - timedelta(minutes=1)


def test_the_wall_clock_returns_at_once_for_a_past_moment() -> None:
    clock = WallClock()

    async def main() -> float:
        await clock.sleep_until(clock.now() - timedelta(seconds=5))
        return loop_time()

    assert run_virtual(main()) == 0.0  # no timer was ever set


def test_the_wall_clock_sleeps_until_a_near_moment() -> None:
    clock = WallClock()

    async def main() -> None:
        moment = clock.now() + timedelta(milliseconds=30)
        await clock.sleep_until(moment)
        assert clock.now() >= moment

    asyncio.run(main())


def test_the_wall_clocks_expiry_is_none_below_one_second() -> None:
    clock = WallClock()
    now = clock.now()
    assert clock.expiry_s(now + timedelta(seconds=0.5)) is None
    assert clock.expiry_s(now - timedelta(seconds=3)) is None
    assert clock.expiry_s(now + timedelta(seconds=10.5)) == 11
