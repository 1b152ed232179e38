"""The default scenario end to end: physics invariants of the centralized optimum under each policy."""

from __future__ import annotations

import numpy as np
import pytest

from p2pdoe.analysis.accounts import net_injection
from p2pdoe.analysis.results import build_results, operating_points
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized

KW_TOL = 1e-3  # kW: solver accuracy on equalities


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("default")


@pytest.fixture(scope="module")
def solutions(scenario: Scenario) -> dict[Policy, Solution]:
    return {p: solve_centralized(scenario, p) for p in Policy}


@pytest.fixture(scope="module")
def results(scenario: Scenario, solutions: dict[Policy, Solution]) -> dict[Policy, Results]:
    return {p: build_results(scenario, sol, "centralized") for p, sol in solutions.items()}


def test_default_scenario_has_enough_communities(scenario: Scenario) -> None:
    assert len(scenario.communities) >= 5
    assert scenario.horizon == 24
    assert scenario.dt_h == 1.0


@pytest.mark.parametrize("policy", list(Policy))
def test_trades_are_reciprocal(solutions: dict[Policy, Solution], policy: Policy) -> None:
    sol = solutions[policy]
    for c, sc in enumerate(sol.schedules):
        for k, m in enumerate(sc.peers):
            seller = sol.schedules[m]
            assert np.allclose(sc.buy[k], seller.sell[seller.peers.index(c)], atol=KW_TOL)


@pytest.mark.parametrize("policy", list(Policy))
def test_every_community_is_balanced(
    scenario: Scenario, solutions: dict[Policy, Solution], policy: Policy
) -> None:
    for c, sc in zip(scenario.communities, solutions[policy].schedules, strict=True):
        supply = sc["pv"] + sc["wd"] + sc["dis"] + sc["imp"] + sc.buy.sum(axis=0)
        demand = c.fixed_load_kw + sc["lx"] + sc["ch"] + sc["exp"] + sc.sell.sum(axis=0)
        assert np.allclose(supply, demand, atol=KW_TOL)
        grid_side = sc["exp"] - sc["imp"] + sc.sell.sum(axis=0) - sc.buy.sum(axis=0)
        assert np.allclose(net_injection(c, sc), grid_side, atol=KW_TOL)


@pytest.mark.parametrize("policy", list(Policy))
def test_every_schedule_lies_inside_its_envelope(
    scenario: Scenario, solutions: dict[Policy, Solution], policy: Policy
) -> None:
    for c, sc in zip(scenario.communities, solutions[policy].schedules, strict=True):
        x = net_injection(c, sc)
        assert np.all(sc["lo"] <= x + KW_TOL)
        assert np.all(x <= sc["up"] + KW_TOL)


def test_static_envelopes_are_one_box_per_community(solutions: dict[Policy, Solution]) -> None:
    for sc in solutions[Policy.STATIC].schedules:
        assert np.ptp(sc["lo"]) < KW_TOL
        assert np.ptp(sc["up"]) < KW_TOL


def test_battery_state_of_charge_respects_its_limits(
    scenario: Scenario, solutions: dict[Policy, Solution]
) -> None:
    for c, sc in zip(scenario.communities, solutions[Policy.DYNAMIC].schedules, strict=True):
        b = c.battery
        assert np.all(sc["soc"] >= b.soc_min_kwh - KW_TOL)
        assert np.all(sc["soc"] <= b.soc_max_kwh + KW_TOL)
        assert sc["soc"][-1] >= b.soc_init_kwh - KW_TOL


@pytest.mark.parametrize("point", ["schedule", "upper_corner", "lower_corner"])
def test_dynamic_envelopes_hold_every_limit_in_ac(results: dict[Policy, Results], point: str) -> None:
    state = getattr(results[Policy.DYNAMIC].ac_check, point)
    assert state.converged
    assert state.voltage_violations == 0, (state.vmin_pu, state.vmax_pu)
    assert state.thermal_violations == 0, state.max_loading_pct


def test_static_envelopes_hold_every_limit_in_ac(results: dict[Policy, Results]) -> None:
    check = results[Policy.STATIC].ac_check
    for state in (check.schedule, check.upper_corner, check.lower_corner):
        assert state.voltage_violations == 0
        assert state.thermal_violations == 0


def test_no_limits_baseline_violates_the_network_in_ac(results: dict[Policy, Results]) -> None:
    schedule = results[Policy.NONE].ac_check.schedule
    assert schedule.voltage_violations > 0
    assert schedule.vmax_pu > 1.05
    assert schedule.thermal_violations > 0


def test_dynamic_envelopes_trade_more_p2p_energy_than_static(results: dict[Policy, Results]) -> None:
    dynamic = results[Policy.DYNAMIC].totals
    static = results[Policy.STATIC].totals
    assert dynamic.p2p_traded_kwh > 1.01 * static.p2p_traded_kwh
    assert dynamic.curtailed_kwh < static.curtailed_kwh


