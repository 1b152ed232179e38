"""`dso-coordinator` (or `python -m dso_coordinator`): the DSO's coordinator. See docs/runtime.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from dso_coordinator.service import CoordinatorService, coordinator_machine, dso_status, offline_will
from dso_coordinator.service import write_results as write_results
from dso_coordinator.settings import CoordinatorSettings
from p2pdoe.core import topics
from p2pdoe.core.allocation import SHARINGS
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.signing import DSO
from p2pdoe.services.runner import (
    base_parser,
    count_refusals,
    make_clock,
    run_service,
    running_clock,
    service_transport,
    setup,
)
from p2pdoe.services.settings import read_config_file

PROG = "dso-coordinator"


def read_coordinator_config(path: Path) -> CoordinatorConfig:
    return read_config_file(CoordinatorConfig, path, "coordinator configuration")


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(PROG, "The DSO coordinator: agrees envelopes and trades with the sites over MQTT.")
    p.add_argument(
        "--coordinator-config", type=Path, help="the coordinator's configuration (p2pdoe site-config)"
    )
    p.add_argument("--round", help="the day-ahead round's id (default day-ahead)")
    p.add_argument("--policy", choices=["dynamic", "static", "none"])
    p.add_argument(
        "--default-sharing",
        choices=list(SHARINGS),
        help="how the default envelopes share the network (default: the configuration's, max-min)",
    )
    p.add_argument(
        "--static-default",
        dest="default_profile",
        action="store_false",
        default=None,
        help="one default box per site for the whole day (default: a box per interval)",
    )
    p.add_argument("--registration-timeout-s", type=float)
    p.add_argument("--iteration-timeout-s", type=float)
    p.add_argument("--report-timeout-s", type=float)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--out", type=Path, help="write OUT/results.json")
    p.add_argument(
        "--max-behind",
        type=int,
        help="bounded staleness: iterations a slow site may fall behind (default: the configuration's, 0)",
    )
    p.add_argument(
        "--straggler-wait",
        type=float,
        help="then wait for the last proposals this many times as long as the rest took (default 1)",
    )
    p.add_argument(
        "--relay-trades",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the grants carry the peers' trade entries: a site hears no peer (default: the configuration's)",
    )
    p.add_argument(
        "--exit-after-round", action="store_true", default=None, help="stop after the day-ahead round"
    )
    rt = p.add_argument_group("the real-time day")
    rt.add_argument("--rolling", action="store_true", default=None, help="a round every interval (rolling)")
    rt.add_argument(
        "--rolling-stop-fraction", type=float, help="a round's deadline on a wall or scaled clock (0.5)"
    )
    rt.add_argument("--rolling-max-iterations", type=int, help="a rolling round's iteration cap (200)")
    rt.add_argument("--meter-step-s", type=float, help="the meters' nominal reading period (default 5)")
    rt.add_argument("--hours", type=float, help="run the real-time day for this long (default: the horizon)")
    rt.add_argument(
        "--checkpoint", type=Path, help="save the standing agreement here; resume from it mid-day"
    )
    rt.add_argument("--exit-after-day", action="store_true", default=None, help="stop when the day ends")
    rt.add_argument("--days", type=int, help="real-time days one after another (default 1; 0: until stopped)")
    rt.add_argument(
        "--gate-closure", help="the next day's day-ahead round opens then, the day before (12:00)"
    )
    settings = setup(PROG, CoordinatorSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        cfg = read_coordinator_config(settings.coordinator_config)
        async with service_transport(settings, "dso", offline_will(), DSO, sweep_retained=True) as transport:
            clock = make_clock(settings, transport, "dso", "grid")
            service = CoordinatorService(transport, clock, settings)
            try:
                async with running_clock(clock, service.shell):
                    machine = coordinator_machine(
                        cfg,
                        settings,
                        clock.now(),
                        built=lambda m: count_refusals(transport, m.reader.dropped),
                        days=settings.days,
                        gate_closure=settings.gate_closure,
                    )
                    return await service.run(machine)
            finally:  # a clean stop says goodbye (the last will covers the unclean ones)
                with contextlib.suppress(Exception):
                    goodbye = dso_status("offline")
                    await asyncio.wait_for(transport.publish(topics.DSO_STATUS, goodbye, retain=True), 2.0)

    return run_service(PROG, serve)


if __name__ == "__main__":
    sys.exit(main())
