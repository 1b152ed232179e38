"""Load scenario files (YAML or JSON), their feeders and CSV profiles."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from p2pdoe.core.network import Feeder, FloatArray
from p2pdoe.core.scenario import Scenario, build_scenario
from p2pdoe.core.schemas.scenario import CsvProfile, ScenarioSpec
from p2pdoe.errors import ScenarioError, first_error
from p2pdoe.io.files import read_text
from p2pdoe.io.matpower import load_matpower
from p2pdoe.io.synthetic import NAME_FORMAT, synthetic_from_name

NAMED_FEEDERS = {"ieee33": "ieee33bw.m"}
NAMED_SCENARIOS = {"default": "default.yaml"}


def data_path(*parts: str) -> Path:
    return Path(str(resources.files("p2pdoe").joinpath("data", *parts)))


def load_feeder(source: str, relative_to: Path | None = None) -> Feeder:
    """A named feeder (`ieee33`) or a MATPOWER file path (relative to `relative_to` if given)."""
    if source in NAMED_FEEDERS:
        return replace(load_matpower(data_path("feeders", NAMED_FEEDERS[source])), name=source)
    path = Path(source)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.exists():
        names = ", ".join(NAMED_FEEDERS)
        raise ScenarioError(f"feeder {source!r} is neither a named feeder ({names}) nor an existing file")
    return load_matpower(path)


def scenario_path(name_or_path: str) -> Path:
    if name_or_path in NAMED_SCENARIOS:
        return data_path("scenarios", NAMED_SCENARIOS[name_or_path])
    path = Path(name_or_path)
    if not path.exists():
        names = ", ".join([*NAMED_SCENARIOS, NAME_FORMAT])
        raise ScenarioError(
            f"scenario {name_or_path!r} is neither a named scenario ({names}) nor an existing file"
        )
    return path


def read_spec(path: Path, overrides: dict[str, Any] | None = None) -> ScenarioSpec:
    """Parse and validate a scenario file; `overrides` replaces top-level sections (e.g. horizon)."""
    return _validate(_read_mapping(path), overrides, str(path))


def _validate(raw: dict[str, Any], overrides: dict[str, Any] | None, where: str) -> ScenarioSpec:
    for key, value in (overrides or {}).items():
        section = raw.setdefault(key, {})
        if not isinstance(section, dict):
            raise ScenarioError(f"{where}: {key} must be a mapping")
        section.update(value)
    try:
        return ScenarioSpec.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{where}: {first_error(exc, '(top level)')}") from exc


def load_scenario(
    name_or_path: str, overrides: dict[str, Any] | None = None, day: date | None = None
) -> Scenario:
    """A named scenario (`default`, `synthetic-N[-peersK][-seedS]`) or a scenario file; `day`: its
    day of that local date instead of its own horizon (p2pdoe.core.scenario.build_scenario)."""
    if name_or_path not in NAMED_SCENARIOS and not Path(name_or_path).exists():
        generated = synthetic_from_name(name_or_path)
        if generated is not None:
            spec = _validate(generated, overrides, name_or_path)
            try:
                return build_scenario(spec, load_feeder(spec.feeder.source), {}, day)
            except ScenarioError as exc:
                raise ScenarioError(f"{name_or_path}: {exc}") from exc
    path = scenario_path(name_or_path)
    spec = read_spec(path, overrides)
    try:
        feeder = load_feeder(spec.feeder.source, relative_to=path.parent)
        return build_scenario(spec, feeder, _csv_columns(spec, path.parent), day)
    except ScenarioError as exc:
        message = str(exc)
        raise ScenarioError(message if str(path) in message else f"{path}: {message}") from exc


def scenario_horizon(name_or_path: str) -> tuple[int, float]:
    """A scenario's own (intervals, dt_h), read without building it."""
    if name_or_path not in NAMED_SCENARIOS and not Path(name_or_path).exists():
        generated = synthetic_from_name(name_or_path)
        if generated is not None:
            spec = _validate(generated, None, name_or_path)
            return spec.horizon.intervals, spec.horizon.dt_h
    spec = read_spec(scenario_path(name_or_path))
    return spec.horizon.intervals, spec.horizon.dt_h


def _read_mapping(path: Path) -> dict[str, Any]:
    text = read_text(path, "scenario", ScenarioError)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ScenarioError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(exc).splitlines()[0]}"
        ) from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario file holds a mapping at its top level")
    return data


def _csv_columns(spec: ScenarioSpec, base: Path) -> dict[tuple[str, str], FloatArray]:
    wanted = {(p.path, p.column) for p in _csv_profiles(spec)}
    out: dict[tuple[str, str], FloatArray] = {}
    for rel, column in sorted(wanted):
        out[(rel, column)] = _read_column(base / rel, column)
    return out


def _csv_profiles(spec: ScenarioSpec) -> list[CsvProfile]:
    found: list[CsvProfile] = []

    def visit(node: Any) -> None:
        if isinstance(node, CsvProfile):
            found.append(node)
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                visit(getattr(node, name))
        elif isinstance(node, list | tuple):
            for item in node:
                visit(item)

    visit(spec)
    return found


def _read_column(path: Path, column: str) -> FloatArray:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ScenarioError(f"cannot read profile {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text") from exc
    if not rows or column not in rows[0]:
        raise ScenarioError(f"{path}: no column {column!r}")
    try:
        values = np.array([float(r[column]) for r in rows])
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{path}: column {column!r} holds a value that is not a number") from exc
    if not np.all(np.isfinite(values)):
        raise ScenarioError(f"{path}: column {column!r} holds NaN or infinite values")
    return values
