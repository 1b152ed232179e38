"""The lockstep clock's granter: co-simulation time grants, as a pure machine (no I/O, no clock reads).

Simulated time is a sequence of steps: step k is at t_k = start + k * step_s, for every t_k <= end.
Each step has up to three phases, in this order, and each member belongs to one of them:

- `plant`   (meter simulators): step the plant, publish the reading stamped t_k;
- `control` (edge agents): handle the reading, send set-points;
- `grid`    (the DSO coordinator): publish envelopes, run rounds while time is held.

Over MQTT (topics in p2pdoe.core.topics, messages in p2pdoe.core.schemas.lockstep):

- a member announces itself on `clock/member/<name>` (retained `ClockMember`, "joined" or "left";
  an empty retained payload also means gone);
- the granter publishes `clock/grant/<phase>` (retained, QoS 1): phase p of step k granted to `members`, the
  live members of p whose `next` is None or <= t_k; a phase nobody needs is skipped;
- each granted member answers on `clock/done/<name>` (QoS 1): `ClockDone(holding=false)` once it has
  finished, with `next`, the earliest time it next needs a grant (None: every step); while it is
  still working it sends `ClockDone(holding=true)` every `heartbeat_s` (a heartbeat);
- once every granted member of the phase has said done, the next phase is granted; after `grid`
  comes step k+1 (or, if no live member needs step k+1, the first step someone needs);
- the granter keeps `clock/status` (retained `ClockStatus`) up to date for people and monitors.

Step 0 waits until every expected member has joined, or `join_timeout_s` (counted from the first
event) has passed: then the missing are reported by name and the day starts without them. A granted
member that has sent neither done nor heartbeat for `silence_timeout_s` is reported by name and left
out until it speaks again (a done, a heartbeat or a join); if others of its phase are still awaited
the grant is published again without it (so an edge waiting for its meter's reading learns that it
will not come). A member that leaves is no longer awaited either. A member joining mid-step takes
part from the next phase grant. A done for an old step or another phase is ignored (counted in
`ignored`), but shows that its sender is alive. While no member at all is live, time is held.

A silent member is not `live` in the grants. After the last step the granter publishes the status
"ended" and clears the retained grant (as it does when it starts, so no member takes an earlier
run's grant for this one's).

`Granter.handle(event, wall_s)` takes one event and the wall time in seconds since the epoch (used
only for the join and silence timeouts and the status's `ts_wall`) and returns the commands for the
shell (p2pdoe.services.lockstep) to carry out; `next_wakeup_wall_s()` says when to send a `Tick`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from p2pdoe.core.schemas.lockstep import PHASES, ClockGrant, ClockStatus, Phase


@dataclass(frozen=True)
class GranterConfig:
    start: datetime  # t_0 (UTC)
    step_s: float
    end: datetime  # no step beyond it
    expected: Mapping[str, Phase]  # who must have joined before step 0, and in which phase
    join_timeout_s: float = 120.0
    silence_timeout_s: float = 30.0
    status_every_s: float = 0.0  # progress on the status at most this often (0: every change)

    def __post_init__(self) -> None:
        if self.start.utcoffset() is None or self.end.utcoffset() is None:
            raise ValueError("start and end need a time zone")
        if not self.step_s > 0:
            raise ValueError("step_s must be positive")
        if self.end < self.start:
            raise ValueError("end is before start")
        if not (self.join_timeout_s > 0 and self.silence_timeout_s > 0):
            raise ValueError("timeouts must be positive")

    def time(self, step: int) -> datetime:
        return (self.start + timedelta(seconds=step * self.step_s)).astimezone(UTC)


@dataclass(frozen=True)
class Joined:
    name: str
    phase: Phase


@dataclass(frozen=True)
class Left:
    name: str


@dataclass(frozen=True)
class Done:
    name: str
    step: int
    phase: Phase
    next: datetime | None
    holding: bool


@dataclass(frozen=True)
class Tick:
    """Nothing happened; only the wall time moved on (silence and join timeouts)."""


Event = Joined | Left | Done | Tick


@dataclass(frozen=True)
class PublishGrant:
    grant: ClockGrant


@dataclass(frozen=True)
class PublishStatus:
    status: ClockStatus


@dataclass(frozen=True)
class Report:
    """A line for the log: who went silent, who joined late or is missing, who is back."""

    text: str


@dataclass(frozen=True)
class Ended:
    """The last step is over."""


Command = PublishGrant | PublishStatus | Report | Ended
State = Literal["waiting", "running", "ended"]


@dataclass
class _Member:
    phase: Phase
    heard_s: float  # when it last spoke (or was last granted: patience starts at the grant)
    next: datetime | None = None
    silent: bool = False

    def needs(self, phase: Phase, moment: datetime) -> bool:
        return self.phase == phase and (self.next is None or self.next <= moment)


@dataclass
class Granter:
    config: GranterConfig
    state: State = "waiting"  # for step 0, then running, then ended
    step: int = 0
    phase_index: int = -1  # into PHASES; -1 before step 0's first phase
    ignored: Counter[str] = field(default_factory=Counter)  # events without effect, by reason
    _members: dict[str, _Member] = field(default_factory=dict, init=False)  # the joined
    _granted: list[str] = field(default_factory=list, init=False)  # this phase's grant (less the dropped)
    _awaited: set[str] = field(default_factory=set, init=False)  # granted, not done yet
    _origin_s: float | None = field(default=None, init=False)  # the first event's wall time
    _last_status: tuple[object, ...] | None = field(default=None, init=False)
    _status_wall_s: float = field(default=-math.inf, init=False)

    @property
    def phase(self) -> Phase | None:
        return PHASES[self.phase_index] if self.state == "running" and self.phase_index >= 0 else None

    def live(self) -> list[str]:
        return sorted(n for n, m in self._members.items() if not m.silent)

    def handle(self, event: Event, wall_s: float) -> list[Command]:
        if self._origin_s is None:
            self._origin_s = wall_s
        if self.state == "ended":
            self.ignored["ended"] += 1
            return []
        out: list[Command] = []
        if isinstance(event, Joined):
            out += self._joined(event, wall_s)
        elif isinstance(event, Left):
            out += self._left(event.name)
        elif isinstance(event, Done):
            out += self._done(event, wall_s)
        out += self._silences(wall_s)
        out += self._advance(wall_s)
        return out + self._status_if_changed(wall_s)

    def next_wakeup_wall_s(self) -> float | None:
        """The wall time of the next timeout (a join or silence deadline), or None."""
        if self.state == "waiting" and self._origin_s is not None:
            return self._origin_s + self.config.join_timeout_s
        if self.state != "running" or not self._awaited:
            return None
        return min(self._members[n].heard_s for n in self._awaited) + self.config.silence_timeout_s

    # -- events ----------------------------------------------------------------------------------

    def _joined(self, event: Joined, wall_s: float) -> list[Command]:
        out: list[Command] = []
        member = self._members.get(event.name)
        expected = self.config.expected.get(event.name)
        if member is None:
            self._members[event.name] = _Member(event.phase, wall_s)
            if self.state != "waiting":
                out.append(Report(f"{event.name} ({event.phase}) joined late, at step {self.step}"))
        else:
            out += self._spoke(event.name, member, wall_s)
            member.next = None  # a (re)joined member needs the next step
            if member.phase != event.phase:
                member.phase = event.phase
                out += self._without([event.name], f"changed to {event.phase}")
        if expected is not None and expected != event.phase:
            out.append(Report(f"{event.name} joined as {event.phase}, expected as {expected}"))
        return out

    def _left(self, name: str) -> list[Command]:
        if self._members.pop(name, None) is None:
            return []
        return self._without([name], "left")

    def _done(self, event: Done, wall_s: float) -> list[Command]:
        member = self._members.get(event.name)
        if member is None:
            self.ignored["unknown_member"] += 1
            return []
        out = self._spoke(event.name, member, wall_s)
        current = self.state == "running" and (event.step, event.phase) == (self.step, self.phase)
        if not current:
            self.ignored["stale"] += 1
        elif event.holding:
            pass  # a heartbeat: alive, still working
        elif event.name in self._awaited:
            self._awaited.discard(event.name)
            member.next = event.next
        else:
            self.ignored["not_awaited"] += 1
        return out

    def _spoke(self, name: str, member: _Member, wall_s: float) -> list[Command]:
        member.heard_s = wall_s
        if not member.silent:
            return []
        member.silent = False
        return [Report(f"{name} speaks again: it takes part from the next grant")]

    def _silences(self, wall_s: float) -> list[Command]:
        limit = self.config.silence_timeout_s
        quiet = sorted(n for n in self._awaited if wall_s - self._members[n].heard_s >= limit)
        for name in quiet:
            self._members[name].silent = True
        return self._without(quiet, f"silent for {limit:g} s")

    def _without(self, names: list[str], why: str) -> list[Command]:
        """`names` are no longer awaited in this phase: report them by name, and grant again without
        them if others still are awaited (they learn that the dropped will not deliver)."""
        dropped = sorted(n for n in names if n in self._awaited)
        self._granted = [n for n in self._granted if n not in names]
        self._awaited -= set(names)
        if not dropped:
            return []
        out: list[Command] = [Report(f"{', '.join(dropped)}: {why} {self._where()}; going on without")]
        if self._awaited:
            out.append(PublishGrant(self._grant_message()))
        return out

    # -- time --------------------------------------------------------------------------------------

    def _advance(self, wall_s: float) -> list[Command]:
        out: list[Command] = []
        if self.state == "waiting":
            if not self._may_start(wall_s):
                return []
            missing = sorted(set(self.config.expected) - set(self._members))
            if missing:
                out.append(Report(f"not joined after {self.config.join_timeout_s:g} s: {', '.join(missing)}"))
            self.state = "running"
        while self.state == "running" and not self._awaited and self.live():
            if not self._move_on():
                self.state, self._granted = "ended", []
                return [*out, Ended()]
            out += self._grant(wall_s)
        return out

    def _may_start(self, wall_s: float) -> bool:
        assert self._origin_s is not None
        joined = set(self.config.expected) <= set(self._members)
        return joined or wall_s - self._origin_s >= self.config.join_timeout_s

    def _move_on(self) -> bool:
        """To the next phase; after the last, to the next step anyone needs. False: past the end."""
        if self.phase_index + 1 < len(PHASES):
            self.phase_index += 1
            return True
        step = self._next_needed_step()
        if self.config.time(step) > self.config.end:
            return False
        self.step, self.phase_index = step, 0
        return True

    def _next_needed_step(self) -> int:
        wanted = [self._members[n].next for n in self.live()]
        if any(moment is None for moment in wanted):
            return self.step + 1
        earliest = min(m for m in wanted if m is not None)
        ahead_s = (earliest - self.config.start).total_seconds() / self.config.step_s
        return max(self.step + 1, math.ceil(ahead_s - 1e-9))

    def _grant(self, wall_s: float) -> list[Command]:
        phase, moment = PHASES[self.phase_index], self.config.time(self.step)
        self._granted = [n for n in self.live() if self._members[n].needs(phase, moment)]
        self._awaited = set(self._granted)
        for name in self._granted:
            self._members[name].heard_s = wall_s
        return [PublishGrant(self._grant_message())] if self._granted else []

    def _grant_message(self) -> ClockGrant:
        return ClockGrant(
            step=self.step,
            phase=PHASES[self.phase_index],
            time=self.config.time(self.step),
            members=list(self._granted),
            live=self.live(),
        )

    def _where(self) -> str:
        return f"(step {self.step}, {PHASES[self.phase_index]})"

    # -- status ------------------------------------------------------------------------------------

    def _status_if_changed(self, wall_s: float) -> list[Command]:
        """The status for people: at once when the state or the silent members change, otherwise at
        most every `status_every_s` (every member's progress would cost more than the steps)."""
        status = self._status(wall_s)
        key = (status.state, status.step, status.phase, status.waiting_for, status.silent)
        if key == self._last_status:
            return []
        urgent = self._last_status is None or key[0] != self._last_status[0] or key[4] != self._last_status[4]
        if not urgent and wall_s - self._status_wall_s < self.config.status_every_s:
            return []
        self._last_status, self._status_wall_s = key, wall_s
        return [PublishStatus(status)]

    def _status(self, wall_s: float) -> ClockStatus:
        holding = self.state == "running" and not self.live()
        if self.state == "waiting":
            waiting_for = sorted(set(self.config.expected) - set(self._members))
        else:
            waiting_for = sorted(self._awaited)
        return ClockStatus(
            state="waiting" if holding else self.state,
            step=self.step,
            time=self.config.time(self.step),
            phase=None if holding else self.phase,
            waiting_for=waiting_for,
            silent=sorted(n for n, m in self._members.items() if m.silent),
            ts_wall=datetime.fromtimestamp(wall_s, UTC),
        )
