"""`p2pdoe demo`: the whole system on this machine, one process per participant.

It writes the configurations (`p2pdoe site-config`), starts a broker (the embedded pure-Python one
unless `--broker` names another), the DSO coordinator and one edge agent per community, and shows the
agreement's progress from the coordinator's `dso/progress` topic. With `--day-ahead` it stops after
the day-ahead round; otherwise one meter simulator per site joins, and the accelerated day follows on
the shared simulated clock (`--hours`, `--speed`): rolling rounds, enforcement against the meters,
settlements (p2pdoe.cli.demo_realtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from rich.table import Table

from p2pdoe.cli.console import make_console
from p2pdoe.core import topics
from p2pdoe.core.community import REALTIME_MARGINS
from p2pdoe.core.market import with_margins
from p2pdoe.core.schemas.results import MarketOutcome, RealtimeInfo, Results
from p2pdoe.core.schemas.runtime import Progress, decode_runtime
from p2pdoe.errors import P2PDoeError
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.report.numbers import fixed
from p2pdoe.services.provision import Access

console = make_console(soft_wrap=True)
STOP_GRACE_S = 5.0
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Processes:
    """Child processes with their logs in one folder; all stopped (SIGTERM, then SIGKILL) on exit."""

    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.running[name] = proc
        return proc

    def tail(self, name: str, lines: int = 15) -> str:
        text = (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.running.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()


@contextlib.contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


@dataclass(frozen=True)
class RealTime:
    """The simulated day after the day-ahead round: on the lockstep clock (simulated time moves on
    when every process has finished its step), or on the scaled clock (`speed` x wall time)."""

    hours: float = 24.0
    speed: float = 640.0  # scaled: simulated seconds per wall second (24 h in 2.25 min)
    meter_rate_s: float = 30.0  # simulated seconds between meter readings: the lockstep's step
    lead_s: float = 20.0  # scaled: wall seconds before the day starts (registration and day-ahead)
    clock: Literal["lockstep", "scaled"] = "lockstep"
    silence_timeout_s: float = 60.0  # lockstep: a process silent this long is named and left out
    days: int = 1  # whole days one after another (then `hours` is not used)
    dated: bool = False  # each date its own scenario: the meters' truth and the sites' forecasts

    @property
    def span_h(self) -> float:
        """How long the real-time run lasts (simulated hours)."""
        return self.hours if self.days == 1 else 24.0 * self.days

    def coordinator_args(self) -> list[str]:
        one_day = ["--exit-after-day", "--hours", f"{self.hours:g}"]
        days = one_day if self.days == 1 else ["--days", str(self.days)]
        return ["--rolling", *days, "--meter-step-s", f"{self.meter_rate_s:g}"]


def run_demo(
    scenario: str,
    overrides: dict[str, Any],
    broker: str | None,
    out: Path,
    day_ahead: bool,
    policy: str,
    realtime: RealTime | None = None,
    secure: bool = False,
    sharing: str | None = None,
) -> Results:
    s = load_scenario(scenario, overrides)
    config = out / "config"
    write_site_configs(s, config)
    results_path = out / "results.json"
    results_path.unlink(missing_ok=True)
    (out / "realtime.json").unlink(missing_ok=True)  # written instead when no day-ahead agreement came
    shutil.rmtree(out / "journal", ignore_errors=True)  # each demo is a new day: no journal of the last
    shutil.rmtree(out / "results", ignore_errors=True)  # nor the days of the last
    rt = None if day_ahead else (realtime or RealTime())
    with contextlib.ExitStack() as stack:
        from p2pdoe.services.transport import without_password

        reach = _broker(stack, broker, secure, s, out)
        monitor = reach("monitor")
        asyncio.run(_reachable(monitor))
        procs = stack.enter_context(processes(out / "logs"))
        clock = _clock_args(s, rt)
        how = f" (TLS and ACL, bundle {out / 'bundle'})" if secure else ""
        console.print(
            f"broker {without_password(monitor.url)}{how}; {len(s.ids)} edge agents and the coordinator, "
            f"logs in {out / 'logs'}"
        )
        py = sys.executable
        if rt is not None and rt.clock == "lockstep":
            procs.start(
                "clock",
                [
                    py,
                    "-m",
                    "p2pdoe.services.lockstep",
                    *reach("dso").unsigned().args(),
                    *_granter_args(s, rt),
                ],
            )
        coordinator = procs.start(
            "dso-coordinator",
            [py, "-m", "dso_coordinator", "--coordinator-config", str(config / "coordinator.json"),
             *reach("dso").args(), "--out", str(out), "--policy", policy, "--registration-timeout-s", "120",
             *clock, *(["--exit-after-round"] if rt is None else rt.coordinator_args()),
             *([] if sharing is None else ["--default-sharing", sharing])],
        )  # fmt: skip
        forecasts = _dated_forecasts(scenario, overrides, s, rt, out)
        for site in s.ids:
            site_config = str(config / "sites" / f"{site}.json")
            meter = [] if rt is None else [
                "--meter", "--meter-step-s", f"{rt.meter_rate_s:g}",
                "--journal", str(out / "journal" / f"{site}.db"),
            ]  # fmt: skip
            dated = [] if site not in forecasts else ["--forecast-file", str(forecasts[site])]
            procs.start(
                f"edge-{site}",
                [py, "-m", "edge_agent", "--site-config", site_config, *reach(f"edge-{site}").args(),
                 *clock, *meter, *dated],
            )  # fmt: skip
            if rt is not None:
                truth = [] if site not in forecasts else ["--profile-file", str(forecasts[site])]
                procs.start(
                    f"meter-{site}",
                    [py, "-m", "meter_sim", "--site-config", site_config, *reach(f"edge-{site}").args(),
                     *clock, "--rate-s", f"{rt.meter_rate_s:g}", "--days", str(rt.days), *truth],
                )  # fmt: skip
        seen = None
        if rt is None:
            asyncio.run(_watch(monitor, coordinator, results_path, procs))
        else:
            from p2pdoe.cli.demo_realtime import watch_day

            seen = asyncio.run(watch_day(monitor, coordinator, procs, console))
        if not results_path.exists():
            raise P2PDoeError(_without_results(out, procs))
        results = Results.model_validate_json(results_path.read_bytes())
        _report(s if rt is None else with_margins(s, REALTIME_MARGINS), results, policy, out)
        if seen is not None and rt is not None:
            from p2pdoe.cli.demo_realtime import judge_day, report_day, report_days

            report_day(results, seen, out, console)
            report_days(out, console)
        page = _write_page(results, seen, out)
        console.print(f"report: {page} (and report.md)")
        judge_sites(results, s.ids, procs.logs)
        if rt is not None:
            judge_day(results, rt.lead_s)
    return results


def _write_page(results: Results, seen: Any, out: Path) -> Path:
    """The demo's one-page report (report.md, report.html) beside results.json."""
    from p2pdoe import __version__
    from p2pdoe.cli.jobs import command_line
    from p2pdoe.report.page import Check, Page, Table, day_facts, network_checks, write_page

    sv = results.solver
    checks = [
        Check("the day-ahead round over MQTT", sv.converged, f"{sv.status} after {sv.iterations} iterations"),
        *network_checks("agreed", results),
    ]
    tables = [Table("The day-ahead agreement", SITE_COLUMNS, site_rows(results))]
    kind = "the day-ahead round"
    if seen is not None and results.realtime is not None:
        from p2pdoe.cli.demo_realtime import DAY_COLUMNS, day_checks, day_rows

        kind = "a real-time day"
        checks += day_checks(results, seen)
        tables.append(Table("The real-time day, per site", DAY_COLUMNS, day_rows(results, seen)))
    figures = sorted(out.glob("*.png"))
    page = Page(
        f"{results.scenario}: {kind}, run here",
        command_line(),
        __version__,
        day_facts(results),
        tables,
        checks,
        figures,
    )
    return write_page(page, out)[1]


