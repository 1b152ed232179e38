"""Regional brokers (issue 19, item 4): two feeders, each with its own Mosquitto, coordinator and
sites, bridged over TLS into the DSO's core broker (`p2pdoe provision --feeder`); one monitor reads
both feeders there. Three real Mosquitto processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe
from service_helpers import Deployment, service_env

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.bridges import write_core_bundle
from p2pdoe.services.broker import (
    HOST,
    REQUIRE_MOSQUITTO_ENV,
    Broker,
    find_mosquitto,
    free_port,
    start_provisioned,
)
from p2pdoe.services.feeder_views import FeederViews
from p2pdoe.services.inprocess import run_admm
from p2pdoe.services.provision import BundleError, access, site_peers, write_bundle
from p2pdoe.services.transport_api import InboundMessage
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

SCENARIOS = {"north": None, "south": {"horizon": {"intervals": 12}}}  # two feeders, two answers
SETTLE_S = 120.0  # how long the core may take to hold what the feeders' brokers hold


def _bundles(root: Path) -> dict[str, Path]:
    s = load_scenario("default")
    bundles = {}
    for feeder in SCENARIOS:
        bundles[feeder] = root / feeder
        write_bundle(bundles[feeder], site_peers(s.ids, s.market.peers), HOST, free_port())
    write_core_bundle(root / "core", bundles, HOST, free_port())
    return bundles


def _description(bundle: Path) -> dict[str, Any]:
    described: dict[str, Any] = json.loads((bundle / "provision.json").read_text(encoding="utf-8"))
    return described


def _bridge_password(bundle: Path) -> str:
    found = re.search(
        r"^remote_password (\S+)$", (bundle / "broker" / "bridges" / "core.conf").read_text(), re.M
    )
    assert found
    return found[1]


# -- the bundles --------------------------------------------------------------------------------------


def test_the_core_bundle_bridges_each_feeder_under_its_prefix(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    core = _description(tmp_path / "core")
    assert core["kind"] == "p2pdoe_core_provision"
    assert {i["username"] for i in core["identities"]} == {"monitor", "bridge-north", "bridge-south"}
    assert sorted(p.name for p in (tmp_path / "core" / "identities").iterdir()) == ["monitor.password"]
    acl = (tmp_path / "core" / "broker" / "acl").read_text()
    assert (
        "user bridge-north\ntopic write feeder/north/p2pdoe/v1/#\ntopic write feeder/north/bridge/state\n"
        in acl
    )
    assert "user monitor\ntopic read feeder/#" in acl
    config = (tmp_path / "core" / "broker" / "mosquitto.conf").read_text().splitlines()
    assert [line for line in config if line.startswith("listener ")] == [
        f"listener {core['broker']['port']} {HOST}"
    ]
    assert config.index("use_username_as_clientid true") > config.index(
        f"listener {core['broker']['port']} {HOST}"
    )
    for feeder, bundle in bundles.items():
        main = bundle / "broker" / "mosquitto.conf"
        assert main.stat().st_mode & 0o777 == 0o644  # the password is in the bridge's own file
        assert f"include_dir {(bundle / 'broker' / 'bridges').resolve()}" in main.read_text().splitlines()
        bridge = bundle / "broker" / "bridges" / "core.conf"
        assert bridge.stat().st_mode & 0o777 == 0o600
        text = bridge.read_text()
        assert f"address {HOST}:{core['broker']['port']}" in text
        assert f"topic site/# out 1 p2pdoe/v1/ feeder/{feeder}/p2pdoe/v1/" in text
        assert "market/+/proposal" not in text  # the iterations stay on the feeder
        assert "bridge_insecure false" in text
        assert _description(bundle)["bridge"]["prefix"] == f"feeder/{feeder}/"
        keys = Path(core["feeders"][feeder]["public_keys"])
        assert keys.read_bytes() == (bundle / "keys" / "public-keys.json").read_bytes()


def test_bridging_a_feeder_again_replaces_its_bridge_and_nothing_else(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    main = bundles["north"] / "broker" / "mosquitto.conf"
    main.write_text(main.read_text() + "log_type all\n")  # the operator's own line, after the include
    before = main.read_text()
    write_core_bundle(tmp_path / "core2", {"north": bundles["north"]}, HOST, free_port())
    assert main.read_text() == before
    bridge = (bundles["north"] / "broker" / "bridges" / "core.conf").read_text()
    assert bridge.count("connection core-north") == 1
    assert f":{_description(tmp_path / 'core2')['broker']['port']}\n" in bridge


def test_a_feeder_is_named_plainly_and_bridged_from_a_bundle_of_its_own(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    north = bundles["north"]
    with pytest.raises(BundleError, match="feeder id"):
        write_core_bundle(tmp_path / "c1", {"North/1": north}, HOST, free_port())
    with pytest.raises(BundleError, match="not a readable bundle"):
        write_core_bundle(tmp_path / "c2", {"east": tmp_path / "nowhere"}, HOST, free_port())
    with pytest.raises(BundleError, match="named by two feeders"):
        write_core_bundle(tmp_path / "c3", {"a": north, "b": north}, HOST, free_port())
    port = _description(north)["broker"]["port"]
    with pytest.raises(BundleError, match=f"listens on {HOST}:{port} too"):
        write_core_bundle(tmp_path / "c4", {"north": north}, HOST, port)
    assert not (tmp_path / "c3").exists()  # checked before anything is written


def test_provision_names_the_flag_at_fault(tmp_path: Path) -> None:
    core = str(tmp_path / "core")
    usage = run_p2pdoe("provision", "--out", core, "--feeder", "north")  # argparse's usage error
    assert usage.returncode == 2
    assert usage.stderr.splitlines()[-1].endswith("--feeder: give a feeder as ID=BUNDLE, not 'north'")
    missing = run_p2pdoe("provision", "--out", core, "--feeder", f"north={tmp_path / 'none'}")
    assert_one_line_error(missing, "--feeder:", "not a readable bundle")
    mixed = run_p2pdoe("provision", "--bundle", core, "--rotate", "dso", "--feeder", f"north={core}")
    assert_one_line_error(mixed, "--feeder provisions a new core")


# -- one connection, a view per feeder, in memory -------------------------------------------------------


def test_one_connection_is_read_as_one_view_per_feeder() -> None:
    broker = MemoryBroker()
    doe = topics.site("solar-18", "doe")

    async def main() -> tuple[dict[str, list[str]], FeederViews]:
        async with MemoryTransport(broker, "bridge") as bridge, MemoryTransport(broker, "core") as core:
            views = FeederViews(core, ["north", "south"])
            north, south = views.view("north"), views.view("south")
            await views.watch_bridges()
            await north.subscribe(f"{topics.ROOT}/#")
            await south.subscribe(f"{topics.ROOT}/#")
            await core.subscribe("feeder/east/#")  # a feeder nobody asked the views for
            reader = asyncio.create_task(views.run())
            await bridge.publish(f"feeder/north/{doe}", b"n")
            await bridge.publish("feeder/east/p2pdoe/v1/dso/status", b"e")
            await bridge.publish(f"feeder/south/{topics.DSO_STATUS}", b"s")
            await bridge.publish("feeder/north/bridge/state", b"1")
            await bridge.publish("feeder/south/bridge/state", b"0")
            got: dict[str, list[str]] = {"north": [], "south": []}
            for name, view in (("north", north), ("south", south)):
                async for m in view.messages():
                    got[name].append(m.topic)
                    break
            while views.bridge["south"] is None:
                await asyncio.sleep(0)
            reader.cancel()
            return got, views

    got, views = asyncio.run(main())
    assert got == {"north": [doe], "south": [topics.DSO_STATUS]}
    assert views.bridge == {"north": True, "south": False}
    assert views.refused["outside_feeders"] == 1
    views.route(InboundMessage("p2pdoe/v1/dso/status", b"x", False))  # not under any feeder
    assert views.refused["outside_feeders"] == 2


# -- three Mosquittos ---------------------------------------------------------------------------------


@pytest.fixture
def regional(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Path], dict[str, Broker]]]:
    if find_mosquitto() is None:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail("mosquitto is required (P2PDOE_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("bridges need Mosquitto, which is not installed")
    bundles = _bundles(tmp_path / "bundles")
    brokers: dict[str, Broker] = {}
    try:
        brokers["core"] = start_provisioned(tmp_path / "bundles" / "core")
        for feeder, bundle in bundles.items():
            brokers[feeder] = start_provisioned(bundle)
        yield tmp_path / "bundles" / "core", bundles, brokers
    finally:
        for broker in brokers.values():
            broker.close()


def _monitor_json(bundle: Path, *feeders: str, keys: dict[str, str] | None = None) -> dict[str, Any]:
    """`p2pdoe monitor --json` as the bundle's monitor: on the core with `feeders` (their own keys
    unless `keys` names others), else on a feeder's own broker."""
    described = _description(bundle)
    broker = described["broker"]
    keys = keys or {}
    watch = [f"--feeder={f}={keys.get(f, described['feeders'][f]['public_keys'])}" for f in feeders]
    own = [] if feeders else ["--trusted-keys", str(bundle / "keys" / "public-keys.json")]
    argv = [
        *(sys.executable, "-m", "p2pdoe.cli.main", "monitor", "--json", "--settle", "3"),
        *("--broker", f"mqtts://monitor@{broker['host']}:{broker['port']}"),
        *("--password-file", str(bundle / "identities" / "monitor.password"), "--ca-cert", broker["ca_cert"]),
        *watch,
        *own,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=service_env(), check=True)
    snapshot: dict[str, Any] = json.loads(done.stdout)
    return snapshot


