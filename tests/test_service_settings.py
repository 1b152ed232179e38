"""The services' settings: where each comes from and which source wins, and what a bad one does at
start (exit status 2, one line on stderr, never the password). No broker needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_helpers import assert_service_error, run_module, service_env

from dso_coordinator.settings import CoordinatorSettings
from edge_agent.settings import EdgeSettings
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import free_port
from p2pdoe.services.settings import ConfigError, ServiceSettings, load_settings

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pw-Zq81-never-shown"  # a test value
LAYERS = ("option", "env", "secret", "file", "default")


@pytest.fixture(autouse=True)
def _no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No P2PDOE_EDGE_/P2PDOE_DSO_ setting of the caller's environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("P2PDOE_EDGE_", "P2PDOE_DSO_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`p2pdoe site-config` of the default scenario: coordinator.json and sites/<id>.json."""
    folder = tmp_path_factory.mktemp("configs")
    write_site_configs(load_scenario("default"), folder)
    return folder


def site_config(configs: Path) -> Path:
    return sorted((configs / "sites").glob("*.json"))[0]


def _layers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    field: str,
    values: dict[str, str],
    required: dict[str, str],
) -> tuple[dict[str, str], Path, Path]:
    """Give `field` the value of each named source in `values`; `required` goes to the settings file."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    lines = [f"{k}: {v}" for k, v in required.items()]
    if "file" in values:
        lines.append(f"{field}: {values['file']}")
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if "secret" in values:
        (secrets / f"{prefix}{field}").write_text(values["secret"], encoding="utf-8")
    if "env" in values:
        monkeypatch.setenv(f"{prefix}{field}".upper(), values["env"])
    options = {field: values["option"]} if "option" in values else {}
    return options, settings_file, secrets


@pytest.mark.parametrize("top", LAYERS)
def test_the_broker_comes_from_the_highest_source_that_gives_it(
    top: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Command-line option > environment (P2PDOE_EDGE_BROKER) > secrets directory > settings file >
    default: with every source below `top` set too, `top`'s value wins."""
    given = {layer: f"mqtt://{layer}.example:1883" for layer in LAYERS[LAYERS.index(top) : -1]}
    options, settings_file, secrets = _layers(
        tmp_path, monkeypatch, "p2pdoe_edge_", "broker", given, {"site_config": "site.json"}
    )
    settings = load_settings(EdgeSettings, options, settings_file, secrets)
    expected = given.get(top, "mqtt://127.0.0.1:1883")
    assert settings.broker == expected
    assert settings.site_config == Path("site.json")


@pytest.mark.parametrize("top", LAYERS)
def test_the_password_comes_from_the_highest_source_that_gives_it(
    top: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secrets directory's `p2pdoe_edge_password` (the Docker/Kubernetes convention) beats the
    settings file and loses to P2PDOE_EDGE_PASSWORD; the password never shows in the settings' repr."""
    given = {layer: f"{PASSWORD}-{layer}" for layer in LAYERS[LAYERS.index(top) : -1]}
    options, settings_file, secrets = _layers(
        tmp_path, monkeypatch, "p2pdoe_edge_", "password", given, {"site_config": "site.json"}
    )
    settings = load_settings(EdgeSettings, options, settings_file, secrets)
    assert settings.secret() == given.get(top)
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())


def test_the_coordinator_reads_its_own_prefix_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = {"env": "7.5", "secret": "8.5", "file": "9.5"}
    options, settings_file, secrets = _layers(
        tmp_path,
        monkeypatch,
        "p2pdoe_dso_",
        "iteration_timeout_s",
        given,
        {"coordinator_config": "coordinator.json"},
    )
    (secrets / "p2pdoe_dso_password").write_text(PASSWORD, encoding="utf-8")
    monkeypatch.setenv("P2PDOE_EDGE_BROKER", "mqtt://edge-only.example:1883")
    monkeypatch.setenv("P2PDOE_EDGE_ITERATION_TIMEOUT_S", "1.5")
    settings = load_settings(CoordinatorSettings, options, settings_file, secrets)
    assert settings.iteration_timeout_s == 7.5
    assert settings.broker == "mqtt://127.0.0.1:1883"  # the edge's variable is not the coordinator's
    assert settings.secret() == PASSWORD
    assert settings.registration_timeout_s == 30.0  # defaults where nothing is given
    overridden = load_settings(CoordinatorSettings, {"iteration_timeout_s": 2.0}, settings_file, secrets)
    assert overridden.iteration_timeout_s == 2.0


