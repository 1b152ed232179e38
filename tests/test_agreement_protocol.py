"""Protocol robustness: what a participant ignores (and counts), what it buffers, and that delivery
order and duplicates within the allowed window do not change the agreement at all."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
import yaml
from agreement_helpers import (
    Pending,
    Pick,
    Trace,
    drive,
    fifo,
    grants_last,
    newest_first,
    scaled,
    scenario_from_spec,
    shuffled,
    trace_solution,
)
from pydantic import ValidationError

from p2pdoe.core.agreement.community import CommunityParticipant
from p2pdoe.core.agreement.dso import DsoParticipant
from p2pdoe.core.agreement.protocol import Command, Inbox, Publish, Received
from p2pdoe.core.agreement.setup import Participants, participants
from p2pdoe.core.scenario import Scenario, StalenessSettings
from p2pdoe.core.schemas.messages import DSO_ID, Grant, Proposal, RoundOpen
from p2pdoe.core.solution import Policy
from p2pdoe.errors import ScenarioError
from p2pdoe.io.scenarios import data_path, load_scenario
from p2pdoe.services.inprocess import AdmmRun, run_admm


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("default")


def only(commands: list[Command]) -> Proposal | Grant | RoundOpen:
    assert len(commands) == 1, commands
    assert isinstance(commands[0], Publish)
    return commands[0].message


@dataclass
class Opened:
    """A round just opened: every community has published its proposal for iteration 0."""

    parts: Participants
    opening: RoundOpen
    first: dict[str, Proposal]
    granted: dict[str, Grant] = field(default_factory=dict)

    def community(self, k: int = 0) -> CommunityParticipant:
        return self.parts.communities[k]

    def peer_of(self, k: int = 0) -> str:
        return str(self.parts.communities[k].peer_ids[0])

    def grants0(self) -> dict[str, Grant]:
        """Feed every proposal 0 to the DSO (once); its last answer is grant 0, one per site."""
        if not self.granted:
            out: list[Command] = []
            for p in self.first.values():
                out = self.parts.dso.handle(Received(p))
            assert all(isinstance(c, Publish) and isinstance(c.message, Grant) for c in out), out
            self.granted = {c.message.recipient: c.message for c in out}  # type: ignore[union-attr]
            assert list(self.granted) == list(self.first)  # one per site, in the round's order
        return self.granted

    def grant0(self, k: int = 0) -> Grant:
        """Grant 0 to community k."""
        return self.grants0()[self.community(k).site]


def opened_round(s: Scenario) -> Opened:
    parts = participants(s, Policy.DYNAMIC, "r1")
    opening = only(parts.dso.open_round())
    assert isinstance(opening, RoundOpen)
    first = {}
    for c in parts.communities:
        p = only(c.handle(Received(opening)))
        assert isinstance(p, Proposal)
        assert p.iteration == 0
        first[c.site] = p
    return Opened(parts, opening, first)


@pytest.fixture(params=[0, 1], ids=["synchronous", "bounded-staleness"])
def opened(scenario: Scenario, request: pytest.FixtureRequest) -> Opened:
    """A round of either kind: with bounded staleness allowed, a community tracks its grants and its
    peers' proposals another way (`community._Ledger`); to everything below it must answer alike."""
    staleness = StalenessSettings(max_behind=request.param)
    return opened_round(replace(scenario, admm=replace(scenario.admm, staleness=staleness)))


def give(
    participant: CommunityParticipant | DsoParticipant, *messages: Proposal | Grant | RoundOpen
) -> list[Command]:
    out: list[Command] = []
    for m in messages:
        out += participant.handle(Received(m))
    return out


def rest_of_iteration_0(o: Opened, k: int, grant: Grant) -> list[Proposal | Grant]:
    """What community k still needs to finish iteration 0 (its peers' proposals and the grant)."""
    c = o.community(k)
    return [o.first[p] for p in c.peer_ids] + [grant]


