"""Faults at a site on the virtual clock (p2pdoe.cli.virtual_day): a meter that dies, a reading stamped
a day ahead, a disk that refuses the journal's writes. Each ends with every service running, nothing
lost that the edge recorded, and the fault visible on the site's status (alarms and fault counts) and
in its log. The table of cases is in docs/reliability.md."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from virtual_helpers import DT_S, S, Tape, day_of

from edge_agent.journal import Journal
from p2pdoe.cli.demo import Processes, _without_results
from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import RoundOpen
from p2pdoe.core.schemas.results import RealtimeInfo
from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage, SettlementRecord, SiteStatus
from p2pdoe.core.signing import edge_identity, unframe

pytestmark = pytest.mark.slow
SITE = S.ids[1]
HOURS = 2.0
FAULT_AT = timedelta(minutes=50)


def statuses(tape: Tape, site: str) -> list[SiteStatus]:
    return [h.msg for h in tape.of(SiteStatus, site) if h.msg.state == "online"]


def alive(day: VirtualDay, name: str) -> bool:
    """Ran to the day's end: cancelled by the harness (-1), never ended by itself."""
    return day.exits.get(name) == [-1]


def settled(tape: Tape, site: str) -> set[str]:
    return {h.msg.interval_start.isoformat() for h in tape.of(SettlementRecord, site)}


def intervals(day: VirtualDay, n: int) -> set[str]:
    return {(day.start + timedelta(seconds=DT_S * t)).isoformat() for t in range(n)}


