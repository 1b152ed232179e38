"""MQTT brokers for tests, the demo and fresh machines: a real Mosquitto, or an embedded pure-Python one.

Both run as child processes on 127.0.0.1 and are handed back as a `Broker` handle (a context manager)
that knows its URL, whether it speaks MQTT v5, and how to stop and restart itself on the same port.

- `start_mosquitto()` writes a config (anonymous, `set_tcp_nodelay true`, no persistence) to a temporary
  directory and runs `mosquitto -c` on it.
- `start_embedded()` runs amqtt (the `demo` extra) in a child Python process. amqtt speaks MQTT 3.1.1
  only; the transport falls back to it.
- `broker_for_tests()` picks Mosquitto when it is installed (on PATH or in /usr/sbin), else the
  embedded broker; with `P2PDOE_REQUIRE_MOSQUITTO=1` a missing Mosquitto is an error.

`python -m p2pdoe.services.broker [--port N]` runs the embedded broker in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from p2pdoe.errors import P2PDoeError
from p2pdoe.services.broker_check import problems

__all__ = [
    "MOSQUITTO_ENV",
    "REQUIRE_MOSQUITTO_ENV",
    "Broker",
    "BrokerUnavailableError",
    "broker_for_tests",
    "embedded_available",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "start_embedded",
    "start_mosquitto",
]

REQUIRE_MOSQUITTO_ENV = "P2PDOE_REQUIRE_MOSQUITTO"
# A path to the mosquitto executable, or "none" to act as if it were not installed.
MOSQUITTO_ENV = "P2PDOE_MOSQUITTO"
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

BrokerKind = Literal["mosquitto", "embedded"]


class BrokerUnavailableError(P2PDoeError):
    """No broker of the requested kind can be started here."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str | None:
    """The mosquitto executable: $P2PDOE_MOSQUITTO if set ("none": none), else on PATH, else in /usr/sbin
    or /usr/local/sbin (Debian puts it there)."""
    override = os.environ.get(MOSQUITTO_ENV)
    if override is not None:
        return None if override.lower() in ("", "none") else override
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def embedded_available() -> bool:
    """Whether the embedded broker (amqtt, in the `demo` extra) is installed."""
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


def mosquitto_config(port: int, host: str = HOST, extra_config: str = "") -> str:
    """A minimal Mosquitto 2.x config: one anonymous listener, Nagle off, nothing persisted."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        # An ADMM round of 100 agents fell from 44 ms to 7.6 ms with Nagle off.
        "set_tcp_nodelay true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if extra_config:
        lines.append(extra_config.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], log: Path, what: str, timeout_s: float
) -> None:
    """Return once `host:port` accepts connections; raise with the broker's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise BrokerUnavailableError(
                f"{what} exited with code {proc.returncode} before listening on {host}:{port}:\n" + _tail(log)
            )
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise BrokerUnavailableError(
                f"{what} did not listen on {host}:{port} within {timeout_s:g} s:\n" + _tail(log)
            )
        time.sleep(0.02)


