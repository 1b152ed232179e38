"""The MQTT connection session machine, pure: no broker, no event loop, no clock (times are arguments).

Each test plays the shell: it reports what happened to a connection and checks what the session answers.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

import p2pdoe.services.broker_url as broker_url
import p2pdoe.services.mqtt_session as mqtt_session
import p2pdoe.services.transport as transport
import p2pdoe.services.transport_api as transport_api
from p2pdoe.services.mqtt_session import (
    STABLE_S,
    Attempt,
    Backoff,
    GiveUp,
    MqttSession,
    MqttVersion,
    ProtocolChoice,
    Republish,
    Retry,
    Subscribe,
    refused_us,
    refuses_version,
)

NO_JITTER = Backoff(initial_s=0.5, cap_s=4.0, factor=2.0, jitter=0.0)
UNSUPPORTED_V311, UNSUPPORTED_V5 = 1, 0x84  # CONNACK "unsupported protocol version"
BAD_PASSWORD_V311, NOT_AUTHORIZED_V5 = 4, 0x87
SERVER_UNAVAILABLE = 3


def session(
    choice: ProtocolChoice = "auto", *, has_will: bool = False, backoff: Backoff = NO_JITTER, seed: int = 1
) -> MqttSession:
    return MqttSession(choice, has_will=has_will, backoff=backoff, rng=random.Random(seed))


def connect(s: MqttSession) -> Attempt:
    """Open what the session asks for until it has a connection; the attempt that made it."""
    attempt = s.next_attempt()
    while (follow_up := s.opened(attempt)) is not None:
        attempt = follow_up
    return attempt


# -- which protocol -------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["v5", "v311"])
def test_a_forced_protocol_is_used_with_the_will_and_never_falls_back(choice: MqttVersion) -> None:
    s = session(choice, has_will=True)
    assert s.protocol is None
    attempt = s.next_attempt()
    assert attempt == Attempt(choice, will=True, probe=False)
    for code in (UNSUPPORTED_V311, UNSUPPORTED_V5):
        assert s.refused(attempt, code) is None
    assert s.protocol is None  # settled only by a connection
    assert s.opened(attempt) is None
    assert s.protocol == choice


def test_auto_without_a_will_asks_for_v5_directly() -> None:
    s = session()
    attempt = s.next_attempt()
    assert attempt == Attempt("v5", will=True, probe=False)
    assert s.opened(attempt) is None
    assert s.protocol == "v5"


@pytest.mark.parametrize("code", [UNSUPPORTED_V311, UNSUPPORTED_V5])
def test_auto_falls_back_to_3_1_1_at_once_on_unsupported_version(code: int) -> None:
    s = session()
    fallback = s.refused(s.next_attempt(), code)
    assert fallback == Attempt("v311", will=True, probe=False)
    assert s.protocol == "v311"
    assert s.opened(fallback) is None
    assert s.next_attempt() == Attempt("v311")  # settled: reconnects do not ask for v5 again


@pytest.mark.parametrize("code", [None, SERVER_UNAVAILABLE, BAD_PASSWORD_V311, NOT_AUTHORIZED_V5])
def test_auto_does_not_fall_back_on_other_failures(code: int | None) -> None:
    s = session()
    assert s.refused(s.next_attempt(), code) is None
    assert s.protocol is None
    assert s.next_attempt() == Attempt("v5")  # still unsettled: v5 again next time


def test_a_3_1_1_refusal_of_the_fallback_is_not_fallen_back_from() -> None:
    s = session()
    fallback = s.refused(s.next_attempt(), UNSUPPORTED_V5)
    assert fallback is not None
    assert s.refused(fallback, UNSUPPORTED_V311) is None
    assert s.protocol == "v311"


def test_with_a_will_v5_is_probed_without_it_first() -> None:
    """amqtt misreads a v5 CONNECT that carries a will: the probe carries none."""
    s = session(has_will=True)
    probe = s.next_attempt()
    assert probe == Attempt("v5", will=False, probe=True)
    real = s.opened(probe)
    assert real == Attempt("v5", will=True, probe=False)
    assert s.protocol == "v5"
    assert s.opened(real) is None
    assert s.next_attempt() == Attempt("v5", will=True, probe=False)  # no probe on reconnects


def test_a_refused_probe_falls_back_to_3_1_1_with_the_will() -> None:
    s = session(has_will=True)
    fallback = s.refused(s.next_attempt(), UNSUPPORTED_V5)
    assert fallback == Attempt("v311", will=True, probe=False)
    assert s.protocol == "v311"


def test_a_settled_v5_falls_back_when_the_broker_is_replaced_by_one_refusing_it() -> None:
    s = session(has_will=True)
    assert connect(s) == Attempt("v5")
    attempt = s.next_attempt()
    assert attempt == Attempt("v5")
    assert s.refused(attempt, UNSUPPORTED_V5) == Attempt("v311")
    assert s.protocol == "v311"


# -- retry, back off, give up ---------------------------------------------------------------------------


def test_failed_attempts_back_off_exponentially_up_to_the_cap() -> None:
    s = session()
    delays = []
    for _ in range(6):
        decision = s.connect_failed(SERVER_UNAVAILABLE, "server unavailable")
        assert isinstance(decision, Retry)
        delays.append(decision.delay_s)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_retry_delays_are_the_backoffs_jittered_schedule_for_the_same_seed() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=8.0, jitter=0.5)
    s = session(backoff=backoff, seed=7)
    delays = [s.connect_failed(None, "timed out") for _ in range(20)]
    assert delays == [Retry(d) for d in backoff.schedule(20, random.Random(7))]
    assert len({r.delay_s for r in delays if isinstance(r, Retry)}) == 20  # jittered


def test_a_connection_resets_the_backoff() -> None:
    s = session()
    for _ in range(3):
        s.connect_failed(None, "timed out")
    connect(s)
    s.connected(now_s=0.0)
    assert s.connect_failed(None, "timed out") == Retry(0.5)


def test_a_lost_connection_waits_the_first_delay() -> None:
    s = session()
    for _ in range(4):
        s.connect_failed(None, "timed out")
    assert s.lost(now_s=0.0) == 0.5
    jittered = session(backoff=Backoff(initial_s=1.0, cap_s=8.0, jitter=0.5), seed=3)
    assert jittered.lost(now_s=0.0) == Backoff(initial_s=1.0, cap_s=8.0, jitter=0.5).delay(
        0, random.Random(3)
    )
    assert 0.5 <= jittered.lost(now_s=0.0) <= 1.0


def test_connections_that_end_as_soon_as_they_are_made_back_off_further() -> None:
    """Two processes with one client id take the broker session from each other: each connection
    ends within a second of being ready. Waits grow to the cap (48 takeovers in 25 s before); one
    connection that lasted brings the first delay back."""
    s = session(backoff=Backoff(initial_s=0.5, cap_s=8.0, jitter=0.0))
    waits = []
    for k in range(6):
        connect(s)
        s.connected(now_s=100.0 * k)
        s.renewed(now_s=100.0 * k)
        waits.append(s.lost(now_s=100.0 * k + 1.0))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert s.flapping == 6
    connect(s)
    s.connected(now_s=1000.0)
    s.renewed(now_s=1000.0)
    assert s.lost(now_s=1000.0 + STABLE_S) == 0.5  # it lasted: reconnect promptly
    assert s.flapping == 0


def test_gives_up_after_max_attempts_in_a_row() -> None:
    s = session(backoff=Backoff(initial_s=0.5, cap_s=4.0, jitter=0.0, max_attempts=3))
    assert isinstance(s.connect_failed(None, "timed out"), Retry)
    assert isinstance(s.connect_failed(None, "timed out"), Retry)
    assert s.connect_failed(None, "timed out") == GiveUp(attempts=3)


def test_only_failures_in_a_row_count_towards_giving_up() -> None:
    s = session(backoff=Backoff(initial_s=0.5, cap_s=4.0, jitter=0.0, max_attempts=3))
    s.connect_failed(None, "timed out")
    s.connect_failed(None, "timed out")
    connect(s)
    s.connected(now_s=0.0)
    assert isinstance(s.connect_failed(None, "timed out"), Retry)
    assert isinstance(s.connect_failed(None, "timed out"), Retry)
    assert s.connect_failed(None, "timed out") == GiveUp(attempts=3)


def test_without_max_attempts_it_never_gives_up() -> None:
    s = session()
    assert all(isinstance(s.connect_failed(None, "timed out"), Retry) for _ in range(1000))


# -- refusals that retrying will not mend ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "detail", "refused"),
    [
        (BAD_PASSWORD_V311, "bad user name or password", True),
        (5, "not authorised", True),
        (0x86, "bad user name or password", True),
        (NOT_AUTHORIZED_V5, "not authorized", True),
        (None, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", True),
        (None, "[Errno 111] Connection refused", False),
        (SERVER_UNAVAILABLE, "server unavailable", False),
        (UNSUPPORTED_V5, "unsupported protocol version", False),
    ],
)
def test_refusals_are_classified(code: int | None, detail: str, refused: bool) -> None:
    assert refused_us(code, detail) is refused
    decision = session().connect_failed(code, detail)
    assert decision == Retry(0.5, refused=refused)


def test_unsupported_version_codes() -> None:
    assert refuses_version(UNSUPPORTED_V311)
    assert refuses_version(UNSUPPORTED_V5)
    assert not refuses_version(None)
    assert not refuses_version(NOT_AUTHORIZED_V5)


# -- what a connection renews ---------------------------------------------------------------------------


def test_every_subscription_is_renewed_on_every_connection() -> None:
    s = session()
    s.subscribe("a/#", 1)
    s.subscribe("b/+", 0)
    s.subscribe("c", 1)
    s.unsubscribe("a/#")
    s.unsubscribe("never/subscribed")
    s.subscribe("b/+", 1)  # the latest QoS wins
    connect(s)
    expected = [Subscribe("b/+", 1), Subscribe("c", 1)]
    assert s.connected(now_s=0.0) == expected
    s.renewed(now_s=0.0)
    assert s.connected(now_s=5.0) == expected


def test_connections_count_only_renewed_connections() -> None:
    s = session()
    connect(s)
    s.connected(now_s=0.0)
    assert s.connections == 0  # the renewals have not gone through yet
    s.renewed(now_s=0.0)
    assert s.connections == 1


def test_state_is_not_republished_on_the_first_connection() -> None:
    s = session()
    s.subscribe("x", 1)
    s.keep_state("site/status", b"online", None, now_s=0.0)
    connect(s)
    assert s.connected(now_s=1.0) == [Subscribe("x", 1)]


def test_state_is_republished_after_the_subscriptions_with_its_remaining_expiry() -> None:
    s = session()
    s.subscribe("x", 1)
    s.keep_state("status", b"v1", None, now_s=0.0)
    s.keep_state("status", b"v2", None, now_s=1.0)  # the latest per topic
    s.keep_state("doe", b"envelope", 60, now_s=100.0)
    connect(s)
    s.connected(now_s=100.0)
    s.renewed(now_s=0.0)
    assert s.connected(now_s=130.5) == [
        Subscribe("x", 1),
        Republish("status", b"v2", None),
        Republish("doe", b"envelope", 29),  # 29.5 s left, in whole seconds
    ]


def test_expired_state_is_dropped() -> None:
    s = session()
    s.keep_state("status", b"online", None, now_s=0.0)
    s.keep_state("doe", b"short", 10, now_s=0.0)
    connect(s)
    s.connected(now_s=0.0)
    s.renewed(now_s=0.0)
    assert s.connected(now_s=8.0) == [Republish("status", b"online", None), Republish("doe", b"short", 2)]
    assert s.connected(now_s=9.5) == [Republish("status", b"online", None)]  # under a second left
    assert s.connected(now_s=20.0) == [Republish("status", b"online", None)]
    s.keep_state("doe", b"fresh", 10, now_s=20.0)  # a new state on the topic is kept again
    assert s.connected(now_s=21.0) == [Republish("status", b"online", None), Republish("doe", b"fresh", 9)]


# -- the module boundary --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [mqtt_session, broker_url, transport_api])
def test_the_pure_modules_import_no_io(module: object) -> None:
    source = Path(str(getattr(module, "__file__", ""))).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found: the check would be vacuous"
    assert not imported & {"asyncio", "socket", "ssl", "time", "aiomqtt", "paho", "amqtt", "threading"}


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("Backoff", mqtt_session),
        ("BrokerAddress", broker_url),
        ("parse_broker_url", broker_url),
        ("without_password", broker_url),
        ("TransportError", transport_api),
        ("InboundMessage", transport_api),
        ("LastWill", transport_api),
        ("Transport", transport_api),
    ],
)
def test_the_transport_module_re_exports_what_moved(name: str, home: object) -> None:
    assert getattr(transport, name) is getattr(home, name)
    assert name in transport.__all__
