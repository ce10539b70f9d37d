"""Every error the gateway shows a client, in OpenAI's envelope, built in this one place.

Pure. Messages are fixed sentences about the public alias; exception text, hosts, ports, paths
and internal ids are never interpolated (an upstream's own words go through `scrub` first).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import jsonfast


class GatewayError(Exception):
    """Base of every client-visible failure. `status` is the HTTP status to answer with."""

    status = 500
    type = "server_error"
    code = "internal_error"
    shown_status = ""  # the error table's status column when not `status` (e.g. "4xx")
    anthropic_type: str | None = None  # its type in Anthropic's envelope, when not by status
    meaning = "The gateway hit an unexpected error; its log, under the request id, says where"

    def __init__(self, message: str = "The gateway hit an internal error.", *,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def answer_headers(self) -> dict[str, str]:
        """The headers of an answer carrying this error: whether a retry can help, then the
        error's own (Retry-After, WWW-Authenticate, Allow)."""
        return {**retry_headers(self.status), **self.headers}

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}

    def to_body(self) -> bytes:
        return jsonfast.dumps(self.to_dict())

    def to_sse(self) -> bytes:
        """The last event of a stream that cannot finish: OpenAI's mid-stream error shape."""
        return b"data: " + self.to_body() + b"\n\n"


def retry_headers(status: int) -> dict[str, str]:
    """`x-should-retry`, which Anthropic's and OpenAI's SDKs (and Claude Code) obey before
    their own guess: without it they retry a 401 for minutes. A 4xx no retry can change
    says false; 429, 503 and 529 (overloaded) say true, after a Retry-After (1 s unless the
    error names its own). 408, 409 and other 5xx: the client's own rule."""
    if status in (429, 503, 529):
        return {"x-should-retry": "true", "Retry-After": "1"}
    if 400 <= status < 500 and status not in (408, 409):
        return {"x-should-retry": "false"}
    return {}