def _tail(log: Path, limit: int = 4000) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return text[-limit:] or "(no output)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class Broker:
    """A running broker child process on `host:port`. Close it (or use `with`) to stop it."""

    kind: BrokerKind
    host: str
    port: int
    argv: list[str]
    workdir: Path
    start_timeout_s: float = START_TIMEOUT_S
    tls: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def supports_v5(self) -> bool:
        """Mosquitto 2.x speaks MQTT v5; amqtt only 3.1.1."""
        return self.kind == "mosquitto"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """What the broker wrote to stdout/stderr so far."""
        return _tail(self.log_path, limit=1 << 20)

    def start(self) -> None:
        """Start the process and wait until the port accepts connections."""
        if self.running:
            return
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        _wait_for_port(self.host, self.port, self._proc, self.log_path, self.kind, self.start_timeout_s)

    def stop(self) -> None:
        """Stop the process (terminate, then kill); the handle can be started again on the same port."""
        if self._proc is not None:
            self.thaw()  # a frozen broker would not hear the terminate
            _stop(self._proc)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved on the way out."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT_S)
            self._proc = None

    def freeze(self) -> None:
        """SIGSTOP: the broker stalls (connections stay open, nothing is answered) until `thaw`."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the process and remove its temporary directory."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _launch(
    kind: BrokerKind, port: int, make_argv: Callable[[Path], list[str]], start_timeout_s: float
) -> Broker:
    tmp = tempfile.TemporaryDirectory(prefix=f"p2pdoe-{kind}-")
    workdir = Path(tmp.name)
    broker = Broker(
        kind=kind,
        host=HOST,
        port=port or free_port(),
        argv=[],
        workdir=workdir,
        start_timeout_s=start_timeout_s,
        _tmp=tmp,
    )
    try:
        broker.argv = make_argv(workdir)
        broker.start()
    except BaseException:
        broker.close()
        raise
    return broker


def start_mosquitto(
    port: int = 0,
    extra_config: str = "",
    *,
    executable: str | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Broker:
    """Run Mosquitto on 127.0.0.1:`port` (0: a free port) with a generated config; wait until it listens."""
    exe = executable or find_mosquitto()
    if exe is None:
        raise BrokerUnavailableError("mosquitto is not installed (not on PATH, nor in /usr/sbin)")
    chosen = port or free_port()

    def argv(workdir: Path) -> list[str]:
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_config(chosen, HOST, extra_config), encoding="utf-8")
        return [exe, "-c", str(conf)]

    return _launch("mosquitto", chosen, argv, start_timeout_s)


def start_provisioned(bundle: Path, *, start_timeout_s: float = START_TIMEOUT_S) -> Broker:
    """Run Mosquitto with a bundle's configuration as is (`p2pdoe provision`): TLS on the bundle's
    host and port, its password file and ACL, persistence in the bundle."""
    exe = find_mosquitto()
    if exe is None:
        raise BrokerUnavailableError("mosquitto is not installed (not on PATH, nor in /usr/sbin)")
    try:
        broker = json.loads((bundle / "provision.json").read_text(encoding="utf-8"))["broker"]
        config, host, port = str(broker["config"]), str(broker["host"]), int(broker["port"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerUnavailableError(f"{bundle} holds no readable provision.json: {exc}") from None
    found = problems(Path(config))
    if found:
        raise BrokerUnavailableError(f"{config}: {found[0]}")
    tmp = tempfile.TemporaryDirectory(prefix="p2pdoe-mosquitto-tls-")
    b = Broker("mosquitto", host, port, [exe, "-c", config], Path(tmp.name), start_timeout_s, True, _tmp=tmp)
    try:
        b.start()
    except BaseException:
        b.close()
        raise
    return b


def start_embedded(port: int = 0, *, start_timeout_s: float = START_TIMEOUT_S) -> Broker:
    """Run the embedded amqtt broker (MQTT 3.1.1 only) in a child Python process on 127.0.0.1:`port`."""
    if not embedded_available():
        raise BrokerUnavailableError("the embedded broker needs amqtt: pip install 'p2pdoe[demo]'")
    chosen = port or free_port()

    def argv(workdir: Path) -> list[str]:
        return [sys.executable, "-m", "p2pdoe.services.broker", "--host", HOST, "--port", str(chosen)]

    return _launch("embedded", chosen, argv, start_timeout_s)


def broker_for_tests(port: int = 0) -> Broker:
    """Mosquitto if installed, else the embedded broker.

    With P2PDOE_REQUIRE_MOSQUITTO=1 (CI) a missing Mosquitto raises `BrokerUnavailableError` instead.
    """
    if find_mosquitto() is not None:
        return start_mosquitto(port)
    if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
        raise BrokerUnavailableError(
            f"{REQUIRE_MOSQUITTO_ENV}=1 but mosquitto is not installed (not on PATH, nor in /usr/sbin)"
        )
    return start_embedded(port)


def embedded_config(host: str, port: int) -> dict[str, object]:
    """amqtt's configuration: one TCP listener, anonymous clients, no $SYS or packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class SnapshotLoops(dict):  # type: ignore[type-arg]
    """A dict whose loops run over a copy. amqtt 0.12.1 awaits inside loops over its subscriptions
    (sending a new client the retained messages, broadcasting), so a client subscribing meanwhile
    ended the loop with "dictionary changed size during iteration", and with it the other client's
    connection (seen in one demo run in two)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().__iter__()))

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())


async def serve_embedded(host: str, port: int, stop: asyncio.Event | None = None) -> None:
    """Run amqtt in this event loop until `stop` is set (forever without one)."""
    from amqtt.broker import Broker as AmqttBroker

    broker = AmqttBroker(embedded_config(host, port))
    broker._subscriptions = SnapshotLoops(broker._subscriptions)
    await broker.start()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pdoe.services.broker", description="Run the embedded MQTT 3.1.1 broker (amqtt)."
    )
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    if not embedded_available():
        print("the embedded broker needs amqtt: pip install 'p2pdoe[demo]'", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_embedded(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
