"""`LockstepClock`: the member side of the lockstep clock (the protocol: p2pdoe.core.lockstep).

A service on a lockstep clock owns its transport and its one message loop, as always; the clock
only reads what the service hands it and publishes through the service's transport:

    clock = LockstepClock(transport, "edge-solar-18", "control", every_step=True)
    await clock.start()            # subscribe to the clock topics; publish "joined" (retained)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(clock.run())             # sends the dones and heartbeats
        tg.create_task(reader())                # for every message: if clock.on_message(...): continue
        await clock.ready()                     # the first grant: now() is known
        ...                                     # work; await clock.sleep_until(t); clock.idle(holding)
    await clock.leave()            # a clean stop: publish "left" (retained)

- `start()` does not read messages: the service's loop calls `on_message(topic, payload)` for every
  inbound message, and skips those for which it returns True (every `p2pdoe/v1/clock/...` topic).
- `now()` is the time of the latest grant heard, of any phase (a RuntimeError before the first).
- `sleep_until(moment)` returns at once if `now() >= moment`, or if a grant to this member came while
  no task was waiting in it (kept for the next call, once: a grant that came while the service's
  worker was busy is not missed). Otherwise it waits for the next grant of this member's phase that
  lists it and returns then, *possibly before `moment`*: a lockstep wake-up is the member's chance to
  do its work for the step and report it done. Callers loop: `while clock.now() < t: await
  clock.sleep_until(t)`. Called while `now() < moment`, it wakes in this member's own phase (a grid
  member asleep until t_k wakes at step k's grid grant, after plant and control).
- `idle(holding)`: call it when the service has handled everything it was given. With a grant of
  step k in hand and done(k) not sent yet: `holding=False` sends done(k, next). `next` is taken when
  `run()` sends it, so after the calling task yields: the earliest moment a `sleep_until` is waiting
  for then (else the latest one asked) if it is later than now(), else None; always None with
  `every_step` (edges handle every reading). `clock.idle(False); await clock.sleep_until(t)` thus
  reports t. `holding=True` sends heartbeats (one at once, then every `heartbeat_s` wall seconds)
  until done. Waiting in `sleep_until` alone reports nothing.
- `run()` also rejoins: with no grant heard `rejoin_s` (60) wall seconds after joining, and every
  `rejoin_s` until one comes, it subscribes and says "joined" again (a broker may have lost both).
- `takes_part(name)`: `name` is live in the latest grant (an edge holds for its meter's reading only
  when the meter takes part; the granter grants again without a member it dropped).
- `ended` / `until_ended()`: the granter said the day is over (after this, no grant comes and
  `sleep_until` keeps waiting); a status "ended" counts only once a grant has been seen, so a stale
  retained status of an earlier day is not taken for this one's end. A member that missed the last
  steps (left out while frozen or cut off) jumps to the last step's time then: `now()` is it, and
  the tasks in `sleep_until` wake.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime
from typing import Literal

from p2pdoe.core import topics
from p2pdoe.core.schemas.lockstep import (
    MEMBER_PATTERN,
    PHASES,
    ClockDone,
    ClockGrant,
    ClockMember,
    ClockStatus,
    Phase,
    decode_lockstep,
)
from p2pdoe.services.clock import ClockKind
from p2pdoe.services.transport import Transport

log = logging.getLogger(__name__)


class LockstepClock:
    """A `Clock` whose time moves only by grants of the lockstep granter."""

    kind: ClockKind = "lockstep"

    def __init__(
        self,
        transport: Transport,
        member: str,
        phase: Phase,
        *,
        every_step: bool = False,
        heartbeat_s: float = 2.0,
        rejoin_s: float = 60.0,
    ) -> None:
        if not re.match(MEMBER_PATTERN, member):
            raise ValueError(f"clock member name {member!r}: letters, digits and _.:- only")
        if phase not in PHASES or not (heartbeat_s > 0 and rejoin_s > 0):
            raise ValueError(
                f"a phase among {PHASES}, heartbeat_s > 0 and rejoin_s > 0, "
                f"not {phase!r}, {heartbeat_s}, {rejoin_s}"
            )
        self.transport, self.member, self.phase = transport, member, phase
        self.every_step, self.heartbeat_s, self.rejoin_s = every_step, heartbeat_s, rejoin_s
        self.grant: ClockGrant | None = None  # the latest heard
        self.status: ClockStatus | None = None
        self.grants_seen = self.dones_sent = self.heartbeats_sent = self.rejoins = 0
        self._granted_step: int | None = None  # the latest own-phase step granted to this member
        self._done_step: int | None = None
        self._holding_step: int | None = None
        self._undelivered = False  # a grant to this member came while no task was in sleep_until
        self._end: datetime | None = None  # the last step's time, once the day ended past this member
        self._asked: datetime | None = None  # the latest sleep_until moment
        self._sleeping: list[datetime] = []  # the moments sleep_until calls are waiting for now
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._ended = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()  # (step, holding)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the grant and status topics, then say "joined" (retained, and again after
        every reconnect). Reads nothing: feed `on_message`."""
        # QoS 0: a persistent session queues nothing of the clock while the member is away (only
        # the latest grant counts: it is retained, and sent again at every subscription)
        await self.transport.subscribe(topics.clock_grant(self.phase), qos=0)
        await self.transport.subscribe(topics.CLOCK_STATUS, qos=0)
        await self._announce("joined")

    async def rejoin(self) -> None:
        """No grant heard `rejoin_s` after joining: subscribe and say "joined" again. A broker that
        lost the subscription or the retained join (seen once with the embedded broker under load)
        then has both again, and a retained grant comes at once if the day has begun."""
        self.rejoins += 1
        log.warning(
            "%s: no clock grant heard %g s after joining; subscribing and announcing again (%d)",
            self.member, self.rejoin_s, self.rejoins,
        )  # fmt: skip
        await self.start()

    async def ready(self) -> None:
        """Until the first grant has been heard (through `on_message`)."""
        await self._ready.wait()

    async def leave(self) -> None:
        """A clean stop: say "left" (retained), so the granter stops waiting for this member."""
        await self._announce("left")

    async def run(self) -> None:
        """Publish the dones and heartbeats `idle` asks for; run it in the service's TaskGroup. A
        done's `next` is taken when it is sent: after the service's task has yielded, so
        `clock.idle(False); await clock.sleep_until(t)` reports t."""
        while True:
            try:
                step, holding = await asyncio.wait_for(self._outbox.get(), self._quiet_timeout())
            except TimeoutError:
                if self.grant is None:
                    await self.rejoin()
                    continue
                if self._holding_step is None:
                    continue
                step, holding = self._holding_step, True
            if holding:
                self.heartbeats_sent += 1
            done = ClockDone(
                member=self.member, step=step, phase=self.phase, next=self._next(), holding=holding
            )
            await self.transport.publish(
                topics.clock_done(self.member), done.model_dump_json().encode(), qos=1
            )

    async def until_ended(self) -> None:
        await self._ended.wait()

    # -- the Clock protocol -----------------------------------------------------------------------

    def now(self) -> datetime:
        if self.grant is None:
            raise RuntimeError("no lockstep grant heard yet: await ready() first")
        return self.grant.time if self._end is None else max(self.grant.time, self._end)

    async def sleep_until(self, moment: datetime) -> None:
        """Return at once if now() >= moment or a grant to this member came while no task waited
        here; else at the next grant to this member (maybe before `moment`)."""
        self._asked = moment
        if self._undelivered or (self.grant is not None and self.now() >= moment):
            self._undelivered = False
            return
        wake = self._wake
        self._sleeping.append(moment)
        try:
            await wake.wait()
        finally:
            self._sleeping.remove(moment)

    def expiry_s(self, until: datetime) -> int | None:
        return None  # the wall time of a simulated moment is unknown in lockstep

    def idle(self, holding: bool) -> None:
        step = self._granted_step
        if step is None or self._done_step == step:
            return
        if holding:
            if self._holding_step != step:
                self._holding_step = step
                self._outbox.put_nowait((step, True))
            return
        self._done_step, self._holding_step = step, None
        self.dones_sent += 1
        self._outbox.put_nowait((step, False))

    # -- for the service's logic ------------------------------------------------------------------

    @property
    def step(self) -> int | None:
        """The step of the latest grant heard (any phase)."""
        return None if self.grant is None else self.grant.step

    @property
    def phase_granted(self) -> bool:
        """A step of this member's phase is granted to it and not yet reported done."""
        return self._granted_step is not None and self._done_step != self._granted_step

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def takes_part(self, member: str) -> bool:
        return self.grant is not None and member in self.grant.live

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Take in a clock message (True); anything else is the service's (False)."""
        parsed = topics.parse(topic)
        if parsed is None or parsed.area != "clock":
            return False
        if parsed.kind in ("grant", "status") and payload:  # empty: a grant cleared, ignored
            self._take(topic, payload)
        return True

    # -- inside -----------------------------------------------------------------------------------

    def _take(self, topic: str, payload: bytes) -> None:
        try:
            message = decode_lockstep(payload)
        except ValueError as exc:  # a WireError or a ValidationError
            log.warning("%s: dropped a bad message on %s: %s", self.member, topic, exc)
            return
        if isinstance(message, ClockGrant) and topic == topics.clock_grant(message.phase):
            self._granted(message)
        elif isinstance(message, ClockStatus) and topic == topics.CLOCK_STATUS:
            self.status = message
            if message.state == "ended" and self.grants_seen:
                self._day_over(message.time)
        else:
            log.warning("%s: dropped a %s message on %s", self.member, message.kind, topic)

    def _day_over(self, last: datetime) -> None:
        """The granter ended the day. A member it had left out (frozen, cut off) and that missed the
        last steps jumps to the last one, so its service sees the day out rather than wait for ever
        for a grant that will not come."""
        assert self.grant is not None
        if last > self.grant.time:
            self._end = last
            self._wake.set()
            self._wake = asyncio.Event()
        self._ended.set()

    def _granted(self, grant: ClockGrant) -> None:
        self.grant = grant
        self.grants_seen += 1
        self._ready.set()
        if grant.phase != self.phase or self.member not in grant.members:
            return
        if grant.step != self._granted_step:
            self._granted_step, self._holding_step = grant.step, None
        if not self._sleeping:
            self._undelivered = True  # for the next sleep_until
        self._wake.set()  # every sleeper returns; later ones wait for the next grant
        self._wake = asyncio.Event()

    def _next(self) -> datetime | None:
        if self.every_step or self.grant is None:
            return None
        wanted = min(self._sleeping) if self._sleeping else self._asked
        return wanted if wanted is not None and wanted > self.grant.time else None

    def _quiet_timeout(self) -> float | None:
        """How long `run` waits for work: `rejoin_s` before the first grant, `heartbeat_s` while
        holding, else for ever."""
        if self.grant is None:
            return self.rejoin_s
        return self.heartbeat_s if self._holding_step is not None else None

    async def _announce(self, state: Literal["joined", "left"]) -> None:
        message = ClockMember(member=self.member, phase=self.phase, state=state).model_dump_json()
        await self.transport.publish_state(topics.clock_member(self.member), message.encode())
