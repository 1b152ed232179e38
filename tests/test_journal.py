"""The edge agent's journal: records survive a SIGKILL, a restarted agent resumes an interval, the
telemetry outbox keeps order until delivery, and a journal refuses another site."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.journal import Journal, JournalError
from p2pdoe.core.realtime.settlement import AgreedTrade, IntervalEnergy, Settlement, settle

T0 = datetime(2026, 6, 21, 12, tzinfo=UTC)


def test_an_interval_resumes_where_it_was_saved(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "solar-18")
    e = IntervalEnergy(T0, T0 + timedelta(minutes=15))
    e.add(T0 + timedelta(seconds=5), 60.0, 5.0)
    j.save_interval(e, 25.0, "dynamic", -10.0, 100.0)
    j.close()
    again = Journal(tmp_path / "j.db", "solar-18").load_interval(T0)
    assert again == e
    assert again is not None
    again.add(T0 + timedelta(seconds=5), 60.0, 5.0)  # the same reading redelivered after the restart
    assert again.readings == 1


def test_settlements_and_trades_round_trip(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a")
    trades = [AgreedTrade("b", 1.0, 0.0, 0.1, 0.09), AgreedTrade("c", 0.0, 2.0, 0.12, 0.11)]
    j.save_trades("day-ahead", T0, trades)
    s = settle(T0, 3.0, 2.5, trades, 0.25, 0.05)
    j.save_settlement(s)
    j.save_settlement(s)  # idempotent per interval
    assert j.settlements() == [s]


def test_the_settlement_messages_are_kept_to_send_again_from_a_moment_on(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a")
    for h in range(3):
        start = T0 + timedelta(hours=h)
        j.save_settlement(settle(start, 1.0, 1.0, [], 0.25, 0.05), f"sent {h}".encode())
    j.save_settlement(settle(T0 + timedelta(hours=1), 2.0, 1.0, [], 0.25, 0.05), b"sent 1 again")
    assert j.settlement_messages() == [b"sent 0", b"sent 1 again", b"sent 2"]
    assert j.settlement_messages(T0 + timedelta(hours=1)) == [b"sent 1 again", b"sent 2"]
    j.close()
    assert Journal(tmp_path / "j.db", "a").settlement_messages(T0 + timedelta(hours=2)) == [b"sent 2"]


def test_a_new_day_forgets_what_is_older_than_the_retention(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a", retention_days=2)
    for d in range(5):
        start = T0 + timedelta(days=d)
        j.save_interval(
            IntervalEnergy(start, start + timedelta(hours=1), 1.0, 1, 3600.0, None), 1.0, "dynamic", 0, 1, {}
        )
        j.save_trades("day-ahead", start, [AgreedTrade("b", 1.0, 0.0, 0.1, 0.09)])
        j.save_settlement(settle(start, 1.0, 1.0, [], 0.25, 0.05), b"sent")
    j.roll_over(T0 + timedelta(days=4))  # keeps days 2 and 3 before it, and day 4
    kept = [T0 + timedelta(days=d) for d in (2, 3, 4)]
    assert [s.interval_start for s in j.settlements()] == kept
    assert [e.start for e in j.intervals()] == kept
    assert len(j.settlement_messages()) == 3
    assert j._db.execute("SELECT COUNT(*) FROM trades").fetchone()[0] == 3


def test_the_outbox_keeps_order_until_delivered(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a")
    assert all(j.queue("p2pdoe/v1/site/a/telemetry", f"m{k}".encode()) for k in range(5))
    assert [p for _, _, p in j.pending()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    j.delivered([i for i, _, _ in j.pending()][:3])
    assert [p for _, _, p in j.pending()] == [b"m3", b"m4"]


def test_a_journal_of_another_site_is_refused(tmp_path: Path) -> None:
    Journal(tmp_path / "j.db", "a").close()
    with pytest.raises(JournalError, match="belongs to site 'a'"):
        Journal(tmp_path / "j.db", "b")


@pytest.mark.timeout(60)
def test_nothing_recorded_is_lost_when_the_process_is_killed(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-stream: every record it reported as committed is there, intact."""
    path = tmp_path / "j.db"
    writer = textwrap.dedent(f"""
        from datetime import UTC, datetime, timedelta
        from pathlib import Path
        from edge_agent.journal import Journal
        from p2pdoe.core.realtime.settlement import settle
        j = Journal(Path({str(path)!r}), "a")
        t0 = datetime(2026, 6, 21, tzinfo=UTC)
        for k in range(100000):
            j.save_settlement(settle(t0 + timedelta(minutes=15 * k), float(k), 0.0, [], 0.25, 0.05))
            print(k, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = -1
    deadline = time.monotonic() + 30
    while committed < 200 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert committed >= 200
    j = Journal(path, "a")
    assert j._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = j.settlements()
    assert len(kept) >= committed + 1  # every record reported committed (and perhaps one more)
    assert [s.measured_kwh for s in kept] == [float(k) for k in range(len(kept))]


def _fill_the_disk(j: Journal) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL), as on a full filesystem: the file may
    not grow past the pages it has."""
    pages = j._db.execute("PRAGMA page_count").fetchone()[0]
    j._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    j._db.execute(f"PRAGMA max_page_count = {pages}")


def _free_the_disk(j: Journal) -> None:
    j._db.execute("PRAGMA max_page_count = 1073741823")


def test_a_full_disk_keeps_writes_in_memory_and_writes_them_when_it_can(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a")
    _fill_the_disk(j)
    day = datetime(2025, 6, 1, tzinfo=UTC)
    settled = [
        Settlement(day + timedelta(minutes=15 * k), 1.0 + k, 1.0, float(k), 0.0, 0.0, 1.0 + k, 0.2)
        for k in range(400)
    ]
    for s in settled:  # enough rows to need new pages
        j.save_settlement(s)
        j.set_value("flex_used_kwh", "1.5")
    assert j.failing is not None
    assert "full" in j.failing
    assert j.deferred > 0
    assert j.failures > 0
    assert len(j.settlements()) < len(settled)  # the disk has not got them all
    _free_the_disk(j)
    assert j.flush()
    assert j.failing is None
    assert j.deferred == 0
    assert j.settlements() == settled  # in order, none lost
    j.close()
    assert Journal(tmp_path / "j.db", "a").settlements() == settled


def test_the_outbox_on_a_full_disk_sends_nothing_twice(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a")
    assert j.queue("t", b"m0")
    assert j.queue("t", b"m1")
    _fill_the_disk(j)
    for k in range(200):
        j.queue("t", b"x" * 400 + str(k).encode())
    assert j.failing is not None
    first = j.pending(1)
    j.delivered([first[0][0]])  # sent; its deletion may wait for the disk
    assert [p for _, _, p in j.pending(1)] == [b"m1"]
    _free_the_disk(j)
    assert j.flush()
    assert j.pending_count() == 201  # m1 and every message kept in memory, m0 gone


def test_a_bounded_memory_drops_the_oldest_writes_and_counts_them(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", "a", max_deferred=5)
    _fill_the_disk(j)
    for k in range(300):
        j.queue("t", b"y" * 400 + str(k).encode())
    assert j.deferred == 5
    assert j.dropped > 0
