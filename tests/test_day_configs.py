"""The configurations of any date from those of one typical day: every series by local clock hour,
checked against the scenario of that date where the two must agree (tariffs and a noiseless
background load follow the clock alone), and the configurations stay valid on 23 and 25 h days."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from p2pdoe.core.calendar import Calendar
from p2pdoe.core.day_configs import clock_hour_map, coordinator_config_on, site_config_on
from p2pdoe.core.site import coordinator_config, registration, site_config
from p2pdoe.io.scenarios import load_scenario

AMSTERDAM = {"horizon": {"timezone": "Europe/Amsterdam", "start": "2026-06-20T22:00:00Z"}}
QUARTERS = {"horizon": {**AMSTERDAM["horizon"], "intervals": 96, "dt_h": 0.25}}
SPRING, AUTUMN, SUMMER = date(2026, 3, 29), date(2026, 10, 25), date(2026, 7, 14)


def test_the_typical_day_on_its_own_date_is_itself() -> None:
    s = load_scenario("default", AMSTERDAM)
    for c in range(len(s.ids)):
        assert site_config_on(site_config(s, c), date(2026, 6, 21)) == site_config(s, c)
    assert coordinator_config_on(coordinator_config(s), date(2026, 6, 21)) == coordinator_config(s)


def test_an_utc_scenario_starts_at_utc_midnight_and_an_amsterdam_one_at_local_midnight() -> None:
    assert site_config(load_scenario("default"), 0).start == "2026-06-21T00:00:00Z"
    s = load_scenario("default", AMSTERDAM)
    assert site_config(s, 0).timezone == coordinator_config(s).timezone == "Europe/Amsterdam"
    # Its own horizon (from 22:00 UTC) follows the local clock: the 07:00 tariff step is at
    # interval 7, 05:00 UTC in summer, not at 07:00 UTC.
    assert s.price_import[6:8].tolist() == [0.16, 0.22]


@pytest.mark.parametrize(("day", "intervals"), [(SPRING, 92), (AUTUMN, 100), (SUMMER, 96)])
def test_tariffs_and_background_load_follow_the_clock_as_the_scenario_of_that_date_does(
    day: date, intervals: int
) -> None:
    typical = load_scenario("default", QUARTERS)
    dated = load_scenario("default", QUARTERS, day=day)
    cfg = coordinator_config_on(coordinator_config(typical), day)
    truth = coordinator_config(dated)
    assert (cfg.intervals, cfg.start) == (intervals, truth.start)
    np.testing.assert_allclose(cfg.price_import_eur_per_kwh, truth.price_import_eur_per_kwh)
    np.testing.assert_allclose(cfg.background_kw, truth.background_kw)  # its profile has no noise
    site = site_config_on(site_config(typical, 0), day)
    np.testing.assert_allclose(site.price_import_eur_per_kwh, site_config(dated, 0).price_import_eur_per_kwh)


def test_a_25_hour_day_repeats_the_hour_after_two_and_a_23_hour_day_skips_it() -> None:
    typical = site_config(load_scenario("default", AMSTERDAM), 1)
    load = typical.community.fixed_load_kw
    assert site_config_on(typical, AUTUMN).community.fixed_load_kw == [*load[:3], load[2], *load[3:]]
    assert site_config_on(typical, SPRING).community.fixed_load_kw == [*load[:2], *load[3:]]


def test_the_flexible_energy_scales_with_the_hours_of_the_day() -> None:
    s = load_scenario("default", AMSTERDAM)
    c = next(k for k in range(len(s.ids)) if s.communities[k].flex.energy_kwh > 0)
    typical = site_config(s, c)
    for day, hours in ((SPRING, 23), (AUTUMN, 25), (SUMMER, 24)):
        flex = site_config_on(typical, day).community.flexible_load
        assert flex.energy_kwh == pytest.approx(typical.community.flexible_load.energy_kwh * hours / 24)
        assert flex.min_kw * hours <= flex.energy_kwh <= flex.max_kw * hours  # still deliverable


def test_a_site_registers_ranges_of_its_days_length() -> None:
    typical = site_config(load_scenario("default", AMSTERDAM), 0)
    assert len(registration(site_config_on(typical, SPRING)).technical_min_kw) == 23


def test_the_nearest_clock_hour_wraps_around_midnight() -> None:
    cal = Calendar("UTC", 3600)
    k = clock_hour_map(cal, "2026-06-21T00:00:00Z", 24, date(2026, 6, 22))
    assert k.tolist() == list(range(24))
    shifted = clock_hour_map(cal, "2026-06-21T01:00:00Z", 24, date(2026, 6, 22))
    assert shifted.tolist() == [23, *range(23)]  # 00:30 is the typical day's last interval


def test_a_sites_registration_read_on_another_date_is_that_dates_own() -> None:
    """The coordinator maps a site's registration (its configured day) onto its day by clock hour;
    the site's configuration of that date gives the same ranges, computed from its series."""
    from p2pdoe.core.coordinator.sites import SiteRegistry
    from p2pdoe.core.day_configs import registration_on

    typical = load_scenario("default", QUARTERS)
    cfg = coordinator_config(typical)
    for day in (SPRING, AUTUMN, SUMMER):
        day_cfg = coordinator_config_on(cfg, day)
        for c in range(len(typical.ids)):
            mapped = registration_on(registration(site_config(typical, c)), day_cfg)
            own = registration(site_config_on(site_config(typical, c), day))
            assert mapped == own
        registry = SiteRegistry(day_cfg)
        assert registry.registered(registration(site_config(typical, 0)))  # 96 ranges, read on its day
        unplaced = registration(site_config(typical, 0)).model_copy(update={"start": None})
        assert registry.registered(unplaced) == (day == SUMMER)  # 96 ranges for a 92 or 100 day: refused


def test_a_scenario_forecast_strings_each_dates_own_profiles_together() -> None:
    from datetime import timedelta

    from p2pdoe.core.day_configs import scenario_forecast

    days = [load_scenario("default", day=date(2026, 6, 21 + k)) for k in range(3)]
    site = days[0].ids[1]
    issued = days[0].start - timedelta(hours=12)
    f = scenario_forecast(days, site, issued)
    assert (f.start, f.step_s, f.steps, f.issued) == (days[0].start, 3600, 72, issued)
    for k, d in enumerate(days):
        np.testing.assert_allclose(f.fixed_load_kw[24 * k : 24 * (k + 1)], d.communities[1].fixed_load_kw)  # type: ignore[index]
    assert f.fixed_load_kw[:24] != f.fixed_load_kw[24:48]  # type: ignore[index]  # each date its own seeds
    with pytest.raises(ValueError, match="do not follow one another"):
        scenario_forecast([days[0], days[2]], site, issued)
