"""The services under the provisioned broker (`p2pdoe provision`, Mosquitto running its config as
is): TLS with a CA certificate and password files, health files, revoking and rotating a site's
credentials, QoS 1 sessions across a broker crash, and the whole demo (the day-ahead round and the
real-time day) under TLS and the ACL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.core import topics
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs
from p2pdoe.services.broker import Broker
from p2pdoe.services.health import age_s
from p2pdoe.services.health import main as health_main
from p2pdoe.services.provision import Access, access, site_peers, write_bundle
from p2pdoe.services.runner import transport_for
from p2pdoe.services.settings import ConfigError, ServiceSettings
from p2pdoe.services.transport import Backoff, MqttTransport, TransportError, parse_broker_url

pytestmark = pytest.mark.timeout(180)
SITE = "solar-18"
QUIET_S = 1.0


def _bundle_of(broker: Broker) -> Path:
    config = Path(broker.argv[-1])  # <bundle>/broker/mosquitto.conf
    return config.parent.parent


def _description(bundle: Path) -> dict[str, object]:
    d = json.loads((bundle / "provision.json").read_text())
    assert isinstance(d, dict)
    return d


def _access(broker: Broker, username: str) -> Access:
    return access(_description(_bundle_of(broker)), username)


def _transport(a: Access, client_id: str) -> MqttTransport:
    """The services' own path: settings with a password file and a CA certificate."""
    settings = ServiceSettings(broker=a.url, password_file=a.password_file, ca_cert=a.ca_cert)
    return transport_for(settings, client_id, None)


async def _collect(t: MqttTransport, into: list[str], quiet_s: float = QUIET_S) -> None:
    try:
        async with asyncio.timeout(quiet_s):
            async for m in t.messages():
                into.append(m.payload.decode())
    except TimeoutError:
        pass


# --- TLS clients ---------------------------------------------------------------------------------


def test_urls_name_tls_and_a_ca_needs_it(tmp_path: Path) -> None:
    assert parse_broker_url("mqtts://edge-a@broker.example.net").port == 8883
    assert parse_broker_url("mqtts://h:9883").tls
    assert not parse_broker_url("mqtt://h").tls
    with pytest.raises(TransportError, match="mqtts://"):
        MqttTransport("mqtt://127.0.0.1:1883", "x", ca_cert=tmp_path / "ca.crt")
    with pytest.raises(TransportError, match="CA certificate"):
        MqttTransport("mqtts://127.0.0.1:8883", "x", ca_cert=tmp_path / "missing.crt")


def test_a_password_file_is_read_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    good = tmp_path / "p"
    good.write_text("s3cret\n")
    assert ServiceSettings(password_file=good).secret() == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        ServiceSettings(password_file=tmp_path / "empty").secret()
    with pytest.raises(ConfigError, match="cannot read the password file"):
        ServiceSettings(password_file=tmp_path / "missing").secret()
    with pytest.raises(ValueError, match="not both"):
        ServiceSettings(password="x", password_file=good)  # type: ignore[arg-type]


def test_services_reach_the_provisioned_broker_over_tls(secure_broker: Broker) -> None:
    """A site publishes its telemetry and the monitor reads it, each with its password file and
    the bundle's CA; a broker certificate from another CA is refused before any password is sent."""
    edge, monitor = _access(secure_broker, f"edge-{SITE}"), _access(secure_broker, "monitor")

    async def scenario() -> list[str]:
        got: list[str] = []
        async with _transport(monitor, "mon") as m, _transport(edge, "edge") as e:
            await m.subscribe(topics.every_site("telemetry"))
            await asyncio.sleep(0.2)
            await e.publish(topics.site(SITE, "telemetry"), b"over tls")
            await _collect(m, got)
        return got

    assert asyncio.run(scenario()) == ["over tls"]