# --- the inbox itself -------------------------------------------------------------------------


def test_inbox_keeps_current_and_next_iteration_and_counts_the_rest() -> None:
    box: Inbox[Any] = Inbox(frozenset({"a", "b"}))
    assert box.offer("a", 0, "a0")
    assert box.offer("b", 1, "b1")  # a fast peer: kept for later
    assert not box.offer("a", 0, "again")
    assert not box.offer("b", 1, "again")
    assert not box.offer("c", 0, "c0")
    assert not box.offer("a", 2, "a2")
    assert not box.complete
    assert box.offer("b", 0, "b0")
    assert box.complete
    assert box.advance() == {"a": "a0", "b": "b0"}
    assert box.iteration == 1
    assert box.current == {"b": "b1"}
    assert not box.complete
    assert not box.offer("a", 0, "late")
    assert dict(box.ignored) == {"duplicate": 2, "unknown_sender": 1, "too_early": 1, "stale_iteration": 1}


# --- a community ------------------------------------------------------------------------------


def test_community_ignores_and_counts_a_duplicate_proposal(opened: Opened) -> None:
    c, p = opened.community(), opened.first[opened.peer_of()]
    assert give(c, p, p) == []
    assert c.ignored == {"duplicate": 1}


def test_a_repeated_grant_is_answered_with_the_latest_proposal_and_counted(opened: Opened) -> None:
    """The coordinator repeats its grant at a deadline when a proposal is missing (a broker may have
    lost it): the community sends its latest proposal again, the same numbers, without a solve."""
    c, grant = opened.community(), opened.grant0()
    assert give(c, grant) == []
    again = only(give(c, grant))
    assert again == opened.first[c.site]
    assert c.ignored == {"duplicate": 1}
    nxt = only(give(c, *[opened.first[p] for p in c.peer_ids]))  # the repeat did no harm
    assert isinstance(nxt, Proposal)
    assert nxt.iteration == 1


def test_a_repeated_round_open_is_answered_with_the_latest_proposal(opened: Opened) -> None:
    c = opened.community()
    assert only(give(c, opened.opening)) == opened.first[c.site]
    assert c.ignored == {"duplicate": 1}


def test_community_ignores_and_counts_stale_messages(opened: Opened) -> None:
    c, grant = opened.community(), opened.grant0()
    nxt = only(give(c, *rest_of_iteration_0(opened, 0, grant)))
    assert isinstance(nxt, Proposal)
    assert nxt.iteration == 1
    assert c.ignored == {}
    assert give(c, opened.first[opened.peer_of()]) == []
    again = give(c, grant)  # a stale grant is a repeat: the last two proposals again
    assert [cmd.message for cmd in again if isinstance(cmd, Publish)] == [opened.first[c.site], nxt]
    assert c.ignored == {"stale_iteration": 2}


def test_a_repeated_grant_lets_a_site_one_iteration_behind_catch_up(
    scenario: Scenario, opened: Opened
) -> None:
    """A broker that restarted lost one peer's first proposal on its way to `behind` only: the DSO
    granted iteration 0, the peer went on to iteration 1, and `behind` waits for what it lost. At the
    deadline the DSO repeats its grant; the peer answers with its last two proposals, and `behind`
    proposes for iteration 1 exactly as it would have without the loss."""
    grant = opened.grant0()
    behind, ahead = opened.community(0), opened.community(1)
    assert ahead.site in behind.peer_ids
    assert behind.site in ahead.peer_ids
    clean = opened_round(scenario)
    expected = only(give(clean.community(0), *rest_of_iteration_0(clean, 0, clean.grant0())))
    only(give(ahead, *rest_of_iteration_0(opened, 1, opened.grant0(1))))
    lost = [opened.first[p] for p in behind.peer_ids if p != ahead.site]
    assert give(behind, *lost, grant) == []  # stuck: the peer's proposal 0 never came
    answers = [cmd.message for cmd in give(ahead, opened.grant0(1)) if isinstance(cmd, Publish)]
    assert [m.iteration for m in answers] == [0, 1]
    assert only(give(behind, *answers)) == expected


