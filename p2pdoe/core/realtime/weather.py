"""Seeded, reproducible forecast errors at meter resolution: actual = forecast (held per interval)
times an error factor.

- PV: passing clouds (a two-state clear/cloudy Markov chain in continuous time; each cloudy spell
  has its own transmittance) times a small AR(1) noise. Clouds only remove energy, so actual PV
  falls short of the forecast on average, by about `ErrorModel.expected_pv_factor`.
- Wind: a multiplicative AR(1) with mean 1 plus occasional gusts (Poisson arrivals).
- Load: a multiplicative AR(1) with mean 1.

Each quantity draws from its own sub-stream of `SeedSequence(seed)`, so changing one model's
parameters leaves the other series unchanged. Clouds and gusts are averaged over each sample's
window (exact for their step shapes); the AR(1) noises are sampled at the window starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from p2pdoe.core.network import FloatArray
from p2pdoe.core.realtime.plant import Resources

_BATCH = 64  # cloud spells drawn at a time (a fixed size keeps the sequence reproducible)


@dataclass(frozen=True)
class ErrorModel:
    """Forecast errors of a sunny day with scattered cumulus, a moderately turbulent wind and a
    community-sized load (dozens of households). Times in seconds or minutes as named."""

    # Cumulus shadows pass in a few minutes (a 1-2 km cloud at 5-10 m/s); 40 min clear / 8 min
    # cloudy shades about 17 % of the time.
    clear_minutes: float = 40.0
    cloudy_minutes: float = 8.0
    # Clear-sky index under a cumulus shadow: about 0.3 under thick cores, 0.8 under thin edges.
    cloudy_transmittance: tuple[float, float] = (0.3, 0.8)
    # Residual irradiance error in clear spells (haze, module temperature): 2 %, about a minute.
    pv_noise_sigma: float = 0.02
    pv_noise_tau_s: float = 60.0
    # Wind power fluctuates by about 10 % within the hour (turbulence intensity 10-15 %, smoothed
    # by the rotor), decorrelating over minutes.
    wind_sigma: float = 0.10
    wind_tau_s: float = 300.0
    # Gusts: a few an hour, +3 % to +20 % power for about 20 s (gusts last seconds; the rotor's
    # inertia stretches their effect on power).
    gusts_per_hour: float = 4.0
    gust_gain: tuple[float, float] = (0.03, 0.20)
    gust_s: float = 20.0
    # Appliance switching averages out over dozens of households to a few % of the aggregate.
    load_sigma: float = 0.04
    load_tau_s: float = 180.0
    # PV and wind never exceed their interval forecast times this: room for cloud-edge enhancement
    # (briefly 1.2-1.5x clear sky) and gusts, without unbounded noise tails.
    cap_factor: float = 1.2

    def __post_init__(self) -> None:
        positive = (self.clear_minutes, self.cloudy_minutes, self.pv_noise_tau_s, self.wind_tau_s)
        if not all(x > 0 for x in (*positive, self.load_tau_s, self.gust_s)):
            raise ValueError("an error model's durations must be positive")
        if not all(x >= 0 for x in (self.pv_noise_sigma, self.wind_sigma, self.load_sigma)):
            raise ValueError("an error model's sigmas must be >= 0")
        if not self.gusts_per_hour >= 0:
            raise ValueError("gusts_per_hour must be >= 0")
        low, high = self.cloudy_transmittance
        if not 0 <= low <= high <= 1:
            raise ValueError("cloudy_transmittance needs 0 <= low <= high <= 1")
        if not 0 <= self.gust_gain[0] <= self.gust_gain[1]:
            raise ValueError("gust_gain needs 0 <= low <= high")
        if not self.cap_factor >= 1:
            raise ValueError("cap_factor must be >= 1")

    @property
    def cloudy_fraction(self) -> float:
        """The share of time shaded, in the long run."""
        return self.cloudy_minutes / (self.clear_minutes + self.cloudy_minutes)

    @property
    def expected_pv_factor(self) -> float:
        """Long-run mean of actual over forecast PV (before the cap, which rarely binds)."""
        mean_transmittance = sum(self.cloudy_transmittance) / 2.0
        return 1.0 - self.cloudy_fraction * (1.0 - mean_transmittance)


@dataclass(frozen=True)
class Actuals:
    """Actual values at `step_s` resolution; sample k holds over [k step_s, (k+1) step_s)."""

    step_s: float
    pv_kw: FloatArray
    wind_kw: FloatArray
    fixed_load_kw: FloatArray

    @property
    def samples(self) -> int:
        return int(self.pv_kw.shape[0])

    @property
    def horizon_s(self) -> float:
        return self.samples * self.step_s

    def at(self, t_s: float) -> Resources:
        """The sample in force at simulated second t_s since the horizon start."""
        if not 0 <= t_s < self.horizon_s:
            raise ValueError(f"t_s={t_s} lies outside the horizon [0, {self.horizon_s}) s")
        k = min(math.floor(t_s / self.step_s + 1e-9), self.samples - 1)
        return Resources(
            pv_kw=float(self.pv_kw[k]),
            wind_kw=float(self.wind_kw[k]),
            fixed_load_kw=float(self.fixed_load_kw[k]),
        )


def actuals(
    forecast_pv: FloatArray,
    forecast_wind: FloatArray,
    forecast_load: FloatArray,
    dt_h: float,
    step_s: float,
    seed: int,
    model: ErrorModel = ErrorModel(),
) -> Actuals:
    """Actual PV, wind and fixed load over the horizon at `step_s` resolution (seeded)."""
    held = _held(_checked_forecasts(forecast_pv, forecast_wind, forecast_load), dt_h, step_s)
    n = held.shape[1]
    pv_seq, wind_seq, load_seq = np.random.SeedSequence(seed).spawn(3)
    pv = held[0] * _pv_factor(model, pv_seq, n, step_s)
    wind = held[1] * _wind_factor(model, wind_seq, n, step_s)
    load = held[2] * (1.0 + _ar1(_rng(load_seq), n, step_s, model.load_sigma, model.load_tau_s))
    return Actuals(
        step_s=step_s,
        pv_kw=np.clip(pv, 0.0, model.cap_factor * held[0]),
        wind_kw=np.clip(wind, 0.0, model.cap_factor * held[1]),
        fixed_load_kw=np.clip(load, 0.0, None),
    )


def _checked_forecasts(pv: FloatArray, wind: FloatArray, load: FloatArray) -> FloatArray:
    shapes = {np.shape(pv), np.shape(wind), np.shape(load)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or np.size(pv) == 0:
        raise ValueError(f"forecasts must be non-empty 1-D arrays of one length, not shapes {shapes}")
    stacked = np.asarray([pv, wind, load], dtype=np.float64)
    if not (np.all(np.isfinite(stacked)) and np.all(stacked >= 0)):
        raise ValueError("forecasts must be finite and >= 0")
    return stacked


def _held(forecasts: FloatArray, dt_h: float, step_s: float) -> FloatArray:
    """Each interval's forecast repeated over the samples that start in it, shape (3, samples)."""
    intervals = forecasts.shape[1]
    interval_s = dt_h * 3600.0
    if not (interval_s > 0 and step_s > 0):
        raise ValueError(f"dt_h and step_s must be positive, not {dt_h} and {step_s}")
    n = intervals * interval_s / step_s
    if abs(n - round(n)) > 1e-9 * max(n, 1.0) or round(n) < 1:
        raise ValueError(f"step_s={step_s} does not divide the horizon of {intervals} x {interval_s} s")
    starts = np.arange(round(n)) * step_s
    interval = np.minimum(np.floor(starts / interval_s + 1e-9).astype(np.int64), intervals - 1)
    return np.asarray(forecasts[:, interval])