def test_a_broker_signed_by_another_ca_is_refused(secure_broker: Broker, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_bundle(other, {"x": []}, "127.0.0.1", secure_broker.port)
    edge = _access(secure_broker, f"edge-{SITE}")
    wrong = Access(edge.url, edge.password_file, other / "ca" / "ca.crt")

    async def attempt() -> None:
        password = edge.password_file.read_text().strip() if edge.password_file else None
        once = Backoff(initial_s=0.1, max_attempts=1)
        async with MqttTransport(wrong.url, "edge", password=password, ca_cert=wrong.ca_cert, backoff=once):
            pass

    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(asyncio.wait_for(attempt(), 30))


# --- health ----------------------------------------------------------------------------------------


def test_the_health_check_reads_the_files_age_and_state(tmp_path: Path) -> None:
    beat = tmp_path / "health"
    assert health_main([str(beat), "60"]) == 1  # never ran
    beat.write_text("disconnected\n")
    assert health_main([str(beat), "60"]) == 0  # alive
    assert health_main([str(beat), "60", "--connected"]) == 1  # not ready
    beat.write_text("connected\n")
    assert health_main([str(beat), "60", "--connected"]) == 0
    old = time.time() - 120
    os.utime(beat, (old, old))
    assert health_main([str(beat), "60"]) == 1
    assert health_main([str(beat), "soon"]) == 2


def test_a_service_writes_its_health_file(secure_broker: Broker, tmp_path: Path) -> None:
    write_site_configs(load_scenario("default"), tmp_path)
    beat = tmp_path / "run" / "health"
    edge = _access(secure_broker, f"edge-{SITE}")
    argv = [sys.executable, "-m", "meter_sim", "--site-config", str(tmp_path / "sites" / f"{SITE}.json"),
            *edge.args(), "--health-file", str(beat), "--start", "now", "--speed", "60"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while age_s(beat) is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no health file within 30 s"
            time.sleep(0.1)
        health = [sys.executable, "-m", "p2pdoe.services.health", str(beat), "30", "--connected"]
        deadline = time.monotonic() + 30
        while subprocess.run(health, check=False, stderr=subprocess.DEVNULL).returncode != 0:
            assert time.monotonic() < deadline, "not connected within 30 s"
            time.sleep(0.5)
        assert beat.read_text() == "connected\n"
    finally:
        proc.kill()
        proc.wait(10)


# --- revoking and rotating ------------------------------------------------------------------------


def _reload(broker: Broker) -> None:
    assert broker._proc is not None
    broker._proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)


async def _connects(a: Access) -> bool:
    """Does the broker accept this identity's connection (a plain client, no retries)?"""
    address = parse_broker_url(a.url)
    password = a.password_file.read_text().strip() if a.password_file else None
    context = ssl.create_default_context(cafile=str(a.ca_cert))
    client = aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=password,
        tls_context=context,
        timeout=5,
    )
    try:
        async with asyncio.timeout(20), client:
            return True
    except aiomqtt.MqttError:
        return False


def test_a_revoked_site_is_refused_and_the_others_keep_working(secure_broker: Broker) -> None:
    bundle = _bundle_of(secure_broker)
    revoked, other = _access(secure_broker, f"edge-{SITE}"), _access(secure_broker, "edge-wind-25")
    monitor = _access(secure_broker, "monitor")
    password_before = revoked.password_file.read_text() if revoked.password_file else ""

    async def scenario() -> tuple[bool, list[str]]:
        got: list[str] = []
        async with _transport(monitor, "mon") as m, _transport(other, "other") as o:
            await m.subscribe(topics.every_site("telemetry"))
            run = run_p2pdoe("provision", "--bundle", str(bundle), "--revoke", SITE)
            assert run.returncode == 0, run.stderr
            _reload(secure_broker)
            refused = not await _connects(Access(revoked.url, None, revoked.ca_cert))
            await o.publish(topics.site("wind-25", "telemetry"), b"still here")
            await _collect(m, got)
        return refused, got

    old_password = Path(bundle / "old.password")
    old_password.write_text(password_before)
    refused, got = asyncio.run(scenario())
    assert refused
    assert not asyncio.run(_connects(Access(revoked.url, old_password, revoked.ca_cert)))
    assert got == ["still here"]  # the others' connections and messages are untouched
    d = _description(bundle)
    assert f"edge-{SITE}" not in {i["username"] for i in d["identities"]}  # type: ignore[attr-defined]
    assert [r["username"] for r in d["revoked"]] == [f"edge-{SITE}"]  # type: ignore[attr-defined]
    assert f"edge-{SITE}" not in (bundle / "broker" / "passwd").read_text()
    assert f"user edge-{SITE}\n" not in (bundle / "broker" / "acl").read_text()
    assert not (bundle / "env" / f"{SITE}.env").exists()
    assert not (bundle / "keys" / f"edge-{SITE}.key").exists()
    assert f"edge-{SITE}" not in json.loads((bundle / "keys" / "public-keys.json").read_text())["ed25519"]
    assert asyncio.run(_connects(other))


