"""Bounded-staleness rounds (docs/agreement.md, "A straggler"): the DSO may close an iteration
without a late site's proposal. The late site's couplings keep their values and prices meanwhile;
its proposal counts in the iteration it arrives in; no site stays frozen for more than `max_behind`
iterations in a row; and a round converges only in an iteration that used every site's new
proposal. Lateness here is a deterministic schedule (`Lateness`): every proposal of one site
arrives only once the DSO has closed `closes` iterations without it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from agreement_helpers import drive, shuffled, trace_solution
from pydantic import ValidationError

from p2pdoe.analysis.accounts import net_injection
from p2pdoe.analysis.results import build_results
from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import RoundSetup
from p2pdoe.core.agreement.dso import DsoOutcome, IterationRecord
from p2pdoe.core.agreement.protocol import Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.coordinator.rounds import STRAGGLERS, RoundRun, Timings
from p2pdoe.core.effects import Patience, Relieve, Send
from p2pdoe.core.scenario import Scenario, StalenessSettings
from p2pdoe.core.schemas.messages import Grant, Proposal, decode
from p2pdoe.core.schemas.runtime import Progress
from p2pdoe.core.schemas.scenario import Admm, Anderson
from p2pdoe.core.site import coordinator_config
from p2pdoe.core.solution import Policy, Solution
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.services.inprocess import Lateness, run_admm
from p2pdoe.services.settings import ConfigError

SLOW = "solar-wind-33"  # the site farthest from the synchronous answer in the prototype
INJECTION_KW = 1.0  # how far a community's net injection may lie from the centralized one
OBJECTIVE_REL = 1e-4  # of the centralized gross energy cost


def stale(s: Scenario, max_behind: int, share: float = 0.5) -> Scenario:
    return replace(s, admm=replace(s.admm, staleness=StalenessSettings(max_behind, share)))


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("default")


@pytest.fixture(scope="module")
def synchronous(scenario: Scenario) -> DsoOutcome:
    return run_admm(scenario, Policy.DYNAMIC).dso


@pytest.fixture(scope="module")
def central(scenario: Scenario) -> Solution:
    return solve_centralized(scenario, Policy.DYNAMIC)


def frozen_runs(history: tuple[IterationRecord, ...], site: str) -> list[int]:
    """The lengths of the runs of consecutive iterations that froze `site`."""
    runs: list[int] = []
    n = 0
    for record in history:
        if site in record.frozen:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    return runs + ([n] if n else [])


def assert_near_optimum(s: Scenario, sol: Solution, central: Solution) -> None:
    gross = build_results(s, central, "centralized").totals.gross_energy_eur
    assert abs(sol.objective_eur - central.objective_eur) <= OBJECTIVE_REL * gross
    for c, a, b in zip(s.communities, central.schedules, sol.schedules, strict=True):
        gap = np.abs(net_injection(c, a) - net_injection(c, b)).max()
        assert gap <= INJECTION_KW, (c.id, float(gap))


def test_a_straggler_answered_every_third_iteration_still_reaches_the_optimum(
    scenario: Scenario, synchronous: DsoOutcome, central: Solution
) -> None:
    run = run_admm(stale(scenario, 2), Policy.DYNAMIC, late=Lateness(SLOW, closes=2))
    history = run.dso.history
    assert run.dso.status == "converged"
    assert history[-1].frozen == ()  # the verdict needs every site's new proposal
    assert {site for h in history for site in h.frozen} == {SLOW}
    assert frozen_runs(history, SLOW)
    assert max(frozen_runs(history, SLOW)) == 2
    slow = next(c for c in run.communities if c.site == SLOW)
    assert len(slow.local_osqp_iterations) <= run.dso.iterations / 2  # it solved far less often
    assert run.dso.iterations > synchronous.iterations  # the price: more, shorter iterations
    assert_near_optimum(scenario, run.solution, central)


def test_no_site_stays_frozen_longer_than_max_behind(scenario: Scenario, central: Solution) -> None:
    """The straggler is later than the rule allows: the DSO waits for it after two iterations."""
    run = run_admm(stale(scenario, 2), Policy.DYNAMIC, late=Lateness(SLOW, closes=5))
    runs = frozen_runs(run.dso.history, SLOW)
    assert runs
    assert max(runs) == 2
    assert run.dso.status == "converged"
    assert_near_optimum(scenario, run.solution, central)


@pytest.mark.parametrize(("max_behind", "share"), [(0, 0.5), (2, 1.0)])
def test_no_iteration_closes_early_when_the_rule_forbids_it(
    scenario: Scenario, synchronous: DsoOutcome, max_behind: int, share: float
) -> None:
    """Without staleness, or when every site's proposal is needed, the late site is waited for:
    the very same round as the synchronous one."""
    run = run_admm(stale(scenario, max_behind, share), Policy.DYNAMIC, late=Lateness(SLOW, closes=3))
    assert all(h.frozen == () for h in run.dso.history)
    assert run.dso.iterations == synchronous.iterations
    assert run.dso.status == "converged"


def test_the_sites_agree_whatever_order_their_messages_arrive_in(
    scenario: Scenario, central: Solution
) -> None:
    """A straggler, and every other delivery in a random order: grants before the proposals they
    use, a peer's next proposal before the grant that asked for it. Every party keeps the same copy
    of every coupling, so the answer is the optimum's."""
    s = stale(scenario, 2)
    trace = drive(s, Policy.DYNAMIC, pick=shuffled(7), late=Lateness(SLOW, closes=2))
    assert trace.dso.status == "converged"
    assert any(g.grants[0].frozen for g in trace.grants())
    for c in trace.communities:  # each party's copies of its trades match the DSO's
        assert c.status == "converged"
    assert_near_optimum(s, trace_solution(s, Policy.DYNAMIC, trace), central)
    ignored = trace.ignored()
    assert all(not counts for counts in ignored.values()), ignored


