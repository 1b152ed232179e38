"""The coordinator's pure core: its configuration, default envelopes, and rounds without some sites."""

from __future__ import annotations

import numpy as np
import pytest

from p2pdoe.core.agreement.coordination import (
    bounds_from_ranges,
    default_envelopes,
    facts_of,
    network_view,
    registration_problem,
    round_setup,
)
from p2pdoe.core.agreement.grid_solver import is_safe
from p2pdoe.core.agreement.setup import envelope_bounds_of
from p2pdoe.core.envelope import grid_view, safe_set
from p2pdoe.core.feeder_config import feeder_of
from p2pdoe.core.market import community_qps
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.runtime import Registration
from p2pdoe.core.site import coordinator_config, registration, site_config
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("default")


@pytest.fixture(scope="module")
def cfg(scenario: Scenario) -> CoordinatorConfig:
    return CoordinatorConfig.model_validate_json(coordinator_config(scenario).model_dump_json())


@pytest.fixture(scope="module")
def regs(scenario: Scenario) -> dict[str, Registration]:
    out = {}
    for c, data in enumerate(scenario.communities):
        reg = registration(site_config(scenario, c))
        out[data.id] = Registration.model_validate_json(reg.model_dump_json())  # through the wire
    return out


def test_the_feeder_survives_the_configuration_bit_for_bit(
    scenario: Scenario, cfg: CoordinatorConfig
) -> None:
    f, g = scenario.feeder, feeder_of(cfg.feeder)
    for name in ("bus_ids", "parent", "r_pu", "x_pu", "load_kw", "load_kvar", "rating_kva"):
        np.testing.assert_array_equal(getattr(f, name), getattr(g, name))
    assert (f.root, f.base_mva, f.base_kv) == (g.root, g.base_mva, g.base_kv)


def test_registrations_rebuild_the_scenarios_safe_set_exactly(
    scenario: Scenario, cfg: CoordinatorConfig, regs: dict[str, Registration]
) -> None:
    feeder = feeder_of(cfg.feeder)
    view = network_view(cfg, feeder, [facts_of(regs[c.id], feeder) for c in cfg.sites])
    ours, theirs = safe_set(view), safe_set(grid_view(scenario))
    for corner in ("upper", "lower"):
        np.testing.assert_array_equal(getattr(ours, corner).g, getattr(theirs, corner).g)
        np.testing.assert_array_equal(getattr(ours, corner).h, getattr(theirs, corner).h)


