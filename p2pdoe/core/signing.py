"""End-to-end signatures, the pure part: who signs which topic, the signed frame, and the freshness
rules that refuse a replay. The cryptography itself (Ed25519) lives in `p2pdoe.services.signing`.

A signed message is one header line and the message as it was before, byte for byte:

    {"by":"dso","t":"2026-06-21T00:15:00Z","c":"3f9a01bc","w":0,"ed25519":"<base64>"}\\n<message>

The signature covers a version tag, the topic, the header's fields and the message, so a message
moved to another topic, re-stamped (its round and iteration are in the message) or given another
time fails. `c` is the signer's run (a token per process start), `w` marks the signer's last will.

Freshness: per signer and topic (a round's topics count as one across rounds, so an opening of an
earlier round is also a replay) a message signed before the newest one believed is refused, except
the last will of the very run whose message is held. A signing time more than `ahead_s` past the
receiver's clock (a sender's clock skewed ahead, a retained message of a later simulated day) is
believed but not remembered: a skewed clock must not mute its owner once it is set right, and the
skewed site's set-points must still reach its plant.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from p2pdoe.core import topics

TAG = b"p2pdoe-sig-v1"
DSO = "dso"
AHEAD_S = 120.0  # a signing time this far past the receiver's clock is not remembered
MAX_HELD = 20_000  # topics remembered for freshness (the oldest forgotten first)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_RUN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_DSO_SITE_KINDS = ("doe", "doe/default")


def edge_identity(site: str) -> str:
    """The identity that signs for a site (its edge agent and its meter): `edge-<site>`."""
    return f"edge-{site}"


def signer_of(topic: str) -> str | None:
    """Who must sign a message on `topic`; None where nobody does (the lockstep clock of a simulated
    day, and topics outside the tree)."""
    parsed = topics.parse(topic)
    if parsed is None or parsed.area == "clock":
        return None
    if parsed.area == "dso":
        return DSO
    if parsed.area == "market":
        dso_kinds = ("grant", "prices")
        return DSO if parsed.site is None or parsed.kind in dso_kinds else edge_identity(parsed.site)
    assert parsed.site is not None
    return DSO if parsed.kind in _DSO_SITE_KINDS else edge_identity(parsed.site)


def freshness_key(topic: str) -> str:
    """The topic with its round replaced by `*`: a round's messages are ordered across rounds."""
    parsed = topics.parse(topic)
    if parsed is None or parsed.round is None:
        return topic
    return topic.replace(f"/market/{parsed.round}/", "/market/*/", 1)


class SignatureError(ValueError):
    """A frame that cannot be read, with the counter's reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Header:
    by: str  # the signer's identity
    t: datetime  # when it signed, on its clock
    run: str  # the signer's run
    will: bool  # its last will (signed at the start, published by the broker)
    signature: bytes = b""

    def text_time(self) -> str:
        return self.t.isoformat().replace("+00:00", "Z")

    def signed_bytes(self, topic: str, body: bytes) -> bytes:
        """What the signature covers."""
        fields = [TAG, topic.encode(), self.by.encode(), self.text_time().encode(), self.run.encode()]
        return b"\0".join([*fields, b"1" if self.will else b"0", body])

    def line(self) -> bytes:
        signature = base64.b64encode(self.signature).decode()
        out = {"by": self.by, "t": self.text_time(), "c": self.run, "w": int(self.will), "ed25519": signature}
        return json.dumps(out, separators=(",", ":")).encode()


def frame(header: Header, body: bytes) -> bytes:
    return header.line() + b"\n" + body


def unframe(payload: bytes) -> tuple[Header | None, bytes]:
    """The header and the message; (None, payload) for a message without a header. A header that
    cannot be read raises `SignatureError`."""
    if not payload.startswith(b'{"by":'):
        return None, payload
    line, newline, body = payload.partition(b"\n")
    if not newline:
        raise SignatureError("bad_signature", "a signature line without a message")
    try:
        h = json.loads(line)
        header = Header(
            by=_checked(h["by"], _NAME, "by"),
            t=_time(h["t"]),
            run=_checked(h["c"], _RUN, "c"),
            will=_will(h["w"]),
            signature=base64.b64decode(h["ed25519"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError("bad_signature", f"an unreadable signature line: {exc}") from None
    return header, body


def _checked(value: object, pattern: re.Pattern[str], name: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"bad {name!r}")
    return value


def _will(value: object) -> bool:
    if value not in (0, 1) or isinstance(value, bool):
        raise ValueError("bad 'w'")
    return bool(value)


def _time(value: object) -> datetime:
    if not isinstance(value, str) or not value.endswith("Z"):
        raise ValueError("bad 't'")
    return datetime.fromisoformat(value[:-1] + "+00:00")


@dataclass(frozen=True)
class _Held:
    t: datetime
    run: str


class Freshness:
    """The newest signing time believed per signer and topic (see the module's text)."""

    def __init__(self, ahead_s: float = AHEAD_S, max_held: int = MAX_HELD):
        self.ahead = timedelta(seconds=ahead_s)
        self.max_held = max_held
        self._held: OrderedDict[tuple[str, str], _Held] = OrderedDict()

    def verdict(self, topic: str, header: Header) -> str | None:
        """Why the message is refused (a counter's reason), or None."""
        held = self._held.get((header.by, freshness_key(topic)))
        if held is not None and header.t < held.t and not (header.will and header.run == held.run):
            return "replayed"
        return None

    def believe(self, topic: str, header: Header, now: datetime | None) -> None:
        if now is not None and header.t > now + self.ahead:
            return
        key = (header.by, freshness_key(topic))
        held = self._held.pop(key, None)
        newest = header.t if held is None else max(held.t, header.t)
        self._held[key] = _Held(newest, header.run)
        while len(self._held) > self.max_held:
            self._held.popitem(last=False)
