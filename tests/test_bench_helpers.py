"""The benchmark's pure helpers (the bench itself runs under `make bench`, never in tests):
issue 15's verdicts come from the run's figures, never from anything else."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def report(maclustr: dict[str, float], caddy: dict[str, float], direct: dict[str, float],
           real: dict[str, Any] | None = None, slow: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    return {"medians": {"maclustr": maclustr, "caddy": caddy, "direct": direct},
            "targets": ["direct", "caddy", "maclustr"], "placement": "no CPU pinning",
            "target_info": {n: {} for n in ("direct", "caddy", "maclustr")},
            "real": real or {}, "slow": slow or {}}


GOOD = {"b.cpu_us_per_event": 9.0, "a.c64_cpu_us_per_req": 150.0, "i.ttfb_p50_ms": 2.5,
        "c.chunk_lag_p50_ms": 0.2, "b.batched_cpu_us_per_event": 4.0}
CADDY = {"b.cpu_us_per_event": 10.0, "a.c64_cpu_us_per_req": 200.0, "i.ttfb_p50_ms": 2.0,
         "c.chunk_lag_p50_ms": 0.25, "b.batched_cpu_us_per_event": 5.0}
DIRECT = {"i.ttfb_p50_ms": 2.0, "c.chunk_lag_p50_ms": 0.15}
REAL = {"maclustr": {"tokens_s": 98.0}, "direct": {"tokens_s": 100.0}}
SLOW = {"maclustr": {"complete": 1000, "streams": 1000, "rss_peak_mb": 70.0}}


def test_every_target_met_when_the_figures_say_so(bench: ModuleType) -> None:
    v = bench.verdicts(report(GOOD, CADDY, DIRECT, REAL, SLOW), "maclustr")
    assert [ok for _, _, ok in v] == [True] * 6


@pytest.mark.parametrize(("key", "value", "index"), [
    ("b.cpu_us_per_event", 10.0, 0),  # equal to Caddy's is not below it
    ("a.c64_cpu_us_per_req", 260.0, 1),
    ("i.ttfb_p50_ms", 3.01, 2),  # 1.01 ms added
    ("c.chunk_lag_p50_ms", 0.26, 3),  # added 0.11 > Caddy's 0.10
])
def test_one_figure_over_its_target_is_not_met(bench: ModuleType, key: str, value: float,
                                               index: int) -> None:
    v = bench.verdicts(report({**GOOD, key: value}, CADDY, DIRECT, REAL, SLOW), "maclustr")
    assert [ok for _, _, ok in v] == [i != index for i in range(6)]


def test_slow_tokens_and_memory_are_judged(bench: ModuleType) -> None:
    real = {"maclustr": {"tokens_s": 96.0}, "direct": {"tokens_s": 100.0}}
    slow = {"maclustr": {"complete": 999, "streams": 1000, "rss_peak_mb": 70.0}}
    v = bench.verdicts(report(GOOD, CADDY, DIRECT, real, slow), "maclustr")
    assert [ok for _, _, ok in v][4:] == [False, False]
    fat = {"maclustr": {"complete": 1000, "streams": 1000, "rss_peak_mb": 151.0}}
    assert bench.verdicts(report(GOOD, CADDY, DIRECT, REAL, fat), "maclustr")[5][2] is False


def test_what_was_not_measured_is_said(bench: ModuleType) -> None:
    small = {"maclustr": {"complete": 100, "streams": 100, "rss_peak_mb": 40.0}}
    v = bench.verdicts(report(GOOD, {}, DIRECT, None, small), "maclustr")
    assert [ok for _, _, ok in v] == [None, None, True, None, None, None]


def test_headline_lists_every_target_with_caddy_ratios(bench: ModuleType) -> None:
    text = bench.headline(report(GOOD, CADDY, DIRECT, REAL, SLOW))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["direct", "caddy", "maclustr"]
    assert "150 (0.75×)" in rows[-1] and "9.0 (0.90×)" in rows[-1]
    assert "+0.50" in rows[-1]  # the burst's added TTFB p50
    assert "batched reads" in text and "maclustr 4.0" in text
    assert text.count("— met") == 6 and "NOT met" not in text


def test_percentile_and_duration_parsing(bench: ModuleType) -> None:
    assert bench.pct([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert bench.pct([1.0, 2.0], 99) == 2.0
    assert math.isnan(bench.pct([], 50))
    assert bench.parse_ms("250us") == 0.25 and bench.parse_ms("1.5s") == 1500.0


def test_a_skipped_target_keeps_a_row_as_wide_as_its_table(bench: ModuleType) -> None:
    skip = {"caddy": {"skipped": "not installed"}}
    text = bench.build_tables({**report(GOOD, CADDY, DIRECT, skip, skip), "rss": {}, "raw": {},
                               "scenarios": []})
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("| caddy | not installed |")]
    assert len(rows) == 2
    for i in rows:
        header = next(h for h in reversed(lines[:i]) if h.startswith("| target |"))
        assert lines[i].count("|") == header.count("|"), (header, lines[i])
