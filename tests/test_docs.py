"""The examples the documentation shows are real: they load and solve."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized

ROOT = Path(__file__).resolve().parents[1]


def _yaml_block(markdown: Path, starts_with: str) -> str:
    text = markdown.read_text(encoding="utf-8")
    start = text.index("```yaml\n" + starts_with) + len("```yaml\n")
    return text[start : text.index("```", start)]


@pytest.mark.parametrize("doc", ["README.md", "docs/scenario.md"])
def test_documented_scenario_example_loads_and_solves(doc: str, tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(_yaml_block(ROOT / doc, "schema_version"), encoding="utf-8")
    scenario = load_scenario(str(path))
    assert scenario.communities
    assert solve_centralized(scenario, Policy.DYNAMIC).solver.converged


def test_the_license_pyproject_names_is_in_the_repository() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        text = (root / name).read_text()
        assert "Apache License\n                           Version 2.0, January 2004" in text
        assert "END OF TERMS AND CONDITIONS" in text
