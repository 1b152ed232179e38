"""The lockstep granter as a pure machine: events in, commands out; no broker, no event loop, no sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from p2pdoe.core import topics
from p2pdoe.core.lockstep import (
    Command,
    Done,
    Ended,
    Event,
    Granter,
    GranterConfig,
    Joined,
    Left,
    PublishGrant,
    PublishStatus,
    Report,
    Tick,
)
from p2pdoe.core.schemas.lockstep import ClockDone, ClockGrant, ClockMember, Phase, decode_lockstep

START = datetime(2024, 6, 1, tzinfo=UTC)
STEP_S = 60.0
SILENCE_S = 30.0
JOIN_S = 120.0
MEMBERS: dict[str, Phase] = {"meter-a": "plant", "edge-a": "control", "dso": "grid"}


def at(step: int) -> datetime:
    return START + timedelta(seconds=step * STEP_S)


class Bench:
    """A granter, its wall time and every command it returned."""

    def __init__(self, steps: int = 3, expected: dict[str, Phase] | None = None) -> None:
        members = MEMBERS if expected is None else expected
        self.granter = Granter(GranterConfig(START, STEP_S, at(steps), members, JOIN_S, SILENCE_S))
        self.wall_s = 1000.0
        self.log: list[Command] = []

    def feed(self, event: Event, after_s: float = 0.0) -> list[Command]:
        self.wall_s += after_s
        commands = self.granter.handle(event, self.wall_s)
        self.log += commands
        return commands

    def join_all(self, members: dict[str, Phase] = MEMBERS) -> list[Command]:
        return [c for name, phase in members.items() for c in self.feed(Joined(name, phase))]

    def done(self, name: str, after_s: float = 0.0, next: datetime | None = None) -> list[Command]:
        g = self.granter
        assert g.phase is not None
        return self.feed(Done(name, g.step, g.phase, next, holding=False), after_s)

    def finish_phase(self) -> list[Command]:
        """Every member of the latest grant says done."""
        latest = grants(self.log)[-1]
        return [c for name in latest.members for c in self.done(name)]


def grants(commands: list[Command]) -> list[ClockGrant]:
    return [c.grant for c in commands if isinstance(c, PublishGrant)]


def reports(commands: list[Command]) -> list[str]:
    return [c.text for c in commands if isinstance(c, Report)]


def last_status(commands: list[Command]) -> PublishStatus:
    return [c for c in commands if isinstance(c, PublishStatus)][-1]


def sequence(commands: list[Command]) -> list[tuple[int, str, list[str]]]:
    return [(g.step, g.phase, g.members) for g in grants(commands)]


def test_step_zero_waits_for_every_expected_member() -> None:
    bench = Bench()
    first = bench.feed(Joined("meter-a", "plant")) + bench.feed(Joined("dso", "grid"))
    assert grants(first) == []
    assert last_status(first).status.state == "waiting"
    assert last_status(first).status.waiting_for == ["edge-a"]
    out = bench.feed(Joined("edge-a", "control"))
    assert sequence(out) == [(0, "plant", ["meter-a"])]
    assert grants(out)[0].time == START
    assert grants(out)[0].live == ["dso", "edge-a", "meter-a"]
    assert last_status(out).status.state == "running"


def test_phases_run_in_order_and_each_waits_for_every_granted_member() -> None:
    bench = Bench(expected={**MEMBERS, "meter-b": "plant"})
    bench.join_all({**MEMBERS, "meter-b": "plant"})
    assert sequence(bench.log) == [(0, "plant", ["meter-a", "meter-b"])]
    assert grants(bench.done("meter-a")) == []  # meter-b still awaited
    assert last_status(bench.log).status.waiting_for == ["meter-b"]
    bench.done("meter-b")
    for _ in range(3):
        bench.finish_phase()
    assert sequence(bench.log) == [
        (0, "plant", ["meter-a", "meter-b"]),
        (0, "control", ["edge-a"]),
        (0, "grid", ["dso"]),
        (1, "plant", ["meter-a", "meter-b"]),
        (1, "control", ["edge-a"]),
    ]
    assert [g.time for g in grants(bench.log)] == [at(0)] * 3 + [at(1)] * 2


def test_a_member_is_granted_only_from_its_next_time() -> None:
    bench = Bench(steps=5)
    bench.join_all()
    bench.finish_phase()
    bench.finish_phase()
    bench.done("dso", next=at(2) + timedelta(seconds=1))  # needed between steps 2 and 3: step 3
    for _ in range(6):
        bench.finish_phase()
    phases = [(step, phase) for step, phase, _ in sequence(bench.log)]
    assert phases == [
        (0, "plant"), (0, "control"), (0, "grid"),
        (1, "plant"), (1, "control"),
        (2, "plant"), (2, "control"),
        (3, "plant"), (3, "control"), (3, "grid"),
    ]  # fmt: skip


def test_steps_nobody_needs_are_skipped() -> None:
    bench = Bench(steps=10)
    bench.join_all()
    for name in ("meter-a", "edge-a", "dso"):
        bench.done(name, next=at(7))
    assert sequence(bench.log)[-1] == (7, "plant", ["meter-a"])
    assert grants(bench.log)[-1].time == at(7)


def test_a_silent_member_is_reported_by_name_and_the_others_go_on() -> None:
    bench = Bench()
    bench.join_all()
    bench.finish_phase()
    bench.finish_phase()  # grid granted to dso, which never answers
    assert bench.granter.next_wakeup_wall_s() == bench.wall_s + SILENCE_S
    assert bench.feed(Tick(), after_s=SILENCE_S - 1) == []
    out = bench.feed(Tick(), after_s=1)
    assert any("dso" in text and "silent" in text for text in reports(out))
    assert sequence(out) == [(1, "plant", ["meter-a"])]
    assert grants(out)[0].live == ["edge-a", "meter-a"]
    assert last_status(out).status.silent == ["dso"]
    bench.finish_phase()
    assert sequence(bench.finish_phase()) == [(2, "plant", ["meter-a"])]  # no grid phase without dso


def test_a_dropped_member_is_left_out_of_a_grant_published_again() -> None:
    bench = Bench(expected={**MEMBERS, "meter-b": "plant"})
    bench.join_all({**MEMBERS, "meter-b": "plant"})
    bench.done("meter-a", after_s=SILENCE_S - 5)
    out = bench.feed(Tick(), after_s=5)  # meter-b silent; meter-a done: the phase is over
    assert sequence(out) == [(0, "control", ["edge-a"])]
    assert "meter-b" not in grants(out)[0].live

    bench = Bench(expected={**MEMBERS, "edge-b": "control"})
    bench.join_all({**MEMBERS, "edge-b": "control"})
    bench.finish_phase()
    bench.feed(Done("edge-a", 0, "control", None, holding=True), after_s=SILENCE_S - 1)
    out = bench.feed(Tick(), after_s=1)  # edge-b silent while edge-a still holds
    assert sequence(out) == [(0, "control", ["edge-a"])]
    assert grants(out)[0].live == ["dso", "edge-a", "meter-a"]
    assert ["edge-b" in text for text in reports(out)] == [True]


def test_heartbeats_keep_a_holding_member_in() -> None:
    bench = Bench()
    bench.join_all()
    bench.finish_phase()
    bench.feed(Done("edge-a", 0, "control", None, holding=True), after_s=SILENCE_S - 5)
    assert bench.feed(Tick(), after_s=10) == []  # 35 s after the grant, 10 s after the heartbeat
    assert sequence(bench.log)[-1] == (0, "control", ["edge-a"])
    out = bench.feed(Tick(), after_s=SILENCE_S - 10)
    assert sequence(out) == [(0, "grid", ["dso"])]
    assert last_status(out).status.silent == ["edge-a"]


def test_a_silent_member_that_speaks_again_is_back() -> None:
    bench = Bench(steps=5)
    bench.join_all()
    bench.feed(Tick(), after_s=SILENCE_S)  # meter-a silent at step 0
    bench.finish_phase()
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "control", ["edge-a"])  # no plant phase
    out = bench.feed(Done("meter-a", 0, "plant", None, holding=False))  # late, stale: but alive
    assert any("meter-a" in text for text in reports(out))
    assert last_status(out).status.silent == []
    bench.finish_phase()
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (2, "plant", ["meter-a"])
    assert grants(bench.log)[-1].live == ["dso", "edge-a", "meter-a"]
    assert bench.granter.ignored["stale"] == 1


def test_the_join_timeout_reports_the_missing_and_starts_without_them() -> None:
    bench = Bench()
    bench.feed(Joined("meter-a", "plant"))
    assert bench.granter.next_wakeup_wall_s() == bench.wall_s + JOIN_S
    assert bench.feed(Tick(), after_s=JOIN_S - 1) == []
    out = bench.feed(Tick(), after_s=1)
    assert any("dso" in text and "edge-a" in text for text in reports(out))
    assert sequence(out) == [(0, "plant", ["meter-a"])]
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "plant", ["meter-a"])  # no control, no grid


def test_a_member_joining_mid_day_takes_part_from_the_next_phase_grant() -> None:
    bench = Bench(steps=5)
    bench.join_all()
    bench.finish_phase()  # control of step 0 granted
    out = bench.feed(Joined("edge-b", "control"))
    assert any("edge-b" in text and "late" in text for text in reports(out))
    out += bench.feed(Joined("meter-b", "plant"))
    assert grants(out) == []
    bench.done("edge-a")  # edge-b was not awaited
    assert sequence(bench.log)[-1] == (0, "grid", ["dso"])
    assert "edge-b" in grants(bench.log)[-1].live
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "plant", ["meter-a", "meter-b"])
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "control", ["edge-a", "edge-b"])


def test_members_that_left_are_not_awaited() -> None:
    bench = Bench()
    bench.join_all()
    bench.finish_phase()
    out = bench.feed(Left("edge-a"))
    assert sequence(out) == [(0, "grid", ["dso"])]
    assert grants(out)[0].live == ["dso", "meter-a"]
    bench.finish_phase()
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "grid", ["dso"])


def test_old_steps_and_other_phases_are_ignored() -> None:
    bench = Bench()
    bench.join_all()
    assert bench.feed(Done("meter-a", 0, "control", None, holding=False)) == []
    assert bench.feed(Done("edge-a", 0, "plant", None, holding=False)) == []
    assert bench.feed(Done("ghost", 0, "plant", None, holding=False)) == []
    assert bench.granter.ignored == {"stale": 1, "not_awaited": 1, "unknown_member": 1}
    bench.finish_phase()
    assert sequence(bench.log)[-1] == (0, "control", ["edge-a"])
    assert bench.feed(Done("meter-a", 0, "plant", None, holding=False)) == []  # a duplicate, now stale


def test_time_is_held_while_nobody_is_live() -> None:
    bench = Bench(expected={"meter-a": "plant"})
    bench.feed(Joined("meter-a", "plant"))
    out = bench.feed(Tick(), after_s=SILENCE_S)
    assert grants(out) == []
    assert last_status(out).status.state == "waiting"
    out = bench.feed(Done("meter-a", 0, "plant", None, holding=True))  # back: the next phase
    assert sequence(out) == [(1, "plant", ["meter-a"])]


def test_the_day_ends_after_the_last_step() -> None:
    bench = Bench(steps=1)
    bench.join_all()
    for _ in range(5):
        bench.finish_phase()
    assert sequence(bench.log)[-1] == (1, "grid", ["dso"])
    out = bench.finish_phase()
    assert any(isinstance(c, Ended) for c in out)
    assert grants(out) == []
    assert last_status(out).status.state == "ended"
    assert last_status(out).status.time == at(1)
    assert bench.feed(Joined("late", "grid")) == []
    assert bench.granter.next_wakeup_wall_s() is None


def test_a_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="step_s"):
        GranterConfig(START, 0, at(1), MEMBERS)
    with pytest.raises(ValueError, match="before start"):
        GranterConfig(START, STEP_S, at(-1), MEMBERS)


def test_messages_round_trip_and_are_strict() -> None:
    done = ClockDone(member="edge-a", step=3, phase="control", next=at(4), holding=False)
    assert decode_lockstep(done.model_dump_json().encode()) == done
    member = ClockMember(member="meter-solar-18", phase="plant", state="joined")
    assert decode_lockstep(member.model_dump_json().encode()) == member
    with pytest.raises(ValidationError):
        ClockMember(member="a/b", phase="plant", state="joined")
    with pytest.raises(ValidationError):
        decode_lockstep(done.model_dump_json().replace("+00:00", "+01:00").replace("Z", "+01:00").encode())


def test_clock_topics_parse_back() -> None:
    assert topics.parse(topics.clock_grant("plant")) == topics.Topic("clock", "grant")
    assert topics.parse(topics.CLOCK_STATUS) == topics.Topic("clock", "status")
    assert topics.parse(topics.clock_member("dso")) == topics.Topic("clock", "member", member="dso")
    assert topics.parse(topics.clock_done("edge-1")) == topics.Topic("clock", "done", member="edge-1")
    assert topics.parse(topics.ROOT + "/clock/done") is None


def test_progress_on_the_status_is_rate_limited_but_state_changes_are_not() -> None:
    bench = Bench()
    bench.granter = Granter(
        GranterConfig(START, STEP_S, at(3), MEMBERS, JOIN_S, SILENCE_S, status_every_s=1.0)
    )
    bench.join_all()
    statuses_before = len([c for c in bench.log if isinstance(c, PublishStatus)])
    bench.finish_phase()  # progress within the same wall second: no new status
    assert len([c for c in bench.log if isinstance(c, PublishStatus)]) == statuses_before
    late = bench.feed(Tick(), after_s=1.5)  # a second later the progress goes out
    assert last_status(late).status.phase == "control"
    silent = bench.feed(Tick(), after_s=SILENCE_S)  # a silence is news at once
    assert last_status(silent).status.silent == ["edge-a"]
