"""The payment agreement of Nash bargaining as messages (p2pdoe.core.agreement.payments): through the
wire encoding and in any order of delivery it reaches the same payments as in order, and the closed
form; repeats are answered, malformed proposals dropped and counted; no gain travels."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from p2pdoe.core.agreement.payments import (
    Command,
    PaymentChair,
    PaymentOutcome,
    PaymentParty,
    PaymentResult,
    Publish,
    payment_open,
    run_payments,
)
from p2pdoe.core.bargaining import closed_form_gains, default_rho
from p2pdoe.core.schemas.payments import (
    LinkPayment,
    PaymentGrant,
    PaymentMessage,
    PaymentOpen,
    PaymentProposal,
    decode_payment,
    encode_payment,
)

GAINS = {"a": -50.0, "b": 120.0, "c": 230.0, "d": 0.5}
PEERS = {"a": ["b", "c"], "b": ["a", "c", "d"], "c": ["a", "b"], "d": ["b"]}
WEIGHTS = dict.fromkeys(GAINS, 1.0)


def _open(round_id: str = "2026-06-01-payments") -> PaymentOpen:
    rho = default_rho(WEIGHTS, closed_form_gains(GAINS, WEIGHTS))
    return payment_open(round_id, "2026-06-01-standalone", "2026-06-01", WEIGHTS, PEERS, rho)


def _shuffled_run(open_: PaymentOpen, seed: int) -> tuple[PaymentResult, dict[str, PaymentOutcome], int]:
    """Every message through its JSON encoding, the next one delivered drawn at random from all sent
    and not yet delivered (MQTT orders only one publisher's messages on one topic)."""
    rng = random.Random(seed)
    chair = PaymentChair(open_)
    parties = {s: PaymentParty(s, open_, GAINS[s]) for s in open_.weights}
    pending: list[Command] = [c for p in parties.values() for c in p.start()]
    result, outcomes, delivered = None, {}, 0
    while pending:
        cmd = pending.pop(rng.randrange(len(pending)))
        if isinstance(cmd, PaymentResult):
            result = cmd
            continue
        if isinstance(cmd, PaymentOutcome):
            outcomes[cmd.site] = cmd
            continue
        delivered += 1
        pending += _deliver(decode_payment(encode_payment(cmd.message)), chair, parties)
    assert result is not None
    return result, outcomes, delivered


def test_in_any_order_through_the_wire_the_payments_are_those_in_order() -> None:
    in_order, own = run_payments(_open(), GAINS)
    assert in_order.status == "converged"
    for seed in range(3):
        shuffled, theirs, delivered = _shuffled_run(_open(), seed)
        assert shuffled.iterations == in_order.iterations
        assert shuffled.payments == in_order.payments  # the same arithmetic, bit for bit
        assert {c: o.net_payment_eur for c, o in theirs.items()} == {
            c: o.net_payment_eur for c, o in own.items()
        }
        assert delivered == in_order.iterations * (len(GAINS) + 1)  # a proposal each, a grant


def test_every_community_gains_the_same_and_each_agrees_with_the_chair() -> None:
    result, outcomes = run_payments(_open(), GAINS)
    share = sum(GAINS.values()) / len(GAINS)
    for c, g in GAINS.items():
        assert g - outcomes[c].net_payment_eur == pytest.approx(share, abs=1e-3), c
        assert outcomes[c].net_payment_eur == pytest.approx(result.net_payment_eur[c], abs=1e-4), c
        assert outcomes[c].status == "converged"
        assert outcomes[c].iterations == result.iterations
    assert sum(result.net_payment_eur.values()) == pytest.approx(0.0, abs=1e-9)


def test_a_repeated_grant_is_answered_with_the_latest_proposal() -> None:
    open_ = _open()
    party = PaymentParty("d", open_, GAINS["d"])
    [first] = party.start()
    assert isinstance(first, Publish)
    assert isinstance(first.message, PaymentProposal)
    assert party.handle(open_) == [first]  # the opening repeated
    b0 = PaymentProposal(round=open_.round, iteration=0, sender="b", payments=_copies("b", 0.0))
    grant0 = PaymentGrant(round=open_.round, iteration=0, status="running", gap_eur=1.0, moved_eur=1.0)
    assert party.handle(b0) == []  # waits for the verdict
    [second] = party.handle(grant0)
    assert isinstance(second, Publish)
    assert isinstance(second.message, PaymentProposal)
    assert second.message.iteration == 1
    assert party.handle(grant0) == [second]  # the grant of 0 repeated: iteration 1 again


def test_a_proposal_without_one_of_its_links_is_dropped_and_counted() -> None:
    open_ = _open()
    chair = PaymentChair(open_)
    short = PaymentProposal(round=open_.round, iteration=0, sender="b", payments=_copies("b", 0.0)[:1])
    assert chair.handle(short) == []
    assert chair.ignored == {"invalid": 1}
    assert "b" in chair.waiting_for()
    party = PaymentParty("d", open_, GAINS["d"])
    party.start()
    lacking = PaymentProposal(
        round=open_.round,
        iteration=0,
        sender="b",
        payments=[p for p in _copies("b", 0.0) if "d" not in (p.payer, p.payee)],
    )
    assert party.handle(lacking) == []
    assert party.ignored == {"invalid": 1}
    other = PaymentProposal(round="another", iteration=0, sender="b", payments=_copies("b", 0.0))
    assert party.handle(other) == []
    assert party.ignored["wrong_round"] == 1


def test_no_gain_crosses_the_wire() -> None:
    """Every key any payment message carries is a public one; no figure equal to a gain travels."""
    open_ = _open()
    keys: set[str] = set()
    figures: list[float] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            keys.update(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, float):
            figures.append(node)

    chair = PaymentChair(open_)
    parties = {s: PaymentParty(s, open_, GAINS[s]) for s in open_.weights}
    pending: list[Command] = [c for p in parties.values() for c in p.start()]
    walk(json.loads(encode_payment(open_)))
    while pending:
        cmd = pending.pop(0)
        if not isinstance(cmd, Publish):
            continue
        walk(json.loads(encode_payment(cmd.message)))
        pending += _deliver(cmd.message, chair, parties)
    assert not any("gain" in k or "cost" in k for k in keys), keys
    assert not any(abs(f - g) < 1e-6 for f in figures for g in GAINS.values())


@pytest.mark.parametrize(
    "change",
    [
        {"links": [{"payer": "a", "payee": "a"}]},
        {"links": [{"payer": "a", "payee": "b"}, {"payer": "b", "payee": "a"}]},
        {"links": [{"payer": "a", "payee": "zz"}]},
        {"rho_per_eur2": float("nan")},
        {"weights": {"a": 1.0}},
        {"weights": {"a": 1.0, "dso": 1.0}},
    ],
    ids=["self-link", "link-twice", "unknown-site", "nan-rho", "one-site", "dso-site"],
)
def test_a_malformed_opening_is_refused(change: dict[str, object]) -> None:
    data = {**json.loads(encode_payment(_open())), **change}
    with pytest.raises((ValidationError, ValueError)):
        decode_payment(json.dumps(data).encode())


def _deliver(msg: PaymentMessage, chair: PaymentChair, parties: dict[str, PaymentParty]) -> list[Command]:
    """A proposal to the chair and the sender's peers, a grant to every party."""
    if isinstance(msg, PaymentProposal):
        out = chair.handle(msg)
        return out + [c for p in parties.values() if msg.sender in p.peer_of.values() for c in p.handle(msg)]
    return [c for p in parties.values() for c in p.handle(msg)]


def _copies(site: str, eur: float) -> list[LinkPayment]:
    return [
        LinkPayment(payer=link.payer, payee=link.payee, eur=eur)
        for link in _open().links
        if site in (link.payer, link.payee)
    ]