def _dated_forecasts(
    scenario: str, overrides: dict[str, Any], s: Any, rt: RealTime | None, out: Path
) -> dict[str, Path]:
    """With `rt.dated`: every site's forecast of the run's days, each date its own scenario, written
    to out/forecasts/<site>.json (its edge's forecast file and its meter's truth)."""
    folder = out / "forecasts"
    shutil.rmtree(folder, ignore_errors=True)
    if rt is None or not rt.dated:
        return {}
    from p2pdoe.core.day_configs import scenario_forecast

    first = _day_start(s).date()
    days = [load_scenario(scenario, overrides, day=first + timedelta(days=k)) for k in range(rt.days)]
    folder.mkdir(parents=True)
    paths = {}
    for site in s.ids:
        f = scenario_forecast(days, site, days[0].start - timedelta(hours=12))
        paths[site] = folder / f"{site}.json"
        paths[site].write_text(f.model_dump_json(), encoding="utf-8")
    return paths


def _without_results(out: Path, procs: Processes) -> str:
    """Why there is no results.json: a real-time day without a day-ahead agreement (the coordinator
    ran it on the defaults and wrote realtime.json), or the coordinator's last lines."""
    realtime = out / "realtime.json"
    if realtime.exists():
        info = RealtimeInfo.model_validate_json(realtime.read_bytes())
        why = info.failed_rounds[0] if info.failed_rounds else "no day-ahead agreement"
        fix = (
            f"; on the scaled clock at {info.speed:g}x this machine was too slow for it: run without "
            "--speed (the lockstep clock) or give --lead-s more"
            if info.clock == "scaled"
            else ""
        )
        return (
            f"no day-ahead agreement ({why}); the real-time day ran on the default envelopes: "
            f"{realtime} ({info.envelope_violations.count} sustained violations, "
            f"{len(info.settlements)} settlements){fix}"
        )
    return f"the coordinator ended without results:\n{procs.tail('dso-coordinator')}"