def _pv_factor(model: ErrorModel, seq: np.random.SeedSequence, n: int, step_s: float) -> FloatArray:
    clouds_seq, noise_seq = seq.spawn(2)
    transmittance = _clouds(model, _rng(clouds_seq), n * step_s)
    noise = _ar1(_rng(noise_seq), n, step_s, model.pv_noise_sigma, model.pv_noise_tau_s)
    return _window_means(*transmittance, _edges(n, step_s)) * (1.0 + noise)


def _wind_factor(model: ErrorModel, seq: np.random.SeedSequence, n: int, step_s: float) -> FloatArray:
    ar_seq, gust_seq = seq.spawn(2)
    noise = _ar1(_rng(ar_seq), n, step_s, model.wind_sigma, model.wind_tau_s)
    gusts = _window_means(*_gusts(model, _rng(gust_seq), n * step_s), _edges(n, step_s))
    return 1.0 + noise + gusts


def _clouds(model: ErrorModel, rng: np.random.Generator, horizon_s: float) -> tuple[FloatArray, FloatArray]:
    """Alternating clear and cloudy spells with exponential durations, starting in the stationary
    distribution: (breaks, transmittance per spell) covering [0, horizon_s]."""
    cloudy = bool(rng.random() < model.cloudy_fraction)
    durations: list[float] = []
    values: list[float] = []
    while sum(durations) < horizon_s:
        draws = rng.random((_BATCH, 3))  # per spell: clear, cloudy, transmittance
        for clear_u, cloudy_u, t_u in draws:
            mean_min = model.cloudy_minutes if cloudy else model.clear_minutes
            durations.append(-60.0 * mean_min * math.log1p(-(cloudy_u if cloudy else clear_u)))
            values.append(_transmittance(model, t_u) if cloudy else 1.0)
            cloudy = not cloudy
    breaks = np.concatenate(([0.0], np.cumsum(durations)))
    return breaks, np.asarray(values)


