"""The DSO's safe set of envelopes: a box [LO, UP] is safe iff its two corners are.

R, X and the subtree incidence are elementwise non-negative, so in LinDistFlow voltages rise and
branch flows fall with every injection. Hence, per interval t:
- all communities at UP: w <= (vmax - margin)^2 and reverse flow  P >= -P_lim   ("upper corner");
- all communities at LO: w >= (vmin + margin)^2 and forward flow P <= P_lim     ("lower corner").
Reactive injections take their worst case (q_max at the upper corner, q_min at the lower), and
P_lim = sqrt(((1 - rating_margin) S)^2 - Q_worst^2) keeps P^2 + Q^2 <= S^2 with a loss margin.

Rows are normalised to kW-equivalents (largest coefficient 1): G_up @ UP[:, t] <= h_up[:, t] and
G_lo @ LO[:, t] >= h_lo[:, t].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pdoe.core.network import Feeder, FloatArray, IntArray, LinDistFlow
from p2pdoe.core.scenario import Scenario
from p2pdoe.errors import InfeasibleError

RowKind = str  # "vmax", "reverse", "vmin", "forward"


@dataclass(frozen=True)
class Corner:
    """The rows of one corner: g @ corner[:, t] (<= or >=) h[:, t]."""

    g: FloatArray  # (K, C), >= 0
    h: FloatArray  # (K, T), kW-equivalent
    kind: tuple[RowKind, ...]  # (K,)
    element: tuple[int, ...]  # (K,) bus index (voltage rows) or branch index (flow rows)


@dataclass(frozen=True)
class SafeSet:
    upper: Corner
    lower: Corner


@dataclass(frozen=True)
class GridView:
    """All the DSO needs: its network, limits and background load, and each site's public facts
    (bus and declared reactive range). No community's costs, assets or profiles."""

    feeder: Feeder
    v0_pu: float
    vmin_pu: float
    vmax_pu: float
    vmin_margin_pu: float
    vmax_margin_pu: float
    rating_margin: float
    background_kw: FloatArray  # (N, T)
    background_kvar: FloatArray  # (N, T)
    site_bus: IntArray  # (C,) bus indices
    q_min_kvar: FloatArray  # (C, T)
    q_max_kvar: FloatArray  # (C, T)


def grid_view(s: Scenario) -> GridView:
    ranges = [c.reactive_range_kvar() for c in s.communities]
    return GridView(
        feeder=s.feeder,
        v0_pu=s.v0_pu,
        vmin_pu=s.vmin_pu,
        vmax_pu=s.vmax_pu,
        vmin_margin_pu=s.vmin_margin_pu,
        vmax_margin_pu=s.vmax_margin_pu,
        rating_margin=s.rating_margin,
        background_kw=s.background_kw,
        background_kvar=s.background_kvar,
        site_bus=np.array([c.bus for c in s.communities]),
        q_min_kvar=np.array([r[0] for r in ranges]),
        q_max_kvar=np.array([r[1] for r in ranges]),
    )


def safe_set(s: Scenario | GridView) -> SafeSet:
    """The corner constraints; InfeasibleError if background alone breaks a limit."""
    g = s if isinstance(s, GridView) else grid_view(s)
    model = LinDistFlow(g.feeder)
    p_lim = _flow_limits(g, model)
    upper = _corner(g, model, p_lim, g.q_max_kvar, upper=True)
    lower = _corner(g, model, p_lim, g.q_min_kvar, upper=False)
    return SafeSet(upper, lower)


def flow_limits_kw(s: Scenario | GridView) -> FloatArray:
    """P_lim per branch and interval, (N, T); NaN for unrated branches and the root."""
    g = s if isinstance(s, GridView) else grid_view(s)
    return _flow_limits(g, LinDistFlow(g.feeder))


