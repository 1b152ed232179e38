"""The MQTT topic tree (version 1). Every name a service publishes or subscribes to comes from here.

    p2pdoe/v1/site/<id>/doe            retained  the envelope now in force (`Doe`)
    p2pdoe/v1/site/<id>/doe/default    retained  the fallback envelope (`Doe`, round null)
    p2pdoe/v1/site/<id>/status         retained  online / offline (also the site's last will)
    p2pdoe/v1/site/<id>/register       retained  the site's public facts (`Registration`)
    p2pdoe/v1/site/<id>/telemetry                what the edge measures and does
    p2pdoe/v1/site/<id>/meter                    meter readings (`MeterReading`; real or simulated)
    p2pdoe/v1/site/<id>/setpoints                what the controller asks of the assets (`SetPointMessage`)
    p2pdoe/v1/site/<id>/settlement               each settled interval (`SettlementRecord`)
    p2pdoe/v1/market/<round>/open      retained  `RoundOpen`
    p2pdoe/v1/market/<round>/proposal/<id>       `Proposal` of site <id>
    p2pdoe/v1/market/<round>/grant/<id>          `Grant` to site <id>
    p2pdoe/v1/market/<round>/report/<id>         `SiteReport` of site <id> once the round is over
    p2pdoe/v1/market/<round>/polish/<id>         `PolishReport` of site <id> (the certified polish)
    p2pdoe/v1/market/<round>/prices/<id>         `PolishPrices` to site <id>
    p2pdoe/v1/market/<round>/payments/open   retained  `PaymentOpen` (Nash bargaining's stage 2)
    p2pdoe/v1/market/<round>/payments/proposal/<id>  `PaymentProposal` of site <id>
    p2pdoe/v1/market/<round>/payments/grant          `PaymentGrant`
    p2pdoe/v1/dso/status               retained  online / offline (also the coordinator's last will)
    p2pdoe/v1/dso/progress                       round, iteration, residuals
    p2pdoe/v1/clock/member/<name>      retained  a lockstep member joined or left (`ClockMember`)
    p2pdoe/v1/clock/grant/<phase>      retained  the step of that phase granted now (`ClockGrant`)
    p2pdoe/v1/clock/done/<name>                  a member finished (or still holds) its step (`ClockDone`)
    p2pdoe/v1/clock/status             retained  the lockstep granter's state (`ClockStatus`)

On the DSO's core broker each feeder's tree is under its prefix (Mosquitto bridges from the regional
brokers, `p2pdoe provision --feeder`): `feeder/<feeder>/p2pdoe/v1/...`, and the bridge's own state on
`feeder/<feeder>/bridge/state` (1 connected, 0 not).

Site, round and clock member names never contain '/', '+' or '#' (their schemas forbid it), so every
topic parses back unambiguously.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "p2pdoe/v1"
FEEDERS = "feeder"  # on the core broker: every feeder's tree under feeder/<id>/
FEEDER_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # the same rule as a site's id
SITE_KINDS = (
    "doe", "doe/default", "status", "register", "telemetry", "meter", "setpoints", "settlement", "forecast",
)  # fmt: skip


def feeder_prefix(feeder: str) -> str:
    """What a feeder's topics carry in front on the DSO's core broker."""
    return f"{FEEDERS}/{feeder}/"


def split_feeder(topic: str) -> tuple[str, str] | None:
    """(feeder, the rest) of a topic on the core broker (`feeder/<id>/<rest>`); None for another."""
    head, _, rest = topic.partition("/")
    feeder, _, rest = rest.partition("/")
    if head != FEEDERS or not FEEDER_ID.match(feeder) or not rest:
        return None
    return feeder, rest


def site(site_id: str, kind: str) -> str:
    if kind not in SITE_KINDS:
        raise ValueError(f"no site topic {kind!r}; known: {', '.join(SITE_KINDS)}")
    return f"{ROOT}/site/{site_id}/{kind}"


def round_open(round_id: str) -> str:
    return f"{ROOT}/market/{round_id}/open"


def proposal(round_id: str, site_id: str) -> str:
    return f"{ROOT}/market/{round_id}/proposal/{site_id}"


def grant(round_id: str, site_id: str) -> str:
    """The DSO's grant to one site: its envelope, the residuals, the verdict."""
    return f"{ROOT}/market/{round_id}/grant/{site_id}"


def polish(round_id: str, site_id: str) -> str:
    """A site's reports in a certified polish (its response, corrections, verdicts), for the DSO."""
    return f"{ROOT}/market/{round_id}/polish/{site_id}"


