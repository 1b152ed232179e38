"""The CSIP-AUS part of a deployment bundle (`p2pdoe provision`): a TLS server certificate for
`p2pdoe csip-server` and, per site, a client certificate and key for its IEEE 2030.5 device, all
signed by the bundle's CA; the `csip` section of provision.json records each site's LFDI and SFDI
(p2pdoe.core.csip)."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CERT_DAYS = 825
DEFAULT_CSIP_PORT = 8443


def write_csip(
    out: Path, site_ids: Sequence[str], host: str, alt_names: Sequence[str] = ()
) -> dict[str, object]:
    """csip/server.crt|key and csip/<site>.crt|key under bundle `out` (whose CA is written already);
    returns the `csip` section of provision.json."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from p2pdoe.core.csip_ids import lfdi, sfdi, with_check_digit

    folder = out / "csip"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    from p2pdoe.services.provision import subject_alt_names

    server = _issue(
        ca_cert, ca_key, host, subject_alt_names(host, alt_names), ExtendedKeyUsageOID.SERVER_AUTH
    )
    _write_pair(folder / "server", *server)
    sites: dict[str, object] = {}
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for site in site_ids:
        cert, key = _issue(ca_cert, ca_key, f"csip-{site}", None, ExtendedKeyUsageOID.CLIENT_AUTH)
        _write_pair(folder / site, cert, key)
        device_lfdi = lfdi(cert.public_bytes(serialization.Encoding.DER))
        sites[site] = {
            "lfdi": device_lfdi,
            "sfdi": sfdi(device_lfdi),
            "pin": with_check_digit(secrets.randbelow(100_000)),  # 2030.5's registration PIN
            "registered": now,
            "cert": str((folder / f"{site}.crt").resolve()),
            "key": str((folder / f"{site}.key").resolve()),
        }
    return {
        "host": host,
        "port": DEFAULT_CSIP_PORT,
        "server_cert": str((folder / "server.crt").resolve()),
        "server_key": str((folder / "server.key").resolve()),
        "ca_cert": str((out / "ca" / "ca.crt").resolve()),
        "sites": sites,
    }


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    san: list[x509.GeneralName] | None,
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `common_name` (EC P-256) signed by the CA, for one extended key usage."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_pair(stem: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """<stem>.crt (0644) and <stem>.key (0600, created so from the start)."""
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    crt, key_path = stem.parent / f"{stem.name}.crt", stem.parent / f"{stem.name}.key"
    for path, data, mode in ((crt, cert.public_bytes(pem), 0o644), (key_path, key_pem, 0o600)):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def forget_site(description: dict[str, object], site: str) -> None:
    """A revoked site's device: its certificate and key deleted, its entry dropped from `csip.sites`
    (csip-server refuses it from its next start on)."""
    section = description.get("csip")
    if not isinstance(section, dict):
        return
    entry = section["sites"].pop(site, None)
    for key in ("cert", "key") if isinstance(entry, dict) else ():
        Path(entry[key]).unlink(missing_ok=True)
