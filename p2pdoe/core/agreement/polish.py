"""A certified polish of ADMM's answer: the whole day's KKT system at an active set, solved the
decentralized way, corrected until every participant finds its own rows kept and its own
multipliers of the right sign (issue 18). Pure parties; not on the wire yet.

Each community starts from its equalities and the rows its last local solve gave a nonzero
multiplier, eliminates its variables there (a regularised KKT system) and hands over the affine
response of its coupling values w (trades, then its envelope's lower and upper corners) to their
prices nu: w(nu) = w0 - F F' nu (`SitePolish.response`). The coordinator, which knows the trading
graph and the safe set, takes as active every reciprocity row and the safe rows its grants hold at a
bound, solves (B F F' B' + REG I) pi = B w0 - h for the rows' multipliers pi and gives each
community its prices nu = B' pi (`DsoPolish.prices`). REFINEMENTS small exchanges (a correction of
each community's coupling values, one of the prices) then refine the answer against the exact
system, as one factorised KKT system of the whole day would be refined. Each community recovers
its schedule and its rows' multipliers.

The day's QP is degenerate: its multipliers are not unique, and the regularised system picks among
them. Each party regularises towards the multipliers ADMM already gave it (a community: its last
local solve's; the coordinator: the trade prices; the response keeps the regularisation's small
eigenvalues for this), so the system picks multipliers pulled towards those. Then each party checks its
own rows: rows violated join its active set, rows whose multiplier has the wrong sign leave it, and
the exchange repeats (`polish`). When no party changes anything, the schedules, the prices pi and
the multipliers satisfy every KKT condition of the day's QP (stationarity by construction,
feasibility and signs as checked), so the answer is the optimum: a certificate each party checks
on its own rows alone. When the rounds run out the polish is not certified and the caller goes on
with ADMM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from p2pdoe.core.community import CommunityQP, Layout
from p2pdoe.core.market import trade_links
from p2pdoe.core.network import FloatArray

if TYPE_CHECKING:  # an edge agent never imports the safe set's module
    from p2pdoe.core.envelope import Corner, SafeSet

ACTIVE_MULTIPLIER = 1e-7  # a local multiplier beyond this makes its row active
HELD_KW = 1e-3  # a safe row this close to its bound (kW-equivalent) is held there
VIOLATION = 1e-6  # a row violated by more joins the active set
WRONG_SIGN = 1e-7  # a multiplier this far on the wrong side makes its row leave
REG = 1e-9  # the KKT systems' regularisation, refined away
REFINEMENTS = 5
FACTOR_CUT = 1e-3 * REG  # eigenvalues below this leave a response's factor
MAX_ROUNDS = 20


def coupled_positions(layout: Layout) -> np.ndarray:
    """A community's coupling values in z: its trades (buys, then sells, in peer order), then its
    envelope's lower and upper corners if it has one."""
    parts = [np.arange(layout.trades.start, layout.trades.stop)]
    if "lo" in layout.blocks:
        parts += [np.arange(layout.block(name).start, layout.block(name).stop) for name in ("lo", "up")]
    return np.concatenate(parts)


@dataclass(frozen=True)
class Response:
    """A community's coupling values at zero coupling prices and their response to prices:
    w(nu) = base - factor @ factor.T @ nu."""

    base: FloatArray  # (m,)
    factor: FloatArray  # (m, r)


@dataclass(frozen=True)
class Changes:
    """What one party's check of its own rows changed in its active set."""

    joined: int = 0  # rows violated
    left: int = 0  # rows with a multiplier of the wrong sign

    def __add__(self, other: Changes) -> Changes:
        return Changes(self.joined + other.joined, self.left + other.left)

    @property
    def any(self) -> bool:
        return bool(self.joined or self.left)


