"""A week without a person: seven days of every service on the virtual clock and the in-memory broker
(the default scenario, hourly intervals, a reading a minute), with the coordinator killed on day 3
and started again from its checkpoint, an edge agent killed on day 5 and started again, and the
broker restarted on day 6. Every interval of every site is settled exactly once, the coordinator's
settlements equal the edge journals' to the cent, no sustained violation, one results file per day."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import pytest
from realtime_helpers import read_journal

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core.schemas.results import DaySummary, Results
from p2pdoe.io.scenarios import load_scenario

# the week's fixture runs in its first test's setup: about 2 minutes idle, 20 under four busy processes
# on two cores. The guard is for a hang only; pytest-timeout's signal lands in whatever task runs, and
# the VirtualTimeLoop then ends the run with it (p2pdoe.services.clock).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
S = load_scenario("default")
DAYS = int(os.environ.get("P2PDOE_WEEK_DAYS", "7"))
COORDINATOR_DAY, EDGE_DAY, BROKER_DAY = (3, 5, 6) if DAYS == 7 else (2, 3, 4)
EDGE = S.ids[2]


def _moment(day: int, hours: float) -> timedelta:
    return timedelta(days=day - 1, hours=hours)


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> VirtualDay:
    root = tmp_path_factory.mktemp("week")
    checkpoint = root / "state" / "checkpoint.json"
    w = VirtualDay(S, root, rate_s=60.0, days=DAYS, dso_options={"checkpoint": checkpoint})

    async def coordinator_dies() -> None:
        w.kill("dso")
        await asyncio.sleep(600.0)  # ten minutes without a coordinator
        w.start_coordinator()

    async def edge_dies() -> None:
        w.kill(f"edge-{EDGE}")
        await asyncio.sleep(900.0)  # a quarter of an hour without the site's controller
        w.start_edge(EDGE)

    w.at(_moment(COORDINATOR_DAY, 9.4), coordinator_dies)
    w.at(_moment(EDGE_DAY, 14.3), edge_dies)
    w.at(_moment(BROKER_DAY, 17.55), lambda: w.outage(120.0))
    w.run_until_end()
    return w


def _dates(w: VirtualDay) -> list[str]:
    return [(w.start + timedelta(days=d)).date().isoformat() for d in range(DAYS)]


def test_the_week_runs_to_its_end_with_one_results_file_per_day(week: VirtualDay) -> None:
    assert week.exits["dso"] == [-1, 0]  # killed once, then stopped by itself after the week
    files = sorted(p.name for p in (week.root / "results").glob("*.json") if ".summary" not in p.name)
    assert files == [f"{d}.json" for d in _dates(week)]
    for date in _dates(week):
        kept = week.root / "results" / f"{date}.summary.json"
        summary = DaySummary.model_validate_json(kept.read_bytes())
        assert (summary.settlements, summary.missing_settlements) == (len(S.ids) * 24, 0), date
        assert summary.sustained_violations == 0, date
        assert summary.day_ahead_status == "converged", date


def test_every_interval_of_the_week_is_settled_once_as_the_journals_have_it(week: VirtualDay) -> None:
    held = {}
    for date in _dates(week):
        results = Results.model_validate_json((week.root / "results" / f"{date}.json").read_bytes())
        assert results.realtime is not None
        for x in results.realtime.settlements:
            assert (x.site, x.interval_start) not in held, (x.site, x.interval_start)
            held[x.site, x.interval_start] = x
    starts = [S.start + timedelta(hours=h) for h in range(24 * DAYS)]
    assert set(held) == {(s, t.isoformat().replace("+00:00", "Z")) for s in S.ids for t in starts}
    for site in S.ids:
        rows = read_journal(week.journal(site)).settlements
        assert len(rows) == 24 * DAYS
        for start, row in rows.items():
            x = held[site, start.replace("+00:00", "Z")]
            assert x.measured_kwh == pytest.approx(float(row[1]), abs=1e-9)
            assert round(x.net_eur, 2) == round(float(row[4]) - float(row[5]) + float(row[7]), 2)


def test_the_restarted_edge_ran_on(week: VirtualDay) -> None:
    assert week.exits[f"edge-{EDGE}"][0] == -1  # the killed run
    assert len(week.exits[f"edge-{EDGE}"]) == 2
