"""A meter adapter for a site's SunSpec Modbus devices (`--meter-modbus HOST:PORT`): the meter at the
connection point and, where the site has them, its PV, wind and battery inverters
(p2pdoe.services.sunspec), polled every `meter_step_s` of the service's clock with pysunspec2's
client in a worker thread; the loads, which SunSpec does not carry, from the site's balance
(`with_loads`). A device that does not answer gives no reading, is counted and logged once per
outage, and the real-time controller's own watch raises `meter_silent` and runs the site on its
schedule (docs/realtime.md), as for any silent meter. Set-points still go on MQTT.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta

from edge_agent.meter import MqttMeter
from p2pdoe.core.realtime.plant import SetPoints
from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.services.clock import Clock
from p2pdoe.services.settings import ConfigError
from p2pdoe.services.sunspec import ROLES, SunSpecReader

log = logging.getLogger("edge_agent.sunspec")


def next_poll(previous: datetime, now: datetime, step: timedelta) -> datetime:
    """The next poll: one step after the previous, or, when polls fell behind (a slow device), the
    first step of that grid after now."""
    following = previous + step
    if following > now:
        return following
    behind = math.floor((now - previous) / step) + 1
    return previous + behind * step


def parse_units(text: str) -> dict[int, str]:
    """`meter=1,pv=2,pv=3,battery=4` -> {1: "meter", 2: "pv", 3: "pv", 4: "battery"}: one meter, any
    number of inverters of each kind (their powers summed); a ConfigError naming the flag."""
    roles: dict[int, str] = {}
    try:
        for part in text.split(","):
            role, unit = part.split("=")
            if int(unit) in roles:
                raise ConfigError(f"--meter-modbus-units {text!r}: unit {int(unit)} named twice")
            roles[int(unit)] = role.strip()
    except ValueError:
        raise ConfigError(
            f"--meter-modbus-units {text!r}: expected role=unit,... e.g. meter=1,pv=2"
        ) from None
    if sorted(roles.values()).count("meter") != 1 or not set(roles.values()) <= set(ROLES.values()):
        raise ConfigError(f"--meter-modbus-units {text!r}: one meter, and only {', '.join(ROLES.values())}")
    if not all(1 <= unit <= 247 for unit in roles):
        raise ConfigError(f"--meter-modbus-units {text!r}: Modbus units are 1 to 247")
    return roles


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--meter-modbus {text!r}: expected HOST:PORT, e.g. 192.168.1.50:502")
    return host, int(port)


def with_loads(reading: MeterReading, flex_kw: float | None) -> MeterReading:
    """The loads SunSpec does not carry, from the site's balance (p = pv + wind + battery - fixed -
    flex, export positive): the flexible load taken at its last set-point (0 before any), the fixed
    load the rest."""
    flex = flex_kw or 0.0
    supply = (reading.pv_kw or 0.0) + (reading.wind_kw or 0.0) + (reading.battery_kw or 0.0)
    fixed = max(0.0, supply - flex - reading.p_kw)
    return reading.model_copy(update={"flex_kw": flex, "fixed_load_kw": fixed})


class _Link:
    """What the service asks of a meter's connection: whether it answers, how many times it came."""

    def __init__(self) -> None:
        self.connected = False
        self.connections = 0


class SunSpecMeter:
    def __init__(
        self,
        reader: SunSpecReader,
        clock: Clock,
        site: str,
        step_s: float,
        commands: MqttMeter,
    ):
        self.reader, self.clock, self.site = reader, clock, site
        self.step = timedelta(seconds=step_s)
        self.commands = commands
        self.transport = _Link()  # never the service's MQTT transport: its readings are polled here
        self.topic = ""  # no MQTT topic carries its readings
        self.dropped: Counter[str] = Counter()  # polls the devices did not answer ("unanswered")
        self.unsent = 0
        self.flex_kw: float | None = None  # the flexible load's last set-point (SunSpec has no load)

    @classmethod
    def of(cls, address: str, roles: Mapping[int, str], clock: Clock, site: str, step_s: float,
           commands: MqttMeter, timeout_s: float = 2.0, import_positive: bool = True,
           ) -> SunSpecMeter:  # fmt: skip
        host, port = parse_address(address)
        reader = SunSpecReader(host, port, roles, timeout_s, import_positive)
        return cls(reader, clock, site, step_s, commands)

    def decode(self, payload: bytes) -> MeterReading | None:
        return None

    async def readings(self) -> AsyncIterator[MeterReading]:
        due = self.clock.now()
        try:
            while True:
                await self.clock.sleep_until(due)
                now = self.clock.now()
                reading = await self.poll(now)
                if reading is not None:
                    yield reading
                due = next_poll(due, self.clock.now(), self.step)
        finally:
            await asyncio.to_thread(self.reader.close)

    async def poll(self, now: datetime) -> MeterReading | None:
        """One reading of the devices, or None when they do not answer (counted, logged once)."""
        try:
            reading = await asyncio.to_thread(self.reader.read, self.site, now)
        except Exception as exc:  # pysunspec2's errors, OSError, a device that says busy
            self.dropped["unanswered"] += 1
            if self.transport.connected or self.dropped["unanswered"] == 1:
                log.warning("%s: the SunSpec devices do not answer (%s); polling on", self.site, exc)
            self.transport.connected = False
            return None
        for role, n in self.reader.failures.items():  # inverters that did not answer this time
            self.dropped[f"unanswered_{role}"] = n
        if not self.transport.connected:
            self.transport.connections += 1
            log.info("%s: the SunSpec devices answer (%s)", self.site, self.reader.host)
        self.transport.connected = True
        return with_loads(reading, self.flex_kw)

    async def command(self, set_points: SetPoints, ts: datetime) -> None:
        self.flex_kw = set_points.flex_kw
        await self.commands.command(set_points, ts)

    async def close(self) -> None:
        await self.commands.close()
