"""The services as a deployment runs them: each edge agent and the coordinator a separate process
(`python -m edge_agent`, `python -m dso_coordinator`) against one broker, and a plain MQTT client
(aiomqtt, not our transport) to watch, read and disturb what travels over the broker.

Every process started here is killed when its `Deployment` closes, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlsplit

import aiomqtt

from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.inprocess import run_admm

T = TypeVar("T")

ROUND_TIMEOUT_S = 240.0  # a whole round takes ~5-10 s; the machine may be shared and slow
EXIT_TIMEOUT_S = 60.0
WATCH_TIMEOUT_S = 60.0


@functools.cache
def reference_objective() -> float:
    """The in-process ADMM's objective on the default scenario (what the processes must agree on)."""
    return run_admm(load_scenario("default"), Policy.DYNAMIC).solution.objective_eur


# -- processes ------------------------------------------------------------------------------------


def service_env(**extra: str) -> dict[str, str]:
    """The environment without any P2PDOE_EDGE_/P2PDOE_DSO_ setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("P2PDOE_EDGE_", "P2PDOE_DSO_"))}
    env.update(extra)
    return env


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` to its end (for commands that stop by themselves, e.g. on a bad setting)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=service_env() if env is None else env,
    )


def assert_service_error(proc: subprocess.CompletedProcess[str], prog: str, *needles: str) -> str:
    """Exit status 2 and exactly one stderr line, '<prog>: error: ...', holding every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@dataclass
class Service:
    """One service process; its stdout and stderr go to `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, limit: int = 6000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-limit:]
        except OSError:
            return "(no output)"

    def wait(self, timeout_s: float) -> int:
        """Its exit status; fails the test (with its log) if it is still running after `timeout_s`."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout_s:g} s:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: no goodbye, so the broker publishes the last will."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT_S)


class Deployment:
    """The default scenario's configurations (`p2pdoe site-config`) in `workdir`, and the services
    started against `broker_url`. Closing it kills every process still running."""

    def __init__(
        self,
        broker_url: str,
        workdir: Path,
        reach: Callable[[str], list[str]] | None = None,
        scenario: Scenario | None = None,
    ):
        """`reach`: an identity's broker options (default `--broker broker_url` for all); `scenario`:
        another than the default."""
        self.url = broker_url
        self.reach = reach or (lambda identity: ["--broker", broker_url])
        self.dir = workdir
        self.config = workdir / "config"
        self.out = workdir / "out"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        write_site_configs(scenario or load_scenario("default"), self.config)
        coordinator = json.loads((self.config / "coordinator.json").read_text(encoding="utf-8"))
        self.sites: list[str] = [s["id"] for s in coordinator["sites"]]
        self.services: list[Service] = []
        self._starts = 0

    def __enter__(self) -> Deployment:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for service in self.services:
            if service.alive:
                service.proc.kill()
        for service in self.services:
            with contextlib.suppress(subprocess.TimeoutExpired):  # one SIGKILL cannot stop (stuck in I/O)
                service.proc.wait(timeout=EXIT_TIMEOUT_S)

    def site_config(self, site: str) -> Path:
        return self.config / "sites" / f"{site}.json"

    def _start(self, name: str, module: str, args: Iterable[str]) -> Service:
        self._starts += 1
        log = self.logs / f"{self._starts:02d}-{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=service_env(),
            )
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def start_edge(self, site: str, *extra: str, rounds: int = 1) -> Service:
        args = [
            "--site-config",
            str(self.site_config(site)),
            *self.reach(f"edge-{site}"),
            "--rounds",
            str(rounds),
        ]
        return self._start(site, "edge_agent", [*args, *extra])

    def start_edges(
        self, sites: Iterable[str] | None = None, extra: dict[str, list[str]] | None = None
    ) -> dict[str, Service]:
        """`extra`: more arguments for some sites' agents."""
        extra = extra or {}
        return {
            site: self.start_edge(site, *extra.get(site, []))
            for site in (self.sites if sites is None else sites)
        }

    def start_coordinator(self, *extra: str, exit_after_round: bool = True) -> Service:
        args = ["--coordinator-config", str(self.config / "coordinator.json"), *self.reach("dso")]
        args += ["--out", str(self.out), *(["--exit-after-round"] if exit_after_round else []), *extra]
        return self._start("coordinator", "dso_coordinator", args)

    @property
    def results_path(self) -> Path:
        return self.out / "results.json"

    def results(self) -> Results:
        return Results.model_validate_json(self.results_path.read_bytes())

    def finish(self, coordinator: Service, edges: Iterable[Service] = ()) -> Results:
        """Wait for the coordinator to end the round and exit cleanly, then for `edges` to exit
        cleanly too; the results it wrote."""
        status = coordinator.wait(ROUND_TIMEOUT_S)
        assert status == 0, f"coordinator exited with {status}:\n{coordinator.output()}"
        for edge in edges:
            status = edge.wait(EXIT_TIMEOUT_S)
            assert status == 0, f"{edge.name} exited with {status}:\n{edge.output()}"
        return self.results()

    def run_round(self, *coordinator_args: str, edge_args: dict[str, list[str]] | None = None) -> Results:
        """The whole day-ahead round as deployed: the coordinator first, then every edge agent
        (`edge_args`: more arguments for some of them)."""
        coordinator = self.start_coordinator("--registration-timeout-s", "120", *coordinator_args)
        edges = self.start_edges(extra=edge_args)
        return self.finish(coordinator, edges.values())


