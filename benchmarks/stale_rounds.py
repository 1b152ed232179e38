"""A prototype of bounded-staleness rounds (issue 18, item 5), in process: does the agreement still
reach the centralized answer when one site is a straggler whose proposals the others do not wait for,
and how many iterations does that cost?

    .venv/bin/python benchmarks/stale_rounds.py [--cases default synthetic-20-peers4] [--every 1 2 3 5]
                                                [--slow 0]

The rule prototyped is asynchronous ADMM's (Chang et al., IEEE TSP 2016, "Asynchronous distributed
ADMM for large-scale optimization, Part I"; Wei & Ozdaglar, GlobalSIP 2013): in an iteration where a
site's proposal is not new, every coupling with that site at one end (its trades, its envelope) keeps
its value and price; the others' couplings move as usual, and the DSO's projection takes every
site's current coupling, the straggler's included. The slow site proposes only every `k`-th
iteration (`--every k`), from the couplings it last saw move: the same proposal a site computing k
times slower would deliver then, as the couplings did not move meanwhile (only the penalty may have).
A round converges only in an iteration where every site's proposal is new. `--every 1` is today's
synchronous round (a check: its row must equal the plain run's).

Not built into the participants yet: this subclasses them and bypasses the protocol's staleness
bookkeeping (which iteration a grant used of which site), which the real implementation carries in
its messages. Anderson acceleration is off (the grant's weights would have to skip frozen couplings).

Per case and k: iterations, the slow site's solves, the worst schedule difference from the
centralized answer (kW), the objective gap (% of the centralized gross energy cost), and the wall
time a deployment would see relative to the synchronous round, if one iteration of the others costs
1 and the straggler's step costs k: synchronous k x its iterations, stale 1 x its iterations.
Iterations and gaps do not depend on the machine's speed: the participants are deterministic.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from admm_scaling import QUARTER_HOURS, _max_schedule_diff  # noqa: E402

from p2pdoe.analysis.results import build_results  # noqa: E402
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant, _Round  # noqa: E402
from p2pdoe.core.agreement.coupling import Agreed  # noqa: E402
from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant, IterationRecord, _Parsed  # noqa: E402
from p2pdoe.core.agreement.outcome import solution  # noqa: E402
from p2pdoe.core.agreement.protocol import Finished, Publish, Received  # noqa: E402
from p2pdoe.core.agreement.setup import participants  # noqa: E402
from p2pdoe.core.schemas.messages import DSO_ID, Grant, Proposal, decode, encode  # noqa: E402
from p2pdoe.core.solution import Policy, Solution  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402
from p2pdoe.reference.centralized import solve_centralized  # noqa: E402
from p2pdoe.services.inprocess import _subscribers  # noqa: E402

Fresh = Callable[[str, int], bool]  # whether a site's proposal used in an iteration is new

CASES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "default": ("default", None),
    "default, 15 min": ("default", QUARTER_HOURS),
    "synthetic-20-peers4": ("synthetic-20-peers4", None),
}


def _kept_rows(new: Agreed, old: Agreed, rows: list[int]) -> Agreed:
    if not rows:
        return new
    y, price = new.y.copy(), new.price.copy()
    y[rows], price[rows] = old.y[rows], old.price[rows]
    return Agreed(y, price)


class StaleCommunity(CommunityParticipant):
    fresh: Fresh
    solves: int

    def _update(self, r: _Round, proposals: dict[str, Proposal], grant: Grant) -> None:
        k = grant.iteration
        if not self.fresh(self.site, k):
            return  # its proposal was not new: none of its couplings moves
        buy, sell = r.buy, r.sell
        super()._update(r, proposals, grant)
        stale = [i for i, peer in enumerate(self.peer_ids) if not self.fresh(peer, k)]
        r.buy, r.sell = _kept_rows(r.buy, buy, stale), _kept_rows(r.sell, sell, stale)

    def _solve_and_propose(self, r: _Round) -> Publish:
        k = r.inbox.iteration
        if r.z is None or self.fresh(self.site, k):
            self.solves += 1
            return super()._solve_and_propose(r)
        proposal = self._proposal(r, k)  # the last numbers again: used as not new
        r.sent = [*r.sent[-1:], proposal]
        return Publish(proposal)


class StaleDso(DsoParticipant):
    fresh: Fresh

    def _update(self, iteration: int, proposals: dict[str, _Parsed]) -> IterationRecord:
        st = self._s
        trades, lo, up = st.trades, st.lo, st.up
        record = super()._update(iteration, proposals)
        stale = {c for c, site in enumerate(self.plan.sites) if not self.fresh(site, iteration)}
        if stale:
            links = [i for i, (b, s) in enumerate(st.links) if b in stale or s in stale]
            st.trades = _kept_rows(st.trades, trades, links)
            if st.grant is not None:
                st.lo, st.up = _kept_rows(st.lo, lo, sorted(stale)), _kept_rows(st.up, up, sorted(stale))
        return record

    def _verdict(self, record: IterationRecord, iteration: int) -> Any:
        status = super()._verdict(record, iteration)
        every_new = all(self.fresh(site, iteration) for site in self.plan.sites)
        return "running" if status == "converged" and not every_new else status


def run(s: Any, slow: str | None, every: int) -> tuple[Solution, DsoOutcome, int]:
    """The round with `slow` proposing anew every `every` iterations (None: nobody slow)."""

    def fresh(site: str, k: int) -> bool:
        return site != slow or k % every == 0

    p = participants(s, Policy.DYNAMIC, "day-ahead")
    p.dso.__class__ = StaleDso
    p.dso.fresh = fresh  # type: ignore[attr-defined]
    for c in p.communities:
        c.__class__ = StaleCommunity
        c.fresh, c.solves = fresh, 0  # type: ignore[attr-defined]
    by_site = {c.site: c for c in p.communities}
    bus: deque[bytes] = deque(encode(c.message) for c in p.dso.open_round() if isinstance(c, Publish))
    outcomes: dict[str, object] = {}
    while bus:
        message = decode(bus.popleft())
        for name in _subscribers(message, p.communities):
            target: Any = p.dso if name == DSO_ID else by_site[name]
            for cmd in target.handle(Received(message)):
                if isinstance(cmd, Publish):
                    bus.append(encode(cmd.message))
                elif isinstance(cmd, Finished):
                    outcomes[name] = cmd.outcome
    dso = outcomes[DSO_ID]
    comms = tuple(outcomes[c.site] for c in p.communities)
    assert isinstance(dso, DsoOutcome)
    assert all(isinstance(c, CommunityOutcome) for c in comms)
    sol = solution(Policy.DYNAMIC, p.qps, comms, dso, p.safe, 0.0)  # type: ignore[arg-type]
    slow_solves = by_site[slow].solves if slow is not None else dso.iterations  # type: ignore[attr-defined]
    return sol, dso, slow_solves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["default", "synthetic-20-peers4"], choices=list(CASES))
    parser.add_argument("--every", nargs="+", type=int, default=[1, 2, 3, 5, 10])
    parser.add_argument("--slow", type=int, default=0, help="the straggler's index in the scenario's sites")
    parser.add_argument(
        "--admm", nargs="*", default=[], help="admm settings for every run, KEY=VALUE (e.g. adaptive=false)"
    )
    args = parser.parse_args()
    admm = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.admm)}
    print(
        "| case | straggler | every k-th iteration | iterations | straggler's solves | "
        "worst schedule difference kW | objective gap % | wall time / synchronous |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for label in args.cases:
        name, overrides = CASES[label]
        overrides = {**(overrides or {}), **({"admm": admm} if admm else {})}
        s = load_scenario(name, overrides)
        central = solve_centralized(s, Policy.DYNAMIC)
        gross = build_results(s, central, "centralized").totals.gross_energy_eur
        slow = s.ids[args.slow]
        sync_iterations: int | None = None
        for every in args.every:
            sol, dso, solves = run(s, slow, every)
            if every == 1:
                sync_iterations = dso.iterations
            gap = 100.0 * (sol.objective_eur - central.objective_eur) / gross
            wall = "" if sync_iterations is None else f"{dso.iterations / (every * sync_iterations):.2f}"
            print(
                f"| {label} | {slow} | {every} | {dso.iterations} ({dso.status}) | {solves} | "
                f"{_max_schedule_diff(sol, central):.2f} | {gap:.4f} | {wall} |",
                flush=True,
            )


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


if __name__ == "__main__":
    main()
