"""The comparison figures: each expected PNG is written, valid and non-trivial, for any subset of policies."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("cvxpy")

from p2pdoe.analysis.results import build_results
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.report.plots import write_plots

ALL_FIGURES = {"envelopes.png", "voltages.png", "trades.png", "soc.png", "dlmp.png"}
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
