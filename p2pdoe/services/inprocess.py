"""Run a whole agreement in one process: a FIFO message bus between the participants.

Every message is encoded to its wire form and decoded again, as it will be over MQTT, so sizes are
real and the schemas are exercised. Each `handle` call is timed, which gives per-participant solve
times and the critical path a deployment with one device per community would see.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from p2pdoe.analysis.admm import polish_result, residual_points, solve_times, summed
from p2pdoe.analysis.results import build_results
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant
from p2pdoe.core.agreement.outcome import solution
from p2pdoe.core.agreement.protocol import Command, Finished, Message, Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas import results as r
from p2pdoe.core.schemas.messages import (
    DSO_ID,
    Grant,
    PolishPrices,
    PolishReport,
    Proposal,
    decode,
    encode,
)
from p2pdoe.core.solution import Policy, Solution


@dataclass
class Timings:
    """Seconds per handle call that published something, by iteration."""

    community: dict[str, list[float]] = field(default_factory=dict)  # site -> [iteration k]
    dso: list[float] = field(default_factory=list)  # [iteration k]: coupling update + next projection
    messages: list[int] = field(default_factory=list)  # published per iteration
    bytes: list[int] = field(default_factory=list)
    # the certified polish: per step, each community's handling and the DSO's; messages and bytes
    polish_community: dict[str, list[float]] = field(default_factory=dict)
    polish_dso: list[float] = field(default_factory=list)
    polish_messages: int = 0
    polish_bytes: int = 0

    def critical_path_s(self) -> float:
        """Sum over iterations (and polish steps) of the slowest community's step plus the DSO's."""
        return _path(self.community, self.dso) + _path(self.polish_community, self.polish_dso)


def _path(community: dict[str, list[float]], dso: list[float]) -> float:
    per_site = [v for v in community.values() if v]
    if not per_site:
        return float(sum(dso))
    n = min(len(v) for v in per_site)
    slowest = np.max(np.array([v[:n] for v in per_site]), axis=0)
    return float(slowest.sum() + sum(dso[:n]))


@dataclass(frozen=True)
class AdmmRun:
    solution: Solution
    dso: DsoOutcome
    communities: tuple[CommunityOutcome, ...]
    timings: Timings
    ignored: dict[str, dict[str, int]]


@dataclass
class Lateness:
    """A deterministic straggler for bounded-staleness rounds: every proposal of `site` arrives only
    after the DSO has closed `closes` iterations without it, or as soon as it may close none early."""

    site: str
    closes: int
    waited: int = 0  # iterations closed early since its proposals on their way were sent

    def holds(self, message: object) -> bool:
        return isinstance(message, Proposal) and message.sender == self.site

    def idle(self, dso: DsoParticipant) -> list[Command]:
        """Everyone else waits for the straggler: the DSO closes the iteration early, or (nothing
        returned) the straggler's proposals arrive now."""
        closed = dso.close_early() if self.waited < self.closes else []
        self.waited = self.waited + 1 if closed else 0
        return closed


