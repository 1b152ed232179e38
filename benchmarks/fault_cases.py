"""The fault cases of docs/reliability.md on the virtual clock (p2pdoe.cli.virtual_day): each injects
one fault into a two-hour day of the default scenario (96 x 15 min, a reading every 30 s) and prints
a Markdown table row: sustained violations, settlements missing (and their causes), the alarms the
sites raised, the services that ended by themselves, and the rounds that failed. The outcome is the
same on every run and any machine (the virtual clock).

Run from the repository root: `.venv/bin/python benchmarks/fault_cases.py`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from p2pdoe.cli.virtual_day import VirtualDay  # noqa: E402
from p2pdoe.core import topics  # noqa: E402
from p2pdoe.core.schemas.messages import RoundOpen, decode  # noqa: E402
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, MeterReading, SiteStatus  # noqa: E402
from p2pdoe.core.signing import edge_identity  # noqa: E402
from p2pdoe.io.scenarios import load_scenario  # noqa: E402

QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}
S = load_scenario("default", QUARTER_HOURS)
SITE = S.ids[1]
AT = timedelta(minutes=50)
HOURS = 2.0


async def forge_future_reading(day: VirtualDay) -> None:
    reading = MeterReading(site=SITE, ts=day.clock.now() + timedelta(days=1), p_kw=0.0)
    async with day.client("meter-with-a-bad-clock", edge_identity(SITE)) as c:
        await c.publish(topics.site(SITE, "meter"), reading.model_dump_json().encode(), qos=0)


OPENINGS: list[bytes] = []  # the round openings the broker accepted in this run (their bodies)


async def forge_on_a_plain_broker(day: VirtualDay) -> None:
    """A forged round opening under another id, a forged ±100 MW envelope, a coordinator status
    stamped a day back: none signed."""
    opening = decode(OPENINGS[-1])
    assert isinstance(opening, RoundOpen)
    now, fake = day.clock.now(), f"{opening.round}-forged"
    doe = Doe.from_box(SITE, opening.round, now, 900, -100_000.0, 100_000.0)
    stale = DsoStatus(state="online", round=None, ts=now - timedelta(hours=24))
    async with day.client("forger") as c:
        forged = opening.model_copy(update={"round": fake}).model_dump_json().encode()
        await c.publish(topics.round_open(fake), forged, retain=True)
        await c.publish(topics.site(SITE, "doe"), doe.model_dump_json().encode(), retain=True)
        await c.publish(topics.DSO_STATUS, stale.model_dump_json().encode(), retain=True)


async def hoard_retained(day: VirtualDay) -> None:
    """The site leaves 20 retained messages of 50 kB under new round ids on its own proposal and
    report topics, signed with its own key (the ACL lets it; the coordinator deletes them)."""
    async with day.client("hoarder", edge_identity(SITE)) as c:
        for k in range(20):
            kind = topics.proposal if k % 2 else topics.report
            await c.publish(kind(f"hoard-{k}", SITE), b"x" * 50_000, retain=True)


def refuse_writes(day: VirtualDay, refuse: bool) -> None:
    day.journals[SITE]._db.execute(f"PRAGMA query_only = {'ON' if refuse else 'OFF'}")


def kill_edges(day: VirtualDay, n: int) -> None:
    for site in S.ids[:n]:
        day.kill(f"edge-{site}")


def read_only_journal(day: VirtualDay) -> None:
    day.at(AT, lambda: refuse_writes(day, True))
    day.at(AT + timedelta(minutes=40), lambda: refuse_writes(day, False))


CASES: dict[str, Callable[[VirtualDay], None]] = {
    "none": lambda day: None,
    f"meter of {SITE} killed at 00:50": lambda day: day.at(AT, lambda: day.kill(f"meter-{SITE}")),
    f"a reading of {SITE} stamped a day ahead at 00:50": lambda day: day.at(
        AT, lambda: forge_future_reading(day)
    ),
    f"the journal of {SITE} refuses writes 00:50-01:30": read_only_journal,
    f"a second edge agent for {SITE} started at 00:50": lambda day: day.at(
        AT, lambda: day.start_edge(SITE, name=f"edge-{SITE}-twin")
    ),
    "five of six edge agents killed at 00:50": lambda day: day.at(AT, lambda: kill_edges(day, 5)),
    "every edge agent killed at 00:50": lambda day: day.at(AT, lambda: kill_edges(day, 6)),
    "a forged round opening, a ±100 MW envelope and a day-old coordinator status at 00:50": lambda day: (
        day.at(AT, lambda: forge_on_a_plain_broker(day))
    ),
    f"{SITE} leaves 20 retained messages of 50 kB on its proposal and report topics at 00:50": lambda day: (
        day.at(AT, lambda: hoard_retained(day))
    ),
}


def run(name: str, inject: Callable[[VirtualDay], None]) -> str:
    alarms: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()

    def record(topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse(topic)
        if payload and parsed is not None and parsed.kind == "open":
            OPENINGS.append(payload)
        if payload and parsed is not None and parsed.area == "site" and parsed.kind == "status":
            msg = SiteStatus.model_validate_json(payload)
            for a in [*msg.alarms, *msg.faults]:  # an alarm raised and cleared at once is only counted
                if (msg.site, a) not in seen:
                    seen.add((msg.site, a))
                    alarms[a] += 1

    with tempfile.TemporaryDirectory() as root:
        day = VirtualDay(S, Path(root), hours=HOURS, record=record)
        inject(day)
        results = day.run()
    rt = results.realtime
    assert rt is not None
    ended = sorted(n for n, exits in day.exits.items() if exits != [-1] and n != "dso")
    causes = Counter(u.cause for u in rt.unsettled)
    return " | ".join([
        name,
        f"exit {day.exits['dso'][0]}",
        ", ".join(ended) or "none",
        str(rt.envelope_violations.count),
        f"{len(rt.unsettled)} of {len(S.ids) * int(HOURS * 4)}",
        "; ".join(f"{k} ({v})" for k, v in causes.items()) or "-",
        ", ".join(f"{a} ({v} site{'' if v == 1 else 's'})" for a, v in sorted(alarms.items())) or "none",
        str(len(rt.failed_rounds)),
        ", ".join(f"{k} ({v})" for k, v in sorted(rt.dropped_messages.items())) or "none",
    ])  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)
    print(
        "| fault | coordinator | services that ended by themselves | sustained violations "
        "| settlements missing | causes | alarms raised | rolling rounds failed "
        "| messages the coordinator dropped |"
    )
    print("|---|---|---|--:|--:|---|---|--:|---|")
    for name, inject in CASES.items():
        print(f"| {run(name, inject)} |", flush=True)


if __name__ == "__main__":
    main()
