"""What holds a round after its residuals have met their tolerance: which prices still move, and how far.

    .venv/bin/python benchmarks/price_tail.py [--cases default synthetic-100-peers4] [--top 3]

A round stops at the first iteration that passes both the residual test and the price test (no trade
or envelope price moved by more than `eps_price_eur_per_kwh`). For each case of
`benchmarks/admm_scaling.py` the in-process round runs once, and the DSO's prices are read before and
after every coupling update. The tail is the iterations after the residual test first passed. Printed
per case: where each test passed, the tail's length, the couplings that moved most in the most tail
iterations (a trade `buyer -> seller` or an envelope bound `lo:site`/`up:site`, its interval, its
quantity and its price when the residual test first passed and at the end, EUR/MWh), and the largest
change over the tail of any trade price on a trade of at least 0.1 kW: the price error the residual
test alone would have stopped with, measured against the round's own end. The last column is where
a price test that leaves out the trades under 0.1 kW at that iteration (their price moves no money)
would have stopped the round. Deterministic: nothing here depends on the machine's speed or load.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
from admm_scaling import FULL, _log, chosen_cases

from p2pdoe.core.agreement.coupling import Agreed
from p2pdoe.core.agreement.dso import DsoParticipant, IterationRecord
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

DEFAULT_CASES = ("default", "synthetic-20-peers4", "synthetic-50-peers4", "synthetic-100-peers4")
TRADED_KW = 0.1  # trades this large at the end count for the price error (as in admm_methods)


@dataclass
class Tail:
    """What the observer keeps: per iteration, the coupling whose price moved most, and prices."""

    dt_h: float = 1.0
    eps_price: float = 1e-5
    names: list[str] = field(default_factory=list)  # coupling row names: trades, then lo, then up
    n_trades: int = 0
    leader: list[tuple[int, int, float]] = field(default_factory=list)  # row, interval, move EUR/kWh
    traded_move: list[float] = field(default_factory=list)  # the largest move but on trades < 0.1 kW
    residuals_met: int | None = None
    at_residuals: tuple[np.ndarray, np.ndarray] | None = None  # prices, quantities then
    end: tuple[np.ndarray, np.ndarray] | None = None

    def take(
        self, iteration: int, before: list[Agreed], after: list[Agreed], record: IterationRecord
    ) -> None:
        price = np.vstack([a.price for a in after]) / self.dt_h
        moves = np.abs(price - np.vstack([b.price for b in before]) / self.dt_h)
        row, interval = np.unravel_index(int(moves.argmax()), moves.shape)
        self.leader.append((int(row), int(interval), float(moves[row, interval])))
        quantity = np.vstack([a.y for a in after])
        idle = np.zeros(moves.shape, dtype=bool)
        idle[: self.n_trades] = np.abs(quantity[: self.n_trades]) < TRADED_KW
        self.traded_move.append(float(np.where(idle, 0.0, moves).max(initial=0.0)))
        if self.residuals_met is None and record.trade.converged and record.envelope.converged:
            self.residuals_met, self.at_residuals = iteration, (price, quantity)
        self.end = (price, quantity)


def _families(dso: DsoParticipant) -> list[Agreed]:
    st = dso._s
    return [st.trades, st.lo, st.up] if st.grant is not None else [st.trades]


def observe(label: str) -> tuple[Tail, int]:
    case = {c.label: c for c in FULL}[label]
    s = load_scenario(case.scenario, case.overrides)
    tail = Tail(dt_h=s.dt_h, eps_price=s.admm.eps_price)
    update = DsoParticipant._update

    def watched(self: DsoParticipant, iteration: int, proposals: dict[str, Any]) -> IterationRecord:
        before = _families(self)
        record = update(self, iteration, proposals)
        if not tail.names:
            sites, st = self.plan.sites, self._s
            tail.names = [f"{sites[b]} -> {sites[s]}" for b, s in st.links]
            tail.names += [f"lo:{x}" for x in sites] + [f"up:{x}" for x in sites]
            tail.n_trades = len(st.links)
        tail.take(iteration, before, _families(self), record)
        return record

    with mock.patch.object(DsoParticipant, "_update", watched):
        run = run_admm(s, Policy("dynamic"))
    return tail, run.solution.solver.iterations


def report(label: str, tail: Tail, iterations: int, top: int) -> str:
    met = tail.residuals_met
    if met is None or tail.at_residuals is None or tail.end is None:
        return f"| {label} | never | {iterations} | – | – | – | – |"
    leaders = Counter((row, t) for row, t, _ in tail.leader[met + 1 :])
    (p0, _), (p1, q1) = tail.at_residuals, tail.end
    named = []
    for (row, t), n in leaders.most_common(top):
        named.append(
            f"{tail.names[row]} h{t}: {n} it., {q1[row, t]:.2f} kW, "
            f"{1000 * p0[row, t]:.1f} → {1000 * p1[row, t]:.1f}"
        )
    trades = slice(0, tail.n_trades)
    traded = np.abs(q1[trades]) >= TRADED_KW
    drift = np.abs(p1[trades] - p0[trades])[traded]
    worst = f"{1000 * drift.max():.1f}" if drift.size else "–"
    leading = "; ".join(named) or "–"
    settled = [k for k in range(met, len(tail.traded_move)) if tail.traded_move[k] <= tail.eps_price]
    variant = str(settled[0] + 1) if settled else "–"
    return (
        f"| {label} | {met + 1} | {iterations} | {iterations - met - 1} | {leading} | {worst} | {variant} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="case labels of admm_scaling")
    parser.add_argument("--top", type=int, default=3, help="couplings named per case (3)")
    args = parser.parse_args(argv)
    chosen_cases(parser, args.cases)
    print(
        "| case | residual test met at | round ended at | tail iterations | couplings that moved most in "
        "the tail (iterations leading, quantity, price then → at the end, EUR/MWh) "
        f"| largest trade-price change over the tail, trades ≥ {TRADED_KW} kW (EUR/MWh) "
        f"| a price test that skips trades under {TRADED_KW} kW would have ended at |"
    )
    print("|---|--:|--:|--:|---|--:|--:|")
    for label in args.cases:
        _log(f"{label} ...")
        tail, iterations = observe(label)
        print(report(label, tail, iterations, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
