"""What decoding one wire message costs: the duplicate-key check (jiter, and the standard library's
parser it replaced) and the whole strict decode, on a real proposal of the default day; then, for that
proposal and a large one (49 partners, 96 intervals, seeded random numbers), encoding and decoding
with the float series as JSON arrays (the wire format) against a candidate compact form, each series
as the base64 of its little-endian float64 bytes, in the same strict pydantic models (a validator
and a serializer on each series). Prints Markdown.

    .venv/bin/python benchmarks/wire_decode.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator, PlainSerializer

from p2pdoe.core.agreement.protocol import Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.schemas.messages import Kw, Message, Proposal, RoundId, SiteId, decode, encode
from p2pdoe.core.schemas.wire import checked_json
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario


def a_proposal() -> bytes:
    p = participants(load_scenario("default"), Policy.DYNAMIC, "bench")
    opening = next(c.message for c in p.dso.open_round() if isinstance(c, Publish))
    first = next(c for c in p.communities[0].handle(Received(opening)) if isinstance(c, Publish))
    return encode(first.message)  # type: ignore[arg-type]


def _unpacked(v: object) -> object:
    if not isinstance(v, str):
        return v
    values = np.frombuffer(base64.b64decode(v, validate=True), dtype="<f8")
    if not np.isfinite(values).all():
        raise ValueError("NaN or infinity")
    return values.tolist()


def _packed(v: list[float]) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f8").tobytes()).decode("ascii")


Packed = Annotated[list[Kw], BeforeValidator(_unpacked), PlainSerializer(_packed, when_used="json")]


class PackedTrade(Message):
    peer: SiteId
    buy_kw: Packed
    sell_kw: Packed


class PackedEnvelope(Message):
    lo_kw: Packed
    up_kw: Packed


class PackedProposal(Message):
    """`Proposal` with every series in the compact form (a candidate, not the wire format)."""

    schema_version: int
    kind: str
    round: RoundId
    iteration: int
    sender: SiteId
    trades: list[PackedTrade]
    envelope: PackedEnvelope | None


def a_large_proposal(peers: int = 49, intervals: int = 96) -> Proposal:
    rng = np.random.default_rng(7)

    def series() -> list[float]:
        return [float(v) for v in rng.standard_normal(intervals) * 50.0]

    trades = [{"peer": f"c{k}", "buy_kw": series(), "sell_kw": series()} for k in range(peers)]
    doc = {"round": "bench", "iteration": 3, "sender": "c99", "trades": trades}
    return Proposal.model_validate(doc | {"envelope": {"lo_kw": series(), "up_kw": series()}})


def codec_rows(name: str, p: Proposal, repeat: int) -> list[str]:
    """Encode and decode µs and bytes, JSON arrays against the compact form, for one proposal."""
    packed = PackedProposal.model_validate(p.model_dump())
    plain_bytes, packed_bytes = encode(p), packed.model_dump_json().encode()
    assert PackedProposal.model_validate_json(packed_bytes) == packed
    cells = [
        (
            len(plain_bytes),
            microseconds(lambda: encode(p), repeat),
            microseconds(lambda: decode(plain_bytes), repeat),
        ),
        (
            len(packed_bytes),
            microseconds(lambda: packed.model_dump_json(), repeat),
            microseconds(lambda: PackedProposal.model_validate_json(checked_json(packed_bytes)), repeat),
        ),
    ]
    return [
        f"| {name} | {form} | {size:,} | {enc:.1f} | {dec:.1f} |"
        for form, (size, enc, dec) in zip(("JSON arrays (wire)", "base64 float64"), cells, strict=True)
    ]


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
    print("\n| proposal | float series as | bytes | encode µs | decode µs (strict) |\n|---|---|--:|--:|--:|")
    print("\n".join(codec_rows("default day", decode(payload), args.repeat)))  # type: ignore[arg-type]
    print("\n".join(codec_rows("49 partners x 96 intervals", a_large_proposal(), max(1, args.repeat // 20))))


if __name__ == "__main__":
    main()