def _day_start(s: Any) -> datetime:
    """Today's date at the scenario's time of day (the latest that has begun)."""
    from p2pdoe.core.realtime.clock import day_start

    return day_start("today", s.start.isoformat(), s.dt_h, datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _clock_args(s: Any, rt: RealTime | None) -> list[str]:
    """Every process's clock: lockstep (the day starts when the granter says), or the scaled clock on
    which the day starts `lead_s` from now (wall); without the real-time day, plain wall time."""
    if rt is None:
        return ["--start", "today"]
    start = _day_start(s)
    if rt.clock == "lockstep":
        return ["--clock", "lockstep", "--start", _iso(start)]
    wall = datetime.now(UTC) + timedelta(seconds=rt.lead_s)
    return [
        "--start",
        _iso(start),
        "--sim-origin",
        _iso(start),
        "--wall-origin",
        _iso(wall),
        "--speed",
        f"{rt.speed:g}",
    ]


def _granter_args(s: Any, rt: RealTime) -> list[str]:
    """The lockstep granter: steps of one meter reading from the meters' lead-in (one interval before
    the day) to two steps past the day's end (the last settlements), every process a member."""
    start = _day_start(s)
    first = start - timedelta(hours=s.dt_h)
    end = start + timedelta(hours=rt.span_h) + timedelta(seconds=2 * rt.meter_rate_s)
    members = ["dso:grid", *(f"edge-{i}:control" for i in s.ids), *(f"meter-{i}:plant" for i in s.ids)]
    return ["--start", _iso(first), "--end", _iso(end), "--step-s", f"{rt.meter_rate_s:g}",
            "--members", ",".join(members), "--silence-timeout-s", f"{rt.silence_timeout_s:g}"]  # fmt: skip


async def _reachable(monitor: Access) -> None:
    await (await monitor.connect("p2pdoe-demo-probe", CONNECT_TIMEOUT_S)).close()


def _broker(
    stack: contextlib.ExitStack, broker: str | None, secure: bool, s: Any, out: Path
) -> Callable[[str], Access]:
    """How each identity reaches the broker: `--broker` or the embedded one for all; with `secure`, a
    bundle provisioned for this demo (out/bundle) and Mosquitto running its configuration as is."""
    from p2pdoe.services.broker import HOST, free_port, start_embedded, start_provisioned
    from p2pdoe.services.provision import access, site_peers, write_bundle

    if not secure:
        url = broker or stack.enter_context(start_embedded()).url
        return signed_access(url, out / "keys", ["dso", *(f"edge-{site}" for site in s.ids)])
    if broker is not None:
        raise P2PDoeError("--secure starts its own provisioned Mosquitto: leave out --broker")
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    try:
        description = write_bundle(bundle, site_peers(s.ids, s.market.peers), HOST, free_port())
    except ImportError:
        raise P2PDoeError("--secure needs the provisioning extra: pip install 'p2pdoe[provision]'") from None
    stack.enter_context(start_provisioned(bundle))
    return lambda username: access(description, username)


def signed_access(url: str, keys: Path, identities: list[str]) -> Callable[[str], Access]:
    """Every identity on one plain broker, each with a fresh signing key (in `keys`) and every
    identity's public key: signatures on by default, even without TLS and ACLs."""
    from p2pdoe.services.signing import write_keys

    shutil.rmtree(keys, ignore_errors=True)
    trusted = write_keys(keys, identities)

    def reach(username: str) -> Access:
        key = keys / f"{username}.key" if username in identities else None  # the monitor: none
        return Access(url, None, None, username, key, trusted)

    return reach


async def _watch(
    monitor: Access, coordinator: subprocess.Popen[bytes], results: Path, procs: Processes
) -> None:
    """Show the round's progress until results.json is written (or the coordinator fails)."""
    from rich.live import Live

    async with await monitor.connect(f"p2pdoe-demo-{id(procs):x}", CONNECT_TIMEOUT_S) as transport:
        await transport.subscribe(topics.DSO_PROGRESS, qos=0)
        started = time.monotonic()
        line = ["waiting for every site to register"]

        async def follow() -> None:
            async for m in transport.messages():
                line[0] = _progress_line(m.payload) or line[0]

        reader = asyncio.create_task(follow())
        try:
            with Live(console=console, transient=True, refresh_per_second=8) as live:
                while not results.exists():
                    if coordinator.poll() is not None:
                        raise P2PDoeError(f"the coordinator stopped:\n{procs.tail('dso-coordinator')}")
                    live.update(f"{line[0]}; {time.monotonic() - started:.0f} s")
                    await asyncio.sleep(0.125)
        finally:
            reader.cancel()


def _progress_line(payload: bytes) -> str:
    try:
        p = decode_runtime(payload)
    except ValueError:
        return "(an unreadable progress message)"
    if not isinstance(p, Progress):
        return ""
    left_out = f", {len(p.excluded_sites)} on defaults" if p.excluded_sites else ""
    return (
        f"round {p.round}: iteration {p.iteration} ({p.status}), {len(p.sites)} sites{left_out}; "
        f"trade residual {p.primal_trade_kw:.3f} / {p.eps_trade_kw:.3f} kW, "
        f"envelope residual {p.primal_envelope_kw:.3f} / {p.eps_envelope_kw:.3f} kW" + _price_part(p)
    )


def _price_part(p: Progress) -> str:
    if p.price_change_max_eur_per_kwh is None or p.eps_price_eur_per_kwh is None:
        return ""
    return f", prices moved {p.price_change_max_eur_per_kwh:.2g} / {p.eps_price_eur_per_kwh:.2g} EUR/kWh"


def judge_sites(results: Results, sites: Iterable[str], logs: Path) -> None:
    """A demo whose day-ahead round went on without some of its sites is an error that names them
    (the report is written): they ran on default envelopes, so the day is not the one asked for."""
    runtime = results.runtime
    rows = [] if runtime is None else runtime.sites
    agreed = {x.id for x in rows if x.state == "agreed"}
    expected = list(sites)
    missing = [site for site in expected if site not in agreed]
    if not missing:
        return
    reasons = {x.id: x.reason for x in rows}
    named = ", ".join(f"{site} ({reasons.get(site) or 'never registered'})" for site in missing)
    raise P2PDoeError(
        f"{len(missing)} of {len(expected)} sites took no part in the day-ahead agreement "
        f"and ran on default envelopes: {named}; see {logs / f'edge-{missing[0]}.log'}"
    )


def _report(s: Any, r: Results, policy: str, out: Path) -> None:
    """`s`: the scenario as the edge agents solve it (with margins in real time), for the reference."""
    from p2pdoe.core.solution import Policy
    from p2pdoe.report.plots import write_plots
    from p2pdoe.services.inprocess import run_admm

    if r.market is not None and r.market.bids_in_force is not None:  # the market cleared on bids
        from p2pdoe.analysis.bidding import with_bids

        s = with_bids(s, r.market.bids_in_force)
    reference = run_admm(s, Policy(policy)).solution.objective_eur
    _site_table(r)
    sv, rt = r.solver, r.runtime
    assert rt is not None
    gap = 100.0 * (r.objective_eur - reference) / max(1e-9, abs(r.totals.gross_energy_eur))
    console.print(
        f"ADMM over MQTT ({rt.protocol}): {sv.status} after {sv.iterations} iterations "
        f"in {sv.wall_time_s:.1f} s "
        f"({rt.iteration_wall_ms['median']:.1f} ms per iteration, median); "
        f"{sv.messages_per_iteration or 0:.1f} messages per iteration; {_attempts(r)} attempt(s)"
    )
    console.print(
        f"objective {r.objective_eur:.4f} EUR; in-process ADMM {reference:.4f} EUR "
        f"(difference {gap:+.5f} % of gross energy cost)"
    )
    if r.market is not None:
        _market_report(s, r, policy)
    for path in write_plots({"distributed": r}, out):
        console.print(f"plot: {path}")
    console.print(f"wrote {out / 'results.json'}")


def _attempts(r: Results) -> int:
    """Openings of the welfare round, the last round (a cooperative design's standalone and
    coalition rounds come before it)."""
    assert r.runtime is not None
    rounds = [a.round.split(".")[0] for a in r.runtime.attempts]
    return rounds.count(rounds[-1]) if rounds else 0


def _market_report(s: Any, r: Results, policy: str) -> None:
    """A design's payments over MQTT (cooperative ones) or the bids it ended at (noncooperative), each
    community's gain, and the in-process answer."""
    from p2pdoe.cli.jobs import run_policy
    from p2pdoe.core.solution import Policy

    m, rt = r.market, r.runtime
    assert m is not None
    assert rt is not None
    own = run_policy(s, Policy(policy), "admm").market
    assert own is not None
    if m.design == "nash-bargaining":
        how = f"Nash bargaining over MQTT (EUR): {m.payment_round}, {m.status} after {m.iterations}"
    elif m.design == "shapley":
        how = f"Shapley values over MQTT (EUR): {m.iterations} coalition rounds"
    else:
        how = f"Strategic bids over MQTT (EUR): {m.profiles_cleared} bid rounds, {m.status}"
    table = Table(title=how)
    for col in ("site", "alone", "before pay", "pays peers", "gain", "in-process"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, gain in m.gains_eur.items():
        table.add_row(
            site, fixed(m.baseline_cost_eur[site]), fixed(m.cost_before_payments_eur[site]),
            fixed(m.net_payment_eur[site]), fixed(gain), fixed(own.gains_eur.get(site, float("nan"))),
        )  # fmt: skip
    console.print(table)
    worst = max(abs(g - own.gains_eur[c]) for c, g in m.gains_eur.items() if c in own.gains_eur)
    alone = [a.iterations for a in rt.attempts if a.round.split(".")[0] == m.baseline_round]
    stage2 = _stage2(m)
    console.print(
        f"the standalone round {m.baseline_round} ({alone[-1] if alone else '?'} iterations) gave each "
        f"community its cost alone; {stage2}; largest gap to the in-process answer {worst:.2e} EUR"
    )


def _stage2(m: MarketOutcome) -> str:
    if m.design == "nash-bargaining":
        kb = (m.bytes_per_iteration or 0) / 1e3
        return f"{m.messages_per_iteration or 0:.1f} messages, {kb:.1f} kB per payment iteration"
    if m.design == "shapley":
        return f"{len(m.coalitions)} coalition values"
    bids = ", ".join(f"{site} {x:g}" for site, x in (m.bids_in_force or {}).items() if x)
    poa = "-" if m.price_of_anarchy is None else f"{m.price_of_anarchy:.4f}"
    return f"sale markups in force (EUR/kWh): {bids or 'none'}; price of anarchy {poa}"


SITE_COLUMNS = ("site", "state", "mean DOE kW", "cost EUR", "sold kWh", "RSS MB")


def site_rows(r: Results) -> list[list[str]]:
    """Each site of the day-ahead agreement: its state, mean envelope, cost, sales and memory."""
    assert r.runtime is not None
    by_id = {c.id: c for c in r.communities}
    rows = []
    for site in r.runtime.sites:
        c = by_id.get(site.id)
        lo = sum(c.envelope_lo_kw) / len(c.envelope_lo_kw) if c else None
        up = sum(c.envelope_up_kw) / len(c.envelope_up_kw) if c else None
        rows.append([
            site.id,
            site.state if site.reason is None else f"{site.state} ({site.reason})",
            "-" if lo is None or up is None else f"[{fixed(lo, 0)}, {fixed(up, 0)}]",
            "-" if c is None else fixed(c.cost_eur),
            "-" if c is None else fixed(c.p2p_sold_kwh, 0),
            "-" if site.rss_mb is None else f"{site.rss_mb:.0f}",
        ])  # fmt: skip
    return rows


def _site_table(r: Results) -> None:
    table = Table(title=f"{r.scenario}: the day-ahead agreement, {r.envelope} envelopes")
    for col in SITE_COLUMNS:
        table.add_column(col, justify="left" if col in ("site", "state") else "right")
    for row in site_rows(r):
        table.add_row(*row)
    console.print(table)
