"""The edge agent's durable journal: SQLite in WAL mode with full synchronous commits, one transaction
per record, so a crash (power cut, SIGKILL) loses nothing that was recorded. It holds each interval's
measured energy (resumable mid-interval), the envelope in force, the agreed trades, the settlements,
and an outbox of telemetry waiting for the broker; and the envelopes last heard, so a restart applies the
saved default at once, before (or without) the broker.

A disk that refuses writes (full, read-only, failing) never stops the agent: what cannot be written is
kept in memory, in order (bounded: beyond `MAX_DEFERRED` the oldest records are dropped and counted),
`failing` says why, and every later write first tries to write what was kept. Reads see only what
reached the disk; telemetry delivered meanwhile is remembered so it is not sent twice."""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from p2pdoe.core.realtime.settlement import AgreedTrade, IntervalEnergy, Settlement

log = logging.getLogger("edge_agent.journal")
SCHEMA_VERSION = "2"
MAX_DEFERRED = 20_000  # writes kept in memory while the disk refuses them
RETENTION_DAYS = 35  # the days of intervals, trades and settlements kept (`roll_over`)
_DATED = {"intervals": "start", "trades": "interval_start", "settlements": "interval_start",
          "settlement_messages": "interval_start"}  # fmt: skip
Statement = tuple[str, Sequence[object]]
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS intervals (
    start TEXT PRIMARY KEY, end_ TEXT NOT NULL, energy_kwh REAL NOT NULL, readings INTEGER NOT NULL,
    covered_s REAL NOT NULL, last_ts TEXT, scheduled_kwh REAL, envelope TEXT, lo_kw REAL, up_kw REAL);
CREATE TABLE IF NOT EXISTS trades (
    round TEXT NOT NULL, interval_start TEXT NOT NULL, peer TEXT NOT NULL, bought_kwh REAL NOT NULL,
    sold_kwh REAL NOT NULL, buy_price REAL NOT NULL, sell_price REAL NOT NULL,
    PRIMARY KEY (round, interval_start, peer));
