"""A broker's URL, pure: parsed into a `BrokerAddress`, and shown without its password.
`p2pdoe.services.transport` re-exports all of it."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from p2pdoe.services.transport_api import TransportError

__all__ = ["BrokerAddress", "parse_broker_url", "without_password"]


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False


def without_password(url: str) -> str:
    """The URL with any user and password replaced by `***`: fit for an error message or a log."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"  # up to the last @: even a password with a '/'


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]host[:port]` (port 1883 by default), or `mqtts://` for TLS (8883)."""
    parts = urlsplit(url)
    shown = without_password(url)  # an error message never shows the password
    if parts.scheme not in _DEFAULT_PORTS:
        raise TransportError(f"broker URL {shown!r}: only mqtt://host:port or mqtts://host:port is supported")
    if not parts.hostname:
        raise TransportError(f"broker URL {shown!r} has no host")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise TransportError(f"broker URL {shown!r}: {exc}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"broker URL {shown!r}: no path, query or fragment expected")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "mqtts",
    )
