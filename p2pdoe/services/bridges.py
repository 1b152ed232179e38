"""Regional brokers: the DSO's core broker, and Mosquitto bridges joining each feeder's broker to it
(`p2pdoe provision --feeder ID=BUNDLE`, docs/interop.md "Regional brokers").

Each feeder keeps its own bundle, broker, coordinator and sites (`p2pdoe provision --out`), and its
rounds never leave it. The core bundle adds a broker for the DSO (TLS, passwords, ACL) and, in each
feeder's bundle, a bridge (`broker/bridges/core.conf`, included by the feeder's broker configuration)
that connects out to the core over TLS as `bridge-<feeder>` and forwards there, under
`feeder/<feeder>/`, what an observer reads: the sites' topics, the coordinator's, the rounds' openings
and the sites' reports (not the iterations' proposals, grants and prices). On the core the ACL lets
each bridge write only its own feeder's tree and state, one connection per identity
(`use_username_as_clientid`, so nobody takes over a bridge's session), and the core's `monitor` read
every feeder. Messages cross unchanged, signatures included: a reader strips the prefix before
checking them against the feeder's public keys (copied into the core bundle). Provisioning a core
again over bridged feeders replaces their bridges (new passwords, a new CA).
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from p2pdoe.core import topics
from p2pdoe.services.provision import (
    BundleError,
    _certificates,
    _description,
    _passwd_text,
    _replace,
    _write,
    broker_config,
    broker_description,
    password_hash,
)
from p2pdoe.services.signing import PUBLIC_KEYS

CORE_KIND = "p2pdoe_core_provision"
BRIDGE_QOS = 1
BRIDGED = ("site/#", "dso/#", "market/+/open", "market/+/report/+")  # what observers read
BRIDGE_STATE = "bridge/state"  # under the feeder's prefix: 1 connected, 0 not (retained)


def core_acl(feeders: Mapping[str, object]) -> str:
    """The core broker's ACL: each bridge writes its own feeder's tree and state only; the monitor
    reads every feeder and writes nothing."""
    lines = [
        "# p2pdoe core broker ACL (p2pdoe provision --feeder): each feeder's bridge and the monitor",
        "",
        "user monitor",
        f"topic read {topics.FEEDERS}/#",
    ]
    for feeder in feeders:
        prefix = topics.feeder_prefix(feeder)
        lines += [
            "",
            f"user bridge-{feeder}",
            f"topic write {prefix}{topics.ROOT}/#",
            f"topic write {prefix}{BRIDGE_STATE}",
        ]
    return "\n".join(lines) + "\n"


def core_broker_config(bundle: Path, host: str, port: int, queue_limit: int) -> str:
    """A provisioned broker's configuration, each identity on at most one connection (its user name
    is its client id): a reader cannot take a bridge's session over by borrowing its client id."""
    text = broker_config(bundle, host, port, queue_limit)
    return text + "use_username_as_clientid true\n"  # the listener's option: after its `listener` line


def bridge_config(feeder: str, core_host: str, core_port: int, password: str, core_ca: Path) -> str:
    """The bridge a feeder's Mosquitto opens to the core: out only, QoS 1, the feeder's queue kept
    across reconnections (`cleansession false`), TLS with the core's CA and host name checked, what
    observers read remapped under the feeder's prefix."""
    prefix = topics.feeder_prefix(feeder)
    return "\n".join(
        [
            f"# bridge to the DSO's core broker (p2pdoe provision --feeder): this feeder under {prefix}",
            f"connection core-{feeder}",
            f"address {core_host}:{core_port}",
            "bridge_protocol_version mqttv50",
            f"remote_clientid bridge-{feeder}",
            f"remote_username bridge-{feeder}",
            f"remote_password {password}",
            f"bridge_cafile {core_ca.resolve()}",
            "bridge_tls_version tlsv1.2",
            "bridge_insecure false",
            "cleansession false",
            "try_private true",
            "restart_timeout 1 30",
            "notifications true",
            f"notification_topic {prefix}{BRIDGE_STATE}",
            *(
                f"topic {pattern} out {BRIDGE_QOS} {topics.ROOT}/ {prefix}{topics.ROOT}/"
                for pattern in BRIDGED
            ),
            "",
        ]
    )


