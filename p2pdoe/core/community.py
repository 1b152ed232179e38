"""A community's local problem as a QP in OSQP's standard form.

    minimise  1/2 z' diag(p) z + q' z + constant   subject to  l <= A z <= u

The same matrices feed the centralized reference (cvxpy) and, per ADMM iteration, an OSQP
workspace on the edge (only q, l, u change there). Decision vector z, blocks of T intervals:
pv, wd, lx, ch, dis, soc, imp, exp, lo, up, wid, then buy[m] and sell[m] for each peer m.
All powers in kW, energy in kWh, money in EUR; every cost term is multiplied by dt_h.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import scipy.sparse as sp

from p2pdoe.core.network import FloatArray
from p2pdoe.core.scenario import CommunityData, MarketData

BLOCKS = ("pv", "wd", "lx", "ch", "dis", "soc", "imp", "exp", "lo", "up", "wid")
MARGIN_BLOCKS = ("mup", "mlo")  # with envelope margins: the shortfall of each (see `envelope_margins`)
REALTIME_MARGINS = (0.12, 0.05)  # the real-time controller's default (load share, PV and wind share)
MARGIN_SHORTFALL_EUR_PER_KWH = 1.0  # above any tariff: a margin is given up only when nothing else helps
INF = np.inf


class EnvelopeBounds(Enum):
    """Where a community may place its requested envelope."""

    PER_INTERVAL = "per_interval"  # inside its technical range of each interval (dynamic, none)
    HULL = "hull"  # inside the hull of its technical ranges (static: one box for the whole day)


@dataclass(frozen=True)
class Layout:
    """Positions of every variable in z. `peers` are community indices, in order."""

    horizon: int
    peers: tuple[int, ...]
    margins: bool = False

    @property
    def blocks(self) -> tuple[str, ...]:
        return BLOCKS + MARGIN_BLOCKS if self.margins else BLOCKS

    @property
    def size(self) -> int:
        return self.horizon * (len(self.blocks) + 2 * len(self.peers))

    def block(self, name: str) -> slice:
        i = self.blocks.index(name)
        return slice(i * self.horizon, (i + 1) * self.horizon)

    def buy(self, peer_pos: int) -> slice:
        start = (len(self.blocks) + peer_pos) * self.horizon
        return slice(start, start + self.horizon)

    def sell(self, peer_pos: int) -> slice:
        start = (len(self.blocks) + len(self.peers) + peer_pos) * self.horizon
        return slice(start, start + self.horizon)

    @property
    def trades(self) -> slice:
        return slice(len(self.blocks) * self.horizon, self.size)


@dataclass(frozen=True)
class CommunityQP:
    layout: Layout
    p_diag: FloatArray  # (n,)
    q: FloatArray  # (n,)
    constant: float
    a: sp.csc_matrix  # (m, n)
    lower: FloatArray  # (m,) the l of OSQP
    upper: FloatArray  # (m,) the u of OSQP
    injection: sp.csr_matrix  # (T, n): net injection x = injection @ z - fixed_load

    def objective(self, z: FloatArray) -> float:
        return float(0.5 * z @ (self.p_diag * z) + self.q @ z + self.constant)


def build_community_qp(
    c: CommunityData,
    peers: tuple[int, ...],
    market: MarketData,
    fees: FloatArray,
    price_import: FloatArray,
    price_export: FloatArray,
    dt_h: float,
    bounds: EnvelopeBounds,
) -> CommunityQP:
    """The QP of community `c`; `fees[k]` is the network fee (EUR/kWh) with peer `peers[k]`."""
    lay = Layout(c.horizon, peers, c.margin_kw is not None)
    p_diag, q, constant = _objective(c, lay, market, fees, price_import, price_export, dt_h)
    rows = [
        _balance(c, lay),
        _soc_dynamics(c, lay, dt_h),
        _flex_energy(c, lay, dt_h),
        _envelope_rows(c, lay),
        _width(lay),
        _bounds(c, lay, market, bounds),
    ]
    a = sp.vstack([r[0] for r in rows], format="csc")
    lower = np.concatenate([r[1] for r in rows])
    upper = np.concatenate([r[2] for r in rows])
    return CommunityQP(lay, p_diag, q, constant, a, lower, upper, _injection(lay))


def within_ranges(
    qp: CommunityQP, x_min: FloatArray, x_max: FloatArray, bounds: EnvelopeBounds
) -> CommunityQP:
    """`qp` with its envelope requests inside the bounds another view of the site's ranges gives
    them (what the coordinator registered, p2pdoe.core.agreement.coordination.bounds_from_ranges):
    the intersection of both, or where they do not meet the bound of the other nearest its own."""
    lay = qp.layout
    if bounds is EnvelopeBounds.HULL:
        x_min, x_max = np.full(lay.horizon, x_min.min()), np.full(lay.horizon, x_max.max())
    middle = np.minimum(0.0, x_max)
    rows = qp.a.shape[0] - lay.size  # the bounds are the last rows (an identity)
    lower, upper = qp.lower.copy(), qp.upper.copy()
    for name, (lo, hi) in {"lo": (x_min, middle), "up": (middle, x_max)}.items():
        sl = lay.block(name)
        at = slice(rows + sl.start, rows + sl.stop)
        lower[at], upper[at] = np.clip(lower[at], lo, hi), np.clip(upper[at], lo, hi)
    return replace(qp, lower=lower, upper=upper)


def _eye(lay: Layout, name: str, coef: float = 1.0) -> sp.csr_matrix:
    t = lay.horizon
    sl = lay.block(name)
    return sp.csr_matrix(
        (np.full(t, coef), (np.arange(t), np.arange(sl.start, sl.stop))), shape=(t, lay.size)
    )


def _sum_of(lay: Layout, terms: dict[str, float]) -> sp.csr_matrix:
    out = sp.csr_matrix((lay.horizon, lay.size))
    for name, coef in terms.items():
        out = out + _eye(lay, name, coef)
    return out


def _trade_sum(lay: Layout, coef_buy: float, coef_sell: float) -> sp.csr_matrix:
    t, k = lay.horizon, len(lay.peers)
    rows = np.tile(np.arange(t), 2 * k)
    cols = np.arange(lay.trades.start, lay.trades.stop)
    data = np.concatenate([np.full(t * k, coef_buy), np.full(t * k, coef_sell)])
    return sp.csr_matrix((data, (rows, cols)), shape=(t, lay.size))


def _injection(lay: Layout) -> sp.csr_matrix:
    """pv + wd + dis - lx - ch (the fixed load is subtracted outside)."""
    return _sum_of(lay, {"pv": 1, "wd": 1, "dis": 1, "lx": -1, "ch": -1})


Rows = tuple[sp.csr_matrix, FloatArray, FloatArray]


def _balance(c: CommunityData, lay: Layout) -> Rows:
    """pv + wd + dis + imp + sum(buy) - lx - ch - exp - sum(sell) = fixed load."""
    a = _injection(lay) + _sum_of(lay, {"imp": 1, "exp": -1}) + _trade_sum(lay, 1.0, -1.0)
    return a, c.fixed_load_kw, c.fixed_load_kw


def _soc_dynamics(c: CommunityData, lay: Layout, dt_h: float) -> Rows:
    """soc[t] - soc[t-1] - eta_c dt ch[t] + dt/eta_d dis[t] = 0 (soc[-1] is the initial state)."""
    b = c.battery
    t = lay.horizon
    s = lay.block("soc")
    shift = sp.csr_matrix(
        (np.ones(t - 1), (np.arange(1, t), np.arange(s.start, s.stop - 1))), shape=(t, lay.size)
    )
    a = _sum_of(lay, {"soc": 1.0, "ch": -b.eta_charge * dt_h, "dis": dt_h / b.eta_discharge}) - shift
    rhs = np.zeros(t)
    rhs[0] = b.soc_init_kwh
    return a, rhs, rhs


def _flex_energy(c: CommunityData, lay: Layout, dt_h: float) -> Rows:
    a = sp.csr_matrix(_eye(lay, "lx", dt_h).sum(axis=0))
    e = np.array([c.flex.energy_kwh])
    return a, e, e


def _envelope_rows(c: CommunityData, lay: Layout) -> Rows:
    """lo <= x <= up, with x = injection - fixed load; with margins m (`c.margin_kw`), softly
    lo + m_lo <= x <= up - m_up: x - lo + mlo >= m_lo and x - up - mup <= -m_up, each shortfall
    0 <= mlo <= m_lo (likewise mup) priced at MARGIN_SHORTFALL_EUR_PER_KWH."""
    t = lay.horizon
    inj = _injection(lay)
    if c.margin_kw is None:
        a = sp.vstack([inj - _eye(lay, "lo"), inj - _eye(lay, "up")], format="csr")
        return a, np.r_[c.fixed_load_kw, np.full(t, -INF)], np.r_[np.full(t, INF), c.fixed_load_kw]
    m_up, m_lo = c.margin_kw
    a = sp.vstack(
        [inj - _eye(lay, "lo") + _eye(lay, "mlo"), inj - _eye(lay, "up") - _eye(lay, "mup")], format="csr"
    )
    return a, np.r_[c.fixed_load_kw + m_lo, np.full(t, -INF)], np.r_[np.full(t, INF), c.fixed_load_kw - m_up]


def envelope_margins(c: CommunityData, load_share: float, res_share: float) -> tuple[FloatArray, FloatArray]:
    """(below up, above lo): the forecast errors no lever may be left to meet. Less load than
    forecast raises the injection; more load, or less PV and wind, lowers it (more PV and wind can
    be curtailed, so needs none). At most a quarter of the technical range each; soft (see
    `_envelope_rows`), so a network that pins a site's envelope leaves its problem feasible."""
    if not (0 <= load_share < 1 and 0 <= res_share < 1):
        raise ValueError(f"margin shares must lie in [0, 1), not {load_share}, {res_share}")
    x_min, x_max = c.technical_range_kw()
    cap = np.maximum(x_max - x_min, 0.0) / 4
    m_up = np.minimum(load_share * c.fixed_load_kw, cap)
    m_lo = np.minimum(load_share * c.fixed_load_kw + res_share * (c.pv_kw + c.wind_kw), cap)
    return m_up, m_lo


