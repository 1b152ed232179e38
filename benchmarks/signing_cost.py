"""What end-to-end signatures cost: signing and checking one message (Ed25519, `cryptography`) beside
its strict decode, on real messages of the default day; then a virtual day with and without
signatures (the same services, the in-memory broker). Medians of repeats; the load is printed.
Prints Markdown.

    .venv/bin/python benchmarks/signing_cost.py [--repeat 2000] [--days 3] [--hours 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from realtime_helpers import quarter_hour_day

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core import topics
from p2pdoe.core.agreement.protocol import Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.schemas.messages import decode, encode
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.signing import SignedTransport, Signer
from p2pdoe.services.transport import InboundMessage
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

T0 = datetime(2026, 6, 21, tzinfo=UTC)


def messages() -> list[tuple[str, str, str, bytes]]:
    """(name, topic, signer, body) of an opening and a proposal of the default day."""
    p = participants(load_scenario("default"), Policy.DYNAMIC, "bench")
    opening = next(c.message for c in p.dso.open_round() if isinstance(c, Publish))
    first = next(c for c in p.communities[0].handle(Received(opening)) if isinstance(c, Publish))
    site = first.message.sender  # type: ignore[union-attr]
    return [
        ("round opening", topics.round_open("bench"), "dso", encode(opening)),  # type: ignore[arg-type]
        ("proposal", topics.proposal("bench", site), f"edge-{site}", encode(first.message)),  # type: ignore[arg-type]
    ]


def median_us(f: Callable[[], object], repeat: int) -> float:
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            f()
        batches.append((time.perf_counter() - t0) / repeat * 1e6)
    return statistics.median(batches)


def per_message(repeat: int) -> None:
    print("| message | bytes | signature line (bytes) | sign (µs) | check (µs) | strict decode (µs) |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, topic, who, body in messages():
        keys = {who: Ed25519PrivateKey.generate()}
        signer = Signer(who, keys[who], lambda: T0)
        receiver = SignedTransport(
            MemoryTransport(MemoryBroker(), "r"), Signer("r", None, lambda: T0), {who: keys[who].public_key()}
        )
        framed = signer.sign(topic, body)
        arrived = InboundMessage(topic, framed, False)
        assert receiver.check(arrived) is not None
        sign = median_us(lambda: signer.sign(topic, body), repeat)  # noqa: B023
        check = median_us(lambda: receiver.check(arrived), repeat)  # noqa: B023
        dec = median_us(lambda: decode(body), repeat)  # noqa: B023
        extra = len(framed) - len(body)
        print(f"| {name} | {len(body)} | {extra} | {sign:.1f} | {check:.1f} | {dec:.1f} |")


def virtual_days(days: int, hours: float) -> None:
    s = quarter_hour_day()
    logging.disable(logging.WARNING)
    walls: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(days):
        for signed in (False, True):
            with tempfile.TemporaryDirectory() as root:
                day = VirtualDay(s, Path(root), hours=hours, signed=signed)
                day.run()
                walls[signed].append(day.wall_s)
    plain, signed_ = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"\nA virtual day of {hours:g} h (the quarter-hour scenario), median of {days}:\n")
    print("| services | wall time (s) |\n|---|--:|")
    print(f"| unsigned | {plain:.1f} |\n| signed | {signed_:.1f} |")
    print(f"\nsigned / unsigned: {signed_ / plain:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--hours", type=float, default=1.0)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    per_message(args.repeat)
    if args.days > 0:
        virtual_days(args.days, args.hours)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
