"""What one message in and one out costs an MQTT client in Python, by client, protocol and QoS: is
an edge agent's CPU per iteration ≤ 2x its own steps (issue 18, item 3) reachable at all? Prints
Markdown.

    .venv/bin/python benchmarks/mqtt_client_cost.py [--count 2000] [--repeats 3] [--size 6200]

An echo process (a real subprocess) subscribes to one topic and publishes every message it receives
to another, as an edge in a relayed round hears its grant and sends its proposal. A driver sends the
next message only when the echo of the last one has come back, so the echo process handles one
message at a time, as in lockstep iterations. The echo process reports its own CPU time (user +
system, all threads) per echo over `--count` messages after a warm-up. Echo clients:
- `transport`: the project's `MqttTransport`, what the services use (its link drives paho from the
  loop as `paho-asyncio` below does; before the link, aiomqtt drove it);
- `aiomqtt`: aiomqtt's `Client` alone (paho under asyncio), without the transport's reconnecting,
  delivery tracking and inbox;
- `paho`: paho alone, its own network loop in the process's main thread, no asyncio;
- `paho-asyncio`: paho driven from an asyncio loop with no layer between: the socket's reader
  callback runs paho's read, then writes at once whatever paho queued (what a leaner transport
  could do in place of aiomqtt);
- `floor`: about the least any Python client can do: a hand-written MQTT 3.1.1 client on asyncio
  streams that parses the fixed header, acknowledges QoS 1 and nothing more (no properties, no
  retries, no session state). It is a measuring stick, not a client to deploy.
Each client runs with MQTT 5 and 3.1.1 where it speaks both, at QoS 1 (what the agreement uses) and
QoS 0. Variants alternate within each repeat; the table gives medians over the repeats. Uses a
Mosquitto it starts on a free loopback port (the embedded broker if Mosquitto is missing).
`--size` is the payload in bytes each way (a default-day proposal is about 6.2 kB).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pdoe.services.broker import broker_for_tests
from p2pdoe.services.broker_url import parse_broker_url
from p2pdoe.services.transport import MqttTransport

WARM_UP = 100
IN, OUT = "bench/in", "bench/out"


@dataclass(frozen=True)
class Variant:
    client: str
    protocol: str  # "v5" or "v311"
    qos: int

    @property
    def label(self) -> str:
        return f"{self.client}, MQTT {'5' if self.protocol == 'v5' else '3.1.1'}, QoS {self.qos}"


VARIANTS = [
    Variant("transport", "v5", 1),
    Variant("transport", "v311", 1),
    Variant("transport", "v5", 0),
    Variant("transport", "v311", 0),
    Variant("aiomqtt", "v5", 1),
    Variant("aiomqtt", "v311", 1),
    Variant("paho", "v5", 1),
    Variant("paho", "v311", 1),
    Variant("paho", "v311", 0),
    Variant("paho-asyncio", "v5", 1),
    Variant("paho-asyncio", "v311", 1),
    Variant("floor", "v311", 1),
    Variant("floor", "v311", 0),
]


def cpu_s() -> float:
    return time.process_time()  # user + system of every thread, at the clock's full resolution


# -- echo clients (run in the subprocess) ----------------------------------------------------------


async def echo_transport(host: str, port: int, v: Variant, total: int) -> float:
    async with MqttTransport(f"mqtt://{host}:{port}", "bench-echo", protocol=v.protocol) as t:  # type: ignore[arg-type]
        await t.subscribe(IN, v.qos)
        print("ready", flush=True)
        incoming = t.messages()
        started = 0.0
        for n in range(total):
            if n == WARM_UP:
                started = cpu_s()
            message = await anext(incoming)
            await t.publish(OUT, message.payload, v.qos)
        return cpu_s() - started


def _no_delay(sock: object) -> None:
    """Nagle's algorithm off, as the transport does: else every echo waits for a delayed ACK."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def echo_aiomqtt(host: str, port: int, v: Variant, total: int) -> float:
    import aiomqtt

    version = aiomqtt.ProtocolVersion.V5 if v.protocol == "v5" else aiomqtt.ProtocolVersion.V311
    async with aiomqtt.Client(host, port, identifier="bench-echo", protocol=version) as client:
        _no_delay(client._client.socket())
        await client.subscribe(IN, v.qos)
        print("ready", flush=True)
        started, n = 0.0, 0
        async for message in client.messages:
            if n == WARM_UP:
                started = cpu_s()
            await client.publish(OUT, message.payload, v.qos)
            n += 1
            if n == total:
                return cpu_s() - started
    raise RuntimeError("the broker closed the connection")


