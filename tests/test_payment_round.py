"""Nash bargaining's payment round as the services run it, the pure parts: the coordinator's
`PaymentRun` (set up from the two rounds' reports, its opening retained, its deadline repeated once,
its outcome), the edge's `EdgeMarket.handle_payment` (its gain from its own costs, its proposals on its
own topic), the topics and the reader."""

from __future__ import annotations

from collections import deque

import pytest

from p2pdoe.core import topics
from p2pdoe.core.agreement.payments import Command, PaymentParty, Publish
from p2pdoe.core.coordinator.payments import PAYMENT_ITERATION, PaymentRun, payment_run
from p2pdoe.core.cpu import NO_CPU
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Heard, Patience, Relieve, Send
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.schemas.payments import (
    LinkPayment,
    PaymentGrant,
    PaymentOpen,
    PaymentProposal,
    decode_payment,
    encode_payment,
)
from p2pdoe.core.schemas.results import CommunityResult, CostBreakdown
from p2pdoe.core.schemas.runtime import SiteReport
from p2pdoe.core.signing import signer_of
from p2pdoe.core.site import coordinator_config, site_config
from p2pdoe.io.scenarios import load_scenario

SCENARIO = load_scenario("default")
CFG = coordinator_config(SCENARIO)
SITES = tuple(s.id for s in CFG.sites)
ALONE = dict(zip(SITES, (-290.0, -300.0, -310.0, 410.0, 1310.0, 230.0), strict=True))
WELFARE = dict(zip(SITES, (-170.0, -220.0, -150.0, 150.0, 250.0, 70.0), strict=True))  # before payments
ROUNDS = ("day-ahead-standalone", "day-ahead", "day-ahead-payments")


def _report(site: str, cost: float, p2p_net: float = 0.0) -> SiteReport:
    """Only what the payment round reads of a report: the site's cost and its trades' net."""
    breakdown = CostBreakdown.model_construct(p2p_net_eur=p2p_net)
    community = CommunityResult.model_construct(cost_eur=cost + p2p_net, cost_breakdown=breakdown)
    return SiteReport.model_construct(site=site, community=community)


def _reports(costs: dict[str, float], p2p_net: float = 0.0) -> dict[str, SiteReport]:
    return {s: _report(s, c, p2p_net if c > 0 else -p2p_net) for s, c in costs.items()}


def test_the_round_is_set_up_only_with_both_reports_of_every_site_and_a_saving() -> None:
    welfare = _reports(WELFARE, 40.0)
    missing = dict(_reports(ALONE))
    del missing["wind-25"]
    assert payment_run(CFG, SITES, missing, welfare, ROUNDS, 10.0) == "no report of both rounds from wind-25"
    worse = _reports({s: c - 1000.0 for s, c in ALONE.items()})
    why = payment_run(CFG, SITES, worse, welfare, ROUNDS, 10.0)
    assert isinstance(why, str)
    assert why.startswith("there is no gain to share")


def test_the_round_runs_to_the_closed_form_and_its_messages_say_so() -> None:
    run = payment_run(CFG, SITES, _reports(ALONE), _reports(WELFARE, 40.0), ROUNDS, 10.0)
    assert isinstance(run, PaymentRun)
    opening = run.open()
    assert opening[0] == Send(topics.payment_open(run.id), encode_payment(run.chair.open), retain=True)
    assert opening[1] == Patience(PAYMENT_ITERATION, 10.0)
    assert run.repeat()[0] == opening[0]  # the deadline: the opening once more,
    assert run.repeat() == []  # and no more
    open_ = decode_payment(opening[0].payload)
    assert isinstance(open_, PaymentOpen)
    gains = {s: ALONE[s] - WELFARE[s] for s in SITES}  # each party's own
    parties = {s: PaymentParty(s, open_, gains[s]) for s in SITES}
    queue: deque[Command] = deque(c for p in parties.values() for c in p.start())
    effects = []
    while queue and run.result is None:
        cmd = queue.popleft()
        if not isinstance(cmd, Publish):
            continue
        msg = cmd.message
        if isinstance(msg, PaymentProposal):
            sent = encode_payment(msg)
            for e in run.proposal(decode_payment(sent), len(sent)):  # type: ignore[arg-type]
                effects.append(e)
                if isinstance(e, Send) and e.topic == topics.payment_grant(run.id):
                    queue += [c for p in parties.values() for c in p.handle(decode_payment(e.payload))]
            queue += [c for p in parties.values() if msg.sender in p.peer_of.values() for c in p.handle(msg)]
    assert run.result is not None
    assert effects[-1] == Relieve(PAYMENT_ITERATION)
    out = run.outcome(ROUNDS[0])
    saving = sum(gains.values())
    for s in SITES:
        assert out.gains_eur[s] == pytest.approx(saving / len(SITES), abs=1e-3), s
        assert out.baseline_cost_eur[s] == ALONE[s]
        assert out.cost_before_payments_eur[s] == pytest.approx(WELFARE[s])
    assert out.messages_per_iteration == pytest.approx(len(SITES) + 1)  # a proposal each and a grant
    assert run.withdraw() == Send(topics.payment_open(run.id), b"", retain=True)


