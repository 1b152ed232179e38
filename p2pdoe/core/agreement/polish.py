"""A polish of ADMM's answer: the whole day's KKT system at the active set the participants' own
multipliers name, solved the decentralized way (issue 18).

Each community takes as its active rows its equalities and the rows its last local solve gave a
nonzero multiplier, eliminates its variables there and hands over the affine response of its
coupling values w (trades, then its envelope's lower and upper corners) to their prices nu:
w(nu) = w0 - F F' nu, as a factor F of low rank (`SitePolish.response`). The coordinator, which
knows the trading graph and the safe set, takes as active every reciprocity row and the safe rows its
grants hold at a bound, solves B (sum of F F') B' pi = B w0 - h for the rows' multipliers pi and
gives each community its prices nu = B' pi (`DsoPolish.prices`). Each community recovers its
schedule; rows violated, the community's or the coordinator's, join and the exchange repeats
(`polish`). The answer is the optimum exactly when the guessed active set holds it; whether it does
is the acceptance question this module does not answer (see docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from p2pdoe.core.community import CommunityQP, Layout
from p2pdoe.core.envelope import Corner, SafeSet
from p2pdoe.core.market import trade_links
from p2pdoe.core.network import FloatArray

ACTIVE_MULTIPLIER = 1e-7  # a local multiplier beyond this makes its row active
HELD_KW = 1e-3  # a safe row this close to its bound (kW-equivalent) is held there
VIOLATION = 1e-6  # a row violated by more joins the active set
REG = 1e-9  # the KKT systems' regularisation, refined away
REFINEMENTS = 5
RANK_TOL = 1e-12  # of the largest eigenvalue: smaller ones leave a response's factor
MAX_CORRECTIONS = 10


def coupled_positions(layout: Layout) -> np.ndarray:
    """A community's coupling values in z: its trades (buys, then sells, in peer order), then its
    envelope's lower and upper corners if it has one."""
    parts = [np.arange(layout.trades.start, layout.trades.stop)]
    if "lo" in layout.blocks:
        parts += [np.arange(layout.block(name).start, layout.block(name).stop) for name in ("lo", "up")]
    return np.concatenate(parts)


@dataclass(frozen=True)
class Response:
    """A community's coupling values at zero coupling prices, and their response to prices:
    w(nu) = base - factor @ factor.T @ nu."""

    base: FloatArray  # (m,)
    factor: FloatArray  # (m, r)


@dataclass
class SitePolish:
    """A community's side of the polish: its active set, its response, its schedule at given
    coupling prices, and the rows that schedule violates."""

    qp: CommunityQP
    at_lo: np.ndarray
    at_up: np.ndarray
    _eliminated: tuple[FloatArray, FloatArray] | None = field(default=None, repr=False)

    @classmethod
    def from_multipliers(cls, qp: CommunityQP, y: FloatArray) -> SitePolish:
        """Equalities, and the rows `y` (its last local solve's multipliers) holds at a bound."""
        equal = qp.lower == qp.upper
        return cls(qp, equal | (~equal & (y < -ACTIVE_MULTIPLIER)), ~equal & (y > ACTIVE_MULTIPLIER))

    def response(self) -> Response:
        _, w = self._solved()
        coupled = coupled_positions(self.qp.layout)
        s = w[coupled]
        values, vectors = np.linalg.eigh(0.5 * (s + s.T))
        keep = values > RANK_TOL * max(float(values[-1]), 1e-300)
        return Response(self._solved()[0][coupled], vectors[:, keep] * np.sqrt(values[keep]))

    def schedule(self, prices: FloatArray) -> FloatArray:
        z0, w = self._solved()
        return z0 - w @ prices

    def join_violated(self, z: FloatArray) -> int:
        """Rows `z` violates join the active set; how many joined."""
        az = self.qp.a @ z
        over, under = az > self.qp.upper + VIOLATION, az < self.qp.lower - VIOLATION
        self.at_up, self.at_lo = self.at_up | over, self.at_lo | under
        if over.any() or under.any():
            self._eliminated = None
        return int(over.sum() + under.sum())

    def _solved(self) -> tuple[FloatArray, FloatArray]:
        """The schedule at zero coupling prices, and its response to them (n, m)."""
        if self._eliminated is None:
            qp, coupled = self.qp, coupled_positions(self.qp.layout)
            rows = np.flatnonzero(self.at_lo | self.at_up)
            bound = np.where(self.at_up, qp.upper, qp.lower)[rows]
            n = qp.layout.size
            rhs = np.zeros((n + rows.size, 1 + coupled.size))
            rhs[:n, 0] = -qp.q
            rhs[n:, 0] = bound
            rhs[coupled, 1 + np.arange(coupled.size)] = 1.0
            sol = _refined_kkt_solve(qp.p_diag, sp.csr_matrix(qp.a)[rows], rhs)
            self._eliminated = (sol[:n, 0], sol[:n, 1:])
        return self._eliminated


