"""The default envelopes' sharing rules: the maths on small cases with closed forms and against an LP,
then on the default scenario and a synthetic 20-community one, checked in AC."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog

from p2pdoe.analysis.network_check import ac_state
from p2pdoe.core.agreement.coordination import (
    Defaults,
    connection_facts,
    default_envelopes,
    network_view,
    shortfall_lines,
)
from p2pdoe.core.allocation import SHARINGS, TOL_KW, jain_index, share
from p2pdoe.core.envelope import GridView
from p2pdoe.core.feeder_config import feeder_of
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.site import coordinator_config, site_config
from p2pdoe.io.scenarios import load_scenario

# a lateral with sites 0 and 1 (at most 10 kW together), the trunk with all three (at most 100)
LATERAL = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), np.array([10.0, 100.0])


def test_equal_stops_at_one_level_and_max_min_fills_the_rest() -> None:
    g, h = LATERAL
    zero, cap, ones = np.zeros(3), np.full(3, 500.0), np.ones(3)
    np.testing.assert_allclose(share(g, h, zero, cap, ones, "equal"), [5, 5, 5])
    np.testing.assert_allclose(share(g, h, zero, cap, ones, "max-min"), [5, 5, 90])


def test_a_capped_site_leaves_its_share_to_the_others() -> None:
    g, h = np.array([[1.0, 1.0, 1.0]]), np.array([30.0])
    zero, ones = np.zeros(3), np.ones(3)
    cap = np.array([5.0, 100.0, 100.0])
    np.testing.assert_allclose(share(g, h, zero, cap, ones, "equal"), [5, 12.5, 12.5])
    np.testing.assert_allclose(share(g, h, zero, cap, cap, "proportional-capacity"), cap * 30 / 205)


def test_a_floor_is_kept_and_the_rest_shared_above_it() -> None:
    g, h = LATERAL
    floor, cap = np.array([8.0, 0.0, 0.0]), np.full(3, 500.0)
    np.testing.assert_allclose(share(g, h, floor, cap, np.ones(3), "max-min"), [9, 1, 90])


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, k = 8, 6
    g = rng.uniform(0, 1, (k, c)) * (rng.uniform(size=(k, c)) < 0.6)
    g[0] = rng.uniform(0.2, 1, c)  # a trunk row every site meets
    h = rng.uniform(50, 400, k)
    cap = rng.uniform(10, 200, c)
    w = rng.uniform(0.5, 3, c)
    return g, h, cap, w


@pytest.mark.parametrize("seed", range(12))
def test_max_min_is_feasible_pareto_efficient_and_its_least_share_is_the_lps(seed: int) -> None:
    g, h, cap, _ = _random_case(seed)
    r = share(g, h, np.zeros_like(cap), cap, np.ones_like(cap), "max-min")
    assert np.all(g @ r <= h + 1e-6)
    assert np.all(r >= 0)
    assert np.all(r <= cap + 1e-9)
    tight = g @ r >= h - 1e-6
    for c in range(cap.size):  # no site can rise alone
        assert r[c] >= cap[c] - 1e-6 or (g[tight, c] > 0).any()
    # the least share is the largest level t with r >= t feasible (an LP solved by HiGHS)
    n = cap.size
    lp = linprog(
        c=np.r_[np.zeros(n), -1.0],
        A_ub=np.block([[g, np.zeros((g.shape[0], 1))], [-np.eye(n), np.ones((n, 1))]]),
        b_ub=np.r_[h, np.zeros(n)],
        bounds=[(0, v) for v in cap] + [(0, None)],
    )
    assert lp.status == 0
    assert lp.fun is not None
    assert r.min() == pytest.approx(-lp.fun, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_equal_and_proportional_give_one_level_as_high_as_the_rows_allow(seed: int) -> None:
    g, h, cap, w = _random_case(seed)
    for sharing, weight in (("equal", np.ones_like(cap)), ("proportional-capacity", w)):
        r = share(g, h, np.zeros_like(cap), cap, weight, sharing)
        assert np.all(g @ r <= h + 1e-6)
        free = r < cap - 1e-6
        level = r[free] / weight[free]
        assert np.ptp(level) < 1e-6 if level.size else True
        assert (g @ r >= h - 1e-6).any() or not free.any()  # raised until a row binds


def test_jain_index_closed_forms() -> None:
    assert jain_index(np.array([3.0, 3.0, 3.0])) == pytest.approx(1.0)
    assert jain_index(np.array([6.0, 0.0, 0.0])) == pytest.approx(1 / 3)


def _defaults(
    s: Scenario, sharing: str, profile: bool = True
) -> tuple[CoordinatorConfig, Defaults, GridView]:
    update = {"default_sharing": sharing, "default_profile": profile}
    cfg = coordinator_config(s).model_copy(update=update)
    feeder = feeder_of(cfg.feeder)
    view = network_view(cfg, feeder, [connection_facts(x, feeder, cfg.intervals) for x in cfg.sites])
    return cfg, default_envelopes(cfg, feeder), view


@pytest.fixture(scope="module", params=["default", "synthetic-20"])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    return load_scenario(request.param)


@pytest.mark.parametrize("profile", [True, False], ids=["profile", "static"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_every_default_holds_the_need_to_stay_whole_or_is_named_and_is_safe_in_ac(
    scenario: Scenario, sharing: str, profile: bool
) -> None:
    cfg, d, view = _defaults(scenario, sharing, profile)
    need = np.array([x.stay_whole_import_kw for x in cfg.sites])  # (C, T)
    if not profile:
        assert np.ptp(d.lo_kw, axis=1).max() == 0.0  # one box all day
        need = np.repeat(need.max(axis=1, keepdims=True), cfg.intervals, axis=1)
    assert np.all(d.lo_kw <= 1e-9)  # a site may always do nothing
    assert np.all(d.up_kw >= -1e-9)
    short = {x.site: x for x in d.shortfalls}
    for c in range(len(cfg.sites)):
        missing = np.flatnonzero(d.lo_kw[c] > -need[c] + TOL_KW)
        assert missing.size == 0 or c in short
        if profile and missing.size:
            assert set(missing.tolist()) == set(short[c].intervals)  # named where it falls short
    for corner, x, q in (("lower", d.lo_kw, view.q_min_kvar), ("upper", d.up_kw, view.q_max_kvar)):
        state = ac_state(view, x, q, cfg.dt_h)
        assert state.voltage_violations == 0, corner
        assert state.thermal_violations == 0, corner


@pytest.mark.parametrize("profile", [True, False], ids=["profile", "static"])
def test_where_the_needs_cannot_all_be_met_the_ac_power_flow_agrees(
    scenario: Scenario, profile: bool
) -> None:
    cfg, d, view = _defaults(scenario, "max-min", profile)
    need = np.array([x.stay_whole_import_kw for x in cfg.sites])
    if not profile:
        need = np.repeat(need.max(axis=1, keepdims=True), cfg.intervals, axis=1)
    v = np.array(ac_state(view, -need, view.q_min_kvar, cfg.dt_h).voltage_pu).T  # (N, T)
    for x in d.shortfalls:
        kind, element = x.limit
        assert kind == "vmin"  # the default scenarios' binding limit
        assert x.granted_kw < x.need_kw
        for t in x.intervals:  # every need at once takes the bus below its limit plus margin, in AC
            assert v[element, t] < cfg.vmin_pu + cfg.vmin_margin_pu, (view.feeder.bus_ids[element], t)


def test_a_profile_holds_every_need_outside_the_evening_peak() -> None:
    s = load_scenario("default")
    _, d, _ = _defaults(s, "max-min")
    evening = {18, 19, 20}
    assert d.shortfalls
    assert all(set(x.intervals) <= evening for x in d.shortfalls)
    _, static, _ = _defaults(s, "max-min", profile=False)
    assert np.all(d.lo_kw[:, :6] < static.lo_kw[:, :6] - 1.0)  # the night allows more import


def test_the_default_scenarios_evening_peak_is_named() -> None:
    s = load_scenario("default")
    _, d, view = _defaults(s, "max-min", profile=False)
    lines = shortfall_lines(d, view.feeder, datetime(2025, 6, 21, tzinfo=UTC), 3600)
    assert len(lines) == len(d.shortfalls) >= 1
    assert any(line.startswith("the default envelope of campus-30 cannot hold") for line in lines)
    assert all("at 18:00-21:00 UTC" in line and "vmin limit at bus 18" in line for line in lines)


def test_the_fixed_default_has_the_sense_of_the_retained_one_and_holds_the_need() -> None:
    from edge_agent.service import fixed_default

    s = load_scenario("default")
    _, d, _ = _defaults(s, "max-min")
    for c, data in enumerate(s.communities):
        box = fixed_default(site_config(s, c))
        need = float(data.stay_whole_import_kw().max())
        assert box.lo_kw <= -need  # it may import what it needs to stay whole
        assert box.up_kw == 0.0
        assert d.lo_kw[c].min() < 0  # both allow import: the same sense
        assert box.lo_kw < 0


def test_the_rules_differ_where_they_should_on_twenty_communities() -> None:
    s = load_scenario("synthetic-20")
    widths = {}
    for sharing in SHARINGS:
        _, d, _ = _defaults(s, sharing)
        widths[sharing] = d.up_kw - d.lo_kw
    assert not np.allclose(widths["proportional-capacity"], widths["max-min"])
    # max-min wastes no room: no site's box is narrower than under equal
    assert np.all(widths["max-min"] >= widths["equal"] - 1e-6)


def test_the_coordinator_names_the_short_sites_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from dso_coordinator.service import build_machine
    from dso_coordinator.settings import CoordinatorSettings

    cfg = coordinator_config(load_scenario("default"))
    settings = CoordinatorSettings(coordinator_config=Path("unused.json"), default_sharing="equal")
    with caplog.at_level(logging.WARNING, logger="dso_coordinator"):
        machine = build_machine(cfg, settings, datetime.fromisoformat(cfg.start.replace("Z", "+00:00")))
    assert machine.ctx.cfg.default_sharing == "equal"
    named = [r.getMessage() for r in caplog.records if "needs to stay whole" in r.getMessage()]
    assert len(named) == len(machine.ctx.defaults.shortfalls) >= 1


def test_the_days_default_fairness_is_jains_index_of_the_widths_within_each_connection() -> None:
    """By hand on the default scenario's defaults: each site's box clipped to its connection
    capacity, its mean width over the day, Jain's index of those (as each day's summary gives it)."""
    from p2pdoe.analysis.defaults import default_fairness

    cfg, d, _ = _defaults(load_scenario("default"), "max-min")
    widths = []
    for c, site in enumerate(cfg.sites):
        up = np.minimum(d.up_kw[c], site.export_capacity_kw)
        lo = np.maximum(d.lo_kw[c], -site.import_capacity_kw)
        widths.append(float(np.clip(up - lo, 0.0, None).mean()))
    x = np.array(widths)
    assert default_fairness(cfg, d) == pytest.approx(x.sum() ** 2 / (len(x) * (x**2).sum()))
    imports = d.__class__(d.sites, np.full_like(d.lo_kw, -100.0), np.zeros_like(d.up_kw), d.need_kw)
    assert default_fairness(cfg, imports) == pytest.approx(1.0)  # every import capacity is over 100 kW
    one_way = d.__class__(d.sites, np.zeros_like(d.lo_kw), np.full_like(d.up_kw, 100.0), d.need_kw)
    assert default_fairness(cfg, one_way) == pytest.approx(5 / 6)  # campus-30 may not export: 0 kW
