"""Radial feeders: topology, per-unit data and the LinDistFlow matrices.

Conventions (see docs/formulation.md):
- Buses are indexed 0..N-1 in file order; `bus_ids` holds the 1-based numbers users see.
- Branch k is the branch that feeds bus k from `parent[k]`; the root (slack) has no branch,
  so branch arrays have length N with zeros (or NaN ratings) at the root.
- Powers are in kW / kvar; `s_base_kw` converts to per unit. Injections are positive out of a bus
  into the network (generation), loads are positive consumption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from p2pdoe.errors import FeederError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Feeder:
    """A radial distribution feeder. Arrays have shape (N,), indexed by bus (branch k feeds bus k)."""

    name: str
    base_mva: float
    base_kv: float
    bus_ids: IntArray
    root: int
    parent: IntArray
    r_pu: FloatArray
    x_pu: FloatArray
    load_kw: FloatArray
    load_kvar: FloatArray
    rating_kva: FloatArray = field(repr=False)

    def __post_init__(self) -> None:
        _check_radial(self.parent, self.root)

    @property
    def n_bus(self) -> int:
        return int(self.bus_ids.shape[0])

    @property
    def s_base_kw(self) -> float:
        return self.base_mva * 1000.0

    @property
    def z_base_ohm(self) -> float:
        return self.base_kv**2 / self.base_mva

    @property
    def branches(self) -> IntArray:
        """Indices of the buses that have a branch (every bus but the root), in BFS order."""
        return self.order[1:]

    @cached_property
    def order(self) -> IntArray:
        """Bus indices in breadth-first order from the root."""
        return _bfs_order(self.parent, self.root)

    def index_of(self, bus_id: int) -> int:
        """The array index of the bus numbered `bus_id`; FeederError if there is none."""
        hits = np.flatnonzero(self.bus_ids == bus_id)
        if hits.size == 0:
            raise FeederError(f"feeder {self.name!r} has no bus {bus_id} (buses are {self.bus_id_range})")
        return int(hits[0])

    @property
    def bus_id_range(self) -> str:
        return f"{int(self.bus_ids.min())}..{int(self.bus_ids.max())}"

    def branch_label(self, k: int) -> str:
        return f"{int(self.bus_ids[self.parent[k]])}-{int(self.bus_ids[k])}"

    @cached_property
    def path_matrix(self) -> sp.csr_matrix:
        """A[j, k] = 1 if branch k lies on the path from the root to bus j. Shape (N, N), sparse.

        Subtree incidence is its transpose: A.T[k, i] = 1 if bus i is fed through branch k.
        """
        rows: list[int] = []
        cols: list[int] = []
        for j in range(self.n_bus):
            k = j
            while k != self.root:
                rows.append(j)
                cols.append(k)
                k = int(self.parent[k])
        data = np.ones(len(rows))
        return sp.csr_matrix((data, (rows, cols)), shape=(self.n_bus, self.n_bus))

    def with_ratings(self, rating_kva: FloatArray) -> Feeder:
        """The same feeder with new branch ratings (shape (N,), NaN at the root)."""
        return Feeder(
            self.name,
            self.base_mva,
            self.base_kv,
            self.bus_ids,
            self.root,
            self.parent,
            self.r_pu,
            self.x_pu,
            self.load_kw,
            self.load_kvar,
            np.asarray(rating_kva, dtype=float),
        )


@dataclass(frozen=True)
class LinDistFlow:
    """LinDistFlow sensitivities of a feeder (lossless, squared voltages w = V^2).

    w = w0 + 2 R p_inj + 2 X q_inj and P = -A.T p_inj (flow into each branch, from parent to child),
    with p_inj, q_inj the net injections per bus in p.u. R, X: shape (N, N), p.u., elementwise >= 0.
    """

    feeder: Feeder

    @cached_property
    def r_matrix(self) -> FloatArray:
        a = self.feeder.path_matrix
        return np.asarray((a @ sp.diags(self.feeder.r_pu) @ a.T).toarray())

    @cached_property
    def x_matrix(self) -> FloatArray:
        a = self.feeder.path_matrix
        return np.asarray((a @ sp.diags(self.feeder.x_pu) @ a.T).toarray())

    @property
    def subtree(self) -> sp.csr_matrix:
        """S[k, i] = 1 if bus i is downstream of branch k (including bus k). Shape (N, N)."""
        return self.feeder.path_matrix.T.tocsr()

    def squared_voltages(self, v0_pu: float, p_inj_kw: FloatArray, q_inj_kvar: FloatArray) -> FloatArray:
        """w for injections of shape (N,) or (N, T)."""
        s = self.feeder.s_base_kw
        return v0_pu**2 + 2.0 * (self.r_matrix @ p_inj_kw + self.x_matrix @ q_inj_kvar) / s

    def voltages(self, v0_pu: float, p_inj_kw: FloatArray, q_inj_kvar: FloatArray) -> FloatArray:
        w = self.squared_voltages(v0_pu, p_inj_kw, q_inj_kvar)
        return np.sqrt(np.maximum(w, 0.0))

    def branch_flows_kw(self, p_inj_kw: FloatArray) -> FloatArray:
        """Active flow into each branch (parent to child positive), shape like p_inj; 0 at the root."""
        return np.asarray(-(self.subtree @ p_inj_kw))


def electrical_distance_ohm(feeder: Feeder, i: int, j: int) -> float:
    """Sum of branch resistances (ohm) on the path between buses i and j."""
    a = feeder.path_matrix
    on_path = np.abs(a[i].toarray().ravel() - a[j].toarray().ravel())
    return float(on_path @ feeder.r_pu) * feeder.z_base_ohm


def _bfs_order(parent: IntArray, root: int) -> IntArray:
    children: dict[int, list[int]] = {}
    for k, p in enumerate(parent):
        if k != root:
            children.setdefault(int(p), []).append(k)
    order: list[int] = []
    queue = deque([root])
    while queue:
        k = queue.popleft()
        order.append(k)
        queue.extend(children.get(k, []))
    return np.asarray(order, dtype=np.int64)


def _check_radial(parent: IntArray, root: int) -> None:
    n = parent.shape[0]
    if not 0 <= root < n:
        raise FeederError("feeder has no slack bus")
    if len(_bfs_order(parent, root)) != n:
        raise FeederError("feeder is not a connected radial tree")
