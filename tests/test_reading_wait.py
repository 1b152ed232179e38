"""When an edge agent on a lockstep clock holds its step for the meter's reading (`ReadingWait`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from p2pdoe.core.edge.reading_wait import ReadingWait

T0 = datetime(2026, 6, 21, tzinfo=UTC)
STEP = timedelta(minutes=1)


def test_a_step_is_held_until_its_reading_comes() -> None:
    wait = ReadingWait()
    wait.reading_arrived(connections=1)
    assert wait.holds(T0, T0 + STEP, connections=1)
    wait.reading_arrived(connections=1)
    assert not wait.holds(T0 + STEP, T0 + STEP, connections=1)


def test_nothing_is_held_before_this_process_heard_a_reading() -> None:
    assert not ReadingWait().holds(None, T0, connections=1)
    assert not ReadingWait().holds(T0, T0 + STEP, connections=1)  # a journal's reading, not heard


def test_a_reading_lost_while_the_connection_was_down_is_not_waited_for() -> None:
    """The hang the lossy link found: the connection came back while the edge's clock still said the
    previous step (the plant phase had already published this step's reading, lost with the
    connection), so "renewed during this step" never held true and the day waited for ever."""
    wait = ReadingWait()
    wait.reading_arrived(connections=1)
    assert wait.holds(T0, T0 + STEP, connections=1)
    assert not wait.holds(T0, T0 + STEP, connections=2)  # renewed since the last reading
    assert not wait.holds(T0, T0 + 2 * STEP, connections=2)  # and in the steps after, until one comes
    wait.reading_arrived(connections=2)
    assert wait.holds(T0 + 2 * STEP, T0 + 3 * STEP, connections=2)  # then held as before
