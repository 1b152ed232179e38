"""Drive the agreement's sans-I/O participants by hand: a message bus whose delivery order, duplicates
and recording the tests control (`p2pdoe.services.inprocess.run_admm` is the plain FIFO version)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant
from p2pdoe.core.agreement.outcome import solution
from p2pdoe.core.agreement.protocol import Command, Finished, Message, Publish, Received
from p2pdoe.core.agreement.setup import Participants, participants
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.scenario import Scenario, build_scenario
from p2pdoe.core.schemas.messages import DSO_ID, Grant, Proposal, RoundOpen, decode, encode
from p2pdoe.core.schemas.scenario import ScenarioSpec
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_feeder
from p2pdoe.services.inprocess import Lateness, subscribers


@dataclass(frozen=True)
class Pending:
    """One message waiting to be handed to one recipient."""

    seq: int
    recipient: str
    message: Message


# Chooses which pending delivery goes next (an index into the list, oldest first).
Pick = Callable[[list[Pending]], int]
# How many copies of a message each recipient gets (1: no duplicates).
Copies = Callable[[Message, str], int]


def fifo(pending: list[Pending]) -> int:
    return 0


def _opening(pending: list[Pending]) -> int | None:
    """A pending RoundOpen, if any. The reordering picks hand it out first: a proposal that reaches a
    community before the round is open there is lost (see test_agreement_protocol's xfail)."""
    return next((i for i, p in enumerate(pending) if isinstance(p.message, RoundOpen)), None)


def newest_first(pending: list[Pending]) -> int:
    first = _opening(pending)
    return len(pending) - 1 if first is None else first


def grants_last(pending: list[Pending]) -> int:
    """Hold every grant back while any proposal is pending: a community then sees its peers'
    proposals for the next iteration before the grant that closes the current one."""
    for i, p in enumerate(pending):
        if not isinstance(p.message, Grant):
            return i
    return 0


def shuffled(seed: int) -> Pick:
    rng = np.random.default_rng(seed)

    def pick(pending: list[Pending]) -> int:
        first = _opening(pending)
        return int(rng.integers(len(pending))) if first is None else first

    return pick


def once(message: Message, recipient: str) -> int:
    return 1


@dataclass(frozen=True)
class IterationGrants:
    """One iteration's grants, one per site, in the order the DSO sent them."""

    grants: tuple[Grant, ...]

    @property
    def iteration(self) -> int:
        return self.grants[0].iteration

    @property
    def status(self) -> str:
        assert len({g.status for g in self.grants}) == 1, "one verdict per iteration"
        return self.grants[0].status

    @property
    def sites(self) -> list[str]:
        return [g.recipient for g in self.grants]


@dataclass
class Trace:
    """What happened on the bus: every message published and delivered, in order, and every outcome."""

    parts: Participants
    published: list[tuple[str, Message]] = field(default_factory=list)
    delivered: list[tuple[str, Message]] = field(default_factory=list)  # (recipient, message)
    outcomes: dict[str, object] = field(default_factory=dict)
    deliveries: int = 0
    wall_s: float = 0.0

    @property
    def dso(self) -> DsoOutcome:
        out = self.outcomes[DSO_ID]
        assert isinstance(out, DsoOutcome)
        return out

    @property
    def communities(self) -> tuple[CommunityOutcome, ...]:
        outs = tuple(self.outcomes[c.site] for c in self.parts.communities)
        assert all(isinstance(o, CommunityOutcome) for o in outs)
        return outs  # type: ignore[return-value]

    def grants(self) -> list[IterationGrants]:
        """Every iteration's grants, in order (the DSO sends one per site at once)."""
        out: list[IterationGrants] = []
        for m in (m for _, m in self.published if isinstance(m, Grant)):
            if out and out[-1].iteration == m.iteration:
                out[-1] = IterationGrants((*out[-1].grants, m))
            else:
                out.append(IterationGrants((m,)))
        return out

    def proposals(self) -> list[Proposal]:
        return [m for _, m in self.published if isinstance(m, Proposal)]

    def ignored(self) -> dict[str, dict[str, int]]:
        return {DSO_ID: self.parts.dso.ignored} | {c.site: c.ignored for c in self.parts.communities}


def drive(
    s: Scenario,
    policy: Policy,
    *,
    round_id: str = "day-ahead",
    pick: Pick = fifo,
    copies: Copies = once,
    wire: bool = True,
    parts: Participants | None = None,
    max_deliveries: int = 1_000_000,
    late: Lateness | None = None,
) -> Trace:
    """Run one round to the end. `wire`: every delivery goes through encode/decode, as over MQTT.
    `late`: a straggler whose proposals wait while anything else can be delivered (bounded
    staleness); `pick` chooses among the deliveries not held back."""
    started = time.perf_counter()
    p = parts or participants(s, policy, round_id)
    trace = Trace(p)
    targets: dict[str, DsoParticipant | CommunityParticipant] = {c.site: c for c in p.communities}
    targets[DSO_ID] = p.dso
    pending: list[Pending] = []

    def post(commands: list[Command], sender: str) -> None:
        for cmd in commands:
            if isinstance(cmd, Publish):
                trace.published.append((sender, cmd.message))
                for name in subscribers(cmd.message, p.communities, p.dso.settings.relay_trades):
                    for _ in range(copies(cmd.message, name)):
                        pending.append(Pending(len(trace.published), name, cmd.message))
            elif isinstance(cmd, Finished):
                assert sender not in trace.outcomes, f"{sender} finished twice"
                trace.outcomes[sender] = cmd.outcome

    post(p.dso.open_round(), DSO_ID)
    released: set[int] = set()  # seq of the straggler's proposals let through
    while pending:
        free = [x for x in pending if late is None or x.seq in released or not late.holds(x.message)]
        if not free:
            assert late is not None
            closed = late.idle(p.dso)
            post(closed, DSO_ID)
            released |= set() if closed else {x.seq for x in pending}
            continue
        trace.deliveries += 1
        assert trace.deliveries <= max_deliveries, "the round does not end"
        item = free[pick(free)]
        pending.remove(item)
        message = decode(encode(item.message)) if wire else item.message
        trace.delivered.append((item.recipient, message))
        post(targets[item.recipient].handle(Received(message)), item.recipient)
    trace.wall_s = time.perf_counter() - started
    return trace


def trace_solution(s: Scenario, policy: Policy, trace: Trace) -> Solution:
    """The `Solution` of a driven round, assembled exactly as `run_admm` does."""
    safe = safe_set(s) if policy is not Policy.NONE else None
    return solution(policy, trace.parts.qps, trace.communities, trace.dso, safe, trace.wall_s)


def scenario_from_spec(spec: dict[str, Any]) -> Scenario:
    """A scenario from a spec document (what a YAML file holds), without touching the file system
    beyond the named feeder."""
    validated = ScenarioSpec.model_validate(spec)
    return build_scenario(validated, load_feeder(validated.feeder.source), {})


def grant_box(grants: IterationGrants) -> tuple[np.ndarray, np.ndarray]:
    """An iteration's granted (lo, up), each (C, T) in the order the grants were sent."""
    envelopes = [g.envelope for g in grants.grants]
    assert all(e is not None for e in envelopes)
    lo = np.array([e.lo_kw for e in envelopes if e is not None], dtype=float)
    up = np.array([e.up_kw for e in envelopes if e is not None], dtype=float)
    return lo, up


def scaled(p: Proposal, factor: float) -> Proposal:
    """The same proposal with every quantity times `factor`: valid-looking numbers, not from assets."""
    trades = [
        t.model_copy(
            update={"buy_kw": [v * factor for v in t.buy_kw], "sell_kw": [v * factor for v in t.sell_kw]}
        )
        for t in p.trades
    ]
    env = p.envelope
    assert env is not None
    scaled = env.model_copy(
        update={"lo_kw": [v * factor for v in env.lo_kw], "up_kw": [v * factor for v in env.up_kw]}
    )
    return p.model_copy(update={"trades": trades, "envelope": scaled})
