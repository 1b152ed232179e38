"""One BLAS thread for the services and the command line, unless the environment says otherwise.

numpy's and scipy's OpenBLAS start a thread per core for dense algebra, and on a busy machine those
threads spin waiting for each other: a polish that takes a second alone took minutes beside four busy
processes (docs/benchmarks.md). A service's problems are small and it has a core at most, so one
thread is the default. An OpenBLAS reads its thread count once, when it is loaded, so this must run
before numpy or scipy are imported: each program package calls it first thing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# What OpenBLAS, MKL and OpenMP read, in OpenBLAS's order of precedence after its own.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set one BLAS thread unless any thread count is already set; True when it set it."""
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in THREAD_VARIABLES):
        return False
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return True
