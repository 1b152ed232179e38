"""The demo's verdict on a day whose timing went wrong, or that went on without some of its sites: one
error naming the cause and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdoe.cli.demo import judge_sites
from p2pdoe.cli.demo_realtime import judge_day
from p2pdoe.core.schemas.results import RealtimeInfo, Results, RuntimeInfo, SiteRuntime
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


def _runtime(*sites: tuple[str, str, str | None]) -> Results:
    rows = [SiteRuntime.model_construct(id=i, state=state, reason=reason) for i, state, reason in sites]
    return Results.model_construct(runtime=RuntimeInfo.model_construct(sites=rows))


def test_a_demo_whose_round_went_on_without_some_sites_names_them_and_their_log() -> None:
    results = _runtime(("a", "agreed", None), ("c", "excluded", "missed the deadline at iteration 3"))
    with pytest.raises(P2PDoeError) as caught:
        judge_sites(results, ["a", "b", "c"], Path("out/logs"))
    message = str(caught.value)
    assert message.startswith("2 of 3 sites took no part in the day-ahead agreement")
    assert "b (never registered), c (missed the deadline at iteration 3)" in message
    assert message.endswith(f"see {Path('out/logs/edge-b.log')}")


def test_a_demo_where_every_site_agreed_passes() -> None:
    judge_sites(_runtime(("a", "agreed", None), ("b", "agreed", None)), ["a", "b"], Path("logs"))