def test_export_limits_bind_at_midday_and_import_limits_in_the_evening(
    scenario: Scenario, results: dict[Policy, Results]
) -> None:
    """The network price of capacity is positive where the DSO's limits are active."""
    hours = np.arange(scenario.horizon) * scenario.dt_h
    midday = (hours >= 10) & (hours < 16)
    evening = (hours >= 17) & (hours < 22)
    by_id = {d.id: d for d in results[Policy.DYNAMIC].dlmp}
    for feeder_end in ("solar-18", "solar-wind-33"):
        assert np.all(np.asarray(by_id[feeder_end].export_eur_per_kwh)[midday] > 1e-4)
    evening_import = max(np.asarray(d.import_eur_per_kwh)[evening].max() for d in by_id.values())
    midday_import = max(np.asarray(d.import_eur_per_kwh)[midday].max() for d in by_id.values())
    assert evening_import > 1e-2
    assert evening_import > 3.0 * midday_import  # import capacity is scarcest at the evening peak


def test_feeder_end_schedule_meets_its_export_limit_at_midday(
    scenario: Scenario, solutions: dict[Policy, Solution]
) -> None:
    """Export limits bind: the PV community at bus 18 exports right up to UP and curtails."""
    i = scenario.ids.index("solar-18")
    c, sc = scenario.communities[i], solutions[Policy.DYNAMIC].schedules[i]
    noon = int(12 / scenario.dt_h)
    assert net_injection(c, sc)[noon] == pytest.approx(sc["up"][noon], abs=1e-2)
    assert c.pv_kw[noon] - sc["pv"][noon] > 1.0


def test_dlmp_parts_add_up_and_are_non_negative(results: dict[Policy, Results]) -> None:
    for d in results[Policy.DYNAMIC].dlmp:
        total = np.asarray(d.export_eur_per_kwh)
        parts = np.asarray(d.export_voltage_eur_per_kwh) + np.asarray(d.export_congestion_eur_per_kwh)
        assert np.allclose(total, parts)
        assert np.all(total >= 0)
        assert np.all(np.asarray(d.import_eur_per_kwh) >= 0)


def test_p2p_payments_cancel_and_prices_lie_between_retail_prices(
    scenario: Scenario, results: dict[Policy, Results]
) -> None:
    r = results[Policy.DYNAMIC]
    assert sum(c.cost_breakdown.p2p_net_eur for c in r.communities) == pytest.approx(0.0, abs=1e-3)
    for trade in r.trades:
        if trade.kw > 1.0:
            t = trade.interval
            assert (
                scenario.price_export[t] - 1e-3 <= trade.price_eur_per_kwh <= scenario.price_import[t] + 1e-3
            )


@pytest.mark.parametrize("policy", list(Policy))
def test_regularisers_barely_move_the_objective(results: dict[Policy, Results], policy: Policy) -> None:
    """Objective = costs - envelope value + the bilateral trade friction eps (b^2 + s^2) + the small
    regularisers that make the optimum unique; the regularisers must stay below 1 % of the gross
    energy cost and the friction below 2 %, or they would distort the economics."""
    r = results[policy]
    eps = 3e-5 * r.dt_h  # trade_quadratic of the default scenario, per interval
    friction = eps * 2.0 * sum(t.kw**2 for t in r.trades)
    regularisation = (
        r.objective_eur - sum(c.cost_eur - c.envelope_value_eur for c in r.communities) - friction
    )
    assert 0.0 <= regularisation < 0.01 * r.totals.gross_energy_eur
    assert 0.0 <= friction < 0.02 * r.totals.gross_energy_eur


def test_operating_points_have_community_shape(scenario: Scenario, solutions: dict[Policy, Solution]) -> None:
    points = operating_points(scenario, solutions[Policy.DYNAMIC])
    for x, q in points.values():
        assert x.shape == q.shape == (len(scenario.communities), scenario.horizon)


@pytest.mark.slow
def test_quarter_hour_resolution_works_and_agrees_with_hourly(results: dict[Policy, Results]) -> None:
    s96 = load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})
    r96 = build_results(s96, solve_centralized(s96, Policy.DYNAMIC), "centralized")
    assert r96.intervals == 96
    for state in (r96.ac_check.schedule, r96.ac_check.upper_corner, r96.ac_check.lower_corner):
        assert state.voltage_violations == 0
        assert state.thermal_violations == 0
    hourly = results[Policy.DYNAMIC].totals.p2p_traded_kwh
    assert r96.totals.p2p_traded_kwh == pytest.approx(hourly, rel=0.05)


def test_lower_setpoint_leaves_no_static_box(scenario: Scenario) -> None:
    """Why the default runs the substation at 1.035 p.u.: at 1.03 p.u. with the same loads no constant
    box is safe at the evening peak while covering the campus's midday import (docs/scenario.md)."""
    from p2pdoe.errors import InfeasibleError

    lower = load_scenario("default", {"feeder": {"v0_pu": 1.03}})
    with pytest.raises(InfeasibleError, match="static"):
        solve_centralized(lower, Policy.STATIC)
    assert solve_centralized(lower, Policy.DYNAMIC).solver.converged
