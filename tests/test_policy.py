"""Team keys' pure parts: the `keys:` section as parsed, and the limits' arithmetic (sliding
windows, the UTC day, Retry-After, the x-ratelimit-* headers), with time given by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_cli import run as run_cli

from maclustr.config import ConfigError, parse_routes, usage_db_path
from maclustr.policy import DAY, WINDOW, KeyPolicy, KeyWindow, Limiter, Policies, Verdict

ROUTES = """\
models:
  maclustr-fast: {model: a, upstream: "http://127.0.0.1:9"}
  maclustr-coder: {model: b, upstream: "http://127.0.0.1:9"}
"""
T0 = 1_800_000_000.0 - 1_800_000_000.0 % DAY + 3600.0  # 01:00 UTC of some day


def test_keys_section_parsed() -> None:
    t = parse_routes(ROUTES + """\
keys:
  interns:
    models: [maclustr-fast]
    requests_per_minute: 30
    tokens_per_minute: 20000
    tokens_per_day: 2000000
    max_in_flight: 2
  ops:
    admin: true
  "*":
    tokens_per_day: 5000000
gateway:
  usage_db: ledger.db
  usage_retention_days: 30
""")
    assert t.keys is not None
    interns = t.keys.of("interns")
    assert interns == KeyPolicy(models=frozenset({"maclustr-fast"}), requests_per_minute=30,
                                tokens_per_minute=20000, tokens_per_day=2000000,
                                max_in_flight=2)
    assert interns.line == 5
    assert t.keys.of("ops").admin and not interns.admin
    assert t.keys.of("someone-else") == KeyPolicy(tokens_per_day=5000000)
    assert interns.allows("maclustr-fast") and not interns.allows("maclustr-coder")
    assert t.keys.of("ops").allows("maclustr-coder")
    assert t.keys.in_flight_limits
    assert t.settings.usage_retention_days == 30
    assert usage_db_path("/etc/m/routes.yaml", t.settings) == \
        usage_db_path("/etc/m/x.yaml", t.settings)
    assert str(usage_db_path("/etc/m/routes.yaml", t.settings)) == "/etc/m/ledger.db"


def test_no_keys_section_and_ledger_defaults() -> None:
    t = parse_routes(ROUTES)
    assert t.keys is None
    assert str(usage_db_path("/srv/routes.yaml", t.settings)) == \
        "/srv/maclustr-usage.sqlite3"
    off = parse_routes(ROUTES + "gateway: {usage_db: false}\n")
    assert usage_db_path("/srv/routes.yaml", off.settings) is None
    assert Policies({}).of("anyone") == KeyPolicy()  # a `keys:` without "*": no limits


@pytest.mark.parametrize(("section", "line", "words"), [
    ("keys:\n  a:\n    rpm: 3\n", 6, "keys.a: unknown key 'rpm'"),
    ("keys:\n  a:\n    models: [maclustr-nope]\n", 6, "unknown alias 'maclustr-nope'"),
    ("keys:\n  a:\n    requests_per_minute: 0\n", 6, "must be an integer >= 1"),
    ("keys:\n  a:\n    tokens_per_day: -5\n", 6, "must be an integer >= 1"),
    ("keys:\n  a:\n    max_in_flight: 1.5\n", 6, "must be an integer >= 1"),
    ("keys:\n  a:\n    admin: yes-please\n", 6, "must be true or false"),
    ("keys:\n  a:\n    models: maclustr-fast\n", 6, "must be a list of model aliases"),
    ("keys: [a, b]\n", 4, "keys must be a mapping"),
    ("gateway:\n  usage_db: true\n", 5, "usage_db must be a file path or false"),
    ("gateway:\n  usage_retention_days: 0\n", 5, "must be an integer >= 1"),
])
def test_keys_errors_name_the_line(section: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_routes(ROUTES + section, "routes.yaml")
    assert words in str(e.value) and e.value.line == line, str(e.value)


def run(policy: KeyPolicy, steps: list[tuple[float, str, Any]],
        tokens: bool = True) -> list[Any]:
    """Drive a Limiter: ("check", None) -> its verdict, ("spend", n), ("headers", None)."""
    lim = Limiter(tokens)
    out: list[Any] = []
    for at, op, arg in steps:
        now = T0 + at
        if op == "check":
            out.append(lim.check("k", policy, now))
        elif op == "spend":
            lim.spend("k", arg, now)
        else:
            out.append(lim.headers("k", policy, now))
    return out


RL = "rate_limited"


@pytest.mark.parametrize(("policy", "steps", "expected"), [
    # requests: the third in a minute waits for the first to leave the window
    (KeyPolicy(requests_per_minute=2),
     [(0, "check", None), (10, "check", None), (20, "check", None), (59.5, "check", None),
      (60, "check", None), (61, "check", None)],
     [None, None, Verdict(RL, "requests per minute", 2, 40), Verdict(RL, "requests per minute",
                                                                     2, 1),
      None, Verdict(RL, "requests per minute", 2, 9)]),
    # tokens per minute: a request that starts under the allowance runs; the next waits until
    # enough tokens leave the window to bring the sum back under the limit
    (KeyPolicy(tokens_per_minute=100),
     [(0, "check", None), (1, "spend", 60), (2, "check", None), (5, "spend", 70),
      (6, "check", None), (60.5, "check", None), (61, "check", None)],
     [None, None, Verdict(RL, "tokens per minute", 100, 55), Verdict(RL, "tokens per minute",
                                                                     100, 1), None]),
    # tokens per day: refused until the next UTC midnight
    (KeyPolicy(tokens_per_day=50),
     [(0, "spend", 50), (10, "check", None), (DAY - 3600 - 1, "check", None),
      (DAY - 3600, "check", None)],
     [Verdict("quota_exceeded", "tokens per day", 50, int(DAY - 3600 - 10)),
      Verdict("quota_exceeded", "tokens per day", 50, 1), None]),
    # the day's quota wins over a per-minute limit
    (KeyPolicy(requests_per_minute=1, tokens_per_day=10),
     [(0, "check", None), (1, "spend", 10), (2, "check", None)],
     [None, Verdict("quota_exceeded", "tokens per day", 10, int(DAY - 3600 - 2))]),
    # no limits: never a verdict
    (KeyPolicy(models=frozenset({"x"})),
     [(0, "check", None), (0, "spend", 10**9), (0, "check", None)], [None, None]),
])
def test_limiter(policy: KeyPolicy, steps: list[tuple[float, str, Any]],
                 expected: list[Any]) -> None:
    assert run(policy, steps) == expected


def test_token_limits_off_without_ledger() -> None:
    p = KeyPolicy(tokens_per_minute=1, tokens_per_day=1, requests_per_minute=5)
    assert run(p, [(0, "spend", 10), (1, "check", None), (2, "headers", None)], tokens=False) \
        == [None, {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4"}]


@pytest.mark.parametrize(("policy", "steps", "expected"), [
    (KeyPolicy(requests_per_minute=3, tokens_per_minute=100),
     [(0, "check", None), (1, "spend", 30), (2, "headers", None)],
     {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
      "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "70"}),
    (KeyPolicy(tokens_per_day=1000),  # only a day's quota: the token pair is the day's
     [(1, "spend", 300), (2, "headers", None)],
     {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "700"}),
    (KeyPolicy(requests_per_minute=1),  # remaining never below zero; window moves on
     [(0, "check", None), (1, "check", None), (2, "headers", None), (61, "headers", None)],
     {"x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "1"}),
    (KeyPolicy(admin=True), [(0, "headers", None)], {}),
])
def test_headers(policy: KeyPolicy, steps: list[tuple[float, str, Any]],
                 expected: dict[str, str]) -> None:
    assert [h for h in run(policy, steps) if isinstance(h, dict)][-1] == expected


def test_restore_from_ledger_keeps_the_allowance() -> None:
    lim = Limiter()
    p = KeyPolicy(requests_per_minute=2, tokens_per_minute=100, tokens_per_day=500)
    now = T0 + 30
    lim.restore("k", requests=[T0 - 100, T0 + 0, T0 + 10],
                tokens=[(T0 - 7200, 400), (T0 - 1, 30), (T0 + 5, 60), (T0 + 20, 50)], now=now)
    # yesterday's 400 does not count today; 30 + 60 + 50 are today's, 60 + 50 in the minute
    assert lim.tokens_left_today("k", p, now) == 500 - 140
    assert lim.check("k", p, now) == Verdict(RL, "requests per minute", 2, 30)
    assert lim.check("k", p, T0 + 61) == Verdict(RL, "tokens per minute", 100, 4)
    assert lim.check("k", p, T0 + 65.5) is None


def test_check_validates_keys(tmp_path: Path) -> None:
    """`maclustr check`: an error with file:line, and a warning for a policy whose name
    matches no key of MACLUSTR_API_KEY."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROUTES + "keys:\n  interns:\n    models: [maclustr-nope]\n")
    r = run_cli("check", "--routes", str(bad))
    assert r.returncode == 1
    assert f"{bad}:6: keys.interns.models: unknown alias 'maclustr-nope'" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(ROUTES + "keys:\n  interns: {max_in_flight: 2}\n  typo: {admin: true}\n"
                             "  '*': {tokens_per_day: 9}\n")
    r = run_cli("check", "--routes", str(good),
                env={"MACLUSTR_API_KEY": "interns:sk-1,ops:sk-2"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (f"maclustr check: {good}:6: warning: keys.typo matches no key "
                                "of MACLUSTR_API_KEY")
    assert "sk-1" not in r.stderr + r.stdout


def test_a_key_never_checked_keeps_only_its_minute() -> None:
    """With the ledger on, every key's tokens are spent, also a key without limits (never
    checked, so never expired): its window holds the last minute, not a row per request."""
    lim = Limiter()
    for i in range(1000):
        lim.spend("k", 3, T0 + i)
    w = lim.window("k")
    assert len(w.tokens) == 60 and w.minute_tokens == 180
    assert w.day_tokens == 3000  # the day still counts all (T0 is 01:00 UTC)


def test_token_window_keeps_an_entry_per_bucket_not_per_request() -> None:
    """At thousands of requests a second an entry per request kept ~240k tuples alive per
    key for the collector to walk; tokens ending within a bucket share one entry."""
    w = KeyWindow()
    t0 = 1_800_000_000.0
    for i in range(10_000):  # 10 s of 1,000 requests a second
        w.spend(3, t0 + i / 1000)
    assert len(w.tokens) <= 11
    assert w.minute_tokens == 30_000
    w.expire(t0 + 10 + WINDOW)  # all but the last bucket's start have left
    assert w.minute_tokens <= 3_000
    w.expire(t0 + 11 + WINDOW)
    assert w.minute_tokens == 0
