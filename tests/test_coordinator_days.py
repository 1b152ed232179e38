"""The coordinator day after day (p2pdoe.core.coordinator.days), on stand-in day machines: the next
day opens at its gate closure, each message reaches the day it belongs to, the two days' deadlines
stay apart, tomorrow's default is published joined to today's, and the run ends after its days."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest

from p2pdoe.core import topics
from p2pdoe.core.calendar import Calendar, round_id
from p2pdoe.core.coordinator.commands import DayOver, Save
from p2pdoe.core.coordinator.days import CoordinatorDays
from p2pdoe.core.effects import Exit, Heard, Patience, PatienceOver, Relieve, Send, Unsubscribe, Woke
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, MeterReading, decode_runtime

CAL = Calendar("Europe/Amsterdam", 3600, "12:00")
D1, D2, D3 = date(2026, 6, 21), date(2026, 6, 22), date(2026, 6, 23)


@dataclass
class StandIn:
    """A day's machine as the supervisor sees it: it records what it hears and answers simply."""

    day: date
    events: list[Any] = field(default_factory=list)
    over: bool = False

    def __post_init__(self) -> None:
        start = CAL.start(self.day)
        profile = [-10.0 - self.day.day] * CAL.intervals(self.day)
        self.ctx = SimpleNamespace(
            start=start,
            rules=SimpleNamespace(round=round_id(self.day)),
            default_envelope=lambda site: Doe.from_profile(site, start, 3600, profile, [5.0] * len(profile)),
        )

    def start(self, now: datetime) -> list[object]:
        default = self.ctx.default_envelope("a")
        payload = default.model_dump_json().encode()
        return [
            Send(topics.site("a", "doe/default"), payload, state=True, until=default.end),
            Patience("registration", 30.0),
            Unsubscribe(topics.all_proposals()),
        ]

    def handle(self, event: object, now: datetime) -> list[object]:
        self.events.append(event)
        if isinstance(event, PatienceOver):
            return [Relieve(event.key), Save(cast(Any, "standing"))]
        if isinstance(event, Woke) and now >= CAL.end(self.day) and not self.over:
            self.over = True
            return [DayOver(cast(Any, None), cast(Any, self.ctx))]
        return []

    def next_wake(self) -> datetime | None:
        return None if self.over else CAL.end(self.day)

    def holding(self) -> bool:
        return False

    def heavy(self, event: object) -> bool:
        return False


def run(days: int | None = 3) -> tuple[CoordinatorDays, dict[date, StandIn]]:
    built: dict[date, StandIn] = {}

    def build(day: date, now: datetime) -> Any:
        built[day] = StandIn(day)
        return built[day]

    return CoordinatorDays(CAL, build, D1, days), built


def at(day: date, hh: int, mm: int = 0) -> datetime:
    return CAL.start(day) + timedelta(hours=hh, minutes=mm)


def test_the_next_day_opens_at_its_gate_closure_and_not_before() -> None:
    ops, built = run()
    ops.start(at(D1, 1))
    assert list(built) == [D1]
    gate = CAL.gate_closure_at(D2)
    assert gate == datetime(2026, 6, 21, 10, tzinfo=UTC)  # 12:00 in Amsterdam, summer time
    assert ops.next_wake() == gate
    assert ops.handle(Woke(), gate - timedelta(seconds=1)) == []
    assert list(built) == [D1]
    ops.handle(Woke(), gate)
    assert list(built) == [D1, D2]
    assert ops.next_wake() == CAL.end(D1)  # today's end comes first, then D3's gate closure
    ops.handle(Woke(), CAL.end(D1))
    assert ops.next_wake() == CAL.gate_closure_at(D3)


def test_a_start_after_the_gate_closure_opens_tomorrow_at_once() -> None:
    ops, built = run()
    ops.start(at(D1, 15))
    assert list(built) == [D1, D2]


