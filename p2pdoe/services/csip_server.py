"""`p2pdoe csip-server`: each site's envelopes over HTTPS as CSIP-AUS (IEEE 2030.5) resources.

One asyncio loop runs both halves, so no state is shared across threads: the MQTT reader (the
bundle's read-only monitor identity, believing only signed messages) folds every site's retained
`doe` and `doe/default` into `CsipService`, and the aiohttp server answers from it. Clients present a
certificate signed by the bundle's CA (TLS refuses any other); its LFDI names the site, an unknown
one gets 403. What the resources say is p2pdoe.core.csip's.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from p2pdoe.core import csip, topics
from p2pdoe.core.csip_ids import lfdi
from p2pdoe.core.monitor_state import MonitorState
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.services.provision import Access, access
from p2pdoe.services.settings import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
# CSIP-AUS names TLS 1.2 with ECDHE-ECDSA-AES128-CCM8; the GCM suites serve clients without CCM.
CIPHERS = "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"


@dataclass(frozen=True)
class CsipConfig:
    host: str
    port: int
    server_cert: Path
    server_key: Path
    ca_cert: Path
    devices: Mapping[str, csip.Device]  # by LFDI
    pen: int
    csipaus: str = "1.2"  # the CSIP-AUS version whose namespace the extensions are written in
    fail_safe_w: tuple[float, float] | None = None  # (import, export) served while no default is valid


def load_config(
    bundle: Path,
    host: str | None,
    port: int | None,
    pen: int,
    csipaus: str = "1.2",
    fail_safe_w: tuple[float, float] | None = None,
) -> tuple[CsipConfig, Access]:
    """The server's settings from a bundle's provision.json, and the monitor's access to its broker;
    ConfigError naming the flag at fault."""
    try:
        description = json.loads((bundle / "provision.json").read_text(encoding="utf-8"))
        section = description["csip"]
        monitor = access(description, "monitor")
        devices = {str(e["lfdi"]).upper(): _device(site, e) for site, e in section["sites"].items()}
        cert, key, ca = (Path(section[k]) for k in ("server_cert", "server_key", "ca_cert"))
        chosen_host, chosen_port = (
            host or str(section["host"]),
            int(section["port"] if port is None else port),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--bundle {bundle}: not a bundle with a csip section ({exc!r})") from None
    if not 0 <= pen <= csip.MAX_PEN:
        raise ConfigError(f"--pen {pen}: a private enterprise number has at most 8 decimal digits")
    if csipaus not in csip.CSIPAUS_NAMESPACES:
        raise ConfigError(f"--csipaus {csipaus}: one of {', '.join(csip.CSIPAUS_NAMESPACES)}")
    if not 0 < chosen_port < 65536:
        raise ConfigError(f"--port must lie in 1..65535, not {chosen_port}")
    if fail_safe_w is not None and not all(0 <= w < float("inf") for w in fail_safe_w):
        raise ConfigError(f"--fail-safe-import-w/--fail-safe-export-w: watts >= 0, not {fail_safe_w}")
    config = CsipConfig(chosen_host, chosen_port, cert, key, ca, devices, pen, csipaus, fail_safe_w)
    return config, monitor


def _device(site: str, entry: Mapping[str, object]) -> csip.Device:
    pin, registered = entry.get("pin"), entry.get("registered")
    return csip.Device(
        site,
        str(entry["lfdi"]).upper(),
        pin if isinstance(pin, int) else None,
        datetime.fromisoformat(registered) if isinstance(registered, str) else None,
    )


def server_tls(config: CsipConfig) -> ssl.SSLContext:
    """TLS 1.2 or later, the server's certificate, and a client certificate of the CA required;
    ConfigError naming --bundle if its certificates cannot be read."""
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(config.ca_cert))
        context.load_cert_chain(config.server_cert, config.server_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--bundle: cannot read the CSIP server's certificates: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    return context


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class CsipService:
    """What the envelopes said so far (fed by `hear`) and the HTTP answers from it."""

    config: CsipConfig
    now: Callable[[], datetime] = _now
    monitor: MonitorState = field(default_factory=MonitorState)
    sites: dict[str, csip.SiteControls] = field(default_factory=dict)

    def site(self, site_id: str) -> csip.SiteControls:
        if site_id not in self.sites:
            self.sites[site_id] = csip.SiteControls(
                site_id, self.config.pen, fail_safe=self._fail_safe(site_id)
            )
        return self.sites[site_id]

    def _fail_safe(self, site_id: str) -> Doe | None:
        if self.config.fail_safe_w is None:
            return None
        imp_w, exp_w = self.config.fail_safe_w
        return Doe.from_box(
            site_id, None, datetime(1970, 1, 1, tzinfo=UTC), 2**31 - 1, -imp_w / 1e3, exp_w / 1e3
        )

    def hear(self, topic: str, payload: bytes) -> None:
        """One MQTT message: decoded as the monitor decodes it; a site's envelope (on `doe`, agreed
        or the site's default for the interval; on `doe/default`, its default) is folded in, and an
        emptied `doe/default` clears the default. A message the monitor dropped changes nothing."""
        now = self.now()
        dropped = sum(self.monitor.dropped.values())
        self.monitor.apply(topic, payload, now)
        parsed = topics.parse(topic)
        if parsed is None or parsed.site is None or parsed.kind not in ("doe", "doe/default"):
            return
        default = parsed.kind == "doe/default"
        if not payload:
            if default:
                self.site(parsed.site).default = None
            return
        view = self.monitor.sites.get(parsed.site)
        if view is None or sum(self.monitor.dropped.values()) != dropped:
            return
        doe = view.default if default else view.doe
        if doe is not None:
            self.site(parsed.site).hear(doe, now, default=default)

    def device(self, request: web.Request) -> csip.Device | None:
        """The device of the request's client certificate, or None if the CA signed none such."""
        transport = request.transport
        tls = None if transport is None else transport.get_extra_info("ssl_object")
        certificate = None if tls is None else tls.getpeercert(binary_form=True)
        if not certificate:
            return None
        return self.config.devices.get(lfdi(certificate))

    async def get(self, request: web.Request) -> web.Response:
        device = self.device(request)
        if device is None:
            return web.Response(status=403, text="unknown client certificate")
        try:
            reply = csip.read(self.site(device.site), device, request.path, request.query, self.now())
        except csip.QueryError as exc:
            return web.Response(status=400, text=str(exc))
        return _http(reply, self.config.csipaus)

    async def put(self, request: web.Request) -> web.Response:
        device = self.device(request)
        if device is None:
            return web.Response(status=403, text="unknown client certificate")
        reply = csip.report(self.site(device.site), device, request.path, await request.read())
        return _http(reply, self.config.csipaus)

    async def post(self, request: web.Request) -> web.Response:
        device = self.device(request)
        if device is None:
            return web.Response(status=403, text="unknown client certificate")
        body = await request.read()
        reply = csip.answer(self.site(device.site), device, request.path, body, self.now())
        return _http(reply, self.config.csipaus)


