"""Prometheus metrics (p2pdoe.services.metrics): read from the messages a service sends and hears,
served over real HTTP and read back with prometheus-client's own parser; then every service of a
day-ahead round as processes over the broker, each scraped by a plain HTTP client. The names are
the catalogue's, documented in docs/metrics.md, and the Grafana dashboard uses only those."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import ROUND_TIMEOUT_S, Deployment

from p2pdoe import __version__
from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import MeterReading, Progress, SettlementRecord, SiteStatus, Telemetry
from p2pdoe.services.broker import Broker, free_port
from p2pdoe.services.metrics import CATALOGUE, NAMES, ObservedTransport, ServiceMetrics, metrics_served
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

ROOT = Path(__file__).resolve().parents[1]
TS = datetime(2026, 6, 21, 10, 0, tzinfo=UTC)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample `/metrics` serves, by name and labels (a plain HTTP client)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def progress(iteration: int, status: str = "running") -> bytes:
    msg = Progress(
        round="day-ahead", iteration=iteration, status=status,  # type: ignore[arg-type]
        primal_trade_kw=0.5, dual_trade_kw=0.25, primal_envelope_kw=0.125, dual_envelope_kw=0.0625,
        eps_trade_kw=0.01, eps_envelope_kw=0.01, price_change_max_eur_per_kwh=1e-4,
        sites=["a", "b", "c"], excluded_sites=["d"], missing_sites=[], frozen_sites=["c"],
    )  # fmt: skip
    return msg.model_dump_json().encode()


def telemetry(p_kw: float, inside: bool, ts: datetime = TS) -> bytes:
    msg = Telemetry(
        site="a", ts=ts, source="meter", p_kw=p_kw, envelope="dynamic", lo_kw=-5.0, up_kw=3.0,
        inside=inside, round="day-ahead", excess_kw=0.0 if inside else p_kw - 3.0,
    )  # fmt: skip
    return msg.model_dump_json().encode()


def status(alarms: list[str], faults: dict[str, int]) -> bytes:
    msg = SiteStatus(
        site="a",
        state="online",
        envelope="default",
        ts=TS,
        alarms=alarms,
        faults=faults,  # type: ignore[arg-type]
    )
    return msg.model_dump_json().encode()


def settlement() -> bytes:
    msg = SettlementRecord(
        site="a", interval_start=TS, duration_s=900, round="day-ahead", measured_kwh=1.0,
        scheduled_kwh=1.25, deviation_kwh=-0.25, p2p_paid_eur=0.1, p2p_received_eur=0.0, grid_kwh=0.5,
        grid_eur=0.05, net_eur=0.15, readings=30, covered_s=900.0, envelope="dynamic", lo_kw=-5.0, up_kw=3.0,
    )  # fmt: skip
    return msg.model_dump_json().encode()


def served(metrics: ServiceMetrics) -> Samples:
    async def main() -> Samples:
        async with metrics_served(metrics, "127.0.0.1", 0) as port:
            return await asyncio.to_thread(scrape, port)

    return asyncio.run(main())


def test_a_coordinators_messages_become_its_round_metrics() -> None:
    m = ServiceMetrics("dso")
    for k in range(3):
        m.sent(topics.DSO_PROGRESS, progress(k))
        m.sent(topics.grant("day-ahead", "a"), b"{}")  # counted by its topic, never decoded
    m.sent(topics.DSO_PROGRESS, progress(3, "converged"))
    m.received(topics.site("a", "settlement"), settlement())
    m.received(topics.site("a", "settlement"), settlement())  # sent again (an outbox): counted once
    m.received(topics.site("b", "settlement"), settlement())  # a's on b's topic: dropped, not counted
    m.received(topics.site("a", "status"), status([], {}))
    m.received("somebody/else", b"x")
    dropped: Counter[str] = Counter(malformed=2)
    m.watch_dropped(dropped)
    m.watch_dropped(Counter(malformed=1, unsigned=1))  # the next day's reader: summed
    m.sample()
    s = served(m)
    assert value(s, "p2pdoe_round_iterations") == 4  # grants 0..3
    assert value(s, "p2pdoe_round_residual_kw", residual="dual_envelope") == 0.0625
    assert value(s, "p2pdoe_round_sites", state="excluded") == 1
    assert value(s, "p2pdoe_round_sites", state="frozen") == 1
    assert value(s, "p2pdoe_rounds_total", status="converged") == 1
    assert value(s, "p2pdoe_messages_sent_total", topic="market/grant") == 3
    assert value(s, "p2pdoe_messages_sent_total", topic="dso/progress") == 4
    assert value(s, "p2pdoe_messages_received_total", topic="other") == 1
    assert value(s, "p2pdoe_settlements_received_total", site="a") == 1
    assert ("p2pdoe_settlements_received_total", frozenset({("site", "b")})) not in s
    assert value(s, "p2pdoe_site_online", site="a") == 1
    assert value(s, "p2pdoe_messages_dropped_total", reason="malformed") == 3
    assert value(s, "p2pdoe_service_info", service="dso", version=__version__) == 1
    dropped["unsigned"] += 1  # sampled again on the loop: the counters' latest, summed
    m.sample()
    assert value(served(m), "p2pdoe_messages_dropped_total", reason="unsigned") == 2


def test_an_edges_messages_become_its_site_metrics() -> None:
    m = ServiceMetrics("edge-a")
    later = TS + timedelta(minutes=1)
    m.sent(topics.site("a", "telemetry"), telemetry(2.0, inside=True))
    m.sent(topics.site("a", "telemetry"), telemetry(3.5, inside=False, ts=later))
    m.sent(topics.site("a", "telemetry"), telemetry(3.5, inside=False, ts=later))  # the outbox again
    m.sent(topics.site("a", "telemetry"), telemetry(2.0, inside=True))  # an old one, forwarded late
    m.sent(topics.site("a", "status"), status(["meter_silent"], {"meter_silent": 2}))
    m.sent(topics.site("a", "settlement"), settlement())
    m.sent(topics.site("a", "settlement"), settlement())  # not acknowledged, sent again
    m.sent(topics.site("a", "telemetry"), b"not json")  # counted as sent, not read
    reading = MeterReading(site="a", ts=TS, p_kw=-1.5, soc_kwh=4.0).model_dump_json().encode()
    m.received(topics.site("a", "meter"), reading)
    s = served(m)
    assert value(s, "p2pdoe_site_power_kw") == 3.5
    assert value(s, "p2pdoe_envelope_kw", bound="up") == 3.0
    assert value(s, "p2pdoe_envelope_inside") == 0
    assert value(s, "p2pdoe_envelope_excess_kw") == 0.5
    assert value(s, "p2pdoe_envelope_violations_total") == 1
    assert value(s, "p2pdoe_envelope_in_force", source="default") == 1
    assert value(s, "p2pdoe_envelope_in_force", source="dynamic") == 0
    assert value(s, "p2pdoe_site_alarm", alarm="meter_silent") == 1
    assert value(s, "p2pdoe_site_faults_total", fault="meter_silent") == 2
    assert value(s, "p2pdoe_settlements_total") == 1
    assert value(s, "p2pdoe_settlement_net_eur") == 0.15
    assert value(s, "p2pdoe_meter_power_kw") == -1.5
    assert value(s, "p2pdoe_meter_readings_total") == 1
    assert value(s, "p2pdoe_messages_sent_total", topic="site/telemetry") == 5
    m.sent(topics.site("a", "status"), status([], {"meter_silent": 2}))
    s = served(m)
    assert value(s, "p2pdoe_site_alarm", alarm="meter_silent") == 0  # lowered, not forgotten
    # a service serves only what it has: no round of the coordinator's on an edge's page
    assert not any(name.startswith(("p2pdoe_round_", "p2pdoe_dso_")) for name, _ in s), sorted(s)


def test_a_metric_that_fails_never_stops_the_message(caplog: pytest.LogCaptureFixture) -> None:
    m = ServiceMetrics("dso")

    def broken(msg: object, sent: bool) -> None:
        raise RuntimeError("a bug in a handler")

    m.observe = broken  # type: ignore[method-assign]
    broker = MemoryBroker()

    async def main() -> list[bytes]:
        async with MemoryTransport(broker, "dso") as dso, MemoryTransport(broker, "watcher") as watcher:
            await watcher.subscribe(topics.DSO_PROGRESS)
            observed = ObservedTransport(dso, m)
            await observed.publish(topics.DSO_PROGRESS, progress(0))
            await observed.publish(topics.DSO_PROGRESS, progress(1))
            got: list[bytes] = []
            async for message in watcher.messages():
                got.append(message.payload)
                if len(got) == 2:
                    return got
        return []

    assert asyncio.run(main()) == [progress(0), progress(1)]  # both delivered all the same
    assert m.failures == 2
    assert len([r for r in caplog.records if "could not be read into the metrics" in r.message]) == 1
    assert value(served(m), "p2pdoe_metrics_failures_total") == 2


def test_the_observed_transport_reads_what_passes_both_ways() -> None:
    broker = MemoryBroker()
    m = ServiceMetrics("dso")

    async def main() -> Samples:
        async with MemoryTransport(broker, "dso") as dso, MemoryTransport(broker, "edge-a") as edge:
            observed = ObservedTransport(dso, m)
            await observed.subscribe(topics.site("+", "settlement"))
            await edge.publish(topics.site("a", "settlement"), settlement())
            async for message in observed.messages():
                assert message.payload == settlement()
                break
            await observed.publish(topics.DSO_PROGRESS, progress(5, "converged"))
            observed.count_into(Counter(unsigned=4))
            async with metrics_served(m, "127.0.0.1", 0) as port:  # sampled as it starts
                connected = await asyncio.to_thread(scrape, port)
        return connected

    connected = asyncio.run(main())
    assert value(connected, "p2pdoe_settlements_received_total", site="a") == 1
    assert value(connected, "p2pdoe_rounds_total", status="converged") == 1
    assert value(connected, "p2pdoe_messages_dropped_total", reason="unsigned") == 4
    assert value(connected, "p2pdoe_broker_connected") == 1
    assert value(served(m), "p2pdoe_broker_connected") == 0  # closed since


def test_a_service_scraped_before_its_first_sampling_round_shows_its_connection() -> None:
    """As the services wire it: the server first, the observed transport after; a scrape at once
    (a round over before the loop samples again, as in a fast CI run) sees the connection."""
    from p2pdoe.services.runner import observed

    broker = MemoryBroker()
    port = free_port()

    async def main() -> Samples:
        async with MemoryTransport(broker, "dso") as dso, observed(dso, "dso", "127.0.0.1", port) as seen:
            seen.count_into(Counter(unsigned=2))
            return await asyncio.to_thread(scrape, port)

    samples = asyncio.run(main())
    assert value(samples, "p2pdoe_broker_connected") == 1
    assert value(samples, "p2pdoe_messages_dropped_total", reason="unsigned") == 2


def test_prometheus_own_linter_passes_the_exposition() -> None:
    """`promtool check metrics` (Prometheus's own tool) on everything a busy service serves: names,
    units, help, counters' suffixes. Skipped without promtool, unless P2PDOE_REQUIRE_PROMTOOL=1 (CI)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("P2PDOE_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool not on PATH (apt install prometheus) and P2PDOE_REQUIRE_PROMTOOL=1")
        pytest.skip("promtool not on PATH (apt install prometheus)")
    m = ServiceMetrics("dso")
    for k in range(3):
        m.sent(topics.DSO_PROGRESS, progress(k))
    m.sent(topics.DSO_PROGRESS, progress(3, "converged"))
    m.sent(topics.site("a", "telemetry"), telemetry(3.5, inside=False))
    m.sent(topics.site("a", "status"), status(["meter_silent"], {"meter_silent": 2}))
    m.received(topics.site("a", "settlement"), settlement())
    m.watch_dropped(Counter(malformed=2))
    m.sample()
    exposition = generate_latest(m.registry)
    assert b"p2pdoe_site_faults_total" in exposition
    check = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_a_port_in_use_is_one_clear_error() -> None:
    from p2pdoe.services.settings import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            async with metrics_served(ServiceMetrics("dso"), "127.0.0.1", port):
                pass

        with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen"):
            asyncio.run(main())


def test_the_catalogue_is_documented_and_the_dashboard_uses_only_its_names() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(p2pdoe_[a-z_]+)`", doc, flags=re.MULTILINE))
    assert documented == NAMES
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "p2pdoe.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"p2pdoe_[a-z_]+", e)}
    assert used
    assert used <= NAMES, used - NAMES
    rated = {n for e in exprs for n in re.findall(r"(?:rate|increase)\((p2pdoe_[a-z_]+)", e)}
    assert rated
    assert all(n.endswith(("_total", "_bucket")) for n in rated), rated  # never a gauge's rate
    assert {m.name for m in CATALOGUE if m.name.endswith("_total")} == {
        m.name for m in CATALOGUE if m.kind == "counter"
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_service_of_a_round_serves_its_metrics(mqtt_broker: Broker, tmp_path: Path) -> None:
    with Deployment(mqtt_broker.url, tmp_path) as d:
        ports = {name: free_port() for name in ["dso", *d.sites]}
        d.start_coordinator(
            "--registration-timeout-s", "120", "--metrics-port", str(ports["dso"]), exit_after_round=False
        )
        for site in d.sites:
            d.start_edge(site, "--metrics-port", str(ports[site]), rounds=0)
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while not d.results_path.exists():
            assert time.monotonic() < deadline, "no results.json"
            time.sleep(0.5)
        results = d.results()
        dso = scrape(ports["dso"])
        edges = {site: scrape(ports[site]) for site in d.sites}
    iterations = results.solver.iterations
    assert value(dso, "p2pdoe_rounds_total", status="converged") == 1
    assert value(dso, "p2pdoe_round_iterations") == iterations
    assert value(dso, "p2pdoe_messages_sent_total", topic="market/grant") >= iterations * len(d.sites)
    assert value(dso, "p2pdoe_messages_received_total", topic="market/proposal") >= iterations * len(d.sites)
    assert value(dso, "p2pdoe_broker_connected") == 1
    for site, samples in edges.items():
        assert value(samples, "p2pdoe_round_iterations") == iterations, site
        assert value(samples, "p2pdoe_round_cpu_seconds", part="total") > 0, site
        assert value(dso, "p2pdoe_site_round_cpu_seconds", site=site, part="total") == value(
            samples, "p2pdoe_round_cpu_seconds", part="total"
        )
        assert value(samples, "p2pdoe_messages_sent_total", topic="market/proposal") >= iterations, site
        assert value(samples, "p2pdoe_broker_connected") == 1, site
