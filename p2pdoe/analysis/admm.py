"""The ADMM parts of results.json: the residual history and per-participant step times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from p2pdoe.core.schemas import results as r

if TYPE_CHECKING:
    from p2pdoe.core.agreement.dso import IterationRecord, PolishRecord


def residual_points(history: Sequence[IterationRecord]) -> list[r.ResidualPoint]:
    return [
        r.ResidualPoint(
            iteration=h.iteration,
            primal_trade_kw=h.trade.primal_kw,
            dual_trade_kw=h.trade.dual_kw,
            eps_trade_kw=h.trade.eps_primal_kw,
            primal_envelope_kw=h.envelope.primal_kw,
            dual_envelope_kw=h.envelope.dual_kw,
            eps_envelope_kw=h.envelope.eps_primal_kw,
            rho_trade=h.rho_trade,
            rho_envelope=h.rho_envelope,
            reciprocity_max_kw=h.reciprocity_max_kw,
            envelope_gap_max_kw=h.envelope_gap_max_kw,
            price_change_max_eur_per_kwh=h.price_change_max_eur_per_kwh,
            frozen_sites=list(h.frozen) or None,
        )
        for h in history
    ]


def solve_times(site: str, role: Literal["community", "dso"], seconds: Sequence[float]) -> r.SolveTimes:
    ms = np.asarray(seconds, dtype=float) * 1e3
    if ms.size == 0:
        return r.SolveTimes(id=site, role=role, median_ms=0.0, p95_ms=0.0, max_ms=0.0, steps=0)
    return r.SolveTimes(
        id=site,
        role=role,
        median_ms=float(np.median(ms)),
        p95_ms=float(np.percentile(ms, 95)),
        max_ms=float(ms.max()),
        steps=int(ms.size),
    )


def summed(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            out[reason] = out.get(reason, 0) + n
    return out


def polish_result(record: PolishRecord, messages: int, size: int) -> r.PolishResult | None:
    """The polish's part of results.json (None: no try)."""
    if not record.tries:
        return None
    return r.PolishResult(
        tries=record.tries,
        rounds=record.rounds,
        steps=record.steps,
        certified_at=record.certified_at,
        messages=messages,
        bytes=size,
    )