def polish_prices(round_id: str, site_id: str) -> str:
    """The DSO's prices (and verdict) to one site in a certified polish."""
    return f"{ROOT}/market/{round_id}/prices/{site_id}"


def report(round_id: str, site_id: str) -> str:
    return f"{ROOT}/market/{round_id}/report/{site_id}"


def payment_open(round_id: str) -> str:
    return f"{ROOT}/market/{round_id}/payments/open"


def payment_proposal(round_id: str, site_id: str) -> str:
    return f"{ROOT}/market/{round_id}/payments/proposal/{site_id}"


def payment_grant(round_id: str) -> str:
    return f"{ROOT}/market/{round_id}/payments/grant"


PAYMENT_KINDS = ("payments/open", "payments/proposal", "payments/grant")
SITE_MARKET_KINDS = ("proposal", "report", "grant", "polish", "prices")  # market/<round>/<kind>/<site>
DSO_STATUS = f"{ROOT}/dso/status"
DSO_PROGRESS = f"{ROOT}/dso/progress"


CLOCK_GRANT = f"{ROOT}/clock/grant/+"  # filter: every phase's grant
CLOCK_STATUS = f"{ROOT}/clock/status"


def clock_grant(phase: str) -> str:
    """The latest grant of one phase (plant, control, grid): its members hear only theirs."""
    return f"{ROOT}/clock/grant/{phase}"


def clock_member(name: str = "+") -> str:
    """A lockstep member's joined/left message (every member's by default)."""
    return f"{ROOT}/clock/member/{name}"


def clock_done(name: str = "+") -> str:
    """A lockstep member's done and heartbeat messages (every member's by default)."""
    return f"{ROOT}/clock/done/{name}"


def all_proposals(round_id: str = "+") -> str:
    """Filter for every site's proposals of a round (every round by default)."""
    return f"{ROOT}/market/{round_id}/proposal/+"


def all_polish_reports(round_id: str = "+") -> str:
    """Filter for every site's polish reports of a round (every round by default)."""
    return f"{ROOT}/market/{round_id}/polish/+"


def all_payment_proposals(round_id: str = "+") -> str:
    """Filter for every site's payment proposals of a round (every round by default)."""
    return f"{ROOT}/market/{round_id}/payments/proposal/+"


def all_reports(round_id: str = "+") -> str:
    """Filter for every site's report of a round (every round by default)."""
    return f"{ROOT}/market/{round_id}/report/+"


def every_site(kind: str) -> str:
    """Filter for one kind of topic of every site, e.g. every_site("status")."""
    return site("+", kind)


@dataclass(frozen=True)
class Topic:
    """A parsed topic: `area` is "site", "market", "dso" or "clock"; `kind` the last part(s)."""

    area: str
    kind: str
    site: str | None = None
    round: str | None = None
    member: str | None = None  # a lockstep clock member's name


def parse(topic: str) -> Topic | None:
    """The parts of a topic of this tree, or None for anything else."""
    if not topic.startswith(ROOT + "/"):
        return None
    parts = topic[len(ROOT) + 1 :].split("/")
    if parts[0] == "site" and len(parts) >= 3 and "/".join(parts[2:]) in SITE_KINDS:
        return Topic("site", "/".join(parts[2:]), site=parts[1])
    if parts[0] == "market" and len(parts) == 3 and parts[2] == "open":
        return Topic("market", parts[2], round=parts[1])
    if parts[0] == "market" and len(parts) == 4 and parts[2] in SITE_MARKET_KINDS:
        return Topic("market", parts[2], site=parts[3], round=parts[1])
    if (
        parts[0] == "market"
        and len(parts) == 4
        and parts[2:] in (["payments", "open"], ["payments", "grant"])
    ):
        return Topic("market", "/".join(parts[2:]), round=parts[1])
    if parts[0] == "market" and len(parts) == 5 and parts[2:4] == ["payments", "proposal"]:
        return Topic("market", "payments/proposal", site=parts[4], round=parts[1])
    if parts[0] == "dso" and len(parts) == 2 and parts[1] in ("status", "progress"):
        return Topic("dso", parts[1])
    if parts[0] == "clock" and len(parts) == 2 and parts[1] == "status":
        return Topic("clock", parts[1])
    if parts[0] == "clock" and len(parts) == 3 and parts[1] == "grant":
        return Topic("clock", "grant")
    if parts[0] == "clock" and len(parts) == 3 and parts[1] in ("member", "done"):
        return Topic("clock", parts[1], member=parts[2])
    return None
