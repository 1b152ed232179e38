"""`p2pdoe monitor`: the state model on hand-built messages, then the command over a real broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.cli.monitor import MARKET_ROUNDS_KEPT, MonitorState, render, without_credentials
from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import Message
from p2pdoe.core.schemas.runtime import Doe, DsoStatus, Progress, Registration, SiteStatus, Telemetry
from p2pdoe.services.broker import Broker, free_port
from p2pdoe.services.transport import Backoff, MqttTransport

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
SOON = T0 + timedelta(seconds=10)


def raw(message: Message) -> bytes:
    return message.model_dump_json().encode()


def doe(site: str = "c1", round_id: str | None = "r1", lo: float = -3.0, up: float = 2.0) -> Doe:
    return Doe.from_box(site, round_id, T0, 900, lo, up)


def status(site: str = "c1", state: str = "online", envelope: str = "dynamic") -> SiteStatus:
    return SiteStatus(site=site, state=state, envelope=envelope, ts=T0)  # type: ignore[arg-type]


def registration(site: str = "c1", bus: int = 7) -> Registration:
    return Registration(
        site=site,
        bus=bus,
        peers=[],
        technical_min_kw=[-5.0],
        technical_max_kw=[5.0],
        reactive_min_kvar=[-1.0],
        reactive_max_kvar=[1.0],
    )


def telemetry(site: str = "c1", p_kw: float = 1.5, ts: datetime = T0) -> Telemetry:
    return Telemetry(
        site=site,
        ts=ts,
        source="schedule",
        p_kw=p_kw,
        envelope="dynamic",
        lo_kw=-3.0,
        up_kw=2.0,
        inside=True,
        round="r1",
    )


def dso_status(state: str = "online", round_id: str | None = "r1") -> DsoStatus:
    return DsoStatus(state=state, round=round_id, ts=T0)  # type: ignore[arg-type]


def progress(iteration: int = 7, **prices: float) -> Progress:
    return Progress(
        **prices,  # type: ignore[arg-type]
        round="r1",
        iteration=iteration,
        status="running",
        primal_trade_kw=0.5,
        dual_trade_kw=0.1,
        primal_envelope_kw=0.01,
        dual_envelope_kw=0.02,
        eps_trade_kw=0.2,
        eps_envelope_kw=0.05,
        sites=["c1", "c2"],
        excluded_sites=["c3"],
        missing_sites=["c2"],
    )


def site_topic(kind: str, site: str = "c1") -> str:
    return topics.site(site, kind)


def state_with(*messages: tuple[str, Message]) -> MonitorState:
    state = MonitorState()
    for topic, message in messages:
        state.apply(topic, raw(message), T0)
    return state


# -- the state model ---------------------------------------------------------------------------------


def test_every_kind_of_message_lands_in_the_view() -> None:
    state = state_with(
        (site_topic("status"), status(envelope="default")),
        (site_topic("register"), registration(bus=12)),
        (site_topic("doe"), doe(lo=-4.0, up=2.5)),
        (site_topic("doe/default"), doe(round_id=None, lo=-1.0, up=1.0)),
        (site_topic("telemetry"), telemetry(p_kw=1.25)),
        (topics.DSO_STATUS, dso_status(round_id="r9")),
        (topics.DSO_PROGRESS, progress(iteration=4)),
    )
    snap = state.snapshot(SOON)
    site = snap["sites"]["c1"]
    assert site["bus"] == 12
    assert site["status"] == {
        "state": "online",
        "envelope": "default",
        "ts": "2025-06-01T12:00:00Z",
        "reason": None,
        "alarm": None,
        "reading_age_s": None,
        "envelope_lead_s": None,
        "alarms": [],
        "faults": {},
        "instance": None,
    }
    assert (site["doe"]["lo_kw"], site["doe"]["up_kw"], site["doe"]["round"]) == (-4.0, 2.5, "r1")
    assert (site["doe"]["opModImpLimW"], site["doe"]["opModExpLimW"]) == (4000.0, 2500.0)
    assert site["doe"]["validity"] == "in_force"
    assert site["doe"]["end"] == "2025-06-01T12:15:00Z"
    assert (site["default"]["lo_kw"], site["default"]["round"]) == (-1.0, None)
    assert site["telemetry"]["p_kw"] == 1.25
    assert site["telemetry"]["age_s"] == 10.0
    coordinator = snap["coordinator"]
    assert coordinator["status"]["round"] == "r9"
    assert coordinator["progress"]["iteration"] == 4
    assert coordinator["progress"]["missing_sites"] == ["c2"]
    assert coordinator["progress"]["within_eps"] == {"trade": False, "envelope": True}
    assert snap["dropped"] == {}
    assert snap["last_message_at"] == "2025-06-01T12:00:00Z"
    json.dumps(snap)  # serialisable as it is


def test_the_latest_message_wins() -> None:
    state = state_with((site_topic("doe"), doe(up=2.0)), (site_topic("doe"), doe(up=3.0)))
    assert state.snapshot(SOON)["sites"]["c1"]["doe"]["up_kw"] == 3.0


def test_an_envelope_past_its_validity_shows_as_expired() -> None:
    state = state_with((site_topic("doe"), doe()), (site_topic("doe/default"), doe(round_id=None)))
    after = T0 + timedelta(seconds=900)  # the end is excluded
    before = T0 - timedelta(seconds=1)
    assert state.snapshot(after)["sites"]["c1"]["doe"]["validity"] == "expired"
    assert state.snapshot(after)["sites"]["c1"]["default"]["validity"] == "expired"
    assert state.snapshot(before)["sites"]["c1"]["doe"]["validity"] == "pending"
    assert state.snapshot(after - timedelta(microseconds=1))["sites"]["c1"]["doe"]["validity"] == "in_force"


def _nan_doe() -> bytes:
    return raw(doe()).replace(b'"lo_kw":-3.0', b'"lo_kw":NaN')


def _repeated_key() -> bytes:
    return raw(doe()).replace(b'"up_kw":2.0', b'"up_kw":2.0,"up_kw":50.0')


MALFORMED = [
    pytest.param(site_topic("doe"), b"not json", "not_json", id="garbage"),
    pytest.param(site_topic("doe"), b"\xff\xfe", "not_json", id="not-utf8"),
    pytest.param(site_topic("doe"), b'{"kind": "doe", "site": "c1"}', "schema", id="wrong-schema"),
    pytest.param(site_topic("doe"), b"[]", "schema", id="not-an-object"),
    pytest.param(site_topic("doe"), _nan_doe(), "not_finite", id="nan"),
    pytest.param(site_topic("doe"), _repeated_key(), "repeated_key", id="repeated-key"),
    pytest.param(site_topic("doe"), raw(doe(site="c2")), "site_mismatch", id="doe-of-another-site"),
    pytest.param(site_topic("status"), raw(status(site="c2")), "site_mismatch", id="status-of-another-site"),
    pytest.param(site_topic("doe"), raw(progress()), "wrong_kind", id="progress-on-doe"),
    pytest.param(topics.DSO_PROGRESS, raw(dso_status()), "wrong_kind", id="status-on-progress"),
    pytest.param(site_topic("telemetry"), b"", "empty", id="empty-telemetry"),
    pytest.param(f"{topics.ROOT}/site/c1/nonsense", raw(doe()), "unknown_topic", id="unknown-topic"),
]


@pytest.mark.parametrize(("topic", "payload", "reason"), MALFORMED)
def test_a_malformed_message_is_counted_and_dropped(topic: str, payload: bytes, reason: str) -> None:
    state = state_with(
        (site_topic("doe"), doe()),
        (site_topic("status"), status()),
        (topics.DSO_PROGRESS, progress(iteration=3)),
    )
    before = state.snapshot(SOON)
    state.apply(topic, payload, SOON)
    assert state.dropped == {reason: 1}
    assert state.snapshot(SOON) == {
        **before,
        "dropped": {reason: 1},
        "last_message_at": "2025-06-01T12:00:10Z",
    }


@pytest.mark.parametrize(("moved", "settled"), [(3e-5, False), (1e-5, True)])
def test_the_price_move_is_a_third_test_beside_the_residuals(moved: float, settled: bool) -> None:
    p = progress(price_change_max_eur_per_kwh=moved, eps_price_eur_per_kwh=1e-5)
    state = state_with((topics.DSO_PROGRESS, p))
    within = state.snapshot(SOON)["coordinator"]["progress"]["within_eps"]
    assert within == {"trade": False, "envelope": True, "prices": settled}
    assert f"prices moved {moved:.3g}" in _rendered(state, SOON)


def test_an_iteration_that_froze_a_site_says_so_and_cannot_be_the_last() -> None:
    p = progress().model_copy(update={"frozen_sites": ["c2"]})
    state = state_with((topics.DSO_PROGRESS, p))
    within = state.snapshot(SOON)["coordinator"]["progress"]["within_eps"]
    assert within == {"trade": False, "envelope": True, "every_site_new": False}
    assert "frozen: c2" in _rendered(state, SOON)


def test_an_empty_retained_payload_clears_that_entry() -> None:
    state = state_with(
        (site_topic("doe"), doe()),
        (site_topic("status"), status()),
        (topics.DSO_STATUS, dso_status()),
        (topics.DSO_PROGRESS, progress()),
    )
    state.apply(site_topic("doe"), b"", SOON)
    assert state.snapshot(SOON)["sites"]["c1"]["doe"] is None
    assert state.snapshot(SOON)["sites"]["c1"]["status"] is not None
    state.apply(site_topic("status"), b"", SOON)
    assert "c1" not in state.snapshot(SOON)["sites"]  # nothing left of the site
    state.apply(topics.DSO_STATUS, b"", SOON)
    assert state.snapshot(SOON)["coordinator"]["status"] is None
    assert state.snapshot(SOON)["coordinator"]["progress"] is not None
    assert state.dropped == {}


def test_market_messages_are_counted_per_round_and_never_decoded() -> None:
    state = MonitorState()
    state.apply(topics.round_open("r1"), b"{}", T0)
    state.apply(topics.proposal("r1", "c1"), b"not even json", T0)
    state.apply(topics.grant("r2", "c1"), b"", T0)
    assert state.market_messages == {"r1": 2, "r2": 1}
    assert state.dropped == {}
    assert state.sites == {}
    for k in range(3, 3 + MARKET_ROUNDS_KEPT):
        state.apply(topics.grant(f"r{k}", "c1"), b"", T0)
    assert len(state.market_messages) == MARKET_ROUNDS_KEPT
    assert "r1" not in state.market_messages


def test_the_meter_topic_is_ignored() -> None:
    state = state_with((site_topic("meter"), status()))
    assert state.sites == {}
    assert state.dropped == {}


def _rendered(state: MonitorState, now: datetime, broker: str = "mqtt://127.0.0.1:1883") -> str:
    from rich.console import Console

    console = Console(width=220, record=True, color_system=None)
    console.print(render(state, now, broker))
    return console.export_text()


def test_the_table_shows_sites_envelopes_and_the_round() -> None:
    state = state_with(
        (site_topic("status", "c1"), status("c1")),
        (site_topic("register", "c1"), registration("c1", bus=12)),
        (site_topic("doe", "c1"), doe("c1", lo=-4.0, up=2.5)),
        (site_topic("status", "c2"), status("c2", state="offline", envelope="fixed_default")),
        (site_topic("doe/default", "c2"), doe("c2", round_id=None, lo=-1.0, up=0.5)),
        (site_topic("telemetry", "c1"), telemetry("c1", p_kw=1.25)),
        (topics.DSO_STATUS, dso_status()),
        (topics.DSO_PROGRESS, progress(iteration=4)),
    )
    state.apply(site_topic("doe", "c1"), b"garbage", T0)
    text = _rendered(state, SOON)
    c1 = next(line for line in text.splitlines() if " c1 " in line)
    assert "12" in c1
    assert "online" in c1
    assert "-4.00…2.50" in c1
    assert "4.00/2.50" in c1
    assert "12:15Z" in c1
    assert "1.25" in c1
    assert "10.0s" in c1
    c2 = next(line for line in text.splitlines() if " c2 " in line)
    assert "offline" in c2
    assert "fixed_default" in c2
    assert "-1.00…0.50" in c2
    assert "coordinator online" in text
    assert "iteration 4" in text
    assert "excluded: c3" in text
    assert "missing: c2" in text
    assert "not_json 1" in text
    assert "last message 10.0s ago" in text
    later = _rendered(state, T0 + timedelta(hours=1))
    assert "expired" in later
    assert "expired" not in text


def test_the_broker_is_shown_without_credentials() -> None:
    assert without_credentials("mqtt://alice:s3cret@broker:1883") == "mqtt://broker:1883"
    assert without_credentials("mqtt://broker") == "mqtt://broker"
    assert "s3cret" not in _rendered(MonitorState(), T0, "mqtt://alice:s3cret@broker:1883")


def test_building_the_parser_does_not_import_rich_or_the_transport() -> None:
    code = (
        "import sys; import p2pdoe.cli.main as m; m.build_parser(); "
        "print(sorted(n for n in ('rich', 'aiomqtt', 'p2pdoe.services.transport') if n in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]"


# -- the command over a real broker --------------------------------------------------------------------


RETAINED: list[tuple[str, Message]] = [
    (site_topic("status", "c1"), status("c1")),
    (site_topic("register", "c1"), registration("c1", bus=12)),
    (site_topic("doe", "c1"), doe("c1", lo=-4.0, up=2.5)),
    (site_topic("doe/default", "c1"), doe("c1", round_id=None, lo=-1.0, up=1.0)),
    (site_topic("status", "c2"), status("c2", envelope="default")),
    (site_topic("register", "c2"), registration("c2", bus=20)),
    (site_topic("doe", "c2"), doe("c2", lo=-6.0, up=0.5)),
    (site_topic("doe/default", "c2"), doe("c2", round_id=None, lo=-2.0, up=0.0)),
    (topics.DSO_STATUS, dso_status(round_id="r1")),
]


async def _monitor_while_progressing(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    """Publish the retained state, then run the monitor while the coordinator reports progress
    (not retained: the monitor sees it only while subscribed)."""
    async with MqttTransport(broker.url, "test-publisher", backoff=Backoff(max_attempts=20)) as t:
        for topic, message in RETAINED:
            await t.publish(topic, raw(message), retain=True)
        monitor = asyncio.create_task(asyncio.to_thread(run_p2pdoe, "monitor", "--broker", broker.url, *args))
        while not monitor.done():
            await t.publish(topics.DSO_PROGRESS, raw(progress(iteration=5)))
            await asyncio.sleep(0.1)
        return await monitor


def test_once_json_shows_both_sites_and_the_round(mqtt_broker: Broker) -> None:
    proc = asyncio.run(
        asyncio.wait_for(_monitor_while_progressing(mqtt_broker, "--once", "--json", "--settle", "1.5"), 45)
    )
    assert proc.returncode == 0, proc.stderr
    snap: dict[str, Any] = json.loads(proc.stdout)
    sites = snap["sites"]
    assert set(sites) == {"c1", "c2"}
    assert (sites["c1"]["doe"]["lo_kw"], sites["c1"]["doe"]["up_kw"]) == (-4.0, 2.5)
    assert (sites["c2"]["doe"]["lo_kw"], sites["c2"]["doe"]["up_kw"]) == (-6.0, 0.5)
    assert (sites["c1"]["default"]["lo_kw"], sites["c2"]["default"]["lo_kw"]) == (-1.0, -2.0)
    assert (sites["c1"]["bus"], sites["c2"]["bus"]) == (12, 20)
    assert sites["c2"]["status"]["envelope"] == "default"
    assert sites["c1"]["doe"]["validity"] == "expired"  # T0 is long past
    assert snap["coordinator"]["status"]["round"] == "r1"
    assert snap["coordinator"]["progress"]["iteration"] == 5
    assert snap["dropped"] == {}


def test_live_mode_runs_for_its_duration_and_draws_the_sites(mqtt_broker: Broker) -> None:
    proc = asyncio.run(asyncio.wait_for(_monitor_while_progressing(mqtt_broker, "--duration", "1.5"), 45))
    assert proc.returncode == 0, proc.stderr
    assert " c1 " in proc.stdout
    assert " c2 " in proc.stdout
    assert "iteration 5" in proc.stdout


def test_an_unreachable_broker_is_one_line_and_exit_2() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_p2pdoe("monitor", "--broker", url, "--once", "--connect-timeout", "1", timeout=30)
    assert_one_line_error(proc, "cannot reach the broker", url)


def test_the_coordinator_line_shows_the_day_in_force_and_the_next_days_round() -> None:
    from datetime import date

    from p2pdoe.cli.monitor import CoordinatorView, coordinator_line

    running = dso_status(round_id="day-ahead-2026-06-21-rt013").model_copy(
        update={"day": date(2026, 6, 21), "next_round": "day-ahead-2026-06-22", "next_phase": "agreeing"}
    )
    line = coordinator_line(CoordinatorView(status=running))
    assert "round day-ahead-2026-06-21-rt013" in line
    assert "day 2026-06-21" in line
    assert "next day: day-ahead-2026-06-22 (agreeing)" in line
    assert "next day" not in coordinator_line(CoordinatorView(status=dso_status()))
