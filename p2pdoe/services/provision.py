"""`p2pdoe provision`: a deployment bundle for a locked-down Mosquitto (docs/deployment.md).

It writes a CA and a server certificate (TLS), one identity per site (`edge-<id>`, also used by the
site's meter), one for the coordinator (`dso`) and one read-only monitor identity (`monitor`): each
a random password in its own file (mode 0600) and its PBKDF2-SHA512 hash in the broker's password
file, and an Ed25519 key that signs its messages end to end (`keys/`, public keys in
`keys/public-keys.json`); an ACL (who may read and write which topic); a Mosquitto configuration
(TLS listener only, no anonymous access, persistent QoS 1 sessions); an env file per site; and
`provision.json`. Secrets are never printed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import getpass
import hashlib
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from p2pdoe.core import topics
from p2pdoe.core.schemas.wire import MAX_PACKET_BYTES
from p2pdoe.services.settings import read_password_file
from p2pdoe.services.signing import PUBLIC_KEYS, forget_key, write_keys

if TYPE_CHECKING:
    from cryptography import x509

    from p2pdoe.services.signing import SignedTransport

ROOT = topics.ROOT
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for its $7$ (PBKDF2-SHA512) hashes
CERT_DAYS = 825


@dataclass(frozen=True)
class Identity:
    role: str  # edge | coordinator | monitor
    id: str  # the site's id, or the role
    username: str
    password: str


def identities(site_ids: Sequence[str]) -> list[Identity]:
    def new(role: str, id_: str, username: str) -> Identity:
        return Identity(role, id_, username, secrets.token_urlsafe(24))

    return [
        new("coordinator", "dso", "dso"),
        new("monitor", "monitor", "monitor"),
        *(new("edge", s, f"edge-{s}") for s in site_ids),
    ]


@dataclass(frozen=True)
class Access:
    """How one process reaches the broker: its URL (with its user name), on a provisioned broker its
    password file and the CA certificate, and its signing key and the trusted public keys
    (`identity` signs with `signing_key`: p2pdoe.services.signing)."""

    url: str
    password_file: Path | None = None
    ca_cert: Path | None = None
    identity: str = "monitor"
    signing_key: Path | None = None
    trusted_keys: Path | None = None

    def args(self) -> list[str]:
        """The service options (`--broker`, `--password-file`, `--ca-cert`, `--signing-key`,
        `--trusted-keys`)."""
        out = ["--broker", self.url]
        for flag, path in (
            ("--password-file", self.password_file),
            ("--ca-cert", self.ca_cert),
            ("--signing-key", self.signing_key),
            ("--trusted-keys", self.trusted_keys),
        ):
            if path is not None:
                out += [flag, str(path)]
        return out

    def unsigned(self) -> Access:
        """The same without keys: a process on topics nobody signs (the lockstep clock's)."""
        return dataclasses.replace(self, signing_key=None, trusted_keys=None)

    async def connect(self, client_id: str, timeout_s: float) -> SignedTransport:
        """A started transport for a person waiting (a command line): `connect_within`; with trusted
        keys, one that believes only authentic messages (without, signatures are read past)."""
        from p2pdoe.services.signing import SignedTransport, Signer, read_private_key, read_public_keys
        from p2pdoe.services.transport import connect_within

        key = None if self.signing_key is None else read_private_key(self.signing_key)
        trusted = None if self.trusted_keys is None else read_public_keys(self.trusted_keys)
        inner = await connect_within(self.url, client_id, timeout_s, **self.transport_options())
        return SignedTransport(inner, Signer(self.identity, key), trusted)

    def transport_options(self) -> dict[str, object]:
        """Keyword arguments for `MqttTransport` beyond the URL."""
        if self.password_file is None:
            return {"ca_cert": self.ca_cert}
        return {"password": read_password_file(self.password_file), "ca_cert": self.ca_cert}


def access(description: Mapping[str, object], username: str) -> Access:
    """How identity `username` of a bundle (its `provision.json`) reaches the broker."""
    broker = description["broker"]
    assert isinstance(broker, dict)
    signing = description.get("signing") or {}
    assert isinstance(signing, dict)
    trusted = Path(signing["public_keys"]) if "public_keys" in signing else None
    for entry in description["identities"]:  # type: ignore[attr-defined]
        if entry["username"] == username:
            url = f"mqtts://{username}@{broker['host']}:{broker['port']}"
            key = Path(entry["signing_key"]) if "signing_key" in entry else None
            return Access(url, Path(entry["password_file"]), Path(broker["ca_cert"]), username, key, trusted)
    raise KeyError(f"the bundle has no identity {username!r}")


def site_peers(ids: Sequence[str], peers: Sequence[Sequence[int]]) -> dict[str, list[str]]:
    """Each site's trading partners by id (a scenario's `market.peers` are indices)."""
    return {site: [ids[j] for j in peers[i]] for i, site in enumerate(ids)}


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: $7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl(peers: Mapping[str, Sequence[str]]) -> str:
    """The broker's ACL. A site writes only its own topics (never its `doe` ones, which only the
    coordinator writes) and its own protocol messages, and reads its envelopes, set-points and meter,
    the openings and grants, its peers' proposals and the coordinator's status. The coordinator
    writes envelopes, openings, grants and its status, deletes what a site left retained on its
    proposal and report topics, and reads everything; the monitor reads
    everything and writes nothing. On a lockstep bench the granter runs as `dso` (it writes the clock's
    grants and status), and each site's edge and meter announce themselves and their steps."""
    lines = [
        "# p2pdoe broker ACL (p2pdoe provision): who may read and write which topic",
        "",
        "user dso",
        f"topic read {ROOT}/#",
        *(f"topic write {ROOT}/site/+/{k}" for k in ("doe", "doe/default")),
        *(
            f"topic write {ROOT}/market/+/{k}"
            for k in ("open", "grant/+", "prices/+", "payments/open", "payments/grant")
        ),
        # only to delete what a site left retained there (p2pdoe.core.coordinator.retained); what it
        # would write there is never believed: a site's proposals and reports are signed by the site
        *(
            f"topic write {ROOT}/market/+/{k}/+"
            for k in ("proposal", "report", "polish", "payments/proposal")
        ),
        *(f"topic write {ROOT}/dso/{k}" for k in ("status", "progress")),
        *(f"topic write {ROOT}/clock/{k}" for k in ("grant/+", "status", "member/dso", "done/dso")),
        "",
        "user monitor",
        f"topic read {ROOT}/#",
    ]
    for site, site_peers in peers.items():
        own = f"{ROOT}/site/{site}"
        lines += [
            "",
            f"user edge-{site}",
            *(f"topic write {own}/{k}" for k in ("status", "register", "telemetry", "meter", "setpoints")),
            f"topic write {own}/forecast",  # the site's integrator, with the site's identity
            f"topic write {own}/settlement",
            f"topic write {ROOT}/market/+/proposal/{site}",
            f"topic write {ROOT}/market/+/report/{site}",
            f"topic write {ROOT}/market/+/polish/{site}",
            f"topic write {ROOT}/market/+/payments/proposal/{site}",
            *(f"topic read {own}/{k}" for k in ("doe", "doe/default", "setpoints", "meter", "status")),
            f"topic read {own}/forecast",
            f"topic read {ROOT}/market/+/open",
            f"topic read {ROOT}/market/+/grant/{site}",
            f"topic read {ROOT}/market/+/prices/{site}",
            *(f"topic read {ROOT}/market/+/proposal/{p}" for p in site_peers),
            *(f"topic read {ROOT}/market/+/payments/{k}" for k in ("open", "grant")),
            *(f"topic read {ROOT}/market/+/payments/proposal/{p}" for p in site_peers),
            f"topic read {ROOT}/dso/status",
            *(
                f"topic write {ROOT}/clock/{k}/{who}-{site}"
                for k in ("member", "done")
                for who in ("edge", "meter")
            ),
            *(f"topic read {ROOT}/clock/{k}" for k in ("grant/plant", "grant/control", "status")),
        ]
    return "\n".join(lines) + "\n"


def broker_config(bundle: Path, host: str, port: int, queue_limit: int) -> str:
    """A Mosquitto 2 configuration that runs as is with `mosquitto -c` (absolute paths)."""
    b = bundle.resolve()
    return "\n".join(
        [
            "# p2pdoe broker (p2pdoe provision): TLS only, no anonymous access, persistent sessions",
            "# run as root, Mosquitto drops to this user: the owner of the bundle's files",
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            "allow_anonymous false",
            "set_tcp_nodelay true",
            f"password_file {b / 'broker' / 'passwd'}",
            f"acl_file {b / 'broker' / 'acl'}",
            "persistence true",
            f"persistence_location {b / 'broker' / 'data'}/",
            "autosave_interval 1",
            "autosave_on_changes true",
            f"max_packet_size {MAX_PACKET_BYTES}",
            f"max_queued_messages {queue_limit}",
            "max_inflight_messages 100",
            "",
            f"listener {port} {host}",
            "protocol mqtt",
            f"cafile {b / 'ca' / 'ca.crt'}",
            f"certfile {b / 'broker' / 'server.crt'}",
            f"keyfile {b / 'broker' / 'server.key'}",
            "tls_version tlsv1.2",
            "",
        ]
    )


class BundleError(ValueError):
    """A bundle cannot be changed as asked (no such identity, not a bundle)."""


RESERVED_IDS = ("dso", "monitor")


def write_bundle(
    out: Path, peers: Mapping[str, Sequence[str]], host: str, port: int, alt_names: Sequence[str] = ()
) -> dict[str, object]:
    """The whole bundle under `out`; returns what `provision.json` says. `alt_names`: more names and
    addresses the servers' certificates carry besides `host` (server_names)."""
    clash = sorted(set(peers) & set(RESERVED_IDS))
    if clash:
        raise BundleError(f"site ids {', '.join(clash)} are reserved for the coordinator and the monitor")
    for folder in ("ca", "broker", "broker/data", "identities", "env", "keys"):
        (out / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    ids = identities(list(peers))
    ca_cert, ca_key, server_cert, server_key = _certificates(host, alt_names)
    _write(out / "ca" / "ca.crt", ca_cert, 0o644)
    _write(out / "ca" / "ca.key", ca_key, 0o600)
    _write(out / "broker" / "server.crt", server_cert, 0o644)
    _write(out / "broker" / "server.key", server_key, 0o600)
    _write(
        out / "broker" / "passwd", _passwd_text({i.username: password_hash(i.password) for i in ids}), 0o600
    )
    _write(out / "broker" / "acl", acl(peers), 0o600)  # Mosquitto warns of a world-readable ACL
    queue_limit = max(1000, 200 * len(peers))  # a round's messages to a site that reconnects
    _write(out / "broker" / "mosquitto.conf", broker_config(out, host, port, queue_limit), 0o644)
    signers = [i.username for i in ids if i.role != "monitor"]  # the monitor publishes nothing
    public_keys = write_keys(out / "keys", signers).resolve()
    entries = []
    for i in ids:
        secret = out / "identities" / f"{i.username}.password"
        _write(secret, i.password + "\n", 0o600)
        entry = {"role": i.role, "id": i.id, "username": i.username, "password_file": str(secret.resolve())}
        if i.username in signers:
            entry["signing_key"] = str((out / "keys" / f"{i.username}.key").resolve())
        if i.role == "edge":
            env = out / "env" / f"{i.id}.env"
            _write(env, _edge_env(i, host, port, out), 0o600)
            entry["env_file"] = str(env.resolve())
        entries.append(entry)
    description: dict[str, object] = {
        "kind": "p2pdoe_provision",
        "schema_version": 1,
        "broker": broker_description(out, host, port),
        "signing": {"algorithm": "ed25519", "public_keys": str(public_keys)},
        "identities": entries,
    }
    from p2pdoe.services.csip_provision import write_csip  # CSIP-AUS: `p2pdoe csip-server`

    description["csip"] = write_csip(out, list(peers), host, alt_names)
    _write(out / "provision.json", json.dumps(description, indent=1) + "\n", 0o644)
    return description


def broker_description(out: Path, host: str, port: int) -> dict[str, object]:
    """What a bundle's provision.json says of its broker."""
    return {
        "config": str((out / "broker" / "mosquitto.conf").resolve()),
        "ca_cert": str((out / "ca" / "ca.crt").resolve()),
        "host": host,
        "port": port,
        "tls": True,
    }


def rotate(bundle: Path, name: str) -> str:
    """A new password for identity `name` (a site's id, `dso` or `monitor`): its password file and
    its hash in the broker's password file. Returns the identity's username. The broker takes it on
    its next reload (SIGHUP); the identity's service reads the new file when restarted."""
    description = _description(bundle)
    entry = _identity(description, name)
    username, password = str(entry["username"]), secrets.token_urlsafe(24)
    lines = _passwd_lines(bundle)
    lines[username] = password_hash(password)
    _replace(bundle / "broker" / "passwd", _passwd_text(lines), 0o600)
    _replace(Path(str(entry["password_file"])), password + "\n", 0o600)
    return username


def revoke(bundle: Path, site: str) -> str:
    """Remove site `site` from the broker: its password-file entry and its ACL block, its password
    and env files, and its identity in provision.json (listed under `revoked`). The broker refuses
    it from its next reload (SIGHUP) on; every other identity is untouched. Returns the username."""
    description = _description(bundle)
    entry = _identity(description, site)
    if entry["role"] != "edge":
        raise BundleError(f"{site!r} is not a site: only a site's identity can be revoked")
    username = str(entry["username"])
    lines = _passwd_lines(bundle)
    lines.pop(username, None)
    _replace(bundle / "broker" / "passwd", _passwd_text(lines), 0o600)
    blocks = (bundle / "broker" / "acl").read_text(encoding="utf-8").split("\n\n")
    kept = [b for b in blocks if b.strip().splitlines()[:1] != [f"user {username}"]]
    _replace(bundle / "broker" / "acl", "\n\n".join(kept), 0o600)
    for key in ("password_file", "env_file", "signing_key"):
        if key in entry:
            Path(str(entry[key])).unlink(missing_ok=True)
    forget_key(bundle / "keys" / PUBLIC_KEYS, username)
    from p2pdoe.services.csip_provision import forget_site  # its CSIP-AUS device certificate

    forget_site(description, site)
    identities = [i for i in description["identities"] if i is not entry]  # type: ignore[attr-defined]
    revoked = [*description.get("revoked", []), {"id": site, "username": username, "at": _now()}]  # type: ignore[misc]
    description |= {"identities": identities, "revoked": revoked}
    _replace(bundle / "provision.json", json.dumps(description, indent=1) + "\n", 0o644)
    return username


def _description(bundle: Path) -> dict[str, object]:
    try:
        description = json.loads((bundle / "provision.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{bundle} is not a readable bundle (provision.json: {exc})") from None
    if not isinstance(description, dict) or description.get("kind") != "p2pdoe_provision":
        raise BundleError(f"{bundle}/provision.json is not a p2pdoe bundle description")
    return description


def _identity(description: Mapping[str, object], name: str) -> dict[str, object]:
    entries = description.get("identities")
    assert isinstance(entries, list)
    for entry in entries:
        if entry.get("id") == name:
            found: dict[str, object] = entry  # the same object, so a caller may remove it from the list
            return found
    known = ", ".join(str(e.get("id")) for e in entries)
    raise BundleError(f"the bundle has no identity {name!r} (it has: {known})")


def _passwd_text(hashes: Mapping[str, str]) -> str:
    """Mosquitto's password file: a `user:hash` line per identity."""
    return "".join(f"{user}:{h}\n" for user, h in hashes.items())


def _passwd_lines(bundle: Path) -> dict[str, str]:
    text = (bundle / "broker" / "passwd").read_text(encoding="utf-8")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _replace(path: Path, text: str, mode: int) -> None:
    """Rewrite `path` atomically, the new file created with `mode` from the start."""
    tmp = path.with_name(f".{path.name}.new")
    _write(tmp, text, mode)
    os.replace(tmp, path)


def _edge_env(i: Identity, host: str, port: int, out: Path) -> str:
    return "\n".join(
        [
            f"# the edge agent of {i.id} (p2pdoe provision)",
            f"P2PDOE_EDGE_BROKER=mqtts://{i.username}@{host}:{port}",
            f"P2PDOE_EDGE_PASSWORD_FILE={(out / 'identities' / f'{i.username}.password').resolve()}",
            f"P2PDOE_EDGE_CA_CERT={(out / 'ca' / 'ca.crt').resolve()}",
            f"P2PDOE_EDGE_SIGNING_KEY={(out / 'keys' / f'{i.username}.key').resolve()}",
            f"P2PDOE_EDGE_TRUSTED_KEYS={(out / 'keys' / PUBLIC_KEYS).resolve()}",
            "",
        ]
    )


def _write(path: Path, text: str, mode: int) -> None:
    """Created with its mode from the start: a secret is never readable by others, even briefly."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def server_names(host: str, alt_names: Sequence[str] = ()) -> list[str]:
    """What a server's certificate names: `host`, the other loopback names when `host` is one of
    them (a client on the same machine may connect by name or by address), then `alt_names`."""
    names = [host, *(LOOPBACK_NAMES if host in LOOPBACK_NAMES else ()), *alt_names]
    return list(dict.fromkeys(names))


def subject_alt_names(host: str, alt_names: Sequence[str] = ()) -> list[x509.GeneralName]:
    """The certificate extension's entries: IP addresses as such, other names as DNS names."""
    from cryptography import x509

    out: list[x509.GeneralName] = []
    for name in server_names(host, alt_names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _certificates(host: str, alt_names: Sequence[str] = ()) -> tuple[str, str, str, str]:
    """(CA certificate, CA key, server certificate, server key), PEM; EC P-256 keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pdoe deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(host, alt_names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(key: ec.EllipticCurvePrivateKey) -> str:
        fmt = serialization.PrivateFormat.PKCS8
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()

    def pem_cert(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    return pem_cert(ca), pem_key(ca_key), pem_cert(server), pem_key(server_key)