def test_rotating_a_sites_password_refuses_the_old_one(secure_broker: Broker) -> None:
    """After the rotation and the broker's reload, the old password is refused; the site's running
    service is dropped by the reload and reconnects with the new file, without a restart."""
    bundle = _bundle_of(secure_broker)
    site = _access(secure_broker, f"edge-{SITE}")
    assert site.password_file is not None
    old = bundle / "old.password"
    old.write_text(site.password_file.read_text())

    async def rotate_under_a_running_service() -> int:
        async with _transport(site, "edge") as t:
            run = run_p2pdoe("provision", "--bundle", str(bundle), "--rotate", SITE)
            assert run.returncode == 0, run.stderr
            assert site.password_file is not None
            assert site.password_file.read_text().strip() not in run.stdout + run.stderr
            _reload(secure_broker)
            async with asyncio.timeout(20):
                while t.connections < 2 or not t.connected:
                    await asyncio.sleep(0.1)
            await t.publish(topics.site(SITE, "telemetry"), b"after the rotation")
            return t.connections

    assert asyncio.run(rotate_under_a_running_service()) == 2
    assert site.password_file.read_text() != old.read_text()
    assert oct(site.password_file.stat().st_mode & 0o777) == "0o600"
    assert asyncio.run(_connects(site))
    assert not asyncio.run(_connects(Access(site.url, old, site.ca_cert)))
    assert asyncio.run(_connects(_access(secure_broker, "edge-wind-25")))


def test_changing_a_bundle_badly_is_one_line(tmp_path: Path) -> None:
    s = load_scenario("default")
    write_bundle(tmp_path / "b", site_peers(s.ids, s.market.peers), "127.0.0.1", 8883)
    b = str(tmp_path / "b")
    assert_one_line_error(run_p2pdoe("provision", "--bundle", b, "--revoke", "nowhere"), "no identity")
    assert_one_line_error(run_p2pdoe("provision", "--bundle", b, "--revoke", "dso"), "not a site")
    assert_one_line_error(run_p2pdoe("provision", "--rotate", SITE), "--bundle DIR")
    assert_one_line_error(run_p2pdoe("provision", "--bundle", b), "one of --rotate ID or --revoke SITE")
    not_one = run_p2pdoe("provision", "--bundle", str(tmp_path), "--rotate", SITE)
    assert_one_line_error(not_one, "not a readable bundle")


# --- durability -------------------------------------------------------------------------------------

QUEUED = 100


def _queue_and_crash(broker: Broker, config: Path | None) -> int:
    """A monitor with a persistent session subscribes and leaves; a site publishes QUEUED QoS 1
    messages; the broker is SIGKILLed and started again; how many reach the monitor?"""
    monitor, edge = _access(broker, "monitor"), _access(broker, f"edge-{SITE}")
    if config is not None:
        broker.stop()
        broker.argv = [*broker.argv[:-1], str(config)]
        broker.start()
    password = monitor.password_file.read_text().strip() if monitor.password_file else None
    ssl_context = ssl.create_default_context(cafile=str(monitor.ca_cert))

    def durable() -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", broker.port, username="monitor", password=password, tls_context=ssl_context,
            identifier="durable-monitor", clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311, timeout=10,
        )  # fmt: skip

    async def leave_a_session() -> None:
        async with durable() as m:
            await m.subscribe(topics.every_site("telemetry"), qos=1)

    async def publish() -> None:
        async with _transport(edge, "edge") as e:
            for k in range(QUEUED):
                await e.publish(topics.site(SITE, "telemetry"), f"{k}".encode(), qos=1)

    async def drain() -> set[str]:
        got: set[str] = set()
        async with durable() as m:
            try:
                async with asyncio.timeout(3.0):
                    async for msg in m.messages:
                        got.add(bytes(msg.payload).decode())  # type: ignore[arg-type]
            except TimeoutError:
                pass
        return got

    asyncio.run(leave_a_session())
    asyncio.run(publish())
    time.sleep(1.5)  # past autosave_interval (1 s)
    broker.kill()
    broker.start()
    return len(asyncio.run(drain()))


