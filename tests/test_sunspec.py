"""A site as SunSpec Modbus devices (p2pdoe.services.sunspec), over real Modbus TCP on loopback: served
with pymodbus, read back by pysunspec2's own client (which scans the devices as it would a real
site's) and, independently, as raw registers by pymodbus's client; then `meter-sim --modbus-port` as a
process, its devices answering what it publishes on MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from p2pdoe.core.schemas.runtime import MeterReading
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.broker import Broker, free_port
from p2pdoe.services.sunspec import (
    BASE,
    BATTERY,
    METER,
    PV,
    WIND,
    Layout,
    SunSpecReader,
    SunSpecServer,
    layout_of,
)

TS = datetime(2026, 6, 21, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def layouts() -> dict[str, Layout]:
    s = load_scenario("default")
    return {site: layout_of(site_config(s, c)) for c, site in enumerate(s.ids)}


def reading(site: str, **values: float) -> MeterReading:
    return MeterReading(site=site, ts=TS, **values)  # type: ignore[arg-type]


def test_each_site_gets_the_units_of_its_assets(layouts: dict[str, Layout]) -> None:
    assert layouts["solar-wind-33"].units == (METER, PV, WIND, BATTERY)
    assert layouts["wind-25"].units == (METER, WIND)
    assert layouts["campus-30"].units == (METER, PV)
    for layout in layouts.values():  # the largest power the site can draw or inject fits an int16
        assert layout.w_resolution_kw <= 0.1, layout


def test_a_reading_read_back_by_pysunspec2_over_modbus_tcp(layouts: dict[str, Layout]) -> None:
    layout = layouts["solar-wind-33"]
    sent = reading(
        layout.site, p_kw=-123.456, q_kvar=-40.0, pv_kw=200.5, wind_kw=77.77, battery_kw=-20.25, soc_kwh=150.0
    )
    server = SunSpecServer(layout, sent)
    port = free_port()
    reader = SunSpecReader("127.0.0.1", port, layout.roles)

    async def main() -> list[MeterReading]:
        async with server.serving("127.0.0.1", port):
            first = await asyncio.to_thread(reader.read, layout.site, TS)
            server.update(sent.model_copy(update={"p_kw": 55.5, "soc_kwh": 10.0}))
            second = await asyncio.to_thread(reader.read, layout.site, TS)
            return [first, second]

    try:
        first, second = asyncio.run(main())
    finally:
        reader.close()
    res = layout.w_resolution_kw / 2 + 1e-9
    assert first.p_kw == pytest.approx(sent.p_kw, abs=res)
    assert first.q_kvar == pytest.approx(-40.0, abs=res)
    assert first.pv_kw == pytest.approx(200.5, abs=res)
    assert first.wind_kw == pytest.approx(77.77, abs=res)
    assert first.battery_kw == pytest.approx(-20.25, abs=res)
    assert first.soc_kwh == pytest.approx(150.0, abs=0.001 * layout.battery_wh / 1000)  # 0.1 % of WHRtg
    assert second.p_kw == pytest.approx(55.5, abs=res)
    assert second.soc_kwh == pytest.approx(10.0, abs=0.001 * layout.battery_wh / 1000)
    assert reader.scans == len(layout.units)  # scanned once, then only read


def test_the_raw_registers_are_a_sunspec_device_chain(layouts: dict[str, Layout]) -> None:
    """Read as plain holding registers by another client (pymodbus's): the marker, each model's id and
    length leading to the next, the end marker; the meter's W and its scale factor where model 203
    puts them (offsets from the SunSpec model definition: W at 16, W_SF at 20 after ID and L)."""
    layout = layouts["solar-18"]
    server = SunSpecServer(layout, reading(layout.site, p_kw=-12.3))
    port = free_port()

    async def main() -> list[int]:
        async with server.serving("127.0.0.1", port):
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5)
            await client.connect()
            regs: list[int] = []
            try:
                size = len(server.images[METER])
                while len(regs) < size:  # at most 125 registers a request
                    at, count = BASE + len(regs), min(125, size - len(regs))
                    answer = await client.read_holding_registers(at, count=count, device_id=METER)
                    assert not answer.isError(), answer
                    regs += answer.registers
                return regs
            finally:
                client.close()

    regs = asyncio.run(main())
    assert bytes(struct.pack(">2H", *regs[:2])) == b"SunS"
    at, chain = 2, []
    while regs[at] != 0xFFFF:
        model_id, length = regs[at], regs[at + 1]
        chain.append((model_id, length, at))
        at += 2 + length
    assert [(m, n) for m, n, _ in chain] == [(1, 66), (203, 105)]
    assert regs[at + 1] == 0  # the end marker's length
    meter = chain[1][2] + 2
    w, w_sf = struct.unpack(">h", struct.pack(">H", regs[meter + 16]))[0], regs[meter + 20]
    sf = struct.unpack(">h", struct.pack(">H", w_sf))[0]
    assert sf == layout.w_sf
    assert w * 10.0**sf == pytest.approx(12300.0, abs=10.0**sf / 2)  # import positive: 12.3 kW exported


def test_a_device_that_stops_answering_raises_and_is_read_again_when_back(layouts: dict[str, Layout]) -> None:
    layout = layouts["campus-30"]
    server = SunSpecServer(layout)  # nothing read yet: DEVICE_BUSY
    port = free_port()
    reader = SunSpecReader("127.0.0.1", port, layout.roles, timeout_s=2.0)

    async def main() -> list[object]:
        out: list[object] = []
        async with server.serving("127.0.0.1", port):
            out.append(await _outcome(reader, layout.site))  # busy: no reading yet
            server.update(reading(layout.site, p_kw=5.0, pv_kw=5.0))
            out.append(await _outcome(reader, layout.site))
        out.append(await _outcome(reader, layout.site))  # nobody listening
        async with server.serving("127.0.0.1", port):
            out.append(await _outcome(reader, layout.site))
        return out

    try:
        busy, ok, gone, back = asyncio.run(main())
    finally:
        reader.close()
    assert isinstance(busy, Exception), busy
    assert isinstance(ok, MeterReading)
    assert ok.p_kw == pytest.approx(5.0)
    assert isinstance(gone, Exception), gone
    assert isinstance(back, MeterReading)
    assert back.p_kw == pytest.approx(5.0)


async def _outcome(reader: SunSpecReader, site: str) -> object:
    try:
        return await asyncio.to_thread(reader.read, site, TS)
    except Exception as exc:  # what a poller sees when the device does not answer
        return exc


def test_a_port_in_use_is_one_clear_error(layouts: dict[str, Layout]) -> None:
    from p2pdoe.services.settings import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            async with SunSpecServer(layouts["wind-25"]).serving("127.0.0.1", port):
                pass

        with pytest.raises(ConfigError, match=f"--modbus-port {port}: cannot listen"):
            asyncio.run(main())


def test_an_inverter_that_does_not_answer_leaves_only_its_power_empty(layouts: dict[str, Layout]) -> None:
    """Only the meter is needed: a unit nobody serves (9) and one without the models this reads give
    no power and are counted; the meter without reactive power gives q_kvar None."""
    layout = layouts["solar-18"]
    server = SunSpecServer(layout, reading(layout.site, p_kw=-12.3, pv_kw=4.0, battery_kw=0.5, soc_kwh=100.0))
    port = free_port()
    roles = {METER: "meter", PV: "pv", 9: "wind", BATTERY: "battery"}
    reader = SunSpecReader("127.0.0.1", port, roles, timeout_s=1.0)

    async def main() -> MeterReading:
        async with server.serving("127.0.0.1", port):
            return await asyncio.to_thread(reader.read, layout.site, TS)

    try:
        got = asyncio.run(main())
    finally:
        reader.close()
    assert got.p_kw == pytest.approx(-12.3)
    assert got.q_kvar is None
    assert got.pv_kw == pytest.approx(4.0)
    assert got.wind_kw is None
    assert reader.failures == {"wind": 1}


def client_sockets_to(port: int) -> int:
    """This process's open TCP sockets whose far end is 127.0.0.1:`port` (the reader's, not the
    server's side of the same connections)."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            count += 1
    return count


def test_failed_reads_leave_no_socket_open(layouts: dict[str, Layout]) -> None:
    """A device that answers busy, read again and again: each failed read closes its connection, so
    at most the one being read is open (pysunspec2's own close does nothing: the reader disconnects)."""
    layout = layouts["campus-30"]
    server = SunSpecServer(layout)  # busy until a reading
    port = free_port()
    reader = SunSpecReader("127.0.0.1", port, layout.roles, timeout_s=1.0)

    async def main() -> list[int]:
        counts = []
        async with server.serving("127.0.0.1", port):
            for _ in range(5):
                await _outcome(reader, layout.site)
                counts.append(client_sockets_to(port))
            server.update(reading(layout.site, p_kw=1.0, pv_kw=1.0))
            await _outcome(reader, layout.site)
            counts.append(client_sockets_to(port))  # now answering: its connections kept open
        return counts

    counts = asyncio.run(main())
    reader.close()
    assert counts[:5] == [0] * 5, counts
    assert counts[5] == len(layout.units), counts
    assert client_sockets_to(port) == 0
    assert reader.failures["meter"] == 5


@pytest.mark.timeout(300)
def test_meter_sim_serves_what_it_publishes(mqtt_broker: Broker, tmp_path: Path) -> None:
    """`meter-sim --modbus-port` as a process: what its devices answer is a reading it published on
    MQTT, every power within the devices' resolution (signs included: the meter's import positive
    turned back to export positive, the battery's discharge positive)."""
    import aiomqtt

    from p2pdoe.io.site_configs import write_site_configs

    write_site_configs(load_scenario("default"), tmp_path / "config")
    site, port = "solar-wind-33", free_port()
    args = ["--site-config", str(tmp_path / "config" / "sites" / f"{site}.json"), "--broker", mqtt_broker.url]
    args += ["--modbus-port", str(port), "--speed", "60", "--rate-s", "60", "--start", "now"]
    layout = layout_of(site_config(load_scenario("default"), 1))
    reader = SunSpecReader("127.0.0.1", port, layout.roles, timeout_s=5.0)

    async def main() -> tuple[list[MeterReading], MeterReading]:
        host, _, mqtt_port = mqtt_broker.url.removeprefix("mqtt://").rpartition(":")
        published: list[MeterReading] = []
        async with aiomqtt.Client(host, int(mqtt_port)) as client:
            await client.subscribe(f"p2pdoe/v1/site/{site}/meter")  # before the simulator starts
            proc = _start(tmp_path, "meter", "meter_sim", *args)
            try:
                async with asyncio.timeout(180):
                    async for m in client.messages:
                        published.append(MeterReading.model_validate_json(bytes(m.payload).split(b"\n")[-1]))
                        try:
                            got = await asyncio.to_thread(reader.read, site, TS)
                        except Exception:
                            continue  # not serving yet
                        return published, got
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        raise AssertionError("no reading")

    try:
        published, got = asyncio.run(main())
    finally:
        reader.close()
    res = layout.w_resolution_kw / 2 + 1e-6

    def close(r: MeterReading) -> bool:
        pairs = [
            (got.p_kw, r.p_kw),
            (got.pv_kw, r.pv_kw),
            (got.wind_kw, r.wind_kw),
            (got.battery_kw, r.battery_kw),
        ]
        soc_ok = abs((got.soc_kwh or 0) - (r.soc_kwh or 0)) <= 0.001 * layout.battery_wh / 1000
        return soc_ok and all(a is not None and b is not None and abs(a - b) <= res for a, b in pairs)

    assert any(close(r) for r in published[-2:]), (got, published[-2:])


# -- the edge agent reading them ---------------------------------------------------------------------


class StepClock:
    """A clock for logic: `sleep_until` moves it there at once (polls come as fast as the devices
    answer; what they answer does not depend on it)."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def now(self) -> datetime:
        return self.t

    async def sleep_until(self, moment: datetime) -> None:
        self.t = max(self.t, moment)
        await asyncio.sleep(0)


def test_polls_keep_to_their_grid_and_skip_what_a_slow_device_missed() -> None:
    from edge_agent.sunspec_meter import next_poll

    step = timedelta(seconds=5)
    assert next_poll(TS, TS + timedelta(seconds=1), step) == TS + step
    assert next_poll(TS, TS + timedelta(seconds=5), step) == TS + 2 * step  # due now: the next one
    assert next_poll(TS, TS + timedelta(seconds=17), step) == TS + 4 * step


@pytest.mark.parametrize(
    ("text", "why"),
    [("meter=1,pv=x", "expected role=unit"), ("pv=2", "one meter"), ("meter=1,heat=2", "one meter"),
     ("meter=0", "Modbus units are 1 to 247"), ("meter=1,pv=1", "unit 1 named twice")],
)  # fmt: skip
def test_bad_units_are_one_clear_error(text: str, why: str) -> None:
    from edge_agent.sunspec_meter import parse_units
    from p2pdoe.services.settings import ConfigError

    with pytest.raises(ConfigError, match=f"--meter-modbus-units {text!r}: {why}"):
        parse_units(text)
    assert parse_units("meter=1,battery=4") == {1: "meter", 4: "battery"}


def test_the_loads_sunspec_does_not_carry_come_from_the_sites_balance() -> None:
    from edge_agent.sunspec_meter import with_loads

    r = reading("a", p_kw=-7.5, pv_kw=3.0, wind_kw=1.0, battery_kw=-2.0)  # 2 kW in, 3 + 1 - 2 made
    assert with_loads(r, None).fixed_load_kw == pytest.approx(9.5)  # 3 + 1 - 2 - 0 + 7.5
    both = with_loads(r, 4.0)  # the flexible load at its last set-point
    assert both.flex_kw == 4.0
    assert both.fixed_load_kw == pytest.approx(5.5)
    assert both.pv_kw + both.wind_kw + both.battery_kw - both.fixed_load_kw - both.flex_kw == pytest.approx(
        r.p_kw
    )


def test_the_edges_sunspec_meter_reads_the_devices_and_rides_out_their_silence(
    layouts: dict[str, Layout],
) -> None:
    """The edge's adapter against the devices over Modbus TCP: readings equal what they serve, a
    device that stops answering gives no reading (counted, the link down) and the polls go on, and
    readings come again when it is back."""
    from edge_agent.meter import MqttMeter
    from edge_agent.sunspec_meter import SunSpecMeter

    layout = layouts["village-22"]
    server = SunSpecServer(layout, reading(layout.site, p_kw=-7.5, pv_kw=3.0, battery_kw=1.0, soc_kwh=80.0))
    port = free_port()
    clock = StepClock(TS)
    meter = SunSpecMeter.of(
        f"127.0.0.1:{port}", layout.roles, clock, layout.site, 5.0, MqttMeter(None, layout.site), 1.0
    )  # type: ignore[arg-type]

    async def main() -> tuple[list[MeterReading], list[MeterReading], int]:
        polls = meter.readings()
        async with server.serving("127.0.0.1", port):
            first = [await anext(polls) for _ in range(2)]
        silent_from = meter.dropped["unanswered"]
        assert await meter.poll(clock.now()) is None  # nobody listening
        assert not meter.transport.connected
        async with server.serving("127.0.0.1", port):
            server.update(reading(layout.site, p_kw=2.5, pv_kw=0.0, battery_kw=-2.0, soc_kwh=81.0))
            again = [await anext(polls)]
        await polls.aclose()
        return first, again, silent_from

    first, again, silent_from = asyncio.run(main())
    assert [r.p_kw for r in first] == [pytest.approx(-7.5), pytest.approx(-7.5)]
    assert first[0].battery_kw == pytest.approx(1.0)
    assert first[0].soc_kwh == pytest.approx(80.0, abs=0.001 * layout.battery_wh / 1000)
    assert first[1].ts - first[0].ts == timedelta(seconds=5)  # stamped on the clock's grid
    assert silent_from == 0
    assert meter.dropped["unanswered"] >= 1  # the poll while nobody listened
    assert again[0].p_kw == pytest.approx(2.5)
    assert meter.transport.connections == 2
    assert meter.transport.connected


def test_an_edge_agent_process_enforces_on_what_meter_sims_sunspec_devices_say(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """`edge-agent --meter --meter-modbus` against `meter-sim --modbus-port`, both processes on the
    scaled clock: the agent's telemetry is measured ("meter") and each measured injection is one
    the simulator published on MQTT, within the devices' resolution."""
    import json as jsonlib

    import aiomqtt

    from p2pdoe.io.site_configs import write_site_configs

    write_site_configs(load_scenario("default"), tmp_path / "config")
    site, port = "village-22", free_port()
    cfg = str(tmp_path / "config" / "sites" / f"{site}.json")
    clock = ["--speed", "30", "--start", "now"]
    common = ["--site-config", cfg, "--broker", mqtt_broker.url, *clock]
    meter_args = [*common, "--modbus-port", str(port), "--rate-s", "30"]
    edge_args = [*common, "--meter", "--meter-modbus", f"127.0.0.1:{port}", "--meter-step-s", "30"]
    edge_args += ["--journal", str(tmp_path / "journal.db"), "--report-every-s", "30"]
    procs = []
    try:

        async def watch() -> tuple[list[float], list[float]]:
            published: list[float] = []
            measured: list[float] = []
            host, _, mqtt_port = mqtt_broker.url.removeprefix("mqtt://").rpartition(":")
            async with aiomqtt.Client(host, int(mqtt_port)) as client:
                await client.subscribe(f"p2pdoe/v1/site/{site}/meter")  # before anything is published
                await client.subscribe(f"p2pdoe/v1/site/{site}/telemetry")
                procs.append(_start(tmp_path, "meter", "meter_sim", *meter_args))
                procs.append(_start(tmp_path, "edge", "edge_agent", *edge_args))
                async with asyncio.timeout(240):
                    async for m in client.messages:
                        body = jsonlib.loads(bytes(m.payload).split(b"\n")[-1])
                        if body["kind"] == "meter":
                            published.append(body["p_kw"])
                        elif body["kind"] == "telemetry" and body["source"] == "meter":
                            measured.append(body["p_kw"])
                        if len(measured) >= 3:
                            return published, measured
            return published, measured

        published, measured = asyncio.run(watch())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    assert len(measured) >= 3, (tmp_path / "edge.log").read_text()[-3000:]
    layout = layout_of(site_config(load_scenario("default"), 5))
    for p in measured:
        assert min(abs(p - q) for q in published) <= layout.w_resolution_kw / 2 + 1e-6, (p, published)


@pytest.mark.timeout(400)
def test_devices_that_stop_answering_are_an_alarm_and_a_fallback_not_a_crash(
    mqtt_broker: Broker, tmp_path: Path
) -> None:
    """The meter simulator (its SunSpec devices) killed under a running edge agent: the agent raises
    `meter_silent`, goes on commanding the site blind (set-points from its schedule, or its fixed
    default without one: docs/realtime.md), and lives on."""
    import json as jsonlib

    import aiomqtt

    from p2pdoe.io.site_configs import write_site_configs

    write_site_configs(load_scenario("default"), tmp_path / "config")
    site, port = "village-22", free_port()
    cfg = str(tmp_path / "config" / "sites" / f"{site}.json")
    common = ["--site-config", cfg, "--broker", mqtt_broker.url, "--speed", "30", "--start", "now"]
    meter_args = [*common, "--modbus-port", str(port), "--rate-s", "30"]
    edge_args = [*common, "--meter", "--meter-modbus", f"127.0.0.1:{port}", "--meter-step-s", "30"]
    edge_args += [
        "--journal",
        str(tmp_path / "journal.db"),
        "--report-every-s",
        "30",
        "--meter-silent-s",
        "120",
    ]
    procs: dict[str, subprocess.Popen[bytes]] = {}

    async def watch() -> list[str]:
        seen: list[str] = []
        host, _, mqtt_port = mqtt_broker.url.removeprefix("mqtt://").rpartition(":")
        async with aiomqtt.Client(host, int(mqtt_port)) as client:
            await client.subscribe(f"p2pdoe/v1/site/{site}/telemetry")
            await client.subscribe(f"p2pdoe/v1/site/{site}/status")
            await client.subscribe(f"p2pdoe/v1/site/{site}/setpoints")
            procs["meter"] = _start(tmp_path, "meter", "meter_sim", *meter_args)
            procs["edge"] = _start(tmp_path, "edge", "edge_agent", *edge_args)
            async with asyncio.timeout(300):
                async for m in client.messages:
                    body = jsonlib.loads(bytes(m.payload).split(b"\n")[-1] or b"{}")
                    if body.get("kind") == "telemetry":
                        seen.append(f"telemetry:{body['source']}")
                        if body["source"] == "meter" and "meter" in procs and "killed" not in seen:
                            procs["meter"].kill()  # the devices stop answering
                            procs["meter"].wait(timeout=30)
                            seen.append("killed")
                    elif body.get("kind") == "site_status" and "meter_silent" in body.get("alarms", []):
                        seen.append("meter_silent")
                    elif body.get("kind") == "setpoints":
                        seen.append("setpoints")
                    if "meter_silent" in seen and seen[-1] == "setpoints":
                        return seen
        return seen

    try:
        seen = asyncio.run(watch())
        assert procs["edge"].poll() is None, (tmp_path / "edge.log").read_text()[-3000:]  # alive
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    assert "killed" in seen, seen
    after = seen[seen.index("killed") :]
    assert "meter_silent" in after, seen[-20:]
    assert after[-1] == "setpoints", seen[-20:]  # commanded blind after the alarm
    assert "telemetry:meter" not in after[after.index("meter_silent") :], seen[-20:]
    assert (
        "unanswer" in (tmp_path / "edge.log").read_text()
        or "do not answer" in (tmp_path / "edge.log").read_text()
    )


def _start(root: Path, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
    with (root / f"{name}.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [([], "give --meter too"), (["--meter", "--clock", "lockstep"], "needs a wall or scaled clock"),
     (["--meter", "--meter-modbus-units", "pv=2"], "one meter")],
)  # fmt: skip
def test_the_edge_agent_refuses_a_modbus_meter_it_cannot_use_before_connecting(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    from service_helpers import assert_service_error, run_module

    from p2pdoe.io.site_configs import write_site_configs

    write_site_configs(load_scenario("default"), tmp_path)
    cfg = str(tmp_path / "sites" / "solar-18.json")
    # no broker listens on port 9: a refusal after connecting would hang, not exit with one line
    proc = run_module("edge_agent", "--site-config", cfg, "--broker", "mqtt://127.0.0.1:9",
                      "--meter-modbus", "127.0.0.1:15020", *extra)  # fmt: skip
    assert_service_error(proc, "edge-agent", needle)
