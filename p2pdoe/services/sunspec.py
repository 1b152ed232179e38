"""A site as SunSpec Modbus devices: the meter simulator serves its readings as them (`--modbus-port`),
and any SunSpec client reads them as it would a real site's meter and inverters.

One Modbus TCP server per site; each unit (Modbus device id) is a SunSpec device whose registers
start at 40000 with the marker "SunS", then its models, then the end marker (0xFFFF, length 0):
- unit 1, the site's meter at its connection point: common (1) and wye meter (203) models; W and
  VAR import positive (the meter's load side is the site), Hz;
- unit 2, the PV inverter, and unit 3, the wind inverter (sites with them): common and DER AC
  measurement (701); W generation positive;
- unit 4, the battery inverter (sites with a battery): common, 701 (W, discharge positive) and
  battery base (802): SoC in % of WHRtg, WHRtg.

Powers are integers with a scale factor chosen from the site's ratings, so the largest power the
site can draw or inject fits an int16 (resolution: 10^SF W). The registers are built with pysunspec2's
model definitions (`sunspec2.device.Model`), served with pymodbus, and read back by pysunspec2's own
client (`read_site`). The devices are read-only: set-points still travel on MQTT (docs/runtime.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import threading
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import sunspec2.device as sunspec
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.services.settings import ConfigError

log = logging.getLogger(__name__)

BASE = 40000  # where a SunSpec device's registers start
MARKER = (0x5375, 0x6E53)  # "SunS"
END = (0xFFFF, 0x0000)
METER, PV, WIND, BATTERY = 1, 2, 3, 4  # the units (Modbus device ids)
ROLES = {METER: "meter", PV: "pv", WIND: "wind", BATTERY: "battery"}  # what each unit is
INT16_MAX = 32767
UINT16_MAX = 65534  # 0xFFFF means "not implemented"
HEADROOM = 1.5  # the truth may exceed the forecasts the ratings come from
NOMINAL_HZ = 50.0


@dataclass(frozen=True)
class Layout:
    """Which units a site has, the power scale factor and the battery's rating."""

    site: str
    units: tuple[int, ...]
    w_sf: int  # 10^w_sf W per count, for every power of every unit
    battery_wh: float

    @property
    def w_resolution_kw(self) -> float:
        return 10.0**self.w_sf / 1000.0

    @property
    def roles(self) -> dict[int, str]:
        return {unit: ROLES[unit] for unit in self.units}


def layout_of(config: SiteConfig) -> Layout:
    c = config.community
    units = [METER]
    units += [PV] if max(c.pv_kw, default=0.0) > 0 else []
    units += [WIND] if max(c.wind_kw, default=0.0) > 0 else []
    units += [BATTERY] if c.battery.power_kw > 0 and c.battery.energy_kwh > 0 else []
    bound_kw = (
        max(c.pv_kw, default=0.0)
        + max(c.wind_kw, default=0.0)
        + c.battery.power_kw
        + max(c.fixed_load_kw, default=0.0)
        + c.flexible_load.max_kw
    )
    return Layout(
        c.id, tuple(units), scale_factor(HEADROOM * bound_kw * 1000.0), 1000.0 * c.battery.energy_kwh
    )


def scale_factor(bound: float, largest: int = INT16_MAX) -> int:
    """The least power of ten (at least 10^0) with which `bound` fits `largest` counts."""
    if bound <= largest:
        return 0
    return math.ceil(math.log10(bound / largest))


# -- the registers -----------------------------------------------------------------------------------


def _model(model_id: int) -> sunspec.Model:
    model = sunspec.Model(model_id)
    model.ID.value = model_id
    model.L.value = len(model.get_mb()) // 2 - 2  # its registers after ID and L
    return model


def _scaled(model: sunspec.Model, point: str, value_w: float, sf: int) -> int:
    """Set an int16 point in W with its scale factor; clipped to the int16 range (returns 1 if so)."""
    getattr(model, f"{point}_SF").value = sf
    raw = round(value_w / 10.0**sf)
    clipped = max(-INT16_MAX, min(INT16_MAX, raw))
    getattr(model, point).value = clipped
    return int(clipped != raw)


def _common(layout: Layout, unit: int) -> sunspec.Model:
    common = _model(1)
    common.Mn.value = "p2pdoe"
    common.Md.value = ROLES[unit]
    common.SN.value = f"{layout.site}-{unit}"
    common.Vr.value = "1"
    common.DA.value = unit
    return common


