"""What both service entry points share: command-line options for the settings sources, a transport
with a last will, graceful stop on SIGTERM/SIGINT, and one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from p2pdoe.core.schemas.lockstep import Phase
from p2pdoe.errors import P2PDoeError
from p2pdoe.services.clock import Clock, ScaledClock, WallClock
from p2pdoe.services.health import heartbeat
from p2pdoe.services.lockstep_clock import LockstepClock
from p2pdoe.services.retained_sweep import RetainedSweep
from p2pdoe.services.settings import (
    ConfigError,
    ServiceSettings,
    configure_logging,
    load_settings,
    read_password_file,
)
from p2pdoe.services.shell import Shell
from p2pdoe.services.transport import Backoff, LastWill, MqttTransport, Transport
from p2pdoe.services.transport_layer import TransportLayer

if TYPE_CHECKING:  # cryptography is imported only by a process that signs (about 6 MB resident)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from p2pdoe.services.signing import Signer

S = TypeVar("S", bound=ServiceSettings)
EXIT_CONFIG = 2
log = logging.getLogger(__name__)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="a YAML or JSON settings file")
    p.add_argument("--secrets-dir", type=Path, help="a directory of secret files (e.g. <prefix>password)")
    p.add_argument("--broker", help="mqtt://[user:password@]host[:port], or mqtts:// for TLS")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, help="a file holding the broker password")
    p.add_argument("--ca-cert", type=Path, help="the CA certificate of an mqtts:// broker")
    p.add_argument("--client-id")
    p.add_argument("--signing-key", type=Path, help="this identity's Ed25519 key (p2pdoe provision)")
    p.add_argument(
        "--trusted-keys", type=Path, help="public-keys.json: believe only messages their owners signed"
    )
    p.add_argument("--health-file", type=Path, help="rewritten every 5 s: alive, and connected or not")
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one; default none)"
    )
    p.add_argument("--metrics-host", help="the address the metrics are served on (default 127.0.0.1)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    clock = p.add_argument_group("the clock")
    clock.add_argument(
        "--clock",
        choices=["wall", "scaled", "lockstep"],
        help="wall time, scaled wall time (--speed) or lockstep (granted by p2pdoe.services.lockstep)",
    )
    clock.add_argument("--start", help="the day's first interval: today (default), now, scenario, ISO 8601")
    clock.add_argument("--speed", type=float, help="simulated seconds per wall second (default 1)")
    clock.add_argument("--sim-origin", help="simulated time at --wall-origin (default: now)")
    clock.add_argument("--wall-origin", help="the clock's wall origin (default: now)")
    return p


def settings_from(kind: type[S], args: argparse.Namespace, skip: Sequence[str] = ()) -> S:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "secrets_dir", *skip)}
    return load_settings(kind, options, args.config, args.secrets_dir)


def transport_for(
    settings: ServiceSettings,
    client_id: str,
    will: LastWill | None,
    identity: str | None = None,
    sweep_retained: bool = False,
) -> Transport:
    """The service's transport; with a signing key or trusted keys in `settings`, signed as
    `identity` and believing only authentic messages (`SignedTransport`); with `sweep_retained` (the
    coordinator), deleting what sites leave retained where nothing belongs (`RetainedSweep`)."""
    signer, trusted = signing_for(settings, identity)
    mqtt = MqttTransport(
        settings.broker,
        settings.client_id or client_id,
        username=settings.username,
        password=password_source(settings),
        ca_cert=settings.ca_cert,
        will=will if signer is None else signer.signed_will(will),
        backoff=reconnect_backoff(settings.speed),
        keepalive_s=settings.keepalive_s,
        session_expiry_s=settings.session_expiry_s,
    )
    inner: Transport = RetainedSweep(mqtt) if sweep_retained else mqtt
    if signer is None:
        return inner
    from p2pdoe.services.signing import SignedTransport

    return SignedTransport(inner, signer, trusted)


def signing_for(
    settings: ServiceSettings, identity: str | None
) -> tuple[Signer | None, dict[str, Ed25519PublicKey] | None]:
    """The signer and trusted keys `settings` name (None, None without either)."""
    if settings.signing_key is None and settings.trusted_keys is None:
        return None, None
    if identity is None:
        raise ConfigError("this process takes no signing key and no trusted keys")
    from p2pdoe.services.signing import Signer, read_private_key, read_public_keys

    key = None if settings.signing_key is None else read_private_key(settings.signing_key)
    trusted = None if settings.trusted_keys is None else read_public_keys(settings.trusted_keys)
    return Signer(identity, key), trusted


def count_refusals(transport: Transport, counter: Counter[str]) -> None:
    """Messages refused for their signatures, and retained ones deleted, are also counted in `counter`
    (a machine's reader)."""
    layer: object = transport
    while isinstance(layer, TransportLayer):
        layer.count_into(counter)
        layer = layer.inner


def reconnect_backoff(speed: float) -> Backoff:
    """Reconnection every 30 s at most in wall time, and at most every 30 simulated seconds on a
    faster clock (but not more often than once a wall second): at 120x a 30 s wall wait would be an
    hour of the simulated day on stale envelopes."""
    cap = min(30.0, max(1.0, 30.0 / speed))
    return Backoff(initial_s=min(0.5, cap), cap_s=cap)


def password_source(settings: ServiceSettings) -> str | Callable[[], str] | None:
    """The password, or with a password file a function that reads it again at every connection, so
    a rotated password is taken on the next reconnect (the broker drops the old one on its reload).
    An unreadable file at start is a ConfigError; later, the last password read is kept."""
    path = settings.password_file
    if path is None:
        return settings.secret()
    last = [read_password_file(path)]

    def current() -> str:
        try:
            last[0] = read_password_file(path)
        except ConfigError as exc:
            log.warning("%s: keeping the password read before", exc)
        return last[0]

    return current


@contextlib.asynccontextmanager
async def service_transport(
    settings: ServiceSettings,
    client_id: str,
    will: LastWill | None,
    identity: str | None = None,
    sweep_retained: bool = False,
) -> AsyncIterator[Transport]:
    """The service's connected transport, with its heartbeat on `health_file` if one is set, and
    its metrics served on `metrics_port` if one is set."""
    async with transport_for(settings, client_id, will, identity, sweep_retained) as transport:  # type: ignore[attr-defined]
        beat = None
        if settings.health_file is not None:
            beat = asyncio.create_task(heartbeat(transport, settings.health_file))
        try:
            if settings.metrics_port is None:
                yield transport
            else:
                async with observed(
                    transport, settings.client_id or client_id, settings.metrics_host, settings.metrics_port
                ) as seen:
                    yield seen
        finally:
            if beat is not None:
                beat.cancel()


@contextlib.asynccontextmanager
async def observed(transport: Transport, service: str, host: str, port: int) -> AsyncIterator[Transport]:
    """`transport` with its messages read into metrics served on host:port (prometheus-client is
    imported only here: a service without metrics does not load it)."""
    from p2pdoe.services.metrics import ObservedTransport, ServiceMetrics, metrics_served

    metrics = ServiceMetrics(service)
    async with metrics_served(metrics, host, port) as bound:
        log.info("%s: metrics on http://%s:%d/metrics", service, host, bound)
        yield ObservedTransport(transport, metrics)


def make_clock(
    settings: ServiceSettings,
    transport: Transport,
    member: str,
    phase: Phase,
    *,
    every_step: bool = False,
    offset_s: float = 0.0,
) -> Clock:
    """The service's clock as its settings say; `member` and `phase`: its part in a lockstep day;
    `offset_s`: a fault-injected shift (wall and scaled clocks)."""
    clock = _clock(settings, transport, member, phase, every_step, offset_s)
    signer = getattr(transport, "signer", None) if isinstance(transport, TransportLayer) else None
    if signer is not None:
        signer.use_clock(clock.now)
    return clock


def _clock(
    settings: ServiceSettings,
    transport: Transport,
    member: str,
    phase: Phase,
    every_step: bool,
    offset_s: float,
) -> Clock:
    kind = settings.clock_kind()
    if kind == "lockstep":
        return LockstepClock(transport, member, phase, every_step=every_step)
    if kind == "wall":
        return WallClock(offset_s)
    return ScaledClock(settings.sim_clock(datetime.now(UTC)), offset_s)


@contextlib.asynccontextmanager
async def running_clock(clock: Clock, shell: Shell) -> AsyncIterator[None]:
    """The shell reading and, on a lockstep clock, the clock joined and its first grant heard (so
    `now()` is known); on leaving, a lockstep member says it has left."""
    shell.start_reading()
    if not isinstance(clock, LockstepClock):
        yield
        return
    await clock.start()
    task = asyncio.create_task(clock.run(), name="lockstep-clock")
    try:
        await clock.ready()
        yield
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(clock.leave(), 2.0)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def until_stopped(work: Awaitable[int]) -> int:
    """Run `work`; SIGTERM or SIGINT cancels it (the transport then says goodbye cleanly)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run_service(prog: str, main: Callable[[], Awaitable[int]]) -> int:
    try:
        return asyncio.run(until_stopped(main()))
    except P2PDoeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def setup(prog: str, kind: type[S], args: argparse.Namespace) -> S | int:
    """The settings, or the exit status after printing one line."""
    try:
        settings = settings_from(kind, args)
    except P2PDoeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, prog)
    return settings
