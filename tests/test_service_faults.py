"""The services as separate processes under faults: a stranger's messages on the protocol topics, an
edge agent killed mid-round and restarted, the coordinator killed, and a site that never starts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from service_helpers import (
    ROUND_TIMEOUT_S,
    Deployment,
    Service,
    plain_client,
    read_retained,
    reference_objective,
    until_message,
    until_retained,
)

from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import Proposal, RoundOpen, decode
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, Progress, SiteStatus, decode_runtime
from p2pdoe.services.broker import Broker

ROUND = "day-ahead"


def _progress(topic: str, payload: bytes) -> Progress | None:
    if topic != topics.DSO_PROGRESS or not payload:
        return None
    msg = decode_runtime(payload)
    return msg if isinstance(msg, Progress) else None


def _site_status(payload: bytes) -> SiteStatus:
    msg = decode_runtime(payload)
    assert isinstance(msg, SiteStatus)
    return msg


def _dso_status(payload: bytes) -> DsoStatus:
    msg = decode_runtime(payload)
    assert isinstance(msg, DsoStatus)
    return msg


def assert_safe(results: Results) -> None:
    """Both corners of every granted box (a site left out: its default's) violate nothing, in the
    linearised model the envelopes were computed on and in the full AC power flow."""
    for name, check in (("ac", results.ac_check), ("lindistflow", results.lindistflow_check)):
        for corner in ("upper_corner", "lower_corner"):
            state = getattr(check, corner)
            assert state.converged, (name, corner)
            assert state.voltage_violations == 0, (name, corner, state.vmin_pu, state.vmax_pu)
            assert state.thermal_violations == 0, (name, corner, state.max_loading_pct)


async def _wait_online(url: str, sites: list[str], timeout_s: float = ROUND_TIMEOUT_S) -> None:
    """Until every site's retained status says online (each agent registers before it says so)."""
    for site in sites:
        await until_retained(
            url,
            topics.site(site, "status"),
            lambda p: True if _site_status(p).state == "online" else None,
            timeout_s,
        )


# -- a stranger on the protocol topics ------------------------------------------------------------


async def _disturbed_round(d: Deployment) -> Results:
    """The round, while an extra client publishes garbage, a message of the wrong schema, a proposal on
    another site's topic, and replays of a real proposal of iteration 0 and of the opening."""
    async with plain_client(d.url) as stranger:
        await stranger.subscribe(topics.all_proposals(), qos=1)
        await stranger.subscribe(topics.round_open("+"), qos=1)
        await stranger.subscribe(topics.DSO_PROGRESS, qos=1)
        edges = d.start_edges()
        coordinator = d.start_coordinator("--registration-timeout-s", "120")

        captured: dict[str, tuple[str, bytes]] = {}

        def capture(topic: str, payload: bytes) -> Progress | None:
            if topic == topics.round_open(ROUND) and payload:
                captured.setdefault("open", (topic, payload))
            elif topics.parse(topic) is not None and "/proposal/" in topic:
                msg = decode(payload)
                if isinstance(msg, Proposal) and msg.iteration == 0:
                    captured.setdefault("proposal", (topic, payload))
            progress = _progress(topic, payload)
            if progress is not None and progress.iteration >= 3 and len(captured) == 2:
                return progress
            return None

        progress = await until_message(stranger, capture, ROUND_TIMEOUT_S)
        assert progress.round == ROUND
        assert progress.status == "running"

        proposal_topic, proposal = captured["proposal"]
        real = decode(proposal)
        assert isinstance(real, Proposal)
        other = next(s for s in d.sites if s != real.sender)
        wrong_schema = SiteStatus(site=other, state="online", envelope="none", ts=datetime.now(UTC))
        open_topic, opening = captured["open"]
        assert isinstance(decode(opening), RoundOpen)

        await stranger.publish(topics.proposal(ROUND, other), b"\x00not json{", qos=1)  # garbage
        for site in d.sites:  # garbage on every agent's grant topic
            await stranger.publish(topics.grant(ROUND, site), b"[1, 2", qos=1)
        await stranger.publish(topics.proposal(ROUND, other), wrong_schema.model_dump_json(), qos=1)
        await stranger.publish(topics.proposal(ROUND, other), proposal, qos=1)  # sender is not `other`
        await stranger.publish(proposal_topic, proposal, qos=1)  # a replay of iteration 0
        await stranger.publish(open_topic, opening, qos=1)  # the opening replayed

        status = await asyncio.to_thread(coordinator.wait, ROUND_TIMEOUT_S)
        assert status == 0, coordinator.output()
    for edge in edges.values():
        assert await asyncio.to_thread(edge.wait, 60) == 0, edge.output()
    return d.results()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_garbage_foreign_and_replayed_messages_are_dropped_and_counted(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    with Deployment(mqtt_broker.url, tmp_path) as d:
        results = asyncio.run(_disturbed_round(d))
    assert results.solver.converged
    assert results.objective_eur == pytest.approx(reference_objective(), rel=1e-3)
    assert results.runtime is not None
    assert [a.status for a in results.runtime.attempts] == ["converged"]
    assert {s.state for s in results.runtime.sites} == {"agreed"}
    dropped = results.runtime.dropped_messages
    ignored = results.solver.ignored_messages or {}
    # The coordinator alone drops the garbage and the wrong schema on the proposal topic; every agent
    # drops the garbage on the grant topic.
    assert dropped.get("malformed", 0) >= 2 + len(d.sites), dropped
    assert dropped.get("sender_not_topic", 0) >= 1, dropped  # a proposal on another site's topic
    # The replayed proposal of iteration 0: stale to the coordinator and to the sender's peers.
    assert ignored.get("stale_iteration", 0) >= 2, ignored
    assert ignored.get("duplicate", 0) >= len(d.sites), ignored  # the opening replayed, to every agent


# -- an edge agent killed mid-round ---------------------------------------------------------------


async def _kill_and_restart(d: Deployment, victim: str, late: bool) -> tuple[Results, SiteStatus, Service]:
    """Kill `victim` at iteration 5 or later; restart it half a second after its last will is seen, or
    (`late`) only once the coordinator has opened the round again without it."""
    async with plain_client(d.url) as watcher:
        await watcher.subscribe(topics.DSO_PROGRESS, qos=1)
        edges = d.start_edges()
        coordinator = d.start_coordinator("--iteration-timeout-s", "2", "--registration-timeout-s", "120")

        def far_enough(topic: str, payload: bytes) -> Progress | None:
            p = _progress(topic, payload)
            return p if p is not None and p.round == ROUND and p.iteration >= 5 else None

        progress = await until_message(watcher, far_enough, ROUND_TIMEOUT_S)
        assert progress.status == "running"
    edges[victim].kill()
    # Its last will: the broker marks it offline (retained) as soon as the connection drops.
    dead = await until_retained(
        d.url,
        topics.site(victim, "status"),
        lambda p: s if (s := _site_status(p)).state == "offline" else None,
        timeout_s=30,
    )
    if late:

        def reopened(topic: str, payload: bytes) -> Progress | None:
            p = _progress(topic, payload)
            return p if p is not None and p.round != ROUND else None

        async with plain_client(d.url) as watcher:
            await watcher.subscribe(topics.DSO_PROGRESS, qos=1)
            again = await until_message(watcher, reopened, ROUND_TIMEOUT_S)
        assert victim in again.excluded_sites
    else:
        await asyncio.sleep(0.5)
    restarted = d.start_edge(victim)
    status = await asyncio.to_thread(coordinator.wait, ROUND_TIMEOUT_S)
    assert status == 0, coordinator.output()
    for site, edge in edges.items():
        if site != victim:
            assert await asyncio.to_thread(edge.wait, 60) == 0, edge.output()
    return d.results(), dead, restarted


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("late", [False, True], ids=["restarted_at_once", "restarted_after_the_reopening"])
def test_an_agent_killed_mid_round_and_restarted(mqtt_broker: Broker, tmp_path: Path, late: bool) -> None:
    with Deployment(mqtt_broker.url, tmp_path) as d:
        victim = d.sites[2]
        results, dead, restarted = asyncio.run(_kill_and_restart(d, victim, late))
        log = restarted.output()
    assert (dead.site, dead.state, dead.envelope) == (victim, "offline", "none")

    assert results.solver.converged
    runtime = results.runtime
    assert runtime is not None
    assert len(runtime.attempts) >= 2
    first, last = runtime.attempts[0], runtime.attempts[-1]
    assert (first.round, first.status) == (ROUND, "deadline_missed")
    assert victim in first.missed_deadline
    assert first.iterations >= 5
    assert last.status == "converged"
    sites = {s.id: s for s in runtime.sites}
    killed = sites[victim]
    if killed.state == "agreed":  # it came back in time for the next opening
        assert victim in last.sites, last
        assert killed.reported, killed
    else:
        assert killed.state == "excluded"
        assert victim not in last.sites, last
        assert "missed the deadline" in (killed.reason or ""), (killed, log)
    for site in last.sites:
        assert sites[site].state == "agreed", sites[site]
        assert sites[site].reported, sites[site]
    assert_safe(results)


# -- the coordinator killed -----------------------------------------------------------------------


async def _kill_the_coordinator(d: Deployment) -> tuple[DsoStatus, DsoStatus]:
    edges = d.start_edges()
    coordinator = d.start_coordinator("--registration-timeout-s", "120", exit_after_round=False)
    for edge in edges.values():  # each agent stops after its round ...
        assert await asyncio.to_thread(edge.wait, ROUND_TIMEOUT_S) == 0, edge.output()
    serving = await until_retained(
        d.url, topics.DSO_STATUS, lambda p: s if (s := _dso_status(p)).round == ROUND else None, 60
    )
    assert coordinator.alive, coordinator.output()  # ... the coordinator serves on (no --exit-after-round)
    coordinator.kill()
    gone = await until_retained(
        d.url, topics.DSO_STATUS, lambda p: s if (s := _dso_status(p)).state == "offline" else None, 30
    )
    return serving, gone


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_coordinators_last_will_marks_it_offline(mqtt_broker: Broker, tmp_path: Path) -> None:
    with Deployment(mqtt_broker.url, tmp_path) as d:
        serving, gone = asyncio.run(_kill_the_coordinator(d))
        assert d.results().solver.converged
    assert serving.state == "online"
    assert (gone.state, gone.round) == ("offline", None)


# -- a site that never starts ---------------------------------------------------------------------


async def _without(d: Deployment, absent: str) -> tuple[Results, dict[str, bytes]]:
    present = [s for s in d.sites if s != absent]
    edges = d.start_edges(present)
    await _wait_online(d.url, present)  # so that only the absent one can miss the short deadline
    coordinator = d.start_coordinator("--registration-timeout-s", "3")
    results = await asyncio.to_thread(d.finish, coordinator, edges.values())
    wanted = [topics.site(absent, "doe"), topics.site(absent, "doe/default")]
    return results, await read_retained(d.url, wanted, wanted, timeout_s=20)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_site_that_never_starts_is_left_on_its_default_envelope(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    with Deployment(mqtt_broker.url, tmp_path) as d:
        absent = d.sites[3]
        results, retained = asyncio.run(_without(d, absent))
    assert results.solver.converged
    runtime = results.runtime
    assert runtime is not None
    present = [s for s in d.sites if s != absent]
    assert [(a.sites, a.status) for a in runtime.attempts] == [(present, "converged")]
    states = {s.id: (s.state, s.reason) for s in runtime.sites}
    assert states[absent][0] == "excluded"
    assert "registration deadline" in (states[absent][1] or ""), states[absent]
    assert all(states[s] == ("agreed", None) for s in present), states
    assert absent not in {c.id for c in results.communities}
    assert_safe(results)

    default = next(e for e in runtime.default_envelopes if e.id == absent)
    assert default.lo_profile_kw is not None
    assert default.up_profile_kw is not None
    for kind in ("doe", "doe/default"):
        doe = decode_runtime(retained[topics.site(absent, kind)])
        assert isinstance(doe, Doe)
        assert (doe.site, doe.round) == (absent, None)
        t = round((doe.start - datetime.fromisoformat(results.start)).total_seconds() / 3600 / results.dt_h)
        steps = doe.steps_kw or [(doe.lo_kw, doe.up_kw)]  # the day's profile, or one interval's box
        boxes = list(zip(default.lo_profile_kw, default.up_profile_kw, strict=True))[t : t + len(steps)]
        assert len(boxes) == len(steps)
        assert all(a == pytest.approx(b) for a, b in zip(steps, boxes, strict=True))
