"""What every part of the coordinator's machine shares and never changes: its configuration, its
network, the default envelopes, the day's start and the rules it decides by; and the envelope
messages built from them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from p2pdoe.core import topics
from p2pdoe.core.agreement.coordination import Defaults, RoundSetup
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.effects import Send
from p2pdoe.core.network import Feeder
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.runtime import Doe


@dataclass(frozen=True)
class Rules:
    """The coordinator's settings that its decisions follow (p2pdoe's dso-coordinator options)."""

    round: str = "day-ahead"
    registration_timeout_s: float = 30.0
    iteration_timeout_s: float = 10.0
    report_timeout_s: float = 10.0
    max_attempts: int = 3
    exit_after_round: bool = False
    rolling: bool = False
    rolling_stop_fraction: float = 0.5
    rolling_max_iterations: int = 200
    straggler_wait: float = 1.0  # bounded staleness: wait for the last proposals this times the rest's
    meter_step_s: float = 5.0
    hours: float | None = None
    exit_after_day: bool = False
    checkpoint: bool = False


@dataclass(frozen=True)
class Context:
    cfg: CoordinatorConfig  # with the day's start and policy
    feeder: Feeder
    defaults: Defaults
    start: datetime
    rules: Rules
    epoch: str | None = None  # this run of the coordinator, on every opening

    @property
    def site_ids(self) -> list[str]:
        return [s.id for s in self.cfg.sites]

    @property
    def interval_s(self) -> int:
        return round(self.cfg.dt_h * 3600)

    def interval_start(self, t: int) -> datetime:
        return self.start + timedelta(seconds=self.interval_s * t)

    def current_interval(self, now: datetime) -> int:
        """The interval in force at `now`, clamped to the horizon."""
        t = int((now - self.start).total_seconds() // self.interval_s)
        return min(max(t, 0), self.cfg.intervals - 1)

    def last_interval(self) -> int:
        """One past the real-time day's last interval (`hours` of it, at most the horizon)."""
        hours = self.rules.hours
        n = self.cfg.intervals
        return n if hours is None else min(n, round(hours * 3600 / self.interval_s))

    def default_envelope(self, site: str) -> Doe:
        """The site's default for the whole day (retained): a profile of boxes, or one box."""
        c = self.defaults.sites.index(site)
        lo, up = self.defaults.lo_kw[c], self.defaults.up_kw[c]
        if self.cfg.default_profile:
            return Doe.from_profile(site, self.start, self.interval_s, lo.tolist(), up.tolist())
        return Doe.from_box(
            site, None, self.start, self.interval_s * self.cfg.intervals, float(lo[0]), float(up[0])
        )

    def default_at(self, site: str, t: int) -> Doe:
        """The site's default box of interval t, as that interval's envelope."""
        c = self.defaults.sites.index(site)
        lo, up = float(self.defaults.lo_kw[c, t]), float(self.defaults.up_kw[c, t])
        return Doe.from_box(site, None, self.interval_start(t), self.interval_s, lo, up)

    def envelope(self, setup: RoundSetup, outcome: DsoOutcome, site: str, t: int) -> Doe:
        """Interval t's envelope of `site`: its grant (column t of a day-long round), or its default if
        the round left it out."""
        lo_kw, up_kw = outcome.granted_lo_kw, outcome.granted_up_kw
        if site in setup.sites and lo_kw is not None and up_kw is not None:
            c = setup.sites.index(site)
            lo, up = float(lo_kw[c, t]), float(up_kw[c, t])
            return Doe.from_box(site, outcome.round, self.interval_start(t), self.interval_s, lo, up)
        return self.default_at(site, t)


def doe_send(kind: str, doe: Doe) -> Send:
    """Retained, published again after a reconnect, expiring at the end of its validity."""
    return Send(topics.site(doe.site, kind), doe.model_dump_json().encode(), state=True, until=doe.end)
