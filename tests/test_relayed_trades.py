"""Relayed rounds (docs/agreement.md, "Relayed trades"): the DSO's grant to a site carries each peer's
trade entry for that site, exactly as the peer sent it, so a site needs no peer's proposal. The
numbers every party updates its couplings with are the same as when the sites hear each other, so
the round takes the same iterations to the same answer, bit for bit; a grant that lacks an entry is
refused; an edge agent leaves its peers' proposal topics in such a round and hears them again when a
round needs them. Over a broker: tests/test_agreement_mqtt.py, and the services across processes
below."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from agreement_helpers import drive, shuffled
from realtime_helpers import opening_heard
from service_helpers import Deployment
from test_services import assert_full_agreement

from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityParticipant
from p2pdoe.core.agreement.protocol import Command, Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.cpu import CpuClocks
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Heard, Subscribe, Unsubscribe
from p2pdoe.core.scenario import Scenario, StalenessSettings, admm_settings
from p2pdoe.core.schemas.messages import Grant, Proposal, RoundOpen, TradeProposal, encode
from p2pdoe.core.site import admm_spec, coordinator_config, site_config
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.broker import Broker
from p2pdoe.services.inprocess import Lateness, run_admm

SLOW = "solar-wind-33"


def relayed(s: Scenario, relay: bool = True) -> Scenario:
    return replace(s, admm=replace(s.admm, relay_trades=relay))


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load_scenario("default")


@pytest.mark.parametrize("policy", [Policy.DYNAMIC, Policy.NONE])
def test_a_relayed_round_takes_the_same_iterations_to_the_same_answer_bit_for_bit(
    scenario: Scenario, policy: Policy
) -> None:
    heard, relay = run_admm(relayed(scenario, False), policy), run_admm(relayed(scenario), policy)
    assert relay.dso.status == heard.dso.status == "converged"
    assert relay.dso.iterations == heard.dso.iterations
    assert np.array_equal(relay.dso.trades.y, heard.dso.trades.y)
    assert np.array_equal(relay.dso.trades.price, heard.dso.trades.price)
    for a, b in zip(relay.communities, heard.communities, strict=True):
        assert np.array_equal(a.z, b.z), a.site
        assert np.array_equal(a.buy_price, b.buy_price), a.site
    assert all(not counts for counts in relay.ignored.values()), relay.ignored


def test_each_grant_carries_its_peers_entries_exactly_as_they_sent_them(scenario: Scenario) -> None:
    trace = drive(relayed(scenario), Policy.DYNAMIC)
    assert trace.dso.status == "converged"
    sent = {(p.sender, p.iteration): {e.peer: e for e in p.trades} for p in trace.proposals()}
    peers = {c.site: c.peer_ids for c in trace.parts.communities}
    for it in trace.grants():
        for g in it.grants:
            assert g.relayed is not None
            assert list(g.relayed) == list(peers[g.recipient])
            for peer, entry in g.relayed.items():
                assert entry == sent[(peer, g.iteration)][g.recipient]
    assert {who for who, m in trace.delivered if isinstance(m, Proposal)} == {"dso"}  # no site hears one


def test_a_relayed_round_with_a_straggler_and_shuffled_deliveries_ends_where_the_heard_one_does(
    scenario: Scenario,
) -> None:
    """Bounded staleness: a grant that freezes the late site carries no entry of it, and its peers
    keep their couplings with it, as when they hear it directly."""
    s = replace(scenario, admm=replace(scenario.admm, staleness=StalenessSettings(2, 0.5)))
    heard = run_admm(s, Policy.DYNAMIC, late=Lateness(SLOW, closes=2))
    trace = drive(relayed(s), Policy.DYNAMIC, pick=shuffled(7), late=Lateness(SLOW, closes=2))
    assert trace.dso.status == "converged"
    frozen = [g for it in trace.grants() for g in it.grants if SLOW in g.frozen]
    assert frozen
    assert all(SLOW not in (g.relayed or {}) for g in frozen)
    gap = abs(trace.dso.trades.y - heard.dso.trades.y).max()
    assert gap <= 1.0, gap  # the schedules agree within the benchmark's 1 kW (the order differs)
    for c, h in zip(trace.communities, heard.communities, strict=True):
        assert c.status == "converged"
        assert np.abs(c.z - h.z).max() <= 1.0, c.site
    assert all(not counts for counts in trace.ignored().values()), trace.ignored()


def _first_grant(s: Scenario) -> tuple[CommunityParticipant, Grant]:
    """The first community of a relayed round, after its opening, and its real grant of iteration 0."""
    p = participants(relayed(s), Policy.DYNAMIC, "relayed")
    (opening,) = p.dso.open_round()
    assert isinstance(opening, Publish)
    grants: list[Command] = []
    for c in p.communities:
        for cmd in c.handle(Received(opening.message)):
            assert isinstance(cmd, Publish)
            grants += p.dso.handle(Received(cmd.message))
    first = p.communities[0]
    mine = [g.message for g in grants if isinstance(g, Publish) and g.message.recipient == first.site]  # type: ignore[union-attr]
    assert len(mine) == 1
    assert isinstance(mine[0], Grant)
    return first, mine[0]


def test_a_relayed_grant_without_every_peers_entry_is_refused_and_the_real_one_taken(
    scenario: Scenario,
) -> None:
    site, grant = _first_grant(scenario)
    assert grant.relayed is not None
    entries = grant.relayed
    (first, e), *rest = entries.items()
    short = e.model_copy(update={"buy_kw": e.buy_kw[:-1]})
    misaddressed = e.model_copy(update={"peer": first})  # the peer's entry for someone else
    bad_ones: list[dict[str, TradeProposal] | None] = [
        None,
        dict(rest),
        {first: short, **dict(rest)},
        {**entries, "nobody": e},
        {first: misaddressed, **dict(rest)},
    ]
    for bad in bad_ones:
        assert site.handle(Received(grant.model_copy(update={"relayed": bad}))) == []
    assert site.ignored == {"invalid": 5}
    (proposal,) = site.handle(Received(grant))
    assert isinstance(proposal, Publish)
    assert isinstance(proposal.message, Proposal)
    assert proposal.message.iteration == 1


def test_a_peers_proposal_in_a_relayed_round_is_not_used(scenario: Scenario) -> None:
    p = participants(relayed(scenario), Policy.DYNAMIC, "relayed")
    (opening,) = p.dso.open_round()
    assert isinstance(opening, Publish)
    first, second = p.communities[0], p.communities[1]
    first.handle(Received(opening.message))
    (theirs,) = second.handle(Received(opening.message))
    assert isinstance(theirs, Publish)
    assert first.handle(Received(theirs.message)) == []
    assert not first.may_solve(theirs.message)  # type: ignore[arg-type]
    assert first.ignored == {}


def _opening(s: Scenario, name: str, relay: bool) -> Heard:
    heard = opening_heard(s, name, datetime(2026, 6, 1, tzinfo=UTC), s.horizon)
    msg = RoundOpen.model_validate_json(heard.payload)
    admm = msg.admm.model_copy(update={"relay_trades": relay})
    return Heard(heard.topic, encode(msg.model_copy(update={"admm": admm})), False)


def test_an_edge_leaves_its_peers_proposals_in_a_relayed_round_and_hears_them_again_after(
    scenario: Scenario,
) -> None:
    config = site_config(scenario, 0)
    market = EdgeMarket(config, None, time.perf_counter, CpuClocks(time.process_time))
    filters = [topics.proposal("+", p.id) for p in config.peers]

    def changes(name: str, relay: bool) -> list[object]:
        msg = market.read(_opening(scenario, name, relay))
        assert msg is not None
        return [c for c in market.handle(msg) if isinstance(c, (Subscribe, Unsubscribe))]

    assert changes("first", relay=True) == [Unsubscribe(f) for f in filters]
    assert changes("second", relay=True) == []
    assert changes("third", relay=False) == [Subscribe(f) for f in filters]
    assert changes("fourth", relay=False) == []


@pytest.mark.parametrize(("flag", "expected"), [(True, True), (False, False), (None, False)])
def test_the_coordinators_relay_trades_overrides_the_configuration(flag: bool | None, expected: bool) -> None:
    from dso_coordinator.service import build_machine
    from dso_coordinator.settings import CoordinatorSettings

    cfg = coordinator_config(load_scenario("default"))
    start = datetime.fromisoformat(cfg.start.replace("Z", "+00:00"))
    settings = CoordinatorSettings(coordinator_config=Path("unused.json"), relay_trades=flag)
    assert build_machine(cfg, settings, start).ctx.cfg.admm.relay_trades is expected


def test_the_setting_survives_the_coordinators_configuration(scenario: Scenario) -> None:
    """`p2pdoe site-config` writes the scenario's ADMM settings into the coordinator's configuration,
    which reads them back: every setting, the relay's included, comes back as it was."""
    a = replace(relayed(scenario).admm, staleness=StalenessSettings(3, 0.6), over_relaxation=1.7)
    assert admm_settings(admm_spec(a)) == a
    assert admm_settings(coordinator_config(relayed(scenario)).admm).relay_trades


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_relayed_day_ahead_round_across_processes_over_mosquitto(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """The services as deployed, with `dso-coordinator --relay-trades`: the edge agents leave their
    peers' topics at the opening, and the round ends on the in-process answer with nothing dropped."""
    with Deployment(mosquitto_broker.url, tmp_path) as d:
        results = d.run_round("--relay-trades")
    assert_full_agreement(results, d.sites)
