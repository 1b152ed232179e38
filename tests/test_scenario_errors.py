"""Bad scenario files fail on the command line with one clear line, exit status 2 and no results.

Each case is a copy of the shipped default.yaml (feeder `ieee33` by name, so it can be relocated) with
one edit, written to tmp_path and run through `p2pdoe solve`.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.io.scenarios import data_path

DEFAULT = yaml.safe_load(data_path("scenarios", "default.yaml").read_text(encoding="utf-8"))


def _solve(scenario: Path, out: Path) -> subprocess.CompletedProcess[str]:
    args = ["solve", "--scenario", str(scenario), "--mode", "centralized", "--envelope", "dynamic"]
    return run_p2pdoe(*args, "--out", str(out), timeout=120)


def _community(doc: dict[str, Any], cid: str) -> dict[str, Any]:
    (hit,) = [c for c in doc["communities"] if c["id"] == cid]
    return hit


def _bus_99(doc: dict[str, Any]) -> None:
    _community(doc, "town-14")["bus"] = 99


def _negative_battery(doc: dict[str, Any]) -> None:
    _community(doc, "solar-18")["battery"]["energy_kwh"] = -400


def _typo_key(doc: dict[str, Any]) -> None:
    c = _community(doc, "solar-18")
    c["batery"] = c.pop("battery")


def _typo_nested_key(doc: dict[str, Any]) -> None:
    _community(doc, "solar-18")["battery"]["power_kwh"] = 200


def _flex_too_much(doc: dict[str, Any]) -> None:
    _community(doc, "town-14")["flexible_load"]["energy_kwh"] = 5000  # 150 kW x 24 h = 3600 kWh at most


def _flex_too_little(doc: dict[str, Any]) -> None:
    _community(doc, "town-14")["flexible_load"]["min_kw"] = 50  # 50 kW x 24 h = 1200 kWh > 600 kWh


def _naive_start(doc: dict[str, Any]) -> None:
    doc["horizon"]["start"] = "2026-06-21T00:00:00"


def _slack_bus(doc: dict[str, Any]) -> None:
    _community(doc, "town-14")["bus"] = 1


def _missing_feeder(doc: dict[str, Any]) -> None:
    doc["feeder"]["source"] = "no-such-feeder.m"


# name -> (edit of the parsed YAML, substrings the error line must contain)
BAD_SCENARIOS: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "community-on-bus-99": (_bus_99, ("town-14", "bus 99", "does not have", "1..33")),
    "negative-battery-energy": (
        _negative_battery,
        ("communities.0.battery.energy_kwh", "greater than or equal"),
    ),
    "typo-in-community": (_typo_key, ("communities.0.batery", "xtra")),
    "typo-in-battery": (_typo_nested_key, ("communities.0.battery.power_kwh", "xtra")),
    "flexible-energy-too-high": (_flex_too_much, ("town-14", "flexible energy 5000 kWh cannot be served")),
    "flexible-energy-too-low": (_flex_too_little, ("town-14", "flexible energy 600 kWh cannot be served")),
    "start-without-time-zone": (_naive_start, ("horizon.start", "no time zone")),
    "community-on-slack-bus": (_slack_bus, ("town-14", "slack bus 1")),
    "feeder-file-missing": (_missing_feeder, ("no-such-feeder.m", "neither a named feeder")),
}


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], tmp_path: Path, *needles: str) -> None:
    assert_one_line_error(proc, *needles)
    assert list(tmp_path.rglob("results.json")) == []


def test_the_unmodified_copy_solves(tmp_path: Path) -> None:
    """Positive control: the relocated copy is a valid scenario, so each failure below is its one edit."""
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(DEFAULT, sort_keys=False), encoding="utf-8")
    proc = _solve(path, tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "results.json").is_file()


@pytest.mark.parametrize("case", sorted(BAD_SCENARIOS))
def test_bad_scenario_fails_with_one_line(case: str, tmp_path: Path) -> None:
    edit, needles = BAD_SCENARIOS[case]
    doc = copy.deepcopy(DEFAULT)
    edit(doc)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, *needles)


@pytest.mark.parametrize(
    "text",
    [
        "communities: [unclosed\n",
        "name: x\n  bad: indentation\n",
        "feeder: {source: ieee33\n",
    ],
    ids=["unclosed-list", "bad-indent", "unclosed-mapping"],
)
def test_invalid_yaml(text: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, "not valid YAML", str(path))


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, "mapping at its top level")


def test_missing_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, "nope.yaml", "neither a named scenario")


def test_scenario_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, str(path))


def test_csv_profile_that_is_not_utf8(tmp_path: Path) -> None:
    doc = copy.deepcopy(DEFAULT)
    _community(doc, "solar-18")["fixed_load"]["profile"] = {"kind": "csv", "path": "load.csv", "column": "kw"}
    (tmp_path / "load.csv").write_bytes(b"kw\n1\n\xff\n")
    path = tmp_path / "csv.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, "load.csv")


def test_csv_profile_with_a_bad_value(tmp_path: Path) -> None:
    doc = copy.deepcopy(DEFAULT)
    _community(doc, "solar-18")["fixed_load"]["profile"] = {"kind": "csv", "path": "load.csv", "column": "kw"}
    (tmp_path / "load.csv").write_text("kw\n1\nlots\n", encoding="utf-8")
    path = tmp_path / "csv.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    _assert_clean_failure(_solve(path, tmp_path / "o"), tmp_path, "load.csv", "not a number")