def _http(reply: csip.Reply, csipaus: str) -> web.Response:
    if reply.detail is not None:
        log.info("refused with %d: %s", reply.status, reply.detail)
        return web.Response(status=reply.status, text=reply.detail)
    headers = {} if reply.location is None else {"Location": reply.location}
    content_type = csip.CONTENT_TYPE if reply.body else None
    body = csip.in_csipaus(reply.body, csipaus)
    return web.Response(status=reply.status, body=body, headers=headers, content_type=content_type)


def application(service: CsipService) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/{path:.*}", service.get)
    app.router.add_post("/{path:.*}", service.post)
    app.router.add_put("/{path:.*}", service.put)
    return app


async def listen(service: CsipService, tls: ssl.SSLContext) -> web.AppRunner:
    """The HTTPS server, listening; ConfigError naming --port if it cannot."""
    config = service.config
    runner = web.AppRunner(application(service), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, ssl_context=tls).start()
    except OSError as exc:
        await runner.cleanup()
        where = f"{config.host}:{config.port}"
        raise ConfigError(f"--port {config.port}: cannot listen on {where}: {exc}") from None
    return runner


async def serve(
    config: CsipConfig,
    broker: Access,
    connect_timeout_s: float,
    started: Callable[[CsipService], Awaitable[None]] | None = None,
) -> None:
    """Read the envelopes and serve them until cancelled (or the transport gives up)."""
    service, tls = CsipService(config), server_tls(config)  # a bad certificate fails before connecting
    transport = await broker.connect(f"p2pdoe-csip-{secrets.token_hex(4)}", connect_timeout_s)
    try:
        for kind in ("doe", "doe/default"):
            await transport.subscribe(topics.every_site(kind))
        runner = await listen(service, tls)
        try:
            log.debug("CSIP-AUS server on https://%s:%d/dcap", config.host, config.port)
            if started is not None:
                await started(service)
            async for message in transport.messages():
                service.hear(message.topic, message.payload)
        finally:
            await runner.cleanup()
    finally:
        await transport.close()
