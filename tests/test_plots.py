"""The comparison figures: each expected PNG is written, valid and non-trivial, for any subset of policies."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("cvxpy")

import itertools

from p2pdoe.analysis.results import build_results
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.report.plots import write_plots

ALL_FIGURES = {
    "envelopes.png",
    "voltages.png",
    "trades.png",
    "soc.png",
    "dlmp.png",
    "loading.png",
    "corners.png",
    "voltage_map.png",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_BYTES = 10_000


@pytest.fixture(scope="module")
def results() -> dict[str, Results]:
    s = load_scenario("default")
    return {p.value: build_results(s, solve_centralized(s, p), "centralized") for p in Policy}


def _check_pngs(paths: list[Path], out_dir: Path, expected: set[str]) -> None:
    assert {p.name for p in paths} == expected
    assert {p.name for p in out_dir.iterdir()} == expected  # nothing else written
    for p in paths:
        assert p.parent == out_dir
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC), p.name
        assert len(data) > MIN_BYTES, (p.name, len(data))


def test_all_policies(results: dict[str, Results], tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    out = tmp_path / "figures" / "nested"  # created if missing
    paths = write_plots(results, out)
    _check_pngs(paths, out, ALL_FIGURES)
    assert len(plt.get_fignums()) == open_before  # every figure closed


def test_dynamic_only(results: dict[str, Results], tmp_path: Path) -> None:
    paths = write_plots({"dynamic": results["dynamic"]}, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES)


def test_static_only_has_no_dlmp_figure(results: dict[str, Results], tmp_path: Path) -> None:
    paths = write_plots({"static": results["static"]}, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES - {"dlmp.png"})


def test_unknown_policy_name(results: dict[str, Results], tmp_path: Path) -> None:
    """Names outside none/static/dynamic (e.g. an ADMM run) get their own colour and no DLMP figure."""
    paths = write_plots({"admm": results["dynamic"], "other": results["none"]}, tmp_path)
    _check_pngs(paths, tmp_path, ALL_FIGURES - {"dlmp.png"})


def test_empty_mapping_writes_nothing(tmp_path: Path) -> None:
    assert write_plots({}, tmp_path / "out") == []


# ------------------------------------------------------------------------------ what the figures show


def _branches(r: Results) -> set[tuple[int, int]]:
    pairs = (label.split("-") for label in r.feeder.branches)
    return {(int(a), int(b)) for a, b in pairs}


def test_ieee33_laterals_start_at_their_branching_bus(results: dict[str, Results]) -> None:
    from p2pdoe.report.feeder_layout import laterals

    r = results["dynamic"]
    assert laterals(r.feeder) == [
        list(range(1, 19)),
        [2, 19, 20, 21, 22],
        [3, 23, 24, 25],
        [6, *range(26, 34)],
    ]
    covered = {b for path in laterals(r.feeder) for b in path}
    assert covered == set(r.feeder.bus_ids)


def test_voltage_profile_is_one_line_per_lateral_joining_only_connected_buses(
    results: dict[str, Results],
) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.feeder_layout import hops_from_root, laterals
    from p2pdoe.report.plots import _voltages_figure

    fig = _voltages_figure(results)
    try:
        profile = fig.axes[1]
        lines = [ln for ln in profile.get_lines() if (ln.get_gid() or "").startswith("lateral:")]
        r = results["dynamic"]
        assert len(lines) == len(results) * 2 * len(laterals(r.feeder))  # two moments per policy
        connected, hops = _branches(r), hops_from_root(r.feeder)
        for line in lines:
            buses = [int(b) for b in line.get_gid().removeprefix("lateral:").split(",")]
            assert all((a, b) in connected for a, b in itertools.pairwise(buses))
            assert list(line.get_xdata()) == [hops[b] for b in buses]
    finally:
        plt.close(fig)


def test_a_policy_that_coincides_with_another_is_dashed_and_says_so(results: dict[str, Results]) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _envelopes_figure

    fig = _envelopes_figure(
        {"dynamic": results["dynamic"], "admm": results["dynamic"], "static": results["static"]}
    )
    try:
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "admm (dashed: = dynamic): envelope" in labels
        assert "static: envelope" in labels  # static differs: solid, no note
        styles = {ln.get_color(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
        assert styles["tab:purple"] != "-"
        assert styles["tab:green"] == "-" == styles["tab:blue"]
        assert not fig.axes[0].collections  # no see-through fills stacked into grey
    finally:
        plt.close(fig)


def _with_penalties(r: Results, rho_trade: list[float]) -> Results:
    from p2pdoe.core.schemas.results import ResidualPoint

    history = [
        ResidualPoint(
            iteration=k,
            primal_trade_kw=10.0 / (k + 1),
            dual_trade_kw=8.0 / (k + 1),
            eps_trade_kw=0.1,
            primal_envelope_kw=12.0 / (k + 1),
            dual_envelope_kw=9.0 / (k + 1),
            eps_envelope_kw=0.1,
            rho_trade=rho,
            rho_envelope=1e-3,
            reciprocity_max_kw=0.0,
            envelope_gap_max_kw=0.0,
        )
        for k, rho in enumerate(rho_trade)
    ]
    solver = r.solver.model_copy(update={"residual_history": history, "iterations": len(history)})
    return r.model_copy(update={"solver": solver})


def test_a_penalty_that_never_changed_is_named_not_drawn(results: dict[str, Results]) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _residuals_figure

    fig = _residuals_figure({"admm": _with_penalties(results["dynamic"], [2e-3] * 6)})
    try:
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert len(visible) == 1
        assert "never adapted" in visible[0].get_title()
    finally:
        plt.close(fig)


def test_a_changing_penalty_is_drawn_on_a_log_axis_with_its_changes_marked(
    results: dict[str, Results],
) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _residuals_figure

    fig = _residuals_figure(
        {"admm": _with_penalties(results["dynamic"], [2e-3, 2e-3, 4e-3, 4e-3, 1e-3, 1e-3])}
    )
    try:
        penalty = fig.axes[1]
        assert penalty.get_yscale() == "log"
        marks = [ln for ln in penalty.get_lines() if ln.get_marker() == "o" and ln.get_color() == "tab:blue"]
        assert list(marks[0].get_xdata()) == [3, 5]  # iterations (1-based) where rho_trade changed
        assert "(2 changes)" in " ".join(t.get_text() for t in penalty.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_loading_is_drawn_against_the_rating_and_names_the_most_loaded_branches(
    results: dict[str, Results],
) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _loading_figure

    fig = _loading_figure(results)
    try:
        worst, top = fig.axes
        peaks = {ln.get_label(): max(ln.get_ydata()) for ln in worst.get_lines()}
        for policy, r in results.items():
            assert peaks[policy] == pytest.approx(r.ac_check.schedule.max_loading_pct)
        assert 100.0 in [ln.get_ydata()[0] for ln in top.get_lines() if ln.get_label() == "rating"]
        named = [ln.get_label().split(" ")[0] for ln in top.get_lines() if ln.get_label() != "rating"]
        assert named[0] == results["none"].ac_check.schedule.max_loading_branch
    finally:
        plt.close(fig)


def test_corner_voltages_are_the_corner_checks_extremes(results: dict[str, Results]) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _corners_figure

    fig = _corners_figure(results)
    try:
        lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
        for policy, r in results.items():
            assert max(lines[f"{policy}, upper corner: max"]) == pytest.approx(
                r.ac_check.upper_corner.vmax_pu
            )
            assert min(lines[f"{policy}, lower corner: min"]) == pytest.approx(
                r.ac_check.lower_corner.vmin_pu
            )
    finally:
        plt.close(fig)


def test_voltage_map_rows_are_the_buses_lateral_by_lateral(results: dict[str, Results]) -> None:
    import matplotlib.pyplot as plt

    from p2pdoe.report.plots import _voltage_map_figure

    fig = _voltage_map_figure({"none": results["none"]})
    try:
        r = results["none"]
        image = fig.axes[0].get_images()[0]
        v = image.get_array()
        assert v.shape == (len(r.feeder.bus_ids), r.intervals)
        assert v[17, 12] == pytest.approx(
            r.ac_check.schedule.voltage_pu[12][17]
        )  # bus 18, the main line's end
        assert image.get_clim() == (
            r.feeder.vmin_pu,
            r.feeder.vmax_pu,
        )  # beyond the limits: the extreme colours
    finally:
        plt.close(fig)
