"""Interval energy from readings and the settlement of an interval (pure core)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from p2pdoe.core.realtime.settlement import AgreedTrade, IntervalEnergy, settle

T0 = datetime(2026, 6, 21, 12, tzinfo=UTC)


def test_energy_is_the_sum_of_step_means_and_repeats_count_once() -> None:
    e = IntervalEnergy(T0, T0 + timedelta(minutes=15))
    for k in range(1, 181):  # 5 s readings of 120 kW for 15 min
        e.add(T0 + timedelta(seconds=5 * k), 120.0, 5.0)
    e.add(T0 + timedelta(seconds=5 * 180), 999.0, 5.0)  # a duplicate (QoS 1 redelivery)
    assert e.energy_kwh == pytest.approx(30.0)
    assert e.readings == 180
    assert e.complete


def test_a_gap_leaves_the_interval_incomplete_and_outside_readings_are_refused() -> None:
    e = IntervalEnergy(T0, T0 + timedelta(minutes=15))
    e.add(T0 + timedelta(seconds=5), 10.0, 5.0)
    assert not e.complete
    with pytest.raises(ValueError, match="outside"):
        e.add(T0, 10.0, 5.0)  # the end of the previous interval's last step
    with pytest.raises(ValueError, match="outside"):
        e.add(T0 + timedelta(minutes=16), 10.0, 5.0)


def test_trades_are_paid_as_agreed_and_the_rest_goes_to_the_grid() -> None:
    trades = [AgreedTrade("b", 0.0, 20.0, buy_price_eur_per_kwh=0.13, sell_price_eur_per_kwh=0.12)]
    s = settle(T0, measured_kwh=25.0, scheduled_kwh=30.0, trades=trades, price_import=0.25, price_export=0.05)
    assert s.p2p_received_eur == pytest.approx(2.4)
    assert s.grid_kwh == pytest.approx(5.0)  # exported beyond the sale
    assert s.grid_eur == pytest.approx(-0.25)
    assert s.deviation_kwh == pytest.approx(-5.0)
    assert s.net_eur == pytest.approx(-2.65)
    short = settle(
        T0, measured_kwh=10.0, scheduled_kwh=20.0, trades=trades, price_import=0.25, price_export=0.05
    )
    assert short.grid_kwh == pytest.approx(-10.0)  # sold 20, produced 10: the grid supplied the rest
    assert short.grid_eur == pytest.approx(2.5)
