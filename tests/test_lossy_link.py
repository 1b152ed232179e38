"""Every edge agent behind a lossy, slow link, as real processes over a real Mosquitto on the lockstep
clock: the edge agents run in a network namespace of the test's own, and reach the broker through a
proxy that delays every byte by 50 ms each way (this kernel has no netem); from the moment the
first rolling round opens, nftables drop 30 % of the packets each way for 60 s. Before, such a link ended
an edge agent and then the coordinator ("publish ... failed: Operation timed out"). Now every process
rides it through: the day ends, nothing is violated, every settlement an edge agent journaled reaches
the coordinator, and the drops really happened (nftables' counters). A site may settle nothing at all:
with 30 % loss TCP's backoff can hold one connection for longer than the lockstep clock waits (60 s),
and the half-hour day ends before it is back; the test then asks that the clock said so.
Needs root, `ip` and `nft`: skipped without them, unless P2PDOE_REQUIRE_MOSQUITTO=1 (CI).

Measured on the way: with 30 % loss both ways, TCP's retransmission backoff stalls single
connections for tens of seconds, so a lockstep day crawls and rounds lose sites at their deadlines
(60 s of it from the day-ahead round's opening: three attempts, each losing a site, then no
day-ahead agreement and the day on its defaults), but no process ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from p2pdoe.cli.demo import Processes, RealTime, run_demo
from p2pdoe.core.schemas.results import Results
from p2pdoe.services.broker import Broker, free_port

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]
QUARTER_HOURS = {"horizon": {"intervals": 96, "dt_h": 0.25}}
LOSS_PCT = 30
LOSSY_S = 60.0
DELAY_MS = 50
HOURS = 0.5
PROXY = Path(__file__).with_name("delay_proxy.py")


@dataclass(frozen=True)
class LossyLink:
    ns: str  # the edge agents' namespace
    veth: str  # its end of the link
    host_ip: str  # the other end, in the test's namespace: where the proxy listens
    ns_ip: str

    @property
    def inside(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)

    def lose(self, pct: int) -> None:
        """Drop `pct` % of the packets each way on the edge agents' end of the link."""
        rules = (
            "table inet lossy {\n"
            f"  chain inbound {{ type filter hook input priority 0; policy accept; "
            f'iifname "{self.veth}" numgen random mod 100 < {pct} counter drop; }}\n'
            f"  chain outbound {{ type filter hook output priority 0; policy accept; "
            f'oifname "{self.veth}" numgen random mod 100 < {pct} counter drop; }}\n'
            "}\n"
        )
        subprocess.run([*self.inside, "nft", "-f", "-"], input=rules, check=True, text=True, timeout=30)

    def heal(self) -> int:
        """Stop dropping; the packets dropped so far, both ways."""
        out = _run(*self.inside, "nft", "list", "table", "inet", "lossy")
        _run(*self.inside, "nft", "delete", "table", "inet", "lossy")
        return sum(int(w.split()[0]) for w in out.split("counter packets ")[1:])


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def _unavailable(why: str) -> None:
    if os.environ.get("P2PDOE_REQUIRE_MOSQUITTO") == "1":
        pytest.fail(f"the lossy-link test cannot run: {why}")
    pytest.skip(why)


@pytest.fixture
def lossy_link() -> Iterator[LossyLink]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        _unavailable("needs root, iproute2 and nftables (apt-get install nftables)")
    n, tag = os.getpid() % 250 + 1, os.getpid() % 100000
    link = LossyLink(f"p2pdoe-lossy-{os.getpid()}", f"p2pl{tag}b", f"10.213.{n}.1", f"10.213.{n}.2")
    host_end = f"p2pl{tag}a"
    _run("ip", "netns", "add", link.ns)
    try:
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", link.veth)
        _run("ip", "link", "set", link.veth, "netns", link.ns)
        _run("ip", "addr", "add", f"{link.host_ip}/30", "dev", host_end)
        _run("ip", "link", "set", host_end, "up")
        _run(*link.inside, "ip", "addr", "add", f"{link.ns_ip}/30", "dev", link.veth)
        _run(*link.inside, "ip", "link", "set", link.veth, "up")
        _run(*link.inside, "ip", "link", "set", "lo", "up")
        yield link
    finally:
        subprocess.run(["ip", "netns", "del", link.ns], check=False, timeout=30)
        subprocess.run(["ip", "link", "del", host_end], check=False, capture_output=True, timeout=30)


def _proxy(link: LossyLink, broker: Broker) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, str(PROXY), link.host_ip, str(port), broker.host, str(broker.port), str(DELAY_MS)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((link.host_ip, port)) == 0:
                return proc, f"mqtt://{link.host_ip}:{port}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the delay proxy did not start")


@pytest.mark.timeout(1500)
def test_every_edge_agent_rides_through_a_lossy_slow_link(
    mosquitto_broker: Broker, lossy_link: LossyLink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, url = _proxy(lossy_link, mosquitto_broker)
    start = Processes.start

    def behind_the_link(self: Processes, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if name.startswith("edge-"):
            at = argv.index("--broker")
            argv = ["ip", "netns", "exec", lossy_link.ns, *argv[: at + 1], url, *argv[at + 2 :]]
        return start(self, name, argv)

    monkeypatch.setattr(Processes, "start", behind_the_link)
    out = tmp_path / "demo"
    dropped: list[int] = []

    def episode() -> None:
        _wait_for(lambda: "round day-ahead-rt001 opened" in _log(out, "edge-solar-18"), 600)
        lossy_link.lose(LOSS_PCT)
        time.sleep(LOSSY_S)
        dropped.append(lossy_link.heal())

    lossy = threading.Thread(target=episode, daemon=True)
    lossy.start()
    try:
        results = run_demo(
            "default", QUARTER_HOURS, mosquitto_broker.url, out, False, "dynamic", RealTime(hours=HOURS)
        )
    finally:
        proxy.kill()
        proxy.wait()
    lossy.join(LOSSY_S + 10)

    assert isinstance(results, Results)
    rt = results.realtime
    assert rt is not None
    assert rt.envelope_violations.count == 0
    assert dropped
    assert dropped[0] > 100  # the link really lost packets
    clock = _log(out, "clock")
    settled_somewhere = False
    for site in [c.id for c in results.communities]:
        journaled = _journaled(out / "journal" / f"{site}.db")
        received = {_at(s.interval_start) for s in rt.settlements if s.site == site}
        # A site settles nothing only if TCP's backoff stalled it so long that the clock went on without it
        assert journaled or f"edge-{site}: silent for" in clock, site
        assert journaled <= received, site  # nothing an edge agent settled is lost
        settled_somewhere |= bool(journaled)
    assert settled_somewhere
    logs = {p.stem: p.read_text(errors="replace") for p in (out / "logs").glob("*.log")}
    assert not [name for name, text in logs.items() if "Traceback" in text]


def _journaled(db: Path) -> set[datetime]:
    """The starts of the intervals an edge agent settled in its journal."""
    with contextlib.closing(sqlite3.connect(db)) as c:
        return {_at(start) for (start,) in c.execute("SELECT interval_start FROM settlements")}


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _log(out: Path, name: str) -> str:
    path = out / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)
