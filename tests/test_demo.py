"""`p2pdoe demo --day-ahead`: the whole system as processes, over the embedded broker (the default on a
fresh machine) and over a Mosquitto given by --broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.services.broker import Broker, embedded_available, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


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


def test_demo_over_a_given_mosquitto(mosquitto_broker: Broker, tmp_path: Path) -> None:
    run = run_p2pdoe("demo", "--day-ahead", "--broker", mosquitto_broker.url, "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    assert results["runtime"]["protocol"] == "v5"


def test_demo_with_an_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    run = run_p2pdoe("demo", "--day-ahead", "--broker", url, "--out", str(tmp_path), timeout=60)
    assert_one_line_error(run, "cannot reach the broker", url)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_the_real_time_demo_over_the_embedded_broker(tmp_path: Path) -> None:
    """What `make demo` runs, shortened to two hours: the day-ahead round, then the accelerated day
    with a meter simulator per site, over the embedded broker."""
    if not embedded_available():
        pytest.skip("amqtt is not installed")
    # a generous lead: the day-ahead round must end before the day starts, on a busy machine too
    run = run_p2pdoe("demo", "--hours", "2", "--lead-s", "60", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    results = _check(run.stdout, tmp_path)
    rt = results["realtime"]
    assert len(rt["intervals"]) == 7
    assert all(i["lead_s"] > 0 for i in rt["intervals"])
    sites = {s["id"] for s in results["runtime"]["sites"]}
    assert {s["site"] for s in rt["settlements"]} == sites
    assert len(rt["settlements"]) >= 7 * len(sites)
    assert rt["energy_mismatch_max_pct"] < 0.1
    assert "real-time day:" in run.stdout
    for name in ("realtime_injection.png", "realtime_voltages.png", "realtime_settlements.png"):
        assert (tmp_path / name).stat().st_size > 10_000
