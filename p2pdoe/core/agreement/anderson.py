"""Safeguarded type-II Anderson acceleration of the agreement (A2DR: Fu, Zhang & Boyd, SIAM J. Sci.
Comput. 2020), done so that every party keeps the same numbers.

The state x of a round is every coupling's agreed value and price; one iteration maps it to F(x)
(the solves, then `consensus_step`). Anderson sets the next state to a combination of the last
m + 1 updates, x+ = sum_j w_j F(x_{k-m+j}) with sum_j w_j = 1, the weights making the same
combination of the residuals g = x - F(x) as small as it can (regularised least squares).

The DSO mirrors every coupling already (for the residuals), so it alone computes the weights and
sends them in its grants: one short list per iteration, nothing else on the wire. Each party mixes
its own couplings over its own last m + 1 updates with those weights, element by element in the
same order, so a coupling's two copies stay equal to the last bit.

Safeguard (as SCS 3 guards its Anderson steps): a mixed state stands if the residual it produces
is at most `safeguard_factor` times the residual of the state before it. The check is lagged: the
DSO reads that residual one iteration later, and if it fails, its weights (1, 0) take every party
back to the plain update of the state before the mixed one, and the memory starts afresh. Prices
enter the residual divided by rho (in kW, like the agreed values), and a change of rho also starts
the memory afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from p2pdoe.core.agreement.coupling import Agreed
from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import AndersonSettings


def anderson_weights(y: FloatArray, s: FloatArray, g: FloatArray, regularization: float) -> FloatArray:
    """w (m + 1,) summing to one, from Y = [g_{j+1} - g_j] and S = [x_{j+1} - x_j] (n, m) and the
    latest residual g (n,): c = argmin |g - Y c|^2 + lam |c|^2, lam = reg (|Y|^2 + |S|^2), then
    w_0 = c_0, w_j = c_j - c_{j-1}, w_m = 1 - c_{m-1}."""
    lam = regularization * (float(np.sum(y * y)) + float(np.sum(s * s)))
    gram = y.T @ y + lam * np.eye(y.shape[1])
    c = np.linalg.lstsq(gram, y.T @ g, rcond=None)[0]
    return np.concatenate(([c[0]], np.diff(c), [1.0 - c[-1]]))


def mixed(history: Sequence[Agreed], weights: Sequence[float]) -> Agreed:
    """sum_j w_j history[-len(w) + j], values and prices alike, in one fixed order of operations."""
    recent = history[len(history) - len(weights) :]
    y, price = weights[0] * recent[0].y, weights[0] * recent[0].price
    for w, a in zip(weights[1:], recent[1:], strict=True):
        y = y + w * a.y
        price = price + w * a.price
    return Agreed(y, price)


class Accelerator:
    """The DSO's side: from each iteration's state before and after the plain update, the weights
    the next state is mixed with, or None for the plain step."""

    def __init__(self, settings: AndersonSettings):
        self.settings = settings
        self.accelerated = 0  # mixed steps taken
        self.rejected = 0  # mixed steps the safeguard undid
        self._mixed_last = False
        self._last: tuple[FloatArray, FloatArray] | None = None  # (x, g) of the previous iteration
        self._y: deque[FloatArray] = deque(maxlen=max(settings.memory, 1))
        self._s: deque[FloatArray] = deque(maxlen=max(settings.memory, 1))

    def restart(self) -> None:
        """Forget the memory (rho changed, or a mixed step was undone)."""
        self._last = None
        self._mixed_last = False
        self._y.clear()
        self._s.clear()

    def weights(self, x: FloatArray, f: FloatArray) -> list[float] | None:
        g = x - f
        last, self._last = self._last, (x, g)
        if last is None:
            return None
        if self._mixed_last and np.linalg.norm(g) > self.settings.safeguard_factor * np.linalg.norm(last[1]):
            self.rejected += 1
            self.restart()
            return [1.0, 0.0]  # back to the plain update of the previous state
        self._s.append(x - last[0])
        self._y.append(g - last[1])
        w = anderson_weights(
            np.column_stack(self._y), np.column_stack(self._s), g, self.settings.regularization
        )
        self._mixed_last = bool(np.all(np.isfinite(w)))
        if not self._mixed_last:
            return None
        self.accelerated += 1
        return [float(v) for v in w]
