"""The agreement over MQTT: a community's and the DSO's participant driven by a `Transport`.

Each service subscribes first, announces itself (retained `status` online), and only then takes part:
the coordinator opens the round (retained `round_open`) once every expected site is online. Every
message is decoded strictly, and one whose sender does not match its topic is dropped and counted.
Solves run in a worker thread, so the event loop (and the MQTT keep-alive) never starves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant
from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.schemas.messages import DSO_ID, Grant, Proposal, RoundOpen, decode, encode
from p2pdoe.core.schemas.runtime import Runtime, SiteStatus, decode_runtime
from p2pdoe.services.transport import InboundMessage, Transport

Message = RoundOpen | Proposal | Grant
log = logging.getLogger(__name__)


def topic_of(message: Message) -> str:
    if isinstance(message, RoundOpen):
        return topics.round_open(message.round)
    if isinstance(message, Proposal):
        return topics.proposal(message.round, message.sender)
    return topics.grant(message.round)


def sender_matches_topic(topic: str, message: Message) -> bool:
    """A proposal only on its sender's own topic; opens and grants only on the DSO's."""
    parsed = topics.parse(topic)
    if parsed is None or parsed.area != "market" or parsed.round != message.round:
        return False
    if isinstance(message, Proposal):
        return parsed.kind == "proposal" and parsed.site == message.sender
    return parsed.kind == ("open" if isinstance(message, RoundOpen) else "grant")


class MarketReader:
    """Decodes market messages strictly; drops and counts what is malformed or sent on another's topic.
    An empty payload (a retained message withdrawn) is skipped without counting."""

    def __init__(self, name: str):
        self.name = name
        self.dropped: Counter[str] = Counter()

    def decoded(self, m: InboundMessage) -> Message | None:
        if not m.payload:
            return None
        try:
            message = decode(m.payload)
        except ValueError:
            self.dropped["malformed"] += 1
            log.debug("%s: dropped a malformed message on %s", self.name, m.topic)
            return None
        if not sender_matches_topic(m.topic, message):
            self.dropped["sender_not_topic"] += 1
            log.debug("%s: dropped a %s whose sender does not match %s", self.name, message.kind, m.topic)
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


class _Driver(MarketReader):
    """Feeds one participant from a transport and publishes what it says."""

    def __init__(self, transport: Transport, name: str):
        super().__init__(name)
        self.transport = transport

    async def publish(self, commands: list[Command]) -> object | None:
        """Publish every message; return the outcome if the participant finished."""
        outcome = None
        for cmd in commands:
            if isinstance(cmd, Publish):
                retain = isinstance(cmd.message, RoundOpen)
                await self.transport.publish(topic_of(cmd.message), encode(cmd.message), qos=1, retain=retain)
            elif isinstance(cmd, Finished):
                outcome = cmd.outcome
        return outcome

    async def until_finished(
        self, messages: AsyncIterator[InboundMessage], handle: Callable[[Received], list[Command]]
    ) -> object:
        """Hand every market message to `handle` (in a worker thread) until the participant finishes;
        site topics (late status updates) are not the market's."""
        async for m in messages:
            parsed = topics.parse(m.topic)
            if parsed is not None and parsed.area == "site":
                continue
            message = self.decoded(m)
            if message is None:
                continue
            outcome = await self.publish(await asyncio.to_thread(handle, Received(message)))
            if outcome is not None:
                return outcome
        raise ConnectionError(f"{self.name}: the transport closed before the round ended")


def _status(site: str, state: str) -> bytes:
    msg = SiteStatus(site=site, state=state, envelope="none", ts=datetime.now(UTC))  # type: ignore[arg-type]
    return msg.model_dump_json().encode()


async def run_community(transport: Transport, participant: CommunityParticipant) -> CommunityOutcome:
    """Take part in the next round; return this community's outcome."""
    driver = _Driver(transport, participant.site)
    await transport.subscribe(topics.round_open("+"))
    await transport.subscribe(topics.grant("+"))
    for peer in participant.peer_ids:
        await transport.subscribe(topics.proposal("+", peer))
    status = topics.site(participant.site, "status")
    await transport.publish(status, _status(participant.site, "online"), qos=1, retain=True)
    outcome = await driver.until_finished(transport.messages(), participant.handle)
    assert isinstance(outcome, CommunityOutcome)
    return outcome


async def run_coordinator(
    transport: Transport, dso: DsoParticipant, online_timeout_s: float = 60.0
) -> DsoOutcome:
    """Wait until every site is online, open the round, and drive it to its end."""
    driver = _Driver(transport, DSO_ID)
    await transport.subscribe(topics.every_site("status"))
    await transport.subscribe(topics.all_proposals(dso.plan.round))
    messages = transport.messages()
    await asyncio.wait_for(_all_online(messages, set(dso.plan.sites), driver), online_timeout_s)
    await driver.publish(await asyncio.to_thread(dso.open_round))
    outcome = await driver.until_finished(messages, dso.handle)
    assert isinstance(outcome, DsoOutcome)
    return outcome


async def _all_online(messages: AsyncIterator[InboundMessage], expected: set[str], driver: _Driver) -> None:
    online: set[str] = set()
    async for m in messages:
        parsed = topics.parse(m.topic)
        if parsed is None or parsed.area != "site" or parsed.kind != "status":
            continue
        try:
            status = decode_runtime(m.payload)
        except ValueError:
            driver.dropped["malformed"] += 1
            continue
        if isinstance(status, SiteStatus) and status.site == parsed.site and status.state == "online":
            online.add(status.site)
        if expected <= online:
            return
