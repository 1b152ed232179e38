"""`edge-agent` (or `python -m edge_agent`): one community's agent. See docs/runtime.md."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.journal import Journal, JournalError
from edge_agent.meter import MqttMeter
from edge_agent.service import EdgeService, fixed_default, goodbye, market_machine, offline_will
from edge_agent.settings import EdgeSettings
from p2pdoe.core.edge.realtime import EdgeRealtime
from p2pdoe.core.realtime.clock import day_start
from p2pdoe.core.realtime.controller import Controller
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import FallbackConfig
from p2pdoe.core.realtime.plant import plant_spec
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.signing import edge_identity
from p2pdoe.services.clock import Clock
from p2pdoe.services.runner import (
    base_parser,
    count_refusals,
    make_clock,
    run_service,
    running_clock,
    service_transport,
    setup,
    transport_for,
)
from p2pdoe.services.settings import ConfigError, read_config_file
from p2pdoe.services.transport import Transport

if TYPE_CHECKING:  # pymodbus and pysunspec2 load only with --meter-modbus
    from edge_agent.sunspec_meter import SunSpecMeter

PROG = "edge-agent"


def read_site_config(path: Path) -> SiteConfig:
    return read_config_file(SiteConfig, path, "site configuration")


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(PROG, "One energy community's edge agent: takes part in the DSO's rounds over MQTT.")
    p.add_argument("--site-config", type=Path, help="this site's configuration (p2pdoe site-config)")
    p.add_argument("--rounds", type=int, help="stop after this many settled rounds (default 0: run on)")
    p.add_argument(
        "--report-every-s", type=float, help="re-check the envelope and send telemetry (default 10)"
    )
    p.add_argument(
        "--forecast-file", type=Path, help="the integrator's forecast for the next rounds (a SiteForecast)"
    )
    p.add_argument(
        "--solve-delay-ms",
        type=float,
        help="fault injection: a slow gateway, each agreement step that solves answers this much later",
    )
    rt = p.add_argument_group("the real-time controller")
    rt.add_argument("--meter", action="store_true", default=None, help="read the meter and enforce envelopes")
    rt.add_argument("--meter-broker", help="the meter's broker (default: --broker)")
    rt.add_argument("--meter-step-s", type=float, help="the meter's nominal reading period (default 5)")
    rt.add_argument(
        "--meter-modbus", help="HOST:PORT: read the meter and inverters as SunSpec Modbus devices"
    )
    rt.add_argument(
        "--meter-modbus-units", help="their units, e.g. meter=1,pv=2,battery=4 (default: the site's assets)"
    )
    rt.add_argument("--meter-modbus-timeout-s", type=float, help="a device's answer awaited this long (2)")
    rt.add_argument(
        "--meter-modbus-export-positive",
        action="store_true",
        default=None,
        help="the meter's W says export positive (default: import positive)",
    )
    rt.add_argument("--journal", type=Path, help="the SQLite journal (default: journal-<site>.db)")
    rt.add_argument("--fixed-default-lo-kw", type=float)
    rt.add_argument("--fixed-default-up-kw", type=float)
    rt.add_argument(
        "--margin-load",
        type=float,
        help="with --meter, schedules keep this share of load inside envelopes (0.12)",
    )
    rt.add_argument(
        "--margin-res", type=float, help="... and this share of PV and wind on the import side (0.05)"
    )
    rt.add_argument("--skew-tolerance-s", type=float)
    rt.add_argument("--meter-silent-s", type=float, help="no reading this long: alarm, run on schedule (120)")
    rt.add_argument("--reading-ahead-s", type=float, help="reject readings stamped this far ahead (60)")
    rt.add_argument("--clock-offset-s", type=float, help="fault injection: run this agent's clock off")
    settings = setup(PROG, EdgeSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        check_modbus(settings)  # before connecting: one line, nothing to say goodbye to
        config = read_site_config(settings.site_config)
        site = config.community.id
        journal = open_journal(config, settings)
        async with contextlib.AsyncExitStack() as stack:
            transport = await stack.enter_async_context(
                service_transport(settings, f"edge-{site}", offline_will(site), edge_identity(site))
            )
            meter: MqttMeter | SunSpecMeter | None = None
            if settings.meter and settings.meter_modbus is None:
                meter_transport: Transport = transport
                if settings.meter_broker is not None:  # the gateway's own: credentials in its URL, if any
                    own = {"username": None, "password": None, "password_file": None, "ca_cert": None}
                    meter_settings = settings.model_copy(update={"broker": settings.meter_broker, **own})
                    meter_transport = await stack.enter_async_context(
                        transport_for(meter_settings, f"edge-{site}-meter", None, edge_identity(site))  # type: ignore[arg-type]
                    )
                meter = MqttMeter(meter_transport, site)
            clock = make_clock(
                settings,
                transport,
                f"edge-{site}",
                "control",
                every_step=True,
                offset_s=settings.clock_offset_s,
            )
            if settings.meter and settings.meter_modbus is not None:
                meter = modbus_meter(settings, config, clock, MqttMeter(transport, site))
                watch_meter(transport, meter)
            market = market_machine(config, margins(settings))
            count_refusals(transport, market.reader.dropped)
            watch_journal(transport, journal)
            service = EdgeService(
                market,
                transport,
                clock,
                journal=journal,
                meter=meter,
                rounds=settings.rounds,
                forecast_file=settings.forecast_file,
                solve_delay_s=settings.solve_delay_ms / 1000,
            )
            try:
                await service.subscribe()
                async with running_clock(clock, service.shell):
                    return await service.run(build_realtime(config, settings, clock.now()))
            finally:  # a clean stop says goodbye (the last will covers the unclean ones)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.publish(*goodbye(site), retain=True), 2.0)
                if journal is not None:
                    journal.close()

    return run_service(PROG, serve)


def modbus_meter(
    settings: EdgeSettings, config: SiteConfig, clock: Clock, commands: MqttMeter
) -> SunSpecMeter:
    """The SunSpec devices as the site's meter (set-points still on MQTT, through `commands`)."""
    from edge_agent.sunspec_meter import SunSpecMeter, parse_units
    from p2pdoe.services.sunspec import layout_of

    assert settings.meter_modbus is not None
    units = settings.meter_modbus_units
    roles = layout_of(config).roles if units is None else parse_units(units)
    site, step_s, timeout_s = config.community.id, settings.meter_step_s, settings.meter_modbus_timeout_s
    import_positive = not settings.meter_modbus_export_positive
    return SunSpecMeter.of(
        settings.meter_modbus, roles, clock, site, step_s, commands, timeout_s, import_positive
    )