def _transmittance(model: ErrorModel, u: float) -> float:
    low, high = model.cloudy_transmittance
    return low + (high - low) * u


def _gusts(model: ErrorModel, rng: np.random.Generator, horizon_s: float) -> tuple[FloatArray, FloatArray]:
    """Poisson gusts as rectangular gain pulses: (breaks, summed gain per piece) over [0, horizon_s]."""
    count = int(rng.poisson(model.gusts_per_hour * horizon_s / 3600.0))
    starts = rng.uniform(0.0, horizon_s, count)
    gains = rng.uniform(*model.gust_gain, count)
    times = np.concatenate((starts, starts + model.gust_s))
    steps = np.concatenate((gains, -gains))
    order = np.argsort(times, kind="stable")
    breaks = np.concatenate(([0.0], times[order], [max(horizon_s, float(times.max(initial=0.0)))]))
    levels = np.concatenate(([0.0], np.cumsum(steps[order])))
    return breaks, levels


def _window_means(breaks: FloatArray, values: FloatArray, edges: FloatArray) -> FloatArray:
    """Mean over each [edges[k], edges[k+1]) of the step function equal to values[i] on
    [breaks[i], breaks[i+1]); its integral is piecewise linear, so interpolating it is exact."""
    integral = np.concatenate(([0.0], np.cumsum(values * np.diff(breaks))))
    return np.asarray(np.diff(np.interp(edges, breaks, integral)) / np.diff(edges))


def _edges(n: int, step_s: float) -> FloatArray:
    return np.arange(n + 1, dtype=np.float64) * step_s


def _ar1(rng: np.random.Generator, n: int, step_s: float, sigma: float, tau_s: float) -> FloatArray:
    """A stationary AR(1) of standard deviation sigma and correlation time tau_s, sampled every step_s."""
    phi = math.exp(-step_s / tau_s)
    shocks = rng.standard_normal(n) * sigma * math.sqrt(1.0 - phi**2)
    shocks[0] = sigma * rng.standard_normal()  # start in the stationary distribution
    return np.asarray(lfilter([1.0], [1.0, -phi], shocks), dtype=np.float64)


def _rng(seq: np.random.SeedSequence) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seq))