def _flow_limits(g: GridView, model: LinDistFlow) -> FloatArray:
    c_bus = g.site_bus
    q_worst = np.maximum(
        np.abs(_flow_q(g, model, c_bus, g.q_min_kvar)), np.abs(_flow_q(g, model, c_bus, g.q_max_kvar))
    )
    rating = ((1.0 - g.rating_margin) * g.feeder.rating_kva)[:, None]
    with np.errstate(invalid="ignore"):
        headroom = rating**2 - q_worst**2
    short = np.flatnonzero(np.nan_to_num(headroom, nan=1.0).min(axis=1) <= 0)
    if short.size:
        label = g.feeder.branch_label(int(short[0]))
        raise InfeasibleError(f"branch {label}: reactive flow alone exceeds its rating")
    return np.asarray(np.sqrt(headroom))


def _on_buses(s: GridView, c_bus: np.ndarray, per_community: FloatArray) -> FloatArray:
    out = np.zeros((s.feeder.n_bus, per_community.shape[1]))
    np.add.at(out, c_bus, per_community)  # several communities may share a bus
    return out


def _flow_q(s: GridView, model: LinDistFlow, c_bus: np.ndarray, q_c: FloatArray) -> FloatArray:
    return np.asarray(-(model.subtree @ (_on_buses(s, c_bus, q_c) - s.background_kvar)))


def _corner(s: GridView, model: LinDistFlow, p_lim: FloatArray, q_c: FloatArray, upper: bool) -> Corner:
    v_rows = _voltage_rows(s, model, s.site_bus, q_c, upper)
    f_rows = _flow_rows(s, model, p_lim, upper)
    g = np.vstack([v_rows[0], f_rows[0]])
    h = np.vstack([v_rows[1], f_rows[1]])
    kinds = ("vmax" if upper else "vmin",) * len(v_rows[2]) + ("reverse" if upper else "forward",) * len(
        f_rows[2]
    )
    return _normalised(g, h, kinds, v_rows[2] + f_rows[2], upper, s)


def _voltage_rows(
    s: GridView, model: LinDistFlow, c_bus: np.ndarray, q_c: FloatArray, upper: bool
) -> tuple[FloatArray, FloatArray, tuple[int, ...]]:
    """(2/S) R[:, b] x  (<= or >=)  v_lim^2 - w0 - (2/S)(-R p_bg + X q_net)."""
    sb = s.feeder.s_base_kw
    limit = (s.vmax_pu - s.vmax_margin_pu) ** 2 if upper else (s.vmin_pu + s.vmin_margin_pu) ** 2
    q_net = _on_buses(s, c_bus, q_c) - s.background_kvar
    rest = s.v0_pu**2 + 2.0 * (-model.r_matrix @ s.background_kw + model.x_matrix @ q_net) / sb
    buses = tuple(int(j) for j in range(s.feeder.n_bus) if j != s.feeder.root)
    g = 2.0 * model.r_matrix[np.ix_(np.array(buses), c_bus)] / sb
    return g, (limit - rest)[list(buses)], buses


def _flow_rows(
    s: GridView, model: LinDistFlow, p_lim: FloatArray, upper: bool
) -> tuple[FloatArray, FloatArray, tuple[int, ...]]:
    """Upper: sum_{c below k} UP_c <= P_lim + P_bg,k.  Lower: sum LO_c >= P_bg,k - P_lim."""
    c_bus = s.site_bus
    rated = tuple(int(k) for k in s.feeder.branches if np.isfinite(s.feeder.rating_kva[k]))
    below = model.subtree.toarray()[np.ix_(np.array(rated), c_bus)]
    bg_flow = (model.subtree @ s.background_kw)[list(rated)]
    h = p_lim[list(rated)] + bg_flow if upper else bg_flow - p_lim[list(rated)]
    return below, h, rated


def _normalised(
    g: FloatArray,
    h: FloatArray,
    kinds: tuple[RowKind, ...],
    elements: tuple[int, ...],
    upper: bool,
    s: GridView,
) -> Corner:
    scale = g.max(axis=1)
    empty = scale <= 0
    _check_constant_rows(h[empty], np.array(kinds)[empty], np.array(elements)[empty], upper, s)
    keep = ~empty
    return Corner(
        g=g[keep] / scale[keep, None],
        h=h[keep] / scale[keep, None],
        kind=tuple(np.array(kinds)[keep].tolist()),
        element=tuple(int(e) for e in np.array(elements)[keep]),
    )


