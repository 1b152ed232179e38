"""An infeasible day names the limit out of reach, and the claim holds in an AC power flow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.core.envelope import _on_buses, grid_view, unmeetable_limit
from p2pdoe.core.powerflow import run_power_flow
from p2pdoe.io.scenarios import load_scenario, scenario_path

TIGHT = {"feeder": {"voltage_margin": {"lower_pu": 0.04, "upper_pu": 0.0}}}  # vmin + margin = 0.99
CLAIM = re.compile(
    r"the vmin limit at bus (\d+) in interval (\d+) cannot be met: with every site injecting its most, "
    r"LinDistFlow puts it at ([\d.]+) p\.u\., below 0\.9900 \(vmin 0\.95 with the margin 0\.04\)"
)


def _ranges(s: object) -> tuple[np.ndarray, np.ndarray]:
    ranges = [c.technical_range_kw() for c in s.communities]  # type: ignore[attr-defined]
    return np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])


def test_the_limit_out_of_reach_is_named_and_an_ac_power_flow_agrees() -> None:
    s = load_scenario("default", TIGHT)
    low, high = _ranges(s)
    view = grid_view(s)
    found = CLAIM.fullmatch(unmeetable_limit(view, low, high) or "")
    assert found, unmeetable_limit(view, low, high)
    bus_id, t, v_claimed = int(found[1]), int(found[2]), float(found[3])
    bus = int(np.flatnonzero(s.feeder.bus_ids == bus_id)[0])
    p = _on_buses(view, view.site_bus, high[:, t : t + 1])[:, 0] - view.background_kw[:, t]
    q = _on_buses(view, view.site_bus, view.q_min_kvar[:, t : t + 1])[:, 0] - view.background_kvar[:, t]
    ac = run_power_flow(s.feeder, p, q, v0_pu=s.v0_pu)
    assert ac.converged
    assert float(ac.v_pu[bus]) < 0.99  # out of reach in AC too (LinDistFlow, lossless, is above it)
    assert float(ac.v_pu[bus]) == pytest.approx(v_claimed, abs=0.01)


def test_a_day_whose_limits_each_hold_says_none_is_out_of_reach() -> None:
    s = load_scenario("default")
    assert unmeetable_limit(grid_view(s), *_ranges(s)) is None


def test_solve_says_which_limit_in_one_line(tmp_path: Path) -> None:
    text = scenario_path("default").read_text()
    tight = tmp_path / "tight.yaml"
    tight.write_text(text.replace("lower_pu: 0.004", "lower_pu: 0.04", 1))
    run = run_p2pdoe("solve", "--scenario", str(tight), "--out", str(tmp_path / "out"))
    assert_one_line_error(run, "the dynamic problem is infeasible: the vmin limit at bus")
    assert CLAIM.search(run.stderr), run.stderr