def _checked(
    values: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
    y: FloatArray,
    at_lo: np.ndarray,
    at_up: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, Changes]:
    """Rows `values` violates join; rows held at one bound with a multiplier `y` of the wrong sign
    (negative at an upper bound, positive at a lower) leave. Equalities never leave."""
    equal = lower == upper
    over, under = ~equal & (values > upper + VIOLATION), ~equal & (values < lower - VIOLATION)
    one_side = ~equal & (at_lo != at_up)
    leave_up = one_side & at_up & (y < -WRONG_SIGN)
    leave_lo = one_side & at_lo & (y > WRONG_SIGN)
    changes = Changes(int(over.sum() + under.sum()), int(leave_up.sum() + leave_lo.sum()))
    return (at_lo & ~leave_lo) | under, (at_up & ~leave_up) | over, changes


@dataclass
class _Elimination:
    """A community's KKT system at its active set: exact, and regularised and factorised."""

    rows: np.ndarray
    exact: sp.csc_matrix
    lu: spla.SuperLU
    rhs: FloatArray  # of the exact system at zero coupling prices
    first: FloatArray  # the regularised system's solution there (pulled towards the prior)
    response: FloatArray  # (n + rows, m): the regularised system's response to coupling prices


@dataclass
class SitePolish:
    """A community's side: its active set and the regularised KKT system there, its response, its
    schedule and multipliers at the coordinator's prices, their refinement, and the check of its
    own rows."""

    qp: CommunityQP
    at_lo: np.ndarray
    at_up: np.ndarray
    prior: FloatArray  # the multipliers its system is regularised towards
    _system: _Elimination | None = field(default=None, repr=False)
    _state: FloatArray | None = field(default=None, repr=False)  # (z, y on the active rows)
    _prices: FloatArray | None = field(default=None, repr=False)
    _correction: FloatArray | None = field(default=None, repr=False)

    @classmethod
    def from_multipliers(cls, qp: CommunityQP, y: FloatArray) -> SitePolish:
        """Equalities and the rows `y` (its last local solve's multipliers) holds at a bound; `y` is
        also the prior."""
        equal = qp.lower == qp.upper
        at_lo = equal | (~equal & (y < -ACTIVE_MULTIPLIER))
        return cls(qp, at_lo, ~equal & (y > ACTIVE_MULTIPLIER), y.copy())

    def response(self) -> Response:
        system = self._eliminated()
        coupled = coupled_positions(self.qp.layout)
        return Response(system.first[coupled], _psd_factor(system.response[coupled]))

    def take_prices(self, prices: FloatArray) -> None:
        system = self._eliminated()
        self._state = system.first - system.response @ prices
        self._prices = prices.copy()

    def correction(self) -> FloatArray:
        """The regularised system's correction for the exact system's residual at the current
        state and prices: its coupling values' part, for the coordinator."""
        system, n = self._eliminated(), self.qp.layout.size
        assert self._state is not None
        assert self._prices is not None
        rhs = system.rhs.copy()
        rhs[coupled_positions(self.qp.layout)] -= self._prices
        self._correction = np.asarray(system.lu.solve(rhs - system.exact @ self._state))
        return np.asarray(self._correction[:n][coupled_positions(self.qp.layout)], dtype=float)

    def take_correction(self, prices: FloatArray) -> None:
        system = self._eliminated()
        assert self._state is not None
        assert self._prices is not None
        assert self._correction is not None
        self._state = self._state + self._correction - system.response @ prices
        self._prices = self._prices + prices

    def schedule(self) -> FloatArray:
        assert self._state is not None
        return self._state[: self.qp.layout.size]

    @property
    def coupling_size(self) -> int:
        return int(coupled_positions(self.qp.layout).size)

    def coupling_values(self) -> FloatArray:
        return np.asarray(self.schedule()[coupled_positions(self.qp.layout)], dtype=float)

    def multipliers(self) -> FloatArray:
        """Every row's multiplier (zero off the active set) at the current prices."""
        assert self._state is not None
        y = np.zeros(self.qp.a.shape[0])
        y[self._eliminated().rows] = self._state[self.qp.layout.size :]
        return y

    @property
    def prices(self) -> FloatArray:
        assert self._prices is not None
        return self._prices

    def check(self) -> Changes:
        """Its rows at the current state: violated ones join, wrong-signed ones leave."""
        at_lo, at_up, changes = _checked(
            self.qp.a @ self.schedule(),
            self.qp.lower,
            self.qp.upper,
            self.multipliers(),
            self.at_lo,
            self.at_up,
        )
        if changes.any:
            self.at_lo, self.at_up, self._system = at_lo, at_up, None
        return changes

    def _eliminated(self) -> _Elimination:
        if self._system is None:
            qp, coupled = self.qp, coupled_positions(self.qp.layout)
            rows = np.flatnonzero(self.at_lo | self.at_up)
            n, a = qp.layout.size, sp.csr_matrix(qp.a)[rows]
            exact = sp.csc_matrix(
                sp.vstack(
                    [sp.hstack([sp.diags(qp.p_diag), a.T]), sp.hstack([a, sp.csr_matrix((rows.size,) * 2)])]
                )
            )
            shift = np.concatenate([np.full(n, REG), np.full(rows.size, -REG)])
            lu = spla.splu(sp.csc_matrix(exact + sp.diags(shift)))
            rhs = np.concatenate([-qp.q, np.where(self.at_up, qp.upper, qp.lower)[rows]])
            pulled = rhs.copy()
            pulled[n:] -= REG * self.prior[rows]
            unit = np.zeros((n + rows.size, coupled.size))
            unit[coupled, np.arange(coupled.size)] = 1.0
            self._system = _Elimination(rows, exact, lu, rhs, lu.solve(pulled), lu.solve(unit))
        return self._system