# -- a plain MQTT client --------------------------------------------------------------------------


def plain_client(url: str) -> aiomqtt.Client:
    """A plain aiomqtt client (MQTT 3.1.1, no will): what any third-party tool would use."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    return aiomqtt.Client(
        parts.hostname, parts.port or 1883, identifier=f"test-{uuid.uuid4().hex[:12]}", timeout=10
    )


async def read_retained(
    url: str, filters: Iterable[str], expected: Iterable[str] = (), timeout_s: float = 10.0
) -> dict[str, bytes]:
    """Subscribe afresh and collect the retained messages on `filters` (topic -> payload): until every
    `expected` topic is in, or `timeout_s` passes (then whatever arrived; with no `expected`, what
    arrived within `timeout_s`). Only topics matching `filters` count: amqtt (the embedded broker)
    sometimes hands a client messages of another client's subscriptions."""
    wanted = set(expected)
    filters = list(filters)
    got: dict[str, bytes] = {}
    async with plain_client(url) as client:
        for f in filters:
            await client.subscribe(f, qos=1)
        try:
            async with asyncio.timeout(timeout_s):
                async for m in client.messages:
                    asked = any(m.topic.matches(f) for f in filters)
                    if asked and m.retain and isinstance(m.payload, bytes | bytearray) and m.payload:
                        got[m.topic.value] = bytes(m.payload)
                    if wanted and wanted <= got.keys():
                        break
        except TimeoutError:
            pass
    return got


async def until_retained(
    url: str, topic: str, accept: Callable[[bytes], T | None], timeout_s: float = WATCH_TIMEOUT_S
) -> T:
    """Poll with a fresh subscription until the retained message on `topic` is accepted (`accept`
    returns something other than None); that something. Fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: bytes | None = None
    while time.monotonic() < deadline:
        got = await read_retained(url, [topic], [topic], timeout_s=2.0)
        last = got.get(topic)
        if last is not None:
            value = accept(last)
            if value is not None:
                return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"no acceptable retained message on {topic} within {timeout_s:g} s; last: {last!r}")


async def until_message(
    client: aiomqtt.Client, accept: Callable[[str, bytes], T | None], timeout_s: float = WATCH_TIMEOUT_S
) -> T:
    """Read `client`'s messages (retained or live) until one is accepted; fails after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            async for m in client.messages:
                payload = bytes(m.payload) if isinstance(m.payload, bytes | bytearray) else b""
                value = accept(m.topic.value, payload)
                if value is not None:
                    return value
    except TimeoutError:
        pass
    raise AssertionError(f"no acceptable message within {timeout_s:g} s")