def _check_constant_rows(
    h: FloatArray, kinds: np.ndarray, elements: np.ndarray, upper: bool, s: GridView
) -> None:
    """Rows no free community can affect must hold on background load (and fixed boxes) alone."""
    bad = (h < 0).any(axis=1) if upper else (h > 0).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = (
            f"bus {int(s.feeder.bus_ids[elements[i]])}"
            if kinds[i].startswith("v")
            else f"branch {s.feeder.branch_label(int(elements[i]))}"
        )
        raise InfeasibleError(
            f"{kinds[i]} limit at {where} is violated by background load (and any fixed boxes) alone"
        )


def with_sites_fixed(
    safe: SafeSet, view: GridView, free: FloatArray, lo_fixed: FloatArray, up_fixed: FloatArray
) -> SafeSet:
    """The safe set of the `free` sites' boxes (indices into the view's sites) when every other site's
    box is fixed at [lo_fixed, up_fixed] (C, T): their corners move into the right-hand sides."""
    fixed = np.setdiff1d(np.arange(view.site_bus.shape[0]), free)

    def reduced(corner: Corner, box: FloatArray, upper: bool) -> Corner:
        h = corner.h - corner.g[:, fixed] @ box[fixed]
        kinds, elements = corner.kind, corner.element
        return _normalised(corner.g[:, free], h, kinds, elements, upper, view)

    return SafeSet(reduced(safe.upper, up_fixed, True), reduced(safe.lower, lo_fixed, False))


def unmeetable_limit(view: GridView, low_kw: FloatArray, high_kw: FloatArray) -> str | None:
    """The limit no schedule within the sites' technical ranges (C, T) can meet, in words: the one
    missed by most with every site at its most helpful end (its least injection against an upper
    voltage or a reverse flow, its most against a lower voltage or a forward flow); None if every
    limit can be met on its own (then it is their combination that cannot)."""
    safe = safe_set(view)
    upper = safe.upper.g @ low_kw - safe.upper.h  # > 0: over even with every site at its least
    lower = safe.lower.h - safe.lower.g @ high_kw  # > 0: under even with every site at its most
    corner, short = (safe.upper, upper) if upper.max() >= lower.max() else (safe.lower, lower)
    row, t = np.unravel_index(int(np.argmax(short)), short.shape)
    if short[row, t] <= 1e-6:
        return None
    kind, element = corner.kind[row], corner.element[row]
    best = low_kw[:, t] if corner is safe.upper else high_kw[:, t]
    q = view.q_max_kvar[:, t] if corner is safe.upper else view.q_min_kvar[:, t]
    return _described(view, kind, element, int(t), best, q)


def _described(view: GridView, kind: RowKind, element: int, t: int, p_c: FloatArray, q_c: FloatArray) -> str:
    model = LinDistFlow(view.feeder)
    p = _on_buses(view, view.site_bus, p_c[:, None])[:, 0] - view.background_kw[:, t]
    q = _on_buses(view, view.site_bus, q_c[:, None])[:, 0] - view.background_kvar[:, t]
    how = "its least" if kind in ("vmax", "reverse") else "its most"
    if kind in ("vmax", "vmin"):
        v = float(model.voltages(view.v0_pu, p, q)[element])
        limit, margin = (
            (view.vmax_pu, -view.vmax_margin_pu) if kind == "vmax" else (view.vmin_pu, view.vmin_margin_pu)
        )
        side = "above" if kind == "vmax" else "below"
        bus = int(view.feeder.bus_ids[element])
        return (
            f"the {kind} limit at bus {bus} in interval {t} cannot be met: with "
            f"every site injecting {how}, LinDistFlow puts it at {v:.4f} p.u., {side} {limit + margin:.4f} "
            f"({kind} {limit:g} with the margin {abs(margin):g})"
        )
    flow = float(model.branch_flows_kw(p)[element])
    p_lim = float(_flow_limits(view, model)[element, t])
    return (
        f"the {kind} flow limit of branch {view.feeder.branch_label(element)} in interval {t} cannot be met: "
        f"with every site injecting {how}, it carries {flow:.1f} kW against a limit of {p_lim:.1f} kW "
        "(its rating less the margin and the reactive flow)"
    )
