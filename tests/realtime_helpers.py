"""The real-time day as a deployment runs it: a coordinator, an edge agent and a meter simulator per
site, each a process on one accelerated shared clock over one broker. Every process is killed when
the `Processes` closes; the logs stay in `logs/` for the failure message."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from service_helpers import service_env

from p2pdoe.core.scenario import Scenario
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import write_site_configs


def quarter_hour_day() -> Scenario:
    return load_scenario("default", {"horizon": {"intervals": 96, "dt_h": 0.25}})


def clock_args(start: datetime, wall: datetime, speed: float) -> list[str]:
    """Simulated `start` happens at wall time `wall`; `speed` simulated seconds per wall second."""
    iso = [x.isoformat().replace("+00:00", "Z") for x in (start, start, wall)]
    return ["--start", iso[0], "--sim-origin", iso[1], "--wall-origin", iso[2], "--speed", f"{speed:g}"]


@dataclass
class Processes:
    """The real-time day's processes for scenario `s`, on the clock that reaches the day's start
    `lead_s` wall seconds from now."""

    s: Scenario
    root: Path
    url: str
    speed: float
    rate_s: float
    lead_s: float = 20.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        write_site_configs(self.s, self.root / "config")
        (self.root / "logs").mkdir(exist_ok=True)
        now = datetime.now(UTC)
        self.start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        self.wall_origin = now + timedelta(seconds=self.lead_s)
        self.clock = clock_args(self.start, self.wall_origin, self.speed)

    def wall_at(self, sim_s: float) -> datetime:
        """When (wall) the day's simulated second `sim_s` comes."""
        return self.wall_origin + timedelta(seconds=sim_s / self.speed)

    def sim_now_s(self) -> float:
        return (datetime.now(UTC) - self.wall_origin).total_seconds() * self.speed

    def start_proc(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        n = sum(1 for k in self.procs if k == name or k.startswith(f"{name}#"))
        key = name if n == 0 else f"{name}#{n}"
        out = (self.root / "logs" / f"{key}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT, env=service_env()
        )
        self.procs[key] = proc
        return proc

    def coordinator(self, *extra: str, name: str = "dso") -> subprocess.Popen[bytes]:
        return self.start_proc(
            name, "dso_coordinator", "--coordinator-config", str(self.root / "config" / "coordinator.json"),
            "--broker", self.url, "--rolling", "--exit-after-day", "--meter-step-s", f"{self.rate_s:g}",
            *self.clock, *extra,
        )  # fmt: skip

    def site_config(self, site: str) -> str:
        return str(self.root / "config" / "sites" / f"{site}.json")

    def journal(self, site: str) -> Path:
        return self.root / "journal" / f"{site}.db"

    def edge(self, site: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.start_proc(
            f"edge-{site}", "edge_agent", "--site-config", self.site_config(site), "--broker", self.url,
            "--meter", "--meter-step-s", f"{self.rate_s:g}", "--journal", str(self.journal(site)),
            *self.clock, *extra,
        )  # fmt: skip

    def meter(self, site: str) -> subprocess.Popen[bytes]:
        return self.start_proc(
            f"meter-{site}", "meter_sim", "--site-config", self.site_config(site), "--broker", self.url,
            "--rate-s", f"{self.rate_s:g}", *self.clock,
        )  # fmt: skip

    def sites(self, ids: Iterable[str]) -> None:
        for site in ids:
            self.edge(site)
            self.meter(site)

    def log(self, name: str, tail: int = 3000) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")[-tail:]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
