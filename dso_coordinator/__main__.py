"""`dso-coordinator` (or `python -m dso_coordinator`): the DSO's coordinator. See docs/runtime.md."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from dso_coordinator.checkpoint import Standing, load, save, standing_from
from dso_coordinator.realtime import RollingHorizon
from dso_coordinator.results import distributed_results, realtime_results
from dso_coordinator.service import Agreement, Coordinator, offline_will
from dso_coordinator.settings import CoordinatorSettings
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.results import Results
from p2pdoe.errors import InfeasibleError
from p2pdoe.services.runner import base_parser, run_service, service_transport, setup
from p2pdoe.services.settings import ConfigError, read_config_file
from p2pdoe.services.transport import MqttTransport

PROG = "dso-coordinator"
log = logging.getLogger(PROG)


def read_coordinator_config(path: Path) -> CoordinatorConfig:
    return read_config_file(CoordinatorConfig, path, "coordinator configuration")


def write_results(results: Results, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(results.model_dump_json(indent=1), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(PROG, "The DSO coordinator: agrees envelopes and trades with the sites over MQTT.")
    p.add_argument(
        "--coordinator-config", type=Path, help="the coordinator's configuration (p2pdoe site-config)"
    )
    p.add_argument("--round", help="the day-ahead round's id (default day-ahead)")
    p.add_argument("--policy", choices=["dynamic", "static", "none"])
    p.add_argument("--registration-timeout-s", type=float)
    p.add_argument("--iteration-timeout-s", type=float)
    p.add_argument("--report-timeout-s", type=float)
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--out", type=Path, help="write OUT/results.json")
    p.add_argument(
        "--exit-after-round", action="store_true", default=None, help="stop after the day-ahead round"
    )
    rt = p.add_argument_group("the real-time day")
    rt.add_argument("--rolling", action="store_true", default=None, help="a round every interval (rolling)")
    rt.add_argument("--rolling-stop-fraction", type=float, help="a round's deadline, of an interval (0.6)")
    rt.add_argument("--meter-step-s", type=float, help="the meters' nominal reading period (default 5)")
    rt.add_argument("--hours", type=float, help="run the real-time day for this long (default: the horizon)")
    rt.add_argument(
        "--checkpoint", type=Path, help="save the standing agreement here; resume from it mid-day"
    )
    rt.add_argument("--exit-after-day", action="store_true", default=None, help="stop when the day ends")
    settings = setup(PROG, CoordinatorSettings, p.parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        cfg = read_coordinator_config(settings.coordinator_config)
        try:
            coordinator = Coordinator(cfg, settings, settings.sim_clock(datetime.now(UTC)))
        except InfeasibleError as exc:
            raise ConfigError(f"no safe default envelopes: {exc}") from None
        async with service_transport(settings, "dso", offline_will()) as transport:
            try:
                if settings.rolling and coordinator.current_interval() >= 1:  # (re)started mid-day
                    await coordinator.go_online(transport)
                    await _real_time_day(coordinator, transport, None, settings)
                    if not settings.exit_after_day:
                        await asyncio.Event().wait()
                    return 0
                agreement = await coordinator.run(transport)
                if settings.rolling and not settings.exit_after_round:  # results at the day's end
                    await _real_time_day(coordinator, transport, agreement, settings)
                    if not settings.exit_after_day:
                        await asyncio.Event().wait()
                    return 0
                results = await asyncio.to_thread(  # AC power flows: off the event loop
                    distributed_results, coordinator.cfg, coordinator.defaults, agreement
                )
                if settings.out is not None:
                    log.info("wrote %s", write_results(results, settings.out))
                _log_round(agreement, results)
                if settings.exit_after_round:
                    return 0
                await coordinator.follow_day(transport, agreement)
                if not settings.exit_after_day:
                    await asyncio.Event().wait()  # stay online until stopped
            finally:
                coordinator.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.publish(*_goodbye(coordinator), retain=True), 2.0)
        return 0

    return run_service(PROG, serve)


async def _real_time_day(
    coordinator: Coordinator,
    transport: MqttTransport,
    agreement: Agreement | None,
    settings: CoordinatorSettings,
) -> None:
    """The rolling horizon to the day's end, from the day-ahead `agreement` (None: a coordinator
    restarted mid-day, from its checkpoint if it has one); then, once the last settlements are in
    (or the report timeout passed), results.json with its `realtime` section (a restarted
    coordinator, which has no day-ahead agreement, writes realtime.json: its part of the day)."""
    c = coordinator
    standing: Standing | None
    if agreement is not None:
        standing = standing_from(
            agreement.setup, agreement.outcome, 0, c.start, c.interval_s, c.cfg.intervals
        )
        if settings.checkpoint is not None:
            await asyncio.to_thread(save, settings.checkpoint, standing)
    else:
        path = settings.checkpoint
        standing = (
            None
            if path is None
            else await asyncio.to_thread(load, path, c.start, c.interval_s, c.cfg.intervals)
        )
        log.info("resumed mid-day from %s", "nothing" if standing is None else f"round {standing.round}")
    day = await RollingHorizon(c, transport, standing, rejoining=agreement is None).run()
    await asyncio.sleep(settings.report_timeout_s / 4)  # the last interval's settlements
    hours = (len(day.intervals) + 1) * c.cfg.dt_h
    info = await asyncio.to_thread(realtime_results, c, day, hours)
    if agreement is None:
        if settings.out is not None:
            settings.out.mkdir(parents=True, exist_ok=True)
            (settings.out / "realtime.json").write_text(info.model_dump_json(indent=1), encoding="utf-8")
            log.info("wrote %s", settings.out / "realtime.json")
    else:
        day_ahead = await asyncio.to_thread(distributed_results, c.cfg, c.defaults, agreement)
        _log_round(agreement, day_ahead)
        if settings.out is not None:
            log.info("wrote %s", write_results(day_ahead.model_copy(update={"realtime": info}), settings.out))
    v = info.envelope_violations
    log.info(
        "the day is over: %d intervals, %d settlements, %d sustained violations, %d envelope switches",
        len(info.intervals), len(info.settlements), v.count, len(info.fallback_events),
    )  # fmt: skip


def _log_round(agreement: Agreement, results: Results) -> None:
    log.info(
        "round %s: %s after %d iterations, objective %.2f EUR, %d sites agreed, %d on defaults",
        agreement.outcome.round,
        agreement.outcome.status,
        agreement.outcome.iterations,
        results.objective_eur,
        len(agreement.setup.sites),
        len(agreement.setup.excluded),
    )


def _goodbye(coordinator: Coordinator) -> tuple[str, bytes]:
    from p2pdoe.core import topics

    return topics.DSO_STATUS, coordinator.status("offline", None)


if __name__ == "__main__":
    sys.exit(main())
