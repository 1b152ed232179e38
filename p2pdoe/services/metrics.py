"""Prometheus metrics of a service (`--metrics-port`), read from the messages it sends and hears.

A service's state is on its MQTT topics already: the coordinator's progress and status, a site's
telemetry, status, settlements and round reports, a meter's readings. `ObservedTransport` reads those
messages as they pass through the service's transport and sets the metrics from them, so no machine
is touched and a metric says what the wire said. What no message carries (the broker connection,
the messages dropped, the journal's backlog) is sampled on the event loop every few seconds (state
that lives on the loop is never read from the HTTP server's thread). `metrics_served` exposes them
for Prometheus with prometheus-client's own server. Every name, its type, unit and labels:
`CATALOGUE`, and docs/metrics.md. An iteration's own messages (proposals, grants) are counted by
their topic, never decoded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter as CounterOf
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from p2pdoe import __version__
from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import (
    DsoStatus,
    MeterReading,
    Progress,
    Runtime,
    SettlementRecord,
    SiteReport,
    SiteStatus,
    Telemetry,
    decode_runtime,
)
from p2pdoe.services.settings import ConfigError
from p2pdoe.services.transport_api import InboundMessage, Transport
from p2pdoe.services.transport_layer import TransportLayer

log = logging.getLogger(__name__)
SAMPLE_S = 5.0  # how often what no message carries is sampled
MAX_SITES = 1000  # sites a service names in labels; messages of more are not counted per site
MAX_SETTLED = 10_000  # settled intervals remembered to count each once (weeks of a site's)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...] = ()


CATALOGUE = (
    # every service
    Metric("p2pdoe_service_info", "gauge", "1, by service and version", ("service", "version")),
    Metric("p2pdoe_broker_connected", "gauge", "1 while connected to the broker, else 0"),
    Metric("p2pdoe_broker_connections_total", "counter", "connections made to the broker (reconnects too)"),
    Metric("p2pdoe_messages_sent_total", "counter", "messages published, by topic kind", ("topic",)),
    Metric("p2pdoe_messages_received_total", "counter", "messages heard, by topic kind", ("topic",)),
    Metric("p2pdoe_messages_dropped_total", "counter", "messages dropped unread, by reason", ("reason",)),
    Metric("p2pdoe_metrics_failures_total", "counter", "messages the metrics could not read (a bug)"),
    # the coordinator's rounds (its progress and status)
    Metric("p2pdoe_round_iterations", "gauge", "iterations of the latest round so far"),
    Metric("p2pdoe_round_residual_kw", "gauge", "the latest iteration's residuals, kW", ("residual",)),
    Metric("p2pdoe_round_price_change_eur_per_kwh", "gauge", "the most a price moved lately"),
    Metric("p2pdoe_round_sites", "gauge", "sites of the latest round, by state", ("state",)),
    Metric("p2pdoe_rounds_total", "counter", "rounds ended, by status", ("status",)),
    Metric("p2pdoe_dso_phase", "gauge", "1 for the coordinator's phase now, 0 for the others", ("phase",)),
    Metric("p2pdoe_failed_rounds", "gauge", "rolling rounds failed today"),
    # the coordinator's view of each site
    Metric("p2pdoe_site_online", "gauge", "1 while the site's agent says it is online", ("site",)),
    Metric("p2pdoe_site_round_cpu_seconds", "gauge", "a site's CPU in its last round", ("site", "part")),
    Metric("p2pdoe_site_round_step_seconds", "gauge", "a site's step in its last round", ("site", "stat")),
    Metric("p2pdoe_settlements_received_total", "counter", "settlements received", ("site",)),
    # an edge agent's own site
    Metric("p2pdoe_site_power_kw", "gauge", "net injection, export positive, kW (its telemetry)"),
    Metric("p2pdoe_envelope_kw", "gauge", "the envelope applied, kW, export positive", ("bound",)),
    Metric("p2pdoe_envelope_in_force", "gauge", "1 for the kind of envelope applied now", ("source",)),
    Metric("p2pdoe_envelope_inside", "gauge", "1 if the injection is inside the envelope, else 0"),
    Metric("p2pdoe_envelope_excess_kw", "gauge", "the measured injection's excess over the envelope, kW"),
    Metric("p2pdoe_envelope_violations_total", "counter", "meter telemetry outside the envelope"),
    Metric("p2pdoe_site_alarm", "gauge", "1 while the alarm is raised", ("alarm",)),
    Metric("p2pdoe_site_faults_total", "counter", "faults since the agent started, by kind", ("fault",)),
    Metric("p2pdoe_settlements_total", "counter", "intervals settled"),
    Metric("p2pdoe_settlement_net_eur", "gauge", "the last settled interval's net cost, EUR"),
    Metric("p2pdoe_settlement_deviation_kwh", "gauge", "the last settled interval's deviation, kWh"),
    Metric("p2pdoe_round_cpu_seconds", "gauge", "the agent's CPU in its last round, by part", ("part",)),
    Metric("p2pdoe_round_step_seconds", "gauge", "the agent's step time in its last round", ("stat",)),
    Metric("p2pdoe_journal_backlog", "gauge", "messages journaled and not yet delivered to the broker"),
    Metric("p2pdoe_journal_deferred", "gauge", "journal writes waiting for the disk"),
    # meter readings (the meter simulator's own, or those an edge agent hears)
    Metric("p2pdoe_meter_power_kw", "gauge", "the latest reading's net injection, export positive, kW"),
    Metric("p2pdoe_meter_soc_kwh", "gauge", "the latest reading's battery state of charge, kWh"),
    Metric("p2pdoe_meter_readings_total", "counter", "meter readings"),
)
NAMES = frozenset(m.name for m in CATALOGUE)
BY_NAME = {m.name: m for m in CATALOGUE}
_SAMPLED = (
    "p2pdoe_broker_connections_total",
    "p2pdoe_messages_dropped_total",
    "p2pdoe_metrics_failures_total",
    "p2pdoe_site_faults_total",
)
RESIDUALS = ("primal_trade", "dual_trade", "primal_envelope", "dual_envelope")
SOURCES = ("dynamic", "default", "fixed_default", "none")


def _strip(name: str) -> str:
    """prometheus-client adds `_total` to a counter's name itself."""
    return name.removesuffix("_total")


