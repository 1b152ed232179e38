"""End-to-end signatures (Ed25519, the `cryptography` package) around any transport.

`SignedTransport` signs what its service publishes with the service's own key and, given the
trusted public keys, believes only messages signed by the identity that owns their topic
(`p2pdoe.core.signing.signer_of`), fresh and not replayed; the others are dropped, counted by reason
and logged. Then a plain broker, a bridged one or a mistaken ACL lets nobody forge or replay what
changes a participant's behaviour. Keys: one per identity, made by `p2pdoe provision` (and by `p2pdoe
demo` for its run): `<identity>.key` (PKCS#8 PEM, mode 0600) and `public-keys.json`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pdoe.core.signing import Freshness, Header, SignatureError, frame, signer_of, unframe
from p2pdoe.services.settings import ConfigError
from p2pdoe.services.transport_api import InboundMessage, LastWill, Transport
from p2pdoe.services.transport_layer import TransportLayer

log = logging.getLogger(__name__)
PUBLIC_KEYS = "public-keys.json"
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)  # signing before the clock knows the time (a will)
_LOUD = 5  # refusals logged at WARNING per reason; then one in every 100


# --- keys --------------------------------------------------------------------------------------------


def write_keys(directory: Path, identities: Iterable[str]) -> Path:
    """A fresh key per identity in `directory` and their public keys in `public-keys.json` (its path)."""
    directory.mkdir(parents=True, exist_ok=True)
    public = {}
    for identity in identities:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = directory / f"{identity}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        public[identity] = base64.b64encode(_raw(key.public_key())).decode()
    out = directory / PUBLIC_KEYS
    out.write_text(json.dumps({"schema_version": 1, "ed25519": public}, indent=2) + "\n", encoding="utf-8")
    return out


def forget_key(public_keys: Path, identity: str) -> None:
    """Remove `identity` from a `public-keys.json` (a revoked site): its signatures are refused from
    the next start of each service on. No file, nothing to do."""
    if not public_keys.exists():
        return
    doc = json.loads(public_keys.read_text(encoding="utf-8"))
    doc["ed25519"].pop(identity, None)
    tmp = public_keys.with_name(f".{public_keys.name}.new")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, public_keys)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in `path`, or a ConfigError naming the file (never its content)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"the signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the signing key {path} is not an Ed25519 key")
    return key


def read_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """Identity -> public key from a `public-keys.json`, or a ConfigError naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["ed25519"]
        return {str(k): Ed25519PublicKey.from_public_bytes(base64.b64decode(v)) for k, v in entries.items()}
    except OSError as exc:
        raise ConfigError(f"cannot read the trusted keys {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"the trusted keys {path} are not a public-keys.json of p2pdoe provision") from None


# --- the transport -----------------------------------------------------------------------------------


class Signer:
    """Signs as `identity` with `key` (None: signs nothing, a monitor), at the time of `now`."""

    def __init__(
        self, identity: str, key: Ed25519PrivateKey | None, now: Callable[[], datetime] | None = None
    ):
        self.identity = identity
        self.key = key
        self.run = secrets.token_hex(4)
        self._now = now

    def use_clock(self, now: Callable[[], datetime]) -> None:
        self._now = now

    def now(self) -> datetime | None:
        if self._now is None:
            return None
        try:
            return self._now()
        except RuntimeError:  # a lockstep clock before its first grant
            return None

    def sign(self, topic: str, payload: bytes, will: bool = False) -> bytes:
        """`payload` framed with this identity's signature (unchanged where nobody signs, or empty)."""
        if self.key is None or not payload or signer_of(topic) is None:
            return payload
        t = UNKNOWN_TIME if will else (self.now() or UNKNOWN_TIME)
        header = Header(self.identity, t.astimezone(UTC), self.run, will)
        signature = self.key.sign(header.signed_bytes(topic, payload))
        return frame(Header(header.by, header.t, header.run, will, signature), payload)

    def signed_will(self, will: LastWill | None) -> LastWill | None:
        return None if will is None else LastWill(will.topic, self.sign(will.topic, will.payload, will=True))


class SignedTransport(TransportLayer):
    """`inner` with signatures: what is published is signed by `signer`; with `trusted` keys only
    authentic, fresh messages are received (the others dropped, counted in `refused`, logged);
    `trusted` None believes unsigned messages too (and strips the signatures of signed ones)."""

    def __init__(self, inner: Transport, signer: Signer, trusted: Mapping[str, Ed25519PublicKey] | None):
        super().__init__(inner)
        self.signer = signer
        self.trusted = trusted
        self.freshness = Freshness()
        self.refused: Counter[str] = Counter()
        self.also_count: list[Counter[str]] = []  # a machine's reader: refusals reach its reports

    def count_into(self, counter: Counter[str]) -> None:
        counter.update(self.refused)
        self.also_count.append(counter)

    # --- sending ---------------------------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        await self.inner.publish(topic, self.signer.sign(topic, payload), qos, retain, expiry_s)

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        await self.inner.publish_state(topic, self.signer.sign(topic, payload), expiry_s)

    # --- receiving -------------------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[InboundMessage]:
        async for m in self.inner.messages():
            believed = self.check(m)
            if believed is not None:
                yield believed

    def check(self, m: InboundMessage) -> InboundMessage | None:
        """The message with its signature line removed if it is to be believed, else None (counted)."""
        signer = signer_of(m.topic)
        if signer is None or not m.payload:
            return m
        try:
            header, body = unframe(m.payload)
        except SignatureError as exc:
            return self._refuse(exc.reason, m.topic, str(exc))
        if self.trusted is None:
            return m if header is None else InboundMessage(m.topic, body, m.retained)
        if header is None:
            return self._refuse("unsigned", m.topic, "no signature")
        why = self._forged(signer, m.topic, header, body)
        if why is not None:
            return self._refuse(why, m.topic, f"signed by {header.by!r}")
        stale = self.freshness.verdict(m.topic, header)
        if stale is not None:
            return self._refuse(stale, m.topic, f"signed at {header.text_time()}")
        self.freshness.believe(m.topic, header, self.signer.now())
        return InboundMessage(m.topic, body, m.retained)

    def _forged(self, signer: str, topic: str, header: Header, body: bytes) -> str | None:
        if header.by != signer:
            return "wrong_signer"
        assert self.trusted is not None
        key = self.trusted.get(signer)
        if key is None:
            return "unknown_signer"
        try:
            key.verify(header.signature, header.signed_bytes(topic, body))
        except InvalidSignature:
            return "bad_signature"
        return None

    def _refuse(self, reason: str, topic: str, detail: str) -> InboundMessage | None:
        self.refused[reason] += 1
        for counter in self.also_count:
            counter[reason] += 1
        n = self.refused[reason]
        if n <= _LOUD or n % 100 == 0:
            log.warning(
                "%s: refused a message on %s (%s: %s; %d so far)",
                self.signer.identity,
                topic,
                reason,
                detail,
                n,
            )
        return None
