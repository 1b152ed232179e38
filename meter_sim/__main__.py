"""`meter-sim` (or `python -m meter_sim`): one site's simulated meter and plant. See docs/runtime.md."""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from meter_sim.service import MeterSim
from meter_sim.settings import MeterSettings
from p2pdoe.core.realtime.clock import day_start
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.runner import base_parser, run_service, service_transport, setup
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
    settings = setup(PROG, MeterSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        config = read_config_file(SiteConfig, settings.site_config, "site configuration")
        now = datetime.now(UTC)
        clock = settings.sim_clock(now)
        site = config.community.id
        start = day_start(settings.start, config.start, config.dt_h, clock.sim_at(now))
        seed = settings.seed if settings.seed is not None else zlib.crc32(site.encode())
        try:
            lead_in = settings.lead_in_s if settings.lead_in_s is not None else config.dt_h * 3600
            sim = MeterSim(config, clock, start, settings.rate_s, seed, lead_in)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        async with service_transport(settings, f"meter-{site}", None) as transport:
            await sim.run(transport, datetime.now(UTC))
        return 0

    return run_service(PROG, serve)


if __name__ == "__main__":
    sys.exit(main())
