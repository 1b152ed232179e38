"""The meter adapter: how the edge agent reads its site's meter and commands its assets.

`MeterAdapter` is the interface: an async stream of `MeterReading`s and a `command` for set-points.
`MqttMeter` is the implementation for a meter that publishes on MQTT (the simulator `meter-sim`, or a
real meter's gateway): readings on `p2pdoe/v1/site/<id>/meter`, set-points on
`p2pdoe/v1/site/<id>/setpoints`, over its own connection (possibly to a site-local broker). A Modbus
meter would implement the same two methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

from p2pdoe.core import topics
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.realtime.plant import SetPoints
from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage
from p2pdoe.services.transport import Transport

log = logging.getLogger("edge_agent.meter")


class MeterAdapter(Protocol):
    def readings(self) -> AsyncIterator[MeterReading]:
        """Readings as they come, malformed ones dropped (and counted)."""
        ...

    async def command(self, set_points: SetPoints, ts: datetime) -> None:
        """Ask the assets for `set_points`; never blocks the control loop for long."""
        ...


class MqttMeter:
    def __init__(self, transport: Transport, site: str):
        self.transport = transport
        self.site = site
        self.reader = MarketReader(f"meter-{site}")
        self.dropped = self.reader.dropped
        self.unsent = 0  # set-points not sent because the connection was down
        self._sending: asyncio.Task[None] | None = None

    @property
    def topic(self) -> str:
        return topics.site(self.site, "meter")

    def decode(self, payload: bytes) -> MeterReading | None:
        """A reading of this site's meter, or None (malformed or another's: dropped and counted)."""
        msg = self.reader.runtime(payload)
        if msg is None:
            return None
        if not isinstance(msg, MeterReading) or msg.site != self.site:
            self.dropped["sender_not_topic"] += 1
            return None
        return msg

    async def readings(self) -> AsyncIterator[MeterReading]:
        """Readings from a transport of the meter's own (a site-local broker)."""
        await self.transport.subscribe(self.topic, qos=0)
        async for m in self.transport.messages():
            msg = self.decode(m.payload) if m.topic == self.topic else None
            if msg is not None:
                yield msg

    async def command(self, set_points: SetPoints, ts: datetime) -> None:
        """The latest set-points win: one still on its way is replaced, and none is sent while the
        connection is down (the assets keep their last ones)."""
        if not getattr(self.transport, "connected", True):
            self.unsent += 1
            return
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
        payload = set_point_message(self.site, set_points, ts).model_dump_json().encode()
        topic = topics.site(self.site, "setpoints")
        self._sending = asyncio.create_task(self.transport.publish(topic, payload, qos=0))
        await asyncio.sleep(0)

    async def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(BaseException):
                await self._sending


def set_point_message(site: str, sp: SetPoints, ts: datetime) -> SetPointMessage:
    return SetPointMessage(
        site=site,
        ts=ts,
        battery_kw=sp.battery_kw,
        pv_cap_kw=sp.pv_cap_kw,
        wind_cap_kw=sp.wind_cap_kw,
        flex_kw=sp.flex_kw,
    )
