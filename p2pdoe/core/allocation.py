"""How the DSO shares the network's room among the sites' default envelopes (no I/O).

A default envelope is one box [LO, UP] per site and interval (a daily profile), or one box for the
whole day (static), and a box is safe iff its two corners are (see `envelope`). The corners do not
interact: UP only meets the upper-corner rows, LO only the lower-corner ones. So each side of each
interval is a packing problem on its own, in the room r >= 0 a site gets (export: r = UP; import:
r = -LO):

    G r <= h,   floor <= r <= cap,   G >= 0 elementwise,

with one row per limit (h that interval's, or for a static box the tightest over the day).
A sharing rule raises every site's room together, r_c(s) = min(floor_c + s w_c, cap_c), as far as
the rows allow; each row is concave and non-decreasing in s, so the largest s is exact (`_level`):
- `equal`: w = 1, one level for all (capped by each site's capacity);
- `proportional-capacity`, `proportional-need`: w = the site's capacity or its need (on the export
  side, where no site needs to export since every generator can be curtailed, need falls back to
  capacity);
- `max-min`: w = 1, then every site not yet held by a tight row or its capacity goes on rising
  (progressive filling): the lexicographic max-min allocation, which wastes no room.
The import side is shared in two stages, by the same rule: first each site's need to stay whole
(`need`, so the rule matters only where the network cannot grant every need at once); then what
remains, above the needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np

from p2pdoe.core.envelope import Corner, SafeSet
from p2pdoe.core.network import FloatArray
from p2pdoe.core.schemas.coordinator import DefaultSharing as Sharing
from p2pdoe.errors import InfeasibleError

SHARINGS: tuple[str, ...] = get_args(Sharing)
TOL_KW = 1e-6


@dataclass(frozen=True)
class Shortfall:
    """A site whose default cannot hold its need to stay whole, and where the network stops it."""

    site: int
    granted_kw: float  # import allowed, at the interval where it falls furthest short
    need_kw: float  # the need there
    intervals: tuple[int, ...]  # where it falls short (static: where every need together breaks a limit)
    limit: tuple[str, int]  # (row kind, bus or branch index) of the limit every need breaks most


@dataclass(frozen=True)
class Allocation:
    lo_kw: FloatArray  # (C, T)
    up_kw: FloatArray  # (C, T)
    shortfalls: tuple[Shortfall, ...]


def allocate_defaults(
    safe: SafeSet,
    import_cap_kw: FloatArray,
    export_cap_kw: FloatArray,
    need_kw: FloatArray,
    sharing: Sharing,
    profile: bool = True,
) -> Allocation:
    """Default boxes for every site (C, T), safe with every site anywhere in its own: one box per
    interval (`profile`), or one for the whole day (safe in every interval, holding the day's largest
    need); `need_kw` (C, T)."""
    g_lo, h_lo = safe.lower.g, -safe.lower.h  # G LO >= h  <=>  G (-LO) <= -h
    g_up, h_up = safe.upper.g, safe.upper.h
    _check_zero_fits(g_lo, h_lo, safe.lower)
    _check_zero_fits(g_up, h_up, safe.upper)
    need = np.minimum(need_kw, import_cap_kw[:, None])
    horizon = need.shape[1]
    if not profile:
        need = np.repeat(need.max(axis=1, keepdims=True), horizon, axis=1)
    cols = range(horizon) if profile else [0]
    lo, up, met = np.zeros_like(need), np.zeros_like(need), np.zeros_like(need)
    for t in cols:
        h_imp = h_lo[:, t] if profile else h_lo.min(axis=1)
        h_exp = h_up[:, t] if profile else h_up.min(axis=1)
        imp, met[:, t] = _import_side(g_lo, h_imp, import_cap_kw, need[:, t], sharing)
        lo[:, t] = -imp
        w = _weights(sharing, export_cap_kw)
        up[:, t] = share(g_up, h_exp, np.zeros_like(w), export_cap_kw, w, sharing)
    if not profile:
        lo, up, met = (np.repeat(a[:, :1], horizon, axis=1) for a in (lo, up, met))
    return Allocation(lo, up, _shortfalls(g_lo, h_lo, safe.lower, met, need, profile))


def _import_side(
    g: FloatArray, h: FloatArray, cap: FloatArray, need: FloatArray, sharing: Sharing
) -> tuple[FloatArray, FloatArray]:
    """(import room, the part of the need it holds): the needs first, then the rest, by one rule."""
    w = _weights(sharing, cap if sharing == "proportional-capacity" else need)
    met = share(g, h, np.zeros_like(need), need, w, sharing)
    return share(g, h, met, cap, w, sharing), met


def share(
    g: FloatArray, h: FloatArray, floor: FloatArray, cap: FloatArray, w: FloatArray, sharing: str
) -> FloatArray:
    """The room of each site under `sharing`: G r <= h, floor <= r <= cap (the floor must fit)."""
    r = floor.astype(float).copy()
    rising = (w > 0) & (cap > floor + TOL_KW)
    while rising.any():
        s = _level(g[:, rising], h - g @ r, cap[rising] - r[rising], w[rising])
        r[rising] = np.minimum(r[rising] + s * w[rising], cap[rising])
        if sharing != "max-min":
            break
        tight = g @ r >= h - TOL_KW
        held = (g[tight] > 0).any(axis=0)
        still = rising & ~held & (r < cap - TOL_KW)
        if still.sum() == rising.sum():
            break
        rising = still
    return r


def _level(g: FloatArray, room: FloatArray, head: FloatArray, w: FloatArray) -> float:
    """The largest s with g @ min(s w, head) <= room, exactly (each row is piecewise linear between
    the sites' stops head / w); the last stop if no row binds (every site at its cap)."""
    stops = np.unique(np.concatenate([[0.0], head / w]))
    rise = np.minimum(stops[:, None] * w[None, :], head[None, :])
    used = rise @ g.T  # (S, K): each row's use at each breakpoint
    best = np.inf
    for k in np.flatnonzero(used[-1] > room + TOL_KW):
        j = int(np.argmax(used[:, k] > room[k] + TOL_KW))  # the first breakpoint past the row
        if j == 0:
            return 0.0
        s0, s1, u0, u1 = stops[j - 1], stops[j], used[j - 1, k], used[j, k]
        best = min(best, s0 + (room[k] - u0) * (s1 - s0) / (u1 - u0))
    return max(0.0, best) if np.isfinite(best) else float(stops[-1])


def _weights(sharing: str, basis: FloatArray) -> FloatArray:
    if sharing.startswith("proportional"):
        return np.asarray(basis, dtype=float)
    return np.ones_like(basis, dtype=float)


def _check_zero_fits(g: FloatArray, h: FloatArray, corner: Corner) -> None:
    """A box must contain zero (a site may always do nothing): every row must hold at r = 0."""
    bad = np.argwhere(h < -TOL_KW)
    if bad.size:
        k, t = (int(v) for v in bad[0])
        raise InfeasibleError(
            f"the {corner.kind[k]} limit (element {corner.element[k]}) at interval {t} needs sites to "
            "inject or consume by default, which no default envelope asks of a site"
        )


def _shortfalls(
    g: FloatArray, h: FloatArray, corner: Corner, met: FloatArray, need: FloatArray, profile: bool
) -> tuple[Shortfall, ...]:
    """Per short site: where it falls short (static: where every need together breaks a limit it is
    under) and the limit that every site's need together breaks most there."""
    excess = g @ need - h  # (K, T): > 0 where every need together breaks a row
    out = []
    for c in np.flatnonzero((met < need - TOL_KW).any(axis=1)):
        under = g[:, c] > 0
        when = met[c] < need[c] - TOL_KW if profile else (excess[under] > TOL_KW).any(axis=0)
        if not when.any():  # a row met to within round-off: its tightest interval
            when = excess[under].max(axis=0) >= excess[under].max()
        k, _ = np.unravel_index(
            int(np.argmax(np.where(under[:, None] & when, excess, -np.inf))), excess.shape
        )
        gap = int(np.argmax(need[c] - met[c]))
        out.append(
            Shortfall(
                site=int(c),
                granted_kw=float(met[c, gap]),
                need_kw=float(need[c, gap]),
                intervals=tuple(int(t) for t in np.flatnonzero(when)),
                limit=(corner.kind[int(k)], corner.element[int(k)]),
            )
        )
    return tuple(out)


def jain_index(values: FloatArray) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one takes all."""
    x = np.asarray(values, dtype=float)
    total = float((x**2).sum())
    return 1.0 if total == 0 else float(x.sum() ** 2 / (x.size * total))