CREATE TABLE IF NOT EXISTS settlements (
    interval_start TEXT PRIMARY KEY, measured_kwh REAL NOT NULL, scheduled_kwh REAL NOT NULL,
    deviation_kwh REAL NOT NULL, p2p_paid_eur REAL NOT NULL, p2p_received_eur REAL NOT NULL,
    grid_kwh REAL NOT NULL, grid_eur REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settlement_messages (interval_start TEXT PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes (topic TEXT PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL);
"""


class JournalError(ValueError):
    """The journal belongs to another site or another schema version."""


class Journal:
    def __init__(
        self, path: Path, site: str, max_deferred: int = MAX_DEFERRED, retention_days: int = RETENTION_DAYS
    ):
        self.retention_days = retention_days
        self.failing: str | None = None  # why the last write was refused; None while writes go through
        self.failures = 0  # writes refused (each kept for later, or dropped beyond `max_deferred`)
        self.dropped = 0  # deferred writes dropped, oldest first
        self._deferred: deque[list[Statement]] = deque()
        self._max_deferred = max_deferred
        self._delivered: set[int] = set()  # outbox rows sent while their deletion waits for the disk
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_TABLES)
        self._claim(site)

    def _claim(self, site: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('site', ?), ('schema_version', ?)", (site, SCHEMA_VERSION)
            )
            owner = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if owner["site"] != site:
            raise JournalError(f"the journal belongs to site {owner['site']!r}, not {site!r}")
        if owner["schema_version"] != SCHEMA_VERSION:
            raise JournalError(f"journal schema version {owner['schema_version']}, expected {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.flush()
        self._db.close()

    # --- writing, or keeping for later -------------------------------------------------------------

    @property
    def deferred(self) -> int:
        """Writes kept in memory, waiting for the disk."""
        return len(self._deferred)

    def flush(self) -> bool:
        """Write what was kept, oldest first; True when nothing is left."""
        while self._deferred:
            try:
                self._run(self._deferred[0])
            except sqlite3.Error as exc:
                self._refused(exc)
                return False
            self._deferred.popleft()
        self._delivered.clear()  # their deletions are on the disk now
        if self.failing is not None:
            log.warning("journal writes go through again")
            self.failing = None
        return True

    def _write(self, statements: list[Statement]) -> bool:
        """Write in one transaction (after what was kept); False if the disk refused and it was kept."""
        if self.flush():
            try:
                self._run(statements)
                return True
            except sqlite3.Error as exc:
                self._refused(exc)
        self._keep(statements)
        return False

    def _run(self, statements: list[Statement]) -> None:
        with self._tx() as db:
            for sql, params in statements:
                db.execute(sql, params)

    def _refused(self, exc: sqlite3.Error) -> None:
        self.failures += 1
        if self.failing is None:
            log.error("the journal refuses writes (%s); keeping them in memory", exc)
        self.failing = str(exc)

    def _keep(self, statements: list[Statement]) -> None:
        if len(self._deferred) >= self._max_deferred:
            self._deferred.popleft()
            self.dropped += 1
        self._deferred.append(statements)

    # --- intervals -------------------------------------------------------------------------------

    def save_interval(
        self,
        e: IntervalEnergy,
        scheduled_kwh: float | None,
        envelope: str,
        lo_kw: float | None,
        up_kw: float | None,
        state: dict[str, str] | None = None,
    ) -> None:
        """The interval's accumulation so far, and any `state` values, in one transaction."""
        last = e.last_ts.isoformat() if e.last_ts is not None else None
        statements: list[Statement] = [
            ("INSERT OR REPLACE INTO state VALUES (?, ?)", (k, v)) for k, v in (state or {}).items()
        ]
        statements.append((
            "INSERT OR REPLACE INTO intervals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.start.isoformat(), e.end.isoformat(), e.energy_kwh, e.readings, e.covered_s, last,
             scheduled_kwh, envelope, lo_kw, up_kw),
        ))  # fmt: skip
        self._write(statements)

    def load_interval(self, start: datetime) -> IntervalEnergy | None:
        """The interval's accumulation as last saved (a restarted agent resumes from it)."""
        row = self._db.execute(
            "SELECT end_, energy_kwh, readings, covered_s, last_ts FROM intervals WHERE start = ?",
            (start.isoformat(),),
        ).fetchone()
        if row is None:
            return None
        last = None if row[4] is None else datetime.fromisoformat(row[4])
        return IntervalEnergy(start, datetime.fromisoformat(row[0]), row[1], row[2], row[3], last)

    # --- trades and settlements ------------------------------------------------------------------

    def save_trades(self, round_id: str, interval_start: datetime, trades: list[AgreedTrade]) -> None:
        self._write([
            ("INSERT OR REPLACE INTO trades VALUES (?, ?, ?, ?, ?, ?, ?)",
             (round_id, interval_start.isoformat(), t.peer, t.bought_kwh, t.sold_kwh,
              t.buy_price_eur_per_kwh, t.sell_price_eur_per_kwh))
            for t in trades
        ])  # fmt: skip

    def save_settlement(self, s: Settlement, message: bytes = b"") -> None:
        """The settlement, and the message that sent it (to send it again), in one transaction."""
        start = s.interval_start.isoformat()
        rows: list[Statement] = [(
            "INSERT OR REPLACE INTO settlements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (start, s.measured_kwh, s.scheduled_kwh, s.deviation_kwh,
             s.p2p_paid_eur, s.p2p_received_eur, s.grid_kwh, s.grid_eur),
        )]  # fmt: skip
        if message:
            rows.append(("INSERT OR REPLACE INTO settlement_messages VALUES (?, ?)", (start, message)))
        self._write(rows)

    def settlement_messages(self, since: datetime | None = None) -> list[bytes]:
        """The settlement messages sent for intervals from `since` on (None: all), oldest first."""
        first = "" if since is None else since.astimezone(UTC).isoformat()  # stored as UTC ISO text
        rows = self._db.execute(
            "SELECT payload FROM settlement_messages WHERE interval_start >= ? ORDER BY interval_start",
            (first,),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def settlements(self) -> list[Settlement]:
        rows = self._db.execute("SELECT * FROM settlements ORDER BY interval_start").fetchall()
        return [Settlement(datetime.fromisoformat(r[0]), *r[1:]) for r in rows]

    # --- the telemetry outbox --------------------------------------------------------------------

    def queue(self, topic: str, payload: bytes) -> bool:
        """Keep a message for the broker; False if the disk refused it (it is kept in memory until
        the disk takes it: send it meanwhile some other way)."""
        return self._write([("INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload))])

    def pending(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """The oldest messages not yet delivered, in order."""
        rows = self._db.execute(
            "SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit + len(self._delivered),)
        ).fetchall()
        return [(int(i), str(t), bytes(p)) for i, t, p in rows if int(i) not in self._delivered][:limit]

    def pending_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]) - len(self._delivered)

    def delivered(self, ids: list[int]) -> None:
        if not self._write([("DELETE FROM outbox WHERE id = ?", (i,)) for i in ids]):
            self._delivered.update(ids)  # not sent again while the deletion waits for the disk

    # --- envelopes heard, and small state ---------------------------------------------------------

    def save_envelope(self, key: str, payload: bytes) -> None:
        self._write([("INSERT OR REPLACE INTO envelopes VALUES (?, ?)", (key, payload))])

    def envelopes(self) -> list[tuple[str, bytes]]:
        rows = self._db.execute("SELECT topic, payload FROM envelopes ORDER BY topic").fetchall()
        return [(str(k), bytes(p)) for k, p in rows]

    def forget_envelopes(self, keep: set[str]) -> None:
        keys = [str(k) for (k,) in self._db.execute("SELECT topic FROM envelopes").fetchall()]
        gone = [("DELETE FROM envelopes WHERE topic = ?", (k,)) for k in keys if k not in keep]
        if gone:
            self._write(gone)  # type: ignore[arg-type]

    def roll_over(self, day_start: datetime) -> None:
        """A new day: forget the intervals, trades and settlements that started more than
        `retention_days` before it (SQLite reuses the freed pages, so the file stops growing)."""
        before = (day_start - timedelta(days=self.retention_days)).astimezone(UTC).isoformat()
        self._write(
            [(f"DELETE FROM {table} WHERE {column} < ?", (before,)) for table, column in _DATED.items()]
        )

    def set_value(self, key: str, value: str) -> None:
        self._write([("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))])

    def value(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def intervals(self) -> list[IntervalEnergy]:
        rows = self._db.execute(
            "SELECT start, end_, energy_kwh, readings, covered_s, last_ts FROM intervals ORDER BY start"
        ).fetchall()
        return [
            IntervalEnergy(
                datetime.fromisoformat(r[0]), datetime.fromisoformat(r[1]), r[2], r[3], r[4],
                None if r[5] is None else datetime.fromisoformat(r[5]),
            )
            for r in rows
        ]  # fmt: skip
