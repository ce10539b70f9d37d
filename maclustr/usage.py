"""Team keys at run time: a request's admission (model access, rates, quota), the
x-ratelimit-* headers, and the end of a request (tokens spent, the ledger row).

Thin: the arithmetic is policy.py's, the rows ledger.py's, the file usage_db.py's. The
policies come from the request's own table snapshot (`keys:`, reloaded live with the rest);
the windows and the ledger live here for the gateway's life (`gateway.usage_db` is read at
start). Without a `keys:` section nothing is refused and every key is an admin.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .config import RouteTable
from .endpoints import API_PATHS
from .errors import AdminOnly, ModelNotAllowed, QuotaExceeded, RateLimited
from .ledger import row_of
from .outcome import Outcome
from .policy import ADMIN, KeyPolicy, Limiter
from .usage_db import Writer, connect, open_readonly, recent

log = logging.getLogger("maclustr.usage")

# The model-serving endpoints a ledger row is written for (what maclustr_requests_total counts).
MODEL_ENDPOINTS = API_PATHS


def policy_of(table: RouteTable, key: str) -> KeyPolicy:
    return ADMIN if table.keys is None else table.keys.of(key)


def allowed_aliases(table: RouteTable, key: str) -> tuple[str, ...]:
    """What /v1/models lists for the key, and what a 404 offers it instead."""
    p = policy_of(table, key)
    return tuple(a for a in table.aliases if p.allows(a))


def check_access(table: RouteTable, key: str, alias: str) -> None:
    """403 model_not_allowed for an alias outside the key's `models`."""
    if table.keys is not None and not table.keys.of(key).allows(alias):
        raise ModelNotAllowed(key, alias)


def require_admin(table: RouteTable, key: str | None, what: str) -> None:
    """403 admin_only unless the key's policy says admin (every key without `keys:`)."""
    if key is not None and not policy_of(table, key).admin:
        raise AdminOnly(key, what)


class KeyUsage:
    """The windows of every key and the ledger writer (None: no ledger)."""

    def __init__(self, db: Path | None, retention_days: int = 400,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.db = db
        self.limiter = Limiter(tokens=db is not None)
        self.writer: Writer | None = None
        if db is not None:
            failed = self._restore(db)
            self.writer = Writer(db, retention_days, clock, logged=failed)

    def _restore(self, db: Path) -> str | None:
        """The day's and the minute's totals, so a restart resets no one's allowance. A
        ledger that cannot be written is still read; one that cannot be read is logged once
        and the limits count from now on (they fail open for what came before)."""
        now = self.clock()
        failed = None
        try:
            conn = connect(db)
        except sqlite3.Error as e:
            failed = str(e)
            log.error("usage ledger %s: %s; requests go on, their usage is not recorded",
                      db.name, failed)
            try:
                conn = open_readonly(db)
            except sqlite3.Error:
                return failed
        try:
            found = recent(conn, now)
        except sqlite3.Error as e:
            if failed is None:
                log.error("usage ledger %s cannot be read (%s): limits count from now on",
                          db.name, e)
            return failed or str(e)
        finally:
            conn.close()
        for key, r in found.items():
            self.limiter.restore(key, r.requests, r.tokens, now)
        return failed

    def admit(self, table: RouteTable, key: str, alias: str) -> None:
        """Refuse a request its key may not make now (403 or 429); count it otherwise."""
        check_access(table, key, alias)
        if table.keys is None:
            return
        p = table.keys.of(key)
        now = self.clock()
        v = self.limiter.check(key, p, now)
        if v is not None:
            cls = QuotaExceeded if v.code == "quota_exceeded" else RateLimited
            raise cls(key, v.what, v.limit, v.retry_after, self.limiter.headers(key, p, now))

    def headers(self, table: RouteTable, key: str) -> dict[str, str]:
        """x-ratelimit-* of a key with limits (empty for the others)."""
        if table.keys is None:
            return {}
        return self.limiter.headers(key, table.keys.of(key), self.clock())

    def tokens_left_today(self, table: RouteTable, key: str) -> int | None:
        if table.keys is None:
            return None
        return self.limiter.tokens_left_today(key, table.keys.of(key), self.clock())

    def observe(self, o: Outcome) -> None:
        """A model request ended: its tokens count against its key; its row goes to the
        ledger (a queue put: the writer thread does the disk)."""
        if o.endpoint not in MODEL_ENDPOINTS or o.key == "-":
            return
        now = self.clock()
        if o.prompt_tokens is not None and o.completion_tokens is not None:
            self.limiter.spend(o.key, o.prompt_tokens + o.completion_tokens, now)
        if self.writer is not None:
            self.writer.add(row_of(o, now))

    def flush(self) -> None:
        """Blocking: every row so far is in the file (reports read the file)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
