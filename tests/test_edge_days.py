"""An edge agent's rounds for the next day: the configuration of that date (its own intervals on a
23-hour day), the day's start handed to the controller to wait for midnight, and a rolling round
just after midnight counting none of yesterday's flexible energy."""

from __future__ import annotations

import itertools
import time
from datetime import date, datetime, timedelta
from typing import cast

from realtime_helpers import opening_heard

from p2pdoe.core.calendar import Calendar
from p2pdoe.core.cpu import CpuClocks, CpuParts
from p2pdoe.core.edge.commands import DayStarts, SettlementsAgain
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Heard
from p2pdoe.core.realtime.controller import Controller
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import FallbackConfig
from p2pdoe.core.realtime.plant import plant_spec
from p2pdoe.core.schemas.messages import RoundOpen, encode
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

AMS = {"horizon": {"timezone": "Europe/Amsterdam", "start": "2026-03-27T23:00:00Z"}}
S = load_scenario("default", AMS)
CAL = Calendar("Europe/Amsterdam", 3600)
SITE = S.ids.index("town-14")  # 600 kWh of flexible load a day, at most 150 kW
CONFIG = site_config(S, SITE)
SATURDAY, SPRING = date(2026, 3, 28), date(2026, 3, 29)


def opening(start: datetime, intervals: int, name: str) -> Heard:
    return cast(Heard, opening_heard(S, name, start, intervals))


def on_saturday() -> Controller:
    return Controller(
        CONFIG, plant_spec(CONFIG), FallbackConfig(Box(-50, 0), 60.0), CAL.start(SATURDAY), 30.0
    )


def open_round(market: EdgeMarket, heard: Heard, ctl: Controller) -> list[object]:
    msg = market.read(heard)
    assert msg is not None
    return list(market.handle(msg, ctl))


def test_tomorrows_day_ahead_round_takes_its_dates_23_hours_and_hands_its_start_on() -> None:
    market = EdgeMarket(CONFIG, None, time.perf_counter, CpuClocks(time.process_time))
    ctl = on_saturday()
    out = open_round(market, opening(CAL.start(SPRING), 23, "day-ahead-2026-03-29"), ctl)
    (starts,) = [c for c in out if isinstance(c, DayStarts)]
    assert starts.start == CAL.start(SPRING)
    assert starts.config is not None
    assert len(starts.config.community.fixed_load_kw) == 23
    assert market.round is not None
    assert len(market.round.config.community.fixed_load_kw) == 23  # a whole day, not the rest of one
    load = CONFIG.community.fixed_load_kw
    assert market.round.config.community.fixed_load_kw == [*load[:2], *load[3:]]  # no 02:00 that day
    ctl.start_day(starts.start, starts.config)
    assert ctl.day_start == CAL.start(SATURDAY)  # today runs on to midnight


def test_a_rolling_round_just_after_midnight_counts_none_of_yesterdays_flexible_energy() -> None:
    market = EdgeMarket(CONFIG, None, time.perf_counter, CpuClocks(time.process_time))
    ctl = on_saturday()
    ctl.flex_used_kwh = 300.0  # Saturday's
    ctl.last_ts = CAL.start(SPRING) - timedelta(seconds=30)  # the last reading was Saturday's
    open_round(market, opening(CAL.start(SPRING) + timedelta(hours=1), 22, "day-ahead-2026-03-29-rt001"), ctl)
    assert market.round is not None
    # Sunday's energy (600 kWh for 24 h, so 575 for its 23) less what its first hour draws as
    # projected (at most 150 kWh); Saturday's 300 kWh do not count (that would leave at most 275).
    energy = market.round.config.community.flexible_load.energy_kwh
    assert 600.0 * 23 / 24 - 150.0 <= energy <= 600.0 * 23 / 24 + 1e-6


def _of_run(heard: Heard, epoch: str) -> Heard:
    msg = RoundOpen.model_validate_json(heard.payload).model_copy(update={"epoch": epoch})
    return Heard(heard.topic, encode(msg), False)