def test_tomorrows_default_is_published_joined_to_todays_and_deadlines_carry_their_day() -> None:
    ops, built = run()
    first = ops.start(at(D1, 1))
    assert Patience("2026-06-21/registration", 30.0) in first
    assert not any(isinstance(c, Unsubscribe) for c in first)  # the other day still listens
    opened = ops.handle(Woke(), CAL.gate_closure_at(D2))
    assert Patience("2026-06-22/registration", 30.0) in opened
    (send,) = [c for c in opened if isinstance(c, Send)]
    joined = decode_runtime(send.payload)
    assert isinstance(joined, Doe)
    assert (joined.start, joined.end, send.until) == (CAL.start(D1), CAL.end(D2), CAL.end(D2))
    assert joined.box_at(at(D1, 23, 30)) == (-31.0, 5.0)  # today's box until midnight
    assert joined.box_at(at(D2, 0, 30)) == (-32.0, 5.0)  # then tomorrow's
    # A deadline reaches its own day, without its date; what it answers carries the date again.
    answer = ops.handle(PatienceOver("2026-06-22/registration"), at(D1, 12, 1))
    assert built[D2].events[-1] == PatienceOver("registration")
    assert PatienceOver("registration") not in built[D1].events
    assert Relieve("2026-06-22/registration") in answer
    assert Save(cast(Any, "standing"), D2) in answer


def reading(moment: datetime) -> bytes:
    return MeterReading(site="a", ts=moment, p_kw=1.0).model_dump_json().encode()


@pytest.mark.parametrize(
    ("topic", "payload", "days"),
    [
        (topics.proposal("day-ahead-2026-06-22", "a"), b"", [D2]),
        (topics.proposal("day-ahead-2026-06-22.2", "a"), b"", [D2]),
        (topics.report("day-ahead-2026-06-21-rt017", "a"), b"", [D1]),
        (topics.round_open("day-ahead"), b"{}", [D1]),  # another run's: today deletes it
        (topics.site("a", "meter"), reading(at(D1, 23, 59)), [D1]),
        (topics.site("a", "meter"), reading(at(D2, 0, 0)), [D2]),
        (topics.site("a", "meter"), b"not json", [D1]),  # dropped and counted once
        (topics.site("a", "register"), b"{}", [D1, D2]),
        (topics.site("a", "status"), b"{}", [D1, D2]),
    ],
)
def test_each_message_reaches_the_day_it_belongs_to(topic: str, payload: bytes, days: list[date]) -> None:
    ops, built = run()
    ops.start(at(D1, 15))
    ops.handle(Heard(topic, payload), at(D1, 16))
    assert [d for d in built if built[d].events] == days


def test_a_day_over_is_dropped_and_the_run_ends_after_its_days() -> None:
    ops, _ = run(days=2)
    ops.start(at(D1, 15))
    out = ops.handle(Woke(), CAL.end(D1))
    assert any(isinstance(c, DayOver) for c in out)
    assert ops.days_in_hand == [D2]
    assert ops.next_wake() == CAL.end(D2)  # no third day to open
    out = ops.handle(Woke(), CAL.end(D2))
    assert out[-1] == Exit(0)
    assert ops.finished == [D1, D2]


def test_run_until_stopped_keeps_opening_days() -> None:
    ops, built = run(days=None)
    ops.start(at(D1, 1))
    moment = at(D1, 1)
    for _ in range(10):
        moment = cast(datetime, ops.next_wake())
        out = ops.handle(Woke(), moment)
        assert not any(isinstance(c, Exit) for c in out)
    assert len(built) >= 5
    assert len(ops.days_in_hand) <= 2


