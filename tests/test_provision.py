"""`p2pdoe provision`: the bundle's files, and a real Mosquitto running its configuration as is:
TLS only, no anonymous or wrong-password access, and the ACL (a site writes only its own topics and
never its envelopes; the monitor reads everything and writes nothing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.core import topics
from p2pdoe.core.schemas.wire import MAX_PACKET_BYTES
from p2pdoe.services.broker import REQUIRE_MOSQUITTO_ENV, find_mosquitto, free_port
from p2pdoe.services.provision import acl, password_hash
from p2pdoe.services.signing import read_private_key, read_public_keys

HOST = "127.0.0.1"
SITES = ["solar-18", "solar-wind-33", "wind-25", "town-14", "campus-30", "village-22"]
QUIET_S = 1.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("bundle") / "b"
    port = free_port()
    run = run_p2pdoe("provision", "--out", str(out), "--host", HOST, "--port", str(port))
    assert run.returncode == 0, run.stderr
    return out, port, run.stdout


def test_secrets_are_private_and_never_printed(bundle: tuple[Path, int, str]) -> None:
    out, _, printed = bundle
    secret_files = [out / "ca" / "ca.key", out / "broker" / "server.key", out / "broker" / "passwd"]
    secret_files.append(out / "broker" / "acl")  # not secret, but Mosquitto warns of a world-readable one
    secret_files += list((out / "identities").iterdir()) + list((out / "env").iterdir())
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (out / "identities").iterdir():
        assert path.read_text().strip() not in printed
    assert "PRIVATE KEY" not in printed


def test_every_identity_that_publishes_gets_a_private_signing_key(bundle: tuple[Path, int, str]) -> None:
    out, _, printed = bundle
    d = json.loads((out / "provision.json").read_text())
    trusted = read_public_keys(Path(d["signing"]["public_keys"]))
    assert set(trusted) == {"dso", *(f"edge-{s}" for s in SITES)}  # the monitor publishes nothing
    for i in d["identities"]:
        if i["role"] == "monitor":
            assert "signing_key" not in i
            continue
        path = Path(i["signing_key"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        key = read_private_key(path)
        trusted[i["username"]].verify(key.sign(b"x"), b"x")  # its public key is the trusted one
        assert path.read_text() not in printed
    env = (out / "env" / f"{SITES[0]}.env").read_text()
    assert f"P2PDOE_EDGE_SIGNING_KEY={(out / 'keys' / f'edge-{SITES[0]}.key').resolve()}" in env
    assert f"P2PDOE_EDGE_TRUSTED_KEYS={Path(d['signing']['public_keys'])}" in env


def test_provision_json_describes_the_bundle(bundle: tuple[Path, int, str]) -> None:
    out, port, _ = bundle
    d = json.loads((out / "provision.json").read_text())
    assert d["broker"] == {
        "config": str((out / "broker" / "mosquitto.conf").resolve()),
        "ca_cert": str((out / "ca" / "ca.crt").resolve()),
        "host": HOST,
        "port": port,
        "tls": True,
    }
    roles = [i["role"] for i in d["identities"]]
    assert roles.count("coordinator") == 1
    assert roles.count("monitor") == 1
    assert roles.count("edge") == 6
    for i in d["identities"]:
        assert Path(i["password_file"]).is_file()
        assert i["username"] in (out / "broker" / "passwd").read_text()


def test_the_broker_config_is_tls_only_and_closed(bundle: tuple[Path, int, str]) -> None:
    out, port, _ = bundle
    conf = (out / "broker" / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert [line for line in conf if line.startswith("listener ")] == [f"listener {port} {HOST}"]
    assert "tls_version tlsv1.2" in conf
    assert "persistence true" in conf
    assert any(line.startswith("max_packet_size ") for line in conf)
    assert any(line.startswith("max_queued_messages ") for line in conf)


def test_the_acl_gives_each_site_its_own_topics_and_never_its_envelopes() -> None:
    text = acl({"a": ["b"], "b": ["a"], "c": []})
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in text.split("\n\n") if b.startswith("user ")}
    a = blocks["user edge-a"]
    writes = [line.split()[-1] for line in a if line.startswith("topic write")]
    own = ("p2pdoe/v1/site/a/", "p2pdoe/v1/market/+/", "p2pdoe/v1/clock/member/", "p2pdoe/v1/clock/done/")
    assert all(w.startswith(own) for w in writes), writes
    assert {w.rsplit("/", 1)[1] for w in writes if "/clock/" in w} == {"edge-a", "meter-a"}  # its own steps
    assert not any(w.endswith(("/doe", "/doe/default")) for w in writes)
    assert "topic read p2pdoe/v1/market/+/proposal/b" in a
    assert "topic read p2pdoe/v1/market/+/proposal/c" not in a
    assert "topic read p2pdoe/v1/market/+/grant/a" in a  # its own grant, never another site's
    assert not any("/grant/" in line and not line.endswith("/grant/a") for line in a if "/market/" in line)
    assert "topic write p2pdoe/v1/market/+/grant/+" in blocks["user dso"]
    assert "topic write p2pdoe/v1/market/+/payments/proposal/a" in a  # Nash bargaining's payments
    assert "topic read p2pdoe/v1/market/+/payments/proposal/b" in a
    assert "topic read p2pdoe/v1/market/+/payments/proposal/c" not in a
    assert not any(w.endswith(("payments/open", "payments/grant")) for w in writes)
    assert "topic write p2pdoe/v1/market/+/payments/grant" in blocks["user dso"]
    assert blocks["user monitor"] == ["topic read p2pdoe/v1/#"]
    assert "topic write p2pdoe/v1/site/+/doe" in blocks["user dso"]
    assert "topic write p2pdoe/v1/clock/grant/+" in blocks["user dso"]  # the lockstep granter runs as dso
    assert "topic write p2pdoe/v1/market/+/proposal/+" in blocks["user dso"]  # to delete a retained one
    assert not any("clock/grant" in line and "write" in line for line in a)


def test_password_hashes_are_salted_pbkdf2() -> None:
    one, two = password_hash("secret"), password_hash("secret")
    assert one != two
    assert one.startswith("$7$101$")
    assert password_hash("secret", b"0" * 12) == password_hash("secret", b"0" * 12)


def test_a_second_provision_into_the_same_folder_is_refused(bundle: tuple[Path, int, str]) -> None:
    out, _, _ = bundle
    assert_one_line_error(run_p2pdoe("provision", "--out", str(out)), "already holds a bundle")


# --- a real Mosquitto running the provisioned configuration -------------------------------------


@pytest.fixture(scope="module")
def broker(bundle: tuple[Path, int, str]) -> Iterator[tuple[Path, int]]:
    out, port, _ = bundle
    exe = find_mosquitto()
    if exe is None:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail("mosquitto is required (P2PDOE_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("mosquitto is not installed")
    log = (out / "broker.log").open("wb")
    proc = subprocess.Popen([exe, "-c", str(out / "broker" / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert proc.poll() is None, (out / "broker.log").read_text()
            assert time.monotonic() < deadline, "the provisioned broker did not start"
            time.sleep(0.05)
        yield out, port
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _password(out: Path, username: str) -> str:
    return (out / "identities" / f"{username}.password").read_text().strip()


def _client(
    out: Path, port: int, username: str | None, password: str | None = None, tls: bool = True
) -> aiomqtt.Client:
    context = None
    if tls:
        context = ssl.create_default_context(cafile=str(out / "ca" / "ca.crt"))
    if username is not None and password is None:
        password = _password(out, username)
    return aiomqtt.Client(
        HOST, port, username=username, password=password, tls_context=context, identifier=None, timeout=5
    )


def _refused(
    out: Path, port: int, username: str | None, password: str | None = None, tls: bool = True
) -> bool:
    async def attempt() -> bool:
        try:
            async with _client(out, port, username, password, tls):
                return False
        except aiomqtt.MqttError:
            return True

    return asyncio.run(asyncio.wait_for(attempt(), 20))


def test_every_identity_connects_over_tls(broker: tuple[Path, int]) -> None:
    out, port = broker
    for username in ("dso", "monitor", "edge-solar-18"):
        assert not _refused(out, port, username), username


def test_anonymous_plaintext_and_wrong_passwords_are_refused(broker: tuple[Path, int]) -> None:
    out, port = broker
    assert _refused(out, port, None)  # anonymous, over TLS
    assert _refused(out, port, "edge-solar-18", "not-the-password")
    assert _refused(out, port, "nobody", "whatever")
    assert _refused(out, port, "edge-solar-18", tls=False)  # no plaintext listener


def test_the_acl_holds_on_the_broker(broker: tuple[Path, int]) -> None:
    """Each forbidden message is followed by an allowed one from the same client: once the allowed
    one arrives, the forbidden one would have arrived before it, had the broker let it through."""
    out, port = broker
    a, b = "solar-18", "wind-25"

    async def scenario() -> dict[str, list[str]]:
        got: dict[str, list[tuple[str, bytes]]] = {"monitor": [], "dso": []}
        async with (
            _client(out, port, "monitor") as monitor,
            _client(out, port, "dso") as dso,
            _client(out, port, f"edge-{a}") as edge,
        ):
            await monitor.subscribe(f"{topics.ROOT}/#", qos=1)
            await dso.subscribe(f"{topics.ROOT}/#", qos=1)

            async def collect(name: str, client: aiomqtt.Client) -> None:
                async for m in client.messages:
                    got[name].append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type,unused-ignore]

            tasks = [
                asyncio.create_task(collect("monitor", monitor)),
                asyncio.create_task(collect("dso", dso)),
            ]
            await asyncio.sleep(0.2)
            forbidden = [
                topics.site(b, "telemetry"),  # another site's topic
                topics.site(a, "doe"),  # its own envelope: only the coordinator writes it
                topics.site(a, "doe/default"),
                topics.proposal("r1", b),  # another site's protocol message
                topics.round_open("r1"),
                topics.payment_proposal("r1", b),  # another site's payment proposal
                topics.payment_grant("r1"),  # the coordinator's verdict
            ]
            for t in forbidden:
                await edge.publish(t, b"forged", qos=0)
            await edge.publish(topics.site(a, "telemetry"), b"ok", qos=0)
            await monitor.publish(topics.site(a, "status"), b"forged by the monitor", qos=0)
            await dso.publish(topics.site(a, "doe"), b"dso", qos=0)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (topics.site(a, "doe"), b"dso") not in got["monitor"]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(QUIET_S)
            for task in tasks:
                task.cancel()
            got["forbidden"] = [(t, b"forged") for t in forbidden]
            return got

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert (topics.site(a, "telemetry"), b"ok") in got["monitor"]  # its own topic: delivered
    assert (topics.site(a, "doe"), b"dso") in got["monitor"]  # the coordinator's envelope: delivered
    for forged in got["forbidden"]:
        assert forged not in got["monitor"], forged
        assert forged not in got["dso"], forged
    assert (topics.site(a, "status"), b"forged by the monitor") not in got[
        "dso"
    ]  # the monitor writes nothing


def test_the_broker_takes_what_a_service_takes_and_nothing_larger(broker: tuple[Path, int]) -> None:
    """A grant of 200 sites x 96 intervals is about 1.2 MB: the provisioned broker passes a message
    of 1.5 MB (with 1 MiB as its cap before, such a grant never arrived), and drops one above
    `MAX_PACKET_BYTES` (Mosquitto closes the sender's connection) rather than store it."""
    out, port = broker

    async def scenario() -> list[int]:
        got: list[int] = []
        async with _client(out, port, "monitor") as monitor, _client(out, port, "dso") as dso:
            await monitor.subscribe(topics.grant("r-big", "a"), qos=1)

            async def collect() -> None:
                async for m in monitor.messages:
                    got.append(len(bytes(m.payload)))  # type: ignore[arg-type,unused-ignore]

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.2)
            await dso.publish(topics.grant("r-big", "a"), b"x" * 1_500_000, qos=1)
            with contextlib.suppress(aiomqtt.MqttError):
                await dso.publish(topics.grant("r-big", "a"), b"x" * (MAX_PACKET_BYTES + 1), qos=1, timeout=5)
            await asyncio.sleep(1.0)
            task.cancel()
        return got

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == [1_500_000]