def _refined_kkt_solve(p_diag: FloatArray, a: sp.csr_matrix, rhs: FloatArray) -> FloatArray:
    """[[P, A'], [A, 0]] x = rhs, by a regularised factorisation and iterative refinement."""
    m = a.shape[0]
    top = sp.hstack([sp.diags(p_diag), a.T])
    exact = sp.csc_matrix(sp.vstack([top, sp.hstack([a, sp.csr_matrix((m, m))])]))
    regularised = sp.csc_matrix(
        exact + sp.diags(np.concatenate([np.full(p_diag.size, REG), np.full(m, -REG)]))
    )
    lu = spla.splu(regularised)
    sol = lu.solve(rhs)
    for _ in range(REFINEMENTS):
        sol = sol + lu.solve(rhs - exact @ sol)
    return np.asarray(sol)


@dataclass(frozen=True)
class CouplingRows:
    """Every coupling row over the communities' coupling values (concatenated in site order):
    lower <= B w <= upper; reciprocity rows have lower == upper == 0."""

    b: sp.csr_matrix
    lower: FloatArray
    upper: FloatArray
    sizes: tuple[int, ...]  # each community's number of coupling values


def coupling_rows(layouts: list[Layout], safe: SafeSet | None) -> CouplingRows:
    """Reciprocity (a buyer's buy equals its seller's sell, every interval), then the safe set's
    upper corner rows (sum g up <= h) and lower corner rows (sum g lo >= h), row k * T + t."""
    sizes = [coupled_positions(lay).size for lay in layouts]
    starts = np.cumsum([0, *sizes])
    horizon = layouts[0].horizon
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
    assert b.shape[1] == starts[-1]
    assert all(lay.horizon == horizon for lay in layouts)
    return CouplingRows(b, np.concatenate(lower), np.concatenate(upper), tuple(sizes))


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
    """The coordinator's side: the coupling rows, which of them it holds active, the prices."""

    rows: CouplingRows
    at_lo: np.ndarray
    at_up: np.ndarray

    @classmethod
    def from_grants(cls, rows: CouplingRows, lo_kw: FloatArray, up_kw: FloatArray) -> DsoPolish:
        """Reciprocity, and the safe rows the granted envelopes (C, T) hold within HELD_KW of a
        bound: what the coordinator knows."""
        horizon = lo_kw.shape[1]
        values = [
            np.concatenate([np.zeros(size - 2 * horizon), lo, up])
            for size, lo, up in zip(rows.sizes, lo_kw, up_kw, strict=True)
        ]
        bw = rows.b @ np.concatenate(values)
        equal = rows.lower == rows.upper
        at_lo = equal | (~equal & (bw - rows.lower <= HELD_KW))
        return cls(rows, at_lo, ~equal & (rows.upper - bw <= HELD_KW))

    def prices(self, responses: list[Response]) -> list[FloatArray]:
        """Each community's coupling prices nu = B' pi, pi solving the active rows at the
        communities' responses."""
        active = np.flatnonzero(self.at_lo | self.at_up)
        b = self.rows.b[active]
        base = np.concatenate([r.base for r in responses])
        bf = (b @ sp.block_diag([r.factor for r in responses], format="csr")).toarray()
        m = bf @ bf.T
        target = np.where(self.at_up, self.rows.upper, self.rows.lower)[active]
        rhs = b @ base - target
        lu = scipy.linalg.lu_factor(m + REG * np.eye(m.shape[0]))
        pi = scipy.linalg.lu_solve(lu, rhs)
        for _ in range(REFINEMENTS):
            pi = pi + scipy.linalg.lu_solve(lu, rhs - m @ pi)
        nu = b.T @ pi
        return np.split(nu, np.cumsum(self.rows.sizes)[:-1])

    def join_violated(self, values: FloatArray) -> int:
        """Coupling rows the communities' coupling values violate join; how many joined."""
        bw = self.rows.b @ values
        over, under = bw > self.rows.upper + VIOLATION, bw < self.rows.lower - VIOLATION
        self.at_up, self.at_lo = self.at_up | over, self.at_lo | under
        return int(over.sum() + under.sum())


@dataclass(frozen=True)
class Polished:
    z: list[FloatArray]  # each community's schedule
    corrections: int  # exchanges after the first
    violated: int  # rows still violated after the last (0: the polish took)


def polish(sites: list[SitePolish], dso: DsoPolish) -> Polished:
    """The exchange, in one place: responses, prices, schedules; violated rows join and it repeats,
    at most MAX_CORRECTIONS times."""
    for corrections in range(MAX_CORRECTIONS + 1):
        responses = [site.response() for site in sites]
        prices = dso.prices(responses)
        z = [site.schedule(nu) for site, nu in zip(sites, prices, strict=True)]
        values = np.concatenate([zc[coupled_positions(s.qp.layout)] for s, zc in zip(sites, z, strict=True)])
        joined = sum(site.join_violated(zc) for site, zc in zip(sites, z, strict=True))
        joined += dso.join_violated(values)
        if not joined:
            return Polished(z, corrections, 0)
    return Polished(z, MAX_CORRECTIONS, joined)
