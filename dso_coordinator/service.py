"""The DSO coordinator as an asyncio service: the shell (p2pdoe.services.shell) around its pure
machine (p2pdoe.core.coordinator.machine), which decides everything: registration, the rounds and
their deadlines, exclusion and re-opening, the rolling horizon, the day's start and end. Here only
what the machine asks for is carried out: checkpoints saved, results computed (AC power flows, off
the event loop) and written."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from dso_coordinator.checkpoint import load, save
from dso_coordinator.results import distributed_results, realtime_results
from dso_coordinator.settings import CoordinatorSettings
from p2pdoe.analysis.defaults import default_fairness
from p2pdoe.analysis.summary import day_summary
from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import default_envelopes, shortfall_lines
from p2pdoe.core.calendar import round_id, zone
from p2pdoe.core.coordinator.commands import Agreed, DayOver, Save
from p2pdoe.core.coordinator.context import Context, Rules
from p2pdoe.core.coordinator.days import CoordinatorDays
from p2pdoe.core.coordinator.machine import SUBSCRIPTIONS, CoordinatorMachine
from p2pdoe.core.coordinator.rounds import Agreement
from p2pdoe.core.cpu import CpuClocks
from p2pdoe.core.day_configs import calendar_of, coordinator_config_on
from p2pdoe.core.feeder_config import feeder_of
from p2pdoe.core.realtime.clock import day_start
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.results import DaySummary, Results
from p2pdoe.core.schemas.runtime import DsoStatus
from p2pdoe.core.schemas.scenario import Admm
from p2pdoe.errors import InfeasibleError
from p2pdoe.services.clock import Clock
from p2pdoe.services.settings import ConfigError
from p2pdoe.services.shell import Shell, clock_divert
from p2pdoe.services.transport import InboundMessage, LastWill, Transport

log = logging.getLogger("dso_coordinator")
T = TypeVar("T")


def dso_status(state: str, ts: datetime | None = None) -> bytes:
    msg = DsoStatus(state=state, round=None, ts=ts or datetime.now(UTC))  # type: ignore[arg-type]
    return msg.model_dump_json().encode()


def offline_will() -> LastWill:
    return LastWill(topics.DSO_STATUS, dso_status("offline"))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def rules_from(settings: CoordinatorSettings) -> Rules:
    names = Rules.__dataclass_fields__.keys() - {"checkpoint"}
    return Rules(**{n: getattr(settings, n) for n in names}, checkpoint=settings.checkpoint is not None)


def admm_of(cfg: CoordinatorConfig, settings: CoordinatorSettings) -> Admm:
    """The configuration's ADMM settings, with `--max-behind` and `--relay-trades` in place of its own
    if given."""
    admm = cfg.admm
    if settings.relay_trades is not None:
        admm = admm.model_copy(update={"relay_trades": settings.relay_trades})
    if settings.max_behind is None:
        return admm
    staleness = admm.staleness.model_copy(update={"max_behind": settings.max_behind})
    try:
        return Admm.model_validate({**admm.model_dump(), "staleness": staleness.model_dump()})
    except ValueError as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError(f"--max-behind {settings.max_behind}: {first}") from None


def build_machine(
    cfg: CoordinatorConfig, settings: CoordinatorSettings, now: datetime, epoch: str | None = None
) -> CoordinatorMachine:
    """The machine for the day that `settings.start` names at `now`; resumed from the checkpoint if
    one of this very day exists (a restart), never otherwise (a first start, however late). `epoch`:
    this run's token on its openings (default: a fresh random one)."""
    policy = settings.policy or cfg.policy
    profile = settings.default_profile
    chosen = {
        "default_sharing": settings.default_sharing or cfg.default_sharing,
        "default_profile": cfg.default_profile if profile is None else profile,
    }
    start = day_start(settings.start, cfg.start, cfg.dt_h, now)
    cfg = cfg.model_copy(
        update={"policy": policy, "start": iso(start), "admm": admm_of(cfg, settings), **chosen}
    )
    feeder = feeder_of(cfg.feeder)
    try:
        defaults = default_envelopes(cfg, feeder)
    except InfeasibleError as exc:
        raise ConfigError(f"no safe default envelopes: {exc}") from None
    ctx = Context(cfg, feeder, defaults, start, rules_from(settings), epoch or secrets.token_hex(4))
    for line in shortfall_lines(defaults, feeder, start, ctx.interval_s):
        log.warning(line)
    resume = None
    if settings.rolling and settings.checkpoint is not None:
        resume = load(settings.checkpoint, start, ctx.interval_s, cfg.intervals)
    return CoordinatorMachine(ctx, time.perf_counter, resume, CpuClocks(time.process_time, time.thread_time))


