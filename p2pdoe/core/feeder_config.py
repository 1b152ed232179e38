"""The configuration form of a feeder (`FeederConfig`, what a coordinator's JSON carries) and the
horizon arithmetic a site and the coordinator share, with nothing of the DSO's solvers."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np

from p2pdoe.core.network import Feeder
from p2pdoe.core.schemas.coordinator import FeederConfig


def feeder_config(f: Feeder) -> FeederConfig:
    return FeederConfig(
        name=f.name,
        base_mva=f.base_mva,
        base_kv=f.base_kv,
        bus_ids=[int(b) for b in f.bus_ids],
        root=f.root,
        parent=[int(p) for p in f.parent],
        r_pu=f.r_pu.tolist(),
        x_pu=f.x_pu.tolist(),
        load_kw=f.load_kw.tolist(),
        load_kvar=f.load_kvar.tolist(),
        rating_kva=[None if np.isnan(v) else float(v) for v in f.rating_kva],
    )


def feeder_of(c: FeederConfig) -> Feeder:
    return Feeder(
        name=c.name,
        base_mva=c.base_mva,
        base_kv=c.base_kv,
        bus_ids=np.array(c.bus_ids, dtype=int),
        root=c.root,
        parent=np.array(c.parent, dtype=int),
        r_pu=np.array(c.r_pu),
        x_pu=np.array(c.x_pu),
        load_kw=np.array(c.load_kw),
        load_kvar=np.array(c.load_kvar),
        rating_kva=np.array([np.nan if v is None else v for v in c.rating_kva]),
    )


def shifted_start(start: str, offset: int, dt_h: float) -> str:
    """The ISO time `offset` intervals of `dt_h` after `start` (UTC written with Z, as configs do)."""
    moment = datetime.fromisoformat(start.replace("Z", "+00:00")) + timedelta(hours=offset * dt_h)
    return moment.isoformat().replace("+00:00", "Z")


def check_offset(offset: int, intervals: int) -> None:
    if not 0 <= offset < intervals:
        raise ValueError(f"offset {offset} is not an interval of a {intervals}-interval horizon")
