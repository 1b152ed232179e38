"""The MQTT connection session, sans-I/O: every decision `MqttTransport` makes, and no I/O at all.

`MqttSession` is our side of a connection that lives across reconnects (not the broker's session:
ours are clean, the broker keeps nothing for us between connections). The shell
(`p2pdoe.services.transport.MqttTransport`) opens connections and moves bytes and timers; it tells the
session what happened and does what the session answers. The session decides:

- which protocol the next connection uses (`next_attempt`): the forced one, or in auto mode v5 until
  the first connection settles it; with a last will the first v5 CONNECT is a probe without the will
  (amqtt misreads a v5 CONNECT that carries one and never answers, whereas a plain v5 CONNECT gets a
  prompt "unsupported protocol version");
- whether a refused connection falls back to 3.1.1 at once (`refused`): in auto mode, on the CONNACK
  codes that mean "unsupported version", also after v5 was settled (a broker replaced by one that
  refuses v5);
- what a failed attempt to connect leads to (`connect_failed`): a retry after a capped, jittered
  exponential delay (`Backoff`), flagged when retrying will not mend it (bad credentials, a broker
  certificate that failed verification: worth an error in the log), or giving up after
  `max_attempts` failures in a row;
- what a fresh connection sends before it counts (`connected`): every subscription made so far and,
  on a reconnect, the retained state with the expiry it has left (state expired meanwhile is dropped);
- how long to wait before reconnecting after a lost connection (`lost`): longer and longer while
  connections keep ending as soon as they are made.

Time is an argument (`now_s`: seconds of a monotonic clock); the jitter draws from the
`random.Random` the session is given.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Attempt",
    "Backoff",
    "GiveUp",
    "MqttSession",
    "MqttVersion",
    "ProtocolChoice",
    "Republish",
    "Retry",
    "Subscribe",
    "refused_us",
    "refuses_version",
]

MqttVersion = Literal["v5", "v311"]
ProtocolChoice = Literal["auto", "v5", "v311"]

# CONNACK codes (3.1.1 return codes and v5 reason codes alike).
UNSUPPORTED_VERSION = frozenset({1, 0x84})  # "I do not speak this protocol version"
NOT_AUTHORIZED = frozenset({4, 5, 0x86, 0x87})  # bad user name or password, not authorized


def refuses_version(code: int | None) -> bool:
    """The CONNACK `code` says the broker does not speak the protocol version asked for."""
    return code in UNSUPPORTED_VERSION


def refused_us(code: int | None, detail: str) -> bool:
    """A failure that retrying will not mend by itself: the broker's certificate failed verification
    (a wrong --ca-cert, or not our broker), or the broker refused our credentials. `code` is the
    CONNACK code (None if there was none), `detail` the error's text."""
    return "CERTIFICATE_VERIFY_FAILED" in detail or code in NOT_AUTHORIZED