def test_community_counts_a_grant_to_another_site_as_invalid(opened: Opened) -> None:
    """Each site hears its own grant; one addressed to another site (a misrouted or forged one) is
    not used, even where it would complete the iteration."""
    c = opened.community(0)
    rest = [opened.first[p] for p in c.peer_ids]
    assert give(c, *rest, opened.grant0(1)) == []
    assert c.ignored == {"invalid": 1}
    nxt = only(give(c, opened.grant0(0)))
    assert isinstance(nxt, Proposal)
    assert nxt.iteration == 1


def test_community_ignores_and_counts_an_unknown_sender(opened: Opened) -> None:
    c, p = opened.community(), opened.first[opened.peer_of()]
    assert give(c, p.model_copy(update={"sender": "stranger"})) == []
    assert c.ignored == {"unknown_sender": 1}


def test_community_holds_messages_of_a_round_not_yet_open(opened: Opened) -> None:
    """Over MQTT a peer's first proposal may beat the DSO's RoundOpen: it is held, not counted."""
    c, p, grant = opened.community(), opened.first[opened.peer_of()], opened.grant0()
    assert give(c, p.model_copy(update={"round": "r2"}), grant.model_copy(update={"round": "r2"})) == []
    assert c.ignored == {}


def test_community_counts_messages_of_a_finished_round() -> None:
    s = load_scenario("default", {"admm": {"max_iterations": 2}})
    trace = drive(s, Policy.DYNAMIC, wire=False)
    c = trace.parts.communities[0]
    late = next(m for _, m in trace.published if isinstance(m, Proposal) and m.sender in c.peer_ids)
    assert give(c, late) == []
    assert c.ignored.get("round_over") == 1


def test_community_ignores_and_counts_a_message_two_iterations_ahead(opened: Opened) -> None:
    """Two ahead of what it could use; with bounded staleness a peer may lead by `max_behind` more."""
    c, p, grant = opened.community(), opened.first[opened.peer_of()], opened.grant0()
    ahead = 2 + opened.opening.admm.max_behind
    assert (
        give(c, p.model_copy(update={"iteration": ahead}), grant.model_copy(update={"iteration": ahead}))
        == []
    )
    assert c.ignored == {"too_early": 2}


def test_community_counts_a_message_that_does_not_fit_as_invalid(opened: Opened) -> None:
    c, p = opened.community(), opened.first[opened.peer_of()]
    short = [e.model_copy(update={"buy_kw": e.buy_kw[:-1]}) for e in p.trades]
    assert give(c, p.model_copy(update={"trades": short})) == []
    assert c.ignored == {"invalid": 1}
    assert give(c, p) == []  # the well-formed one is still welcome
    assert c.ignored == {"invalid": 1}


def test_community_counts_a_grant_with_more_anderson_weights_than_its_memory_as_invalid(
    opened: Opened,
) -> None:
    """The round opened without acceleration (memory 0): one weight at most."""
    c, grant = opened.community(), opened.grant0()
    assert opened.opening.admm.anderson_memory == 0
    assert give(c, grant.model_copy(update={"anderson_weights": [0.5, 0.5]})) == []
    assert c.ignored == {"invalid": 1}
    assert give(c, grant) == []  # the well-formed one is still welcome (peers' proposals pending)
    assert c.ignored == {"invalid": 1}


def test_community_holds_a_bounded_number_of_messages_before_any_round(
    scenario: Scenario, opened: Opened
) -> None:
    idle = participants(scenario, Policy.DYNAMIC, "r1").communities[0]
    p = opened.first[opened.peer_of()]
    held = 2 * (len(idle.peer_ids) + 1)
    for k in range(held + 1):
        assert give(idle, p.model_copy(update={"iteration": k})) == []
    assert idle.ignored == {"no_round": 1}