def test_a_round_opened_by_another_coordinator_run_sends_the_journaled_settlements_again() -> None:
    """A restarted coordinator may have lost the settlements sent before it started: the first
    opening of its run asks for those of the day before the round's day and later; its own later
    openings ask for nothing more."""
    market = EdgeMarket(CONFIG, None, time.perf_counter, CpuClocks(time.process_time))
    ctl = on_saturday()
    hour = CAL.start(SATURDAY) + timedelta(hours=9)

    def again(k: int, epoch: str) -> list[SettlementsAgain]:
        heard = _of_run(opening(hour + timedelta(hours=k), 23 - k, f"day-ahead-2026-03-28-rt{k:03}"), epoch)
        return [c for c in open_round(market, heard, ctl) if isinstance(c, SettlementsAgain)]

    assert again(0, "run-1") == []  # the first run this agent hears of
    assert again(1, "run-1") == []
    assert again(2, "run-2") == [SettlementsAgain(CAL.start(date(2026, 3, 27)))]
    assert again(3, "run-2") == []


def _finish_with_campus(traders: list[str] | None, trial: bool) -> list[object]:
    """A one-iteration round of town-14 and campus-30, opened with `traders` and `trial`, that the
    DSO's grant ends (with campus-30's proposal first where the two trade)."""
    from p2pdoe.core import topics
    from p2pdoe.core.schemas.messages import (
        EnvelopeRequest,
        Grant,
        GrantedEnvelope,
        Proposal,
        ResidualReport,
        TradeProposal,
        decode,
    )  # fmt: skip

    market = EdgeMarket(CONFIG, None, time.perf_counter, CpuClocks(time.process_time))
    heard = opening(CAL.start(SATURDAY), 4, "day-ahead-c01")
    msg = cast(RoundOpen, decode(heard.payload))
    msg = msg.model_copy(update={"sites": ["town-14", "campus-30"], "traders": traders, "trial": trial})
    out = open_round(market, Heard(heard.topic, encode(msg), False), on_saturday())
    zeros = [0.0] * 4
    later: list[Proposal | Grant] = []
    if traders is None or "town-14" in traders:
        trade = TradeProposal(peer="town-14", buy_kw=zeros, sell_kw=zeros)
        box = EnvelopeRequest(lo_kw=[-100.0] * 4, up_kw=zeros)
        later.append(Proposal(round=msg.round, iteration=0, sender="campus-30", trades=[trade], envelope=box))
    residuals = ResidualReport(primal_trade_kw=0, dual_trade_kw=0, primal_envelope_kw=0, dual_envelope_kw=0)
    later.append(Grant(
        round=msg.round, iteration=0, recipient="town-14", status="converged", residuals=residuals,
        envelope=GrantedEnvelope(
            lo_kw=[-150.0] * 4, up_kw=zeros, import_price_eur_per_kwh=zeros, export_price_eur_per_kwh=zeros,
        ),
        next_rho_trade_eur_per_kw2h=1.0, next_rho_envelope_eur_per_kw2h=1.0,
    ))  # fmt: skip
    for m in later:
        topic = (
            topics.grant(m.round, m.recipient) if isinstance(m, Grant) else topics.proposal(m.round, m.sender)
        )
        read = market.read(Heard(topic, encode(m), False))
        assert read is not None
        out += market.handle(read, None)
    return out


def test_only_a_round_in_force_hands_its_plan_to_the_controller() -> None:
    """A trial round (standalone, coalition, bid trial) only measures costs: its envelopes are never
    published, so the controller must not follow its schedule."""
    from p2pdoe.core.edge.market import RoundDone

    for traders, trial in ((None, False), ([], True), (["town-14", "campus-30"], True), (None, True)):
        (done,) = [c for c in _finish_with_campus(traders, trial) if isinstance(c, RoundDone)]
        assert done.outcome.status == "converged"
        assert (done.plan is None) == trial, traders


def test_the_cpu_parts_count_the_steps_and_the_codec_by_the_clock_they_are_given() -> None:
    """Every reading of the thread CPU clock here advances it by 1 s: decoding the opening costs 1,
    the participant's first step 1, encoding its proposal 1; the round's share starts at its
    opening, after the opening's decoding."""
    ticks = itertools.count()
    market = EdgeMarket(
        CONFIG, None, time.perf_counter, CpuClocks(time.process_time, lambda: float(next(ticks)))
    )
    open_round(market, opening(CAL.start(SATURDAY), 24, "day-ahead-2026-03-28"), on_saturday())
    assert market.round is not None
    assert market.cpu_parts == CpuParts(steps_s=1.0, codec_s=2.0)
    assert market.round.parts_at_open == CpuParts(steps_s=0.0, codec_s=1.0)
    assert market.cpu_parts.since(market.round.parts_at_open) == CpuParts(steps_s=1.0, codec_s=1.0)
