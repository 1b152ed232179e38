"""The command line as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.io.results import read_results

REQUIRED_COMMUNITY_KEYS = {
    "id",
    "bus",
    "net_injection_kw",
    "q_kvar",
    "envelope_lo_kw",
    "envelope_up_kw",
    "cost_eur",
    "p2p_bought_kwh",
    "p2p_sold_kwh",
    "curtailed_kwh",
}


def test_solve_writes_documented_results(tmp_path: Path) -> None:
    run = run_p2pdoe("solve", "--mode", "centralized", "--envelope", "dynamic", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["schema_version"] == 1
    assert set(raw["feeder"]) >= {"name", "v0_pu", "vmin_pu", "vmax_pu"}
    assert raw["dt_h"] == 1.0
    assert len(raw["bus_load_kw"]) == 24
    assert len(raw["bus_load_kw"][0]) == 33
    assert len(raw["bus_load_kvar"]) == 24
    assert all(set(c) >= REQUIRED_COMMUNITY_KEYS for c in raw["communities"])
    assert {"seller", "buyer", "interval", "kw", "price_eur_per_kwh"} <= set(raw["trades"][0])
    assert set(raw["totals"]) >= {"p2p_traded_kwh", "curtailed_kwh", "cost_eur", "gross_energy_eur"}
    assert set(raw["ac_check"]) == {"schedule", "upper_corner", "lower_corner"}
    assert set(raw["solver"]) >= {"iterations", "converged", "wall_time_s"}
    assert raw["dlmp"][0]["export_eur_per_kwh"]
    results = read_results(tmp_path / "results.json")
    assert results.envelope == "dynamic"
    assert results.solver.converged


def test_solve_by_admm_writes_the_solver_story(tmp_path: Path) -> None:
    run = run_p2pdoe("solve", "--mode", "admm", "--envelope", "dynamic", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "ADMM converged after" in run.stdout
    raw = json.loads((tmp_path / "results.json").read_text())
    solver = raw["solver"]
    assert raw["mode"] == "admm"
    assert solver["name"] == "ADMM"
    assert solver["converged"]
    assert solver["status"] == "converged"
    assert len(solver["residual_history"]) == solver["iterations"]
    last = solver["residual_history"][-1]
    assert last["primal_trade_kw"] <= last["eps_trade_kw"]
    assert last["primal_envelope_kw"] <= last["eps_envelope_kw"]
    assert 0 < last["price_change_max_eur_per_kwh"] <= 1e-5  # the default eps_price
    roles = {t["role"] for t in solver["solve_times"]}
    assert roles == {"community", "dso"}
    assert len(solver["solve_times"]) == len(raw["communities"]) + 1
    assert all(t["median_ms"] <= t["p95_ms"] <= t["max_ms"] for t in solver["solve_times"])
    assert 0 < solver["critical_path_s"] < solver["wall_time_s"]
    assert solver["messages_per_iteration"] == 2 * len(raw["communities"])  # a proposal and a grant per site
    assert solver["bytes_per_iteration"] > 0
    assert set(solver["final_solve"].values()) == {"trades and envelope"}
    assert solver["ignored_messages"] == {}
    assert read_results(tmp_path / "results.json").solver.converged


def test_compare_writes_results_a_table_and_plots(tmp_path: Path) -> None:
    run = run_p2pdoe("compare", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    for policy in ("none", "static", "dynamic"):
        assert read_results(tmp_path / policy / "results.json").envelope == policy
    admm = read_results(tmp_path / "admm" / "results.json")
    assert (admm.mode, admm.envelope) == ("admm", "dynamic")
    table = (tmp_path / "comparison.md").read_text()
    assert "P2P energy traded (kWh)" in table
    assert "| metric | none | static | dynamic | admm |" in table
    assert "objective gap to centralized" in run.stdout
    figures = ("envelopes.png", "voltages.png", "trades.png", "soc.png", "residuals.png", "loading.png")
    for name in (*figures, "corners.png", "voltage_map.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert "plot:" in run.stdout
    assert "Dynamic envelopes trade" in run.stdout
    report = (tmp_path / "report.html").read_text()  # the one-page report, every plot embedded
    assert report.count("data:image/png;base64,") == len(list(tmp_path.glob("*.png")))
    assert f"<code>p2pdoe compare --out {tmp_path}</code>" in report  # the command as run
    assert report.count('class="pass"') == 4  # AC at the schedule and both corners; ADMM converged
    assert "| metric | none | static | dynamic | admm |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_solve_at_quarter_hour_resolution(tmp_path: Path) -> None:
    run = run_p2pdoe(
        "solve", "--intervals", "96", "--dt-h", "0.25", "--envelope", "static", "--out", str(tmp_path)
    )
    assert run.returncode == 0, run.stderr
    results = read_results(tmp_path / "results.json")
    assert results.intervals == 96
    assert len(results.communities[0].net_injection_kw) == 96


def test_a_bad_override_is_blamed_on_its_flag_not_on_the_scenario_file(tmp_path: Path) -> None:
    run = run_p2pdoe("solve", "--intervals", "0", "--out", str(tmp_path))
    assert run.returncode == 2
    assert (
        run.stderr.splitlines()[-1] == "p2pdoe solve: error: argument --intervals: must be at least 1, not 0"
    )
    run = run_p2pdoe("solve", "--dt-h", "0.7", "--out", str(tmp_path))
    assert_one_line_error(run, "--dt-h 0.7 does not divide the scenario's 24 h: give --intervals too")


@pytest.mark.parametrize(
    ("given", "horizon"),
    [
        (["--intervals", "96"], {"intervals": 96, "dt_h": 0.25}),
        (["--dt-h", "0.25"], {"intervals": 96, "dt_h": 0.25}),
        (["--intervals", "48", "--dt-h", "1"], {"intervals": 48, "dt_h": 1.0}),  # two days, as asked
        ([], None),
    ],
)
def test_one_of_intervals_and_dt_h_alone_keeps_the_scenarios_day(given: list[str], horizon: object) -> None:
    from p2pdoe.cli.main import _overrides, build_parser

    args = build_parser().parse_args(["solve", *given, "--out", "x"])
    assert _overrides(args).get("horizon") == horizon


def test_a_typo_in_a_key_is_named_with_the_key_it_was_meant_to_be(tmp_path: Path) -> None:
    from p2pdoe.io.scenarios import scenario_path

    text = scenario_path("default").read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("rated_kw", "rated_kW", 1))
    run = run_p2pdoe("solve", "--scenario", str(bad), "--out", str(tmp_path / "out"))
    expected = "communities.0.pv.rated_kW: Extra inputs are not permitted (did you mean 'rated_kw'?)"
    assert_one_line_error(run, f"{bad}: {expected}")
    assert "more" not in run.stderr  # the missing rated_kw is the same mistake


def test_help_lists_every_command_and_version_answers() -> None:
    from p2pdoe import __version__
    from p2pdoe.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    shown = run_p2pdoe("--help").stdout
    assert all(f"    {name}" in shown for name in commands), shown
    assert len(commands) >= 8
    assert run_p2pdoe("--version").stdout.strip() == f"p2pdoe {__version__}"
    assert "envelope policy" in run_p2pdoe("solve", "--help").stdout


@pytest.mark.parametrize("command", [["schema"], ["powerflow", "--json"]])
def test_a_reader_that_goes_away_ends_the_output_quietly(command: list[str]) -> None:
    """`p2pdoe schema | head`: the pipe closed before anything is written, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pdoe.cli.main", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == ""


def test_edge_side_of_the_core_never_imports_cvxpy() -> None:
    code = (
        "import sys, edge_agent, p2pdoe.core.community, p2pdoe.core.market, p2pdoe.core.envelope;"
        "from p2pdoe.io.scenarios import load_scenario; load_scenario('default');"
        "sys.exit(1 if 'cvxpy' in sys.modules or 'matplotlib' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
