"""Nash bargaining on a real-time day, on the virtual clock (p2pdoe.cli.virtual_day): the coordinator
and every edge agent and meter as the services run them, over the in-memory broker. The standalone,
welfare and payment rounds come before the day; the payments equal those of the same machines
in-process, and the day settles on the welfare round and its rolling successors, never on the
standalone round, whose envelopes are never in force. A site that loses its costs mid-bargain leaves
the welfare prices standing, and the day goes on."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path

import pytest

from p2pdoe.cli.jobs import run_policy
from p2pdoe.cli.virtual_day import VirtualDay
from p2pdoe.core import topics
from p2pdoe.core.community import REALTIME_MARGINS
from p2pdoe.core.market import with_margins
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario

pytestmark = pytest.mark.slow

QUARTER_HOURS = {"market": {"design": "nash-bargaining"}, "horizon": {"intervals": 96, "dt_h": 0.25}}


def test_an_hour_under_nash_bargaining_pays_as_in_process_and_settles_on_the_welfare_rounds(
    tmp_path: Path,
) -> None:
    s = load_scenario("default", QUARTER_HOURS)
    results = VirtualDay(s, tmp_path, hours=1.0).run()
    market = results.market
    assert market is not None
    assert market.status == "converged"
    assert market.baseline_round == "day-ahead-standalone"
    own = run_policy(with_margins(s, REALTIME_MARGINS), Policy.DYNAMIC, "admm").market
    assert own is not None
    assert own.iterations == market.iterations
    for site, gain in market.gains_eur.items():
        assert gain == pytest.approx(own.gains_eur[site], abs=1e-6), site
        assert market.net_payment_eur[site] == pytest.approx(own.net_payment_eur[site], abs=1e-6), site
        assert gain == pytest.approx(sum(market.gains_eur.values()) / len(s.ids), abs=1e-3), site
    assert results.realtime is not None
    settled = results.realtime.settlements
    assert len(settled) == 4 * len(s.ids)  # every site, every quarter hour
    assert {x.round for x in settled} <= {"day-ahead", *(f"day-ahead-rt{k:03d}" for k in range(1, 5))}


def test_a_site_that_loses_its_costs_mid_bargain_leaves_the_welfare_prices_standing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """town-14's agent dies as the payment round opens and is back 5 s later without the costs of
    the two rounds: it stays out, the coordinator repeats its opening once, then gives the payments
    up; results.json has no market section, and the day goes on and settles."""
    s = load_scenario("default", QUARTER_HOURS)
    restarted: list[asyncio.Task[None]] = []

    def on_publish(topic: str, payload: bytes, retained: bool) -> None:
        if topic == topics.payment_open("day-ahead-payments") and payload and not restarted:
            day.kill("edge-town-14")

            async def back() -> None:
                await day.clock.sleep_until(day.clock.now() + timedelta(seconds=5))
                day.start_edge("town-14")

            restarted.append(asyncio.ensure_future(back()))

    day = VirtualDay(s, tmp_path, hours=1.0, record=on_publish)
    with caplog.at_level(logging.INFO):
        results = day.run()
    assert restarted
    assert results.market is None
    said = caplog.text
    assert "town-14: payment round day-ahead-payments names rounds it has no cost of" in said
    assert "no payments agreed: no proposal from town-14" in said
    assert results.realtime is not None
    settled = {(x.site, x.interval_start) for x in results.realtime.settlements}
    assert len(settled) == 4 * len(s.ids)
