"""The DSO's subproblem: project the targets onto the safe set of envelope boxes.

    min  1/2 sum_t |LO[:, col(t)] - target_lo[:, t]|^2 + 1/2 sum_t |UP[:, col(t)] - target_up[:, t]|^2
    s.t. G_up UP[:, col(t)] <= h_up[:, t],  G_lo LO[:, col(t)] >= h_lo[:, t],  technical bounds

col(t) = t for dynamic envelopes, 0 for a static box; dynamic boxes are solved one QP per interval
from `PER_INTERVAL_FROM_SITES` sites on. The objective is the augmented Lagrangian
divided by rho, so the Hessian never changes and rho never forces a refactorisation. Projections
after the first stop after `PROJECTION_MAX_ITER` OSQP iterations (ADMM only needs them to improve);
the result is clipped to the technical bounds and shifted inward by any remaining violation (rows are
normalised, largest coefficient 1, all coefficients >= 0, so a shift of v kW on every site lowers each
row by at least v): the grant is network-safe to solver round-off. An early-stopped projection may
need a shift that takes a box a little past a site's technical bound (it is still safe; accurate
projections near convergence need none); one that would leave a box empty is finished to full
accuracy first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import osqp
import scipy.sparse as sp

from p2pdoe.core.agreement.local_solver import OSQP_SETTINGS
from p2pdoe.core.envelope import Corner, SafeSet
from p2pdoe.core.network import FloatArray, IntArray
from p2pdoe.errors import InfeasibleError

GRID_OSQP_SETTINGS = {**OSQP_SETTINGS, "polishing": True}  # every grant polished: safe to the watt
SAFETY_SLACK_KW = 1e-9
PER_INTERVAL_FROM_SITES = 70  # between 50 (one QP cheaper) and 100 (per interval cheaper)
PROJECTION_MAX_ITER = 200  # OSQP iterations per projection after the first (measured: p95 14 -> 5 ms)


@dataclass(frozen=True)
class Bounds:
    """Public technical bounds of each site's envelope, (C, T) each: lo in [lo_min, lo_max] etc."""

    lo_min: FloatArray
    lo_max: FloatArray
    up_min: FloatArray
    up_max: FloatArray


@dataclass(frozen=True)
class GridSolve:
    lo: FloatArray  # (C, T) granted, safe
    up: FloatArray  # (C, T)
    row_duals_up: FloatArray  # (K_up, T) >= 0, per unit of the scaled objective
    row_duals_lo: FloatArray  # (K_lo, T) >= 0
    status: str
    iterations: int


