"""Days of their own: three virtual days of every service where each date is its own scenario (its
seeded profiles). Each site's integrator publishes its forecast of a day at 10:00 the day before, the
meters follow that date's weather and load, the edges register each forecast's ranges, and every
day-ahead round checks the ranges of its own date."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from virtual_helpers import Tape

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core.schemas.messages import RoundOpen, decode, ranges_digest
from p2pdoe.core.schemas.results import DaySummary, Results
from p2pdoe.core.schemas.runtime import Registration
from p2pdoe.io.scenarios import load_scenario

pytestmark = pytest.mark.slow
S = load_scenario("default")
DAYS = 3


def on(day: date) -> object:
    return load_scenario("default", day=day)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[VirtualDay, Tape]:
    tape = Tape()
    w = VirtualDay(S, tmp_path_factory.mktemp("dated"), rate_s=60.0, days=DAYS, record=tape, dated=on)  # type: ignore[arg-type]
    tape.day = w
    w.run_until_end()
    return w, tape


def _dates(w: VirtualDay) -> list[str]:
    return [(w.start + timedelta(days=d)).date().isoformat() for d in range(DAYS)]


def test_every_day_of_its_own_is_agreed_settled_and_kept_inside_its_envelopes(
    run: tuple[VirtualDay, Tape],
) -> None:
    w, _ = run
    assert w.exits["dso"] == [0]
    for day in _dates(w):
        summary = DaySummary.model_validate_json((w.root / "results" / f"{day}.summary.json").read_bytes())
        assert summary.day_ahead_status == "converged", day
        assert (summary.settlements, summary.missing_settlements) == (len(S.ids) * 24, 0), day
        assert summary.sustained_violations == 0, day


def test_the_days_differ_as_their_dates_scenarios_do(run: tuple[VirtualDay, Tape]) -> None:
    """Read by clock hour alone the days were identical; now each agrees on its own date's."""
    w, _ = run
    objectives = []
    for day in _dates(w):
        results = Results.model_validate_json((w.root / "results" / f"{day}.json").read_bytes())
        objectives.append(results.objective_eur)
    gaps = [abs(objectives[i] - objectives[j]) for i in range(DAYS) for j in range(i)]
    assert min(gaps) > 1.0, objectives


def test_each_days_rounds_check_the_ranges_of_its_own_forecast(run: tuple[VirtualDay, Tape]) -> None:
    """Every day-ahead round names, for every site, the ranges the site registered for that date
    from its forecast, not those of the configured day."""
    w, tape = run
    latest: dict[tuple[str, object], Registration] = {}
    for h in tape.of(Registration):
        for d in h.msg.days:
            latest[h.msg.site, d.start] = h.msg
    openings = [decode(p) for t, p in tape.raw if t.endswith("/open") and p]
    day_ahead = [m for m in openings if isinstance(m, RoundOpen) and m.intervals == S.horizon]
    assert len({m.start for m in day_ahead}) == DAYS
    for m in day_ahead:
        k = next(
            k for k, s in enumerate(w.dated_days) if s.start.isoformat().replace("+00:00", "Z") == m.start
        )
        for site in S.ids:
            reg = latest[site, w.dated_days[k].start]
            own = next(d for d in reg.days if d.start == w.dated_days[k].start)
            assert m.ranges[site] == ranges_digest(own.technical_min_kw, own.technical_max_kw), (
                m.round,
                site,
            )
