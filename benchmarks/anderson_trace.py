"""Where Anderson acceleration helps and where it does not: its steps, the safeguard, and ρ, per case.

    .venv/bin/python benchmarks/anderson_trace.py [--cases default synthetic-20-peers4] [--memory 10]

For each case of `benchmarks/admm_scaling.py` the in-process round runs twice, plain and with
Anderson acceleration of the given memory, and one Markdown row per run gives: iterations, mixed
steps taken, mixed steps the safeguard undid, changes of ρ (each restarts the memory), and the
iteration at which the primal and dual residuals (kW, both families) first fell below 10x and 1x
their tolerance, and the first at which no price moved by more than `eps_price_eur_per_kwh` (the
round stops at the first iteration that passes both tests). Deterministic: nothing here depends
on the machine's speed or load.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from typing import Any
from unittest import mock

from admm_scaling import _log, chosen_cases

from p2pdoe.core.agreement.anderson import Accelerator
from p2pdoe.core.agreement.dso import IterationRecord
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.inprocess import run_admm

DEFAULT_CASES = ("default", "synthetic-10-peers4", "synthetic-20-peers4", "synthetic-50-peers4")


@dataclass(frozen=True)
class Trace:
    iterations: int
    accelerated: int
    rejected: int
    rho_changes: int
    within_10x: int | None
    within_1x: int | None
    prices_settled: int | None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="case labels of admm_scaling")
    parser.add_argument("--memory", type=int, default=10, help="Anderson memory (default 10)")
    args = parser.parse_args(argv)
    cases = chosen_cases(parser, args.cases)
    print(
        "| case | Anderson memory | iterations | mixed steps | undone by the safeguard | ρ changes "
        "| residuals within 10x tolerance at | within tolerance at | no price moved over eps_price at |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for case in cases:
        for memory in (0, args.memory):
            t = _trace(case, memory)
            print(
                f"| {case.label} | {memory} | {t.iterations} | {t.accelerated} | {t.rejected} "
                f"| {t.rho_changes} | {t.within_10x} | {t.within_1x} | {t.prices_settled} |",
                flush=True,
            )
    return 0


def _trace(case: Any, memory: int) -> Trace:
    _log(f"{case.label}, memory {memory} ...")
    s = load_scenario(case.scenario, {**(case.overrides or {}), "admm": {"anderson": {"memory": memory}}})
    captured: list[Any] = []

    def capturing(*a: Any, **k: Any) -> Any:
        captured.append(participants(*a, **k))
        return captured[-1]

    with mock.patch("p2pdoe.services.inprocess.participants", side_effect=capturing):
        run = run_admm(s, Policy.DYNAMIC)
    accelerator: Accelerator | None = captured[0].dso._accelerator
    history = run.dso.history
    return Trace(
        iterations=run.dso.iterations,
        accelerated=0 if accelerator is None else accelerator.accelerated,
        rejected=0 if accelerator is None else accelerator.rejected,
        rho_changes=sum(
            (a.rho_trade, a.rho_envelope) != (b.rho_trade, b.rho_envelope)
            for a, b in itertools.pairwise(history)
        ),
        within_10x=_first_within(history, 10.0),
        within_1x=_first_within(history, 1.0),
        prices_settled=next(
            (r.iteration + 1 for r in history if r.price_change_max_eur_per_kwh <= s.admm.eps_price), None
        ),
    )


def _first_within(history: tuple[IterationRecord, ...], factor: float) -> int | None:
    for r in history:
        if all(
            res.primal_kw <= factor * res.eps_primal_kw and res.dual_kw <= factor * res.eps_dual_kw
            for res in (r.trade, r.envelope)
        ):
            return r.iteration + 1
    return None


if __name__ == "__main__":
    sys.exit(main())
