"""End-to-end signatures: who signs which topic, the frame, the freshness rules (pure), and the signed
transport over the in-memory broker: forged, re-stamped, moved and replayed messages refused and
counted; authentic ones believed with their signature line removed."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pdoe.core import topics
from p2pdoe.core.signing import Freshness, Header, SignatureError, freshness_key, signer_of, unframe
from p2pdoe.services.settings import ConfigError
from p2pdoe.services.signing import (
    SignedTransport,
    Signer,
    forget_key,
    read_private_key,
    read_public_keys,
    write_keys,
)
from p2pdoe.services.transport import InboundMessage, LastWill
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")
T0 = datetime(2026, 6, 21, 12, 0, tzinfo=UTC)
SITE = "solar-18"
EDGE = f"edge-{SITE}"
KEYS = {name: Ed25519PrivateKey.generate() for name in ("dso", EDGE, "edge-town-14")}
TRUSTED = {name: key.public_key() for name, key in KEYS.items()}
DOE = topics.site(SITE, "doe")
DEFAULT = topics.site(SITE, "doe/default")
STATUS = topics.site(SITE, "status")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10.0))


def signer(name: str, at: datetime = T0) -> Signer:
    return Signer(name, KEYS[name], lambda: at)


def receiver(at: datetime = T0) -> SignedTransport:
    """A coordinator's view (no broker needed: `check` is what `messages` applies to each)."""
    return SignedTransport(
        MemoryTransport(MemoryBroker(), "dso"), Signer("dso", KEYS["dso"], lambda: at), TRUSTED
    )


def heard(topic: str, payload: bytes) -> InboundMessage:
    return InboundMessage(topic, payload, False)


# -- who signs what -------------------------------------------------------------------------------


def test_each_topic_has_its_owner_as_signer() -> None:
    assert signer_of(DOE) == signer_of(DEFAULT) == "dso"
    for kind in ("status", "register", "telemetry", "meter", "setpoints", "settlement"):
        assert signer_of(topics.site(SITE, kind)) == EDGE
    assert signer_of(topics.round_open("r1")) == signer_of(topics.grant("r1", SITE)) == "dso"
    assert signer_of(topics.proposal("r1", SITE)) == signer_of(topics.report("r1", SITE)) == EDGE
    assert signer_of(topics.DSO_STATUS) == signer_of(topics.DSO_PROGRESS) == "dso"
    assert signer_of(topics.clock_grant("plant")) is None  # the lockstep bench is not signed
    assert signer_of("elsewhere/x") is None


def test_a_rounds_topics_share_one_freshness_key_across_rounds() -> None:
    assert freshness_key(topics.round_open("r1")) == freshness_key(topics.round_open("r2"))
    assert freshness_key(topics.proposal("r1", SITE)) != freshness_key(topics.proposal("r1", "town-14"))
    assert freshness_key(DOE) == DOE


# -- the frame ------------------------------------------------------------------------------------


def test_a_signed_message_is_a_header_line_and_the_message_unchanged() -> None:
    body = b'{"kind":"doe","x":1}'
    framed = signer("dso").sign(DOE, body)
    header, rest = unframe(framed)
    assert rest == body
    assert header is not None
    assert (header.by, header.t, header.will) == ("dso", T0, False)
    assert json.loads(framed.split(b"\n", 1)[0])["t"] == "2026-06-21T12:00:00Z"
    assert unframe(body) == (None, body)  # no header: the message as it is


@pytest.mark.parametrize(
    "line",
    [b'{"by":"dso"}',
     b'{"by":"DSO","t":"2026-06-21T12:00:00Z","c":"x","w":0,"ed25519":""}',
     b'{"by":"dso","t":"12","c":"x","w":0,"ed25519":""}',
     b'{"by":"dso","t":"2026-06-21T12:00:00Z","c":"x","w":true,"ed25519":""}',
     b'{"by":"dso","t":"2026-06-21T12:00:00Z","c":"x","w":0,"ed25519":"***"}'],
)  # fmt: skip
def test_an_unreadable_header_is_a_signature_error(line: bytes) -> None:
    with pytest.raises(SignatureError) as caught:
        unframe(line + b"\n{}")
    assert caught.value.reason == "bad_signature"


