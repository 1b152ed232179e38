"""The meter simulator as an asyncio service: the shell (p2pdoe.services.shell) around the pure
simulated meter (p2pdoe.core.realtime.simulated_meter). It publishes a `MeterReading` on
`site/<id>/meter` per step of the day's clock and follows the latest `SetPointMessage` on
`site/<id>/setpoints`; on a lockstep clock it is a member of the plant phase."""

from __future__ import annotations

from p2pdoe.core import topics
from p2pdoe.core.realtime.simulated_meter import SimulatedMeter
from p2pdoe.services.clock import Clock
from p2pdoe.services.shell import Shell, clock_divert
from p2pdoe.services.transport import Transport


class MeterService:
    def __init__(self, transport: Transport, clock: Clock, *, offload: bool = True):
        self.transport, self.clock = transport, clock
        self.shell = Shell(transport, clock, None, offload, clock_divert(clock))

    async def run(self, meter: SimulatedMeter) -> int:
        subscriptions = [(topics.site(meter.site, "setpoints"), 1)]
        return await self.shell.run(meter, meter.start(self.clock.now()), subscriptions)
