"""The meter simulator as SunSpec Modbus devices (`--modbus-port`): every reading it publishes on
MQTT is also what its devices answer next (p2pdoe.services.sunspec), so a SunSpec client reads the
same plant a subscriber hears."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.sunspec import SunSpecServer, layout_of
from p2pdoe.services.transport import Transport
from p2pdoe.services.transport_layer import TransportLayer

log = logging.getLogger("meter_sim.sunspec")


class SunSpecMirror(TransportLayer):
    """Passes every publish on; a reading on the site's meter topic also updates the devices."""

    def __init__(self, inner: Transport, server: SunSpecServer):
        super().__init__(inner)
        self.server = server
        self.topic = topics.site(server.layout.site, "meter")

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        if topic == self.topic:
            self.server.update(MeterReading.model_validate_json(payload))
        await self.inner.publish(topic, payload, qos, retain, expiry_s)


@contextlib.asynccontextmanager
async def served_as_sunspec(
    transport: Transport, config: SiteConfig, host: str, port: int
) -> AsyncIterator[Transport]:
    """`transport`, its readings also served as SunSpec devices on host:port while the context lasts."""
    server = SunSpecServer(layout_of(config))
    async with server.serving(host, port):
        layout = server.layout
        log.info(
            "SunSpec Modbus devices of %s on %s:%d, units %s, powers in 10^%d W",
            layout.site, host, port, list(layout.units), layout.w_sf,
        )  # fmt: skip
        yield SunSpecMirror(transport, server)