def test_a_setting_may_be_spelt_with_dashes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("site-config: a.json\nkeepalive-s: 60\n", encoding="utf-8")
    settings = load_settings(EdgeSettings, {}, path)
    assert (settings.site_config, settings.keepalive_s) == (Path("a.json"), 60)


@pytest.mark.parametrize(
    ("kind", "content", "needle"),
    [
        (EdgeSettings, "site_config: a.json\nbrokr: mqtt://x\n", "brokr"),
        (EdgeSettings, "site_config: a.json\nrounds: -1\n", "rounds"),
        (EdgeSettings, "broker: mqtt://x\n", "site_config"),
        (CoordinatorSettings, "coordinator_config: c.json\nreport_timeout_s: -2\n", "report_timeout_s"),
        (CoordinatorSettings, "- a\n- b\n", "mapping"),
        (CoordinatorSettings, "coordinator_config: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_bad_setting_is_a_config_error(
    kind: type[ServiceSettings], content: str, needle: str, tmp_path: Path
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=needle) as caught:
        load_settings(kind, {}, path)
    assert "\n" not in str(caught.value)


# -- the services at start --------------------------------------------------------------------------


def _bad_starts(configs: Path, tmp: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(module, prog, arguments, needles): each must stop at start with one line."""
    unknown = tmp / "unknown.yaml"
    unknown.write_text("brokr: mqtt://127.0.0.1:1883\n", encoding="utf-8")
    negative = tmp / "negative.yaml"
    negative.write_text("registration_timeout_s: -5\n", encoding="utf-8")
    not_json = tmp / "not.json"
    not_json.write_text("{ not json", encoding="utf-8")
    wrong = tmp / "wrong.json"
    wrong.write_text('{"schema_version": 1, "kind": "site_config"}', encoding="utf-8")
    site = ["--site-config", str(site_config(configs))]
    coordinator = ["--coordinator-config", str(configs / "coordinator.json")]
    return [
        ("edge_agent", "edge-agent", [*site, "--config", str(unknown)], ["brokr", "not permitted"]),
        ("dso_coordinator", "dso-coordinator", [*coordinator, "--config", str(unknown)], ["brokr"]),
        ("dso_coordinator", "dso-coordinator", [*coordinator, "--iteration-timeout-s", "-1"], ["iteration"]),
        ("dso_coordinator", "dso-coordinator", [*coordinator, "--config", str(negative)], ["registration"]),
        ("dso_coordinator", "dso-coordinator", [*coordinator, "--max-attempts", "0"], ["max_attempts"]),
        ("edge_agent", "edge-agent", [*site, "--rounds", "-1"], ["rounds"]),
        ("edge_agent", "edge-agent", [], ["site_config", "required"]),
        ("dso_coordinator", "dso-coordinator", [], ["coordinator_config", "required"]),
        ("edge_agent", "edge-agent", ["--site-config", str(not_json)], ["site configuration", "invalid"]),
        ("edge_agent", "edge-agent", ["--site-config", str(wrong)], ["site configuration", "invalid"]),
        ("edge_agent", "edge-agent", ["--site-config", str(tmp / "absent.json")], ["cannot read"]),
        ("dso_coordinator", "dso-coordinator", ["--coordinator-config", str(wrong)], ["invalid"]),
        ("edge_agent", "edge-agent", [*site, "--secrets-dir", str(tmp / "nowhere")], ["secrets directory"]),
        ("edge_agent", "edge-agent", [*site, "--broker", "tcp://127.0.0.1:1883"], ["mqtt://"]),
    ]


def test_a_bad_start_stops_with_one_line(configs: Path, tmp_path: Path) -> None:
    """Unknown keys, negative timeouts, missing or invalid configurations: exit status 2 and one line
    '<prog>: error: ...' on stderr, before any connection is tried (no broker runs here)."""
    failures = []
    for module, prog, args, needles in _bad_starts(configs, tmp_path):
        proc = run_module(module, *args)
        try:
            line = assert_service_error(proc, prog, *needles)
        except AssertionError as exc:
            failures.append(f"{module} {' '.join(args)}: {exc}")
            continue
        assert proc.stdout == "", line
    assert not failures, "\n".join(failures)


def _secret_dir(tmp_path: Path, prefix: str) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / f"{prefix}password").write_text(PASSWORD, encoding="utf-8")
    return secrets


def test_the_password_never_shows_in_a_start_error(configs: Path, tmp_path: Path) -> None:
    secrets = _secret_dir(tmp_path, "p2pdoe_edge_")
    bad_password_file = tmp_path / "with-password.yaml"
    bad_password_file.write_text(f"password: {PASSWORD}\nkeepalive_s: 1\n", encoding="utf-8")
    bad_yaml = tmp_path / "unclosed.yaml"  # the offending line is the password's
    bad_yaml.write_text(f'site_config: a.json\npassword: "{PASSWORD}\n', encoding="utf-8")
    site = ["--site-config", str(site_config(configs))]
    runs = [
        # from the secrets directory, then a bad setting
        run_module("edge_agent", *site, "--secrets-dir", str(secrets), "--rounds", "-3"),
        # from the settings file, with a bad setting beside it
        run_module("edge_agent", *site, "--config", str(bad_password_file)),
        # in a settings file that does not parse
        run_module("edge_agent", "--config", str(bad_yaml)),
        # from the environment, with an invalid site configuration
        run_module(
            "edge_agent",
            "--site-config",
            str(tmp_path / "absent.json"),
            env=service_env(P2PDOE_EDGE_PASSWORD=PASSWORD),
        ),
        # in the broker URL itself, which is invalid
        run_module("edge_agent", *site, "--broker", f"mqtt://user:{PASSWORD}@127.0.0.1:notaport"),
        run_module("edge_agent", *site, "--broker", f"tcp://user:{PASSWORD}@127.0.0.1:1883"),
        run_module(
            "dso_coordinator",
            "--coordinator-config",
            str(configs / "coordinator.json"),
            "--broker",
            f"mqtt://user:{PASSWORD}@127.0.0.1:1883/path",
        ),
    ]
    for proc in runs:
        line = assert_service_error(proc, proc.args[2].replace("_", "-"))  # python -m <module>
        assert PASSWORD not in proc.stdout + proc.stderr, line
    assert "***@127.0.0.1" in runs[4].stderr  # the URL is still shown, without its credentials
    assert "(line 3, column 1)" in runs[2].stderr  # where the file went wrong, not what it holds


@pytest.mark.timeout(180)
def test_the_password_never_shows_in_the_logs(configs: Path, tmp_path: Path) -> None:
    """An agent that cannot reach its broker logs its retries (at DEBUG, everything) without the
    password, whether from the secrets directory or in the URL; SIGTERM stops it cleanly."""
    secrets = _secret_dir(tmp_path, "p2pdoe_edge_")
    port = free_port()  # nothing listens there
    log = tmp_path / "edge.log"
    args = ["--site-config", str(site_config(configs)), "--secrets-dir", str(secrets)]
    args += ["--broker", f"mqtt://user:{PASSWORD}@127.0.0.1:{port}", "--log-level", "DEBUG"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=service_env(P2PDOE_EDGE_USERNAME="user"),
        )
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and log.read_text(encoding="utf-8").count("connect failed") < 2:
            assert proc.poll() is None, log.read_text(encoding="utf-8")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    output = log.read_text(encoding="utf-8")
    assert output.count("connect failed") >= 2, output
    assert PASSWORD not in output
    assert "Traceback" not in output