@pytest.mark.mosquitto
def test_queued_qos1_messages_survive_a_broker_crash(secure_broker: Broker, tmp_path: Path) -> None:
    """With the provisioned config none of 100 queued messages is lost to a SIGKILL; with Mosquitto's
    default autosave (every 30 min, not on changes) the same crash loses them."""
    assert _queue_and_crash(secure_broker, None) == QUEUED
    bundle = _bundle_of(secure_broker)
    conf = (bundle / "broker" / "mosquitto.conf").read_text().splitlines()
    defaults = tmp_path / "defaults.conf"
    defaults.write_text("\n".join(x for x in conf if not x.startswith("autosave")) + "\n")
    (bundle / "broker" / "data" / "mosquitto.db").unlink(missing_ok=True)
    assert _queue_and_crash(secure_broker, defaults) < QUEUED


# --- the whole system under TLS and the ACL -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_demo_runs_under_tls_and_the_acl(tmp_path: Path) -> None:
    """`p2pdoe demo --secure`: a bundle provisioned for the demo, Mosquitto running it as is, and
    every process (coordinator, edge agents, meter simulators, the demo's own monitor) on its own
    identity: the day-ahead round agrees as over a plain broker, then one real-time hour."""
    from p2pdoe.services.broker import find_mosquitto

    if find_mosquitto() is None:
        if os.environ.get("P2PDOE_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is required")
        pytest.skip("mosquitto is not installed")
    run = run_p2pdoe(
        "demo", "--secure", "--hours", "1", "--lead-s", "60", "--out", str(tmp_path), timeout=400
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["solver"]["converged"] is True
    assert results["runtime"]["protocol"] == "v5"
    assert "difference +0.00000 %" in run.stdout or "difference -0.00000 %" in run.stdout
    rt = results["realtime"]
    sites = {s["id"] for s in results["runtime"]["sites"]}
    assert {s["site"] for s in rt["settlements"]} == sites
    assert rt["envelope_violations"]["count"] == 0
    assert rt["envelope_violations"]["judged_readings"] > 500
    assert "TLS and ACL" in run.stdout
    for log in (tmp_path / "logs").glob("*.log"):
        text = log.read_text()
        assert "not authori" not in text.lower(), log.name
        assert "sender_not_topic" not in text, log.name


def test_the_broker_check_refuses_a_store_the_broker_cannot_write(tmp_path: Path) -> None:
    """Mosquitto starts with a persistence folder it cannot write and only logs an error at its first
    save; the check (run before it: systemd, containers, the demo) says so and fails."""
    from p2pdoe.services.broker import BrokerUnavailableError, start_provisioned
    from p2pdoe.services.broker_check import main as check

    s = load_scenario("default")
    bundle = tmp_path / "b"
    write_bundle(bundle, site_peers(s.ids, s.market.peers), "127.0.0.1", 8883)
    conf = bundle / "broker" / "mosquitto.conf"
    assert check([str(conf)]) == 0
    data = bundle / "broker" / "data"
    if os.geteuid() == 0:  # root writes anywhere: the broker's own user must be able to
        text = conf.read_text()
        conf.write_text(text.replace(f"user {text.split('user ', 1)[1].split()[0]}\n", "user nobody\n", 1))
        data.chmod(0o700)
    else:
        data.chmod(0o500)
    assert check([str(conf)]) == 1
    data.rmdir()
    run = subprocess.run(
        [sys.executable, "-m", "p2pdoe.services.broker_check", str(conf)], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr.strip().endswith("does not exist: the broker would lose its store on a crash")
    with pytest.raises(BrokerUnavailableError, match="persistence_location"):
        start_provisioned(bundle)
    (bundle / "broker" / "acl").unlink()
    assert check([str(conf)]) == 1


def test_the_monitor_reads_the_provisioned_broker(secure_broker: Broker) -> None:
    """`p2pdoe monitor` with the bundle's monitor identity: its password file and the CA."""
    monitor = _access(secure_broker, "monitor")
    run = run_p2pdoe("monitor", "--json", *monitor.args(), timeout=60)
    assert run.returncode == 0, run.stderr
    assert isinstance(json.loads(run.stdout), dict)
    assert monitor.password_file is not None
    assert monitor.password_file.read_text().strip() not in run.stdout + run.stderr
    missing = Access(monitor.url, monitor.password_file.with_name("nobody.password"), monitor.ca_cert)
    assert_one_line_error(run_p2pdoe("monitor", "--json", *missing.args()), "cannot read the password file")
