"""The real-time day as processes over a real Mosquitto on the lockstep clock (`p2pdoe demo`'s way):
its outcome does not depend on the machine's speed, so it equals, to the last digit, the same day run
in one process on the virtual clock (p2pdoe.cli.virtual_day); the violations a plain MQTT client
counts from the broker equal the coordinator's; and a process that stops answering is named by the
granter while the others go on."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from realtime_helpers import read_journal

from p2pdoe.cli.demo import RealTime, run_demo
from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core.schemas.results import RealtimeInfo, Results
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.broker import Broker

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}


def _fingerprint(rt: RealtimeInfo, start: str) -> dict[str, object]:
    """What the day did, independent of its date: rounds, settlements, violations."""
    return {
        "intervals": [(i.interval, i.status, i.iterations, i.lo_kw, i.up_kw) for i in rt.intervals],
        "settlements": sorted(
            (s.site, s.interval_start.split("T")[1], s.measured_kwh, s.net_eur, s.readings)
            for s in rt.settlements
        ),
        "violations": rt.envelope_violations.count,
        "judged": rt.envelope_violations.judged_readings,
        "missing": rt.missing_settlements,
        "start": start.split("T")[1],
    }


@pytest.mark.timeout(900)
def test_the_lockstep_day_over_mosquitto_equals_the_virtual_day(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    rt = RealTime(hours=1.0)
    processes = run_demo(
        "default", QUARTER_HOURS, mosquitto_broker.url, tmp_path / "demo", False, "dynamic", rt
    )
    assert processes.realtime is not None
    virtual = VirtualDay(load_scenario("default", QUARTER_HOURS), tmp_path / "virtual", hours=1.0).run()
    assert virtual.realtime is not None
    assert _fingerprint(processes.realtime, processes.start) == _fingerprint(virtual.realtime, virtual.start)
    assert processes.realtime.clock == "lockstep"
    assert len(processes.realtime.settlements) == 4 * 6  # every interval of the hour settled, the last too
    observed = json.loads((tmp_path / "demo" / "observed.json").read_text())  # a plain client's count
    assert observed["sustained_violations"] == processes.realtime.envelope_violations.count
    assert observed["judged_readings"] == processes.realtime.envelope_violations.judged_readings


@pytest.mark.timeout(900)
def test_a_process_that_stops_answering_is_named_and_the_day_goes_on(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """A meter simulator is killed after the day has begun: the granter names it once it has been
    silent `silence_timeout_s`, and the coordinator, the other sites and the granter run to the end."""
    out = tmp_path / "demo"
    rt = RealTime(hours=1.0, silence_timeout_s=5.0)
    runner, result = _demo_in_background(mosquitto_broker, out, rt)
    victim = "wind-25"
    _wait_for(lambda: "interval 2:" in _log(out, "dso-coordinator"), 600, "the day's second round")
    pid = _pid_of(f"{out}/config/sites/{victim}.json", "meter_sim")
    os.kill(pid, signal.SIGKILL)
    runner.join(600)
    assert not runner.is_alive()
    assert result
    assert isinstance(result[0], Results), result
    assert f"meter-{victim}" in _log(out, "clock")
    assert "silent" in _log(out, "clock")
    day = result[0].realtime
    assert day is not None
    others = {s.site for s in day.settlements if s.site != victim}
    assert len(others) == 5
    assert all(sum(1 for s in day.settlements if s.site == site) == 4 for site in others)


@pytest.mark.timeout(900)
def test_a_broker_stalled_for_15_seconds_mid_day_changes_nothing(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """Mosquitto SIGSTOPped for 15 s, longer than every service's acknowledgement timeout (10 s), once
    the day's second round has run: before, every service exited ("publish ... failed: Operation timed
    out") and the plants ran uncontrolled. Now each waits through it, and the day is the virtual day's
    to the last digit."""
    out = tmp_path / "demo"
    rt = RealTime(hours=1.0)
    runner, result = _demo_in_background(mosquitto_broker, out, rt)
    _wait_for(lambda: "interval 2:" in _log(out, "dso-coordinator"), 600, "the day's second round")
    mosquitto_broker.freeze()
    try:
        time.sleep(15.0)
    finally:
        mosquitto_broker.thaw()
    processes = _finished(runner, result)
    assert processes.realtime is not None
    virtual = _virtual_day(tmp_path, 1.0)
    assert virtual.realtime is not None
    assert _fingerprint(processes.realtime, processes.start) == _fingerprint(virtual.realtime, virtual.start)
    logs = " ".join(p.read_text(errors="replace") for p in (out / "logs").glob("*.log"))
    assert "still waiting" in logs  # the stall was seen, and ridden through


@pytest.mark.timeout(900)
def test_a_broker_restarted_during_the_day_ahead_round_excludes_nobody(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """Mosquitto killed (nothing persisted) and started again 2 s later while the day-ahead round
    runs: before, three sites back online before the deadline stayed excluded (+324 EUR on the
    objective). Now the coordinator repeats its last grant at the deadline, the sites answer with
    their proposals, every site takes part, and the day is the virtual day's to the last digit."""
    out = tmp_path / "demo"
    runner, result = _demo_in_background(mosquitto_broker, out, RealTime(hours=0.5))
    _wait_for(lambda: "round day-ahead opened" in _log(out, "dso-coordinator"), 600, "the day-ahead round")
    time.sleep(0.5)
    mosquitto_broker.kill()
    time.sleep(2.0)
    mosquitto_broker.start()
    processes = _finished(runner, result)
    assert processes.runtime is not None
    assert [s.id for s in processes.runtime.sites if s.state != "agreed"] == []
    assert processes.realtime is not None
    virtual = _virtual_day(tmp_path, 0.5)
    assert virtual.realtime is not None
    assert processes.objective_eur == pytest.approx(virtual.objective_eur, abs=1e-6)
    assert _fingerprint(processes.realtime, processes.start) == _fingerprint(virtual.realtime, virtual.start)