def coordinator_machine(
    cfg: CoordinatorConfig,
    settings: CoordinatorSettings,
    now: datetime,
    epoch: str | None = None,
    built: Callable[[CoordinatorMachine], None] | None = None,
    *,
    days: int = 1,
    gate_closure: str = "12:00",
) -> CoordinatorMachine | CoordinatorDays:
    """One day's machine, or with `days` other than 1 the days one after another (0: until
    stopped), each day's machine built from its date's configuration (`built` is told of each),
    the next day's opening at `gate_closure` (local time) the day before."""
    if days == 1:
        machine = build_machine(cfg, settings, now, epoch)
        if built is not None:
            built(machine)
        return machine
    calendar = calendar_of(cfg, gate_closure)
    anchor = calendar.day_of(day_start(settings.start, cfg.start, cfg.dt_h, now))
    first = max(anchor, calendar.day_of(now))  # restarted on a later day: from the day in force
    left = days - (first - anchor).days if days else None  # the run's days counted from `anchor`
    if left is not None and left <= 0:
        raise ConfigError(f"the {days} day(s) from {anchor} are over: nothing left to run")
    shared_epoch = epoch or secrets.token_hex(4)  # one run: no day deletes another's openings

    def build(day: date, at: datetime) -> CoordinatorMachine:
        update = {
            "start": iso(calendar.start(day)),
            "round": round_id(day, settings.round),
            "exit_after_day": False,
            "exit_after_round": False,
            "checkpoint": None if settings.checkpoint is None else dated(settings.checkpoint, day),
        }
        day_settings = settings.model_copy(update=update)
        machine = build_machine(coordinator_config_on(cfg, day, calendar), day_settings, at, shared_epoch)
        if built is not None:
            built(machine)
        return machine

    return CoordinatorDays(calendar, build, first, left)


def dated(path: Path, day: date) -> Path:
    """A day's own file beside `path`: checkpoint.json -> checkpoint-2026-06-21.json."""
    return path.with_name(f"{path.stem}-{day.isoformat()}{path.suffix}")


