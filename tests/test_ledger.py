"""The ledger's pure parts: rows of an Outcome, --since and --by, the report's sums and its
three formats (the CLI and GET /v1/usage print the same sums)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from maclustr.ledger import ReportError, aggregate, parse_by, parse_since, render, row_of
from maclustr.outcome import Outcome

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