STABLE_S = 10.0  # a connection that ends sooner after it was ready counts as flapping


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt k waits in [(1 - jitter) d_k, d_k],
    d_k = min(cap_s, initial_s * factor**k). `max_attempts` consecutive failures end the retries
    (None: retry forever)."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.cap_s):
            raise ValueError("backoff needs 0 < initial_s <= cap_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("backoff max_attempts must be >= 1 or None")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before retry number `attempt` (0-based)."""
        # Stop growing once past the cap, so a long outage never overflows a float.
        delay = self.initial_s
        for _ in range(attempt):
            if delay >= self.cap_s:
                break
            delay *= self.factor
        return min(self.cap_s, delay)

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling * (1.0 - self.jitter * rng.random())

    def schedule(self, attempts: int, rng: random.Random) -> list[float]:
        return [self.delay(k, rng) for k in range(attempts)]


# -- what the session answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """Open a connection speaking `protocol`, with the last will (if there is one) when `will`.
    A `probe` only asks whether the broker speaks v5: close it once open, then report it `opened`."""

    protocol: MqttVersion
    will: bool = True
    probe: bool = False


@dataclass(frozen=True)
class Retry:
    """Try to connect again after `delay_s`; `refused`: retrying will not mend it (log an error)."""

    delay_s: float
    refused: bool = False


@dataclass(frozen=True)
class GiveUp:
    """`attempts` failures in a row, as many as the backoff allows: stop connecting."""

    attempts: int


@dataclass(frozen=True)
class Subscribe:
    topic_filter: str
    qos: int


@dataclass(frozen=True)
class Republish:
    """Publish retained state again (QoS 1, retained); `expiry_s` is what its expiry has left."""

    topic: str
    payload: bytes
    expiry_s: int | None


@dataclass(frozen=True)
class _State:
    payload: bytes
    expires_at_s: float | None  # monotonic


# -- the machine ----------------------------------------------------------------------------------------


class MqttSession:
    """Our side of an MQTT connection across reconnects (see the module's docstring).

    `protocol` is None until settled; `connections` counts the connections that became ready.
    """

    def __init__(
        self,
        choice: ProtocolChoice = "auto",
        *,
        has_will: bool = False,
        backoff: Backoff,
        rng: random.Random,
    ) -> None:
        self.choice: ProtocolChoice = choice
        self.has_will = has_will
        self.backoff = backoff
        self._rng = rng
        self.protocol: MqttVersion | None = None
        self.connections = 0
        self._failures = 0  # in a row
        self._ready_at_s: float | None = None  # when the latest connection became ready
        self.flapping = 0  # connections in a row that ended within STABLE_S of being ready
        self._subscriptions: dict[str, int] = {}
        self._states: dict[str, _State] = {}

    # -- what to renew after a reconnect --------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int) -> None:
        self._subscriptions[topic_filter] = qos

    def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)

    def keep_state(self, topic: str, payload: bytes, expiry_s: int | None, now_s: float) -> None:
        """Remember the latest retained `payload` on `topic`, to publish again after a reconnect."""
        self._states[topic] = _State(payload, None if expiry_s is None else now_s + expiry_s)

    # -- one attempt to connect -----------------------------------------------------------------------

    def next_attempt(self) -> Attempt:
        """The first connection to open in an attempt to connect."""
        if self.choice != "auto":
            return Attempt(self.choice)
        if self.protocol is not None:
            return Attempt(self.protocol)
        return Attempt("v5", will=False, probe=True) if self.has_will else Attempt("v5")

    def refused(self, attempt: Attempt, code: int | None) -> Attempt | None:
        """Opening `attempt` failed (`code`: the CONNACK code, None if none): the fallback to open at
        once, or None when the whole attempt failed (then `connect_failed`)."""
        if self.choice != "auto" or attempt.protocol != "v5" or not refuses_version(code):
            return None
        self.protocol = "v311"
        return Attempt("v311")

    def opened(self, attempt: Attempt) -> Attempt | None:
        """`attempt` opened: None if it is the connection, else (after a probe) the next to open."""
        self.protocol = attempt.protocol
        return Attempt(attempt.protocol) if attempt.probe else None

    def connect_failed(self, code: int | None, detail: str) -> Retry | GiveUp:
        """The attempt failed (`code` and `detail` of its last error): retry after a delay, or give up."""
        self._failures += 1
        limit = self.backoff.max_attempts
        if limit is not None and self._failures >= limit:
            return GiveUp(self._failures)
        delay_s = self.backoff.delay(self._failures - 1, self._rng)
        return Retry(delay_s, refused=refused_us(code, detail))

    # -- a connection ---------------------------------------------------------------------------------

    def connected(self, now_s: float) -> list[Subscribe | Republish]:
        """A connection is open: what to send, in order, before it is ready (then `renewed`)."""
        self._failures = 0
        renewals: list[Subscribe | Republish] = [Subscribe(f, qos) for f, qos in self._subscriptions.items()]
        if self.connections:  # a reconnect: the broker may have lost our retained state
            renewals += self._republish(now_s)
        return renewals

    def renewed(self, now_s: float) -> None:
        """The renewals went through: the connection is ready and counts."""
        self.connections += 1
        self._ready_at_s = now_s

    def lost(self, now_s: float) -> float:
        """The connection is gone: the delay in seconds before reconnecting. The first delay after a
        connection that lasted; a growing one (up to the cap) while connections keep ending within
        `STABLE_S` of being ready (`flapping` in a row): another process with this client id taking
        the session over, or a broker that drops it at once. Mosquitto 2.0 closes a taken-over
        connection without a reason code, so this is what slows a duel over one id down."""
        short = self._ready_at_s is not None and now_s - self._ready_at_s < STABLE_S
        self.flapping = self.flapping + 1 if short else 0
        return self.backoff.delay(self.flapping, self._rng)

    def _republish(self, now_s: float) -> list[Republish]:
        """The retained state with the expiry each has left; state with less than a second left is
        dropped (the broker would drop it anyway)."""
        out: list[Republish] = []
        for topic, state in list(self._states.items()):
            if state.expires_at_s is None:
                out.append(Republish(topic, state.payload, None))
            elif state.expires_at_s - now_s < 1:
                del self._states[topic]
            else:
                out.append(Republish(topic, state.payload, int(state.expires_at_s - now_s)))
        return out
