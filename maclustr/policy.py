"""Team keys: what a key may do (routes.yaml `keys:`) and the arithmetic of its limits.

Pure: no aiohttp, no sqlite, no clock of its own (every call is given `now`, wall-clock
seconds, so a test can move time and a restart can reload the windows from the ledger).

A key's requests count when admitted; its tokens (prompt + completion, from the upstream's
usage) count when the request ends, so a request that starts under its allowance runs to its
end. `requests_per_minute` and `tokens_per_minute` are sliding 60 s windows; `tokens_per_day`
is per UTC day. Retry-After is the seconds until the request would pass: the window's oldest
entry leaving, or the next UTC midnight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

WINDOW = 60.0  # seconds of the per-minute limits
DAY = 86400.0
DEFAULT = "*"  # the policy of every key without an entry of its own

# The fields a policy may have: name -> kind ("aliases", "limit" (integer >= 1), "flag").
POLICY_FIELDS: dict[str, str] = {
    "models": "aliases", "requests_per_minute": "limit", "tokens_per_minute": "limit",
    "tokens_per_day": "limit", "max_in_flight": "limit", "admin": "flag",
}


@dataclass(frozen=True)
class KeyPolicy:
    """One entry of `keys:`. None: no such limit (`models` None: every alias)."""

    models: frozenset[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_in_flight: int | None = None
    admin: bool = False
    line: int | None = field(default=None, compare=False)  # of its name in routes.yaml

    def allows(self, alias: str) -> bool:
        return self.models is None or alias in self.models

    @property
    def limited(self) -> bool:
        """Whether its answers carry the x-ratelimit-* headers."""
        return (self.requests_per_minute or self.tokens_per_minute
                or self.tokens_per_day) is not None


UNLIMITED = KeyPolicy()
ADMIN = KeyPolicy(admin=True)  # every key when there is no `keys:` section


@dataclass(frozen=True)
class Policies:
    """The `keys:` section, by key name; `"*"` is the default entry."""

    by_name: Mapping[str, KeyPolicy] = field(default_factory=dict)

    def of(self, name: str) -> KeyPolicy:
        found = self.by_name.get(name)
        if found is None:
            found = self.by_name.get(DEFAULT, UNLIMITED)
        return found

    @property
    def in_flight_limits(self) -> bool:
        return any(p.max_in_flight is not None for p in self.by_name.values())


NO_POLICIES = None  # RouteTable.keys without a `keys:` section: every key admin, no limits


@dataclass(frozen=True)
class Verdict:
    """Why a request may not start now: `code` rate_limited or quota_exceeded."""

    code: str
    what: str  # "requests per minute", "tokens per minute", "tokens per day"
    limit: int
    retry_after: int  # whole seconds, at least 1


def next_midnight(now: float) -> float:
    return (math.floor(now / DAY) + 1) * DAY


def utc_day(now: float) -> int:
    """The UTC day number of a wall-clock time (days since the epoch)."""
    return math.floor(now / DAY)


def _wait(seconds: float) -> int:
    return max(1, math.ceil(seconds))


# Tokens that end within this many seconds of a window entry's start join that entry: at
# thousands of requests a second, an entry per request kept ~240k tuples alive per key, and
# every full collection walked them (5 -> 13 ms as the minute filled). The cost: a bucket's
# tokens leave the window up to this much early.
TOKEN_BUCKET = 1.0


class KeyWindow:
    """One key's recent requests and tokens. Entries older than the window are dropped as
    time goes; the day's tokens restart at each UTC midnight."""

    __slots__ = ("day", "day_tokens", "minute_tokens", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()  # admission times
        self.tokens: deque[tuple[float, int]] = deque()  # (end time, tokens)
        self.minute_tokens = 0
        self.day = -1
        self.day_tokens = 0

    def expire(self, now: float) -> None:
        edge = now - WINDOW
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.minute_tokens -= self.tokens.popleft()[1]
        if utc_day(now) != self.day:
            self.day, self.day_tokens = utc_day(now), 0

    def admit(self, now: float) -> None:
        self.requests.append(now)

    def spend(self, tokens: int, at: float) -> None:
        """Tokens of a request that ended at `at` (kept in time order for the window)."""
        if tokens <= 0:
            return
        if utc_day(at) > self.day:
            self.day, self.day_tokens = utc_day(at), 0
        if utc_day(at) == self.day:
            self.day_tokens += tokens
        last = self.tokens[-1] if self.tokens else None
        if last is not None and 0 <= at - last[0] < TOKEN_BUCKET:
            self.tokens[-1] = (last[0], last[1] + tokens)  # one entry per bucket, not per request
        else:
            self.tokens.append((at, tokens))
        self.minute_tokens += tokens
        edge = at - WINDOW  # bounded here too: a key without limits is never checked (expire)
        while self.tokens[0][0] <= edge:
            self.minute_tokens -= self.tokens.popleft()[1]
        if len(self.tokens) > 1 and self.tokens[-2][0] > at:  # a restore out of order
            self.tokens = deque(sorted(self.tokens))

    def verdict(self, p: KeyPolicy, now: float, tokens: bool) -> Verdict | None:
        """None when a request may start now. `tokens`: whether token limits apply."""
        self.expire(now)
        if tokens and p.tokens_per_day is not None and self.day_tokens >= p.tokens_per_day:
            return Verdict("quota_exceeded", "tokens per day", p.tokens_per_day,
                           _wait(next_midnight(now) - now))
        rpm = p.requests_per_minute
        if rpm is not None and len(self.requests) >= rpm:
            oldest_to_leave = self.requests[len(self.requests) - rpm]
            return Verdict("rate_limited", "requests per minute", rpm,
                           _wait(oldest_to_leave + WINDOW - now))
        tpm = p.tokens_per_minute
        if tokens and tpm is not None and self.minute_tokens >= tpm:
            left = self.minute_tokens
            for at, n in self.tokens:  # the entry whose leaving brings the sum under tpm
                left -= n
                if left < tpm:
                    return Verdict("rate_limited", "tokens per minute", tpm,
                                   _wait(at + WINDOW - now))
        return None

    def headers(self, p: KeyPolicy, now: float, tokens: bool) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers. The token pair is the per-minute limit, or the
        day's when only that is set."""
        self.expire(now)
        out: dict[str, str] = {}
        if p.requests_per_minute is not None:
            out["x-ratelimit-limit-requests"] = str(p.requests_per_minute)
            out["x-ratelimit-remaining-requests"] = str(
                max(0, p.requests_per_minute - len(self.requests)))
        if tokens and p.tokens_per_minute is not None:
            out["x-ratelimit-limit-tokens"] = str(p.tokens_per_minute)
            out["x-ratelimit-remaining-tokens"] = str(
                max(0, p.tokens_per_minute - self.minute_tokens))
        elif tokens and p.tokens_per_day is not None:
            out["x-ratelimit-limit-tokens"] = str(p.tokens_per_day)
            out["x-ratelimit-remaining-tokens"] = str(
                max(0, p.tokens_per_day - self.day_tokens))
        return out


class Limiter:
    """Every key's window. `tokens`: whether token limits apply (off without a ledger)."""

    def __init__(self, tokens: bool = True) -> None:
        self.tokens = tokens
        self._keys: dict[str, KeyWindow] = {}

    def window(self, name: str) -> KeyWindow:
        w = self._keys.get(name)
        if w is None:
            w = self._keys[name] = KeyWindow()
        return w

    def check(self, name: str, p: KeyPolicy, now: float) -> Verdict | None:
        """A verdict against the request, or None after counting it as admitted."""
        w = self.window(name)
        v = w.verdict(p, now, self.tokens)
        if v is None and p.requests_per_minute is not None:
            w.admit(now)
        return v

    def spend(self, name: str, tokens: int, at: float) -> None:
        self.window(name).spend(tokens, at)

    def headers(self, name: str, p: KeyPolicy, now: float) -> dict[str, str]:
        return self.window(name).headers(p, now, self.tokens) if p.limited else {}

    def tokens_left_today(self, name: str, p: KeyPolicy, now: float) -> int | None:
        if p.tokens_per_day is None:
            return None
        w = self.window(name)
        w.expire(now)
        return max(0, p.tokens_per_day - w.day_tokens)

    def restore(self, name: str, requests: Iterable[float],
                tokens: Iterable[tuple[float, int]], now: float) -> None:
        """What the ledger says a key did in the last minute (and the day's tokens, given as
        entries of today): a restart does not reset anyone's allowance."""
        w = self.window(name)
        w.expire(now)
        for at in sorted(requests):
            if at > now - WINDOW:
                w.admit(at)
        for at, n in sorted(tokens):
            if utc_day(at) == w.day:
                w.day_tokens += n
            if at > now - WINDOW:
                w.tokens.append((at, n))
                w.minute_tokens += n
