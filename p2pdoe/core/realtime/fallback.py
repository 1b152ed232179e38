"""Which envelope a site applies now: a pure state machine over what the edge has heard, with the
time passed in. `choose` gives the envelope; `is_switch` tells the caller when to log the change
and publish it on the site's status topic.

Rules, first match wins:
1. Clock skew (local clock minus the coordinator's message timestamps) beyond the tolerance: no
   envelope's time window can be placed, so the dynamic envelope is not applied; the retained
   default applies if it is in force on the coordinator's clock (now - skew), else the fixed
   default; alarm "clock_skew" on every such choice. An unknown skew (nothing timestamped heard
   yet) is no alarm.
2. The cached dynamic envelope while `valid_at(now)`, whether or not the coordinator is online: on
   losing it (its last will), the cached envelope is honoured until it expires. One carrying no
   round (the coordinator's default for a site it left out of a round) is reported as "default".
3. The retained default while `valid_at(now)`.
4. The locally configured fixed default: a finite box, never "unlimited".
Whether the coordinator is online only words the reason: the choice follows from the envelopes and
the clock, so a coordinator that comes back is followed as soon as its envelopes arrive.

A default expires at its end like any envelope. The coordinator publishes it retained for its
whole horizon with the broker's message expiry at the same end, so a running edge and one
restarted from the broker's retained copy agree; a default meant to stand indefinitely is simply
published with a long duration. Past its end the DSO's safety analysis no longer covers it, and
the fixed default takes over.

CSIP-AUS compared: its DefaultDERControl applies whenever no active DERControl is in force, and a
cached DERControl is honoured until its end even with communications lost: rules 2 and 3 here. The
DefaultDERControl has no validity interval; ours has one (see above), and rule 4 is the
client-side safety net for a site that has never heard one, or whose default has lapsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.schemas.runtime import Doe

Kind = Literal["dynamic", "default", "fixed_default"]
CLOCK_SKEW = "clock_skew"


@dataclass(frozen=True)
class Heard:
    """What the edge knows now."""

    dynamic: Doe | None = None  # the cached envelope from the coordinator
    default: Doe | None = None  # the retained (or saved) default
    coordinator_online: bool = False  # from its status; its last will says offline
    skew_s: float | None = None  # local clock minus the coordinator's, in wall seconds; None: unknown


@dataclass(frozen=True)
class FallbackConfig:
    fixed_default: Box
    skew_tolerance_s: float = 60.0  # wall seconds
    speed: float = 1.0  # of the simulated clock: a wall second of skew is `speed` simulated seconds

    def __post_init__(self) -> None:
        if not self.skew_tolerance_s >= 0:
            raise ValueError(f"the clock skew tolerance must be >= 0, not {self.skew_tolerance_s}")
        if not self.speed > 0:
            raise ValueError(f"the clock's speed must be > 0, not {self.speed}")


@dataclass(frozen=True)
class Choice:
    kind: Kind
    lo_kw: float
    up_kw: float
    reason: str
    alarm: str | None = None

    @property
    def box(self) -> Box:
        return Box(self.lo_kw, self.up_kw)


def choose(heard: Heard, config: FallbackConfig, now: datetime) -> Choice:
    if now.utcoffset() is None:
        raise ValueError("the envelope's choice needs a time with a time zone")
    if heard.skew_s is not None and abs(heard.skew_s) > config.skew_tolerance_s:
        return _skewed(heard, config, now, heard.skew_s)
    dynamic, default = heard.dynamic, heard.default
    if dynamic is not None and dynamic.valid_at(now):
        return _from_dynamic(dynamic, heard.coordinator_online, now)
    missing = f"{_not_in_force('dynamic envelope', dynamic, now)}{_offline(heard.coordinator_online)}"
    if default is not None and default.valid_at(now):
        return _from_doe("default", default, now, f"{missing}: the retained default until {_at(default.end)}")
    why = f"{missing}, {_not_in_force('default', default, now)}: the fixed default"
    return _fixed(config, why)


def is_switch(previous: Choice | None, new: Choice) -> bool:
    """Log and publish when the kind of envelope or the alarm changes (the first choice too); a new
    box of the same kind, such as the next interval's envelope, is no switch."""
    return previous is None or (previous.kind, previous.alarm) != (new.kind, new.alarm)


def describe_switch(previous: Choice | None, new: Choice) -> str:
    was = "nothing" if previous is None else previous.kind
    alarm = "" if new.alarm is None else f" [alarm {new.alarm}]"
    return f"{was} -> {new.kind} [{new.lo_kw:g}, {new.up_kw:g}] kW: {new.reason}{alarm}"


def _skewed(heard: Heard, config: FallbackConfig, now: datetime, skew_s: float) -> Choice:
    skew = f"clock skew {skew_s:+.0f} s beyond {config.skew_tolerance_s:g} s"
    coordinator_now = now - timedelta(seconds=skew_s * config.speed)
    default = heard.default
    if default is not None and default.valid_at(coordinator_now):
        return _from_doe("default", default, coordinator_now, f"{skew}: the retained default", CLOCK_SKEW)
    return _fixed(config, f"{skew}, {_not_in_force('default', default, coordinator_now)}", CLOCK_SKEW)


def _from_dynamic(doe: Doe, online: bool, now: datetime) -> Choice:
    until = f"until {_at(doe.end)}"
    if not online:
        until = f"cached {until}, coordinator offline"
    if doe.round is None:
        return _from_doe("default", doe, now, f"the coordinator's default for this interval ({until})")
    return _from_doe("dynamic", doe, now, f"the envelope of round {doe.round} ({until})")


def _from_doe(kind: Kind, doe: Doe, moment: datetime, reason: str, alarm: str | None = None) -> Choice:
    """The box of `doe` in force at `moment` (a default may be a profile of boxes)."""
    return Choice(kind, *doe.box_at(moment), reason, alarm)


def _fixed(config: FallbackConfig, reason: str, alarm: str | None = None) -> Choice:
    box = config.fixed_default
    return Choice("fixed_default", box.lo_kw, box.up_kw, reason, alarm)


def _not_in_force(name: str, doe: Doe | None, now: datetime) -> str:
    if doe is None:
        return f"no {name} received"
    if now < doe.start:
        return f"the {name} starts at {_at(doe.start)}"
    return f"the {name} expired at {_at(doe.end)}"


def _offline(online: bool) -> str:
    return "" if online else " (coordinator offline)"


def _at(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