def _lasting(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot says that does not depend on when it was taken."""

    def without_time(view: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if view is None else {k: v for k, v in view.items() if k not in ("validity", "age_s")}

    sites = {
        site: {k: without_time(v) if isinstance(v, dict) else v for k, v in view.items() if k != "telemetry"}
        for site, view in snapshot["sites"].items()
    }
    return {"sites": sites, "coordinator": snapshot["coordinator"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_feeders_agree_on_their_own_brokers_and_one_monitor_sees_both_through_the_core(
    regional: tuple[Path, dict[str, Path], dict[str, Broker]], tmp_path: Path
) -> None:
    core, bundles, _ = regional
    results = {}
    with contextlib.ExitStack() as stack:
        feeders = {}
        for feeder, bundle in bundles.items():
            described = _description(bundle)
            d = Deployment(
                "unused",
                tmp_path / feeder,
                reach=lambda identity, described=described: access(described, identity).args(),  # type: ignore[misc]
                scenario=load_scenario("default", SCENARIOS[feeder]),
            )
            stack.enter_context(d)
            coordinator = d.start_coordinator("--registration-timeout-s", "120", "--start", "now")
            feeders[feeder] = (d, coordinator, d.start_edges())
        for feeder, (d, coordinator, edges) in feeders.items():
            results[feeder] = d.finish(coordinator, edges.values())

    for feeder, r in results.items():  # each feeder's round gives the in-process answer of its day
        reference = run_admm(load_scenario("default", SCENARIOS[feeder]), Policy.DYNAMIC).solution
        assert r.solver.converged
        assert r.solver.iterations == reference.solver.iterations
        assert r.objective_eur == pytest.approx(reference.objective_eur, rel=1e-9, abs=1e-9)
        for community, schedule in zip(r.communities, reference.schedules, strict=True):
            assert np.allclose(community.envelope_up_kw, schedule["up"], rtol=0, atol=1e-9)
            assert np.allclose(community.envelope_lo_kw, schedule["lo"], rtol=0, atol=1e-9)
    assert results["north"].objective_eur != pytest.approx(results["south"].objective_eur)

    own = {feeder: _lasting(_monitor_json(bundle)) for feeder, bundle in bundles.items()}
    deadline = time.monotonic() + SETTLE_S
    while True:  # the bridges forward at their own pace: the core holds the same once they are done
        seen = _monitor_json(core, "north", "south")["feeders"]
        if all(_lasting(seen[f]) == own[f] for f in bundles) or time.monotonic() > deadline:
            break
    for feeder, r in results.items():
        assert _lasting(seen[feeder]) == own[feeder], feeder  # the core sees what the feeder's broker holds
        assert seen[feeder]["bridge"] == "up"
        sites = seen[feeder]["sites"]
        assert set(sites) == {c.id for c in r.communities}
        defaults = {e.id: e for e in r.runtime.default_envelopes} if r.runtime else {}
        for community in r.communities:
            site = sites[community.id]
            assert (site["default"]["lo_kw"], site["default"]["up_kw"]) == pytest.approx(
                (defaults[community.id].lo_kw, defaults[community.id].up_kw)
            )
            since_start = _moment(site["doe"]["start"]) - _moment(r.start)
            t = int(since_start.total_seconds()) // round(r.dt_h * 3600)
            assert site["doe"]["round"] is not None
            assert (site["doe"]["lo_kw"], site["doe"]["up_kw"]) == pytest.approx(
                (community.envelope_lo_kw[t], community.envelope_up_kw[t]), abs=1e-6
            )

    wrong = _monitor_json(core, "north", keys={"north": str(core / "feeders" / "south" / "public-keys.json")})
    assert wrong["feeders"]["north"]["sites"] == {}  # every message of north refused with south's keys


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.timeout(300)
def test_on_the_core_each_identity_writes_only_its_own_and_keeps_its_connection(
    regional: tuple[Path, dict[str, Path], dict[str, Broker]],
) -> None:
    """bridge-south cannot put a message in north's tree, the monitor cannot write at all, and a
    client asking for north's bridge's client id does not take its session over; north's own
    messages arrive, signed, under its prefix."""
    core, bundles, _ = regional
    described = _description(core)
    port = described["broker"]["port"]
    context = ssl.create_default_context(cafile=described["broker"]["ca_cert"])
    forged = Doe.from_box("solar-18", None, datetime(2026, 6, 21, tzinfo=UTC), 3600, -1.0, 1.0)
    state = "feeder/north/bridge/state"

    def client(user: str, password: str, identifier: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            HOST,
            port,
            username=user,
            password=password,
            tls_context=context,
            timeout=10,
            identifier=identifier,
        )

    monitor_password = (core / "identities" / "monitor.password").read_text().strip()

    async def main() -> tuple[dict[str, bytes], list[bytes]]:
        got: dict[str, bytes] = {}
        states: list[bytes] = []
        async with client("monitor", monitor_password) as monitor:
            await monitor.subscribe(f"{topics.FEEDERS}/#", qos=1)
            async with client("bridge-south", _bridge_password(bundles["south"])) as south:
                await south.publish(
                    f"feeder/north/{topics.site('solar-18', 'doe')}", forged.model_dump_json(), 1
                )
            await monitor.publish(f"feeder/north/{topics.DSO_STATUS}", b"forged", qos=1)
            async with client("bridge-south", _bridge_password(bundles["south"]), identifier="bridge-north"):
                pass  # its client id is its user name on the core: north's bridge keeps its session
            real = await access(_description(bundles["north"]), "dso").connect("north-dso", 20)
            fallback = forged.model_dump_json().encode()
            await real.publish_state(topics.site("solar-18", "doe/default"), fallback)
            await real.close()
            async with asyncio.timeout(60):
                async for m in monitor.messages:
                    got[m.topic.value] = bytes(m.payload)  # type: ignore[arg-type]
                    if m.topic.value == state:
                        states.append(bytes(m.payload))  # type: ignore[arg-type]
                    if f"feeder/north/{topics.site('solar-18', 'doe/default')}" in got:
                        break
        return got, states

    got, states = asyncio.run(main())
    assert f"feeder/north/{topics.site('solar-18', 'doe')}" not in got  # the ACL: not bridge-south's tree
    assert f"feeder/north/{topics.DSO_STATUS}" not in got  # the monitor writes nothing
    assert f"feeder/north/{topics.site('solar-18', 'doe/default')}" in got
    assert states == [b"1"]  # retained, and never 0: nobody took the bridge's session over