def _width(lay: Layout) -> Rows:
    zero = np.zeros(lay.horizon)
    return _sum_of(lay, {"wid": 1, "up": -1, "lo": 1}), zero, zero


def _bounds(c: CommunityData, lay: Layout, market: MarketData, bounds: EnvelopeBounds) -> Rows:
    t = lay.horizon
    lower = np.zeros(lay.size)
    upper = np.full(lay.size, INF)
    b = c.battery
    x_min, x_max = c.technical_range_kw()
    if bounds is EnvelopeBounds.HULL:
        x_min, x_max = np.full(t, x_min.min()), np.full(t, x_max.max())
    soc_end_min = b.soc_end_floor_kwh
    limits = {
        "pv": (0.0, c.pv_kw),
        "wd": (0.0, c.wind_kw),
        "lx": (c.flex.min_kw, c.flex.max_kw),
        "ch": (0.0, b.power_kw),
        "dis": (0.0, b.power_kw),
        "soc": (np.r_[np.full(t - 1, b.soc_min_kwh), soc_end_min], b.soc_max_kwh),
        "imp": (0.0, INF),
        "exp": (0.0, INF),
        "lo": (x_min, np.minimum(0.0, x_max)),
        "up": (np.minimum(0.0, x_max), x_max),
        "wid": (0.0, INF),
    }
    if c.margin_kw is not None:
        limits |= {"mup": (0.0, c.margin_kw[0]), "mlo": (0.0, c.margin_kw[1])}
    for name, (lo, hi) in limits.items():
        lower[lay.block(name)] = lo
        upper[lay.block(name)] = hi
    upper[lay.trades] = market.trade_limit_kw
    return sp.identity(lay.size, format="csr"), lower, upper


