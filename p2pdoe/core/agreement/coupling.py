"""Consensus ADMM for one family of equalities a = b between two parties (Boyd et al. 2011, §7.1).

Each party solves its own problem with the augmented term  price * a + rho/2 |a - y|^2  (the second
party with -price), then both update, from the two proposals and with the same arithmetic,

    a' = alpha a + (1 - alpha) y,   b' = alpha b + (1 - alpha) y      (over-relaxation)
    y+ = (a' + b') / 2,             price+ = price + rho (a' - b') / 2

`price` is in EUR per kW and interval (EUR/kWh times dt_h); rho in EUR per kW^2 and interval.
Residuals are kept in kW: the dual residual is Boyd's s divided by rho.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from p2pdoe.core.network import FloatArray


@dataclass(frozen=True)
class Agreed:
    y: FloatArray
    price: FloatArray


def consensus_step(a: FloatArray, b: FloatArray, prev: Agreed, rho: float, alpha: float) -> Agreed:
    a_rel = alpha * a + (1.0 - alpha) * prev.y
    b_rel = alpha * b + (1.0 - alpha) * prev.y
    return Agreed(y=0.5 * (a_rel + b_rel), price=prev.price + 0.5 * rho * (a_rel - b_rel))


def kept_rows(new: Agreed, old: Agreed, rows: list[int]) -> Agreed:
    """`new`, except that `rows` keep their old values and prices (couplings frozen this iteration)."""
    if not rows:
        return new
    y, price = new.y.copy(), new.price.copy()
    y[rows], price[rows] = old.y[rows], old.price[rows]
    return Agreed(y, price)


def augmented_linear(price: FloatArray, y: FloatArray, rho: float, first: bool) -> FloatArray:
    """The linear term a party adds for its copy (the Hessian gets +rho on the same entries)."""
    return (price if first else -price) - rho * y


@dataclass(frozen=True)
class ResidualSums:
    """Sums of squares over a family's couplings (each coupled value counted for both copies)."""

    primal: float = 0.0  # |a - y+|^2 + |b - y+|^2
    dual: float = 0.0  # 2 |y+ - y|^2  (Boyd's s / rho)
    proposals: float = 0.0  # |a|^2 + |b|^2
    agreed: float = 0.0  # 2 |y+|^2
    prices: float = 0.0  # 2 |price+ / rho|^2
    count: int = 0  # number of copies (2 per coupled value)

    def __add__(self, other: ResidualSums) -> ResidualSums:
        return ResidualSums(
            self.primal + other.primal,
            self.dual + other.dual,
            self.proposals + other.proposals,
            self.agreed + other.agreed,
            self.prices + other.prices,
            self.count + other.count,
        )


def residual_sums(a: FloatArray, b: FloatArray, prev: Agreed, new: Agreed, rho: float) -> ResidualSums:
    return ResidualSums(
        primal=float(np.sum((a - new.y) ** 2) + np.sum((b - new.y) ** 2)),
        dual=float(2.0 * np.sum((new.y - prev.y) ** 2)),
        proposals=float(np.sum(a**2) + np.sum(b**2)),
        agreed=float(2.0 * np.sum(new.y**2)),
        prices=float(2.0 * np.sum((new.price / rho) ** 2)),
        count=2 * int(np.size(a)),
    )


@dataclass(frozen=True)
class Residuals:
    """l2 residuals and Boyd's stopping thresholds, all in kW."""

    primal_kw: float
    dual_kw: float
    eps_primal_kw: float
    eps_dual_kw: float
    relative_primal: float = 0.0  # |r| / max(|Ax|, |Bz|)
    relative_dual: float = 0.0  # rho |s| / |A'y|: the dual residual relative to the prices

    @property
    def converged(self) -> bool:
        return self.primal_kw <= self.eps_primal_kw and self.dual_kw <= self.eps_dual_kw


def residuals(sums: ResidualSums, eps_abs_kw: float, eps_rel: float) -> Residuals:
    """Boyd's criteria with sqrt(n) scaling, both residuals in kW:
    ||r|| <= sqrt(n) eps_abs + eps_rel max(||Ax||, ||Bz||), and the same bound for ||s|| / rho (the
    relative part in kW too, so the test does not loosen as rho falls)."""
    root_n = math.sqrt(sums.count)
    scale = math.sqrt(max(sums.proposals, sums.agreed))
    eps = root_n * eps_abs_kw + eps_rel * scale
    return Residuals(
        primal_kw=math.sqrt(sums.primal),
        dual_kw=math.sqrt(sums.dual),
        eps_primal_kw=eps,
        eps_dual_kw=eps,
        relative_primal=math.sqrt(sums.primal) / max(scale, 1e-12),
        relative_dual=math.sqrt(sums.dual) / max(math.sqrt(sums.prices), 1e-12),
    )


def rebalanced_rho(rho: float, r: Residuals, threshold: float, max_factor: float) -> float:
    """OSQP-style adaptive rho: rho * sqrt(relative primal / relative dual), where the relative dual is
    rho |dy| / |price|; applied only when the factor is beyond `threshold` (either way)."""
    if r.relative_dual <= 0 or r.relative_primal <= 0:
        return rho
    factor = math.sqrt(r.relative_primal / r.relative_dual)
    if 1.0 / threshold < factor < threshold:
        return rho
    return rho * min(max(factor, 1.0 / max_factor), max_factor)
