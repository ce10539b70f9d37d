"""A model server that is dead or hung: the verdicts, the restart command and the restart budget.

Why: mlx_lm.server's generation thread can die (every completion then answers 404
`{"error": "generation thread died"}`, /health 503) or block forever (/health still 200), and
launchd's KeepAlive sees neither: the process is up. The gateway sees it from live traffic.

Pure: no I/O and no clock reads (callers pass `now`), so each rule is a unit test. The wiring
(healer.py) runs the probe and the command; scheduler.py keeps the replica states;
restarts.py picks a replica's command from routes.yaml.
"""

from __future__ import annotations

import string
from collections import deque
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

GENERATION_DIED = "generation thread died"  # mlx-lm >= 0.32's answer once the thread is gone
DEFAULT_STALL_AFTER = 120.0  # seconds without a byte, with requests in flight: suspect
DEFAULT_RESTART_LIMIT = 3  # restarts per replica per WINDOW
WINDOW = 3600.0
COMMAND_TIMEOUT = 60.0  # a restart command running longer is killed and counts as failed
PLACEHOLDERS = ("alias", "host", "port", "url")


# Replica states beyond up/down: suspect (silent too long, probe running), wedged (dead or
# hung and out of rotation; stays so when it cannot be restarted), restarting (the command
# ran; waiting for /health and one token).
STATES = ("up", "suspect", "wedged", "restarting", "down")
REASONS = ("dead", "wedged")


def is_dead_answer(status: int, text: str) -> bool:
    """mlx's answer once its generation thread died: a 404 saying so. Any other 404 is a
    prompt the model could not take, the client's error."""
    return status == 404 and text.strip() == GENERATION_DIED


def is_dead_health(status: int) -> bool:
    """/health answers 503 (`{"status": "unavailable"}`) when the thread is gone; a server
    that does not answer at all is down, not dead (launchd restarts a process that exits)."""
    return status == 503


def stalled(in_flight: int, last_byte: float, now: float, stall_after: float) -> bool:
    """Suspect: requests in flight and none of the replica's connections delivered a byte
    (head, `: keepalive` comment or token) for `stall_after` seconds. mlx sends a keepalive
    per prefill step, so a live server is never silent that long."""
    return in_flight > 0 and now - last_byte >= stall_after


class RestartBudget:
    """At most `limit` restarts in any `window` seconds (a sliding window of start times)."""

    __slots__ = ("_times", "limit", "window")

    def __init__(self, limit: int = DEFAULT_RESTART_LIMIT, window: float = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def _forget(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()

    def allows(self, now: float) -> bool:
        self._forget(now)
        return len(self._times) < self.limit

    def spend(self, now: float) -> None:
        self._forget(now)
        self._times.append(now)

    def used(self, now: float) -> int:
        self._forget(now)
        return len(self._times)


# --- the restart command -------------------------------------------------------------------


def placeholders(arg: str) -> list[str]:
    """The `{names}` in one argument (`{{` and `}}` are literal braces). Raises ValueError on
    an unbalanced brace."""
    return [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]


def unknown_placeholders(argv: Iterable[str]) -> list[str]:
    """Placeholders a restart command may not use (what `maclustr check` refuses)."""
    bad: list[str] = []
    for arg in argv:
        try:
            names = placeholders(arg)
        except ValueError:
            bad.append(arg)
            continue
        bad += [n or "{}" for n in names if n not in PLACEHOLDERS]
    return bad


def replica_values(alias: str, url: str) -> dict[str, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"alias": alias, "host": parts.hostname or "", "port": str(port), "url": url}


def render(argv: Sequence[str], alias: str, url: str) -> tuple[str, ...]:
    """The argv to run for one replica: each placeholder replaced, nothing else (no shell)."""
    values = replica_values(alias, url)
    return tuple(arg.format_map(values) for arg in argv)