def unit_models(layout: Layout, unit: int, reading: MeterReading) -> tuple[list[sunspec.Model], int]:
    """The models of one unit for a reading, and how many values were clipped."""
    sf = layout.w_sf
    if unit == METER:
        meter = _model(203)
        clipped = _scaled(meter, "W", -1000.0 * reading.p_kw, sf)  # import positive
        if reading.q_kvar is not None:
            clipped += _scaled(meter, "VAR", -1000.0 * reading.q_kvar, sf)
        meter.Hz_SF.value = -2
        meter.Hz.value = round(NOMINAL_HZ * 100)
        return [_common(layout, unit), meter], clipped
    ac = _model(701)
    kw = {PV: reading.pv_kw, WIND: reading.wind_kw, BATTERY: reading.battery_kw}[unit] or 0.0
    clipped = _scaled(ac, "W", 1000.0 * kw, sf)  # generation (discharge) positive
    models = [_common(layout, unit), ac]
    if unit == BATTERY:
        base = _model(802)
        wh_sf = scale_factor(layout.battery_wh, UINT16_MAX)
        base.WHRtg_SF.value = wh_sf
        base.WHRtg.value = round(layout.battery_wh / 10.0**wh_sf)
        base.SoC_SF.value = -1
        soc_pct = (
            0.0 if not layout.battery_wh else 100.0 * 1000.0 * (reading.soc_kwh or 0.0) / layout.battery_wh
        )
        base.SoC.value = max(0, min(1000, round(10 * soc_pct)))
        models.append(base)
    return models, clipped


def registers(models: list[sunspec.Model]) -> list[int]:
    """A device's registers from 40000: the marker, the models, the end marker."""
    body = b"".join(m.get_mb() for m in models)
    return [*MARKER, *struct.unpack(f">{len(body) // 2}H", body), *END]


def images(layout: Layout, reading: MeterReading) -> tuple[dict[int, list[int]], int]:
    """Every unit's registers for a reading, and how many values were clipped."""
    out: dict[int, list[int]] = {}
    clipped = 0
    for unit in layout.units:
        models, n = unit_models(layout, unit, reading)
        out[unit], clipped = registers(models), clipped + n
    return out, clipped


# -- serving ---------------------------------------------------------------------------------------


class SunSpecServer:
    """A site's units on one Modbus TCP server; `update` sets what the next read returns. Until the
    first reading every read is answered DEVICE_BUSY (a meter that has nothing to say yet)."""

    def __init__(self, layout: Layout, first: MeterReading | None = None):
        self.layout = layout
        self.ready = first is not None
        blank = MeterReading(site=layout.site, ts=datetime(1970, 1, 1, tzinfo=UTC), p_kw=0.0)
        self.images, self.clipped = images(layout, first or blank)
        self.reads = 0

    def update(self, reading: MeterReading) -> None:
        self.images, clipped = images(self.layout, reading)
        if clipped and not self.clipped:
            log.warning("%s: a power beyond what 10^%d W a count can say was clipped (said once)",
                        self.layout.site, self.layout.w_sf)  # fmt: skip
        self.clipped += clipped
        self.ready = True

    async def _refresh(
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # read-only devices
        if not self.ready:
            return ExcCodes.DEVICE_BUSY
        image = self.images[unit]
        current[: len(image)] = image
        self.reads += 1
        return None

    def devices(self) -> list[SimDevice]:
        return [
            SimDevice(
                id=unit,
                simdata=[SimData(BASE, values=list(image), datatype=DataType.REGISTERS)],
                action=partial(self._refresh, unit),
            )
            for unit, image in self.images.items()
        ]

    @contextlib.asynccontextmanager
    async def serving(self, host: str, port: int) -> AsyncIterator[ModbusTcpServer]:
        """Listening on host:port (a `ConfigError` naming `--modbus-port` if it cannot) while the
        context lasts."""
        server = ModbusTcpServer(self.devices(), address=(host, port))
        try:
            await server.serve_forever(background=True)  # returns once listening
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"--modbus-port {port}: cannot listen on {host}:{port}: {exc}") from None
        try:
            yield server
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]


# -- reading (a SunSpec client, blocking: run it in a thread) --------------------------------------

METER_MODELS = (203, 201, 202, 204)  # wye, single phase, split phase, delta meters: W, VAR alike
INVERTER_MODELS = (701, 103, 102, 101)  # DER AC measurement, then the older inverter models