class GridSolver:
    """The projection for the whole horizon. Dynamic boxes are separate by interval: with many sites
    each interval is its own QP, which stops as soon as it has converged (one QP over the day runs
    every interval until the slowest has). A static box couples the intervals and is one QP."""

    def __init__(self, safe: SafeSet, bounds: Bounds, static: bool):
        self.safe = safe
        self.n_sites, self.horizon = bounds.lo_min.shape
        spans = [slice(0, self.horizon)] if static else _spans(self.n_sites, self.horizon)
        self._blocks = [(span, _block(safe, bounds, static, span)) for span in spans]

    def rows_kept(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(kept, all) corner rows over the horizon, upper corner then lower."""
        per_block = [[n for corner in b.rows_kept() for n in corner] for _, b in self._blocks]
        up_kept, up_all, lo_kept, lo_all = (int(n) for n in np.sum(per_block, axis=0))
        return (up_kept, up_all), (lo_kept, lo_all)

    def solve(self, target_lo: FloatArray, target_up: FloatArray, accurate: bool = False) -> GridSolve:
        """The safe boxes nearest the targets; `accurate` solves to full accuracy instead of stopping
        after `PROJECTION_MAX_ITER` iterations."""
        parts = [b.solve(target_lo[:, span], target_up[:, span], accurate) for span, b in self._blocks]
        lo, up = np.hstack([p.lo for p in parts]), np.hstack([p.up for p in parts])
        if len(parts) > 1:  # checked again over the whole horizon: the same rows summed in another
            # order can differ by round-off, and a grant must be safe however it is checked
            lo, up = _made_safe(self.safe, np.arange(self.horizon, dtype=np.int64), lo, up)
        unsolved = [p.status for p in parts if p.status != "solved"]
        return GridSolve(
            lo=lo,
            up=up,
            row_duals_up=np.hstack([p.row_duals_up for p in parts]),
            row_duals_lo=np.hstack([p.row_duals_lo for p in parts]),
            status=unsolved[0] if unsolved else "solved",
            iterations=max(p.iterations for p in parts),
        )


def _spans(n_sites: int, horizon: int) -> list[slice]:
    """One QP per interval from `PER_INTERVAL_FROM_SITES` sites on, one QP for the day below that,
    where the calls cost more than the iterations they save (measured: docs/benchmarks.md)."""
    if n_sites < PER_INTERVAL_FROM_SITES:
        return [slice(0, horizon)]
    return [slice(t, t + 1) for t in range(horizon)]


def _block(safe: SafeSet, bounds: Bounds, static: bool, span: slice) -> _Block:
    try:
        return _Block(_safe_in(safe, span), _bounds_in(bounds, span), static)
    except InfeasibleError as e:
        if static:
            raise
        first = next((t for t in range(span.start, span.stop) if not _servable(safe, bounds, t)), span.start)
        raise InfeasibleError(f"{e} (first at interval {first})") from e


def _servable(safe: SafeSet, bounds: Bounds, t: int) -> bool:
    try:
        _Block(_safe_in(safe, slice(t, t + 1)), _bounds_in(bounds, slice(t, t + 1)), static=False)
    except InfeasibleError:
        return False
    return True


def _safe_in(safe: SafeSet, span: slice) -> SafeSet:
    return SafeSet(
        upper=dataclasses.replace(safe.upper, h=safe.upper.h[:, span]),
        lower=dataclasses.replace(safe.lower, h=safe.lower.h[:, span]),
    )


def _bounds_in(bounds: Bounds, span: slice) -> Bounds:
    return Bounds(*(b[:, span] for b in (bounds.lo_min, bounds.lo_max, bounds.up_min, bounds.up_max)))


class _Block:
    """The projection over some intervals: all of them for a static box, one for a dynamic one."""

    def __init__(self, safe: SafeSet, bounds: Bounds, static: bool):
        self.safe = safe
        self.n_sites, self.horizon = bounds.lo_min.shape
        self.cols = 1 if static else self.horizon
        self._col_of_t = (
            np.zeros(self.horizon, dtype=np.int64) if static else np.arange(self.horizon, dtype=np.int64)
        )
        self._expand = sp.csr_matrix(
            (np.ones(self.horizon), (np.arange(self.horizon), self._col_of_t)),
            shape=(self.horizon, self.cols),
        )
        n_half = self.n_sites * self.cols
        # a row no box within the technical bounds can violate is left out (g >= 0, so its extreme
        # is at the bound); `_made_safe` still checks every row
        self._can_bind_up = (safe.upper.g @ bounds.up_max > safe.upper.h - SAFETY_SLACK_KW).T.ravel()
        self._can_bind_lo = (safe.lower.g @ bounds.lo_min < safe.lower.h + SAFETY_SLACK_KW).T.ravel()
        a_up = self._corner_rows(safe.upper)[self._can_bind_up]
        a_lo = self._corner_rows(safe.lower)[self._can_bind_lo]
        a = sp.vstack(
            [
                sp.hstack([sp.csr_matrix((a_up.shape[0], n_half)), a_up]),
                sp.hstack([a_lo, sp.csr_matrix((a_lo.shape[0], n_half))]),
                sp.identity(2 * n_half),
            ],
            format="csc",
        )
        inf_up = np.full(a_up.shape[0], np.inf)
        inf_lo = np.full(a_lo.shape[0], np.inf)
        h_up = _by_t(safe.upper.h)[self._can_bind_up]
        h_lo = _by_t(safe.lower.h)[self._can_bind_lo]
        lower = np.concatenate([-inf_up, h_lo, self._pack(bounds.lo_min, bounds.up_min)])
        upper = np.concatenate([h_up, inf_lo, self._pack(bounds.lo_max, bounds.up_max)])
        packed_lower = self._pack(bounds.lo_min, bounds.up_min)
        packed_upper = self._pack(bounds.lo_max, bounds.up_max)
        self._bounds_lo = (packed_lower[:n_half], packed_upper[:n_half])
        self._bounds_up = (packed_lower[n_half:], packed_upper[n_half:])
        self._sum_by_col = self._expand.toarray()  # dense: a sparse product costs more than the sum
        per_col = self._sum_by_col.sum(axis=0)  # intervals sharing each column
        self._p = sp.diags(np.tile(np.repeat(per_col, self.n_sites), 2), format="csc")
        self._n_up_rows, self._n_lo_rows = a_up.shape[0], a_lo.shape[0]
        self._solver = osqp.OSQP()
        self._solver.setup(P=self._p, q=np.zeros(2 * n_half), A=a, l=lower, u=upper, **GRID_OSQP_SETTINGS)
        # a first projection to full accuracy proves a safe box exists; later ones stop early (the
        # grant is made safe below anyway, and ADMM only needs the projection to improve)
        self.solve(np.zeros((self.n_sites, self.horizon)), np.zeros((self.n_sites, self.horizon)))
        self._solver.update_settings(max_iter=PROJECTION_MAX_ITER)

    def rows_kept(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(kept, all) corner rows over the horizon, upper corner then lower."""
        up, lo = self._can_bind_up, self._can_bind_lo
        return (int(up.sum()), int(up.size)), (int(lo.sum()), int(lo.size))

    def _corner_rows(self, corner: Corner) -> sp.csr_matrix:
        """Row (t, k) of G @ V[:, col(t)], with V packed column by column: index col * C + c."""
        return sp.csr_matrix(sp.kron(self._expand, sp.csr_matrix(corner.g)))

    def _pack(self, lo: FloatArray, up: FloatArray) -> FloatArray:
        """(C, T) bounds to packed (LO, UP) vectors; a static column's bounds are the same at every t
        (the community's hull), so its first interval stands for all."""
        return np.concatenate([lo[:, : self.cols].T.ravel(), up[:, : self.cols].T.ravel()])

    def _targets(self, target: FloatArray) -> FloatArray:
        """-(E' target) packed: sum over the t of each column."""
        summed = target @ self._sum_by_col  # (C, cols)
        return np.asarray(-summed.T.ravel())

    def solve(self, target_lo: FloatArray, target_up: FloatArray, accurate: bool = False) -> GridSolve:
        """The safe boxes nearest the targets; `accurate` solves to full accuracy instead of stopping
        after `PROJECTION_MAX_ITER` iterations."""
        q = np.concatenate([self._targets(target_lo), self._targets(target_up)])
        self._solver.update(q=q)
        res = self._run_accurately() if accurate else self._run()
        lo, up = _made_safe(self.safe, self._col_of_t, *self._unpacked(res.x))
        if np.any(lo > up):  # an early stop left the shifted box empty: finish the solve
            res = self._run_accurately()
            lo, up = _made_safe(self.safe, self._col_of_t, *self._unpacked(res.x))
        y = np.asarray(res.y, dtype=float)
        duals_up = np.zeros(self._can_bind_up.size)
        duals_lo = np.zeros(self._can_bind_lo.size)
        duals_up[self._can_bind_up] = np.maximum(y[: self._n_up_rows], 0.0)
        duals_lo[self._can_bind_lo] = np.maximum(-y[self._n_up_rows : self._n_up_rows + self._n_lo_rows], 0.0)
        return GridSolve(
            lo=lo[:, self._col_of_t],
            up=up[:, self._col_of_t],
            row_duals_up=duals_up.reshape(self.horizon, -1).T,
            row_duals_lo=duals_lo.reshape(self.horizon, -1).T,
            status=str(res.info.status),
            iterations=int(res.info.iter),
        )

    def _run_accurately(self) -> Any:
        self._solver.update_settings(max_iter=int(str(GRID_OSQP_SETTINGS["max_iter"])))
        try:
            return self._run()
        finally:
            self._solver.update_settings(max_iter=PROJECTION_MAX_ITER)

    def _run(self) -> Any:
        res = self._solver.solve(raise_error=False)
        if "infeasible" in str(res.info.status):
            raise InfeasibleError(
                "no envelope box within the sites' technical ranges is network-safe: "
                "the DSO cannot grant anything safe"
            )
        return res

    def _unpacked(self, x: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Packed solution to (C, cols) boxes, clipped to the technical bounds."""
        v = np.asarray(x, dtype=float)
        half = self.n_sites * self.cols
        lo = np.clip(v[:half], self._bounds_lo[0], self._bounds_lo[1])
        up = np.clip(v[half:], self._bounds_up[0], self._bounds_up[1])
        return lo.reshape(self.cols, self.n_sites).T, up.reshape(self.cols, self.n_sites).T


def _made_safe(
    safe: SafeSet, col_of_t: IntArray, lo: FloatArray, up: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Shift each column of the (C, cols) boxes inward by its largest corner violation (zero when the
    solve is exact); `col_of_t` maps each interval of `safe` to its column."""
    over = safe.upper.g @ up[:, col_of_t] - safe.upper.h  # (K, T)
    under = safe.lower.h - safe.lower.g @ lo[:, col_of_t]
    shift_up = np.zeros(lo.shape[1])
    shift_lo = np.zeros(lo.shape[1])
    np.maximum.at(shift_up, col_of_t, over.max(axis=0, initial=0.0))
    np.maximum.at(shift_lo, col_of_t, under.max(axis=0, initial=0.0))
    shift_up = np.where(shift_up > 0, shift_up + SAFETY_SLACK_KW, 0.0)
    shift_lo = np.where(shift_lo > 0, shift_lo + SAFETY_SLACK_KW, 0.0)
    return lo + shift_lo[None, :], up - shift_up[None, :]


def _by_t(h: FloatArray) -> FloatArray:
    """(K, T) right-hand sides in row order (t, k)."""
    return h.T.ravel()


def safe_within(safe: SafeSet, lo: FloatArray, up: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The (C, T) box, each interval shifted inward by its largest corner violation, if any."""
    return _made_safe(safe, np.arange(lo.shape[1], dtype=np.int64), lo, up)


def is_safe(safe: SafeSet, lo: FloatArray, up: FloatArray, tol_kw: float = 1e-7) -> bool:
    """Both corners of the box [lo, up] (C, T) meet every row within `tol_kw`."""
    upper_ok = bool(np.all(safe.upper.g @ up <= safe.upper.h + tol_kw))
    lower_ok = bool(np.all(safe.lower.g @ lo >= safe.lower.h - tol_kw))
    return upper_ok and lower_ok and bool(np.all(lo <= up + tol_kw))
