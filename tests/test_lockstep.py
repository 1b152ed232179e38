"""The lockstep clock over a real broker: the granter (in-process, or `python -m p2pdoe.services.lockstep`)
and toy members on `LockstepClock`s, each with its own MqttTransport.

The toys: a plant member publishes a reading (a function of the step) at each plant grant; a control
member records the readings it has at each control grant (in the silent-member test it first holds,
with heartbeats, until every meter that takes part has delivered this step's); a grid member holds
some steps for a while and asks to skip others. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import pytest

from p2pdoe.core import topics
from p2pdoe.core.lockstep import Granter, GranterConfig
from p2pdoe.core.schemas.lockstep import (
    ClockDone,
    ClockGrant,
    ClockMember,
    ClockStatus,
    Phase,
    decode_lockstep,
)
from p2pdoe.services.broker import Broker
from p2pdoe.services.clock import Clock
from p2pdoe.services.lockstep import LockstepClock, run_granter
from p2pdoe.services.transport import Backoff, InboundMessage, MqttTransport
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
FAST = Backoff(initial_s=0.05, cap_s=0.3, max_attempts=100)
START = datetime(2024, 6, 1, tzinfo=UTC)
STEP_S = 60.0
LAST_STEP = 5
SILENCE_S = 1.5
HEARTBEAT_S = 0.25
HOLDS = {2: 2.0, 4: 0.3}  # the grid member's holds (wall s): step 2 longer than the silence timeout
SKIPS = {0: 2}  # after step 0 the grid member next needs step 2
READINGS = "p2pdoe-test/lockstep/reading/"


def at(step: int) -> datetime:
    return START + timedelta(seconds=step * STEP_S)


def reading(meter: str, step: int) -> int:
    return 100 * step + sum(map(ord, meter)) % 100


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 40.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class Toy:
    """A service on a lockstep clock: one transport, one message loop, one worker."""

    def __init__(self, broker: Broker, name: str, phase: Phase) -> None:
        self.name = name
        self.transport = MqttTransport(broker.url, name, backoff=FAST)
        self.clock = LockstepClock(
            self.transport, name, phase, every_step=phase != "grid", heartbeat_s=HEARTBEAT_S
        )
        self.steps: list[int] = []  # the steps it acted on

    async def serve(self) -> None:
        async with self.transport:
            await self.subscribe()
            await self.clock.start()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(c) for c in (self.clock.run(), self.read(), self.work())]
                await self.clock.until_ended()
                for task in tasks:
                    task.cancel()
            await self.clock.leave()

    async def read(self) -> None:
        async for message in self.transport.messages():
            if not self.clock.on_message(message.topic, message.payload):
                self.message(message)
            self.handled()

    async def subscribe(self) -> None:
        """The toy's own subscriptions."""

    def message(self, message: InboundMessage) -> None:
        """A message that is not the clock's."""

    def handled(self) -> None:
        """Everything received so far is handled."""

    async def work(self) -> None:
        await asyncio.Event().wait()


class Plant(Toy):
    def __init__(
        self, broker: Broker, name: str, jitter: random.Random | None = None, stop_at: int | None = None
    ) -> None:
        super().__init__(broker, name, "plant")
        self.jitter = jitter
        self.stop_at = stop_at  # the step it stops answering at (until cancelled)
        self.stopped = asyncio.Event()

    async def work(self) -> None:
        while True:
            await self.clock.sleep_until(at(LAST_STEP + 1))  # returns at each grant to it
            if not self.clock.phase_granted:
                continue
            step = self.clock.step
            assert step is not None
            if step == self.stop_at:
                self.stopped.set()
                await asyncio.Event().wait()
            if self.jitter is not None:
                await asyncio.sleep(self.jitter.uniform(0, 0.05))
            payload = json.dumps({"step": step, "value": reading(self.name, step)}).encode()
            await self.transport.publish(READINGS + self.name, payload)
            self.steps.append(step)
            self.clock.idle(False)


