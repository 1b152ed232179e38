"""Iterations of a rolling round over intervals 1..T-1 of the default day, cold against warm-started
from the day-ahead round (shift 1), driven over the wire in-process with the harness of
tests/test_rolling_core.py. Run from the repository root: `.venv/bin/python benchmarks/warm_start.py`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from p2pdoe.io.scenarios import load_scenario  # noqa: E402
from tests.test_rolling_core import rolling  # noqa: E402

CASES = {"24 x 1 h": None, "96 x 15 min": {"horizon": {"intervals": 96, "dt_h": 0.25}}}


def main() -> None:
    print(f"{'horizon':<12} {'day-ahead':>9} {'cold':>5} {'warm':>5} {'objective gap (rel.)':>21}")
    for name, overrides in CASES.items():
        r = rolling(load_scenario("default", overrides), 1)
        gap = abs(r.warm.objective_eur - r.cold.objective_eur) / abs(r.cold.objective_eur)
        print(f"{name:<12} {r.day.iterations:>9} {r.cold.iterations:>5} {r.warm.iterations:>5} {gap:>21.1e}")


if __name__ == "__main__":
    main()