def check_modbus(settings: EdgeSettings) -> None:
    """`--meter-modbus` needs `--meter` and a wall or scaled clock (a polled device takes no part in
    a lockstep day); its address and units are checked too."""
    if settings.meter_modbus is None:
        return
    from edge_agent.sunspec_meter import parse_address, parse_units

    if not settings.meter:
        raise ConfigError("--meter-modbus reads the site's meter: give --meter too")
    if settings.clock_kind() == "lockstep":
        raise ConfigError("--meter-modbus needs a wall or scaled clock: a polled device takes no lockstep")
    parse_address(settings.meter_modbus)
    if settings.meter_modbus_units is not None:
        parse_units(settings.meter_modbus_units)


def watch_meter(transport: Transport, meter: SunSpecMeter) -> None:
    """With metrics served, the polls the devices did not answer among the messages dropped."""
    metrics = getattr(transport, "metrics", None)  # p2pdoe.services.metrics.ObservedTransport
    if metrics is not None:
        metrics.watch_dropped(meter.dropped)


def watch_journal(transport: Transport, journal: Journal | None) -> None:
    """With metrics served, the journal's backlog among them (sampled on the loop)."""
    metrics = getattr(transport, "metrics", None)  # p2pdoe.services.metrics.ObservedTransport
    if metrics is not None and journal is not None:
        metrics.watch("p2pdoe_journal_backlog", journal.pending_count)
        metrics.watch("p2pdoe_journal_deferred", lambda: journal.deferred)


def margins(settings: EdgeSettings) -> tuple[float, float] | None:
    return (settings.margin_load, settings.margin_res) if settings.meter else None


def open_journal(config: SiteConfig, settings: EdgeSettings) -> Journal | None:
    if not settings.meter and settings.journal is None:
        return None
    path = settings.journal or Path(f"journal-{config.community.id}.db")
    try:
        return Journal(path, config.community.id, retention_days=settings.journal_retention_days)
    except JournalError as exc:
        raise ConfigError(f"journal {path}: {exc}") from None


def build_realtime(
    config: SiteConfig, settings: EdgeSettings, now: datetime, instance: str | None = None
) -> EdgeRealtime:
    """The real-time machine with its controller, for the day that `settings.start` names at `now`;
    `instance`: this run's token on its status (default: a fresh random one)."""
    box = fixed_default(config)
    if settings.fixed_default_lo_kw is not None and settings.fixed_default_up_kw is not None:
        box = Box(settings.fixed_default_lo_kw, settings.fixed_default_up_kw)
    speed = settings.speed if settings.clock_kind() == "scaled" else 1.0
    fallback = FallbackConfig(box, settings.skew_tolerance_s, speed)
    start = day_start(settings.start, config.start, config.dt_h, now)
    controller = Controller(config, plant_spec(config), fallback, start, settings.meter_step_s)
    every = max(settings.report_every_s, settings.meter_step_s) if settings.meter else settings.report_every_s
    return EdgeRealtime(
        controller,
        speed=speed,
        report_every_s=every,
        meter_silent_s=settings.meter_silent_s,
        reading_ahead_s=settings.reading_ahead_s,
        instance=instance or secrets.token_hex(4),
    )


if __name__ == "__main__":
    sys.exit(main())