class CoordinatorService:
    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        settings: CoordinatorSettings,
        *,
        offload: bool = True,
        divert: Callable[[InboundMessage], bool] | None = None,
    ):
        self.transport = transport
        self.clock = clock
        self.settings = settings
        self.offload = offload
        self.shell = Shell(transport, clock, self._carry_out, offload, divert or clock_divert(clock))
        self.agreements: dict[datetime, Agreement] = {}  # by the day's start
        self.day_ahead: dict[datetime, Results] = {}  # day after day: each day's, written at agreement
        self.daily = False  # day after day: each day's results are written at its agreement too
        self.written: Path | None = None

    async def run(self, machine: CoordinatorMachine | CoordinatorDays) -> int:
        self.daily = isinstance(machine, CoordinatorDays)
        return await self.shell.run(machine, machine.start(self.clock.now()), SUBSCRIPTIONS)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args) if self.offload else fn(*args)

    async def _carry_out(self, cmd: object) -> None:
        if isinstance(cmd, Save) and self.settings.checkpoint is not None:
            path = self.settings.checkpoint
            if cmd.day is not None:  # a file per day: tomorrow's round must not replace today's
                path = dated(path, cmd.day)
            await self._off_loop(save, path, cmd.standing)  # fsync: off the loop
        elif isinstance(cmd, Agreed):
            protocol = str(getattr(self.transport, "protocol", "unknown"))
            agreement = self.agreements[cmd.ctx.start] = replace(cmd.agreement, protocol=protocol)
            if cmd.write:
                await self._write(await self._off_loop(self._day_ahead, cmd.ctx, agreement), cmd.ctx)
            elif self.daily:  # kept on disk at once: a restart before the day's end finds it
                results = await self._off_loop(self._day_ahead, cmd.ctx, agreement)
                self.day_ahead[cmd.ctx.start] = results
                await self._write(results, cmd.ctx)
        elif isinstance(cmd, DayOver):
            await self._day_over(cmd)

    def _day_ahead(self, ctx: Context, agreement: Agreement) -> Results:
        results = distributed_results(ctx.cfg, ctx.defaults, agreement)
        log_round(agreement, results)
        return results

    async def _day_over(self, cmd: DayOver) -> None:
        report, ctx = cmd.report, cmd.ctx
        speed = self.settings.speed if self.clock.kind == "scaled" else 1.0
        info = await self._off_loop(realtime_results, ctx, report, self.clock.kind, speed)
        agreement = self.agreements.pop(ctx.start, None)
        day_ahead = self.day_ahead.pop(ctx.start, None) or await self._kept_day_ahead(ctx)
        if day_ahead is not None:  # day after day: agreed the day before (by this run or another)
            await self._write(day_ahead.model_copy(update={"realtime": info}), ctx)
        elif agreement is None:  # restarted mid-day: its part of the day only
            out = self.settings.out
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / "realtime.json").write_text(info.model_dump_json(indent=1), encoding="utf-8")
                log.info("wrote %s", out / "realtime.json")
        else:
            day_ahead = await self._off_loop(self._day_ahead, ctx, agreement)
            await self._write(day_ahead.model_copy(update={"realtime": info}), ctx)
        self._forget_checkpoint(ctx)
        v = info.envelope_violations
        log.info(
            "the day is over: %d intervals, %d settlements, %d sustained violations, %d envelope switches, "
            "%d failed rounds",
            len(info.intervals), len(info.settlements), v.count, len(info.fallback_events),
            len(report.failures),
        )  # fmt: skip

    def _forget_checkpoint(self, ctx: Context) -> None:
        """Day after day: a day over needs its checkpoint no more (a restart runs from the day in force)."""
        if self.daily and self.settings.checkpoint is not None:
            dated(self.settings.checkpoint, local_date(ctx)).unlink(missing_ok=True)

    async def _kept_day_ahead(self, ctx: Context) -> Results | None:
        """The day's day-ahead results another run of a coordinator running day after day wrote
        (read off the loop: a results file is large)."""
        if not self.daily or self.settings.out is None:
            return None
        date = local_date(ctx).isoformat()
        path = self.settings.out / "results" / f"{date}.json"
        try:
            kept = await self._off_loop(_read_results, path)
        except (OSError, ValueError) as exc:
            log.warning("no day-ahead results of %s to complete (%s)", date, str(exc).splitlines()[0])
            return None
        if kept.start != iso(ctx.start):
            log.warning("no day-ahead results of %s to complete (%s is of %s)", date, path, kept.start)
            return None
        log.info("completing the day-ahead results of %s another run wrote (%s)", date, path)
        return kept

    async def _write(self, results: Results, ctx: Context) -> None:
        if self.settings.out is not None:
            fairness = default_fairness(ctx.cfg, ctx.defaults)
            summary = day_summary(results, ctx.cfg.timezone).model_copy(
                update={"default_sharing": ctx.cfg.default_sharing, "default_fairness": fairness}
            )
            self.written = await self._off_loop(write_results, results, self.settings.out, summary)
            log.info("wrote %s and results/%s.json", self.written, summary.date)
            if results.realtime is not None:
                log.info("%s", summary_line(summary))


def _read_results(path: Path) -> Results:
    return Results.model_validate_json(path.read_bytes())


def local_date(ctx: Context) -> date:
    """The day's date on the DSO's clock."""
    return ctx.start.astimezone(zone(ctx.cfg.timezone)).date()


def write_results(results: Results, out: Path, summary: DaySummary | None = None) -> Path:
    """OUT/results.json (the latest day); with its summary also OUT/results/<date>.json and
    OUT/results/<date>.summary.json (a file per day, kept)."""
    text = results.model_dump_json(indent=1)
    if summary is not None:
        _replace(out / "results" / f"{summary.date}.json", text)
        _replace(out / "results" / f"{summary.date}.summary.json", summary.model_dump_json(indent=1))
    return _replace(out / "results.json", text)


def _replace(path: Path, text: str) -> Path:
    """Written whole: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def summary_line(s: DaySummary) -> str:
    worst = "" if s.worst_violation_kw is None else f" (worst {s.worst_violation_kw:.1f} kW)"
    return (
        f"{s.date}: {s.intervals} intervals, day-ahead {s.day_ahead_status or 'none'} "
        f"({s.sites_agreed} sites agreed), {s.rolling_rounds} rolling rounds ({s.failed_rounds} failed), "
        f"{s.settlements} settlements ({s.missing_settlements} missing), "
        f"{s.sustained_violations} sustained violations{worst}{_fairness(s)}"
    )


def _fairness(s: DaySummary) -> str:
    if s.default_fairness is None:
        return ""
    return f", default envelopes {s.default_sharing} (Jain {s.default_fairness:.3f})"


def log_round(agreement: Agreement, results: Results) -> None:
    log.info(
        "round %s: %s after %d iterations, objective %.2f EUR, %d sites agreed, %d on defaults",
        agreement.outcome.round,
        agreement.outcome.status,
        agreement.outcome.iterations,
        results.objective_eur,
        len(agreement.setup.sites),
        len(agreement.setup.excluded),
    )