class Control(Toy):
    def __init__(self, broker: Broker, name: str, meters: list[str], hold: bool = True) -> None:
        super().__init__(broker, name, "control")
        self.meters = meters
        self.hold = hold  # False: act on whatever reading it has at its grant
        self.latest: dict[str, tuple[int, int]] = {}  # meter -> (step, value)
        self.seen: list[tuple[int, dict[str, int]]] = []  # per control grant: the readings it used

    async def subscribe(self) -> None:
        await self.transport.subscribe(READINGS + "+")

    def message(self, message: InboundMessage) -> None:
        if message.topic.startswith(READINGS):
            data = json.loads(message.payload)
            self.latest[message.topic.removeprefix(READINGS)] = (data["step"], data["value"])

    def handled(self) -> None:
        if not self.clock.phase_granted:
            return
        step = self.clock.step
        assert step is not None
        meters = [m for m in self.meters if self.clock.takes_part(m)]
        if self.hold and any(self.latest.get(m, (-1, 0))[0] != step for m in meters):
            self.clock.idle(holding=True)  # a reading of this step is still to come
            return
        self.seen.append((step, {m: self.latest.get(m, (-1, -1))[1] for m in meters}))
        self.steps.append(step)
        self.clock.idle(holding=False)


class Grid(Toy):
    def __init__(self, broker: Broker, name: str) -> None:
        super().__init__(broker, name, "grid")
        self.released: dict[int, tuple[float, float]] = {}  # step -> hold's wall start and end

    async def work(self) -> None:
        wanted = at(0) + timedelta(seconds=1)
        while True:
            await self.clock.sleep_until(wanted)
            if not self.clock.phase_granted:
                continue
            step = self.clock.step
            assert step is not None
            self.steps.append(step)
            if step in HOLDS:
                began = time.monotonic()
                self.clock.idle(holding=True)
                await asyncio.sleep(HOLDS[step])
                self.released[step] = (began, time.monotonic())
            wanted = at(SKIPS.get(step, step + 1))
            self.clock.idle(holding=False)  # `next` is taken once this task sleeps until `wanted`


class Observer:
    """Every grant and status published, with the (monotonic) time it arrived."""

    def __init__(self, broker: Broker) -> None:
        self.transport = MqttTransport(broker.url, "observer", backoff=FAST)
        self.grants: list[tuple[float, ClockGrant]] = []
        self.statuses: list[ClockStatus] = []

    async def watch(self) -> None:
        await self.transport.subscribe(topics.CLOCK_GRANT)
        await self.transport.subscribe(topics.CLOCK_STATUS)
        async for message in self.transport.messages():
            if not message.payload:
                continue
            decoded = decode_lockstep(message.payload)
            if isinstance(decoded, ClockGrant):
                self.grants.append((time.monotonic(), decoded))
            elif isinstance(decoded, ClockStatus):
                self.statuses.append(decoded)

    def phases(self) -> list[tuple[int, str]]:
        """The (step, phase) granted, in order, each once (a grant published again is not new)."""
        out: list[tuple[int, str]] = []
        for _, grant in self.grants:
            if not out or out[-1] != (grant.step, grant.phase):
                out.append((grant.step, grant.phase))
        return out

    def first_grant_of(self, step: int) -> float:
        return min(t for t, g in self.grants if g.step == step)

    def first_grant_of_phase(self, step: int, phase: str) -> float:
        return min(t for t, g in self.grants if (g.step, g.phase) == (step, phase))


def config(members: dict[str, Phase]) -> GranterConfig:
    return GranterConfig(
        START, STEP_S, at(LAST_STEP), members, join_timeout_s=15, silence_timeout_s=SILENCE_S
    )


async def granter_process(broker: Broker, members: dict[str, Phase]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pdoe.services.lockstep",
        "--broker",
        broker.url,
        "--start",
        START.isoformat(),
        "--step-s",
        str(STEP_S),
        "--end",
        at(LAST_STEP).isoformat(),
        "--members",
        ",".join(f"{name}:{phase}" for name, phase in members.items()),
        "--silence-timeout-s",
        str(SILENCE_S),
        "--join-timeout-s",
        "15",
        "--log-level",
        "WARNING",
        stderr=asyncio.subprocess.PIPE,
    )


async def in_process_granter(broker: Broker, members: dict[str, Phase]) -> int:
    async with MqttTransport(broker.url, "clock", backoff=FAST) as transport:
        return await run_granter(transport, Granter(config(members)))


