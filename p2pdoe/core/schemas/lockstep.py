"""Wire messages of the lockstep clock (schema version 1); the protocol is in p2pdoe.core.lockstep.

Strict like every wire message (p2pdoe.core.schemas.messages): unknown keys, NaN, numbers as
strings and times without a time zone are refused; every time is UTC.

- `ClockMember`  p2pdoe/v1/clock/member/<name>, retained: a member joined or left (an empty retained
  payload also means gone).
- `ClockGrant`   p2pdoe/v1/clock/grant/<phase>, retained, QoS 1: phase `phase` of step `step` (simulated
  time `time`) is granted to `members`; `live` lists every live member of any phase.
- `ClockDone`    p2pdoe/v1/clock/done/<name>, QoS 1: `holding` false: the member finished step `step`
  of its phase and next needs a grant at `next` (None: every step); `holding` true: a heartbeat,
  still working on that step.
- `ClockStatus`  p2pdoe/v1/clock/status, retained: the granter's state, for people and monitors.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, field_validator

from p2pdoe.core.schemas.messages import Message
from p2pdoe.core.schemas.wire import Moment, checked_json

Phase = Literal["plant", "control", "grid"]
PHASES: tuple[Phase, ...] = ("plant", "control", "grid")  # the order within a step
MEMBER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"  # like a round id: no '/', '+' or '#'
MemberName = Annotated[str, Field(pattern=MEMBER_PATTERN)]
Step = Annotated[int, Field(ge=0)]


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.utcoffset() != timedelta(0):
        raise ValueError("times are given in UTC")
    return value


class ClockMember(Message):
    schema_version: Literal[1] = 1
    kind: Literal["clock_member"] = "clock_member"
    member: MemberName
    phase: Phase
    state: Literal["joined", "left"]


class ClockGrant(Message):
    schema_version: Literal[1] = 1
    kind: Literal["clock_grant"] = "clock_grant"
    step: Step
    phase: Phase
    time: Moment  # t_k = start + step * step_s
    members: list[MemberName]  # the live members of `phase` granted this step
    live: list[MemberName]  # every live member of any phase

    _time_utc = field_validator("time")(_utc)


class ClockDone(Message):
    schema_version: Literal[1] = 1
    kind: Literal["clock_done"] = "clock_done"
    member: MemberName
    step: Step
    phase: Phase
    next: Moment | None  # the earliest time it next needs a grant; None: every step
    holding: bool  # True: a heartbeat, still working on `step`

    _next_utc = field_validator("next")(_utc)


class ClockStatus(Message):
    schema_version: Literal[1] = 1
    kind: Literal["clock_status"] = "clock_status"
    state: Literal["waiting", "running", "ended"]
    step: Step
    time: Moment
    phase: Phase | None  # None while waiting to start or after the end
    waiting_for: list[MemberName]
    silent: list[MemberName]  # reported silent and left out until they speak again
    ts_wall: Moment  # wall time of this status, for people

    _utc_times = field_validator("time", "ts_wall")(_utc)


Lockstep = ClockMember | ClockGrant | ClockDone | ClockStatus
LOCKSTEP_MESSAGES: tuple[type[Message], ...] = (ClockMember, ClockGrant, ClockDone, ClockStatus)
LOCKSTEP_ADAPTER: TypeAdapter[Lockstep] = TypeAdapter(Annotated[Lockstep, Field(discriminator="kind")])


def decode_lockstep(payload: bytes) -> Lockstep:
    """One lockstep message, strictly decoded; a ValueError (WireError or ValidationError) otherwise."""
    return LOCKSTEP_ADAPTER.validate_json(checked_json(payload))