class _Sampled(Collector):
    """Counters whose values are set whole (sampled on the loop, or cumulative in a message)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _SAMPLED}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for metric in CATALOGUE:
            values = dict(self.values.get(metric.name, {}))
            if values:  # a service serves only what it has
                family = CounterMetricFamily(_strip(metric.name), metric.help, labels=metric.labels)
                for labels, value in values.items():
                    family.add_metric(list(labels), value)
                yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())


def _made(metric: Metric, registry: CollectorRegistry) -> Counter | Gauge:
    name = _strip(metric.name)
    kind = Counter if metric.kind == "counter" else Gauge
    return kind(name, metric.help, metric.labels, registry=registry)


class ServiceMetrics:
    """One service's metrics, in a registry of their own."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._sampled = _Sampled()
        self.registry.register(self._sampled)
        self.m: dict[str, Counter | Gauge] = {}  # made at first use: a service serves what it has
        self.gauge("p2pdoe_service_info", service, __version__).set(1)
        self._samplers: list[Callable[[], None]] = []
        self.seen: dict[str, set[str]] = {"phase": set(), "alarm": set()}  # label values set so far
        self.failures = 0  # messages that could not be read into the metrics (a bug: logged once)
        self._dropped: list[Mapping[str, int]] = []  # every reader's counts (one per day's machine)
        self._failing: set[int] = set()  # samplers that failed (each logged once)
        self.latest: dict[str, datetime] = {}  # the newest telemetry and settlement seen
        self.settled: OrderedDict[tuple[str, datetime], None] = OrderedDict()  # counted once each
        self.sites: set[str] = set()  # the sites named in labels (at most MAX_SITES)

    def _metric(self, name: str) -> Counter | Gauge:
        made = self.m.get(name)
        if made is None:
            made = self.m[name] = _made(BY_NAME[name], self.registry)
        return made

    def gauge(self, name: str, *labels: str) -> Gauge:
        metric = self._metric(name)
        assert isinstance(metric, Gauge)
        return metric.labels(*labels) if labels else metric

    def counter(self, name: str, *labels: str) -> Counter:
        metric = self._metric(name)
        assert isinstance(metric, Counter)
        return metric.labels(*labels) if labels else metric

    def set_counter(self, name: str, values: Mapping[tuple[str, ...], float]) -> None:
        self._sampled.values[name] = dict(values)

    # -- sampled on the loop --------------------------------------------------------------------------

    def watch_transport(self, transport: Transport) -> None:
        def sample() -> None:
            self.gauge("p2pdoe_broker_connected").set(1.0 if getattr(transport, "connected", False) else 0.0)
            connections = getattr(transport, "connections", None)
            if isinstance(connections, int):
                self.set_counter("p2pdoe_broker_connections_total", {(): float(connections)})

        self._add_sampler(sample)

    def watch_dropped(self, dropped: Mapping[str, int]) -> None:
        """`dropped`: a reader's counts of messages dropped by reason; every reader given (one per
        day's machine) is summed, so the counter never goes down."""
        self._dropped.append(dropped)
        if len(self._dropped) == 1:
            self._add_sampler(self._sample_dropped)
        else:
            self._sample_dropped()  # a reader added later is in the next scrape too

    def _sample_dropped(self) -> None:
        total: dict[tuple[str, ...], float] = {}
        for counts in self._dropped:
            for reason, n in dict(counts).items():
                total[(reason,)] = total.get((reason,), 0.0) + n
        self.set_counter("p2pdoe_messages_dropped_total", total)

    def watch(self, name: str, read: Callable[[], float]) -> None:
        """A gauge read on the loop every `SAMPLE_S` (a journal's backlog); NaN while it cannot be."""

        def sample() -> None:
            try:
                value = read()
            except Exception:
                self.gauge(name).set(float("nan"))
                raise
            self.gauge(name).set(value)

        self._add_sampler(sample)

    def _add_sampler(self, sample: Callable[[], None]) -> None:
        """`sample` taken now (a scrape before the next round of sampling sees it) and from now on."""
        self._samplers.append(sample)
        self._sample_one(len(self._samplers) - 1)

    def sample(self) -> None:
        for k in range(len(self._samplers)):
            self._sample_one(k)

    def _sample_one(self, k: int) -> None:
        try:
            self._samplers[k]()
        except Exception:  # a metric must never stop a service; said once per sampler
            if k not in self._failing:
                self._failing.add(k)
                log.exception("a metric could not be sampled (said once)")

    async def sampling(self, every_s: float = SAMPLE_S) -> None:
        """Sample every `every_s` (after the first, which `metrics_served` takes at once)."""
        while True:
            await asyncio.sleep(every_s)
            self.sample()

    # -- from the messages ----------------------------------------------------------------------------

    def sent(self, topic: str, payload: bytes) -> None:
        self._safely("p2pdoe_messages_sent_total", topic, payload)

    def received(self, topic: str, payload: bytes) -> None:
        self._safely("p2pdoe_messages_received_total", topic, payload)

    def _safely(self, counter: str, topic: str, payload: bytes) -> None:
        """A metric never stops a message: a failure is logged once and counted."""
        try:
            self._seen(counter, topic, payload)
        except Exception:
            self.failures += 1
            self.set_counter("p2pdoe_metrics_failures_total", {(): float(self.failures)})
            if self.failures == 1:
                log.exception("a message on %s could not be read into the metrics (said once)", topic)

    def _seen(self, counter: str, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        kind = "other" if parsed is None else f"{parsed.area}/{parsed.kind}"
        self.counter(counter, kind).inc()
        if parsed is None or not payload or kind not in _DECODED:
            return
        try:
            msg = decode_runtime(payload)
        except ValueError:  # the service's own reader counts and drops it
            return
        sent = counter == "p2pdoe_messages_sent_total"
        if not sent and not self._named_by_topic(msg, parsed.site):
            return  # what the service itself drops (a site's message on another's topic)
        self.observe(msg, sent)

    def _named_by_topic(self, msg: Runtime, topic_site: str | None) -> bool:
        """A heard site message counts only under the site its topic names (the one a signature and
        the ACL vouch for), and only for the first MAX_SITES sites (labels stay bounded)."""
        site = getattr(msg, "site", None)
        if site is None:
            return True
        if site != topic_site:
            return False
        if site not in self.sites and len(self.sites) >= MAX_SITES:
            return False
        self.sites.add(site)
        return True

    def observe(self, msg: Runtime, sent: bool) -> None:
        """Set the metrics a message says something about: one the service sent (its own state) or
        heard (another's)."""
        for kind, handler in _SENT if sent else _HEARD:
            if isinstance(msg, kind):
                handler(self, msg)

    def newer(self, kind: str, ts: datetime) -> bool:
        """Whether `ts` is later than every `kind` message seen before (an outbox may send one again)."""
        last = self.latest.get(kind)
        if last is not None and ts <= last:
            return False
        self.latest[kind] = ts
        return True

    def first_settlement(self, site: str, start: datetime) -> bool:
        """Whether this is the first time this settled interval is seen (it may be sent again)."""
        key = (site, start)
        if key in self.settled:
            return False
        self.settled[key] = None
        if len(self.settled) > MAX_SETTLED:
            self.settled.popitem(last=False)
        return True

    def one_of(self, name: str, family: str, value: str | None) -> None:
        """Set the gauge `name` to 1 for `value` and to 0 for every other value seen."""
        if value is not None:
            self.seen[family].add(value)
        for seen in self.seen[family]:
            self.gauge(name, seen).set(1.0 if seen == value else 0.0)


def _progress(m: ServiceMetrics, p: Progress) -> None:
    m.gauge("p2pdoe_round_iterations").set(p.iteration + 1)  # grants are numbered from 0
    values = (p.primal_trade_kw, p.dual_trade_kw, p.primal_envelope_kw, p.dual_envelope_kw)
    for residual, value in zip(RESIDUALS, values, strict=True):
        m.gauge("p2pdoe_round_residual_kw", residual).set(value)
    if p.price_change_max_eur_per_kwh is not None:
        m.gauge("p2pdoe_round_price_change_eur_per_kwh").set(p.price_change_max_eur_per_kwh)
    states = {"taking_part": p.sites, "excluded": p.excluded_sites, "frozen": p.frozen_sites}
    for state, sites in states.items():
        m.gauge("p2pdoe_round_sites", state).set(len(sites))
    if p.status != "running":
        m.counter("p2pdoe_rounds_total", p.status).inc()


def _dso_status(m: ServiceMetrics, s: DsoStatus) -> None:
    m.one_of("p2pdoe_dso_phase", "phase", s.phase)
    m.gauge("p2pdoe_failed_rounds").set(s.failed_rounds)


def _own_status(m: ServiceMetrics, s: SiteStatus) -> None:
    if s.state != "online":
        return
    for source in SOURCES:
        m.gauge("p2pdoe_envelope_in_force", source).set(1.0 if s.envelope == source else 0.0)
    m.seen["alarm"].update(s.alarms)
    for alarm in m.seen["alarm"]:
        m.gauge("p2pdoe_site_alarm", alarm).set(1.0 if alarm in s.alarms else 0.0)
    m.set_counter("p2pdoe_site_faults_total", {(fault,): float(n) for fault, n in s.faults.items()})


def _site_status(m: ServiceMetrics, s: SiteStatus) -> None:
    m.gauge("p2pdoe_site_online", s.site).set(1.0 if s.state == "online" else 0.0)


def _telemetry(m: ServiceMetrics, t: Telemetry) -> None:
    if not m.newer("telemetry", t.ts):  # sent again by the outbox after an outage: seen already
        return
    nan = float("nan")
    m.gauge("p2pdoe_site_power_kw").set(t.p_kw)
    for bound, value in (("lo", t.lo_kw), ("up", t.up_kw)):
        m.gauge("p2pdoe_envelope_kw", bound).set(nan if value is None else value)
    m.gauge("p2pdoe_envelope_inside").set(nan if t.inside is None else float(t.inside))
    excess = t.excess_kw if t.excess_kw is not None else (0.0 if t.inside else None)
    m.gauge("p2pdoe_envelope_excess_kw").set(nan if t.inside is None or excess is None else excess)
    if t.source == "meter" and t.inside is False:
        m.counter("p2pdoe_envelope_violations_total").inc()


def _own_settlement(m: ServiceMetrics, s: SettlementRecord) -> None:
    if not m.first_settlement(s.site, s.interval_start):
        return
    m.counter("p2pdoe_settlements_total").inc()
    if m.newer("settlement", s.interval_start):
        m.gauge("p2pdoe_settlement_net_eur").set(s.net_eur)
        m.gauge("p2pdoe_settlement_deviation_kwh").set(s.deviation_kwh)


def _settlement(m: ServiceMetrics, s: SettlementRecord) -> None:
    if m.first_settlement(s.site, s.interval_start):
        m.counter("p2pdoe_settlements_received_total", s.site).inc()


def _report_parts(r: SiteReport) -> tuple[dict[str, float], dict[str, float]]:
    """CPU by part and step time by statistic, in seconds."""
    parts = {"total": r.cpu_s, "steps": r.cpu_steps_s, "codec": r.cpu_codec_s}
    stats = {"median": r.solve_times.median_ms, "p95": r.solve_times.p95_ms, "max": r.solve_times.max_ms}
    return {k: v for k, v in parts.items() if v is not None}, {k: ms / 1000 for k, ms in stats.items()}


def _own_report(m: ServiceMetrics, r: SiteReport) -> None:
    cpu, steps = _report_parts(r)
    m.gauge("p2pdoe_round_iterations").set(r.iterations)
    for part, value in cpu.items():
        m.gauge("p2pdoe_round_cpu_seconds", part).set(value)
    for stat, value in steps.items():
        m.gauge("p2pdoe_round_step_seconds", stat).set(value)


def _report(m: ServiceMetrics, r: SiteReport) -> None:
    cpu, steps = _report_parts(r)
    for part, value in cpu.items():
        m.gauge("p2pdoe_site_round_cpu_seconds", r.site, part).set(value)
    for stat, value in steps.items():
        m.gauge("p2pdoe_site_round_step_seconds", r.site, stat).set(value)


def _reading(m: ServiceMetrics, r: MeterReading) -> None:
    m.counter("p2pdoe_meter_readings_total").inc()
    m.gauge("p2pdoe_meter_power_kw").set(r.p_kw)
    if r.soc_kwh is not None:
        m.gauge("p2pdoe_meter_soc_kwh").set(r.soc_kwh)


Handlers = tuple[tuple[type, Callable[..., None]], ...]
_SENT: Handlers = (
    (Progress, _progress),
    (DsoStatus, _dso_status),
    (SiteStatus, _own_status),
    (Telemetry, _telemetry),
    (SettlementRecord, _own_settlement),
    (SiteReport, _own_report),
    (MeterReading, _reading),
)
_HEARD: Handlers = (
    (SiteStatus, _site_status),
    (SettlementRecord, _settlement),
    (SiteReport, _report),
    (MeterReading, _reading),
)
_DECODED = frozenset(
    {
        "dso/progress",
        "dso/status",
        "site/status",
        "site/telemetry",
        "site/settlement",
        "site/meter",
        "market/report",
    }
)


class ObservedTransport(TransportLayer):
    """The service's transport, its messages read into `metrics` as they pass (outermost: it sees
    what the service publishes before it is signed, and what it hears once believed)."""

    def __init__(self, inner: Transport, metrics: ServiceMetrics):
        super().__init__(inner)
        self.metrics = metrics
        metrics.watch_transport(inner)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        self.metrics.sent(topic, payload)  # as handed over, not as acknowledged
        await self.inner.publish(topic, payload, qos, retain, expiry_s)

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        self.metrics.sent(topic, payload)
        await self.inner.publish_state(topic, payload, expiry_s)

    def count_into(self, counter: CounterOf[str]) -> None:
        """Refuses nothing itself; the counter of what the service drops becomes a metric."""
        self.metrics.watch_dropped(counter)

    async def messages(self) -> AsyncIterator[InboundMessage]:
        async for m in self.inner.messages():
            self.metrics.received(m.topic, m.payload)
            yield m


@contextlib.asynccontextmanager
async def metrics_served(metrics: ServiceMetrics, host: str, port: int) -> AsyncIterator[int]:
    """`/metrics` on host:port (0: a free port) while the context lasts; yields the port."""
    try:
        server, thread = start_http_server(port, host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port}: {exc}") from None
    metrics.sample()  # a scrape from now on sees what is watched already
    sampling = asyncio.create_task(metrics.sampling(), name="metrics-sampling")
    try:
        yield int(server.server_port)
    finally:
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await asyncio.to_thread(_stop, server, thread)


def _stop(server: Any, thread: threading.Thread) -> None:
    """The HTTP server stopped (it may take its poll interval, off the loop)."""
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