def test_a_dead_meter_raises_an_alarm_and_the_site_runs_on_its_schedule(tmp_path: Path) -> None:
    day, tape = day_of(tmp_path, HOURS)
    day.at(FAULT_AT, lambda: day.kill(f"meter-{SITE}"))
    results = day.run()

    seen = statuses(tape, SITE)
    raised = [s for s in seen if "meter_silent" in s.alarms]
    assert raised, [s.alarms for s in seen]
    assert raised[0].ts - (day.start + FAULT_AT) <= timedelta(seconds=120 + 30 + 10)
    assert raised[-1].faults["meter_silent"] == 1
    # driven blind on its schedule: set-points keep coming after the meter died
    later = [h for h in tape.of(SetPointMessage, SITE) if h.at > day.start + FAULT_AT + timedelta(minutes=3)]
    assert len(later) >= 10
    assert alive(day, f"edge-{SITE}")
    assert day.exits["dso"] == [0]
    assert results.realtime is not None
    others = [x for x in results.realtime.settlements if x.site != SITE]
    assert len(others) == (len(S.ids) - 1) * int(HOURS * 3600 / DT_S)
    # every interval the dead meter left unsettled is listed, with its cause
    n = int(HOURS * 3600 / DT_S)
    unsettled = {u.interval_start: u.cause for u in results.realtime.unsettled}
    assert {u.site for u in results.realtime.unsettled} == {SITE}
    assert set(results.realtime.missing_settlements[SITE]) == set(unsettled)
    died = int(FAULT_AT.total_seconds() // DT_S)
    assert len(unsettled) == n - died
    assert all("meter_silent" in cause for cause in unsettled.values()), unsettled
    assert sum("no meter readings" in cause for cause in unsettled.values()) == n - died - 1


async def _forge_a_reading_a_day_ahead(day: VirtualDay) -> None:
    reading = MeterReading(site=SITE, ts=day.clock.now() + timedelta(days=1), p_kw=0.0)
    async with day.client("meter-with-a-bad-clock", edge_identity(SITE)) as c:
        await c.publish(topics.site(SITE, "meter"), reading.model_dump_json().encode(), qos=0)


def test_a_reading_stamped_a_day_ahead_is_rejected_and_blinds_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    day, tape = day_of(tmp_path, HOURS)
    day.at(FAULT_AT, lambda: _forge_a_reading_a_day_ahead(day))
    with caplog.at_level(logging.ERROR, logger="edge_agent"):
        results = day.run()

    assert any(
        "reading_rejected" in r.getMessage() and "ahead of the clock" in r.getMessage()
        for r in caplog.records
    )
    seen = statuses(tape, SITE)
    # raised, and cleared by the next good reading at the same instant (the latest status wins)
    assert seen[-1].faults.get("reading_rejected") == 1
    assert "reading_rejected" not in seen[-1].alarms
    rt = results.realtime
    assert rt is not None
    n = int(HOURS * 3600 / DT_S)
    assert rt.missing_settlements == {}
    assert len([x for x in rt.settlements if x.site == SITE]) == n
    assert rt.envelope_violations.count == 0, rt.envelope_violations.events


def _read_only(j: Journal) -> None:
    """Every write refused ("attempt to write a readonly database"), as on a disk remounted read-only;
    a full disk's SQLITE_FULL takes the same path (tests/test_journal.py fills one)."""
    j._db.execute("PRAGMA query_only = ON")


def _writable(j: Journal) -> None:
    j._db.execute("PRAGMA query_only = OFF")


def test_a_disk_that_refuses_writes_keeps_the_site_under_control_and_loses_no_settlement(
    tmp_path: Path,
) -> None:
    day, tape = day_of(tmp_path, HOURS)
    day.at(FAULT_AT, lambda: _read_only(day.journals[SITE]))
    day.at(FAULT_AT + timedelta(minutes=40), lambda: _writable(day.journals[SITE]))
    results = day.run()

    seen = statuses(tape, SITE)
    raised = [i for i, s in enumerate(seen) if "journal_unwritable" in s.alarms]
    assert raised, [s.alarms for s in seen]
    assert "journal_unwritable" not in seen[-1].alarms  # cleared once the disk took the writes
    assert seen[-1].faults["journal_unwritable"] == 1
    n = int(HOURS * 3600 / DT_S)
    assert settled(tape, SITE) == intervals(day, n)  # every settlement reached the broker
    rt = results.realtime
    assert rt is not None
    assert rt.missing_settlements == {}
    assert rt.envelope_violations.count == 0, rt.envelope_violations.events
    assert alive(day, f"edge-{SITE}")
    journal = Journal(day.journal(SITE), SITE)
    assert {s.interval_start.isoformat() for s in journal.settlements()} == intervals(day, n)


@pytest.mark.parametrize("killed", [5, 6])
def test_the_coordinator_goes_on_when_all_but_one_or_every_edge_dies(tmp_path: Path, killed: int) -> None:
    """Five of six edge agents killed mid-day crashed the coordinator ("at least 2 items"), and none
    left an IndexError: it goes on, every site on the envelopes that stand, and ends its day."""
    day, _ = day_of(tmp_path, HOURS)
    for site in S.ids[:killed]:
        day.at(FAULT_AT + timedelta(seconds=7), lambda site=site: day.kill(f"edge-{site}"))
    results = day.run()
    assert day.exits["dso"] == [0]
    rt = results.realtime
    assert rt is not None
    failed = rt.failed_rounds
    assert failed, "the rounds after the deaths cannot agree"
    assert all("at least 2 needed" in f or "no proposal" in f for f in failed), failed


def test_a_second_edge_agent_for_one_site_is_detected_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second gateway started with the same site's configuration: each agent hears the other's live
    status and raises duplicate_process, naming both runs (before: 48 takeovers in 25 s, the site
    excluded, and no log line naming the clash)."""
    day, tape = day_of(tmp_path, 1.5)
    day.at(FAULT_AT, lambda: day.start_edge(SITE, name=f"edge-{SITE}-twin"))
    with caplog.at_level(logging.ERROR, logger="edge_agent"):
        day.run()
    by_instance = {s.instance: s for s in statuses(tape, SITE)}  # the last status of each run
    assert set(by_instance) == {f"{SITE}.1", f"{SITE}.2"}
    assert all("duplicate_process" in s.alarms for s in by_instance.values()), by_instance
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"another edge agent for {SITE} runs (instance {SITE}.2; this one: {SITE}.1)" in logged
    assert f"another edge agent for {SITE} runs (instance {SITE}.1; this one: {SITE}.2)" in logged


def _killed_and_restarted(
    tmp_path: Path, hours: float, round_id: str, when: timedelta
) -> tuple[VirtualDay, list[tuple[str, str | None]]]:
    """A day whose coordinator is killed as soon as it has opened `round_id` (before the round can
    finish) and started again 2 s later from its checkpoint; the openings seen, as (round, epoch)."""
    checkpoint = tmp_path / "state" / "checkpoint.json"
    day, tape = day_of(tmp_path, hours, dso_options={"checkpoint": checkpoint})
    opened: list[tuple[str, str | None]] = []
    target = asyncio.Event()

    def watch(topic: str, payload: bytes) -> None:
        if not (topic.endswith("/open") and payload):
            return
        msg = RoundOpen.model_validate_json(payload)
        opened.append((msg.round, msg.epoch))
        if msg.round == round_id and msg.epoch == "dso.1":
            target.set()

    async def kill_then_restart() -> None:
        await target.wait()  # woken as the opening goes out, before the round can finish
        day.kill("dso")
        await asyncio.sleep(2.0)
        day.start_coordinator()

    tape.then = watch
    day.at(when, kill_then_restart)
    return day, opened


def _joined_again(caplog: pytest.LogCaptureFixture, day: VirtualDay) -> None:
    """Every edge left the dead run's round for the new one, and no opening is left retained."""
    logged = [r.getMessage() for r in caplog.records]
    assert sum("opened again by a restarted coordinator" in m for m in logged) == len(S.ids), logged
    for topic in day.broker.retained_topics():
        assert not topic.endswith("/open"), topic


def test_a_coordinator_restarted_mid_round_opens_a_round_the_edges_join(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed as soon as it has opened a rolling round, and started again 2 s later from its
    checkpoint: it opens the same round id under a new epoch, every edge leaves the dead run's round
    for it, and the opening the dead run left retained is deleted. Before: the edges ignored the new
    opening as a repeat, and no agreement was reached until every edge restarted."""
    day, opened = _killed_and_restarted(tmp_path, HOURS, "day-ahead-rt004", timedelta(0))
    with caplog.at_level(logging.INFO):
        day.run_until_end()

    assert {e for _, e in opened} == {"dso.1", "dso.2"}
    after = [r for r, e in opened if e == "dso.2"]
    assert after[0].endswith("-rt004"), opened  # the same round id, opened again
    _joined_again(caplog, day)
    rt = RealtimeInfo.model_validate_json((tmp_path / "realtime.json").read_bytes())
    assert rt.failed_rounds == []
    assert rt.intervals[0].interval == 4
    assert rt.intervals[0].status == "converged", rt.intervals


def test_a_coordinator_restarted_during_the_day_ahead_round_agrees_it_with_every_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same before the day: killed as soon as it has opened the day-ahead round. The restarted
    coordinator opens the day-ahead round again under its new epoch, every site joins it and agrees,
    and the day runs on it."""
    day, opened = _killed_and_restarted(tmp_path, 1.0, "day-ahead", -timedelta(seconds=DT_S))
    with caplog.at_level(logging.INFO):
        results = day.run()

    assert opened[:2] == [("day-ahead", "dso.1"), ("day-ahead", "dso.2")], opened
    _joined_again(caplog, day)
    assert results.runtime is not None
    assert [s.state for s in results.runtime.sites] == ["agreed"] * len(S.ids)
    assert results.realtime is not None
    assert results.realtime.failed_rounds == []
    assert results.realtime.envelope_violations.count == 0


@pytest.mark.parametrize("n_sites", [0, 1])
def test_a_day_ahead_round_with_fewer_than_two_sites_leaves_the_defaults_and_runs_the_day(
    tmp_path: Path, n_sites: int
) -> None:
    """No trade without two: the coordinator says why, the defaults stand, the rolling rounds go on
    (each failing with its reason), and the day ends with its real-time results (realtime.json, as
    after a restart mid-day: there is no day-ahead agreement to report)."""
    day, tape = day_of(tmp_path, 1.0, sites=S.ids[:n_sites])
    day.run_until_end()

    assert day.exits["dso"] == [0]
    rt = RealtimeInfo.model_validate_json((tmp_path / "realtime.json").read_bytes())
    assert rt.failed_rounds[0] == f"day-ahead: {n_sites} site(s) registered and online, at least 2 needed"
    assert all("at least 2 needed" in f for f in rt.failed_rounds[1:])
    assert rt.envelope_violations.count == 0
    said = _without_results(tmp_path, Processes(tmp_path / "logs"))  # what `p2pdoe demo` says then
    assert said.startswith(f"no day-ahead agreement (day-ahead: {n_sites} site(s) registered")
    assert "the real-time day ran on the default envelopes" in said
    for site in S.ids[:n_sites]:
        envelopes = tape.dynamic(site)
        assert envelopes
        assert all(h.msg.round is None for h in envelopes)  # its default, interval by interval
        assert alive(day, f"edge-{site}")


def test_a_final_grant_lost_on_its_way_is_sent_again_at_the_reports_deadline(tmp_path: Path) -> None:
    """The round's last grant to a site that is not the first (before aedee98 only the first site's
    was sent again) never arrives: at the reports' deadline the coordinator sends every site its
    final grant again, the site reports, and the day runs with every site agreed and reported."""
    day, tape = day_of(tmp_path, 1.0)
    victim = S.ids[-1]
    lost: list[int] = []

    def final_grant_to_victim(topic: str, payload: bytes) -> bool:
        if lost or topics.parse(topic) is None:
            return False
        body = json.loads(unframe(payload)[1])
        final = body.get("kind") == "grant" and body.get("status") != "running"
        if final and body.get("recipient") == victim:
            lost.append(body["iteration"])
            return True
        return False

    day.broker.lose = final_grant_to_victim
    results = day.run()

    assert day.broker.lost == 1
    grants = [
        json.loads(payload)
        for topic, payload in tape.raw
        if b'"kind":"grant"' in payload and json.loads(payload)["recipient"] == victim
    ]
    finals = [g for g in grants if g["iteration"] == lost[0]]
    assert len(finals) == 2, [g["iteration"] for g in grants[-3:]]  # the lost one, and again
    assert results.runtime is not None
    sites = {s.id: s for s in results.runtime.sites}
    assert sites[victim].state == "agreed"
    assert all(s.reported for s in sites.values()), {s.id: s.reported for s in sites.values()}
