"""The agreement with one process per participant over a real broker, side by side with the
in-process ADMM of the same scenario, in one run. Prints Markdown.

    .venv/bin/python benchmarks/runtime_processes.py [--scenarios default synthetic-20-peers4]
                                                     [--coordinator-delay-ms 5] [--slow-site-ms 40]

Per scenario: iterations and objective of both (the gap must be ~0), the distributed round's wall
time per iteration (grant to grant at the coordinator) against the in-process critical path per
iteration (slowest community step plus the DSO's), the edge agents' solve time per iteration, a
broker round trip, the edge agents' CPU per iteration (their process's, from each round's opening to
its end) split as they report it: their participant's steps (solves and coupling updates), decoding
and encoding agreement messages, and the rest (the MQTT client stack, the event loop, the hop to the
solver thread), the coordinator's the same way (its DSO participant on every proposal, decoding
proposals and encoding grants, the rest) against its DSO step, and the edge agents' peak resident
memory (VmHWM). Uses a Mosquitto it starts on a free
loopback port (the embedded broker if Mosquitto is missing). All processes share this machine's cores.
`--coordinator-delay-ms D` puts the coordinator behind a proxy that delays every byte by D each way
(tests/delay_proxy.py), as a DSO far from the broker; the edge agents stay on loopback.
`--slow-site-ms D` makes the scenario's first site a straggler: its agent answers every step that
solves D ms late (the agent's `--solve-delay-ms`, a gateway slower than its peers).
`--max-behind T [--straggler-wait F]` runs bounded-staleness rounds (the coordinator's options of the
same names): the last column counts the iterations that closed without some site's new proposal.
`--relay-trades` runs relayed rounds (the coordinator's option): each site hears only its grant, which
carries its peers' trade entries.
`--loop-profile` runs every participant under benchmarks/loop_profile.py and adds, per scenario,
the edge agents' CPU per iteration by where it went, then the coordinator's: the MQTT client's
callbacks, the transport's tasks, the agent's own tasks, asyncio's callbacks, the loop itself, the
other threads. These are whole runs (the connection, registration and the round's opening
included; the imports before the loop starts left out) divided by the iterations, so they add up
to more than the round's CPU in the main table; the recording itself adds a little to every
callback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from p2pdoe.core.schemas.results import Results
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import _wait_for_port, broker_for_tests, free_port
from p2pdoe.services.inprocess import run_admm
from p2pdoe.services.transport import MqttTransport

DELAY_PROXY = Path(__file__).resolve().parent.parent / "tests" / "delay_proxy.py"
LOOP_PROFILE = Path(__file__).resolve().parent / "loop_profile.py"
COORDINATOR_PROFILE = "dso-coordinator"  # its loop profile's file name, beside the sites'


async def round_trip_ms(url: str, count: int = 50) -> float:
    """Median publish-to-receive time of a small QoS 1 message between two clients."""
    async with MqttTransport(url, "bench-ping") as a, MqttTransport(url, "bench-pong") as b:
        await b.subscribe("bench/ping")
        incoming = b.messages()
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await a.publish("bench/ping", b"x" * 100)
            await anext(incoming)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


RECEIVER = """
import asyncio, resource, sys, time
from p2pdoe.services.transport import MqttTransport
async def main(url):
    async with MqttTransport(url, "bench-receiver") as t:
        await t.subscribe("bench/#")
        print("ready", flush=True)
        incoming = t.messages()
        await anext(incoming)
        use = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, n = use.ru_utime + use.ru_stime, 0
        async for m in incoming:
            if m.topic == "bench/end":
                break
            n += 1
        use = resource.getrusage(resource.RUSAGE_SELF)
        print((use.ru_utime + use.ru_stime - cpu0) / n * 1e6, n, flush=True)
