"""A community's QP as an OSQP workspace, built once per round.

Per iteration only the linear term changes (`solve(q)`), warm-started from the last solution; the
factorisation is reused until rho changes (`set_rho`, which updates the Hessian's diagonal values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import osqp
import scipy.sparse as sp

from p2pdoe.core.community import CommunityQP
from p2pdoe.core.network import FloatArray

OSQP_SETTINGS: dict[str, object] = {
    "verbose": False,
    "eps_abs": 1e-5,
    "eps_rel": 1e-5,
    "max_iter": 20000,
    "polishing": False,  # an iteration's proposal: the ADMM tolerances are far looser than OSQP's
    "warm_starting": True,
    "check_termination": 10,
}

SETTLE_EPS = 1e-6  # the final, pinned solve (polished): its schedule sits inside the grant to the watt


@dataclass(frozen=True)
class LocalSolve:
    z: FloatArray
    status: str
    iterations: int
    y: FloatArray  # the multipliers of the rows of A (positive at an upper bound, negative at a lower)


class LocalSolver:
    """min 1/2 z' diag(p + rho_diag) z + q' z  s.t.  l <= A z <= u."""

    def __init__(self, qp: CommunityQP, rho_diag: FloatArray, settings: dict[str, object] | None = None):
        self.qp = qp
        n = qp.layout.size
        self._p = _full_diagonal(qp.p_diag + rho_diag)
        self._solver = osqp.OSQP()
        self._solver.setup(
            P=self._p, q=qp.q.copy(), A=qp.a, l=qp.lower, u=qp.upper, **(settings or OSQP_SETTINGS)
        )
        self._rho_diag = rho_diag.copy()
        self._n = n

    def set_rho(self, rho_diag: FloatArray) -> None:
        """New augmented weights: one numeric refactorisation, same sparsity."""
        if np.array_equal(rho_diag, self._rho_diag):
            return
        self._rho_diag = rho_diag.copy()
        self._solver.update(Px=self.qp.p_diag + rho_diag)

    def solve(self, q: FloatArray) -> LocalSolve:
        self._solver.update(q=q)
        return self._run()

    def solve_fixed(self, q: FloatArray, fixed: list[tuple[slice, FloatArray]], eps: float) -> LocalSolve:
        """Solve with some blocks of z pinned to given values (their box rows set to l = u = value),
        then restore the original bounds."""
        lower, upper = self.qp.lower.copy(), self.qp.upper.copy()
        base = self.qp.a.shape[0] - self._n  # the identity rows come last
        for block, values in fixed:
            rows = slice(base + block.start, base + block.stop)
            lower[rows] = values
            upper[rows] = values
        self._solver.update(q=q, l=lower, u=upper)
        self._solver.update_settings(eps_abs=eps, eps_rel=eps, polishing=True)
        result = self._run()
        self._solver.update_settings(
            eps_abs=OSQP_SETTINGS["eps_abs"], eps_rel=OSQP_SETTINGS["eps_rel"], polishing=False
        )
        self._solver.update(l=self.qp.lower, u=self.qp.upper)
        return result

    def _run(self) -> LocalSolve:
        res = self._solver.solve(raise_error=False)
        return LocalSolve(
            np.asarray(res.x, dtype=float),
            str(res.info.status),
            int(res.info.iter),
            np.asarray(res.y, dtype=float),
        )


def _full_diagonal(values: FloatArray) -> sp.csc_matrix:
    """A diagonal matrix that stores every diagonal entry, zeros included, so Px can update any."""
    n = values.shape[0]
    return sp.csc_matrix((values, np.arange(n), np.arange(n + 1)), shape=(n, n))
