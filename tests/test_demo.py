"""`p2pdoe demo --day-ahead`: the whole system as processes, over the embedded broker (the default on a
fresh machine) and over a Mosquitto given by --broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.services.broker import Broker, embedded_available, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
DEMO_TIMEOUT_S = 1200  # a net for a loaded machine: the answer never depends on it


def _check(run_out: str, out: Path) -> dict[str, object]:
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "distributed"
    assert results["solver"]["converged"] is True
    assert {s["state"] for s in results["runtime"]["sites"]} == {"agreed"}
    assert "difference +0.00000 %" in run_out or "difference -0.00000 %" in run_out
    for name in ("envelopes.png", "residuals.png", "voltages.png"):
        assert (out / name).stat().st_size > 10_000
    assert (out / "config" / "coordinator.json").exists()
    assert len(list((out / "logs").glob("edge-*.log"))) == len(results["runtime"]["sites"])
    return results


def test_demo_over_the_embedded_broker(tmp_path: Path) -> None:
    if not embedded_available():
        pytest.skip("amqtt is not installed")
    run = run_p2pdoe("demo", "--day-ahead", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    assert results["runtime"]["protocol"] == "v311"  # amqtt speaks MQTT 3.1.1 only
    _check_report(tmp_path, "the day-ahead round", checks=4)  # the round, AC at schedule and corners


def _check_report(out: Path, kind: str, checks: int) -> None:
    """The one-page report beside results.json: every plot embedded, every check passed."""
    page = (out / "report.html").read_text()
    assert f": {kind}, run here</h1>" in page
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png"))) >= 5
    assert page.count('class="pass"') == checks
    assert 'class="fail"' not in page
    assert (out / "report.md").exists()


def test_demo_over_a_given_mosquitto(mosquitto_broker: Broker, tmp_path: Path) -> None:
    run = run_p2pdoe("demo", "--day-ahead", "--broker", mosquitto_broker.url, "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    assert results["runtime"]["protocol"] == "v5"


def test_the_standalone_market_over_mosquitto_matches_its_in_process_answer(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """No peer-to-peer trade: the sites agree on envelopes alone, as the in-process ADMM does."""
    run = run_p2pdoe(
        "demo",
        "--day-ahead",
        "--market",
        "standalone",
        "--broker",
        mosquitto_broker.url,
        "--out",
        str(tmp_path),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    assert results["trades"] == []
    coordinator = json.loads((tmp_path / "config" / "coordinator.json").read_text())
    assert all(site["peers"] == [] for site in coordinator["sites"])


@pytest.mark.timeout(900)
def test_nash_bargaining_over_mosquitto_matches_its_in_process_answer_and_the_closed_form(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """The three rounds of the design through the services (standalone, welfare, payments): every
    community's cost alone, its cost before payments and its net payment equal those of the same
    machines run in-process (`solve --mode admm`), and with equal weights every community gains the
    same share of the saving, the bargaining's closed form."""
    args = ["--day-ahead", "--market", "nash-bargaining", "--broker", mosquitto_broker.url]
    demo = run_p2pdoe("demo", *args, "--out", str(tmp_path / "demo"), timeout=DEMO_TIMEOUT_S)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    results = _check(demo.stdout, tmp_path / "demo")
    market = results["market"]
    assert isinstance(market, dict)
    assert market["status"] == "converged"
    rounds = [a["round"] for a in results["runtime"]["attempts"]]  # type: ignore[index]
    assert rounds == ["day-ahead-standalone", "day-ahead"]
    assert results["runtime"]["registration_wait_s"] > 0  # type: ignore[index]  # kept across the rounds
    solve = run_p2pdoe(
        "solve", "--mode", "admm", "--market", "nash-bargaining", "--out", str(tmp_path / "solve")
    )
    assert solve.returncode == 0, solve.stdout + solve.stderr
    own = json.loads((tmp_path / "solve" / "results.json").read_text())["market"]
    for key in ("baseline_cost_eur", "cost_before_payments_eur", "net_payment_eur", "gains_eur"):
        assert market[key].keys() == own[key].keys()
        for site, eur in market[key].items():
            assert eur == pytest.approx(own[key][site], abs=1e-6), (key, site)
    saving = sum(market["baseline_cost_eur"].values()) - sum(market["cost_before_payments_eur"].values())
    assert saving > 100.0
    for site, gain in market["gains_eur"].items():
        assert gain == pytest.approx(saving / 6, abs=1e-3), site
    assert market["iterations"] == own["iterations"]
    paid = dict.fromkeys(market["gains_eur"], 0.0)
    for p in market["payments"]:
        paid[p["payer"]] += p["eur"]
        paid[p["payee"]] -= p["eur"]
    assert paid == pytest.approx(market["net_payment_eur"], abs=1e-9)
    assert "largest gap to the in-process answer" in demo.stdout