EXPECTED_PHASES = [
    (0, "plant"), (0, "control"), (0, "grid"),
    (1, "plant"), (1, "control"),  # the grid member asked for step 2 next
    *[(k, p) for k in range(2, LAST_STEP + 1) for p in ("plant", "control", "grid")],
]  # fmt: skip


@pytest.mark.parametrize(("granter", "jitter"), [("process", False), ("in_process", True)])
def test_a_day_in_lockstep(mqtt_broker: Broker, granter: str, jitter: bool) -> None:
    """Phases in order, the edge always sees its meter's reading of the same step whatever the speed,
    a hold stops time, and the granter exits 0 at the end."""

    async def day() -> tuple[Observer, Plant, Control, Grid, int]:
        plant = Plant(mqtt_broker, "meter-a", random.Random(7) if jitter else None)
        control = Control(mqtt_broker, "edge-a", ["meter-a"], hold=False)  # lockstep orders it
        grid = Grid(mqtt_broker, "dso")
        members: dict[str, Phase] = {"meter-a": "plant", "edge-a": "control", "dso": "grid"}
        observer = Observer(mqtt_broker)
        async with observer.transport:
            watching = asyncio.create_task(observer.watch())
            toys = [asyncio.create_task(toy.serve()) for toy in (plant, control, grid)]
            if granter == "process":
                process = await granter_process(mqtt_broker, members)
                try:
                    _, err = await asyncio.wait_for(process.communicate(), 30)
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
                code = process.returncode
                assert code == 0, err.decode()
            else:
                code = await in_process_granter(mqtt_broker, members)
            await asyncio.wait_for(asyncio.gather(*toys), 10)
            watching.cancel()
        return observer, plant, control, grid, code

    observer, plant, control, grid, code = run(day())
    assert code == 0
    assert observer.phases() == EXPECTED_PHASES
    assert plant.steps == list(range(LAST_STEP + 1))
    assert control.seen == [(k, {"meter-a": reading("meter-a", k)}) for k in range(LAST_STEP + 1)]
    assert grid.steps == [0, *range(2, LAST_STEP + 1)]
    began, released = grid.released[2]
    assert observer.first_grant_of(3) >= released  # no later step while it held
    assert released - began >= HOLDS[2]
    assert grid.clock.heartbeats_sent >= 4
    assert all(status.silent == [] for status in observer.statuses)  # heartbeats kept it in
    assert any(s.waiting_for == ["dso"] and s.step == 2 for s in observer.statuses)
    assert observer.statuses[-1].state == "ended"
    assert [toy.clock.ended for toy in (plant, control, grid)] == [True] * 3


def test_a_silent_member_is_reported_and_the_rest_go_on(mqtt_broker: Broker) -> None:
    async def day() -> tuple[Observer, Control, int]:
        meters = ["meter-a", "meter-b"]
        plants = [Plant(mqtt_broker, "meter-a"), Plant(mqtt_broker, "meter-b", stop_at=2)]
        control, grid = Control(mqtt_broker, "edge-a", meters), Grid(mqtt_broker, "dso")
        members: dict[str, Phase] = {
            "meter-a": "plant",
            "meter-b": "plant",
            "edge-a": "control",
            "dso": "grid",
        }
        observer = Observer(mqtt_broker)
        async with observer.transport:
            watching = asyncio.create_task(observer.watch())
            clock = asyncio.create_task(in_process_granter(mqtt_broker, members))
            serving = {toy.name: asyncio.create_task(toy.serve()) for toy in (*plants, control, grid)}
            await asyncio.wait_for(plants[1].stopped.wait(), 15)
            serving.pop("meter-b").cancel()  # stops answering, without leaving
            code = await asyncio.wait_for(clock, 25)
            await asyncio.wait_for(asyncio.gather(*serving.values()), 10)
            watching.cancel()
        return observer, control, code

    observer, control, code = run(day())
    assert code == 0
    silent = [s for s in observer.statuses if s.silent == ["meter-b"]]
    assert silent, observer.statuses
    assert silent[0].step == 2
    assert observer.phases()[-1] == (LAST_STEP, "grid")  # the rest went on to the end
    assert all("meter-b" not in grant.live for _, grant in observer.grants if grant.step > 2)
    assert [step for step, _ in control.seen] == list(range(LAST_STEP + 1))
    assert control.seen[1] == (1, {m: reading(m, 1) for m in ("meter-a", "meter-b")})
    assert control.seen[2] == (2, {"meter-a": reading("meter-a", 2)})
    waited = observer.first_grant_of_phase(2, "control") - observer.first_grant_of_phase(2, "plant")
    assert waited >= SILENCE_S - 0.3


