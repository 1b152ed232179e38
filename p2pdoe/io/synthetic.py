"""Synthetic scenarios for scaling studies: N communities on IEEE 33-bus, sized like the default day.

`synthetic_spec(n)` writes a ScenarioSpec document (a plain dict) from the six archetypes of the
default scenario (p2pdoe/data/scenarios/default.yaml): PV-heavy communities at the ends of the main
feeder and of the lateral at bus 33, wind at the lateral end 25, a PV village at the lateral end 22,
towns along the main feeder and a commercial campus on the 26-33 lateral. Community i takes archetype
i mod 6, so every archetype is present from six communities on. Each archetype's k copies share the
default community's assets (PV, wind, loads, flexible energy, batteries) with a seeded +-25 % spread
that is renormalised, so the feeder carries the same totals as the default day whatever N is (each
asset is scaled by about 6/N; below six communities the missing archetypes are simply absent). Copies
are spread evenly over the archetype's region of the feeder, its end first; with more copies than
buses, several communities share a bus. Copies share their archetype's weather (the default's PV and
wind profile seeds) and draw their own load noise; `synthetic-6` is the default scenario.

Feeder, prices, market and ADMM settings are those of the default scenario. Names such as
`synthetic-20`, `synthetic-50-peers4` (each community trades with its 4 electrically nearest, made
symmetric) or `synthetic-20-seed3` are resolved by `load_scenario` through `synthetic_from_name`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pdoe.core.network import FloatArray
from p2pdoe.errors import ScenarioError

NAME_FORMAT = "synthetic-N[-peersK][-seedS]"
MAX_COMMUNITIES = 500
_NAME = re.compile(r"synthetic-(?P<n>\d+)(?P<options>(?:-(?:peers|seed)\d+)*)")
_OPTION = re.compile(r"-(peers|seed)(\d+)")


@dataclass(frozen=True)
class _Archetype:
    """One community of the default scenario, and the buses (end of its region first) its copies take."""

    name: str
    seed: int  # the default community's profile seed
    buses: tuple[int, ...]
    load_shape: str
    fixed_load_kw: float
    pv_kw: float = 0.0
    pv_cloudiness: float = 0.1
    wind_kw: float = 0.0
    wind_speed_m_s: float = 7.5
    flex_kwh: float = 0.0
    flex_max_kw: float = 0.0
    flex_discomfort: float | None = None
    battery_kwh: float = 0.0
    battery_kw: float = 0.0


# In the order communities take them (with fewer than six communities the last ones are left out).
_ARCHETYPES = (
    _Archetype("solar", 18, (18, 17, 16, 15), "residential", 80, pv_kw=1400, pv_cloudiness=0.05,
               flex_kwh=300, flex_max_kw=60, flex_discomfort=0.002, battery_kwh=400, battery_kw=200),
    _Archetype("campus", 30, (30, 29, 28, 27, 26), "commercial", 450, pv_kw=200,
               flex_kwh=400, flex_max_kw=100),
    _Archetype("wind", 25, (25, 24, 23), "commercial", 150, wind_kw=600, wind_speed_m_s=8.0),
    _Archetype("town", 14, tuple(range(14, 1, -1)), "residential", 160, pv_kw=150,
               flex_kwh=600, flex_max_kw=150, flex_discomfort=0.001, battery_kwh=200, battery_kw=100),
    _Archetype("solarwind", 33, (33, 32, 31), "residential", 150, pv_kw=1000, wind_kw=300, wind_speed_m_s=7.0,
               battery_kwh=300, battery_kw=150),
    _Archetype("village", 22, (22, 21, 20, 19), "residential", 250, pv_kw=600,
               battery_kwh=250, battery_kw=125),
)  # fmt: skip

_FEEDER: dict[str, Any] = {
    "source": "ieee33",
    "v0_pu": 1.035,
    "vmin_pu": 0.95,
    "vmax_pu": 1.05,
    "voltage_margin": {"lower_pu": 0.004, "upper_pu": 0.0},
    "rating_margin": 0.05,
    "line_ratings": {"rule": "nominal_plus", "margin_kva": 800},
    "background_load": {
        "peak_factor": 0.75,
        "profile": {"kind": "load", "shape": "residential", "noise": 0.0},
    },
}
_PRICES: dict[str, Any] = {
    "import_eur_per_kwh": {
        "base_eur_per_kwh": 0.22,
        "windows": [[0, 7, 0.16], [17, 21, 0.32], [23, 24, 0.16]],
    },
    "export_eur_per_kwh": {"base_eur_per_kwh": 0.05},
}
_MARKET: dict[str, Any] = {
    "trade_limit_kw": 1500,
    "fee_base_eur_per_kwh": 0.004,
    "fee_eur_per_kwh_per_ohm": 0.001,
    "trade_quadratic_eur_per_kw2h": 3.0e-5,
    "regularization_eur_per_kw2h": 1.0e-6,
    "envelope_proximal_eur_per_kw2h": 1.0e-7,
}
_SEED_STEP = 7919  # seed s shifts every profile seed by s times this
_SPREAD = 0.25  # each copy's share of its archetype's assets varies by up to this much, before renormalising


def synthetic_spec(
    n_communities: int,
    seed: int = 0,
    max_peers: int | None = None,
    intervals: int = 24,
    dt_h: float = 1.0,
) -> dict[str, Any]:
    """A ScenarioSpec document with `n_communities` communities; the same arguments give the same dict."""
    if not 2 <= n_communities <= MAX_COMMUNITIES:
        raise ScenarioError(
            f"a synthetic scenario has 2 to {MAX_COMMUNITIES} communities, not {n_communities}"
        )
    if max_peers is not None and max_peers < 1:
        raise ScenarioError(f"a synthetic scenario's max_peers is at least 1, not {max_peers}")
    rng = np.random.default_rng(seed)
    kinds = [_ARCHETYPES[i % len(_ARCHETYPES)] for i in range(n_communities)]
    shares: dict[str, FloatArray] = {}
    for arch in _ARCHETYPES[: min(n_communities, len(_ARCHETYPES))]:
        count = sum(1 for k in kinds if k is arch)
        spread = rng.uniform(1.0 - _SPREAD, 1.0 + _SPREAD, count) if count > 1 else np.ones(1)
        shares[arch.name] = spread / spread.sum()
    taken: dict[str, int] = {}
    communities = []
    for i, arch in enumerate(kinds):
        j = taken.get(arch.name, 0)
        taken[arch.name] = j + 1
        share = shares[arch.name]
        bus = arch.buses[_spread_index(j, len(share), len(arch.buses))]
        weather = arch.seed + _SEED_STEP * seed
        cid = f"{arch.name}-{i:02d}-b{bus}"
        communities.append(_community(arch, cid, bus, float(share[j]), weather, load_seed=weather + 1000 * j))
    peers = "" if max_peers is None else f"-peers{max_peers}"
    name = f"synthetic-{n_communities}{peers}" + (f"-seed{seed}" if seed else "")
    market = dict(_MARKET) | ({} if max_peers is None else {"max_peers": max_peers})
    trading = "everyone trades with everyone" if max_peers is None else f"at most {max_peers} nearest peers"
    return {
        "schema_version": 1,
        "kind": "scenario",
        "name": name,
        "description": (
            f"{n_communities} synthetic communities on IEEE 33-bus (seed {seed}), the default day's assets "
            f"shared among them; {trading}; {intervals} x {dt_h:g} h."
        ),
        "feeder": copy.deepcopy(_FEEDER),
        "horizon": {"intervals": intervals, "dt_h": dt_h, "start": "2026-06-21T00:00:00Z"},
        "prices": copy.deepcopy(_PRICES),
        "market": market,
        "communities": communities,
    }


def synthetic_from_name(name: str) -> dict[str, Any] | None:
    """The spec a synthetic scenario name stands for; None if `name` is not one (no `synthetic-` prefix).

    ScenarioError if it starts with `synthetic-` but does not follow NAME_FORMAT."""
    if not name.startswith("synthetic-"):
        return None
    match = _NAME.fullmatch(name)
    if match is None:
        raise ScenarioError(
            f"scenario {name!r}: a synthetic scenario is named {NAME_FORMAT}, e.g. synthetic-20"
        )
    options: dict[str, int] = {}
    for key, value in _OPTION.findall(match["options"]):
        if key in options:
            raise ScenarioError(f"scenario {name!r}: -{key} is given twice")
        options[key] = int(value)
    try:
        return synthetic_spec(int(match["n"]), seed=options.get("seed", 0), max_peers=options.get("peers"))
    except ScenarioError as exc:
        raise ScenarioError(f"scenario {name!r}: {exc}") from exc


def _spread_index(j: int, count: int, buses: int) -> int:
    """Copy j of `count` takes an evenly spaced bus of its region; beyond one per bus, they share."""
    if count <= buses:
        return (j * buses) // count
    return j % buses


def _community(
    arch: _Archetype, cid: str, bus: int, share: float, weather: int, load_seed: int
) -> dict[str, Any]:
    c: dict[str, Any] = {"id": cid, "bus": bus}
    if arch.pv_kw:
        c["pv"] = {
            "rated_kw": _kw(arch.pv_kw * share),
            "profile": {"kind": "pv", "cloudiness": arch.pv_cloudiness, "seed": weather},
        }
    if arch.wind_kw:
        c["wind"] = {
            "rated_kw": _kw(arch.wind_kw * share),
            "profile": {"kind": "wind", "mean_speed_m_s": arch.wind_speed_m_s, "seed": weather},
        }
    c["envelope"] = {"curvature_eur_per_kw2h": 5.0e-6}
    c["fixed_load"] = {
        "rated_kw": _kw(arch.fixed_load_kw * share),
        "profile": {"kind": "load", "shape": arch.load_shape, "seed": load_seed},
    }
    if arch.flex_kwh:
        flex: dict[str, Any] = {
            "energy_kwh": _kw(arch.flex_kwh * share),
            "max_kw": _kw(arch.flex_max_kw * share),
        }
        if arch.flex_discomfort is not None:
            flex["discomfort_eur_per_kw2h"] = arch.flex_discomfort
        c["flexible_load"] = flex
    if arch.battery_kwh:
        c["battery"] = {"energy_kwh": _kw(arch.battery_kwh * share), "power_kw": _kw(arch.battery_kw * share)}
    return c


def _kw(value: float) -> float:
    return round(float(value), 1)