def _psd_factor(s: FloatArray) -> FloatArray:
    """F with F F' = s (symmetric, positive semidefinite), down to eigenvalues of the
    regularisation's order, which choose among the non-unique prices: an absolute cut."""
    values, vectors = np.linalg.eigh(0.5 * (s + s.T))
    keep = values > FACTOR_CUT
    return np.asarray(vectors[:, keep] * np.sqrt(values[keep]))


@dataclass(frozen=True)
class CouplingRows:
    """Every coupling row over the communities' coupling values (concatenated in site order):
    lower <= B w <= upper; reciprocity rows have lower == upper == 0."""

    b: sp.csr_matrix
    lower: FloatArray
    upper: FloatArray
    sizes: tuple[int, ...]  # each community's number of coupling values
    reciprocity: int  # the first rows, link-major (`trade_links` order), interval-minor


def coupling_rows(layouts: list[Layout], safe: SafeSet | None) -> CouplingRows:
    """Reciprocity (a buyer's buy equals its seller's sell, every interval), then the safe set's
    upper corner rows (sum g up <= h) and lower corner rows (sum g lo >= h), row k * T + t."""
    sizes = [coupled_positions(lay).size for lay in layouts]
    starts = np.cumsum([0, *sizes])
    horizon = layouts[0].horizon
    if any(lay.horizon != horizon for lay in layouts):
        raise ValueError("every community's QP must cover the same intervals")
    blocks = [_reciprocity(layouts, starts)]
    lower, upper = [np.zeros(blocks[0].shape[0])], [np.zeros(blocks[0].shape[0])]
    if safe is not None:
        for corner, name in ((safe.upper, "up"), (safe.lower, "lo")):
            blocks.append(_corner(corner, layouts, starts, name))
            h = corner.h.reshape(-1)
            inf = np.full(h.size, np.inf)
            lower.append(-inf if name == "up" else h)
            upper.append(h if name == "up" else inf)
    b = sp.vstack(blocks, format="csr")
    return CouplingRows(b, np.concatenate(lower), np.concatenate(upper), tuple(sizes), blocks[0].shape[0])