def _edge(site: str = "solar-18") -> EdgeMarket:
    return EdgeMarket(site_config(SCENARIO, SITES.index(site)), None, lambda: 0.0, NO_CPU)


def _open() -> PaymentOpen:
    run = payment_run(CFG, SITES, _reports(ALONE), _reports(WELFARE), ROUNDS, 10.0)
    assert isinstance(run, PaymentRun)
    return run.chair.open


def test_an_edge_bargains_with_the_gain_of_its_own_two_rounds() -> None:
    edge = _edge()
    assert edge.handle_payment(_open()) == []  # no cost of either round: it cannot take part
    assert edge.payments == {}
    edge.cost_of_round("day-ahead-standalone", ALONE["solar-18"], 0.0)
    edge.cost_of_round("day-ahead", WELFARE["solar-18"] - 120.0, -120.0)  # it sold 120 EUR to peers
    [sent] = edge.handle_payment(_open())
    assert isinstance(sent, Send)
    assert sent.topic == topics.payment_proposal("day-ahead-payments", "solar-18")
    assert edge.payments["day-ahead-payments"].gain_eur == pytest.approx(
        ALONE["solar-18"] - WELFARE["solar-18"]
    )
    proposal = decode_payment(sent.payload)
    assert isinstance(proposal, PaymentProposal)
    assert {(p.payer, p.payee) for p in proposal.payments} == {
        e for e in ((x.payer, x.payee) for x in _open().links) if "solar-18" in e
    }
    assert "gain" not in sent.payload.decode()
    grant = PaymentGrant(
        round="day-ahead-payments", iteration=5, status="running", gap_eur=1.0, moved_eur=1.0
    )
    assert edge.handle_payment(grant) == []  # beyond its iteration: ignored
    left_out = _open().model_copy(update={"weights": {s: 1.0 for s in SITES if s != "town-14"}})
    town = _edge("town-14")
    town.cost_of_round("day-ahead-standalone", 1.0, 0.0)
    town.cost_of_round("day-ahead", 0.0, 0.0)
    assert town.handle_payment(left_out) == []


def test_payment_topics_parse_back_and_are_signed_by_their_owner() -> None:
    for topic, kind, site, signer in (
        (topics.payment_open("r.2"), "payments/open", None, "dso"),
        (topics.payment_grant("r.2"), "payments/grant", None, "dso"),
        (topics.payment_proposal("r.2", "wind-25"), "payments/proposal", "wind-25", "edge-wind-25"),
    ):
        parsed = topics.parse(topic)
        assert parsed is not None
        assert (parsed.area, parsed.kind, parsed.site, parsed.round) == ("market", kind, site, "r.2")
        assert signer_of(topic) == signer


def test_a_payment_proposal_on_another_sites_topic_or_malformed_is_dropped_and_counted() -> None:
    reader = MarketReader("solar-18")
    msg = PaymentProposal(
        round="r",
        iteration=0,
        sender="wind-25",
        payments=[LinkPayment(payer="wind-25", payee="town-14", eur=1.0)],
    )
    assert reader.payment(Heard(topics.payment_proposal("r", "wind-25"), encode_payment(msg))) == msg
    assert reader.payment(Heard(topics.payment_proposal("r", "town-14"), encode_payment(msg))) is None
    assert reader.payment(Heard(topics.payment_grant("r"), b'{"kind": "payment_grant"}')) is None
    assert reader.payment(Heard(topics.payment_open("r"), b"")) is None  # a withdrawn opening: uncounted
    assert dict(reader.dropped) == {"sender_not_topic": 1, "malformed": 1}
