"""The coordinator's transport deletes what a site leaves retained on its proposal and report topics
(`RetainedSweep`), against a real Mosquitto: subscribing again makes the broker send what it holds
there, each one is deleted and counted and never handed on, live messages pass, and retained
messages where they belong (a site's status) stay."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from test_transport_faults import FAST, next_message, run, until

from p2pdoe.core import topics
from p2pdoe.services.broker import Broker
from p2pdoe.services.retained_sweep import RetainedSweep
from p2pdoe.services.transport import InboundMessage, MqttTransport

pytestmark = pytest.mark.mosquitto


def test_retained_proposals_are_deleted_at_every_sweep_and_live_ones_pass(mosquitto_broker: Broker) -> None:
    url = mosquitto_broker.url

    async def hoard(site: MqttTransport, first: int, n: int) -> None:
        for k in range(first, first + n):
            await site.publish(topics.proposal(f"hoard-{k}", "a"), b"x" * 10_000, retain=True)

    async def scenario() -> None:
        counted: Counter[str] = Counter()
        async with (
            MqttTransport(url, "edge-a", backoff=FAST) as site,
            RetainedSweep(MqttTransport(url, "dso", backoff=FAST)) as dso,
        ):
            dso.count_into(counted)
            await site.publish(topics.site("a", "status"), b"online", retain=True)
            await hoard(site, 0, 5)
            heard: list[InboundMessage] = []

            async def read() -> None:
                async for m in dso.messages():
                    heard.append(m)

            reader = asyncio.create_task(read())
            await dso.subscribe(topics.all_proposals())  # a round's sweep
            await until(lambda: dso.deleted["a"] == 5, 10)
            await hoard(site, 5, 3)  # after the sweep: live to the coordinator (not retained)...

            def live() -> list[InboundMessage]:
                return [m for m in heard if m.payload]  # its own deletions come back, empty

            await until(lambda: len(live()) == 3, 10)
            assert not any(m.retained for m in live())
            await dso.subscribe(topics.all_proposals())  # ...and deleted at the next sweep
            await until(lambda: dso.deleted["a"] == 8, 10)
            reader.cancel()
        assert counted["retained_misuse"] == 8

        async with MqttTransport(url, "probe", backoff=FAST) as probe:
            await probe.subscribe(topics.all_proposals())
            await probe.subscribe(topics.site("a", "status"))
            assert (await next_message(probe)).topic == topics.site("a", "status")  # it belongs: kept
            with pytest.raises(TimeoutError):
                await next_message(probe, 1.0)  # nothing left on the proposal topics

    run(scenario(), timeout_s=60)


def test_nothing_deleted_adds_no_count() -> None:
    counted: Counter[str] = Counter()
    RetainedSweep(MqttTransport("mqtt://127.0.0.1:1", "dso")).count_into(counted)
    assert counted == {}  # results.json lists only what happened
