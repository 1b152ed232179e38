"""Two days in a row, every service on the virtual clock and the in-memory broker (the default
scenario, hourly intervals, a reading a minute): the next day's day-ahead round at its gate closure
(noon) while today's rolling rounds go on, a clean turn at midnight at the edges, one results file
and summary per day, and every interval of every site settled exactly once, the coordinator's
settlements equal to the edge journals' to the cent."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from realtime_helpers import read_journal

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core.schemas.results import DaySummary, Results
from p2pdoe.io.scenarios import load_scenario

S = load_scenario("default")
DAYS = ("2026-06-21", "2026-06-22")


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[VirtualDay, str]:
    day = VirtualDay(S, tmp_path_factory.mktemp("two-days"), rate_s=60.0, days=2)
    handler, logger = _Lines(), logging.getLogger("dso_coordinator")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        day.run_until_end()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return day, "\n".join(handler.lines)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_each_day_is_agreed_ahead_run_and_kept_under_its_date(two_days: tuple[VirtualDay, str]) -> None:
    day, log = two_days
    assert day.exits["dso"] == [0]  # it stopped by itself after its two days
    # The second day's machine started at the first day's gate closure, before its rolling rounds ended.
    assert log.index("day 2026-06-22: its machine starts") < log.index("day 2026-06-21 is over")
    for date in DAYS:
        results = Results.model_validate_json((day.root / "results" / f"{date}.json").read_bytes())
        summary = DaySummary.model_validate_json((day.root / "results" / f"{date}.summary.json").read_bytes())
        assert results.start == f"{date}T00:00:00Z"
        assert results.runtime is not None
        assert results.runtime.attempts[-1].round == f"day-ahead-{date}"
        assert (summary.day_ahead_status, summary.sites_agreed) == ("converged", len(S.ids))
        assert (summary.settlements, summary.missing_settlements) == (len(S.ids) * 24, 0)
        assert summary.sustained_violations == 0
        assert summary.failed_rounds == 0


@pytest.mark.slow
def test_every_interval_of_both_days_is_settled_once_as_the_journals_have_it(
    two_days: tuple[VirtualDay, str],
) -> None:
    day, _ = two_days
    held = {}
    for date in DAYS:
        results = Results.model_validate_json((day.root / "results" / f"{date}.json").read_bytes())
        assert results.realtime is not None
        for x in results.realtime.settlements:
            assert (x.site, x.interval_start) not in held
            held[x.site, x.interval_start] = x
    starts = [S.start + timedelta(hours=h) for h in range(48)]
    expected = {(site, t.isoformat().replace("+00:00", "Z")) for site in S.ids for t in starts}
    assert set(held) == expected
    for site in S.ids:
        rows = read_journal(day.journal(site)).settlements
        assert len(rows) == 48
        for start, row in rows.items():
            key = (site, start.replace("+00:00", "Z"))
            x = held[key]
            assert x.measured_kwh == pytest.approx(float(row[1]), abs=1e-9)
            assert x.net_eur == pytest.approx(float(row[4]) - float(row[5]) + float(row[7]), abs=0.005)


def test_a_virtual_run_of_several_days_needs_whole_days(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole day"):
        VirtualDay(load_scenario("default", {"horizon": {"intervals": 12}}), tmp_path, days=2).run_until_end()