def test_community_buffers_a_next_iteration_proposal(opened: Opened) -> None:
    c, grant = opened.community(), opened.grant0()
    early = opened.first[opened.peer_of()].model_copy(update={"iteration": 1})
    assert give(c, early) == []
    assert c.ignored == {}
    nxt = only(give(c, *rest_of_iteration_0(opened, 0, grant)))
    assert isinstance(nxt, Proposal)
    assert nxt.iteration == 1
    assert give(c, early) == []  # it was kept for iteration 1: a second copy is a duplicate
    assert c.ignored == {"duplicate": 1}


def test_noise_does_not_change_what_a_community_proposes(scenario: Scenario) -> None:
    clean, noisy = opened_round(scenario), opened_round(scenario)
    expected = only(give(clean.community(), *rest_of_iteration_0(clean, 0, clean.grant0())))
    c, grant = noisy.community(), noisy.grant0()
    p = noisy.first[noisy.peer_of()]
    noise: list[Proposal | Grant | RoundOpen] = [
        p.model_copy(update={"sender": "stranger"}),
        p.model_copy(update={"round": "r2"}),
        p.model_copy(update={"iteration": 5}),
        p.model_copy(update={"iteration": 1}),  # kept for iteration 1, not used in iteration 0
        p,
        grant,
        p,
    ]
    assert give(c, *noise) == []
    assert only(give(c, noisy.opening)) == noisy.first[c.site]  # a repeat: the same proposal again
    rest = [noisy.first[q] for q in c.peer_ids[1:]]
    assert only(give(c, *rest)) == expected


# --- the DSO ----------------------------------------------------------------------------------


def test_dso_ignores_and_counts_a_duplicate_proposal(opened: Opened) -> None:
    p = opened.first[opened.peer_of()]
    assert give(opened.parts.dso, p, p) == []
    assert opened.parts.dso.ignored == {"duplicate": 1}


def test_dso_ignores_and_counts_stale_unknown_wrong_round_and_early_proposals(opened: Opened) -> None:
    dso, p = opened.parts.dso, opened.first[opened.peer_of()]
    clean = opened.grant0()
    noise: list[Proposal | Grant | RoundOpen] = [
        p,  # stale: iteration 0 is over
        p.model_copy(update={"sender": "stranger"}),
        p.model_copy(update={"round": "r2"}),
        p.model_copy(update={"iteration": 3}),
        clean,  # grants are not for the DSO
    ]
    assert give(dso, *noise) == []
    assert dso.ignored == {
        "stale_iteration": 1,
        "unknown_sender": 1,
        "wrong_round": 1,
        "too_early": 1,
        "not_for_dso": 1,
    }


def test_dso_buffers_a_next_iteration_proposal(opened: Opened) -> None:
    dso = opened.parts.dso
    early = opened.first[opened.peer_of()].model_copy(update={"iteration": 1})
    assert give(dso, early) == []
    grant = opened.grant0()
    assert grant.iteration == 0
    assert give(dso, early) == []
    assert dso.ignored == {"duplicate": 1}  # it had been kept for iteration 1


def test_dso_counts_a_proposal_that_does_not_fit_as_invalid(opened: Opened) -> None:
    dso, p = opened.parts.dso, opened.first[opened.peer_of()]
    assert (
        give(dso, p.model_copy(update={"envelope": None}), p.model_copy(update={"trades": p.trades[1:]}))
        == []
    )
    assert dso.ignored == {"invalid": 2}


def test_noise_does_not_change_the_dso_grant(scenario: Scenario) -> None:
    clean = opened_round(scenario)
    noisy = opened_round(scenario)
    p = noisy.first[noisy.peer_of()]
    noise = [p, p.model_copy(update={"sender": "stranger"}), p.model_copy(update={"iteration": 4})]
    assert give(noisy.parts.dso, *noise) == []
    assert noisy.grants0() == clean.grants0()