class SunSpecReader:
    """Reads a site's SunSpec units with pysunspec2's client, one TCP connection per unit kept open:
    each unit scanned once on connecting, then only its models read (and scanned again if a model
    moved: a device restarted with another layout). Only the meter is needed for a reading: an
    inverter that does not answer, or has no model this reads, leaves its power empty and is counted
    in `failures` by role. Blocking: call `read` from a worker thread (one at a time; `close` waits
    for a read in progress)."""

    def __init__(
        self,
        host: str,
        port: int,
        roles: Mapping[int, str],
        timeout_s: float = 2.0,
        meter_import_positive: bool = True,
    ):
        """`roles`: unit -> what it is ("meter", "pv", "wind", "battery"; one meter, several of the
        others summed). `meter_import_positive`: the meter's W is positive when the site imports
        (as most meters at a connection point report it; False for one that says export)."""
        if sorted(roles.values()).count("meter") != 1 or not set(roles.values()) <= set(ROLES.values()):
            raise ValueError(f"SunSpec units {dict(roles)}: one meter, and only {', '.join(ROLES.values())}")
        self.host, self.port, self.roles, self.timeout_s = host, port, dict(roles), timeout_s
        self.meter_sign = -1.0 if meter_import_positive else 1.0  # to export positive
        self._devices: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.scans = 0
        self.failures: Counter[str] = Counter()  # by role: reads of a unit that failed

    def read(self, site: str, ts: datetime) -> MeterReading:
        """One reading; raises (`SunSpecModbusClientError`, `ModbusClientError`, OSError, ValueError)
        when the meter does not answer or has no meter model."""
        with self._lock:
            values: dict[str, float | None] = {}
            for unit, role in self.roles.items():
                try:
                    found = _unit_values(role, self._models(unit), self.meter_sign)
                except Exception:
                    self._drop(unit)
                    self.failures[role] += 1
                    if role == "meter":
                        raise
                    continue
                for key, value in found.items():
                    values[key] = _sum(values.get(key), value)
        return MeterReading(
            site=site,
            ts=ts,
            p_kw=values["p_kw"],  # type: ignore[arg-type]  # set, or the meter raised
            q_kvar=values.get("q_kvar"),
            pv_kw=values.get("pv_kw"),
            wind_kw=values.get("wind_kw"),
            battery_kw=values.get("battery_kw"),
            soc_kwh=values.get("soc_kwh"),
        )

    def _models(self, unit: int) -> dict[object, list[sunspec.Model]]:
        from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

        device = self._devices.get(unit)
        if device is None:
            device = SunSpecModbusClientDeviceTCP(
                slave_id=unit, ipaddr=self.host, ipport=self.port, timeout=self.timeout_s
            )
            self._devices[unit] = device
            device.connect()
            device.scan(connect=False)  # reads every model once; the connection stays open
            self.scans += 1
        else:
            for model in _read_models(device):
                model.read()
                if model.ID.value != model.model_id:  # the device's layout changed under us
                    raise ValueError(f"unit {unit}: model {model.model_id} moved; scanning again")
        models: dict[object, list[sunspec.Model]] = device.models
        return models

    def _drop(self, unit: int) -> None:
        device = self._devices.pop(unit, None)
        if device is not None:
            with contextlib.suppress(Exception):
                device.disconnect()

    def close(self) -> None:
        with self._lock:
            for unit in list(self._devices):
                self._drop(unit)


def _read_models(device: Any) -> list[sunspec.Model]:
    wanted = (*METER_MODELS, *INVERTER_MODELS, 802)
    return [model for model_id in wanted for model in device.models.get(model_id, [])]


def _first(models: dict[object, list[sunspec.Model]], ids: tuple[int, ...]) -> sunspec.Model:
    for model_id in ids:
        if model_id in models:
            return models[model_id][0]
    raise ValueError(f"none of the models {list(ids)}")


def _sum(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


def _unit_values(
    role: str, models: dict[object, list[sunspec.Model]], meter_sign: float
) -> dict[str, float | None]:
    if role == "meter":
        meter = _first(models, METER_MODELS)
        w, var = meter.W.cvalue, meter.VAR.cvalue
        if w is None:
            raise ValueError(f"the meter (model {meter.model_id}) gives no W")
        return {"p_kw": meter_sign * w / 1000.0, "q_kvar": None if var is None else meter_sign * var / 1000.0}
    w = _first(models, INVERTER_MODELS).W.cvalue
    out: dict[str, float | None] = {f"{role}_kw": None if w is None else w / 1000.0}
    if role == "battery" and 802 in models:
        base = models[802][0]
        soc, wh = base.SoC.cvalue, base.WHRtg.cvalue
        out["soc_kwh"] = None if soc is None or wh is None else soc / 100.0 * wh / 1000.0
    return out
