"""Which envelope applies: the dynamic one while valid (cached through a lost coordinator), then the
retained default, then the fixed default; a skewed clock falls back with an alarm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import (
    CLOCK_SKEW,
    Choice,
    FallbackConfig,
    Heard,
    choose,
    describe_switch,
    is_switch,
)
from p2pdoe.core.schemas.runtime import Doe

T0 = datetime(2026, 6, 21, 12, tzinfo=UTC)
DYNAMIC = Doe.from_box("c1", "r1", T0, 900, -5.0, 5.0)
DEFAULT = Doe.from_box("c1", None, T0 - timedelta(hours=12), 86_400, -2.0, 3.0)
CONFIG = FallbackConfig(fixed_default=Box(-1.0, 1.0))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def box(choice: Choice) -> tuple[str, float, float]:
    return choice.kind, choice.lo_kw, choice.up_kw


def test_the_dynamic_envelope_applies_while_valid() -> None:
    choice = choose(Heard(DYNAMIC, DEFAULT, coordinator_online=True), CONFIG, at(60))
    assert box(choice) == ("dynamic", -5.0, 5.0)
    assert choice.alarm is None
    assert "round r1" in choice.reason


def test_after_its_expiry_the_default_applies() -> None:
    choice = choose(Heard(DYNAMIC, DEFAULT, coordinator_online=True), CONFIG, at(900))
    assert box(choice) == ("default", -2.0, 3.0)
    assert "expired" in choice.reason


def test_a_lost_coordinator_leaves_the_cached_envelope_in_force_until_it_expires() -> None:
    heard = Heard(DYNAMIC, DEFAULT, coordinator_online=False)
    cached = choose(heard, CONFIG, at(899))
    assert box(cached) == ("dynamic", -5.0, 5.0)
    assert "coordinator offline" in cached.reason
    assert box(choose(heard, CONFIG, at(900))) == ("default", -2.0, 3.0)


def test_a_site_that_never_heard_an_envelope_applies_the_fixed_default() -> None:
    choice = choose(Heard(), CONFIG, at(0))
    assert box(choice) == ("fixed_default", -1.0, 1.0)
    assert "no dynamic envelope received" in choice.reason
    assert "no default received" in choice.reason


def test_an_edge_restarted_while_the_coordinator_is_away_applies_the_saved_default() -> None:
    choice = choose(Heard(default=DEFAULT, coordinator_online=False), CONFIG, at(5))
    assert box(choice) == ("default", -2.0, 3.0)


def test_a_default_past_its_end_gives_way_to_the_fixed_default() -> None:
    choice = choose(Heard(DYNAMIC, DEFAULT), CONFIG, DEFAULT.end)
    assert box(choice) == ("fixed_default", -1.0, 1.0)
    assert "default expired" in choice.reason


def test_a_default_not_yet_started_is_not_applied() -> None:
    tomorrow = Doe.from_box("c1", None, at(3600), 86_400, -2.0, 3.0)
    choice = choose(Heard(default=tomorrow), CONFIG, at(0))
    assert choice.kind == "fixed_default"
    assert "starts at" in choice.reason


def test_a_roundless_envelope_on_the_dynamic_topic_is_reported_as_the_default() -> None:
    left_out = Doe.from_box("c1", None, T0, 900, -3.0, 4.0)
    assert box(choose(Heard(left_out, DEFAULT, True), CONFIG, at(1))) == ("default", -3.0, 4.0)


@pytest.mark.parametrize("skew_s", [61.0, -600.0])
def test_a_skewed_clock_falls_back_to_the_default_with_an_alarm(skew_s: float) -> None:
    choice = choose(Heard(DYNAMIC, DEFAULT, True, skew_s=skew_s), CONFIG, at(60))
    assert box(choice) == ("default", -2.0, 3.0)
    assert choice.alarm == CLOCK_SKEW
    assert "clock skew" in choice.reason


def test_a_skewed_clock_without_a_default_applies_the_fixed_default_with_an_alarm() -> None:
    choice = choose(Heard(DYNAMIC, None, True, skew_s=3600.0), CONFIG, at(60))
    assert box(choice) == ("fixed_default", -1.0, 1.0)
    assert choice.alarm == CLOCK_SKEW


def test_under_skew_the_default_is_judged_on_the_coordinators_clock() -> None:
    local_now = DEFAULT.end + timedelta(minutes=5)  # the local clock runs 10 minutes ahead
    assert choose(Heard(default=DEFAULT, skew_s=600.0), CONFIG, local_now).kind == "default"
    assert choose(Heard(default=DEFAULT, skew_s=240.0), CONFIG, local_now).kind == "fixed_default"
    # on an accelerated clock the skew is in wall seconds: 10 s at 60x put the local clock 10 min ahead
    fast = FallbackConfig(fixed_default=Box(-1.0, 1.0), skew_tolerance_s=5.0, speed=60.0)
    assert choose(Heard(default=DEFAULT, skew_s=10.0), fast, local_now).kind == "default"
    with pytest.raises(ValueError, match="speed"):
        FallbackConfig(fixed_default=Box(-1.0, 1.0), speed=0.0)


def test_a_skew_within_tolerance_or_unknown_is_no_alarm() -> None:
    for skew_s in (59.0, -60.0, None):
        choice = choose(Heard(DYNAMIC, DEFAULT, True, skew_s=skew_s), CONFIG, at(60))
        assert (choice.kind, choice.alarm) == ("dynamic", None)
    strict = FallbackConfig(Box(-1.0, 1.0), skew_tolerance_s=5.0)
    assert choose(Heard(DYNAMIC, DEFAULT, True, skew_s=6.0), strict, at(60)).alarm == CLOCK_SKEW


def test_the_fixed_default_is_never_unlimited() -> None:
    with pytest.raises(ValueError, match="finite"):
        FallbackConfig(fixed_default=Box(float("-inf"), float("inf")))
    with pytest.raises(ValueError, match="time zone"):
        choose(Heard(), CONFIG, datetime(2026, 6, 21, 12))


def test_switches_are_changes_of_kind_or_alarm() -> None:
    dynamic = choose(Heard(DYNAMIC, DEFAULT, True), CONFIG, at(60))
    next_interval = Doe.from_box("c1", "r1", at(900), 900, -4.0, 6.0)
    assert is_switch(None, dynamic)  # the first choice is published too
    assert not is_switch(dynamic, choose(Heard(next_interval, DEFAULT, True), CONFIG, at(960)))
    default = choose(Heard(DYNAMIC, DEFAULT, False), CONFIG, at(960))
    assert is_switch(dynamic, default)
    skewed = choose(Heard(DYNAMIC, DEFAULT, True, skew_s=120.0), CONFIG, at(960))
    assert skewed.kind == default.kind
    assert is_switch(default, skewed)  # the alarm is raised
    assert is_switch(skewed, default)  # and cleared
    assert describe_switch(dynamic, default).startswith("dynamic -> default [-2, 3] kW: ")
    assert describe_switch(default, skewed).endswith("[alarm clock_skew]")


def test_communications_lost_and_back_switch_dynamic_default_dynamic() -> None:
    """The coordinator's last will at 300 s, back at 1200 s with the next interval's envelope."""
    timeline: list[tuple[float, Heard]] = [
        (0, Heard(DYNAMIC, DEFAULT, True)),
        (300, Heard(DYNAMIC, DEFAULT, False)),
        (600, Heard(DYNAMIC, DEFAULT, False)),
        (900, Heard(DYNAMIC, DEFAULT, False)),
        (1200, Heard(Doe.from_box("c1", "r2", at(900), 900, -4.0, 6.0), DEFAULT, True)),
    ]
    previous: Choice | None = None
    switches: list[tuple[float, str]] = []
    for seconds, heard in timeline:
        choice = choose(heard, CONFIG, at(seconds))
        if is_switch(previous, choice):
            switches.append((seconds, choice.kind))
        previous = choice
    assert switches == [(0, "dynamic"), (900, "default"), (1200, "dynamic")]
