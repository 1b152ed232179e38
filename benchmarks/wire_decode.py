"""What decoding one wire message costs: the duplicate-key check (jiter, and the standard library's
parser it replaced) and the whole strict decode, on a real proposal of the default day. Prints Markdown.

    .venv/bin/python benchmarks/wire_decode.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from p2pdoe.core.agreement.protocol import Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.schemas.messages import decode, encode
from p2pdoe.core.schemas.wire import checked_json
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario


def a_proposal() -> bytes:
    p = participants(load_scenario("default"), Policy.DYNAMIC, "bench")
    opening = next(c.message for c in p.dso.open_round() if isinstance(c, Publish))
    first = next(c for c in p.communities[0].handle(Received(opening)) if isinstance(c, Publish))
    return encode(first.message)  # type: ignore[arg-type]


def stdlib_check(payload: bytes) -> None:
    """The check before jiter: the standard library's parser with a hook refusing repeated keys."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("repeated key")
        return dict(pairs)

    json.loads(payload.decode("utf-8"), object_pairs_hook=unique)


def microseconds(f: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(5):  # the best of five batches: the least disturbed by other work on the machine
        t0 = time.perf_counter()
        for _ in range(repeat):
            f()
        best = min(best, (time.perf_counter() - t0) / repeat * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    payload = a_proposal()
    rows = [
        ("duplicate-key check, standard library (before)", lambda: stdlib_check(payload)),
        ("duplicate-key check, jiter (`checked_json`)", lambda: checked_json(payload)),
        ("whole strict decode (`decode`: check + pydantic)", lambda: decode(payload)),
    ]
    print(f"a proposal of the default day: {len(payload)} bytes\n")
    print("| step | µs per message (best of 5) |\n|---|---:|")
    for name, f in rows:
        print(f"| {name} | {microseconds(f, args.repeat):.1f} |")


if __name__ == "__main__":
    main()
