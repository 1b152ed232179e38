"""`meter-sim` (or `python -m meter_sim`): one site's simulated meter and plant. See docs/runtime.md."""

from __future__ import annotations

import contextlib
import sys
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from meter_sim.service import MeterService
from meter_sim.settings import MeterSettings
from p2pdoe.core.realtime.clock import day_start
from p2pdoe.core.realtime.simulated_meter import SimulatedMeter
from p2pdoe.core.schemas.runtime import SiteForecast
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.signing import edge_identity
from p2pdoe.services.runner import (
    base_parser,
    make_clock,
    run_service,
    running_clock,
    service_transport,
    setup,
)
from p2pdoe.services.settings import ConfigError, read_config_file

PROG = "meter-sim"


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(PROG, "One site's simulated meter and plant, on the shared simulated clock.")
    p.add_argument("--site-config", type=Path, help="the site's configuration (p2pdoe site-config)")
    p.add_argument("--rate-s", type=float, help="simulated seconds between readings (default 5)")
    p.add_argument(
        "--lead-in-s", type=float, help="simulated seconds of readings before the day starts (one interval)"
    )
    p.add_argument("--seed", type=int, help="forecast errors (default: from the site's id)")
    p.add_argument("--days", type=int, help="whole days one after another (default 1)")
    p.add_argument(
        "--profile-file", type=Path, help="the weather and load the plant sees (a forecast message, JSON)"
    )
    p.add_argument("--modbus-port", type=int, help="also serve the readings as SunSpec Modbus devices here")
    p.add_argument("--modbus-host", help="the address the Modbus devices are served on (default 127.0.0.1)")
    settings = setup(PROG, MeterSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        config = read_config_file(SiteConfig, settings.site_config, "site configuration")
        site = config.community.id
        seed = settings.seed if settings.seed is not None else zlib.crc32(site.encode())
        lead_in = settings.lead_in_s if settings.lead_in_s is not None else config.dt_h * 3600
        days = settings.days
        truth = None
        if settings.profile_file is not None:
            truth = read_config_file(SiteForecast, settings.profile_file, "profile file")
        meter = simulated_meter(
            config, datetime.now(UTC), settings.rate_s, seed, lead_in, days, truth
        )  # checked now
        async with contextlib.AsyncExitStack() as stack:
            transport = await stack.enter_async_context(
                service_transport(settings, f"meter-{site}", None, edge_identity(site))
            )
            if settings.modbus_port is not None:
                from meter_sim.sunspec_device import served_as_sunspec

                served = served_as_sunspec(transport, config, settings.modbus_host, settings.modbus_port)
                transport = await stack.enter_async_context(served)
            clock = make_clock(settings, transport, f"meter-{site}", "plant")
            service = MeterService(transport, clock)
            async with running_clock(clock, service.shell):
                start = day_start(settings.start, config.start, config.dt_h, clock.now())
                meter = simulated_meter(config, start, settings.rate_s, seed, lead_in, days, truth)
                return await service.run(meter)

    return run_service(PROG, serve)


def simulated_meter(
    config: SiteConfig,
    start: datetime,
    rate_s: float,
    seed: int,
    lead_in_s: float,
    days: int = 1,
    truth: SiteForecast | None = None,
) -> SimulatedMeter:
    try:
        if truth is not None and truth.site != config.community.id:
            raise ValueError(f"the profile file is {truth.site}'s, not {config.community.id}'s")
        return SimulatedMeter(config, start, rate_s, seed, lead_in_s, days=days, truth=truth)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
