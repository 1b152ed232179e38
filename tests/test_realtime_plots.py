"""The real-time figures: what each panel shows, on a made-up hour of a solved day (no demo run)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("cvxpy")

import matplotlib.pyplot as plt

from p2pdoe.analysis.results import build_results
from p2pdoe.core.schemas.results import (
    DefaultEnvelope,
    EnvelopeViolations,
    FallbackEvent,
    RealtimeInfo,
    RealtimeInterval,
    Results,
    RuntimeInfo,
    ViolationResult,
)
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.reference.centralized import solve_centralized
from p2pdoe.report.realtime_plots import (
    ENVELOPE_VIEW,
    MIN_SCALE_KW,
    SOC_EPS_KWH,
    Y_MARGIN,
    injection_figure,
    voltages_figure,
    write_realtime_plots,
)

HOURS = 3.0
STEP_S = 60
FALLBACK_SITE = "town-14"  # on its default envelope from 0.5 h on
VIOLATING_SITE = "village-22"  # 50 kW above its envelope after 0.25 h to 0.3 h


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def day() -> tuple[Results, dict[str, list[tuple[datetime, float, float | None]]]]:
    s = load_scenario("default")
    r = build_results(s, solve_centralized(s, Policy.DYNAMIC), "centralized")
    start = datetime.fromisoformat(r.start.replace("Z", "+00:00"))
    n = int(HOURS / r.dt_h)
    return _with_realtime(r, start, n), _readings(r, start)


def _with_realtime(r: Results, start: datetime, n: int) -> Results:
    at = lambda h: _iso(start + timedelta(hours=h))  # noqa: E731
    events = [
        FallbackEvent(site=c.id, ts=at(-0.1), envelope="fixed_default", reason=None, alarm=None)
        for c in r.communities
    ]
    events += [
        FallbackEvent(site=c.id, ts=at(0.0), envelope="dynamic", reason=None, alarm=None)
        for c in r.communities
    ]
    events.append(
        FallbackEvent(
            site=FALLBACK_SITE, ts=at(0.5), envelope="default", reason="coordinator offline", alarm=None
        )
    )
    defaults = [
        DefaultEnvelope(id=c.id, lo_kw=min(c.envelope_lo_kw) / 2, up_kw=max(c.envelope_up_kw) / 2)
        for c in r.communities
    ]
    rolling = [
        RealtimeInterval(interval=t, start=at(t * r.dt_h), round=f"rt{t}", status="converged", iterations=5,
                         wall_s=0.1, lead_s=900.0, sites=[c.id for c in r.communities],
                         lo_kw={c.id: c.envelope_lo_kw[t] - 1.0 for c in r.communities},
                         up_kw={c.id: c.envelope_up_kw[t] + 1.0 for c in r.communities})
        for t in range(1, n)
    ]  # fmt: skip
    violation = ViolationResult(site=VIOLATING_SITE, start=at(0.25), end=at(0.3), readings=3, worst_kw=50.0)
    rt = RealtimeInfo.model_construct(
        speed=1.0, hours=HOURS, meter_readings=0, intervals=rolling, settlements=[],
        envelope_violations=EnvelopeViolations(count=1, by_site={VIOLATING_SITE: 1}, judged_readings=1,
                                               outside_readings=3, events=[violation]),
        fallback_events=events, missing_settlements={}, energy_mismatch_max_pct=0.0,
        measured_ac=r.ac_check.schedule.model_copy(update={"voltage_pu": r.ac_check.schedule.voltage_pu[:n]}),
    )  # fmt: skip
    runtime = RuntimeInfo.model_construct(default_envelopes=defaults)
    return r.model_copy(update={"realtime": rt, "runtime": runtime})


def _readings(r: Results, start: datetime) -> dict[str, list[tuple[datetime, float, float | None]]]:
    readings: dict[str, list[tuple[datetime, float, float | None]]] = {}
    for c in r.communities:
        rows = []
        for k in range(-6, int(HOURS * 3600 / STEP_S) + 1):
            h = k * STEP_S / 3600.0
            t = max(0, min(r.intervals - 1, math.ceil(h / r.dt_h) - 1))  # a reading ends its step
            beyond = c.id == VIOLATING_SITE and 0.25 < h <= 0.3
            p = c.envelope_up_kw[t] + 50.0 if beyond else c.net_injection_kw[t]
            rows.append((start + timedelta(hours=h), p, c.soc_kwh[t] if max(c.soc_kwh) > 0 else 0.0))
        readings[c.id] = rows
    return readings


def _panels(fig: plt.Figure) -> dict[str, plt.Axes]:
    """The injection axes by site (their y label's first line)."""
    return {ax.get_ylabel().split("\n")[0]: ax for ax in fig.axes if ax.get_gid() != "soc"}


def test_every_figure_is_written(day: tuple[Results, dict], tmp_path: Path) -> None:
    r, readings = day
    paths = write_realtime_plots(r.model_copy(update={"realtime": r.realtime}), readings, tmp_path)
    assert [p.name for p in paths] == [
        "realtime_injection.png",
        "realtime_voltages.png",
        "realtime_settlements.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_injection_panels_say_their_unit_and_only_sites_with_a_battery_get_a_soc_axis(
    day: tuple[Results, dict],
) -> None:
    r, readings = day
    fig = injection_figure(r, readings)
    try:
        panels = _panels(fig)
        assert set(panels) == set(readings)
        assert all(ax.get_ylabel().endswith("kW") for ax in panels.values())
        with_battery = {c.id for c in r.communities if max(c.soc_kwh) > SOC_EPS_KWH}
        assert with_battery
        assert with_battery != set(readings)  # the scenario has both kinds
        soc_axes = [ax for ax in fig.axes if ax.get_gid() == "soc"]
        assert len(soc_axes) == len(with_battery)
        owners = {ax.get_ylabel().split("\n")[0] for ax in panels.values() for twin in soc_axes
                  if twin.get_position().bounds == ax.get_position().bounds}  # fmt: skip
        assert owners == with_battery
    finally:
        plt.close(fig)


def test_injection_y_range_is_the_data_and_envelopes_near_it(day: tuple[Results, dict]) -> None:
    r, readings = day
    assert r.realtime is not None
    wide = [i.model_copy(update={"up_kw": {**i.up_kw, "wind-25": 1e6}}) for i in r.realtime.intervals]
    far = r.model_copy(update={"realtime": r.realtime.model_copy(update={"intervals": wide})})
    fig = injection_figure(far, readings)
    try:
        for site, ax in _panels(fig).items():
            p = np.array([row[1] for row in readings[site]])
            reach = ENVELOPE_VIEW * max(np.ptp(p), np.abs(p).max(), MIN_SCALE_KW)
            low, high = ax.get_ylim()
            assert p.min() - reach * (1 + 2 * Y_MARGIN) <= low < p.min()
            assert p.max() < high <= p.max() + reach * (1 + 2 * Y_MARGIN)
        assert _panels(fig)["wind-25"].get_ylim()[1] < 1e5  # a far envelope edge does not flatten the data
        texts = [t.get_text() for t in _panels(fig)["wind-25"].texts]
        assert "envelope edge off the panel, up to 1,000,000 kW" in texts  # and is named
        assert not [t for t in _panels(fig)["solar-18"].texts if "off the panel" in t.get_text()]
    finally:
        plt.close(fig)


def test_a_fallback_is_shaded_with_the_default_envelope_drawn(day: tuple[Results, dict]) -> None:
    r, readings = day
    fig = injection_figure(r, readings)
    try:
        panels = _panels(fig)
        labels = lambda ax: [a.get_label() for a in [*ax.patches, *ax.collections, *ax.lines]]  # noqa: E731
        assert "default envelope (in a fallback)" in labels(panels[FALLBACK_SITE])
        assert "default envelope (in a fallback)" not in labels(panels[VIOLATING_SITE])
        defaults = next(c for c in panels[FALLBACK_SITE].collections if c.get_label().startswith("default"))
        segments = defaults.get_segments()
        assert min(seg[0][0] for seg in segments) == pytest.approx(0.5)  # from the fallback on, not before
        shaded = [p for p in panels[FALLBACK_SITE].patches if p.get_label() == "fallback period (shaded)"]
        assert len(shaded) == 2  # the fixed default before the day, the default from 0.5 h
    finally:
        plt.close(fig)


def test_violations_are_shaded_and_the_readings_outside_marked(day: tuple[Results, dict]) -> None:
    r, readings = day
    fig = injection_figure(r, readings)
    try:
        panels = _panels(fig)
        spans = [p for p in panels[VIOLATING_SITE].patches if p.get_label() == "sustained violation"]
        assert len(spans) == 1
        marks = [
            ln for ln in panels[VIOLATING_SITE].lines if ln.get_label() == "reading outside the envelope"
        ]
        assert len(marks) == 1
        assert all(0.25 < h <= 0.3 for h in marks[0].get_xdata())
        assert not [ln for ln in panels["wind-25"].lines if ln.get_label() == "reading outside the envelope"]
    finally:
        plt.close(fig)


def test_voltages_are_in_hours_and_name_the_bus_of_the_minimum(day: tuple[Results, dict]) -> None:
    r, _ = day
    half_hours = r.model_copy(update={"dt_h": 0.5})  # hours and interval numbers apart
    fig = voltages_figure(half_hours)
    try:
        ax = fig.axes[0]
        assert "hours" in ax.get_xlabel()
        assert r.realtime is not None
        assert r.realtime.measured_ac is not None
        last_end_h = 0.5 * len(r.realtime.measured_ac.voltage_pu)  # 1.5 h, where interval numbers end at 3
        assert ax.get_xlim()[1] == pytest.approx(last_end_h, abs=0.1)
        v = np.array(r.realtime.measured_ac.voltage_pu)
        bus = r.feeder.bus_ids[int(np.unravel_index(v.argmin(), v.shape)[1])]
        assert any(f"at bus {bus}," in t.get_text() for t in ax.texts)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels.count("a site on a fallback envelope") == labels.count("sustained violation") == 1
    finally:
        plt.close(fig)


def test_overlapping_periods_merge_into_one() -> None:
    from p2pdoe.report.realtime_plots import merged

    assert merged([(2.0, 3.0), (0.0, 1.0), (0.5, 1.5), (1.5, 1.75)]) == [(0.0, 1.75), (2.0, 3.0)]