def write_core_bundle(
    out: Path, feeders: Mapping[str, Path], host: str, port: int, alt_names: Sequence[str] = ()
) -> dict[str, object]:
    """The core broker's bundle under `out`, and a bridge to it in each feeder's bundle (`feeders`:
    feeder id -> its bundle). Returns what the core's `provision.json` says."""
    described = _feeder_descriptions(feeders, host, port)
    for folder in ("ca", "broker", "broker/data", "identities", "feeders"):
        (out / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key, server_cert, server_key = _certificates(host, alt_names)
    _write(out / "ca" / "ca.crt", ca_cert, 0o644)
    _write(out / "ca" / "ca.key", ca_key, 0o600)
    _write(out / "broker" / "server.crt", server_cert, 0o644)
    _write(out / "broker" / "server.key", server_key, 0o600)
    passwords = {"monitor": secrets.token_urlsafe(24)}
    passwords |= {f"bridge-{feeder}": secrets.token_urlsafe(24) for feeder in feeders}
    hashes = {user: password_hash(password) for user, password in passwords.items()}
    _write(out / "broker" / "passwd", _passwd_text(hashes), 0o600)
    _write(out / "broker" / "acl", core_acl(feeders), 0o600)
    queue_limit = max(1000, 1000 * len(feeders))
    _write(out / "broker" / "mosquitto.conf", core_broker_config(out, host, port, queue_limit), 0o644)
    monitor_password = out / "identities" / "monitor.password"  # a bridge's lives in its feeder only
    _write(monitor_password, passwords["monitor"] + "\n", 0o600)
    identities: list[dict[str, object]] = [
        {
            "role": "monitor",
            "id": "monitor",
            "username": "monitor",
            "password_file": str(monitor_password.resolve()),
        }
    ]
    entries = {}
    for feeder, bundle in feeders.items():
        keys = _copy_public_keys(described[feeder], out / "feeders" / feeder)
        _add_bridge(bundle, feeder, host, port, passwords[f"bridge-{feeder}"], out / "ca" / "ca.crt")
        identities.append({"role": "bridge", "id": f"bridge-{feeder}", "username": f"bridge-{feeder}"})
        prefix = topics.feeder_prefix(feeder)
        entries[feeder] = {"prefix": prefix, "bundle": str(bundle.resolve()), "public_keys": str(keys)}
    description: dict[str, object] = {
        "kind": CORE_KIND,
        "schema_version": 1,
        "broker": broker_description(out, host, port),
        "feeders": entries,
        "identities": identities,
    }
    _write(out / "provision.json", json.dumps(description, indent=1) + "\n", 0o644)
    return description


def _feeder_descriptions(feeders: Mapping[str, Path], host: str, port: int) -> dict[str, dict[str, object]]:
    """Every feeder's bundle read and checked before anything is written."""
    if not feeders:
        raise BundleError("a core broker bridges at least one feeder: give --feeder ID=BUNDLE")
    bundles = [bundle.resolve() for bundle in feeders.values()]
    if len(set(bundles)) < len(bundles):
        raise BundleError("a bundle is named by two feeders: each feeder has a bundle of its own")
    described = {}
    for feeder, bundle in feeders.items():
        if not topics.FEEDER_ID.match(feeder):
            raise BundleError(f"feeder id {feeder!r}: lower-case letters, digits, '-' and '_', at most 32")
        described[feeder] = _description(bundle)
        broker = described[feeder]["broker"]
        assert isinstance(broker, dict)
        if (broker["host"], broker["port"]) == (host, port):
            raise BundleError(
                f"feeder {feeder}'s broker listens on {host}:{port} too: give the core another port"
            )
    return described


def _copy_public_keys(description: Mapping[str, object], folder: Path) -> Path:
    """The feeder's public keys, for a core reader to check its messages' signatures."""
    signing = description.get("signing")
    assert isinstance(signing, dict)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / PUBLIC_KEYS
    shutil.copyfile(Path(str(signing["public_keys"])), target)
    return target.resolve()


def _add_bridge(bundle: Path, feeder: str, host: str, port: int, password: str, core_ca: Path) -> None:
    """The bridge in its own file (mode 0600: it holds the bridge's password; a new one replaces the
    old whole), included by the feeder's broker configuration; the core's CA beside it; the bridge in
    the feeder's provision.json."""
    folder = bundle / "broker" / "bridges"
    folder.mkdir(exist_ok=True, mode=0o700)
    ca = folder / "core-ca.crt"
    _replace(ca, core_ca.read_text(encoding="utf-8"), 0o644)
    _replace(folder / "core.conf", bridge_config(feeder, host, port, password, ca), 0o600)
    config = bundle / "broker" / "mosquitto.conf"
    text = config.read_text(encoding="utf-8")
    include = f"include_dir {folder.resolve()}"
    if include not in text.splitlines():
        _replace(
            config,
            f"{text}\n# the bridge to the DSO's core broker (p2pdoe provision --feeder)\n{include}\n",
            0o644,
        )
    description = _description(bundle)
    description["bridge"] = {
        "core_host": host,
        "core_port": port,
        "username": f"bridge-{feeder}",
        "prefix": topics.feeder_prefix(feeder),
        "config": str((folder / "core.conf").resolve()),
        "core_ca_cert": str(ca.resolve()),
    }
    _replace(bundle / "provision.json", json.dumps(description, indent=1) + "\n", 0o644)