asyncio.run(main(sys.argv[1]))
"""


async def receive_cpu_us(url: str, count: int = 2000, size: int = 6200) -> float:
    """CPU time the client stack (paho, the link driving it, our transport) spends per received QoS 1
    message of `size` bytes (a proposal of the default day is 6.2 kB), measured in a receiving process.
    It counts what it received up to an end marker: a broker drops what a slow subscriber has queued
    beyond its limit (Mosquitto: 1,000 messages), so on a loaded machine fewer than `count` may come."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RECEIVER, url, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    await proc.stdout.readline()  # subscribed
    async with MqttTransport(url, "bench-sender") as sender:
        for _ in range(count):
            await sender.publish("bench/load", b"x" * size)
        reading = asyncio.ensure_future(proc.stdout.readline())
        while not reading.done():  # the marker again until heard: a full queue drops it too
            await sender.publish("bench/end", b"")
            await asyncio.wait({reading}, timeout=0.5)
    await proc.wait()
    return float(reading.result().split()[0])


@contextlib.contextmanager
def delayed(url: str, delay_ms: float) -> Iterator[str]:
    """`url` itself when `delay_ms` is 0, else the URL of a proxy to it that delays every byte."""
    if delay_ms <= 0:
        yield url
        return
    target = urlsplit(url)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "delay_proxy.log"
        with log.open("wb") as out:
            proxy = subprocess.Popen(
                [sys.executable, str(DELAY_PROXY), "127.0.0.1", str(port), str(target.hostname),
                 str(target.port), str(delay_ms)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            _wait_for_port("127.0.0.1", port, proxy, log, "the delay proxy", 10.0)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proxy.terminate()
            proxy.wait(10)


def distributed(
    scenario: str,
    url: str,
    work: Path,
    coordinator_url: str | None = None,
    slow_site_ms: float = 0.0,
    coordinator_args: tuple[str, ...] = (),
    profiles: Path | None = None,
) -> Results:
    """`profiles`: run every participant under loop_profile.py, writing `<site>.json` there for each
    edge agent and `dso-coordinator.json` for the coordinator."""
    s = load_scenario(scenario)
    write_site_configs(s, work)
    py = sys.executable

    def launcher(name: str) -> list[str]:
        return [py] if profiles is None else [py, str(LOOP_PROFILE), str(profiles / f"{name}.json")]

    agents = [
        subprocess.Popen(
            [*launcher(site), "-m", "edge_agent", "--site-config", str(work / "sites" / f"{site}.json"),
             "--broker", url, "--rounds", "1", "--log-level", "WARNING",
             *(["--solve-delay-ms", str(slow_site_ms)] if slow_site_ms and site == s.ids[0] else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for site in s.ids
    ]  # fmt: skip
    try:
        subprocess.run(
            [*launcher(COORDINATOR_PROFILE), "-m", "dso_coordinator",
             "--coordinator-config", str(work / "coordinator.json"), "--broker", coordinator_url or url,
             "--out", str(work), "--exit-after-round", "--registration-timeout-s", "300",
             "--log-level", "WARNING", *coordinator_args],
            check=True, timeout=1800,
        )  # fmt: skip
    finally:
        for a in agents:
            try:
                a.wait(30)
            except subprocess.TimeoutExpired:
                a.kill()
    return Results.model_validate_json((work / "results.json").read_bytes())


def row(
    scenario: str,
    url: str,
    rtt_ms: float,
    coordinator_delay_ms: float = 0.0,
    slow_site_ms: float = 0.0,
    coordinator_args: tuple[str, ...] = (),
    loop_profile: bool = False,
) -> str:
    s = load_scenario(scenario)
    t0 = time.perf_counter()
    inproc = run_admm(s, Policy.DYNAMIC)
    inproc_wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, delayed(url, coordinator_delay_ms) as coordinator_url:
        profiles = Path(tmp) / "profiles" if loop_profile else None
        if profiles is not None:
            profiles.mkdir()
        r = distributed(scenario, url, Path(tmp), coordinator_url, slow_site_ms, coordinator_args, profiles)
        profile = "" if profiles is None else loop_profile_tables(scenario, profiles, r.solver.iterations)
    sv, rt = r.solver, r.runtime
    assert rt is not None
    assert sv.solve_times is not None
    it_in = inproc.dso.iterations
    crit_ms = inproc.timings.critical_path_s() / it_in * 1e3
    wall_ms = rt.iteration_wall_ms["median"]
    edge = [t for t in sv.solve_times if t.role == "community"]
    dso = next(t for t in sv.solve_times if t.role == "dso")
    slowest_edge = max(t.median_ms for t in edge)
    gap = 100.0 * abs(r.objective_eur - inproc.solution.objective_eur) / abs(inproc.solution.objective_eur)
    rss = max(site.rss_mb or 0.0 for site in rt.sites)
    frozen = sum(bool(p.frozen_sites) for p in sv.residual_history or [])

    def per_iteration_ms(values: list[float | None]) -> float:
        return statistics.mean(v or 0.0 for v in values) / sv.iterations * 1e3

    cpu_ms = per_iteration_ms([site.cpu_s for site in rt.sites])
    coord = rt.coordinator_cpu
    assert coord is not None
    coord_ms = coord.round_s / sv.iterations * 1e3
    coord_dso_ms = coord.dso_steps_s / sv.iterations * 1e3
    coord_codec_ms = coord.codec_s / sv.iterations * 1e3
    steps_ms = per_iteration_ms([site.cpu_steps_s for site in rt.sites])
    codec_ms = per_iteration_ms([site.cpu_codec_s for site in rt.sites])
    return (
        f"| {scenario} | {len(s.ids)} | {sv.iterations} / {it_in} | {gap:.2e} | {sv.wall_time_s:.2f} | "
        f"{inproc_wall:.2f} | {wall_ms:.1f} / {rt.iteration_wall_ms['p95']:.1f} | {crit_ms:.2f} | "
        f"{wall_ms / crit_ms:.1f} | {slowest_edge:.2f} | {dso.median_ms:.2f} | {rtt_ms:.2f} | "
        f"{cpu_ms:.2f} | {steps_ms:.2f} | {codec_ms:.2f} | {cpu_ms - steps_ms - codec_ms:.2f} | "
        f"{cpu_ms / steps_ms:.1f} | {coord_ms:.2f} | {coord_dso_ms:.2f} | {coord_codec_ms:.2f} | "
        f"{coord_ms - coord_dso_ms - coord_codec_ms:.2f} | {coord_ms / dso.median_ms:.1f} | "
        f"{sv.messages_per_iteration:.1f} | {rss:.0f} | {frozen} |"
    ) + profile


PARTS = {
    "the MQTT client (paho, and aiomqtt or the link that drives it)": ("paho", "aiomqtt", "mqtt_link"),
    "the transport (p2pdoe.services.transport)": ("services/transport", "services.transport", "delivery"),
    "asyncio's own callbacks (wakeups, futures)": ("asyncio", "concurrent"),
}


def _part(module: str) -> str:
    found = (part for part, keys in PARTS.items() if any(k in module for k in keys))
    return next(found, "the agent's own tasks")


def loop_profile_table(title: str, reports: list[dict[str, Any]], iterations: int) -> str:
    """CPU per iteration by where it went (means over the processes, whole runs)."""
    parts: Counter[str] = Counter()
    callbacks: Counter[str] = Counter()
    for rep in reports:
        for name, c in rep["callbacks"].items():
            parts[_part(c["module"])] += c["cpu_s"]
            callbacks[name] += c["cpu_s"]
        callbacks_s = sum(c["cpu_s"] for c in rep["callbacks"].values())
        parts["the loop itself (selector, scheduling)"] += rep["in_loop_s"] - callbacks_s
        parts["other threads (the solver thread: steps, encoding)"] += rep["process_s"] - rep["main_thread_s"]
    scale = 1e3 / len(reports) / iterations
    lines = [
        f"\n\nLoop profile of {title} (whole runs), ms per iteration:\n",
        "| where | ms per iteration |",
        "|---|--:|",
    ]
    lines += [f"| {part} | {v * scale:.2f} |" for part, v in parts.most_common()]
    lines += [f"| total | {sum(parts.values()) * scale:.2f} |", ""]
    lines += ["| callback | ms per iteration |", "|---|--:|"]
    lines += [f"| `{name}` | {v * scale:.3f} |" for name, v in callbacks.most_common(10)]
    return "\n".join(lines) + "\n"


def loop_profile_tables(scenario: str, profiles: Path, iterations: int) -> str:
    """The edge agents' table, then the coordinator's."""
    files = sorted(f for f in profiles.glob("*.json") if f.stem != COORDINATOR_PROFILE)
    edges = [json.loads(f.read_text()) for f in files]
    coordinator = json.loads((profiles / f"{COORDINATOR_PROFILE}.json").read_text())
    return loop_profile_table(f"the edge agents, {scenario}", edges, iterations) + loop_profile_table(
        f"the coordinator, {scenario}", [coordinator], iterations
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scenarios", nargs="+", default=["default", "synthetic-20-peers4"])
    parser.add_argument("--coordinator-delay-ms", type=float, default=0.0, help="each way, see above")
    parser.add_argument("--slow-site-ms", type=float, default=0.0, help="the first site's delay, see above")
    parser.add_argument("--max-behind", type=int, default=0, help="bounded staleness, see above")
    parser.add_argument("--straggler-wait", type=float, default=1.0, help="see above")
    parser.add_argument("--relay-trades", action="store_true", help="the grants relay the trades, see above")
    parser.add_argument("--loop-profile", action="store_true", help="loop profiles, see above")
    args = parser.parse_args()
    stale = ("--max-behind", str(args.max_behind), "--straggler-wait", str(args.straggler_wait))
    relay = ("--relay-trades",) if args.relay_trades else ()
    coordinator_args = (*(stale if args.max_behind else ()), *relay)
    with broker_for_tests() as broker:
        rtt = asyncio.run(round_trip_ms(broker.url))
        per_message = asyncio.run(receive_cpu_us(broker.url))
        print(f"broker: {broker.kind}; {sys.platform}; one process per participant")
        if args.coordinator_delay_ms > 0:
            delay = args.coordinator_delay_ms
            print(f"the coordinator behind a proxy delaying every byte {delay:g} ms each way")
        if args.slow_site_ms > 0:
            print(f"each scenario's first site answers every step that solves {args.slow_site_ms:g} ms late")
        if args.relay_trades:
            print("the grants relay the peers' trade entries: a site hears no peer's proposal")
        if args.max_behind:
            print(f"bounded staleness: max behind {args.max_behind}, straggler wait {args.straggler_wait:g}")
        print(f"client CPU per received 6.2 kB QoS 1 message: {per_message:.0f} us\n")
        print(
            "| scenario | sites | iterations MQTT / in-process | objective gap % | MQTT round s | "
            "in-process s | MQTT ms per iteration median / p95 | in-process critical path ms per iteration | "
            "ratio | slowest edge step ms (median) | DSO step ms | broker round trip ms | "
            "edge CPU ms per iteration (mean) | of which steps | codec | the rest | CPU / steps | "
            "coordinator CPU ms per iteration | of which DSO | codec | the rest | CPU / DSO step | "
            "messages per iteration | edge VmHWM max MB | frozen iterations |"
        )
        print("|" + "---|" * 25)
        for scenario in args.scenarios:
            delays = (args.coordinator_delay_ms, args.slow_site_ms)
            print(row(scenario, broker.url, rtt, *delays, coordinator_args, args.loop_profile), flush=True)


if __name__ == "__main__":
    main()
