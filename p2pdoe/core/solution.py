"""What any solver (centralized or ADMM) hands back: schedules, prices, envelopes, solver facts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from p2pdoe.core.community import BLOCKS, CommunityQP
from p2pdoe.core.network import FloatArray


class Policy(Enum):
    """How the DSO limits the communities' connection points."""

    DYNAMIC = "dynamic"  # a box per community and interval, agreed with the DSO
    STATIC = "static"  # one box per community for the whole horizon
    NONE = "none"  # no network limits at all


@dataclass(frozen=True)
class Schedule:
    """One community's decisions, kW (soc in kWh); every array (T,), buy/sell (peers, T)."""

    values: dict[str, FloatArray]
    buy: FloatArray
    sell: FloatArray
    peers: tuple[int, ...]

    def __getitem__(self, name: str) -> FloatArray:
        return self.values[name]


def schedule_from_z(qp: CommunityQP, z: FloatArray) -> Schedule:
    lay = qp.layout
    values = {name: np.asarray(z[lay.block(name)]) for name in BLOCKS}
    buy = np.array([z[lay.buy(k)] for k in range(len(lay.peers))]).reshape(len(lay.peers), lay.horizon)
    sell = np.array([z[lay.sell(k)] for k in range(len(lay.peers))]).reshape(len(lay.peers), lay.horizon)
    return Schedule(values, buy, sell, lay.peers)


@dataclass(frozen=True)
class SolverInfo:
    name: str
    status: str
    converged: bool
    iterations: int
    wall_time_s: float


@dataclass(frozen=True)
class Dlmp:
    """Prices of envelope capacity at each community's bus, EUR/kWh, each (C, T), all >= 0.

    `export_*` prices a kW more of UP (export capacity), `import_*` a kW less of LO (import
    capacity). Each total is the sum of its voltage and congestion parts.
    """

    export_voltage: FloatArray
    export_congestion: FloatArray
    import_voltage: FloatArray
    import_congestion: FloatArray

    @property
    def export_total(self) -> FloatArray:
        return self.export_voltage + self.export_congestion

    @property
    def import_total(self) -> FloatArray:
        return self.import_voltage + self.import_congestion


@dataclass(frozen=True)
class Solution:
    policy: Policy
    z: tuple[FloatArray, ...]  # per community
    schedules: tuple[Schedule, ...]
    trade_price: FloatArray  # (C, C, T): what buyer c pays seller m, EUR/kWh
    dlmp: Dlmp
    objective_eur: float
    solver: SolverInfo
