"""How large a round's messages are: the opening, the largest proposal and the first grant of a
day-ahead round (96 quarter-hours), per scenario, against the broker's cap (`MAX_PACKET_BYTES`).
The sizes follow from the numbers in the messages, so they are the same on every machine.

    .venv/bin/python benchmarks/message_sizes.py [default synthetic-200-peers4 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from p2pdoe.core.agreement.protocol import Publish, Received  # noqa: E402
from p2pdoe.core.agreement.setup import participants  # noqa: E402
from p2pdoe.core.schemas.messages import Grant, Proposal, RoundOpen, encode  # noqa: E402
from p2pdoe.core.schemas.wire import MAX_PACKET_BYTES  # noqa: E402
from p2pdoe.core.solution import Policy  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402

QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}


def sizes(name: str) -> tuple[int, int, int, int]:
    """Sites, and the bytes of the opening, the largest first proposal and the first grant."""
    s = load_scenario(name, QUARTER_HOURS)
    p = participants(s, Policy.DYNAMIC, "day-ahead")
    opening = next(c.message for c in p.dso.open_round() if isinstance(c, Publish))
    assert isinstance(opening, RoundOpen)
    proposals = [
        c.message
        for community in p.communities
        for c in community.handle(Received(opening))
        if isinstance(c, Publish) and isinstance(c.message, Proposal)
    ]
    grants = [
        c.message
        for m in proposals
        for c in p.dso.handle(Received(m))
        if isinstance(c, Publish) and isinstance(c.message, Grant)
    ]
    return len(s.ids), len(encode(opening)), max(len(encode(m)) for m in proposals), len(encode(grants[-1]))


def main(names: list[str]) -> None:
    print(f"Broker cap `MAX_PACKET_BYTES`: {MAX_PACKET_BYTES:,} bytes.\n")
    print("| scenario | sites | opening (bytes) | largest proposal | grant | grant / cap |")
    print("|---|--:|--:|--:|--:|--:|")
    for name in names:
        n, opening, proposal, grant = sizes(name)
        print(
            f"| {name} | {n} | {opening:,} | {proposal:,} | {grant:,} | {grant / MAX_PACKET_BYTES:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["default", "synthetic-50-peers4", "synthetic-200-peers4"])