def test_nothing_is_signed_where_nobody_signs_and_an_empty_payload_stays_empty() -> None:
    s = signer("dso")
    assert s.sign(topics.clock_grant("plant"), b"{}") == b"{}"
    assert s.sign(DOE, b"") == b""  # a retained message withdrawn
    assert Signer("monitor", None).sign(DOE, b"{}") == b"{}"


# -- what a receiver believes ---------------------------------------------------------------------


def test_an_authentic_message_is_believed_without_its_signature_line() -> None:
    r = receiver()
    out = r.check(heard(STATUS, signer(EDGE).sign(STATUS, b'{"a":1}')))
    assert out is not None
    assert out.payload == b'{"a":1}'
    assert not r.refused


def test_forged_restamped_moved_and_unsigned_messages_are_refused_and_counted() -> None:
    r = receiver()
    proposal = topics.proposal("r1", SITE)
    real = signer(EDGE).sign(proposal, b'{"iteration":3}')
    restamped = real.replace(b'"iteration":3', b'"iteration":4')
    moved_to = topics.proposal("r2", SITE)
    impostor = signer("edge-town-14").sign(proposal, b'{"iteration":3}')
    stranger = Signer(EDGE, Ed25519PrivateKey.generate(), lambda: T0).sign(proposal, b'{"iteration":3}')
    assert r.check(heard(proposal, restamped)) is None
    assert r.check(heard(moved_to, real)) is None
    assert r.check(heard(proposal, impostor)) is None
    assert r.check(heard(proposal, stranger)) is None
    assert r.check(heard(proposal, b'{"iteration":3}')) is None
    assert r.refused == {"bad_signature": 3, "wrong_signer": 1, "unsigned": 1}
    assert r.check(heard(proposal, real)) is not None


def test_a_signer_not_in_the_trusted_keys_is_unknown() -> None:
    r = SignedTransport(MemoryTransport(MemoryBroker(), "x"), Signer("dso", None), {"dso": TRUSTED["dso"]})
    assert r.check(heard(STATUS, signer(EDGE).sign(STATUS, b"{}"))) is None
    assert r.refused == {"unknown_signer": 1}


def test_without_trusted_keys_everything_is_believed_and_signatures_are_read_past() -> None:
    r = SignedTransport(MemoryTransport(MemoryBroker(), "x"), Signer("monitor", None), None)
    signed = r.check(heard(DOE, signer("dso").sign(DOE, b"{}")))
    plain = r.check(heard(DOE, b"{}"))
    assert signed is not None
    assert plain is not None
    assert signed.payload == plain.payload == b"{}"


def test_a_replayed_older_default_is_refused_once_a_newer_one_is_believed() -> None:
    r = receiver(T0 + timedelta(days=1))
    yesterday = signer("dso", T0).sign(DEFAULT, b'{"day":1}')
    today = signer("dso", T0 + timedelta(days=1)).sign(DEFAULT, b'{"day":2}')
    assert r.check(heard(DEFAULT, today)) is not None
    assert r.check(heard(DEFAULT, yesterday)) is None
    assert r.refused == {"replayed": 1}
    assert r.check(heard(DEFAULT, today)) is not None  # the same message again is harmless


def test_an_opening_of_an_earlier_round_is_a_replay() -> None:
    r = receiver(T0 + timedelta(minutes=15))
    early = signer("dso", T0).sign(topics.round_open("r1"), b"{}")
    late = signer("dso", T0 + timedelta(minutes=15)).sign(topics.round_open("r2"), b"{}")
    assert r.check(heard(topics.round_open("r2"), late)) is not None
    assert r.check(heard(topics.round_open("r1"), early)) is None


