"""The ledger's pure parts: rows of an Outcome, --since and --by, the report's sums and its
three formats (the CLI and GET /v1/usage print the same sums)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from maclustr.ledger import ReportError, Row, aggregate, parse_by, parse_since, render, row_of
from maclustr.outcome import Outcome
from maclustr.usage_db import INSERT, Writer, connect, recent, report_rows

D = 20000  # a UTC day number: 2024-10-04
DAYS = [(D, "a", "m1", 2, 10, 5), (D, "a", "m2", 1, 7, 1), (D + 1, "a", "m1", 3, 30, 3),
        (D + 1, "b", "m1", 1, 4, 4)]


def test_row_of_an_outcome() -> None:
    o = Outcome("r1", 0.0, "POST", "/v1/chat/completions", key="ci", model="maclustr-fast",
                status=200, duration=1.25)
    o.usage({"prompt_tokens": 12, "completion_tokens": 3,
             "prompt_tokens_details": {"cached_tokens": 8}})
    assert row_of(o, 1000.0) == (1000.0, "ci", "maclustr-fast", "/v1/chat/completions", 200,
                                 12, 3, 8, 1.25, None)
    o.fail(429, "rate_limited")
    o.prompt_tokens = o.completion_tokens = o.cached_tokens = None
    assert row_of(o, 1.0)[4:] == (429, 0, 0, 0, 1.25, "rate_limited")


@pytest.mark.parametrize(("text", "expected"), [
    (None, 0.0), ("", 0.0), ("7d", 1_000_000.0 - 7 * 86400), ("0d", 1_000_000.0),
    ("2026-12-01", 1796083200.0),
])
def test_since(text: str | None, expected: float) -> None:
    assert parse_since(text, 1_000_000.0) == expected


@pytest.mark.parametrize("text", ["yesterday", "7", "-3d", "2026-13-01", "2026/12/01"])
def test_since_refused(text: str) -> None:
    with pytest.raises(ReportError, match="--since must be YYYY-MM-DD"):
        parse_since(text, 0.0)


@pytest.mark.parametrize(("text", "expected"), [
    (None, ("key", "model", "day")), ("key", ("key",)), ("day, model", ("day", "model")),
])
def test_by(text: str | None, expected: tuple[str, ...]) -> None:
    assert parse_by(text) == expected


@pytest.mark.parametrize("text", ["", "colour", "key,key", "key,endpoint"])
def test_by_refused(text: str) -> None:
    with pytest.raises(ReportError, match="--by takes"):
        parse_by(text)


def r(n: int, p: int, c: int, **group: str) -> dict[str, Any]:
    return {**group, "requests": n, "prompt_tokens": p, "completion_tokens": c,
            "total_tokens": p + c}


@pytest.mark.parametrize(("by", "expected"), [
    (("key",), [r(6, 47, 9, key="a"), r(1, 4, 4, key="b")]),
    (("model",), [r(6, 44, 12, model="m1"), r(1, 7, 1, model="m2")]),
    (("day",), [r(3, 17, 6, day="2024-10-04"), r(4, 34, 7, day="2024-10-05")]),
    (("model", "key"), [r(5, 40, 8, model="m1", key="a"), r(1, 4, 4, model="m1", key="b"),
                        r(1, 7, 1, model="m2", key="a")]),
    (("key", "model", "day"), [r(2, 10, 5, key="a", model="m1", day="2024-10-04"),
                               r(3, 30, 3, key="a", model="m1", day="2024-10-05"),
                               r(1, 7, 1, key="a", model="m2", day="2024-10-04"),
                               r(1, 4, 4, key="b", model="m1", day="2024-10-05")]),
])
def test_aggregate(by: tuple[str, ...], expected: list[dict[str, Any]]) -> None:
    assert aggregate(DAYS, by) == expected
    assert aggregate([], by) == []


def test_render_formats() -> None:
    rows = aggregate(DAYS, ("key",))
    assert json.loads(render(rows, ("key",), "json")) == rows
    assert render(rows, ("key",), "csv").splitlines() == [
        "key,requests,prompt_tokens,completion_tokens,total_tokens", "a,6,47,9,56", "b,1,4,4,8"]
    assert render(rows, ("key",), "table").splitlines() == [
        "KEY  REQUESTS  PROMPT_TOKENS  COMPLETION_TOKENS  TOTAL_TOKENS",
        "a           6             47                  9            56",
        "b           1              4                  4             8"]


# --- the file (usage_db.py): written by its thread, read back, pruned ----------------------

NOW = 1_900_000_000.0


def row(t: float, key: str = "a", tokens: tuple[int, int] = (3, 2), duration: float = 1.0,
        error: str | None = None) -> Row:
    return (t, key, "m", "/v1/chat/completions", 200 if error is None else 429, *tokens, 0,
            duration, error)


def test_writer_writes_in_batches_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    w = Writer(path, 400, clock=lambda: NOW)
    for i in range(50):
        w.add(row(NOW - i))
    assert w.flush()
    assert w.written == 50
    w.add(row(NOW))
    w.close()  # the last row is written at shutdown
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM usage").fetchone() == (51,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert report_rows(path, 0.0) == [(int(NOW // 86400), "a", "m", 51, 153, 102)]


def test_writer_prunes_past_retention(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    w = Writer(path, 400)
    w.add(row(NOW))
    w.close()
    old = [row(time.time() - d * 86400) for d in (1, 399, 401, 800)]
    db = connect(path)
    db.executemany(INSERT, old)
    db.close()
    w = Writer(path, 400)  # prunes at start, then daily
    assert w.flush()
    w.close()
    left = sqlite3.connect(path).execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    assert left == 3  # NOW, and 1 and 399 days ago


def test_recent_is_what_a_restart_restores(tmp_path: Path) -> None:
    """The minute's rows one by one (refusals are not requests), the rest of today as one
    sum at midnight, yesterday not at all."""
    path = tmp_path / "u.sqlite3"
    now = NOW - NOW % 86400 + 7200  # 02:00 UTC
    midnight = now - 7200
    db = connect(path)
    db.executemany(INSERT, [
        row(midnight - 10, tokens=(100, 0)),  # yesterday
        row(midnight + 5, tokens=(10, 5)), row(now - 3600, tokens=(20, 0)),  # today
        row(now - 30, tokens=(1, 1), duration=2.0),  # in the minute
        row(now - 20, "b", tokens=(0, 0), error="rate_limited"),
    ])
    found = recent(db, now)
    db.close()
    assert found["a"].requests == [now - 32]
    assert sorted(found["a"].tokens) == [(midnight, 35), (now - 30, 2)]
    assert found["b"].requests == [] and found["b"].tokens == [(now - 20, 0)]
