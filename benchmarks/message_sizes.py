"""How large a round's messages are: the opening, the largest proposal, the largest of the first
grants (one to each site) and all first grants together, of a day-ahead round (96 quarter-hours), per
scenario, the largest against the broker's cap (`MAX_PACKET_BYTES`). The sizes follow from the numbers in the
messages, so they are the same on every machine.

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


def sizes(name: str) -> tuple[int, int, int, int, int]:
    """Sites, and the bytes of the opening, the largest first proposal, the largest first grant and
    the first grants together."""
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
    granted = [len(encode(g)) for g in grants]
    return (
        len(s.ids),
        len(encode(opening)),
        max(len(encode(m)) for m in proposals),
        max(granted),
        sum(granted),
    )


def main(names: list[str]) -> None:
    print(f"Broker cap `MAX_PACKET_BYTES`: {MAX_PACKET_BYTES:,} bytes.\n")
    columns = ("opening (bytes)", "largest proposal", "largest grant", "grants in all", "largest / cap")
    print("| scenario | sites | " + " | ".join(columns) + " |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name in names:
        n, opening, proposal, grant, grants = sizes(name)
        largest = max(opening, proposal, grant) / MAX_PACKET_BYTES
        print(
            f"| {name} | {n} | {opening:,} | {proposal:,} | {grant:,} | {grants:,} | {largest:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["default", "synthetic-50-peers4", "synthetic-200-peers4"])
