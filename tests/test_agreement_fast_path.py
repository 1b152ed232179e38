"""`may_solve` / `may_step` let a service keep light messages on its event loop: they must never say
"no" to a message whose handling solves, publishes or finishes."""

from __future__ import annotations

from collections import deque

from p2pdoe.core.agreement.protocol import Command, Finished, Publish, Received
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.schemas.messages import DSO_ID, Proposal, decode, encode
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario


def test_light_messages_never_publish_and_heavy_ones_do() -> None:
    s = load_scenario("synthetic-4-peers2")
    p = participants(s, Policy.DYNAMIC, "r")
    by_site = {c.site: c for c in p.communities}
    bus: deque[bytes] = deque(encode(c.message) for c in p.dso.open_round() if isinstance(c, Publish))
    light = heavy = 0
    while bus:
        message = decode(bus.popleft())
        targets = [  # a grant to every site: one to another site is light too
            c.site for c in p.communities if not isinstance(message, Proposal) or message.sender in c.peer_ids
        ]
        if isinstance(message, Proposal):
            targets.append(DSO_ID)
        for name in targets:
            if name == DSO_ID:
                assert isinstance(message, Proposal)
                predicted = p.dso.may_step(message)
                commands: list[Command] = p.dso.handle(Received(message))
            else:
                predicted = by_site[name].may_solve(message)
                commands = by_site[name].handle(Received(message))
            acted = any(isinstance(c, Publish | Finished) for c in commands)
            assert acted == predicted
            light += not predicted
            heavy += predicted
            bus.extend(encode(c.message) for c in commands if isinstance(c, Publish))
    assert light > heavy > 0  # most messages are light
