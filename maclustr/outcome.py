"""What happened to one request: filled in as the request goes, reported once at its end.

Pure (no aiohttp, no prometheus). The `frame` middleware creates an `Outcome` per request,
the handler and the relay fill in what they learn (key name, alias, replica, time to first
token, usage, bytes), and at the end the same record feeds the metrics (`Metrics.observe`)
and the access log (`access_line`). So /metrics, the log and the front page count the same
things, and nothing the log or a label shows comes from anywhere else.

Everything here is public: the key's *name*, the *alias*, the replica's *name* (its index in
the route's upstreams). Never a secret, an address or an internal model id.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

CLIENT_GONE = 499  # the `code` of a request whose client left before the end (nginx's)


@dataclass(slots=True)
class Outcome:
    """One request. Times are `time.perf_counter()` seconds; `ttft` and `duration` are
    seconds since `start`. `code` is "done" or the error code the client got."""

    rid: str
    start: float
    method: str = "GET"
    endpoint: str = "-"
    key: str = "-"
    model: str = "-"
    stream: bool = False
    status: int = 0  # the HTTP status the client got (an in-band stream error: its status)
    code: str = "done"
    replica: str = "-"
    phase: str = "request"  # where it was: request, queue, upstream, response
    queue_wait: float | None = None  # seconds waited for a slot (None: never got one)
    ttft: float | None = None  # to the first `data:` event the client was sent (streams)
    first_at: float | None = None  # perf_counter of that event
    duration: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt, when the upstream says
    bytes_out: int = 0
    failovers: int = 0
    rejection: str | None = None  # queue_full, queue_timeout, unavailable (the scheduler's no)
    client_gone: bool = False

    def first_event(self) -> None:
        """The first `data:` event was just written to the client."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.ttft = self.first_at - self.start

    def usage(self, usage: Any) -> None:
        """Take the token counts of an OpenAI `usage` object (ignored when malformed)."""
        if not isinstance(usage, dict):
            return
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _count(p) and _count(c):
            self.prompt_tokens, self.completion_tokens = p, c
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            if _count(cached):
                self.cached_tokens = cached

    def fail(self, status: int, code: str) -> None:
        self.status, self.code = status, code

    def gone(self) -> None:
        self.client_gone = True
        self.status, self.code = CLIENT_GONE, "client_disconnected"

    def finish(self) -> None:
        self.duration = time.perf_counter() - self.start

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds per token after the first, for streams that produced at least two."""
        n = self.completion_tokens
        if self.first_at is None or n is None or n < 2:
            return None
        return (self.start + self.duration - self.first_at) / (n - 1)

    @property
    def error(self) -> str | None:
        return None if self.code == "done" else self.code


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def access_record(o: Outcome, now: float | None = None) -> dict[str, Any]:
    """The access log's JSON object (one per request)."""
    when = time.time() if now is None else now
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        + f".{int(when % 1 * 1000):03d}Z",
        "request_id": o.rid, "key": o.key, "model": o.model, "method": o.method,
        "endpoint": o.endpoint, "stream": o.stream, "status": o.status,
        "replica": o.replica, "ttft_ms": _ms(o.ttft), "duration_ms": _ms(o.duration),
        "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
        "bytes_out": o.bytes_out, "error": o.error,
    }


def access_line(o: Outcome, fmt: str) -> str:
    """One access-log line: `json` (one object) or `text` (the default, key=value)."""
    if fmt == "json":
        return json.dumps(access_record(o), separators=(",", ":"))
    ttft = f" ttft_ms={o.ttft * 1e3:.1f}" if o.ttft is not None else ""
    tokens = (f" tokens={o.prompt_tokens}+{o.completion_tokens}"
              if o.prompt_tokens is not None else "")
    return (f"{o.rid} key={o.key} {o.method} {o.endpoint} model={o.model} status={o.status} "
            f"ms={o.duration * 1e3:.1f}{ttft} replica={o.replica}{tokens} bytes={o.bytes_out} "
            f"outcome={o.code}")