def test_a_grant_names_the_frozen_sites_only_when_there_are_any(scenario: Scenario) -> None:
    trace = drive(stale(scenario, 1), Policy.DYNAMIC, late=Lateness(SLOW, closes=1))
    grants = [g for it in trace.grants() for g in it.grants]
    assert {tuple(g.frozen) for g in grants} == {(), (SLOW,)}
    assert all(len({tuple(g.frozen) for g in it.grants}) == 1 for it in trace.grants())  # same to all


def test_staleness_and_anderson_acceleration_are_refused_together() -> None:
    with pytest.raises(ValidationError, match=r"staleness\.max_behind > 0 needs anderson\.memory 0"):
        Admm.model_validate({"staleness": {"max_behind": 1}, "anderson": {"memory": 2}})


def test_the_coordinators_max_behind_overrides_the_configuration() -> None:
    from dso_coordinator.service import build_machine
    from dso_coordinator.settings import CoordinatorSettings

    cfg = coordinator_config(load_scenario("default"))
    start = datetime.fromisoformat(cfg.start.replace("Z", "+00:00"))
    settings = CoordinatorSettings(coordinator_config=Path("unused.json"), max_behind=2)
    machine = build_machine(cfg, settings, start)
    assert machine.ctx.cfg.admm.staleness.max_behind == 2
    accelerated = cfg.model_copy(
        update={"admm": cfg.admm.model_copy(update={"anderson": Anderson(memory=3)})}
    )
    with pytest.raises(ConfigError, match=r"^--max-behind 2: .*needs anderson\.memory 0"):
        build_machine(accelerated, settings, start)