class InvalidApiKey(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"
    meaning = ("Missing or wrong `Authorization: Bearer` key, on `/v1/*` and "
               "`/health?deep=generate`")

    def __init__(self, message: str = "Invalid or missing API key. Send 'Authorization: "
                 "Bearer <key>' with a key from MACLUSTR_API_KEY.") -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="maclustr"'})


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"
    meaning = ("The body is not a JSON object, or a field is wrong: `model` missing or empty, "
               "`stream` not a boolean, `n` other than 1, `stream_options` without "
               "`stream: true`")


class InvalidJSON(BadRequest):
    code = "invalid_json"
    meaning = "The body is empty or not valid JSON"


class MalformedRequest(BadRequest):
    """What the HTTP parser refused before the request reached the gateway's code."""

    code = "malformed_request"
    meaning = "Not valid HTTP/1.1 (request line, header syntax, Content-Length)"

    def __init__(self, message: str = "The request is not valid HTTP/1.1.") -> None:
        super().__init__(message)


class UnreadableLength(MalformedRequest):
    """A Content-Length of more digits than any body needs: int() refuses over 4,300, and the
    parsers let them through (aiohttp's, and the front's isdigit())."""

    def __init__(self) -> None:
        super().__init__("The Content-Length has more digits than the gateway reads.")


class HeaderTooLarge(GatewayError):
    status, type, code = 431, "invalid_request_error", "request_header_too_large"
    meaning = "The request line or a header is over the gateway's limit (32 KiB)"

    def __init__(self) -> None:
        super().__init__("The request line or a request header is longer than the gateway "
                         "accepts.")


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"
    meaning = ("Unknown model alias (the message lists the valid ones); only ever for the "
               "`model` you sent")

    def __init__(self, name: str, aliases: Iterable[str]) -> None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        super().__init__(
            f"Model '{shown}' not found. Available models: {', '.join(aliases)}", param="model"
        )


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"
    meaning = "Unknown path"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    meaning = "e.g. `GET /v1/chat/completions`"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"
    meaning = "Body over `max_body_bytes` (10 MiB by default), or the model server's 413"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than the limit of {limit} bytes.")


class UnsupportedMediaType(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"
    meaning = "A Content-Type that is not JSON-ish (multipart, ...)"


class UpstreamRejected(GatewayError):
    """The model's server refused the request (its 4xx); the status is kept, except 404:
    404 is ours alone, for an unknown alias (mlx_lm.server answers 404 when preparing the
    prompt fails), so it becomes 400."""

    type, code = "invalid_request_error", "upstream_rejected"
    shown_status = "4xx"
    meaning = ("The model server refused the request (its 404, when it cannot prepare the "
               "prompt, becomes 400): its status is kept; its message is shown only when it is "
               "one plain sentence")

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = 400 if status == 404 else status
        if status == 429:
            self.code, self.type = "rate_limit_exceeded", "rate_limit_error"
        elif status == 413:
            self.code = "request_too_large"


class UpstreamFailed(GatewayError):
    status, type, code = 502, "server_error", "upstream_unavailable"
    meaning = ("Model server unreachable (refused, DNS, reset, connect timeout), failing (its "
               "5xx; its words go to the log only) or cut off mid-answer")

    def __init__(self, alias: str, why: str = "is unreachable or failed",
                 detail: str = "") -> None:
        """`detail`: the server's own words, already scrubbed."""
        said = f": {detail}" if detail else ""
        super().__init__(
            f"Model '{alias}' {why}{said}. It may be loading or down; check /health?deep=true."
        )


class UpstreamBadResponse(UpstreamFailed):
    code = "upstream_bad_response"
    meaning = "The model server answered something that is not valid JSON / SSE"

    def __init__(self, alias: str) -> None:
        super().__init__(alias, "sent a response the gateway could not understand")


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "server_error", "upstream_timeout"
    meaning = "No first byte within `first_byte`, or silence longer than `idle`"

    def __init__(self, alias: str, phase: str) -> None:
        super().__init__(
            f"Model '{alias}' did not answer in time ({phase}). It may be loading or overloaded; "
            "check /health?deep=true."
        )


class ModelUnavailable(GatewayError):
    """Every replica of the model is out (failed repeatedly, cooling down)."""

    status, type, code = 503, "server_error", "model_unavailable"
    meaning = "Every replica of the model is out after repeated failures (`Retry-After` set)"

    def __init__(self, alias: str, retry_after: int) -> None:
        super().__init__(f"Model '{alias}' is temporarily unavailable (all its servers are "
                         "down or recovering); retry shortly or check /health?deep=true.",
                         headers={"Retry-After": str(retry_after)})


class Overloaded(GatewayError):
    """The model's queue is full, or a request waited `queue_timeout` for a slot."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    meaning = ("The model's queue is full, no slot freed within `queue_timeout`, or the model "
               "server's 429 (`Retry-After` set; the SDKs retry)")

    def __init__(self, alias: str, why: str, retry_after: int, reason: str = "queue_full"
                 ) -> None:
        super().__init__(f"Model '{alias}' is busy: {why}. Retry after {retry_after} s.",
                         headers={"Retry-After": str(retry_after)})
        self.reason = reason  # the rejections metric's label: queue_full or queue_timeout


class ModelNotAllowed(GatewayError):
    status, type, code = 403, "permission_error", "model_not_allowed"
    meaning = "The key's `keys:` policy does not list this model alias in its `models`"

    def __init__(self, key: str, alias: str) -> None:
        super().__init__(f"The key '{key}' may not use model '{alias}'.", param="model")


class AdminOnly(GatewayError):
    status, type, code = 403, "permission_error", "admin_only"
    meaning = ("`/metrics`, `/health?deep=generate`, in-flight figures and `/v1/usage` need a "
               "key whose `keys:` policy says `admin: true`")

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"The key '{key}' is not an admin key; {what} needs one "
                         "('admin: true' under keys: in routes.yaml).")


class RateLimited(GatewayError):
    """A key past its requests_per_minute or tokens_per_minute (`keys:` in routes.yaml)."""

    status, type, code = 429, "rate_limit_error", "rate_limited"
    anthropic_type: str | None = "rate_limit_error"
    meaning = ("The key is past its `requests_per_minute` or `tokens_per_minute` (`Retry-After`: "
               "seconds until the oldest entry leaves the 60 s window)")

    def __init__(self, key: str, what: str, limit: int, retry_after: int,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"The key '{key}' is over its limit of {limit} {what}. Retry after "
                         f"{retry_after} s.",
                         headers={**(headers or {}), "Retry-After": str(retry_after)})


class QuotaExceeded(RateLimited):
    code = "quota_exceeded"
    meaning = ("The key used its `tokens_per_day` (`Retry-After`: seconds until the next UTC "
               "midnight)")

    def __init__(self, key: str, what: str, limit: int, retry_after: int,
                 headers: dict[str, str] | None = None) -> None:
        # Hours away as a rule: an SDK's own retries would only spin until then.
        super().__init__(key, what, limit, retry_after,
                         {**(headers or {}), "x-should-retry": "false"})


class ShuttingDown(GatewayError):
    status, type, code = 503, "server_error", "gateway_shutting_down"
    meaning = ("The gateway is restarting: new requests during a shutdown, and the last event of "
               "a stream still running when the grace ran out")

    def __init__(self) -> None:
        super().__init__("The gateway is restarting; retry the request.")


# --- the error table: the page, openapi.json and the README's table are this ----------------


@dataclass(frozen=True)
class ErrorRow:
    status: str  # "404", or "4xx" for a status the model server chose
    type: str
    code: str
    meaning: str  # one plain sentence; `backticks` mark literals


def error_table() -> tuple[ErrorRow, ...]:
    """Every error the gateway answers with, one row per (status, code), from the classes
    themselves: each carries its status, type, code and meaning."""
    rows: dict[tuple[str, str], ErrorRow] = {}
    todo: list[type[GatewayError]] = [GatewayError]
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        row = ErrorRow(cls.shown_status or str(cls.status), cls.type, cls.code, cls.meaning)
        rows.setdefault((row.status, row.code), row)
    return tuple(sorted(rows.values(), key=lambda r: (r.status[0], r.status[1:].isdigit() is False,
                                                      r.status, r.code)))


# --- scrubbing -------------------------------------------------------------------------------

_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# Absolute or ~/./.. paths (not "user/assistant/user", whose slash follows a word), relative
# paths that end in a file name, and the usual top-level directories on their own.
_PATH = re.compile(r"(?<![\w])(?:~|\.{0,2})?/(?:[\w.@+-]+/)+[\w.@+-]*|"
                   r"\b[\w.@+-]+(?:/[\w.@+-]+)+\.[A-Za-z0-9]{1,12}\b|"
                   r"/(?:Users|home|srv|opt|var|tmp|root|Volumes|private|mnt|data)\b[^\s'\"]*")
_HOSTPORT = re.compile(r"(?:\b\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]|\b[\w-]+(?:\.[\w-]+)*)"
                       r":\d{2,5}\b")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IPV6 = re.compile(r"\[?(?:[0-9a-fA-F]{0,4}:){1,7}:[0-9a-fA-F:.]*\]?|"
                   r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b")
_LOCAL_HOST = re.compile(r"\b[\w-]+\.(?:local|lan|internal|home|corp)\b", re.IGNORECASE)
_MAX_MESSAGE = 300


def scrub(text: str, *, alias: str, model: str, upstreams: Iterable[str],
          secrets: Iterable[str] = ()) -> str:
    """Make an upstream's message safe to show a client.

    Each of `secrets` becomes `<redacted>`; the internal model id becomes the alias; every
    replica's URL, host and port, and anything shaped like a URL, filesystem path, host:port
    or IP address become `<internal>`. The result is one short line and may be empty.
    """

    def bounded(name: str) -> str:
        return rf"(?<![\w.-]){re.escape(name)}(?![\w-])"

    out = text
    for secret in secrets:  # e.g. the upstream's API key, which servers like to echo
        if secret:
            out = out.replace(secret, "<redacted>")
    out = re.sub(bounded(model), alias, out) if model else out
    out = _URL.sub("<internal>", out)
    names = {n for u in upstreams for p in (urlsplit(u),)
             for n in (p.netloc, p.hostname or "", str(p.port or ""))}
    for name in sorted((n for n in names if n), key=len, reverse=True):
        out = re.sub(bounded(name), "<internal>", out)
    out = _HOSTPORT.sub("<internal>", out)
    out = _PATH.sub("<internal>", out)
    out = _IPV6.sub("<internal>", out)
    out = _IPV4.sub("<internal>", out)
    out = _LOCAL_HOST.sub("<internal>", out)
    out = " ".join(out.split())
    if len(out) > _MAX_MESSAGE:
        out = out[: _MAX_MESSAGE - 3] + "..."
    return out


_MAX_HUMAN = 200
_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"|\bline \d+, in\b",
                        re.MULTILINE)


def upstream_message(text: str, *, alias: str, model: str, upstreams: Iterable[str],
                     secrets: Iterable[str] = ()) -> str:
    """An upstream's 4xx text when it reads as one message for a person, else "".

    Its first line, at most `_MAX_HUMAN` characters, from a text with no traceback, naming
    no path, host or address (after the internal model id became the alias). Anything else
    is the server's business: the client gets our own words, the log gets theirs.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or _TRACEBACK.search(text):
        return ""
    first = lines[0]
    if len(first) > _MAX_HUMAN:
        return ""
    clean = scrub(first, alias=alias, model=model, upstreams=upstreams, secrets=secrets)
    return "" if "<internal>" in clean or "<redacted>" in clean else clean
