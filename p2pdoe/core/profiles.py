"""Deterministic profile generators: per-unit shapes sampled at interval midpoints (clock hours).

Noise is drawn at hourly knots from a seeded generator and interpolated, so 24 x 1 h and
96 x 15 min of the same seed describe the same day.
"""

from __future__ import annotations

import numpy as np

from p2pdoe.core.network import FloatArray

# Hourly knots (value at hh:30), peak 1.0.
_SHAPES: dict[str, list[float]] = {
    "residential": [
        0.45,
        0.40,
        0.38,
        0.37,
        0.38,
        0.45,
        0.60,
        0.72,
        0.68,
        0.60,
        0.55,
        0.55,
        0.56,
        0.54,
        0.53,
        0.56,
        0.65,
        0.82,
        0.95,
        1.00,
        0.95,
        0.82,
        0.66,
        0.52,
    ],
    "commercial": [
        0.35,
        0.33,
        0.32,
        0.32,
        0.33,
        0.38,
        0.50,
        0.72,
        0.88,
        0.95,
        1.00,
        1.00,
        0.97,
        0.98,
        0.99,
        0.96,
        0.90,
        0.78,
        0.62,
        0.50,
        0.44,
        0.40,
        0.38,
        0.36,
    ],
    "evening": [
        0.10,
        0.05,
        0.02,
        0.02,
        0.02,
        0.02,
        0.05,
        0.10,
        0.10,
        0.10,
        0.10,
        0.10,
        0.10,
        0.10,
        0.10,
        0.15,
        0.35,
        0.70,
        0.95,
        1.00,
        0.90,
        0.70,
        0.45,
        0.25,
    ],
    "flat": [1.0] * 24,
}


def load_shape(name: str, hours: FloatArray, noise: float = 0.0, seed: int = 0) -> FloatArray:
    knots = np.asarray(_SHAPES[name])
    base = _cyclic_interp(hours, knots)
    return np.asarray(np.clip(base * (1.0 + noise * _smooth_noise(hours, seed)), 0.0, None))


def pv_shape(
    hours: FloatArray, sunrise_h: float, sunset_h: float, cloudiness: float, seed: int
) -> FloatArray:
    day = max(sunset_h - sunrise_h, 1e-9)
    phase = np.clip((hours - sunrise_h) / day, 0.0, 1.0)
    clear = np.sin(np.pi * phase) ** 1.3
    clouds = 1.0 - cloudiness * np.abs(_smooth_noise(hours, seed))
    return np.asarray(np.clip(clear * clouds, 0.0, 1.0))


def wind_shape(hours: FloatArray, mean_speed_m_s: float, seed: int) -> FloatArray:
    """Per-unit output of a turbine (cut-in 3, rated 12, cut-out 25 m/s) under a seeded AR(1) wind."""
    rng = np.random.default_rng(seed)
    knots = np.empty(25)
    knots[0] = mean_speed_m_s
    for i in range(1, 25):
        knots[i] = mean_speed_m_s + 0.85 * (knots[i - 1] - mean_speed_m_s) + 1.6 * rng.standard_normal()
    speed = np.clip(np.interp(hours, np.arange(25.0), knots), 0.0, None)
    power = (speed**3 - 3.0**3) / (12.0**3 - 3.0**3)
    power = np.where(speed >= 25.0, 0.0, power)
    return np.asarray(np.clip(power, 0.0, 1.0))


def resample(values: FloatArray, intervals: int) -> FloatArray:
    """Repeat each value so that `values` covers `intervals` (its length must divide it)."""
    n = values.shape[0]
    if n == 0 or intervals % n != 0:
        raise ValueError(f"a profile of {n} values cannot cover {intervals} intervals")
    return np.repeat(values, intervals // n)


def by_clock_hour(values: FloatArray, hours: FloatArray) -> FloatArray:
    """`values` spread evenly over a 24 h day, read at local clock `hours` (a repeated hour repeats
    its values, a skipped one is skipped). On a 24 h day this is `resample` to len(hours)."""
    n = values.shape[0]
    k = np.minimum((np.asarray(hours) * n / 24.0).astype(int), n - 1)
    return np.asarray(values[k])


def _cyclic_interp(hours: FloatArray, knots: FloatArray) -> FloatArray:
    x = np.arange(len(knots) + 1) + 0.5
    y = np.append(knots, knots[0])
    h = np.where(hours < 0.5, hours + 24.0, hours)
    return np.asarray(np.interp(h, x, y))


def _smooth_noise(hours: FloatArray, seed: int) -> FloatArray:
    """Zero-mean noise of unit scale, drawn at hourly knots and interpolated."""
    rng = np.random.default_rng(seed)
    knots = rng.standard_normal(25)
    return np.asarray(np.interp(hours, np.arange(25.0), knots))
