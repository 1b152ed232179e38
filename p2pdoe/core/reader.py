"""Reading what arrives: market messages (`RoundOpen`, `Proposal`, `Grant`) and runtime messages
decoded strictly, what is malformed or sent on another party's topic dropped and counted. Pure: the
services and the machines share it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol, TypeVar

from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import Grant, PolishPrices, PolishReport, Proposal, RoundOpen, decode
from p2pdoe.core.schemas.payments import (
    PaymentMessage,
    PaymentOpen,
    PaymentProposal,
    decode_payment,
)
from p2pdoe.core.schemas.runtime import Runtime, decode_runtime

Message = RoundOpen | Proposal | Grant | PolishReport | PolishPrices
M = TypeVar("M", Message, PaymentMessage)
log = logging.getLogger(__name__)


class Arrived(Protocol):
    """A message as it arrived (a transport's `InboundMessage`, a machine's `Heard`)."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


def topic_of(message: Message) -> str:
    if isinstance(message, RoundOpen):
        return topics.round_open(message.round)
    if isinstance(message, Proposal):
        return topics.proposal(message.round, message.sender)
    if isinstance(message, PolishReport):
        return topics.polish(message.round, message.sender)
    if isinstance(message, PolishPrices):
        return topics.polish_prices(message.round, message.recipient)
    return topics.grant(message.round, message.recipient)


def sender_matches_topic(topic: str, message: Message) -> bool:
    """A proposal only on its sender's own topic, a grant only on its recipient's, an opening only on
    the round's (grants and openings are the DSO's: signed by it where messages are signed)."""
    parsed = topics.parse(topic)
    if parsed is None or parsed.area != "market" or parsed.round != message.round:
        return False
    if isinstance(message, Proposal):
        return parsed.kind == "proposal" and parsed.site == message.sender
    if isinstance(message, Grant):
        return parsed.kind == "grant" and parsed.site == message.recipient
    if isinstance(message, PolishReport):
        return parsed.kind == "polish" and parsed.site == message.sender
    if isinstance(message, PolishPrices):
        return parsed.kind == "prices" and parsed.site == message.recipient
    return parsed.kind == "open"


def payment_topic_of(message: PaymentMessage) -> str:
    if isinstance(message, PaymentOpen):
        return topics.payment_open(message.round)
    if isinstance(message, PaymentProposal):
        return topics.payment_proposal(message.round, message.sender)
    return topics.payment_grant(message.round)


def _payment_on_its_topic(topic: str, message: PaymentMessage) -> bool:
    return topic == payment_topic_of(message)


class MarketReader:
    """Decodes market messages strictly; drops and counts what is malformed or sent on another's topic.
    An empty payload (a retained message withdrawn) is skipped without counting."""

    def __init__(self, name: str):
        self.name = name
        self.dropped: Counter[str] = Counter()

    def decoded(self, m: Arrived) -> Message | None:
        return self._strictly(m, decode, sender_matches_topic)

    def payment(self, m: Arrived) -> PaymentMessage | None:
        """A message of a payment round (Nash bargaining's stage 2), likewise."""
        return self._strictly(m, decode_payment, _payment_on_its_topic)

    def _strictly(
        self, m: Arrived, decoder: Callable[[bytes], M], on_its_topic: Callable[[str, M], bool]
    ) -> M | None:
        if not m.payload:
            return None
        try:
            message = decoder(m.payload)
        except ValueError:
            self.dropped["malformed"] += 1
            log.debug("%s: dropped a malformed message on %s", self.name, m.topic)
            return None
        if not on_its_topic(m.topic, message):
            self.dropped["sender_not_topic"] += 1
            log.debug("%s: dropped a %s sent on another's topic %s", self.name, message.kind, m.topic)
            return None
        return message

    def runtime(self, payload: bytes) -> Runtime | None:
        """A runtime message (envelope, status, reading...), strictly decoded; an empty payload (a
        retained message withdrawn) is None uncounted, a malformed one None and counted."""
        if not payload:
            return None
        try:
            return decode_runtime(payload)
        except ValueError:
            self.dropped["malformed"] += 1
            log.debug("%s: dropped a malformed runtime message", self.name)
            return None