def run_admm(
    s: Scenario, policy: Policy, round_id: str = "day-ahead", late: Lateness | None = None
) -> AdmmRun:
    started = time.perf_counter()
    p = participants(s, policy, round_id)
    timings = Timings(community={c.site: [] for c in p.communities})
    by_site = {c.site: c for c in p.communities}
    bus: deque[bytes] = deque()
    outcomes: dict[str, object] = {}

    def post(commands: list[Command], sender: str) -> None:
        for cmd in commands:
            if isinstance(cmd, Publish):
                payload = encode(cmd.message)
                bus.append(payload)
                _count(timings, cmd.message, len(payload))
            elif isinstance(cmd, Finished):
                outcomes[sender] = cmd.outcome

    t0 = time.perf_counter()
    opening = p.dso.open_round()
    timings.dso.append(time.perf_counter() - t0)
    post(opening, DSO_ID)
    held: list[Message] = []  # the straggler's proposals on their way
    arrived: deque[Message] = deque()
    while bus or held or arrived:
        if arrived:
            message = arrived.popleft()
        elif bus:
            message = decode(bus.popleft())
            if late is not None and late.holds(message):
                held.append(message)
                continue
        else:
            closed = late.idle(p.dso) if late is not None else []
            post(closed, DSO_ID)
            if not closed:
                arrived.extend(held)
                held.clear()
            continue
        for name in subscribers(message, p.communities, p.dso.settings.relay_trades):
            target = p.dso if name == DSO_ID else by_site[name]
            t0 = time.perf_counter()
            commands = target.handle(Received(message))
            elapsed = time.perf_counter() - t0
            if any(isinstance(c, Publish) and isinstance(c.message, (Proposal, Grant)) for c in commands):
                _record(timings, name, elapsed, commands)
            elif any(isinstance(c, Publish) for c in commands):
                _record_polish(timings, name, elapsed)
            post(commands, name)
    wall = time.perf_counter() - started
    dso = outcomes[DSO_ID]
    comms = tuple(outcomes[c.site] for c in p.communities)
    assert isinstance(dso, DsoOutcome)
    assert all(isinstance(c, CommunityOutcome) for c in comms)
    sol = solution(policy, p.qps, comms, dso, p.safe, wall)  # type: ignore[arg-type]
    ignored = {DSO_ID: p.dso.ignored} | {c.site: c.ignored for c in p.communities}
    return AdmmRun(sol, dso, comms, timings, ignored)  # type: ignore[arg-type]


def subscribers(message: object, communities: tuple[CommunityParticipant, ...], relay: bool) -> list[str]:
    """Who hears `message`: a proposal, the DSO and (unless the grants relay the trades) the
    sender's peers; a grant, its recipient; an opening, everyone."""
    if isinstance(message, Proposal):
        peers = [] if relay else [c.site for c in communities if message.sender in c.peer_ids]
        return [*peers, DSO_ID]
    if isinstance(message, (Grant, PolishPrices)):
        return [message.recipient]
    if isinstance(message, PolishReport):
        return [DSO_ID]
    return [c.site for c in communities]


def _count(t: Timings, message: object, size: int) -> None:
    if isinstance(message, (PolishReport, PolishPrices)):
        t.polish_messages += 1
        t.polish_bytes += size
    if not isinstance(message, (Proposal, Grant)):
        return  # the round's opening is not part of any iteration
    k = message.iteration
    while len(t.messages) <= k:
        t.messages.append(0)
        t.bytes.append(0)
    t.messages[k] += 1
    t.bytes[k] += size


def _record_polish(t: Timings, name: str, elapsed: float) -> None:
    if name == DSO_ID:
        t.polish_dso.append(elapsed)
    else:
        t.polish_community.setdefault(name, []).append(elapsed)


def _record(t: Timings, name: str, elapsed: float, commands: list[Command]) -> None:
    if name == DSO_ID:
        t.dso.append(elapsed)  # grant k and the projection for k + 1; the first projection is at open
    else:
        t.community[name].append(elapsed)


def admm_results(s: Scenario, run: AdmmRun) -> r.Results:
    """The documented results.json of an ADMM run: the common fields plus the solver's story."""
    base = build_results(s, run.solution, "admm")
    t = run.timings
    times = [solve_times(site, "community", v) for site, v in t.community.items()]
    last = run.dso.history[-1]
    solver = base.solver.model_copy(
        update={
            "critical_path_s": t.critical_path_s(),
            "residual_history": residual_points(run.dso.history),
            "solve_times": [*times, solve_times(DSO_ID, "dso", t.dso)],
            "messages_per_iteration": float(np.mean(t.messages)),
            "bytes_per_iteration": float(np.mean(t.bytes)),
            "reciprocity_max_kw": last.reciprocity_max_kw,
            "envelope_gap_max_kw": last.envelope_gap_max_kw,
            "final_solve": {c.site: c.final_solve for c in run.communities},
            "ignored_messages": summed(list(run.ignored.values())),
            "polish": polish_result(run.dso.polish, t.polish_messages, t.polish_bytes),
        }
    )
    return base.model_copy(update={"solver": solver})