def test_the_last_will_of_the_run_believed_is_taken_and_an_older_runs_is_not() -> None:
    r = receiver(T0 + timedelta(hours=2))
    old_run = signer(EDGE)
    old_will = old_run.sign(STATUS, b'{"state":"offline"}', will=True)
    run_ = signer(EDGE, T0 + timedelta(hours=1))
    will = run_.signed_will(LastWill(STATUS, b'{"state":"offline"}'))
    assert will is not None
    assert r.check(heard(STATUS, run_.sign(STATUS, b'{"state":"online"}'))) is not None
    assert r.check(heard(STATUS, old_will)) is None  # another run's will: a replay
    assert r.check(heard(STATUS, will.payload)) is not None  # signed at its start, yet believed


def test_a_clock_skewed_ahead_is_believed_but_not_remembered() -> None:
    r = receiver(T0)
    ahead = signer(EDGE, T0 + timedelta(hours=2)).sign(STATUS, b"{}")
    assert r.check(heard(STATUS, ahead)) is not None  # its set-points must still reach its plant
    set_right = signer(EDGE, T0 + timedelta(seconds=5)).sign(STATUS, b"{}")
    assert r.check(heard(STATUS, set_right)) is not None  # and once set right it is not muted


def test_freshness_forgets_the_oldest_topics_beyond_its_bound() -> None:
    f = Freshness(max_held=2)
    for i in range(3):
        f.believe(topics.site(f"s{i}", "status"), Header(f"edge-s{i}", T0, "run", False), T0)
    old = Header("edge-s0", T0 - timedelta(hours=1), "run", False)
    assert f.verdict(topics.site("s0", "status"), old) is None  # forgotten: at most `max_held` topics
    assert f.verdict(topics.site("s2", "status"), Header("edge-s2", old.t, "run", False)) == "replayed"


# -- over a broker --------------------------------------------------------------------------------


def test_over_the_in_memory_broker_only_the_owners_messages_arrive() -> None:
    async def go() -> list[tuple[str, bytes]]:
        broker = MemoryBroker()
        dso = SignedTransport(MemoryTransport(broker, "dso"), signer("dso"), TRUSTED)
        edge = SignedTransport(MemoryTransport(broker, EDGE), signer(EDGE), TRUSTED)
        forger = MemoryTransport(broker, "forger")
        got: list[tuple[str, bytes]] = []
        async with dso, edge, forger:
            await edge.subscribe(f"{topics.ROOT}/site/{SITE}/#")
            await dso.publish(DOE, b'{"real":1}', retain=True)
            await forger.publish(DOE, b'{"forged":1}', retain=True)
            await dso.publish(DEFAULT, b'{"real":2}')

            async def read() -> None:
                async for m in edge.messages():
                    got.append((m.topic, m.payload))
                    if len(got) == 2:
                        return

            await asyncio.wait_for(read(), 2.0)
        assert edge.refused == {"unsigned": 1}
        return got

    assert run(go()) == [(DOE, b'{"real":1}'), (DEFAULT, b'{"real":2}')]


# -- keys -----------------------------------------------------------------------------------------


def test_keys_are_written_private_and_read_back(tmp_path: Path) -> None:
    public = write_keys(tmp_path, ["dso", EDGE])
    assert stat.S_IMODE((tmp_path / "dso.key").stat().st_mode) == 0o600
    key = read_private_key(tmp_path / "dso.key")
    trusted = read_public_keys(public)
    assert set(trusted) == {"dso", EDGE}
    trusted["dso"].verify(key.sign(b"x"), b"x")  # the pair matches
    forget_key(public, EDGE)
    assert set(read_public_keys(public)) == {"dso"}


def test_bad_key_files_fail_with_one_line_naming_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    for read, path in ((read_private_key, junk), (read_private_key, tmp_path / "none.key"),
                       (read_public_keys, junk), (read_public_keys, tmp_path / "none.json")):  # fmt: skip
        with pytest.raises(ConfigError, match=str(path)):
            read(path)  # type: ignore[operator]