def test_a_round_cut_short_while_a_site_is_frozen_leaves_it_inside_the_last_grant(scenario: Scenario) -> None:
    """At its iteration cap the round ends whatever is frozen: the frozen site settles inside the
    envelope of the last grant (the one published as its DOE), not of the last that used it."""
    s = stale(scenario, 2)
    s = replace(s, admm=replace(s.admm, max_iterations=5))
    run = run_admm(s, Policy.DYNAMIC, late=Lateness(SLOW, closes=2))
    assert run.dso.status == "max_iterations"
    assert SLOW in run.dso.history[-1].frozen
    c = s.ids.index(SLOW)
    slow = run.communities[c]
    assert run.dso.granted_lo_kw is not None
    assert run.dso.granted_up_kw is not None
    assert slow.granted_lo_kw is not None
    assert slow.granted_up_kw is not None
    np.testing.assert_array_equal(slow.granted_lo_kw, run.dso.granted_lo_kw[c])
    np.testing.assert_array_equal(slow.granted_up_kw, run.dso.granted_up_kw[c])
    x = net_injection(s.communities[c], run.solution.schedules[c])
    assert np.all(x >= run.dso.granted_lo_kw[c] - 1e-3)
    assert np.all(x <= run.dso.granted_up_kw[c] + 1e-3)


def test_the_coordinator_waits_for_a_straggler_a_while_then_goes_on_without_it(scenario: Scenario) -> None:
    """Its round (`RoundRun`), on a clock of the test's: once the iteration may close early it waits
    `straggler_wait` times as long as the iteration has taken, then closes it without the late site,
    and says so on dso/progress; the late proposal counts in the next iteration."""
    s = stale(scenario, 2)
    p = participants(s, Policy.DYNAMIC, "day-ahead")
    setup = RoundSetup(p.dso, tuple(s.ids), (), None, None)  # type: ignore[arg-type]
    run = RoundRun(setup, Timings(), 10.0, lambda: 0.0, straggler_wait=0.5)
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    opening = decode(next(e for e in run.open(t0) if isinstance(e, Send)).payload)
    by_site = {c.site: c for c in p.communities}
    sent = {site: c.handle(Received(opening)) for site, c in by_site.items()}
    first = {site: cmds[0].message for site, cmds in sent.items() if isinstance(cmds[0], Publish)}
    effects = [e for site in s.ids for e in run.proposal(first[site], 1, t0)]  # type: ignore[arg-type]
    grants = [decode(e.payload) for e in effects if isinstance(e, Send) and "/grant/" in e.topic]
    assert len(grants) == len(s.ids)  # the first iteration waited for everyone
    second: dict[str, Proposal] = {}
    for site, c in by_site.items():
        mine = [g for g in grants if isinstance(g, Grant) and g.recipient == site]
        peers = [first[peer] for peer in c.peer_ids]
        cmds = [cmd for m in (*peers, *mine) for cmd in c.handle(Received(m))]
        second[site] = next(
            cmd.message for cmd in cmds if isinstance(cmd, Publish) and isinstance(cmd.message, Proposal)
        )
    t1 = t0 + timedelta(seconds=4)
    effects = [e for site in s.ids if site != SLOW for e in run.proposal(second[site], 1, t1)]
    waits = [e for e in effects if isinstance(e, Patience) and e.key == STRAGGLERS]
    assert [w.seconds for w in waits] == [2.0]  # half the 4 s the iteration took, asked once
    assert run.missing() == (SLOW,)
    closed = run.close_early(t1 + timedelta(seconds=2))
    grants = [decode(e.payload) for e in closed if isinstance(e, Send) and "/grant/" in e.topic]
    assert {tuple(g.frozen) for g in grants if isinstance(g, Grant)} == {(SLOW,)}
    progress = next(e for e in closed if isinstance(e, Send) and e.topic == topics.DSO_PROGRESS)
    assert Progress.model_validate_json(progress.payload).frozen_sites == [SLOW]
    assert Relieve(STRAGGLERS) in closed
    assert run.close_early(t1 + timedelta(seconds=3)) == []  # nothing more to close
    run.proposal(second[SLOW], 1, t1 + timedelta(seconds=3))  # late, for the iteration now open
    assert SLOW not in run.missing()