def _names(cert_path: Path) -> set[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )


def test_the_servers_certificates_name_every_way_a_client_may_connect(tmp_path: Path) -> None:
    """A loopback host carries localhost, 127.0.0.1 and ::1 (a client connecting by address passes
    its host-name check); --alt-name adds others, to the broker's and the CSIP-AUS server's alike."""
    from p2pdoe.services.provision import server_names

    out = tmp_path / "b"
    alt = ("--alt-name", "10.0.0.5", "--alt-name", "broker.example.net")
    run = run_p2pdoe("provision", "--out", str(out), "--host", "localhost", "--port", str(free_port()), *alt)
    assert run.returncode == 0, run.stderr
    expected = {"localhost", "127.0.0.1", "::1", "10.0.0.5", "broker.example.net"}
    assert _names(out / "broker" / "server.crt") == expected
    assert _names(out / "csip" / "server.crt") == expected
    assert server_names("broker.example.net") == ["broker.example.net"]  # no loopback for a real name


def test_a_client_connecting_by_address_to_a_broker_provisioned_by_name_checks_its_host(
    tmp_path: Path,
) -> None:
    exe = find_mosquitto()
    if exe is None:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail("mosquitto is required (P2PDOE_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("mosquitto is not installed")
    from p2pdoe.services.broker import start_provisioned

    out, port = tmp_path / "b", free_port()
    run = run_p2pdoe("provision", "--out", str(out), "--host", "localhost", "--port", str(port))
    assert run.returncode == 0, run.stderr
    with start_provisioned(out):
        context = ssl.create_default_context(cafile=str(out / "ca" / "ca.crt"))  # checks the host name
        import socket

        for address in ("127.0.0.1", "localhost"):
            with (
                socket.create_connection((address, port), timeout=20) as raw,
                context.wrap_socket(raw, server_hostname=address) as tls,
            ):
                assert tls.version() is not None
