"""Forgeries on a plain broker (no TLS, no ACL: the demo's default), on the virtual clock: with every
service signing, a forged round opening under another round id, a forged retained envelope of
±100 MW, a forged coordinator status stamped a day back and a forged grant change nothing. The day
ends exactly as the same day without them, the forgeries are counted as unsigned, and no violation
counter judges a reading against a forged envelope. The table of cases is in docs/reliability.md."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from virtual_helpers import DT_S, S, Tape, day_of

from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import RoundOpen, decode
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, SiteStatus
from p2pdoe.core.signing import edge_identity

pytestmark = pytest.mark.slow
SITE = S.ids[1]
HOURS = 1.5
FORGED_AT = timedelta(minutes=40)


def real_opening(tape: Tape) -> RoundOpen:
    """The latest round opening the broker accepted (its body, as the services believed it)."""
    openings = [decode(p) for t, p in tape.raw if t.endswith("/open") and p]
    opening = openings[-1]
    assert isinstance(opening, RoundOpen)
    return opening


async def forge(day: VirtualDay, tape: Tape) -> None:
    now = day.clock.now()
    opening = real_opening(tape)
    fake_round = f"{opening.round}-forged"
    interval = day.start + timedelta(seconds=DT_S * int((now - day.start).total_seconds() // DT_S))
    async with day.client("forger") as c:
        forged = opening.model_copy(update={"round": fake_round})
        await c.publish(topics.round_open(fake_round), forged.model_dump_json().encode(), retain=True)
        doe = Doe.from_box(SITE, opening.round, interval, DT_S, -100_000.0, 100_000.0)
        await c.publish(topics.site(SITE, "doe"), doe.model_dump_json().encode(), retain=True)
        stale = DsoStatus(state="online", round=None, ts=now - timedelta(hours=24))
        await c.publish(topics.DSO_STATUS, stale.model_dump_json().encode(), retain=True)


def comparable(r: Results) -> dict[str, object]:
    """What the day decided: envelopes, settlements, violations, fallbacks (not wall times or counters)."""
    assert r.realtime is not None
    rt = r.realtime
    return {
        "intervals": [i.model_dump(exclude={"wall_s"}) for i in rt.intervals],
        "settlements": [s.model_dump() for s in rt.settlements],
        "violations": rt.envelope_violations.model_dump(),
        "fallbacks": sorted(f.model_dump_json() for f in rt.fallback_events),  # same instants, any order
        "unsettled": [u.model_dump() for u in rt.unsettled],
        "failed_rounds": rt.failed_rounds,
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Results:
    day, _ = day_of(tmp_path_factory.mktemp("clean"), HOURS)
    return day.run()


def test_forgeries_on_a_plain_broker_change_nothing(tmp_path: Path, clean: Results) -> None:
    day, tape = day_of(tmp_path, HOURS)
    day.at(FORGED_AT, lambda: forge(day, tape))
    results = day.run()

    assert comparable(results) == comparable(clean)
    assert results.realtime is not None
    assert results.realtime.dropped_messages.get("unsigned", 0) >= 2  # the DOE and the status
    # the edges took no part in the forged round, and the stale status sent none to its fixed default
    assert not [t for t, _ in tape.raw if "-forged/proposal/" in t]
    after = [h.msg for h in tape.of(SiteStatus, SITE) if h.at > day.start + FORGED_AT]
    assert after
    assert all(s.envelope != "fixed_default" for s in after), [s.envelope for s in after]
    assert all(day.exits.get(f"edge-{site}") == [-1] for site in S.ids)  # every edge ran on


async def hoard(day: VirtualDay, count: int) -> None:
    """A logged-in site that leaves `count` large retained messages under ever new round ids on its
    own proposal and report topics (signed with its real key: the broker's ACL lets it)."""
    async with day.client("hoarder", edge_identity(SITE)) as c:
        for k in range(count):
            kind = topics.proposal if k % 2 else topics.report
            await c.publish(kind(f"hoard-{k}", SITE), b"x" * 50_000, retain=True)


def test_what_a_site_leaves_retained_on_its_proposal_topics_is_deleted_by_the_next_round(
    tmp_path: Path, clean: Results, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto's ACL cannot forbid retained publishes; the coordinator deletes them instead: the
    next round's opening sweeps the proposal and report topics, every hoarded message is gone from
    the broker, counted and logged with the site's name, and the day is the day without them."""
    day, tape = day_of(tmp_path, HOURS)
    day.at(FORGED_AT, lambda: hoard(day, 20))
    with caplog.at_level(logging.WARNING):
        results = day.run()

    assert not [t for t in day.broker.retained_topics() if "/hoard-" in t]
    assert results.realtime is not None
    assert results.realtime.dropped_messages.get("retained_misuse") == 20
    assert f"deleted a message {SITE} left retained on" in caplog.text
    assert comparable(results) == comparable(clean)
    hoarded = [t for t, p in tape.raw if "/hoard-" in t and p]
    assert len(hoarded) == 20  # they did reach the broker
