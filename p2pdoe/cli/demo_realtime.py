"""The demo's real-time day: a live view and an independent violation count from the broker alone
(meter readings and envelopes, nothing the sites or the coordinator say of themselves), then the
report: a summary table, and plots of measured injection against envelopes, state of charge,
voltages from an AC power flow of the measured injections, and settlements."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from p2pdoe.core import topics
from p2pdoe.core.realtime.observer import ViolationObserver
from p2pdoe.core.schemas.results import DaySummary, Results
from p2pdoe.core.schemas.runtime import Doe, MeterReading, Progress, SiteStatus, decode_runtime
from p2pdoe.errors import P2PDoeError
from p2pdoe.report.numbers import fixed

if TYPE_CHECKING:
    from p2pdoe.cli.demo import Processes
    from p2pdoe.services.provision import Access


@dataclass
class Observation:
    observer: ViolationObserver = field(default_factory=ViolationObserver)
    readings: dict[str, list[tuple[datetime, float, float | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )  # site -> (ts, p_kw, soc_kwh)
    envelopes: dict[str, str] = field(default_factory=dict)  # site -> kind applied (its status)
    round_line: str = "waiting for the day-ahead round"
    sim_now: datetime | None = None

    def take(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        if parsed is None or not payload:
            return
        try:
            msg = decode_runtime(payload)
        except ValueError:
            return
        if isinstance(msg, MeterReading):
            self.observer.reading(msg)
            self.readings[msg.site].append((msg.ts, msg.p_kw, msg.soc_kwh))
            self.sim_now = msg.ts if self.sim_now is None else max(self.sim_now, msg.ts)
        elif isinstance(msg, Doe):
            self.observer.envelope(parsed.kind, msg)
        elif isinstance(msg, SiteStatus):
            self.envelopes[msg.site] = msg.envelope + (f" [{msg.alarm}]" if msg.alarm else "")
        elif isinstance(msg, Progress):
            self.round_line = f"round {msg.round}: iteration {msg.iteration} ({msg.status})"

    def line(self, started: float) -> str:
        now = "before the day" if self.sim_now is None else self.sim_now.strftime("%H:%M")
        kinds: dict[str, int] = defaultdict(int)
        for kind in self.envelopes.values():
            kinds[kind] += 1
        applied = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "-"
        o = self.observer
        return (
            f"simulated {now}; {self.round_line}; envelopes: {applied}; readings {o.judged}, "
            f"sustained violations {len(o.violations)}; {time.monotonic() - started:.0f} s"
        )


async def watch_day(
    monitor: Access, coordinator: subprocess.Popen[bytes], procs: Processes, console: Any
) -> Observation:
    """Follow the day from the broker until the coordinator exits (it writes results.json first)."""
    from rich.live import Live

    seen = Observation()
    async with await monitor.connect(f"p2pdoe-demo-day-{id(procs):x}", 10.0) as transport:
        for kind in ("doe", "doe/default", "status"):
            await transport.subscribe(topics.every_site(kind))
        await transport.subscribe(topics.every_site("meter"), qos=0)
        await transport.subscribe(topics.DSO_PROGRESS, qos=0)

        async def follow() -> None:
            async for m in transport.messages():
                seen.take(m.topic, m.payload)

        reader = asyncio.create_task(follow())
        started = time.monotonic()
        try:
            with Live(console=console, transient=True, refresh_per_second=4) as live:
                while coordinator.poll() is None:
                    live.update(seen.line(started))
                    await asyncio.sleep(0.25)
        finally:
            reader.cancel()
    if coordinator.returncode != 0:
        raise P2PDoeError(f"the coordinator stopped:\n{procs.tail('dso-coordinator')}")
    return seen


def report_day(results: Results, seen: Observation, out: Path, console: Any) -> None:
    rt = results.realtime
    if rt is None:
        raise P2PDoeError("results.json has no real-time section")
    _day_table(results, seen, console)
    v = rt.envelope_violations
    statuses: dict[str, int] = defaultdict(int)
    for i in rt.intervals:
        statuses[i.status] += 1
    leads = [i.lead_s for i in rt.intervals]
    clock = "the lockstep clock" if rt.clock == "lockstep" else f"the {rt.clock} clock at {rt.speed:g}x"
    console.print(
        f"real-time day: {rt.hours:.1f} h simulated on {clock}; {len(rt.intervals)} rolling rounds "
        f"({', '.join(f'{n} {k}' for k, n in sorted(statuses.items()))}); envelopes published "
        f"{min(leads, default=0) / 60:.1f}-{max(leads, default=0) / 60:.1f} min (simulated) ahead"
    )
    console.print(
        f"violations (observer on the broker): {len(seen.observer.violations)} sustained in "
        f"{seen.observer.judged} readings; coordinator's count {v.count}; "
        f"settlements {len(rt.settlements)}, energy vs meter within {rt.energy_mismatch_max_pct:.3f} %"
    )
    if rt.measured_ac is not None:
        ac = rt.measured_ac
        console.print(
            f"AC power flow of the measured injections: {ac.vmin_pu:.4f}-{ac.vmax_pu:.4f} p.u., "
            f"max loading {ac.max_loading_pct:.0f} %, {ac.voltage_violations} voltage and "
            f"{ac.thermal_violations} thermal violations"
        )
    (out / "observed.json").write_text(json.dumps(_observed(seen)), encoding="utf-8")
    from p2pdoe.report.realtime_plots import write_realtime_plots

    first = datetime.fromisoformat(results.start.replace("Z", "+00:00")) - timedelta(hours=results.dt_h)
    readings = {site: [r for r in rs if r[0] >= first] for site, rs in seen.readings.items()}  # its day's
    for path in write_realtime_plots(results, readings, out):
        console.print(f"plot: {path}")


def judge_day(results: Results, lead_s: float) -> None:
    """A day whose timing went wrong is an error with its cause and its fix (the report is written)."""
    rt = results.realtime
    assert rt is not None
    if rt.day_ahead_late_s > 0:
        raise P2PDoeError(
            f"the day-ahead round ended {rt.day_ahead_late_s:.0f} s (simulated) after the day began, so the "
            f"sites ran on default envelopes meanwhile: this machine is slower than the scaled clock at "
            f"{rt.speed:g}x allows; run without --speed (the lockstep clock) or give --lead-s more than "
            f"{lead_s:g} s"
        )


DAY_COLUMNS = ("site", "n", "kWh", "planned", "P2P €", "grid €", "net €", "viol.", "switch")


def day_rows(results: Results, seen: Observation) -> list[list[str]]:
    """Each site's real-time day: settled intervals, energy measured and planned, money, sustained
    violations and envelope switches."""
    rt = results.realtime
    assert rt is not None
    by_site: dict[str, list[Any]] = defaultdict(list)
    for s in rt.settlements:
        by_site[s.site].append(s)
    switches: dict[str, int] = defaultdict(int)
    for e in rt.fallback_events:
        switches[e.site] += 1
    violations = seen.observer.by_site()
    return [
        [
            site,
            str(len(rows)),
            fixed(sum(r.measured_kwh for r in rows), 0),
            fixed(sum(r.scheduled_kwh for r in rows), 0),
            fixed(sum(r.p2p_paid_eur - r.p2p_received_eur for r in rows)),
            fixed(sum(r.grid_eur for r in rows)),
            fixed(sum(r.net_eur for r in rows)),
            str(violations.get(site, 0)),
            str(switches[site]),
        ]
        for site, rows in sorted(by_site.items())
    ]


def day_checks(results: Results, seen: Observation) -> list[Any]:
    """The real-time day's checks: no sustained violation, every interval settled, the measured
    injections inside the network's limits in an AC power flow."""
    from p2pdoe.report.page import Check

    rt = results.realtime
    assert rt is not None
    found = len(seen.observer.violations)
    missing = sum(len(starts) for starts in rt.missing_settlements.values())
    checks = [
        Check(
            "sustained envelope violations (observer on the broker)",
            found == 0,
            f"{found} in {seen.observer.judged} readings",
        ),
        Check(
            "settlements",
            not missing,
            f"{len(rt.settlements)} settled, {missing} missing; energy against the meter within "
            f"{rt.energy_mismatch_max_pct:.3f} %",
        ),
    ]
    if rt.measured_ac is not None:
        ac = rt.measured_ac
        ok = ac.voltage_violations == 0 and ac.thermal_violations == 0
        detail = (
            f"{ac.vmin_pu:.4f}-{ac.vmax_pu:.4f} p.u., max loading {ac.max_loading_pct:.0f} %, "
            f"{ac.voltage_violations} voltage and {ac.thermal_violations} thermal violations"
        )
        checks.append(Check("AC power flow of the measured injections", ok, detail))
    return checks