def _reciprocity(layouts: list[Layout], starts: np.ndarray) -> sp.csr_matrix:
    horizon = layouts[0].horizon
    rows, cols, vals = [], [], []
    for r, link in enumerate(trade_links(tuple(lay.peers for lay in layouts))):
        buyer, seller = layouts[link.buyer], layouts[link.seller]
        buy = starts[link.buyer] + buyer.buy(link.buyer_pos).start - buyer.trades.start
        sell = starts[link.seller] + seller.sell(link.seller_pos).start - seller.trades.start
        for t in range(horizon):
            rows += [r * horizon + t] * 2
            cols += [buy + t, sell + t]
            vals += [1.0, -1.0]
    n_rows = len(rows) // 2
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, int(starts[-1])))


def _corner(corner: Corner, layouts: list[Layout], starts: np.ndarray, name: str) -> sp.csr_matrix:
    """A corner's rows over the communities' envelope values (`name`: "lo" or "up")."""
    horizon = layouts[0].horizon
    rows, cols, vals = [], [], []
    for k in range(corner.g.shape[0]):
        for c in np.flatnonzero(corner.g[k]):
            lay = layouts[c]
            trades = lay.trades.stop - lay.trades.start
            first = starts[c] + trades + (horizon if name == "up" else 0)
            rows += [k * horizon + t for t in range(horizon)]
            cols += [int(first) + t for t in range(horizon)]
            vals += [float(corner.g[k, c])] * horizon
    return sp.csr_matrix((vals, (rows, cols)), shape=(corner.g.shape[0] * horizon, int(starts[-1])))