@pytest.mark.timeout(1800)
def test_shapley_over_mosquitto_matches_its_in_process_answer(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """Four communities: the standalone round, a round per coalition of two or three (ten), the
    welfare round; every coalition's value and every Shapley value equal those of the same rounds
    in-process (`solve --mode admm`), and the values add up to the grand coalition's (efficiency)."""
    _, results, market, own = _design_over_mosquitto("shapley", mosquitto_broker, tmp_path)
    assert (market["design"], market["iterations"], len(market["coalitions"])) == ("shapley", 10, 11)
    rounds = [a["round"] for a in results["runtime"]["attempts"]]  # type: ignore[index]
    assert rounds == ["day-ahead-standalone", *(f"day-ahead-c{k:02d}" for k in range(1, 11)), "day-ahead"]
    for site, value in market["gains_eur"].items():
        assert value == pytest.approx(own["gains_eur"][site], abs=1e-6), site
    theirs = {frozenset(c["members"]): c["value_eur"] for c in own["coalitions"]}
    for c in market["coalitions"]:
        assert c["value_eur"] == pytest.approx(theirs[frozenset(c["members"])], abs=1e-6), c["members"]
    grand = next(c["value_eur"] for c in market["coalitions"] if len(c["members"]) == 4)
    assert sum(market["gains_eur"].values()) == pytest.approx(grand, abs=1e-9)


@pytest.mark.timeout(1800)
def test_strategic_bids_over_mosquitto_match_their_in_process_answer(
    mosquitto_broker: Broker, tmp_path: Path
) -> None:
    """Four communities bidding markups on their sales: the standalone round, a trial round per bid
    profile the best responses ask for (each once), then the round in force on the equilibrium; the
    rounds, the bids and every gain equal those of the same machines in-process (`solve --mode
    admm`). On this day the sellers mark up (a non-trivial equilibrium), and it costs welfare."""
    demo, results, market, own = _design_over_mosquitto("noncooperative", mosquitto_broker, tmp_path)
    for key in ("design", "status", "bids", "bids_in_force", "profiles_cleared", "iterations"):
        assert market[key] == own[key], key
    assert market["status"] == "equilibrium"
    assert any(x > 0 for x in market["bids_in_force"].values())
    assert market["price_of_anarchy"] == pytest.approx(own["price_of_anarchy"], abs=1e-9)
    assert market["price_of_anarchy"] > 1.0
    for site, gain in market["gains_eur"].items():
        assert gain == pytest.approx(own["gains_eur"][site], abs=1e-6), site
    rounds = [a["round"] for a in results["runtime"]["attempts"]]  # type: ignore[index]
    bids = market["profiles_cleared"]
    assert rounds == [
        "day-ahead-standalone",
        *(f"day-ahead-b{k:02d}" for k in range(1, bids + 1)),
        "day-ahead",
    ]
    assert "Strategic bids over MQTT (EUR)" in demo.stdout


def _design_over_mosquitto(
    design: str, broker: Broker, tmp_path: Path
) -> tuple[Any, dict[str, object], dict[str, Any], dict[str, Any]]:
    """`design` on synthetic-4 over `broker` (the demo, checked) and in-process (`solve --mode admm`):
    the demo's run, its results, their market section and the in-process one."""
    args = ["--scenario", "synthetic-4", "--market", design]
    demo = run_p2pdoe(
        "demo",
        "--day-ahead",
        *args,
        "--broker",
        broker.url,
        "--out",
        str(tmp_path / "demo"),
        timeout=DEMO_TIMEOUT_S,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    results = _check(demo.stdout, tmp_path / "demo")
    market = results["market"]
    assert isinstance(market, dict)
    solve = run_p2pdoe(
        "solve", "--mode", "admm", *args, "--out", str(tmp_path / "solve"), timeout=DEMO_TIMEOUT_S
    )
    assert solve.returncode == 0, solve.stdout + solve.stderr
    own = json.loads((tmp_path / "solve" / "results.json").read_text())["market"]
    return demo, results, market, own


def test_demo_with_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    run = run_p2pdoe("demo", "--day-ahead", "--broker", url, "--out", str(tmp_path), timeout=60)
    assert_one_line_error(run, "cannot reach the broker", url)
    assert not (tmp_path / "logs").exists()  # nothing was started


@pytest.mark.timeout(1500)
def test_the_real_time_demo_over_the_embedded_broker(tmp_path: Path) -> None:
    """What `make demo` runs, shortened to two hours: the day-ahead round, then the day on the lockstep
    clock with a meter simulator per site, over the embedded broker. On the lockstep clock a slow
    machine makes the day longer, never different: every interval settled, no violation."""
    if not embedded_available():
        pytest.skip("amqtt is not installed")
    run = run_p2pdoe("demo", "--hours", "2", "--out", str(tmp_path), timeout=DEMO_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    rt = results["realtime"]
    assert rt["clock"] == "lockstep"
    assert "on the lockstep clock" in run.stdout
    assert len(rt["intervals"]) == 7
    assert all(i["lead_s"] >= 900 for i in rt["intervals"])  # a whole interval ahead: time waits for rounds
    assert rt["day_ahead_late_s"] == 0
    sites = {s["id"] for s in results["runtime"]["sites"]}
    assert {s["site"] for s in rt["settlements"]} == sites
    assert len(rt["settlements"]) == 8 * len(sites)  # every interval of the two hours, the last one too
    assert rt["missing_settlements"] == {}
    assert rt["energy_mismatch_max_pct"] < 0.1
    observed = json.loads((tmp_path / "observed.json").read_text())
    assert observed["sustained_violations"] == rt["envelope_violations"]["count"] == 0
    assert observed["judged_readings"] == rt["envelope_violations"]["judged_readings"] > 0
    for name in ("realtime_injection.png", "realtime_voltages.png", "realtime_settlements.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    _check_report(tmp_path, "a real-time day", checks=7)  # round, AC x3, violations, settlements, AC measured


def test_the_scaled_clock_demo_says_which_clock_and_names_a_late_day_ahead_round(tmp_path: Path) -> None:
    """`--speed` keeps the scaled clock (real-time pressure). Whether its day-ahead round ends before
    the day starts depends on this machine's speed: either the day runs, or the demo says so in one
    line with the cause (a late round, or on a very busy machine no site ready in time) and the fix."""
    if not embedded_available():
        pytest.skip("amqtt is not installed")
    run = run_p2pdoe("demo", "--hours", "1", "--speed", "640", "--lead-s", "60", "--out", str(tmp_path))
    if run.returncode == 0:
        assert "on the scaled clock at 640x" in run.stdout
        assert json.loads((tmp_path / "results.json").read_text())["realtime"]["clock"] == "scaled"
    else:
        assert_one_line_error(run, "run without --speed")
        assert "the day-ahead round ended" in run.stderr or "no day-ahead agreement" in run.stderr
