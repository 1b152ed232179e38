"""Do lockstep members that start together all join, and all hear the first grant? A stress probe.

    .venv/bin/python benchmarks/lockstep_join.py [--members 13] [--runs 4] [--broker embedded|mosquitto]

Each run starts a broker on a free loopback port (the embedded amqtt broker by default, as
`make demo` uses; Mosquitto with `--broker mosquitto`), a watcher that subscribes to every
`clock/member/<name>`, and `--members` processes at once, each a `MqttTransport` (half of them with a
last will, as edge agents have) and a `LockstepClock` that starts and runs (so it rejoins after
`--rejoin-s` without a grant). Once every member has joined, or after `--join-wait-s`, the watcher
publishes a retained grant for all of them; each member reports whether it heard it within
`--grant-wait-s`. One Markdown row per run: members joined, how long until all had, grants heard,
rejoins. Bounded: every wait has its limit, and every process is stopped at the end of its run.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime

from p2pdoe.core import topics
from p2pdoe.core.schemas.lockstep import ClockGrant, Phase
from p2pdoe.services.broker import Broker, start_embedded, start_mosquitto
from p2pdoe.services.lockstep import LockstepClock
from p2pdoe.services.transport import LastWill, MqttTransport

PHASE: Phase = "control"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=13, help="member processes per run (13: the demo's)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--broker", choices=["embedded", "mosquitto"], default="embedded")
    parser.add_argument("--join-wait-s", type=float, default=60.0)
    parser.add_argument("--grant-wait-s", type=float, default=90.0)
    parser.add_argument("--rejoin-s", type=float, default=60.0)
    parser.add_argument("--member", nargs=2, metavar=("URL", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.member:
        url, name = args.member
        return asyncio.run(member(url, name, args.rejoin_s, args.grant_wait_s))
    print("| run | members | joined | all joined after s | heard the grant | rejoins |")
    print("|--:|--:|--:|--:|--:|--:|")
    for run in range(1, args.runs + 1):
        broker = start_embedded() if args.broker == "embedded" else start_mosquitto()
        try:
            row = asyncio.run(one_run(broker, args))
        finally:
            broker.close()
        print(f"| {run} | {args.members} | {row} |", flush=True)
    return 0


async def one_run(broker: Broker, args: argparse.Namespace) -> str:
    names = [f"member-{i:02d}" for i in range(args.members)]
    async with MqttTransport(broker.url, "watcher") as watcher:
        await watcher.subscribe(topics.clock_member("+"), qos=1)
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--member",
                    broker.url,
                    name,
                    "--rejoin-s",
                    str(args.rejoin_s),
                    "--grant-wait-s",
                    str(args.grant_wait_s),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in names
        ]
        try:
            joined, after = await joins(watcher, set(names), started, args.join_wait_s)
            grant = ClockGrant(step=0, phase=PHASE, time=datetime.now(UTC), members=names, live=names)
            await watcher.publish(topics.clock_grant(PHASE), grant.model_dump_json().encode(), retain=True)
            lines = [p.communicate(timeout=args.grant_wait_s + 30)[0].split() for p in procs]
        finally:
            for p in procs:
                p.kill()
    heard = sum(1 for line in lines if line[:1] == ["heard"])
    rejoins = sum(int(line[1]) for line in lines if len(line) == 2)
    return f"{len(joined)} | {'–' if after is None else f'{after:.1f}'} | {heard} | {rejoins}"


async def joins(
    watcher: MqttTransport, names: set[str], started: float, wait_s: float
) -> tuple[set[str], float | None]:
    joined: set[str] = set()

    async def until_all() -> None:
        async for message in watcher.messages():
            joined.add(message.topic.rsplit("/", 1)[-1])
            if names <= joined:
                return

    try:
        await asyncio.wait_for(until_all(), wait_s)
    except TimeoutError:
        return joined & names, None
    return joined & names, time.monotonic() - started


async def member(url: str, name: str, rejoin_s: float, wait_s: float) -> int:
    will = LastWill(f"p2pdoe-probe/{name}/status", b"offline") if int(name[-2:]) % 2 else None
    async with MqttTransport(url, name, will=will) as transport:
        clock = LockstepClock(transport, name, PHASE, every_step=True, rejoin_s=rejoin_s)
        await clock.start()
        sender = asyncio.create_task(clock.run())

        async def first_grant() -> None:
            async for message in transport.messages():
                clock.on_message(message.topic, message.payload)
                if clock.grant is not None:
                    return

        try:
            await asyncio.wait_for(first_grant(), wait_s)
            print("heard", clock.rejoins, flush=True)
        except TimeoutError:
            print("missed", clock.rejoins, flush=True)
        sender.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