def _day_table(results: Results, seen: Observation, console: Any) -> None:
    table = Table(title="the real-time day, per site")
    for col in DAY_COLUMNS:
        table.add_column(col, justify="left" if col == "site" else "right")
    for row in day_rows(results, seen):
        table.add_row(*row)
    console.print(table)


def _observed(seen: Observation) -> dict[str, Any]:
    o = seen.observer
    return {
        "judged_readings": o.judged,
        "outside_readings": o.outside,
        "sustained_violations": len(o.violations),
        "by_site": o.by_site(),
        "violations": [
            {
                "site": v.site,
                "start": v.start.isoformat(),
                "end": v.end.isoformat(),
                "readings": v.readings,
                "worst_kw": round(v.worst_kw, 3),
            }
            for v in o.violations
        ],
        "outside": [
            {
                "site": x.site,
                "ts": x.ts.isoformat(),
                "p_kw": round(x.p_kw, 3),
                "lo_kw": round(x.lo_kw, 3),
                "up_kw": round(x.up_kw, 3),
                "excess_kw": round(x.excess_kw, 3),
            }
            for x in o.outside_readings
        ],
    }


def report_days(out: Path, console: Any) -> None:
    """One line per day the coordinator kept (OUT/results/<date>.summary.json)."""
    from dso_coordinator.service import summary_line

    for path in sorted((out / "results").glob("*.summary.json")):
        console.print(summary_line(DaySummary.model_validate_json(path.read_bytes())))
