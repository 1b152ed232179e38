"""Every program runs its dense algebra on one BLAS thread unless the environment sets a count: on a
busy machine OpenBLAS's threads spin waiting for each other (p2pdoe.services.blas). Checked in a fresh
interpreter per program, where the program's package is imported before anything loads numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from p2pdoe.services.blas import THREAD_VARIABLES, one_blas_thread

PROGRAMS = ["edge_agent", "dso_coordinator", "meter_sim", "p2pdoe.cli.main"]
PROBE = """
import json, sys, importlib
importlib.import_module(sys.argv[1])
import numpy, scipy.linalg, threadpoolctl
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
env = {k: v for k, v in __import__("os").environ.items() if k.endswith("NUM_THREADS")}
print(json.dumps({"blas": blas, "env": env}))
"""


def probe(program: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES} | env
    command = [sys.executable, "-c", PROBE, program]
    out = subprocess.run(command, env=clean, capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_program_runs_one_blas_thread_by_default(program: str) -> None:
    seen = probe(program)
    assert seen["blas"], seen
    assert set(seen["blas"]) == {1}, seen  # type: ignore[arg-type]


def test_a_thread_count_the_environment_sets_is_kept() -> None:
    seen = probe("edge_agent", OMP_NUM_THREADS="2")
    assert seen["env"] == {"OMP_NUM_THREADS": "2"}, seen
    seen = probe("dso_coordinator", OPENBLAS_NUM_THREADS="2")
    assert seen["env"] == {"OPENBLAS_NUM_THREADS": "2"}, seen
    assert set(seen["blas"]) == {min(2, os.cpu_count() or 1)}, seen  # type: ignore[arg-type]


def test_one_blas_thread_sets_only_what_is_unset() -> None:
    env: dict[str, str] = {}
    assert one_blas_thread(env)
    assert env == {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    kept = {"MKL_NUM_THREADS": "4"}
    assert not one_blas_thread(kept)
    assert kept == {"MKL_NUM_THREADS": "4"}
    empty = {"OMP_NUM_THREADS": ""}  # set but empty counts as unset, as OpenBLAS reads it
    assert one_blas_thread(empty)
    assert empty["OPENBLAS_NUM_THREADS"] == "1"