@dataclass
class DsoPolish:
    """The coordinator's side: the coupling rows, which of them it holds active, the prices, and the
    check of its own rows."""

    rows: CouplingRows
    at_lo: np.ndarray
    at_up: np.ndarray
    prior: FloatArray  # the multipliers its system is regularised towards
    multipliers: FloatArray = field(init=False)  # every coupling row's, at the last prices
    _active: np.ndarray = field(init=False, repr=False)
    _b: sp.csr_matrix = field(init=False, repr=False)  # the active rows, at the last prices
    _lu: tuple[FloatArray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.multipliers = np.zeros(self.rows.b.shape[0])

    @classmethod
    def from_grants(
        cls, rows: CouplingRows, lo_kw: FloatArray, up_kw: FloatArray, trade_prices: FloatArray
    ) -> DsoPolish:
        """Reciprocity, and the safe rows the granted envelopes (C, T) hold within HELD_KW of a
        bound: what the coordinator knows. `trade_prices` (links, T), in EUR per kW and interval,
        are the reciprocity rows' prior."""
        horizon = lo_kw.shape[1]
        values = [
            np.concatenate([np.zeros(size - 2 * horizon), lo, up])
            for size, lo, up in zip(rows.sizes, lo_kw, up_kw, strict=True)
        ]
        bw = rows.b @ np.concatenate(values)
        equal = rows.lower == rows.upper
        at_lo = equal | (~equal & (bw - rows.lower <= HELD_KW))
        prior = np.zeros(rows.b.shape[0])
        prior[: rows.reciprocity] = trade_prices.reshape(-1)
        return cls(rows, at_lo, ~equal & (rows.upper - bw <= HELD_KW), prior)

    def prices(self, responses: list[Response]) -> list[FloatArray]:
        """Each community's coupling prices nu = B' pi, pi solving the active rows at the
        communities' responses (the regularised system, pulled towards the prior)."""
        self._active = np.flatnonzero(self.at_lo | self.at_up)
        self._b = b = self.rows.b[self._active]
        self._lu = scipy.linalg.lu_factor(_gram(b, [r.factor for r in responses]) + REG * np.eye(b.shape[0]))
        rhs = b @ np.concatenate([r.base for r in responses]) - self._targets()
        pi = scipy.linalg.lu_solve(self._lu, rhs + REG * self.prior[self._active])
        self.multipliers = np.zeros(self.rows.b.shape[0])
        self.multipliers[self._active] = pi
        return self._split(pi)

    def correct(self, corrections: list[FloatArray], values: FloatArray) -> list[FloatArray]:
        """The prices' refinement from the communities' corrections and their current coupling
        values (the exact rows' residual)."""
        b = self._b
        residual = self._targets() - b @ values
        delta = scipy.linalg.lu_solve(self._lu, b @ np.concatenate(corrections) - residual)
        self.multipliers[self._active] += delta
        return self._split(delta)

    def check(self, values: FloatArray) -> Changes:
        """Its rows at the communities' coupling values and its last prices: violated ones join,
        wrong-signed ones leave."""
        self.at_lo, self.at_up, changes = _checked(
            self.rows.b @ values, self.rows.lower, self.rows.upper, self.multipliers, self.at_lo, self.at_up
        )
        return changes

    def coupling_prices(self) -> list[FloatArray]:
        """Each community's coupling prices at every row's multiplier (the exchange's last)."""
        return np.split(self.rows.b.T @ self.multipliers, np.cumsum(self.rows.sizes)[:-1])

    def _targets(self) -> FloatArray:
        return np.asarray(np.where(self.at_up, self.rows.upper, self.rows.lower)[self._active])

    def _split(self, pi: FloatArray) -> list[FloatArray]:
        return np.split(self._b.T @ pi, np.cumsum(self.rows.sizes)[:-1])


def _gram(b: sp.csr_matrix, factors: list[FloatArray]) -> FloatArray:
    """B (block-diagonal F F') B', from each community's factor F: a sum over communities, each
    over the rows that touch its coupling values only (a row touches two communities or a few)."""
    gram = np.zeros((b.shape[0], b.shape[0]))
    csc = sp.csc_matrix(b)
    start = 0
    for f in factors:
        block = csc[:, start : start + f.shape[0]]
        start += f.shape[0]
        rows = np.unique(block.indices)
        if rows.size:
            x = sp.csr_matrix(block[rows]) @ f
            gram[np.ix_(rows, rows)] += x @ x.T
    return gram


@dataclass(frozen=True)
class Polished:
    z: list[FloatArray]  # each community's schedule
    trade_prices: FloatArray  # (links, T), EUR per kW and interval: the reciprocity rows' multipliers
    rounds: int  # exchanges
    certified: bool  # every party found its rows kept and its multipliers of the right sign


def solve(sites: list[SitePolish], dso: DsoPolish) -> None:
    """One solve of the day's KKT system at the parties' active sets: the communities' responses,
    the coordinator's prices, then REFINEMENTS small exchanges against the exact system."""
    for site, nu in zip(sites, dso.prices([site.response() for site in sites]), strict=True):
        site.take_prices(nu)
    for _ in range(REFINEMENTS):
        corrections = [site.correction() for site in sites]
        values = np.concatenate([site.coupling_values() for site in sites])
        for site, nu in zip(sites, dso.correct(corrections, values), strict=True):
            site.take_correction(nu)


def polish(sites: list[SitePolish], dso: DsoPolish, max_rounds: int = MAX_ROUNDS) -> Polished:
    """The exchange, in one place: responses, prices, REFINEMENTS corrections, then each party's
    check of its own rows; again while any party changed its active set, at most `max_rounds`
    times."""
    rounds, changes = 0, Changes(joined=1)
    while changes.any and rounds < max_rounds:
        rounds += 1
        solve(sites, dso)
        changes = dso.check(np.concatenate([site.coupling_values() for site in sites]))
        for site in sites:
            changes += site.check()
    links = dso.multipliers[: dso.rows.reciprocity]
    horizon = sites[0].qp.layout.horizon
    z = [site.schedule() for site in sites]
    return Polished(z, links.reshape(-1, horizon), rounds, not changes.any)
