"""results.json is written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdoe.core.schemas.results import Results
from p2pdoe.io.results import read_results, write_results


def _results(tmp_path: Path) -> Results:
    from p2pdoe.analysis.results import build_results
    from p2pdoe.core.solution import Policy
    from p2pdoe.io.scenarios import load_scenario
    from p2pdoe.reference.centralized import solve_centralized

    pytest.importorskip("cvxpy")
    s = load_scenario("default")
    return build_results(s, solve_centralized(s, Policy.STATIC), "centralized")


def test_a_write_stopped_half_way_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _results(tmp_path)
    path = write_results(results, tmp_path)
    before = path.read_bytes()

    def interrupted(self: Path, target: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_results(results.model_copy(update={"objective_eur": 1.0}), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert path.read_bytes() == before
    assert read_results(path) == results