def _objective(
    c: CommunityData,
    lay: Layout,
    market: MarketData,
    fees: FloatArray,
    price_import: FloatArray,
    price_export: FloatArray,
    dt_h: float,
) -> tuple[FloatArray, FloatArray, float]:
    p = np.zeros(lay.size)
    q = np.zeros(lay.size)
    eps = market.regularization_eur_per_kw2h * dt_h
    for name in ("pv", "wd", "ch", "dis", "imp", "exp"):
        p[lay.block(name)] = 2.0 * eps
    # PV and wind are regularised on their curtailment, eps (forecast - used)^2: free when not curtailed
    for name, forecast in (("pv", c.pv_kw), ("wd", c.wind_kw)):
        q[lay.block(name)] = -2.0 * eps * forecast
    alpha = c.flex.discomfort_eur_per_kw2h
    p[lay.block("lx")] = 2.0 * alpha * dt_h + 2.0 * eps
    q[lay.block("lx")] = -2.0 * alpha * dt_h * c.flex.preferred_kw
    constant = float(alpha * dt_h * np.sum(c.flex.preferred_kw**2))
    constant += float(eps * (np.sum(c.pv_kw**2) + np.sum(c.wind_kw**2)))
    q[lay.block("imp")] = price_import * dt_h
    q[lay.block("exp")] = -price_export * dt_h
    wear = c.battery.wear_eur_per_kwh * dt_h
    q[lay.block("ch")] = wear
    q[lay.block("dis")] = wear
    prox = 2.0 * market.envelope_proximal_eur_per_kw2h * dt_h
    p[lay.block("lo")] = prox
    p[lay.block("up")] = prox
    p[lay.block("wid")] = c.envelope_curvature_eur_per_kw2h * dt_h
    q[lay.block("wid")] = -c.envelope_value_eur_per_kwh * dt_h
    p[lay.trades] = 2.0 * market.trade_quadratic_eur_per_kw2h * dt_h
    for name in MARGIN_BLOCKS if lay.margins else ():
        p[lay.block(name)] = 2.0 * eps
        q[lay.block(name)] = MARGIN_SHORTFALL_EUR_PER_KWH * dt_h
    for k in range(len(lay.peers)):
        q[lay.buy(k)] = 0.5 * fees[k] * dt_h
        q[lay.sell(k)] = (0.5 * fees[k] + c.sell_markup_eur_per_kwh) * dt_h
    return p, q, constant
