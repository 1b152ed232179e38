"""`edge-agent` (or `python -m edge_agent`): one community's agent. See docs/runtime.md."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent.service import EdgeAgent, goodbye, offline_will
from edge_agent.settings import EdgeSettings
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.runner import base_parser, run_service, setup, transport_for
from p2pdoe.services.settings import read_config_file

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
    settings = setup(PROG, EdgeSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        config = read_site_config(settings.site_config)
        site = config.community.id
        async with transport_for(settings, f"edge-{site}", offline_will(site)) as transport:
            try:
                await EdgeAgent(config).run(transport, settings.rounds, settings.report_every_s)
            finally:  # a clean stop says goodbye (the last will covers the unclean ones)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.publish(*goodbye(site), retain=True), 2.0)
        return 0

    return run_service(PROG, serve)


if __name__ == "__main__":
    sys.exit(main())