def test_the_lockstep_clock_is_a_clock() -> None:
    clock: Clock = LockstepClock(MqttTransport("mqtt://127.0.0.1:1", "x"), "meter-a", "plant")
    assert isinstance(clock, Clock)
    assert clock.kind == "lockstep"
    assert clock.expiry_s(START) is None
    with pytest.raises(ValueError, match="clock member name"):
        LockstepClock(MqttTransport("mqtt://127.0.0.1:1", "x"), "a/b", "plant")


def test_bad_options_are_one_line_and_exit_2() -> None:
    for args in (
        ["--start", "noon", "--hours", "1"],
        ["--start", START.isoformat(), "--members", "x:y", "--hours", "1"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "p2pdoe.services.lockstep", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("p2pdoe-lockstep: error: "), proc.stderr


async def _until(predicate: Any, poll_s: float = 0.02) -> None:
    while not predicate():
        await asyncio.sleep(poll_s)


# -- the member side alone, on a fake transport (no broker) ---------------------------------------


class Recorder:
    """A `Transport` that records what is published and delivers nothing."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        self.published.append((topic, payload, retain))

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        await self.publish(topic, payload, retain=True)

    async def unsubscribe(self, topic_filter: str) -> None:
        pass

    async def messages(self) -> AsyncIterator[InboundMessage]:
        await asyncio.Event().wait()
        yield InboundMessage("", b"", False)

    def dones(self) -> list[ClockDone]:
        return [
            ClockDone.model_validate_json(p) for t, p, _ in self.published if t == topics.clock_done("dso")
        ]


def grant_message(step: int, phase: Phase, members: list[str], live: list[str] | None = None) -> bytes:
    grant = ClockGrant(step=step, phase=phase, time=at(step), members=members, live=live or members)
    return grant.model_dump_json().encode()


def test_the_member_side_reports_dones_heartbeats_and_its_next_time() -> None:
    async def scenario() -> Recorder:
        transport = Recorder()
        clock = LockstepClock(transport, "dso", "grid", heartbeat_s=0.05)
        await clock.start()
        assert ClockMember.model_validate_json(transport.published[-1][1]).state == "joined"
        sender = asyncio.create_task(clock.run())
        assert clock.on_message(
            topics.clock_grant("plant"), grant_message(0, "plant", ["meter-a"], ["meter-a", "dso"])
        )
        assert not clock.on_message(READINGS + "meter-a", b"{}")
        assert (clock.now(), clock.step, clock.phase_granted) == (at(0), 0, False)
        assert clock.takes_part("meter-a")
        assert not clock.takes_part("edge-a")
        clock.on_message(topics.clock_grant("grid"), grant_message(0, "grid", ["dso"]))
        assert clock.phase_granted
        await asyncio.wait_for(clock.sleep_until(at(3)), 1)  # the grant came before: not missed
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(clock.sleep_until(at(3)), 0.2)  # no newer grant
        clock.idle(holding=True)
        await asyncio.sleep(0.18)
        sleepers = [asyncio.create_task(clock.sleep_until(at(k))) for k in (3, 5)]  # two tasks
        await asyncio.sleep(0.01)
        clock.idle(holding=False)  # its `next`: the earliest moment a task waits for
        await asyncio.sleep(0.05)
        assert not any(sleeper.done() for sleeper in sleepers)
        clock.on_message(topics.clock_grant("grid"), grant_message(3, "grid", ["dso"]))
        await asyncio.wait_for(asyncio.gather(*sleepers), 1)  # both woken (one early)
        assert clock.now() == at(3)
        clock.on_message(topics.CLOCK_STATUS, _status("ended").model_dump_json().encode())
        assert clock.ended
        await clock.leave()
        sender.cancel()
        return transport

    transport = run(scenario())
    dones = transport.dones()
    heartbeats = [d for d in dones if d.holding]
    assert 3 <= len(heartbeats) <= 5  # one at once, then every 0.05 s for 0.18 s
    assert all(d.step == 0 for d in heartbeats)
    assert [(d.step, d.next) for d in dones if not d.holding] == [(0, at(3))]
    assert ClockMember.model_validate_json(transport.published[-1][1]).state == "left"


def test_a_stale_end_of_an_earlier_day_is_not_this_days_end() -> None:
    clock = LockstepClock(Recorder(), "edge-a", "control", every_step=True)
    assert clock.on_message(topics.CLOCK_STATUS, _status("ended").model_dump_json().encode())
    assert not clock.ended
    with pytest.raises(RuntimeError, match="no lockstep grant"):
        clock.now()
    assert clock.on_message(topics.clock_grant("control"), b"not json")  # a clock topic: consumed, dropped
    assert clock.grant is None


def test_a_member_left_out_until_the_end_jumps_to_the_last_step() -> None:
    """A coordinator frozen past the granter's silence timeout misses the last steps: when it hears
    the day ended, its time is the last step's and its service's sleepers wake (before, it waited for
    ever for a grant that no longer comes)."""

    async def scenario() -> None:
        clock = LockstepClock(Recorder(), "dso", "grid")
        clock.on_message(topics.clock_grant("grid"), grant_message(3, "grid", ["dso"]))

        async def until(moment: datetime) -> None:  # how a service waits: sleep_until may wake early
            while clock.now() < moment:
                await clock.sleep_until(moment)

        due, beyond = asyncio.create_task(until(at(10))), asyncio.create_task(until(at(12)))
        await asyncio.sleep(0.01)
        clock.on_message(topics.CLOCK_STATUS, _status("ended", step=10).model_dump_json().encode())
        await asyncio.wait_for(due, 1)
        assert clock.ended
        assert clock.now() == at(10)
        await asyncio.sleep(0.05)
        assert not beyond.done()  # past the end: nothing comes
        beyond.cancel()

    run(scenario())


def _status(state: Literal["waiting", "running", "ended"], step: int = 0) -> ClockStatus:
    return ClockStatus(
        state=state,
        step=step,
        time=at(step),
        phase=None,
        waiting_for=[],
        silent=[],
        ts_wall=datetime.now(UTC),
    )


def test_a_member_waits_for_its_first_grant_rejoin_s_then_heartbeats_then_for_ever() -> None:
    clock = LockstepClock(Recorder(), "dso", "grid", heartbeat_s=0.5, rejoin_s=30.0)
    assert clock._quiet_timeout() == 30.0  # no grant yet: it will join again if none comes
    clock.on_message(topics.clock_grant("grid"), grant_message(0, "grid", ["dso"]))
    assert clock._quiet_timeout() is None  # granted, not holding: nothing to send
    clock.idle(holding=True)
    assert clock._quiet_timeout() == 0.5  # holding: heartbeats
    with pytest.raises(ValueError, match="rejoin_s > 0"):
        LockstepClock(Recorder(), "dso", "grid", rejoin_s=0)


def test_a_member_whose_join_and_subscription_the_broker_lost_gets_them_back_by_rejoining() -> None:
    """What a loaded demo showed once on the embedded broker: an edge connected, and the broker had
    neither its retained join nor its subscription, so it never heard a grant. Rejoining mends both."""

    async def scenario() -> tuple[LockstepClock, bytes | None]:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "edge-a") as member, MemoryTransport(broker, "granter") as granter:
            clock = LockstepClock(member, "edge-a", "control", every_step=True)
            await clock.start()
            await member.unsubscribe(topics.clock_grant("control"))  # the broker lost them
            await granter.publish(topics.clock_member("edge-a"), b"", retain=True)
            assert broker.retained(topics.clock_member("edge-a")) is None
            await granter.publish(
                topics.clock_grant("control"), grant_message(0, "control", ["edge-a"]), retain=True
            )
            await clock.rejoin()
            inbound = member.messages()
            while clock.grant is None:
                message = await asyncio.wait_for(anext(inbound), 1)
                clock.on_message(message.topic, message.payload)
            return clock, broker.retained(topics.clock_member("edge-a"))

    clock, joined = run(scenario())
    assert (clock.step, clock.phase_granted, clock.rejoins) == (0, True, 1)
    assert joined is not None
    assert ClockMember.model_validate_json(joined).state == "joined"