@pytest.mark.parametrize("policy", [Policy.DYNAMIC, Policy.STATIC])
def test_bounds_from_registered_ranges_equal_the_communities_own(
    scenario: Scenario, regs: dict[str, Registration], policy: Policy
) -> None:
    x_min = np.array([regs[i].technical_min_kw for i in scenario.ids])
    x_max = np.array([regs[i].technical_max_kw for i in scenario.ids])
    ours = bounds_from_ranges(x_min, x_max, static=policy is Policy.STATIC)
    theirs = envelope_bounds_of(tuple(community_qps(scenario, policy)))
    for name in ("lo_min", "lo_max", "up_min", "up_max"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_default_envelopes_are_safe_together_and_contain_zero(cfg: CoordinatorConfig) -> None:
    feeder = feeder_of(cfg.feeder)
    d = default_envelopes(cfg, feeder)
    from p2pdoe.core.agreement.coordination import connection_facts

    view = network_view(cfg, feeder, [connection_facts(s, feeder, cfg.intervals) for s in cfg.sites])
    assert d.lo_kw.shape == d.up_kw.shape == (len(cfg.sites), cfg.intervals)
    assert is_safe(safe_set(view), d.lo_kw, d.up_kw)
    assert np.all(d.lo_kw <= 1e-6)
    assert np.all(d.up_kw >= -1e-6)
    assert np.all(d.up_kw - d.lo_kw > 1.0)  # every site gets a usable box


def test_a_round_without_a_site_grants_boxes_safe_with_it_anywhere_in_its_default(
    cfg: CoordinatorConfig, regs: dict[str, Registration]
) -> None:
    feeder = feeder_of(cfg.feeder)
    d = default_envelopes(cfg, feeder)
    left_out = {"solar-18", "village-22"}
    setup = round_setup(cfg, feeder, regs, left_out, d, "r")
    assert set(setup.excluded) == left_out
    assert left_out.isdisjoint(setup.sites)
    assert all(len(p) == len(setup.sites) - 1 for p in setup.dso.plan.peers)  # full mesh without them
    grid = setup.dso.grid
    assert grid is not None
    horizon = cfg.intervals
    big = np.full((len(setup.sites), horizon), 1e4)
    grant = grid.solve(-big, big)  # every participant asks for everything
    ids = [s.id for s in cfg.sites]
    lo, up = d.lo_kw.copy(), d.up_kw.copy()
    for c, site in enumerate(setup.sites):
        lo[ids.index(site)], up[ids.index(site)] = grant.lo[c], grant.up[c]
    assert is_safe(safe_set(setup.view), lo, up)


def test_registrations_that_contradict_the_records_are_refused(
    cfg: CoordinatorConfig, regs: dict[str, Registration]
) -> None:
    good = regs["solar-18"]
    assert registration_problem(cfg, good) is None
    assert "bus" in str(registration_problem(cfg, good.model_copy(update={"bus": 2})))
    assert "peers" in str(registration_problem(cfg, good.model_copy(update={"peers": ["wind-25"]})))
    assert registration_problem(cfg, good.model_copy(update={"site": "stranger"})) == "not a connected site"
    ranges = ("technical_min_kw", "technical_max_kw", "reactive_min_kvar", "reactive_max_kvar")
    short = good.model_copy(update={k: getattr(good, k)[:3] for k in ranges})
    assert "intervals" in str(registration_problem(cfg, short))


def test_a_coordinator_config_with_an_asymmetric_graph_is_refused(cfg: CoordinatorConfig) -> None:
    doc = cfg.model_dump()
    doc["sites"][0]["peers"] = doc["sites"][0]["peers"][:-1]
    with pytest.raises(ValueError, match="symmetric"):
        CoordinatorConfig.model_validate(doc)


def test_the_days_start_keeps_the_profiles_clock_hours() -> None:
    from datetime import UTC, datetime

    from dso_coordinator.service import day_start
    from p2pdoe.errors import P2PDoeError

    now = datetime(2026, 11, 24, 13, 7, 30, tzinfo=UTC)
    midnight, six = "2026-06-21T00:00:00Z", "2026-06-21T06:00:00Z"
    assert day_start("today", midnight, 1.0, now) == datetime(2026, 11, 24, tzinfo=UTC)
    assert day_start("today", six, 1.0, now) == datetime(2026, 11, 24, 6, tzinfo=UTC)
    early = datetime(2026, 11, 24, 5, 0, tzinfo=UTC)  # before 06:00: the day began yesterday
    assert day_start("today", six, 1.0, early) == datetime(2026, 11, 23, 6, tzinfo=UTC)
    assert day_start("now", midnight, 0.25, now) == datetime(2026, 11, 24, 13, 0, tzinfo=UTC)
    assert day_start("scenario", midnight, 1.0, now) == datetime(2026, 6, 21, tzinfo=UTC)
    assert day_start("2026-12-01T00:00:00+01:00", midnight, 1.0, now) == datetime(
        2026, 11, 30, 23, tzinfo=UTC
    )
    with pytest.raises(P2PDoeError, match="needs a time zone"):
        day_start("2026-12-01T00:00:00", midnight, 1.0, now)
    with pytest.raises(P2PDoeError, match="not 'today'"):
        day_start("tomorrow", midnight, 1.0, now)
