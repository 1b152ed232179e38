"""Latency of the MQTT transport with and without TCP_NODELAY on the client socket, and the default
day's agreement over a broker (seven clients in one process) both ways. Prints Markdown.

    .venv/bin/python benchmarks/transport_latency.py [--round-trips 50]

Uses a Mosquitto it starts on a free loopback port (the embedded broker if Mosquitto is missing).
paho leaves Nagle's algorithm on; the transport's link switches it off.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services import transport as transport_module
from p2pdoe.services.agreement_mqtt import run_community, run_coordinator
from p2pdoe.services.broker import broker_for_tests
from p2pdoe.services.transport import MqttTransport


@contextmanager
def nagle(enabled: bool) -> Iterator[None]:
    """With `enabled`, leave client sockets as paho makes them (the transport's fix switched off)."""
    original = transport_module._no_delay
    if enabled:
        transport_module._no_delay = lambda client: None  # type: ignore[assignment]
    try:
        yield
    finally:
        transport_module._no_delay = original


async def round_trip_ms(url: str, count: int) -> float:
    a, b = MqttTransport(url, "ping"), MqttTransport(url, "pong")
    await a.start()
    await b.start()
    await a.subscribe("bench/pong")
    await b.subscribe("bench/ping")

    async def echo() -> None:
        async for m in b.messages():
            await b.publish("bench/pong", m.payload)

    task = asyncio.create_task(echo())
    replies = a.messages()
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    for _ in range(count):
        await a.publish("bench/ping", b"x")
        await anext(replies)
    elapsed = time.perf_counter() - started
    task.cancel()
    await a.close()
    await b.close()
    return elapsed / count * 1e3


async def agreement_s(url: str) -> tuple[float, int]:
    p = participants(load_scenario("default"), Policy.DYNAMIC, "day-ahead")
    edges = [MqttTransport(url, f"edge-{c.site}") for c in p.communities]
    coordinator = MqttTransport(url, "coordinator")
    for t in [*edges, coordinator]:
        await t.start()
    started = time.perf_counter()
    tasks = [asyncio.create_task(run_community(t, c)) for t, c in zip(edges, p.communities, strict=True)]
    dso = await run_coordinator(coordinator, p.dso)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for t in [*edges, coordinator]:
        await t.close()
    return elapsed, dso.iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--round-trips", type=int, default=50)
    args = parser.parse_args()
    print("| client socket | ping-pong round trip (ms) | default day over MQTT (s) | iterations |")
    print("|---|--:|--:|--:|")
    for label, enabled in (("TCP_NODELAY (shipped)", False), ("Nagle on (paho's default)", True)):
        with broker_for_tests() as broker, nagle(enabled):
            rtt = asyncio.run(round_trip_ms(broker.url, args.round_trips))
        with broker_for_tests() as broker, nagle(enabled):
            seconds, iterations = asyncio.run(agreement_s(broker.url))
        print(f"| {label} | {rtt:.2f} | {seconds:.2f} | {iterations} |", flush=True)
    print(f"\nbroker: {broker.kind}")


if __name__ == "__main__":
    main()
