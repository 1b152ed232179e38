"""Write and read results.json."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from p2pdoe.core.schemas.results import Results
from p2pdoe.errors import P2PDoeError

RESULTS_FILE = "results.json"


def write_results(results: Results, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(results.model_dump_json(indent=1), encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # stopped (Ctrl-C) or failed half-way: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_results(path: Path) -> Results:
    try:
        return Results.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise P2PDoeError(f"cannot read results {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        raise P2PDoeError(
            f"{path}: not a results file of schema version 1 ({exc.error_count()} errors)"
        ) from exc
