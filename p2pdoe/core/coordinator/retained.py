"""Retained messages where they have no purpose: a site's proposals (of trades and of payments),
polish reports and reports.

Mosquitto's ACL cannot forbid the retain flag (`topic read|write|readwrite|deny` only), and a round id
is any string, so a logged-in site could leave retained messages under ever new round ids on its own
proposal and report topics and fill the broker's memory. The coordinator clears them: every round it
opens subscribes to those topics again (`sweep`), which makes the broker send what it holds there,
marked retained (live messages never are); its transport deletes each one before anything reads it
(`p2pdoe.services.retained_sweep`), counts it and logs the site. So nothing a site leaves there
outlives the next round.
"""

from __future__ import annotations

from p2pdoe.core import topics
from p2pdoe.core.effects import Subscribe

REASON = "retained_misuse"


def sweep() -> list[Subscribe]:
    """Subscribe again to the topics nothing should be retained on (with a round's opening)."""
    return [
        Subscribe(topics.all_proposals(), 1),
        Subscribe(topics.all_reports(), 1),
        Subscribe(topics.all_polish_reports(), 1),
        Subscribe(topics.all_payment_proposals(), 1),
    ]


def misused(topic: str, retained: bool, payload: bytes) -> str | None:
    """The site that left a message retained on its proposal or report topic, or None."""
    if not (retained and payload):
        return None
    parsed = topics.parse(topic)
    if (
        parsed is None
        or parsed.area != "market"
        or parsed.kind not in ("proposal", "report", "polish", "payments/proposal")
    ):
        return None
    return parsed.site or "?"