@pytest.mark.timeout(900)
def test_a_coordinator_frozen_for_60_seconds_mid_day_goes_on(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """The coordinator SIGSTOPped for 60 s once the day's second round has run: longer than the
    broker's keepalive (its session is dropped and its will published) and the granter's silence
    timeout (the day steps on without it). Before, it exited on resume ("not currently connected").
    Now it reconnects and ends the day: results written, no sustained violation, and every
    settlement sent while it was away is delivered when it is back (its persistent session; with a
    clean one they were lost and listed as missing)."""
    out = tmp_path / "demo"
    runner, result = _demo_in_background(mosquitto_broker, out, RealTime(hours=1.0, silence_timeout_s=30.0))
    _wait_for(lambda: "interval 2:" in _log(out, "dso-coordinator"), 600, "the day's second round")
    pid = _pid_of(f"{out}/config/coordinator.json", "dso_coordinator")
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(60.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    processes = _finished(runner, result)
    day = processes.realtime
    assert day is not None
    assert day.envelope_violations.count == 0
    coordinator = _log(out, "dso-coordinator")
    assert "connection lost" in coordinator
    assert "Traceback" not in coordinator
    assert "dso: silent" in _log(out, "clock")  # the granter named it and stepped on without it
    settled = {(s.site, s.interval_start) for s in day.settlements}
    assert len(settled) == 4 * 6  # queued by the broker for its persistent session while it was away
    assert day.missing_settlements == {}
    # ... and each is the one its site journaled, to the cent, counted once
    assert len(day.settlements) == len(settled)
    for site in {x.site for x in day.settlements}:
        journal = read_journal(out / "journal" / f"{site}.db").settlements
        mine = {datetime.fromisoformat(x.interval_start): x for x in day.settlements if x.site == site}
        assert {datetime.fromisoformat(k) for k in journal} == set(mine)
        for start, row in journal.items():
            x = mine[datetime.fromisoformat(start)]
            _, measured_kwh, _, _, paid_eur, received_eur, grid_kwh, grid_eur = row
            assert x.measured_kwh == pytest.approx(measured_kwh, abs=1e-9)
            assert x.grid_kwh == pytest.approx(grid_kwh, abs=1e-9)
            for theirs, ours in (
                (x.p2p_paid_eur, paid_eur),
                (x.p2p_received_eur, received_eur),
                (x.grid_eur, grid_eur),
            ):
                assert round(theirs, 2) == round(ours, 2)


def _demo_in_background(
    broker: Broker, out: Path, rt: RealTime
) -> tuple[threading.Thread, list[Results | BaseException]]:
    """`p2pdoe demo` of the default quarter-hour day running in a thread; its result (or what it
    raised) lands in the list once the thread ends."""
    result: list[Results | BaseException] = []

    def demo() -> None:
        try:
            result.append(run_demo("default", QUARTER_HOURS, broker.url, out, False, "dynamic", rt))
        except BaseException as exc:  # handed to the test's thread
            result.append(exc)

    runner = threading.Thread(target=demo)
    runner.start()
    return runner, result


def _finished(runner: threading.Thread, result: list[Results | BaseException]) -> Results:
    """The demo's results once its thread has ended (what it raised, if anything, fails the test)."""
    runner.join(600)
    assert not runner.is_alive()
    assert isinstance(result[0], Results), result
    return result[0]


def _virtual_day(tmp_path: Path, hours: float) -> Results:
    """The same day in one process on the virtual clock."""
    return VirtualDay(load_scenario("default", QUARTER_HOURS), tmp_path / "virtual", hours=hours).run()


def _log(out: Path, name: str) -> str:
    path = out / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s:g} s")


def _pid_of(needle: str, module: str) -> int:
    """The process this test started whose command line holds `needle` and runs `module`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if module in words and needle in words:
            return int(entry.name)
    raise AssertionError(f"no {module} process for {needle}")


@pytest.mark.timeout(1500)
def test_two_days_of_processes_over_mosquitto_equal_two_virtual_days(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """`p2pdoe demo --days 2` (hourly intervals, a reading a minute): day after day without a
    restart, the second day's round at noon of the first; each day equals the virtual one, every
    interval is settled, and the coordinator's settlements are the journals'."""
    hourly = {"horizon": {"intervals": 24, "dt_h": 1.0}}
    out = tmp_path / "demo"
    run_demo(
        "default", hourly, mosquitto_broker.url, out, False, "dynamic", RealTime(meter_rate_s=60.0, days=2)
    )
    virtual = VirtualDay(load_scenario("default", hourly), tmp_path / "virtual", rate_s=60.0, days=2)
    virtual.run_until_end()
    days = sorted((out / "results").glob("????-??-??.json"))
    assert len(days) == 2
    held = {}
    for mine, theirs in zip(days, sorted((virtual.root / "results").glob("????-??-??.json")), strict=True):
        a = Results.model_validate_json(mine.read_bytes())
        b = Results.model_validate_json(theirs.read_bytes())
        assert a.realtime is not None
        assert b.realtime is not None
        assert _fingerprint(a.realtime, a.start) == _fingerprint(b.realtime, b.start)
        assert a.realtime.envelope_violations.count == 0
        assert len(a.realtime.settlements) == 24 * 6
        assert a.runtime is not None
        assert a.runtime.attempts[-1].round == f"day-ahead-{mine.stem}"
        held |= {(s.site, s.interval_start): s for s in a.realtime.settlements}
    for site in load_scenario("default").ids:
        rows = read_journal(out / "journal" / f"{site}.db").settlements
        assert len(rows) == 48
        for start, row in rows.items():
            x = held[site, start.replace("+00:00", "Z")]
            assert x.net_eur == pytest.approx(float(row[4]) - float(row[5]) + float(row[7]), abs=0.005)