# --- whole rounds under reordering and duplicates --------------------------------------------


@pytest.fixture(scope="module")
def reference(scenario: Scenario) -> AdmmRun:
    run = run_admm(scenario, Policy.DYNAMIC)
    assert run.dso.status == "converged"
    return run


def assert_same_agreement(scenario: Scenario, trace: Trace, reference: AdmmRun) -> None:
    """Bit for bit what the plain FIFO runner agreed."""
    assert trace.dso.status == reference.dso.status
    assert trace.dso.iterations == reference.dso.iterations
    sol = trace_solution(scenario, Policy.DYNAMIC, trace)
    assert sol.objective_eur == reference.solution.objective_eur
    for mine, theirs in zip(sol.z, reference.solution.z, strict=True):
        assert np.array_equal(mine, theirs)
    assert np.array_equal(sol.trade_price, reference.solution.trade_price)
    assert trace.dso.granted_lo_kw is not None
    assert reference.dso.granted_lo_kw is not None
    assert np.array_equal(trace.dso.granted_lo_kw, reference.dso.granted_lo_kw)


def early_deliveries(trace: Trace) -> int:
    """Proposals a community received before the grant that closes the previous iteration."""
    closed: dict[str, int] = {}  # community -> iterations it has the grant of
    early = 0
    for recipient, m in trace.delivered:
        if recipient == DSO_ID:
            continue
        if isinstance(m, Grant):
            closed[recipient] = max(closed.get(recipient, 0), m.iteration + 1)
        elif isinstance(m, Proposal) and m.iteration > closed.get(recipient, 0):
            early += 1
    return early


