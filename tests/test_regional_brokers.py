"""Regional brokers (issue 19, item 4): two feeders, each with its own Mosquitto, coordinator and
sites, bridged over TLS into the DSO's core broker (`p2pdoe provision --feeder`); one monitor reads
both feeders there. Three real Mosquitto processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
from collections import Counter
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
from p2pdoe.services.inprocess import run_admm
from p2pdoe.services.prefixed import PrefixedTransport
from p2pdoe.services.provision import BundleError, access, site_peers, write_bundle
from p2pdoe.services.transport_memory import MemoryBroker, MemoryTransport

SCENARIOS = {"north": None, "south": {"horizon": {"intervals": 12}}}  # two feeders, two answers


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


# -- the bundles --------------------------------------------------------------------------------------


def test_the_core_bundle_bridges_each_feeder_under_its_prefix(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    core = _description(tmp_path / "core")
    assert core["kind"] == "p2pdoe_core_provision"
    assert {i["username"] for i in core["identities"]} == {"monitor", "bridge-north", "bridge-south"}
    acl = (tmp_path / "core" / "broker" / "acl").read_text()
    assert "user bridge-north\ntopic write feeder/north/#" in acl
    assert "user monitor\ntopic read feeder/#" in acl
    for feeder, bundle in bundles.items():
        config = bundle / "broker" / "mosquitto.conf"
        assert config.stat().st_mode & 0o777 == 0o600  # it holds the bridge's password
        text = config.read_text()
        password = (tmp_path / "core" / "identities" / f"bridge-{feeder}.password").read_text().strip()
        assert f"remote_password {password}" in text
        assert f"address {HOST}:{core['broker']['port']}" in text
        assert f"topic # out 1 p2pdoe/v1/ feeder/{feeder}/p2pdoe/v1/" in text
        assert "bridge_insecure false" in text
        assert "bridge_cafile" in text
        assert _description(bundle)["bridge"]["prefix"] == f"feeder/{feeder}/"
        keys = Path(core["feeders"][feeder]["public_keys"])
        assert keys.read_bytes() == (bundle / "keys" / "public-keys.json").read_bytes()


def test_bridging_a_feeder_again_replaces_its_bridge(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    config = bundles["north"] / "broker" / "mosquitto.conf"
    before = config.read_text()
    write_core_bundle(tmp_path / "core2", {"north": bundles["north"]}, HOST, free_port())
    after = config.read_text()
    password = (tmp_path / "core2" / "identities" / "bridge-north.password").read_text().strip()
    assert after.count("connection core-north") == 1
    assert f"remote_password {password}" in after
    assert after.split("# bridge to")[0] == before.split("# bridge to")[0]  # the feeder's own part kept


def test_a_feeder_is_named_plainly(tmp_path: Path) -> None:
    bundles = _bundles(tmp_path)
    with pytest.raises(BundleError, match="feeder id"):
        write_core_bundle(tmp_path / "core3", {"North/1": bundles["north"]}, HOST, free_port())
    with pytest.raises(BundleError, match="not a readable bundle"):
        write_core_bundle(tmp_path / "core4", {"east": tmp_path / "nowhere"}, HOST, free_port())


def test_provision_names_the_flag_at_fault(tmp_path: Path) -> None:
    core = str(tmp_path / "core")
    usage = run_p2pdoe("provision", "--out", core, "--feeder", "north")  # argparse's usage error
    assert usage.returncode == 2
    assert usage.stderr.splitlines()[-1].endswith("--feeder: give a feeder as ID=BUNDLE, not 'north'")
    missing = run_p2pdoe("provision", "--out", core, "--feeder", f"north={tmp_path / 'none'}")
    assert_one_line_error(missing, "--feeder:", "not a readable bundle")


# -- the prefix, in memory ----------------------------------------------------------------------------


def test_a_prefixed_transport_reads_one_feeders_tree_as_its_own() -> None:
    broker = MemoryBroker()
    doe = topics.site("solar-18", "doe")

    async def main() -> tuple[list[str], Counter[str]]:
        async with MemoryTransport(broker, "bridge") as bridge, MemoryTransport(broker, "core") as core:
            north = PrefixedTransport(core, "feeder/north/")
            dropped: Counter[str] = Counter()
            north.count_into(dropped)
            await north.subscribe(f"{topics.ROOT}/#")
            await bridge.publish(f"feeder/north/{doe}", b"n")
            await bridge.publish(f"feeder/south/{doe}", b"s")  # not subscribed: never arrives
            await bridge.publish(f"feeder/north/{topics.DSO_STATUS}", b"d")
            got = []
            async for m in north.messages():
                got.append(m.topic)
                if len(got) == 2:
                    return got, dropped
        return [], dropped

    got, dropped = asyncio.run(main())
    assert got == [doe, topics.DSO_STATUS]
    assert dropped == Counter()


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


def _monitor_json(core: Path, *feeders: str) -> dict[str, Any]:
    described = _description(core)
    broker = described["broker"]
    watch = [f"--feeder={f}={described['feeders'][f]['public_keys']}" for f in feeders]
    argv = [
        *(sys.executable, "-m", "p2pdoe.cli.main", "monitor", "--json", "--settle", "3"),
        *("--broker", f"mqtts://monitor@{broker['host']}:{broker['port']}"),
        *("--password-file", str(core / "identities" / "monitor.password"), "--ca-cert", broker["ca_cert"]),
        *watch,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=service_env(), check=True)
    snapshot: dict[str, Any] = json.loads(done.stdout)
    return snapshot


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
        sites = feeders["north"][0].sites

    for feeder, r in results.items():  # the answer each feeder's round would give on one broker
        reference = run_admm(load_scenario("default", SCENARIOS[feeder]), Policy.DYNAMIC).solution
        assert r.solver.converged
        assert r.solver.iterations == reference.solver.iterations
        assert r.objective_eur == pytest.approx(reference.objective_eur, rel=1e-9, abs=1e-9)
        for community, schedule in zip(r.communities, reference.schedules, strict=True):
            assert np.allclose(community.envelope_up_kw, schedule["up"], rtol=0, atol=1e-9)
            assert np.allclose(community.envelope_lo_kw, schedule["lo"], rtol=0, atol=1e-9)
    assert results["north"].objective_eur != pytest.approx(results["south"].objective_eur)

    seen = _monitor_json(core, "north", "south")["feeders"]
    for feeder, r in results.items():
        view = seen[feeder]
        assert view["coordinator"]["status"] is not None  # retained on its broker, bridged
        assert set(view["sites"]) == set(sites)
        defaults = {e.id: e for e in r.runtime.default_envelopes} if r.runtime else {}
        for community in r.communities:
            site = view["sites"][community.id]
            assert site["default"]["up_kw"] == pytest.approx(defaults[community.id].up_kw)
            t = int((_moment(site["doe"]["start"]) - _moment(r.start)).total_seconds()) // round(
                r.dt_h * 3600
            )
            assert site["doe"]["round"] is not None
            assert site["doe"]["up_kw"] == pytest.approx(community.envelope_up_kw[t], abs=1e-6)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.timeout(300)
def test_a_bridge_writes_only_its_own_feeder_on_the_core(
    regional: tuple[Path, dict[str, Path], dict[str, Broker]],
) -> None:
    """bridge-south's identity cannot put a message in north's tree on the core, and what north's
    own broker carries arrives there, signed, under north's prefix."""
    core, bundles, brokers = regional
    described = _description(core)
    port = described["broker"]["port"]
    context = ssl.create_default_context(cafile=described["broker"]["ca_cert"])
    forged = Doe.from_box("solar-18", None, datetime(2026, 6, 21, tzinfo=UTC), 3600, -1.0, 1.0)

    def client(user: str) -> aiomqtt.Client:
        password = (core / "identities" / f"{user}.password").read_text().strip()
        return aiomqtt.Client(HOST, port, username=user, password=password, tls_context=context, timeout=10)

    async def main() -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        async with client("monitor") as monitor:
            await monitor.subscribe(f"{topics.FEEDERS}/#", qos=1)
            async with client("bridge-south") as south:
                forged_topic = f"feeder/north/{topics.site('solar-18', 'doe')}"
                await south.publish(forged_topic, forged.model_dump_json(), qos=1, retain=True)
            real = await access(_description(bundles["north"]), "dso").connect("north-dso", 20)
            await real.publish_state(
                topics.site("solar-18", "doe/default"), forged.model_dump_json().encode()
            )
            await real.close()
            async with asyncio.timeout(30):
                async for m in monitor.messages:
                    got[m.topic.value] = bytes(m.payload)  # type: ignore[arg-type]
                    if f"feeder/north/{topics.site('solar-18', 'doe/default')}" in got:
                        break
        return got

    got = asyncio.run(main())
    assert f"feeder/north/{topics.site('solar-18', 'doe')}" not in got  # refused by the core's ACL
    assert f"feeder/north/{topics.site('solar-18', 'doe/default')}" in got
    assert got["feeder/north/bridge/state"] == b"1"  # the bridge's own notification, retained
    assert brokers["core"].kind == "mosquitto"
