"""Wire messages: any valid message survives encode -> decode unchanged; anything malformed is a
pydantic.ValidationError (never a crash, never a silently repaired value)."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from p2pdoe.core.schemas.messages import (
    AdmmParameters,
    EnvelopeRequest,
    Grant,
    GrantedEnvelope,
    Proposal,
    ResidualReport,
    RoundOpen,
    TradeProposal,
    decode,
    encode,
)
from p2pdoe.core.schemas.wire import MAX_MESSAGE_BYTES, WireError

SITE = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
ROUND = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True)
KW = st.floats(allow_nan=False, allow_infinity=False)
POSITIVE = st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)
NON_NEGATIVE = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
ITERATION = st.integers(min_value=0)
# `start` is an ISO 8601 time with a time zone
START = st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z"))


def series(n: int) -> st.SearchStrategy[list[float]]:
    return st.lists(KW, min_size=n, max_size=n)


@st.composite
def round_opens(draw: st.DrawFn) -> RoundOpen:
    n = draw(st.integers(1, 6))
    return RoundOpen(
        round=draw(ROUND),
        policy=draw(st.sampled_from(["dynamic", "static", "none"])),
        start=draw(START),
        dt_h=draw(POSITIVE),
        intervals=n,
        sites=draw(st.lists(SITE.filter(lambda x: x != "dso"), min_size=2, max_size=6, unique=True)),
        admm=AdmmParameters(
            rho_trade_eur_per_kw2h=draw(POSITIVE),
            rho_envelope_eur_per_kw2h=draw(POSITIVE),
            over_relaxation=draw(st.floats(1.0, 1.9)),
            max_iterations=draw(st.integers(min_value=1)),
        ),
        initial_trade_price_eur_per_kwh=draw(series(n)),
    )


@st.composite
def proposals(draw: st.DrawFn) -> Proposal:
    n = draw(st.integers(0, 5))
    trades = [
        TradeProposal(peer=draw(SITE), buy_kw=draw(series(n)), sell_kw=draw(series(n)))
        for _ in range(draw(st.integers(0, 4)))
    ]
    envelope = None
    if draw(st.booleans()):
        envelope = EnvelopeRequest(lo_kw=draw(series(n)), up_kw=draw(series(n)))
    return Proposal(
        round=draw(ROUND), iteration=draw(ITERATION), sender=draw(SITE), trades=trades, envelope=envelope
    )


@st.composite
def grants(draw: st.DrawFn) -> Grant:
    n = draw(st.integers(0, 5))
    envelope = None
    if draw(st.booleans()):
        envelope = GrantedEnvelope(
            lo_kw=draw(series(n)),
            up_kw=draw(series(n)),
            import_price_eur_per_kwh=draw(series(n)),
            export_price_eur_per_kwh=draw(series(n)),
        )
    return Grant(
        round=draw(ROUND),
        iteration=draw(ITERATION),
        recipient=draw(SITE),
        status=draw(st.sampled_from(["running", "converged", "max_iterations"])),
        envelope=envelope,
        residuals=ResidualReport(
            primal_trade_kw=draw(NON_NEGATIVE),
            dual_trade_kw=draw(NON_NEGATIVE),
            primal_envelope_kw=draw(NON_NEGATIVE),
            dual_envelope_kw=draw(NON_NEGATIVE),
        ),
        next_rho_trade_eur_per_kw2h=draw(POSITIVE),
        next_rho_envelope_eur_per_kw2h=draw(POSITIVE),
    )


MESSAGES = st.one_of(round_opens(), proposals(), grants())


@settings(max_examples=150, derandomize=True, database=None)
@given(message=MESSAGES)
def test_every_valid_message_survives_the_wire(message: RoundOpen | Proposal | Grant) -> None:
    payload = encode(message)
    back = decode(payload)
    assert type(back) is type(message)
    assert back == message
    assert encode(back) == payload  # and the bytes are stable


@settings(max_examples=50, derandomize=True, database=None)
@given(message=MESSAGES)
def test_the_wire_form_names_its_kind_and_version(message: RoundOpen | Proposal | Grant) -> None:
    doc = json.loads(encode(message))
    assert doc["schema_version"] == 1
    assert doc["kind"] == {RoundOpen: "round_open", Proposal: "proposal", Grant: "grant"}[type(message)]


# --- malformed payloads -------------------------------------------------------------------------


def proposal_doc() -> dict[str, Any]:
    p = Proposal(
        round="day-ahead",
        iteration=3,
        sender="solar-18",
        trades=[TradeProposal(peer="town-14", buy_kw=[1.5, 0.0], sell_kw=[0.0, 2.25])],
        envelope=EnvelopeRequest(lo_kw=[-10.0, -5.0], up_kw=[20.0, 30.0]),
    )
    doc: dict[str, Any] = json.loads(encode(p))
    return doc


def grant_doc() -> dict[str, Any]:
    g = Grant(
        round="day-ahead",
        iteration=3,
        recipient="solar-18",
        status="running",
        envelope=GrantedEnvelope(
            lo_kw=[-10.0],
            up_kw=[20.0],
            import_price_eur_per_kwh=[0.0],
            export_price_eur_per_kwh=[0.01],
        ),
        residuals=ResidualReport(
            primal_trade_kw=1.0, dual_trade_kw=1.0, primal_envelope_kw=0.5, dual_envelope_kw=0.5
        ),
        next_rho_trade_eur_per_kw2h=2.5e-3,
        next_rho_envelope_eur_per_kw2h=2.5e-4,
    )
    doc: dict[str, Any] = json.loads(encode(g))
    return doc


def round_open_doc() -> dict[str, Any]:
    r = RoundOpen(
        round="day-ahead",
        policy="dynamic",
        start="2026-06-21T00:00:00Z",
        dt_h=1.0,
        intervals=2,
        sites=["solar-18", "town-14"],
        admm=AdmmParameters(
            rho_trade_eur_per_kw2h=2.5e-3,
            rho_envelope_eur_per_kw2h=2.5e-4,
            over_relaxation=1.6,
            max_iterations=2000,
        ),
        initial_trade_price_eur_per_kwh=[0.1, 0.2],
    )
    doc: dict[str, Any] = json.loads(encode(r))
    return doc


def test_the_sample_documents_are_valid() -> None:
    for doc in (proposal_doc(), grant_doc(), round_open_doc()):
        decode(json.dumps(doc).encode())


def set_at(doc: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("trades", 0, "buy_kw", 0), "1.5"),  # number as a string
        (("trades", 0, "buy_kw", 0), True),  # a boolean is not a number
        (("envelope", "lo_kw", 1), "-5"),
        (("iteration",), "3"),
        (("iteration",), 3.0),  # an iteration is an integer
        (("iteration",), -1),
        (("sender",), "Solar 18"),  # bad site ids
        (("sender",), ""),
        (("sender",), "-solar"),
        (("sender",), "s" * 33),
        (("trades", 0, "peer"), "Town-14"),
        (("round",), "day ahead"),
        (("round",), ""),
        (("kind",), "grant"),  # wrong kind
        (("kind",), "offer"),
        (("schema_version",), 2),
        (("trades", 0, "buy_kw"), 1.5),  # a series, not a number
        (("envelope", "up_kw"), None),
    ],
)
def test_a_malformed_proposal_is_refused(path: tuple[str | int, ...], value: object) -> None:
    payload = json.dumps(set_at(proposal_doc(), path, value)).encode()
    with pytest.raises(ValidationError):
        decode(payload)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("status",), "finished"),
        (("sender",), "solar-18"),  # only the DSO grants
        (("next_rho_trade_eur_per_kw2h",), 0.0),
        (("next_rho_envelope_eur_per_kw2h",), -1.0),
        (("residuals", "primal_trade_kw"), -0.5),
        (("recipient",), "Solar-18"),
        (("envelope", "up_kw", 0), "20"),
        (("kind",), "proposal"),
    ],
)
def test_a_malformed_grant_is_refused(path: tuple[str | int, ...], value: object) -> None:
    payload = json.dumps(set_at(grant_doc(), path, value)).encode()
    with pytest.raises(ValidationError):
        decode(payload)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("policy",), "tight"),
        (("sites",), ["solar-18"]),  # at least two sites
        (("sites", 1), "Town 14"),
        (("dt_h",), 0.0),
        (("dt_h",), "1.0"),
        (("intervals",), 0),
        (("admm", "over_relaxation"), 2.0),
        (("admm", "max_iterations"), 0),
        (("admm", "rho_trade_eur_per_kw2h"), 0.0),
        (("sender",), "solar-18"),
        (("initial_trade_price_eur_per_kwh", 0), "0.1"),
    ],
)
def test_a_malformed_round_open_is_refused(path: tuple[str | int, ...], value: object) -> None:
    payload = json.dumps(set_at(round_open_doc(), path, value)).encode()
    with pytest.raises(ValidationError):
        decode(payload)


@pytest.mark.parametrize("where", ["top", "nested", "deep"])
def test_unknown_keys_are_refused(where: str) -> None:
    doc = proposal_doc()
    target = {"top": doc, "nested": doc["envelope"], "deep": doc["trades"][0]}[where]
    target["comment"] = "hello"
    with pytest.raises(ValidationError):
        decode(json.dumps(doc).encode())


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("kind", ["proposal", "grant", "round_open"])
def test_non_finite_numbers_are_refused(token: str, kind: str) -> None:
    doc = {"proposal": proposal_doc, "grant": grant_doc, "round_open": round_open_doc}[kind]()
    marker = 987654.25  # appears once in each document, written by json.dumps as below
    if kind == "proposal":
        doc["trades"][0]["sell_kw"][0] = marker
    elif kind == "grant":
        doc["envelope"]["lo_kw"][0] = marker
    else:
        doc["initial_trade_price_eur_per_kwh"][0] = marker
    text = json.dumps(doc)
    assert text.count("987654.25") == 1
    with pytest.raises(ValidationError):
        decode(text.replace("987654.25", token).encode())


@pytest.mark.parametrize(
    "payload",
    [b"", b"null", b"[]", b"{}", b"not json", b"\xff\xfe", b'{"kind": "proposal"}', b'"proposal"'],
)
def test_garbage_is_refused(payload: bytes) -> None:
    with pytest.raises((WireError, ValidationError)):
        decode(payload)


def test_a_repeated_key_is_refused() -> None:
    """pydantic alone would keep the last of two equal keys: a payload could mean two things."""
    text = json.dumps(proposal_doc())
    doubled = text.replace('"iteration": ', '"iteration": 1, "iteration": ', 1)
    with pytest.raises(WireError, match="repeats the key 'iteration'"):
        decode(doubled.encode())


def test_an_oversized_message_is_refused_before_parsing() -> None:
    payload = b" " * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(payload)


def test_missing_fields_are_refused() -> None:
    for doc, field in ((proposal_doc(), "trades"), (grant_doc(), "residuals"), (round_open_doc(), "admm")):
        del doc[field]
        with pytest.raises(ValidationError):
            decode(json.dumps(doc).encode())


def test_python_construction_is_as_strict_as_the_wire() -> None:
    with pytest.raises(ValidationError):
        TradeProposal(peer="a", buy_kw=[float("nan")], sell_kw=[])
    with pytest.raises(ValidationError):
        TradeProposal(peer="a", buy_kw=["1.0"], sell_kw=[])  # type: ignore[list-item]
    with pytest.raises(ValidationError):
        EnvelopeRequest(lo_kw=[float("inf")], up_kw=[0.0])