ORDERS: dict[str, Pick] = {
    "shuffled-0": shuffled(0),
    "shuffled-1": shuffled(1),
    "grants-last": grants_last,
    "newest-first": newest_first,
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_delivery_order_does_not_change_the_agreement(
    scenario: Scenario, reference: AdmmRun, order: str
) -> None:
    trace = drive(scenario, Policy.DYNAMIC, pick=ORDERS[order], wire=False)
    assert_same_agreement(scenario, trace, reference)
    assert all(counts == {} for counts in trace.ignored().values()), trace.ignored()
    assert early_deliveries(trace) > 0  # next-iteration proposals were buffered, then used


def test_fifo_driving_is_the_inprocess_runner(scenario: Scenario, reference: AdmmRun) -> None:
    trace = drive(scenario, Policy.DYNAMIC)
    assert_same_agreement(scenario, trace, reference)
    assert early_deliveries(trace) == 0


@pytest.fixture(scope="module")
def duplicated(scenario: Scenario) -> Trace:
    """Every message delivered twice to every recipient, in a random order, over the wire."""
    return drive(scenario, Policy.DYNAMIC, pick=shuffled(7), copies=lambda m, r: 2)


def test_duplicates_do_not_change_the_agreement(
    scenario: Scenario, duplicated: Trace, reference: AdmmRun
) -> None:
    assert_same_agreement(scenario, duplicated, reference)
    dso = duplicated.ignored()[DSO_ID]
    assert dso.get("duplicate", 0) + dso.get("stale_iteration", 0) > 0


def test_adjacent_duplicates_do_not_change_the_agreement(scenario: Scenario, reference: AdmmRun) -> None:
    trace = drive(scenario, Policy.DYNAMIC, pick=fifo, copies=lambda m, r: 2, wire=False)
    assert_same_agreement(scenario, trace, reference)


def test_communities_still_report_what_they_ignored_after_the_round(duplicated: Trace) -> None:
    for site, counts in duplicated.ignored().items():
        if site != DSO_ID:
            assert counts.get("duplicate", 0) + counts.get("stale_iteration", 0) > 0, site


def round_opens_last(pending: list[Pending]) -> int:
    """Hand out everything else before the round's opening: the last community to hear of the round
    has its peers' first proposals already."""
    for i, p in enumerate(pending):
        if not isinstance(p.message, RoundOpen) or len(pending) == 1:
            return i
    return 0


def test_a_proposal_before_the_round_open_is_kept(scenario: Scenario, reference: AdmmRun) -> None:
    trace = drive(scenario, Policy.DYNAMIC, pick=round_opens_last, wire=False)
    assert DSO_ID in trace.outcomes, trace.ignored()
    assert_same_agreement(scenario, trace, reference)


def test_a_round_open_after_the_round_is_ignored() -> None:
    s = load_scenario("default", {"admm": {"max_iterations": 3}})
    trace = drive(s, Policy.DYNAMIC, wire=False)
    assert trace.dso.status == "max_iterations"
    opening = next(m for _, m in trace.published if isinstance(m, RoundOpen))
    c = trace.parts.communities[0]
    assert give(c, opening) == []


def test_a_proposal_claiming_to_come_from_the_dso_is_ignored(opened: Opened) -> None:
    c, grant = opened.community(), opened.grant0()
    forged = opened.first[opened.peer_of()].model_copy(update={"sender": DSO_ID})
    assert give(c, forged) == []
    nxt = only(give(c, *rest_of_iteration_0(opened, 0, grant)))
    assert isinstance(nxt, Proposal)
    assert nxt.iteration == 1
    assert sum(c.ignored.values()) == 1


def test_a_community_named_like_the_dso_is_refused() -> None:
    with data_path("scenarios", "default.yaml").open(encoding="utf-8") as fh:
        spec = yaml.safe_load(fh)
    spec["communities"][0]["id"] = DSO_ID
    with pytest.raises((ScenarioError, ValidationError), match="reserved"):
        scenario_from_spec(spec)


# --- plausibility: what a site registered bounds what it may propose ----------------------------


@pytest.mark.parametrize("factor", [1000.0, 1e300])
def test_the_dso_refuses_a_proposal_beyond_what_the_site_registered(opened: Opened, factor: float) -> None:
    """Scaled by 1000, a site's proposals once "converged" with +97,328 EUR on the objective and costs
    of -1.9e23 EUR; scaled by 1e300 they crashed the coordinator. Refused and counted, with a reason."""
    dso = opened.parts.dso
    liar = opened.community(0).site
    assert give(dso, scaled(opened.first[liar], factor)) == []
    assert dso.rejected == 1
    assert (
        "outside its range" in dso.implausible[liar] or "beyond its registered range" in dso.implausible[liar]
    )
    assert liar in dso.waiting_for()  # still waited for: its patience runs out as for a silent site
    for site, p in opened.first.items():  # the honest proposals of the others, and its own, go through
        if site != liar:
            give(dso, p)
    grants = [cmd.message for cmd in give(dso, opened.first[liar]) if isinstance(cmd, Publish)]
    assert [g.recipient for g in grants if isinstance(g, Grant)] == list(opened.first)
    assert dso.rejected == 1


def test_an_implausible_trade_is_named_by_its_peer_and_interval(opened: Opened) -> None:
    """The reason points at the first value out of bounds: the second peer's sale at interval 5."""
    dso = opened.parts.dso
    liar = opened.community(0).site
    p = opened.first[liar]
    trades = list(p.trades)
    bad = trades[1].model_copy(update={"sell_kw": [*trades[1].sell_kw[:5], 1e9, *trades[1].sell_kw[6:]]})
    trades[1] = bad
    assert give(dso, p.model_copy(update={"trades": trades})) == []
    assert dso.implausible[liar].startswith(f"sell_kw[5] with {bad.peer} = 1e+09 kW"), dso.implausible[liar]


def test_every_honest_proposal_of_a_whole_round_is_plausible(scenario: Scenario) -> None:
    """The check never refuses what the sites' own solvers propose: the default day agrees as before."""
    run = run_admm(scenario, Policy.DYNAMIC)
    assert run.dso.status == "converged"
    assert "invalid" not in run.ignored[DSO_ID]
