"""The demo's verdict on a day whose timing went wrong: one error naming the cause and the fix."""

from __future__ import annotations

import pytest

from p2pdoe.cli.demo_realtime import judge_day
from p2pdoe.core.schemas.results import RealtimeInfo, Results
from p2pdoe.errors import P2PDoeError


def _results(late_s: float) -> Results:
    rt = RealtimeInfo.model_construct(day_ahead_late_s=late_s, speed=640.0, clock="scaled")
    return Results.model_construct(realtime=rt)


def test_a_day_ahead_round_that_ended_after_the_day_began_is_an_error_with_its_fix() -> None:
    with pytest.raises(P2PDoeError, match=r"ended 95 s .* after the day began") as caught:
        judge_day(_results(95.0), 20.0)
    assert "run without --speed" in str(caught.value)
    assert "--lead-s more than 20 s" in str(caught.value)


def test_a_day_ahead_round_in_time_passes() -> None:
    judge_day(_results(0.0), 20.0)
