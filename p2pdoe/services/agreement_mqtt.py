"""The agreement over MQTT: a community's and the DSO's participant driven by a `Transport`.

Each service subscribes first, announces itself (retained `status` online), and only then takes part:
the coordinator opens the round (retained `round_open`) once every expected site is online. Every
message is decoded strictly, and one whose sender does not match its topic is dropped and counted.
Solves run in a worker thread, so the event loop (and the MQTT keep-alive) never starves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from p2pdoe.core import topics
from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant
from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant
from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.reader import MarketReader, Message, sender_matches_topic, topic_of
from p2pdoe.core.schemas.messages import DSO_ID, RoundOpen, encode
from p2pdoe.core.schemas.runtime import SiteStatus, decode_runtime
from p2pdoe.services.transport import InboundMessage, Transport

__all__ = ["MarketReader", "Message", "run_community", "run_coordinator", "sender_matches_topic", "topic_of"]
log = logging.getLogger(__name__)


class _Driver(MarketReader):
    """Feeds one participant from a transport and publishes what it says."""

    def __init__(self, transport: Transport, name: str):
        super().__init__(name)
        self.transport = transport

    async def publish(self, commands: list[Command]) -> object | None:
        """Publish every message (all in flight together, in order); return the outcome if the
        participant finished."""
        sends = [
            self.transport.publish(
                topic_of(c.message), encode(c.message), qos=1, retain=isinstance(c.message, RoundOpen)
            )
            for c in commands
            if isinstance(c, Publish)
        ]
        await asyncio.gather(*sends)
        return next((c.outcome for c in commands if isinstance(c, Finished)), None)

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


async def run_community(
    transport: Transport, participant: CommunityParticipant, hear_peers: bool = True
) -> CommunityOutcome:
    """Take part in the next round; return this community's outcome. `hear_peers` False: for a round
    whose grants relay the peers' trades, so no peer's proposal is needed."""
    driver = _Driver(transport, participant.site)
    await transport.subscribe(topics.round_open("+"))
    await transport.subscribe(topics.grant("+", participant.site))
    await transport.subscribe(topics.polish_prices("+", participant.site))
    for peer in participant.peer_ids if hear_peers else ():
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
    await transport.subscribe(topics.all_polish_reports(dso.plan.round))
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
