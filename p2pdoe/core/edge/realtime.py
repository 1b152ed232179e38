"""An edge agent's real-time side, a pure machine around its controller
(p2pdoe.core.realtime.controller): the envelopes it hears and keeps, which one applies (the fallback
rules), the set-points for each meter reading, each interval settled, and what the site reports:
its registration, its status on every switch of envelope or alarm (with how far behind it runs), and
telemetry. Persisting and sending are commands; the shell carries them out.

A meter that falls silent for `meter_silent_s` raises the alarm `meter_silent`, and until readings
return the site is driven blind on its agreed schedule (the set-points the plan gives, whose margins
kept it inside the envelope against the forecast). A reading stamped more than `reading_ahead_s`
after the clock is rejected with the alarm `reading_rejected`: one bad time stamp never blinds the
loop to the readings after it. Faults the shell sees (a journal that refuses writes) come as `Fault`.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import replace
from datetime import datetime, timedelta

from p2pdoe.core import topics
from p2pdoe.core.edge.commands import (
    Actuate,
    DayStarts,
    Durable,
    MeterRead,
    PlanAgreed,
    Restored,
    SaveEnvelope,
    SaveInterval,
    SaveSettlement,
    Telemetry,
)
from p2pdoe.core.effects import Fault, Heard, Send, Woke
from p2pdoe.core.reader import MarketReader
from p2pdoe.core.realtime.controller import Controller, Settled, Step
from p2pdoe.core.realtime.fallback import Choice, describe_switch, is_switch
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    MeterReading,
    Registration,
    SettlementRecord,
    SiteStatus,
)
from p2pdoe.core.schemas.runtime import Telemetry as TelemetryMessage
from p2pdoe.core.site import registration

log = logging.getLogger("edge_agent")
SKEW_STATUSES = 3  # the coordinator's live statuses the clock skew is judged on
Event = Heard | Woke | MeterRead | PlanAgreed | DayStarts | Restored | Fault
Command = Send | Actuate | SaveInterval | SaveEnvelope | SaveSettlement | Durable | Telemetry


def status_payload(
    site: str, state: str, envelope: str, ts: datetime, reason: str | None = None, alarm: str | None = None,
    reading_age_s: float | None = None, envelope_lead_s: float | None = None,
    alarms: list[str] | None = None, faults: dict[str, int] | None = None, instance: str | None = None,
) -> bytes:  # fmt: skip
    msg = SiteStatus(
        site=site, state=state, envelope=envelope, ts=ts, reason=reason, alarm=alarm,  # type: ignore[arg-type]
        reading_age_s=reading_age_s, envelope_lead_s=envelope_lead_s,
        alarms=alarms or [], faults=faults or {}, instance=instance,  # type: ignore[arg-type]
    )  # fmt: skip
    return msg.model_dump_json().encode()


class EdgeRealtime:
    """`speed`: of a scaled clock (a clock skew is judged in wall seconds); `report_every_s`:
    re-check which envelope applies (and whether the meter is silent) this often, simulated seconds;
    `meter_silent_s`, `reading_ahead_s`: see the module's docstring."""

    def __init__(
        self,
        controller: Controller,
        *,
        speed: float = 1.0,
        report_every_s: float = 10.0,
        meter_silent_s: float = 120.0,
        reading_ahead_s: float = 60.0,
        instance: str | None = None,
    ):
        self.controller = controller
        self.config = controller.config
        self.site = self.config.community.id
        self.speed = speed
        self.report_every_s = report_every_s
        self.reader = MarketReader(self.site)
        self.applied = "none"  # which envelope applies: dynamic, default, fixed_default (none: not yet)
        self.readings = 0  # handled
        self._choice: Choice | None = None
        self._choice_at: datetime | None = None  # the moment the choice in force is for
        self._restarted = False  # an interval was resumed from the journal, and no reading came since
        self._tick: datetime | None = None
        self._heard_at: dict[tuple[str, datetime], datetime] = {}  # (kind, start) -> when it came
        self._reading_age_s: float | None = None
        self._skews: deque[float] = deque(maxlen=SKEW_STATUSES)
        self.meter_silent_s = meter_silent_s
        self.reading_ahead_s = reading_ahead_s
        self.alarms: dict[str, str] = {}  # raised now: name -> what happened
        self.faults: Counter[str] = Counter()  # alarms raised since the start
        self._reading_at: datetime | None = None  # when the last reading was handled
        self.instance = instance  # this run's token on its status: another one live is another process

    # --- the shell's questions -------------------------------------------------------------------

    def next_wake(self) -> datetime | None:
        return self._tick

    def holding(self) -> bool:
        return False

    def heavy(self, event: object) -> bool:
        return False

    def snapshot(self) -> Controller:
        """A copy of the controller's state for a round's opening (the market runs off the loop)."""
        c = self.controller
        return replace(c, plans=list(c.plans), means=replace(c.means), book=c.book)

    @property
    def last_reading_ts(self) -> datetime | None:
        return self.controller.last_ts

    # --- events ----------------------------------------------------------------------------------

    def start(
        self, now: datetime, saved: Restored | None = None, registered: Registration | None = None
    ) -> list[Command]:
        """Registered (`registered`, default: the configured day's ranges), and the envelope that
        applies on the status; `saved`: what the journal kept of a previous run, taken first (so a
        restart's first status is its saved default, not nothing)."""
        if saved is not None:
            self._restore(saved, now)
        reg = (registered or registration(self.config)).model_dump_json().encode()
        self._tick = now + timedelta(seconds=self.report_every_s)
        log.info("%s: registered at bus %d; waiting for a round", self.site, self.config.community.bus)
        return [Send(topics.site(self.site, "register"), reg, state=True), *self._report_state(now)]

    def handle(self, event: Event, now: datetime) -> list[Command]:
        if isinstance(event, MeterRead):
            return self._reading(event.reading, now)
        if isinstance(event, Heard):
            return self._heard(event, now)
        if isinstance(event, Woke):
            self._tick = now + timedelta(seconds=self.report_every_s)
            return self._watch_meter(now) + self._report_state(now)
        if isinstance(event, Fault):
            return self._alarm(event.name, event.detail, now)
        if isinstance(event, PlanAgreed):
            self.controller.adopt(event.plan)
            return self._report_state(now)
        if isinstance(event, DayStarts):
            self.controller.start_day(event.start, event.config)
            return []
        self._restore(event, now)
        return self._report_state(now)

    def _heard(self, m: Heard, now: datetime) -> list[Command]:
        parsed = topics.parse(m.topic)
        if parsed is not None and parsed.area == "site" and parsed.kind in ("doe", "doe/default"):
            return self._envelope(parsed.kind, m.payload, now)
        if parsed is not None and parsed.area == "dso" and parsed.kind == "status":
            return self._dso_status(m, now)
        if parsed is not None and parsed.area == "site" and parsed.kind == "status" and not m.retained:
            return self._own_status(m, now)
        return []

    def _own_status(self, m: Heard, now: datetime) -> list[Command]:
        """A live status of this site from another run: two edge agents for one site."""
        msg = self.reader.runtime(m.payload)
        if not isinstance(msg, SiteStatus) or msg.site != self.site or msg.state != "online":
            return []
        if self.instance is None or msg.instance in (None, self.instance):
            return []
        why = f"another edge agent for {self.site} runs (instance {msg.instance}; this one: {self.instance})"
        return self._alarm("duplicate_process", why, now)

    # --- envelopes and the coordinator -----------------------------------------------------------

    def _envelope(self, kind: str, payload: bytes, now: datetime) -> list[Command]:
        if not payload:
            return []  # a withdrawn retained envelope: the cached one stands until it expires
        doe = self.reader.runtime(payload)
        if doe is None:
            return []
        # a `doe` without a round is the coordinator's default for a site a round left out: taken
        if not isinstance(doe, Doe) or doe.site != self.site or (kind == "doe/default" and doe.round):
            self.reader.dropped["sender_not_topic"] += 1
            return []
        self._file(kind, doe)
        self._heard_at.setdefault((kind, doe.start), now)
        book = self.controller.book
        keep = {f"doe@{d.start.isoformat()}" for d in book.dynamic.values()}
        if book.default is not None:
            keep.add(f"doe/default@{book.default.start.isoformat()}")
        log.info(
            "%s: %s [%.1f, %.1f] kW from %s", self.site, kind, doe.lo_kw, doe.up_kw, doe.start.isoformat()
        )
        save = SaveEnvelope(f"{kind}@{doe.start.isoformat()}", payload, frozenset(keep))
        return [save, *self._report_state(now)]

    def _file(self, kind: str, doe: Doe) -> None:
        if kind == "doe/default":
            self.controller.book.set_default(doe)
        else:
            self.controller.book.add(doe)

    def _dso_status(self, m: Heard, now: datetime) -> list[Command]:
        msg = self.reader.runtime(m.payload)
        if msg is None:
            return []
        if not isinstance(msg, DsoStatus):
            self.reader.dropped["sender_not_topic"] += 1
            return []
        live = not m.retained and msg.state == "online"  # live: its time stamp tells the skew
        self.controller.heard_coordinator(msg.state == "online", self._skew_s(now, msg) if live else None)
        return self._report_state(now)

    def _skew_s(self, now: datetime, msg: DsoStatus) -> float:
        """The clock skew (wall seconds): the least of the last few statuses' (now - ts), since a
        message's delay (an outage, a republished status) only adds to it, whatever the skew's sign."""
        self._skews.append((now - msg.ts).total_seconds() / self.speed)
        return min(self._skews)

    def _report_state(self, now: datetime) -> list[Command]:
        """Which envelope applies now (status, on a switch) and, without a meter, the telemetry."""
        choice = self.controller.choose_at(now)
        out = self._switch(choice, now)
        return out if self.readings else out + self._schedule_telemetry(choice, now)

    def _switch(self, choice: Choice, now: datetime, at: datetime | None = None) -> list[Command]:
        """A switch goes out on the status in the background, so control never waits for a broker
        that is away (the transport publishes the latest again on reconnect). `at`: the moment the
        choice is for (default `now`); a choice older than the one in force (a reading stamped
        before the clock's last look, at an interval's boundary) never switches back."""
        at = now if at is None else at
        if self._choice_at is not None and at < self._choice_at:
            return []
        self._choice_at = at
        previous = self._choice
        if not is_switch(previous, choice):
            self._choice = choice
            return []
        self._choice = choice
        log.info("%s: envelope %s", self.site, describe_switch(previous, choice))
        self.applied = choice.kind
        return [self.status(now)]

    def status(self, now: datetime, state: str = "online") -> Send:
        c = self._choice
        skew = None if c is None else c.alarm
        alarms = sorted({*self.alarms, *([skew] if skew else [])})
        payload = status_payload(
            self.site, state, self.applied if state == "online" else "none", now,
            None if c is None else c.reason, skew, self._reading_age_s, self._lead_s(now),
            alarms, dict(self.faults), self.instance,
        )  # fmt: skip
        return Send(topics.site(self.site, "status"), payload, state=True, wait=False)

    # --- alarms ----------------------------------------------------------------------------------

    def _alarm(self, name: str, detail: str | None, now: datetime) -> list[Command]:
        """Raise (`detail`) or clear (None) an alarm; the status goes out when it changes."""
        if detail is None:
            if self.alarms.pop(name, None) is None:
                return []
            log.warning("%s: alarm %s cleared", self.site, name)
        else:
            if name in self.alarms:
                self.alarms[name] = detail
                return []
            self.alarms[name] = detail
            self.faults[name] += 1
            log.error("%s: alarm %s: %s", self.site, name, detail)
        return [self.status(now)]

    def _watch_meter(self, now: datetime) -> list[Command]:
        """A meter heard once and silent since `meter_silent_s`: the alarm, and the schedule's
        set-points while it lasts."""
        heard = self._reading_at
        if heard is None or (now - heard).total_seconds() < self.meter_silent_s:
            return []
        silent_s = (now - heard).total_seconds()
        out = self._alarm("meter_silent", f"no meter reading for {silent_s:.0f} s", now)
        return [*out, Actuate(self.controller.blind_set_points(now), now)]

    def _lead_s(self, now: datetime) -> float | None:
        """How far ahead of its start the dynamic envelope in force came (simulated seconds)."""
        doe = self.controller.book.dynamic_at(now)
        heard = None if doe is None else self._heard_at.get(("doe", doe.start))
        return None if doe is None or heard is None else (doe.start - heard).total_seconds()

    def _schedule_telemetry(self, choice: Choice, now: datetime) -> list[Command]:
        """Before any meter reading: the scheduled net injection now, against the envelope in force."""
        plan = self.controller.plan_at(now)
        t = None if plan is None else plan.index(now)
        if plan is None or t is None:
            return []
        p_kw = float(plan.net_kw[t])
        msg = TelemetryMessage(
            site=self.site, ts=now, source="schedule", p_kw=p_kw, envelope=choice.kind, lo_kw=choice.lo_kw,
            up_kw=choice.up_kw, inside=choice.box.excess_kw(p_kw) == 0.0, round=plan.round,
        )  # fmt: skip
        payload = msg.model_dump_json().encode()
        return [Send(topics.site(self.site, "telemetry"), payload, qos=0, wait=False)]

    # --- the meter -------------------------------------------------------------------------------

    def _reading(self, r: MeterReading, now: datetime) -> list[Command]:
        ahead_s = (r.ts - now).total_seconds()
        if ahead_s > self.reading_ahead_s:
            why = f"a reading stamped {r.ts.isoformat()}, {ahead_s:.0f} s ahead of the clock"
            self.alarms.pop("reading_rejected", None)  # a new one raises it again
            return self._alarm("reading_rejected", why, now)
        self._after_restart(r)
        step = self.controller.on_reading(r)
        if step is None:
            return []
        self.readings += 1
        self._reading_age_s = (now - r.ts).total_seconds()
        self._reading_at = now
        out: list[Command] = self._alarm("meter_silent", None, now) + self._alarm(
            "reading_rejected", None, now
        )
        out.append(Actuate(step.set_points, r.ts))
        if step.settled is not None:  # journaled before the next interval's first reading, so a
            out += self._settled(step.settled)  # crash between the two never leaves it unsettled
        out += self._journal_step(step)
        out += self._switch(step.choice, now, at=r.ts)
        return [*out, self._telemetry(r, step)]

    def _after_restart(self, r: MeterReading) -> None:
        """The first reading after a restart counts its own step only, like a fresh agent's first
        reading: the readings the meter gave while the agent was not running are missing from the
        interval's coverage (its settlement's `covered_s` shows it), not estimated from this one."""
        last = self.controller.last_ts
        if not self._restarted or last is None or r.ts <= last:
            return  # nothing resumed, or a repeated reading (the controller drops it)
        self._restarted = False
        self.controller.count_from(r.ts)

    def _journal_step(self, step: Step) -> list[Command]:
        e = self.controller.energy
        if e is None:
            return []
        plan = step.plan
        k = None if plan is None else plan.index(e.start)
        scheduled = None if plan is None or k is None else plan.scheduled_kwh(k)
        c = step.choice
        state = {"flex_used_kwh": repr(self.controller.flex_used_kwh)}
        return [SaveInterval(e, scheduled, c.kind, c.lo_kw, c.up_kw, state)]

    def _settled(self, done: Settled) -> list[Command]:
        """Queued to send first, then journaled as settled: a crash between the two leaves the
        interval unsettled in the journal, so the restart settles it again (a repeat the coordinator
        replaces), never a settlement journaled but never sent."""
        s, e, choice = done.settlement, done.energy, done.choice
        record = SettlementRecord(
            site=self.site, interval_start=s.interval_start, duration_s=self.controller.dt_s,
            round=done.round,
            measured_kwh=s.measured_kwh, scheduled_kwh=s.scheduled_kwh, deviation_kwh=s.deviation_kwh,
            p2p_paid_eur=s.p2p_paid_eur, p2p_received_eur=s.p2p_received_eur, grid_kwh=s.grid_kwh,
            grid_eur=s.grid_eur, net_eur=s.net_eur, readings=e.readings, covered_s=e.covered_s,
            envelope="none" if choice is None else choice.kind,
            lo_kw=None if choice is None else choice.lo_kw, up_kw=None if choice is None else choice.up_kw,
        )  # fmt: skip
        log.info(
            "%s: settled %s: %.2f kWh measured, %.2f scheduled, %.2f EUR",
            self.site, s.interval_start.isoformat(), s.measured_kwh, s.scheduled_kwh, s.net_eur,
        )  # fmt: skip
        plan = self.controller.plan_at(e.start)
        k = None if plan is None else plan.index(e.start)
        trades = [] if plan is None or k is None else plan.trades(k)
        payload = record.model_dump_json().encode()
        return [
            Durable(topics.site(self.site, "settlement"), payload),
            SaveSettlement(s, None if plan is None else plan.round, trades, payload),
        ]

    def _telemetry(self, r: MeterReading, step: Step) -> Telemetry:
        j, comp = step.judged, step.compliance
        msg = TelemetryMessage(
            site=self.site, ts=r.ts, source="meter", p_kw=r.p_kw, envelope=j.kind, lo_kw=j.lo_kw,
            up_kw=j.up_kw, inside=step.excess_kw == 0.0, round=None if step.plan is None else step.plan.round,
            excess_kw=step.excess_kw, actions=[a.lever for a in comp.actions], predicted_kw=comp.predicted_kw,
            residual_kw=comp.residual_kw, soc_kwh=r.soc_kwh,
        )  # fmt: skip
        return Telemetry(topics.site(self.site, "telemetry"), msg.model_dump_json().encode())

    # --- a restart -------------------------------------------------------------------------------

    def _restore(self, saved: Restored, now: datetime) -> None:
        """What a previous run saved: the envelopes heard (so the saved default applies at once) and
        the interval that was under way: the day's latest with readings and no settlement. Resumed
        whether it still runs (its accumulation goes on) or is over (the first reading settles it with
        what was measured before the stop), so a stop never loses an interval's settlement."""
        for key, payload in saved.envelopes:
            doe = self.reader.runtime(payload)
            if isinstance(doe, Doe) and doe.site == self.site:
                self._file(key.split("@", 1)[0], doe)
        ctl = self.controller
        unsettled = [
            e for e in saved.intervals if e.start not in saved.settled and ctl.day_start <= e.start <= now
        ]
        if unsettled:
            energy = unsettled[-1]
            ctl.resume(energy, saved.flex_used_kwh or 0.0)
            self._restarted = True
            log.info("%s: resumed interval %s from the journal", self.site, energy.start.isoformat())
        elif saved.flex_used_kwh is not None:
            ctl.resume(None, saved.flex_used_kwh)