def _paho_echo(v: Variant, total: int, finish: Callable[[Any, float], None]) -> Any:
    """A paho client that echoes every message; `finish(client, cpu_s)` after `total` of them."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    protocol = mqtt.MQTTv5 if v.protocol == "v5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, "bench-echo", protocol=protocol)
    state = {"n": 0, "started": 0.0}

    def on_connect(c, userdata, flags, reason, properties):  # type: ignore[no-untyped-def]
        _no_delay(c.socket())
        c.subscribe(IN, v.qos)

    def on_subscribe(c, userdata, mid, reasons, properties):  # type: ignore[no-untyped-def]
        print("ready", flush=True)

    def on_message(c, userdata, message):  # type: ignore[no-untyped-def]
        if state["n"] == WARM_UP:
            state["started"] = cpu_s()
        c.publish(OUT, message.payload, v.qos)
        state["n"] += 1
        if state["n"] == total:
            finish(c, cpu_s() - state["started"])

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    return client


def echo_paho(host: str, port: int, v: Variant, total: int) -> float:
    elapsed: list[float] = []

    def finish(client: Any, cpu: float) -> None:
        elapsed.append(cpu)
        client.disconnect()

    client = _paho_echo(v, total, finish)
    client.connect(host, port)
    client.loop_forever()
    return elapsed[0]


async def echo_paho_asyncio(host: str, port: int, v: Variant, total: int) -> float:
    """paho's read from the socket's reader callback, then at once whatever it queued (a publish
    from inside paho's own callback is queued, not written)."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def finish(client: Any, cpu: float) -> None:
        if not done.done():
            done.set_result(cpu)

    client = _paho_echo(v, total, finish)

    def readable() -> None:
        client.loop_read()
        if client.want_write():
            client.loop_write()

    client.connect(host, port)  # sends CONNECT at once: no callback is running
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    loop = asyncio.get_running_loop()
    loop.add_reader(sock, readable)
    try:
        return await done
    finally:
        loop.remove_reader(sock)
        client.disconnect()


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def _string(s: str) -> bytes:
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


async def echo_floor(host: str, port: int, v: Variant, total: int) -> float:
    reader, writer = await asyncio.open_connection(host, port)
    connect = _string("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _string("bench-echo")
    writer.write(_packet(0x10, connect))
    await _read_packet(reader)  # CONNACK
    writer.write(_packet(0x82, (1).to_bytes(2, "big") + _string(IN) + bytes([v.qos])))
    await _read_packet(reader)  # SUBACK
    print("ready", flush=True)
    n, started, next_id = 0, 0.0, 1
    while n < total:
        first, body = await _read_packet(reader)
        if first >> 4 != 3:  # not a PUBLISH: a PUBACK of ours
            continue
        if n == WARM_UP:
            started = cpu_s()
        topic_end = 2 + int.from_bytes(body[:2], "big")
        qos = (first >> 1) & 3
        payload = body[topic_end + 2 :] if qos else body[topic_end:]
        if qos:
            writer.write(_packet(0x40, body[topic_end : topic_end + 2]))
        packet_id = next_id.to_bytes(2, "big") if v.qos else b""
        next_id = next_id % 65535 + 1
        writer.write(_packet(0x30 | v.qos << 1, _string(OUT) + packet_id + payload))
        await writer.drain()
        n += 1
    elapsed = cpu_s() - started
    writer.write(bytes([0xE0, 0]))  # DISCONNECT
    await writer.drain()
    writer.close()
    return elapsed


def echo_main(host: str, port: int, v: Variant, total: int) -> None:
    if v.client == "transport":
        elapsed = asyncio.run(echo_transport(host, port, v, total))
    elif v.client == "aiomqtt":
        elapsed = asyncio.run(echo_aiomqtt(host, port, v, total))
    elif v.client == "paho-asyncio":
        elapsed = asyncio.run(echo_paho_asyncio(host, port, v, total))
    elif v.client == "paho":
        elapsed = echo_paho(host, port, v, total)
    else:
        elapsed = asyncio.run(echo_floor(host, port, v, total))
    print(elapsed / (total - WARM_UP) * 1e6, flush=True)


# -- driver ----------------------------------------------------------------------------------------


async def echo_cpu_us(url: str, v: Variant, count: int, size: int) -> float:
    """The echo process's CPU per echo, in µs."""
    broker = parse_broker_url(url)
    total = count + WARM_UP
    args = [__file__, "--echo", v.client, v.protocol, str(v.qos), broker.host, str(broker.port), str(total)]
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    async with MqttTransport(url, "bench-driver") as driver:
        await driver.subscribe(OUT, 1)
        if (await proc.stdout.readline()).strip() != b"ready":
            raise RuntimeError(f"the {v.label} echo did not start")
        echoes = driver.messages()
        payload = b"x" * size
        for _ in range(total):
            await driver.publish(IN, payload, 1)
            await asyncio.wait_for(anext(echoes), 30.0)
        line = await proc.stdout.readline()
    if await proc.wait() != 0:
        raise RuntimeError(f"the {v.label} echo failed")
    return float(line)


def run(count: int, repeats: int, size: int) -> dict[Variant, list[float]]:
    results: dict[Variant, list[float]] = {v: [] for v in VARIANTS}
    with broker_for_tests() as broker:
        for _ in range(repeats):
            for v in VARIANTS:
                results[v].append(asyncio.run(echo_cpu_us(broker.url, v, count, size)))
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        client, protocol, qos, host, port, total = sys.argv[2:8]
        echo_main(host, int(port), Variant(client, protocol, int(qos)), int(total))
        return
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--count", type=int, default=2000, help="echoes measured per run, after a warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=6200, help="payload bytes each way")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    results = run(args.count, args.repeats, args.size)
    today = statistics.median(results[VARIANTS[0]])
    print(f"{args.count} echoes of {args.size} B each way, median of {args.repeats} runs\n")
    print("| echo client | CPU µs per echo (median) | runs | against today's |")
    print("|---|--:|---|--:|")
    for v, values in results.items():
        median = statistics.median(values)
        runs = " / ".join(f"{x:.0f}" for x in values)
        print(f"| {v.label} | {median:.0f} | {runs} | {median / today:.2f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
