"""The usage ledger's file: SQLite (stdlib sqlite3, WAL), written by one thread off the event
loop, read back at start and for reports.

The event loop only appends a row tuple to a deque (`Writer.add`, no thread wakeup); the
writer thread writes whatever has queued once a second in one transaction, prunes rows older
than the retention once a day, and writes the rest at shutdown (`close`). A disk error (a
full disk, a read-only or corrupt file) is logged, and the request that made the row goes on:
the ledger is a record, never a reason to fail a request.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .ledger import COLUMNS, NOT_ADMITTED, Row
from .policy import DAY, WINDOW

log = logging.getLogger("maclustr.usage")
T = TypeVar("T")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (time REAL NOT NULL, key TEXT NOT NULL, "
    "model TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL, "
    "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
    "cached_tokens INTEGER NOT NULL, duration REAL NOT NULL, error TEXT)",
    "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
)
INSERT = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
INTERVAL = 1.0  # seconds between writes at most
PRUNE_EVERY = DAY


def connect(path: Path) -> sqlite3.Connection:
    """The ledger, created when missing, in WAL mode (readers never block the writer)."""
    db = sqlite3.connect(str(path), timeout=5.0, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            db.execute(statement)
    except sqlite3.Error:
        db.close()
        raise
    return db


def open_readonly(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise sqlite3.OperationalError(f"no ledger at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def report_rows(path: Path, since: float) -> list[tuple[int, str, str, int, int, int]]:
    """(UTC day number, key, model, requests, prompt_tokens, completion_tokens) per day, key
    and model since `since`: SQLite sums the rows (a 100,000-row ledger in tens of ms),
    ledger.aggregate rolls them up to what the report asks for."""
    db = open_readonly(path)
    try:
        return db.execute(
            "SELECT CAST(time / 86400 AS INTEGER) AS d, key, model, COUNT(*), "
            "SUM(prompt_tokens), SUM(completion_tokens) FROM usage WHERE time >= ? "
            "GROUP BY d, key, model", (since,)).fetchall()
    finally:
        db.close()


@dataclass
class Recent:
    """One key's last minute and day, as the ledger has them (for Limiter.restore)."""

    requests: list[float] = field(default_factory=list)  # admission times, the last minute
    tokens: list[tuple[float, int]] = field(default_factory=list)


def recent(db: sqlite3.Connection, now: float) -> dict[str, Recent]:
    """What each key did today and in the last minute: the minute's rows one by one, the
    rest of the day as one sum at midnight (it only counts against the day)."""
    midnight = math.floor(now / DAY) * DAY
    edge = now - WINDOW
    out: dict[str, Recent] = {}
    for key, total in db.execute(
            "SELECT key, SUM(prompt_tokens + completion_tokens) FROM usage "
            "WHERE time >= ? AND time <= ? GROUP BY key", (midnight, edge)):
        out.setdefault(key, Recent()).tokens.append((midnight, int(total or 0)))
    for t, key, p, c, duration, error in db.execute(
            "SELECT time, key, prompt_tokens, completion_tokens, duration, error FROM usage "
            "WHERE time > ?", (min(edge, max(midnight, edge)),)):
        r = out.setdefault(key, Recent())
        r.tokens.append((t, p + c))
        if error not in NOT_ADMITTED and t - duration > edge:
            r.requests.append(t - duration)
    return out


class Writer:
    """The thread that owns the ledger's write connection. `add` is all the loop pays: a
    deque append, no wakeup (a queue put per row woke the thread per request, a futex call
    and a GIL handoff each); the thread looks once per INTERVAL, or at once for a flush or
    the stop."""

    def __init__(self, path: Path, retention_days: int,
                 clock: Callable[[], float] = time.time, logged: str | None = None) -> None:
        """`logged`: an error of this file already logged (not logged again)."""
        self.path = path
        self.retention = retention_days * DAY
        self._clock = clock
        self._rows: deque[Row] = deque()
        self._flushes: deque[threading.Event] = deque()  # flush() calls waiting
        self._wake = threading.Event()
        self._stop = False
        self._failing = logged  # the error being logged once, until it clears
        self.written = 0
        self.lost = 0
        self._thread = threading.Thread(target=self._run, name="maclustr-usage", daemon=True)
        self._thread.start()

    def add(self, row: Row) -> None:
        self._rows.append(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row added before this call is written (or given up on)."""
        done = threading.Event()
        self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        db = self._open()
        pruned = 0.0
        while True:
            self._wake.wait(INTERVAL)
            self._wake.clear()
            stop = self._stop
            # the flush requests before the rows: every row added before a request is taken
            flushed = _take(self._flushes)
            rows = _take(self._rows)
            if db is None and rows:
                db = self._open()
            if rows:
                self._write(db, rows)
            if db is not None and self._clock() - pruned >= PRUNE_EVERY:
                pruned = self._clock()
                self._prune(db)
            for done in flushed:
                done.set()
            if stop:
                if db is not None:
                    db.close()
                return

    def _open(self) -> sqlite3.Connection | None:
        try:
            return connect(self.path)
        except sqlite3.Error as e:
            self._fail(e)
            return None

    def _write(self, db: sqlite3.Connection | None, rows: list[Row]) -> None:
        if db is None:
            self.lost += len(rows)
            return
        try:
            with db:
                db.execute("BEGIN")
                db.executemany(INSERT, rows)
        except sqlite3.Error as e:
            self.lost += len(rows)
            self._fail(e)
            return
        self.written += len(rows)
        if self._failing is not None:
            log.warning("usage ledger: writing again (%d rows were lost)", self.lost)
            self._failing = None

    def _prune(self, db: sqlite3.Connection) -> None:
        try:
            with db:
                db.execute("BEGIN")
                gone = db.execute("DELETE FROM usage WHERE time < ?",
                                  (self._clock() - self.retention,)).rowcount
        except sqlite3.Error as e:
            self._fail(e)
            return
        if gone:
            log.info("usage ledger: pruned %d rows older than %d days", gone,
                     round(self.retention / DAY))

    def _fail(self, e: sqlite3.Error) -> None:
        """One log line per distinct error, not one per batch."""
        why = str(e) or type(e).__name__
        if why != self._failing:
            self._failing = why
            log.error("usage ledger %s: %s; requests go on, their usage is not recorded",
                      self.path.name, why)


def _take(items: deque[T]) -> list[T]:
    """Everything appended so far (popleft is atomic: the loop may append meanwhile)."""
    out: list[T] = []
    while items:
        out.append(items.popleft())
    return out
