"""Synthetic scenarios (p2pdoe.io.synthetic): names, errors, feasibility, determinism, totals."""

from __future__ import annotations

import numpy as np
import pytest

from p2pdoe.core.solution import Policy
from p2pdoe.errors import ScenarioError
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.synthetic import synthetic_from_name, synthetic_spec
from p2pdoe.reference.centralized import solve_centralized


@pytest.mark.parametrize(
    ("name", "communities", "max_peers"),
    [("synthetic-5", 5, None), ("synthetic-12-peers3", 12, 3), ("synthetic-8-seed2", 8, None)],
)
def test_names_parse(name: str, communities: int, max_peers: int | None) -> None:
    s = load_scenario(name)
    assert s.name == name
    assert len(s.communities) == communities
    degrees = [len(p) for p in s.market.peers]
    if max_peers is None:
        assert degrees == [communities - 1] * communities
    else:
        assert min(degrees) >= max_peers
        assert sum(degrees) < communities * (communities - 1)
    for c, partners in enumerate(s.market.peers):
        assert all(c in s.market.peers[m] for m in partners)


def test_not_synthetic_names_are_left_alone() -> None:
    assert synthetic_from_name("default") is None
    assert synthetic_from_name("my-synthetic-5.yaml") is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("synthetic-", "synthetic-N[-peersK][-seedS]"),
        ("synthetic-ten", "synthetic-N[-peersK][-seedS]"),
        ("synthetic-10-foo", "synthetic-N[-peersK][-seedS]"),
        ("synthetic-10-peers", "synthetic-N[-peersK][-seedS]"),
        ("synthetic-1", "2 to 500 communities, not 1"),
        ("synthetic-501", "2 to 500 communities, not 501"),
        ("synthetic-10-peers0", "max_peers is at least 1, not 0"),
        ("synthetic-10-peers2-peers3", "-peers is given twice"),
    ],
)
def test_bad_names_give_one_clear_line(name: str, says: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(name)
    message = str(info.value)
    assert "\n" not in message
    assert repr(name) in message
    assert says in message


def test_unknown_names_list_the_synthetic_format() -> None:
    with pytest.raises(ScenarioError, match=r"default, synthetic-N\[-peersK\]\[-seedS\]"):
        load_scenario("no-such-scenario")


@pytest.mark.parametrize("n", [5, 10])
def test_small_synthetic_scenarios_are_feasible(n: int) -> None:
    s = load_scenario(f"synthetic-{n}")
    for policy in (Policy.DYNAMIC, Policy.STATIC):
        assert solve_centralized(s, policy).solver.converged


def test_generation_is_deterministic() -> None:
    assert synthetic_spec(20, seed=3, max_peers=4) == synthetic_spec(20, seed=3, max_peers=4)
    assert synthetic_spec(20, seed=3) != synthetic_spec(20, seed=4)
    a, b = load_scenario("synthetic-20-seed3"), load_scenario("synthetic-20-seed3")
    for ca, cb in zip(a.communities, b.communities, strict=True):
        assert ca.bus == cb.bus
        np.testing.assert_array_equal(ca.pv_kw, cb.pv_kw)
        np.testing.assert_array_equal(ca.wind_kw, cb.wind_kw)
        np.testing.assert_array_equal(ca.fixed_load_kw, cb.fixed_load_kw)


def test_six_communities_are_the_default_scenario() -> None:
    default, six = load_scenario("default"), load_scenario("synthetic-6")
    by_bus = {c.bus: c for c in six.communities}
    assert sorted(by_bus) == sorted(d.bus for d in default.communities)
    for d in default.communities:
        c = by_bus[d.bus]
        for field in ("pv_kw", "wind_kw", "fixed_load_kw"):
            np.testing.assert_array_equal(getattr(d, field), getattr(c, field))
        assert d.flex.energy_kwh == c.flex.energy_kwh
        assert d.battery.energy_kwh == c.battery.energy_kwh


@pytest.mark.parametrize("n", [10, 20, 50])
def test_totals_stay_those_of_the_default_day(n: int) -> None:
    default, s = load_scenario("default"), load_scenario(f"synthetic-{n}")
    for field in ("pv_kw", "wind_kw", "fixed_load_kw"):
        want = sum(float(getattr(c, field).sum()) for c in default.communities)
        got = sum(float(getattr(c, field).sum()) for c in s.communities)
        assert got == pytest.approx(want, rel=0.01), field
    assert sum(c.battery.energy_kwh for c in s.communities) == pytest.approx(1150, abs=1)
    assert sum(c.flex.energy_kwh for c in s.communities) == pytest.approx(1300, abs=1)


def test_fifty_communities_share_buses_and_take_overrides() -> None:
    s = load_scenario("synthetic-50", {"horizon": {"intervals": 96, "dt_h": 0.25}})
    buses = [c.bus for c in s.communities]
    assert len(set(buses)) < len(buses)
    assert s.feeder.root not in buses
    assert s.horizon == 96
    assert len({c.id for c in s.communities}) == 50