def test_the_coordinators_days_are_real_machines_each_on_its_dates_configuration() -> None:
    from pathlib import Path

    from dso_coordinator.service import coordinator_machine
    from dso_coordinator.settings import CoordinatorSettings
    from p2pdoe.core.site import coordinator_config
    from p2pdoe.io.scenarios import load_scenario

    cfg = coordinator_config(load_scenario("default"))
    start = datetime(2026, 6, 21, tzinfo=UTC)
    settings = CoordinatorSettings(
        coordinator_config=Path("unused.json"), rolling=True, start="2026-06-21T00:00:00Z"
    )
    ops = coordinator_machine(cfg, settings, start + timedelta(hours=1), days=2, gate_closure="13:30")
    assert isinstance(ops, CoordinatorDays)
    first = ops.start(start + timedelta(hours=1))
    (today,) = ops.machines.values()
    assert (today.ctx.rules.round, today.ctx.start) == ("day-ahead-2026-06-21", start)
    assert Patience("2026-06-21/registration", settings.registration_timeout_s) in first
    gate = datetime(2026, 6, 21, 13, 30, tzinfo=UTC)
    assert ops.next_wake() == gate
    opened = ops.handle(Woke(), gate)
    tomorrow = ops.machines[D2]
    assert (tomorrow.ctx.rules.round, tomorrow.ctx.start) == (
        "day-ahead-2026-06-22",
        start + timedelta(days=1),
    )
    assert tomorrow.ctx.epoch == today.ctx.epoch  # one run: neither deletes the other's openings
    statuses = [
        decode_runtime(c.payload) for c in opened if isinstance(c, Send) and c.topic == topics.DSO_STATUS
    ]
    assert statuses, opened
    said = statuses[-1]
    assert isinstance(said, DsoStatus)  # one status for both days: today's, naming tomorrow's round
    assert (said.day, said.next_round, said.next_phase) == (
        date(2026, 6, 21),
        "day-ahead-2026-06-22",
        "registering",
    )
    defaults = [decode_runtime(c.payload) for c in opened if isinstance(c, Send) and "doe/default" in c.topic]
    assert len(defaults) == len(cfg.sites)
    for doe in defaults:
        assert isinstance(doe, Doe)
        assert (doe.start, doe.end) == (start, start + timedelta(days=2))
        assert doe.box_at(start + timedelta(hours=20)) == today.ctx.default_envelope(doe.site).box_at(
            start + timedelta(hours=20)
        )


def test_a_coordinator_restarted_on_a_later_day_runs_from_the_day_in_force_to_the_runs_last_day() -> None:
    from pathlib import Path

    from dso_coordinator.service import coordinator_machine
    from dso_coordinator.settings import CoordinatorSettings
    from p2pdoe.core.site import coordinator_config
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.services.settings import ConfigError

    cfg = coordinator_config(load_scenario("default"))
    start = datetime(2026, 6, 21, tzinfo=UTC)
    settings = CoordinatorSettings(
        coordinator_config=Path("unused.json"), rolling=True, start="2026-06-21T00:00:00Z"
    )
    restarted = start + timedelta(days=2, hours=9)
    ops = coordinator_machine(cfg, settings, restarted, days=7)
    assert isinstance(ops, CoordinatorDays)
    ops.start(restarted)
    (today,) = ops.machines.values()
    assert today.ctx.start == start + timedelta(days=2)
    assert ops.last == date(2026, 6, 27)  # the seventh day from the first, not from the restart
    with pytest.raises(ConfigError, match=r"7 day.* from 2026-06-21 are over"):
        coordinator_machine(cfg, settings, start + timedelta(days=7, hours=1), days=7)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"days": 2}, "need rolling"),
        ({"days": 2, "rolling": True, "hours": 4.0}, "no hours"),
        ({"days": 2, "rolling": True, "gate_closure": "noon"}, "HH:MM"),
    ],
)
def test_running_day_after_day_refuses_settings_it_cannot_keep(options: dict[str, Any], match: str) -> None:
    from pathlib import Path

    from pydantic import ValidationError

    from dso_coordinator.settings import CoordinatorSettings

    with pytest.raises(ValidationError, match=match):
        CoordinatorSettings(coordinator_config=Path("unused.json"), **options)
