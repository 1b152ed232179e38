"""The Mosquitto configurations the project ships: parsed, checked, and started for real."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from p2pdoe.core.schemas.wire import MAX_PACKET_BYTES
from p2pdoe.services.broker import find_mosquitto, free_port, mosquitto_config
from p2pdoe.services.broker_check import settings as _settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"


@pytest.mark.parametrize("text", [DEPLOY.read_text(), mosquitto_config(1883)], ids=["deploy", "tests"])
def test_every_shipped_config_turns_nagle_off(text: str) -> None:
    assert _settings(text)["set_tcp_nodelay"] == ["true"]


def test_the_deploy_config_keeps_retained_state_and_bounds_packets() -> None:
    s = _settings(DEPLOY.read_text())
    assert s["persistence"] == ["true"]
    assert s["autosave_on_changes"] == ["true"]
    assert int(s["max_packet_size"][0]) == MAX_PACKET_BYTES


@pytest.mark.timeout(60)
def test_mosquitto_starts_with_the_deploy_config() -> None:
    """Mosquitto itself accepts the file (port and persistence folder moved to a temporary folder)."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    with tempfile.TemporaryDirectory(prefix="p2pdoe-deploy-") as tmp:
        _start_and_stop(binary, Path(tmp))


def _start_and_stop(binary: str, tmp_path: Path) -> None:
    port = free_port()
    text = DEPLOY.read_text().replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path}/")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    tmp_path.chmod(0o777)  # run as root, Mosquitto drops to its own user, which must write here
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.5)  # still running: the config was accepted
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Error" not in err, err
