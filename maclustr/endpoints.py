"""Every HTTP endpoint, declared once: method, path, auth, summary and what it answers.

Pure data. The router (app.make_app), `/openapi.json`'s paths (openapi.py: one operation
builder per `operation`), the front page's endpoint list (page.py) and metrics' list of API
endpoints are built from ENDPOINTS; tests check the README's endpoint table and that the
OpenAPI paths are the router's. A new endpoint: one Endpoint here, its handler in app.py's
handler table under the same `operation`, its operation builder in openapi.OPERATIONS, and a
README row.
"""

from __future__ import annotations

from dataclasses import dataclass

BEARER = "Bearer"
EITHER = "x-api-key or Bearer"  # the Anthropic clients send x-api-key
NONE = "none"


@dataclass(frozen=True)
class Endpoint:
    method: str  # GET or POST (a GET also answers HEAD when `head`)
    path: str  # as OpenAPI writes it; `{name}` matches the rest of the path
    auth: str
    operation: str  # OpenAPI operationId; names the handler and the operation builder
    summary: str  # one line, markdown (`code`): OpenAPI's summary, the front page's line
    api: bool = False  # an inference endpoint, counted in maclustr_requests_total
    head: bool = False
    metrics_only: bool = False  # served only with `gateway.metrics: true`


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", BEARER, "createChatCompletion",
             "Chat completions, unary JSON or streamed (`\"stream\": true`, Server-Sent "
             "Events ending with `data: [DONE]`); the OpenAI parameters pass through",
             api=True),
    Endpoint("POST", "/v1/completions", BEARER, "createCompletion",
             "Text completions (`prompt`), unary or streamed", api=True),
    Endpoint("POST", "/v1/responses", BEARER, "createResponse",
             "OpenAI's Responses API, for Codex CLI and `client.responses`: stateless (send "
             "the whole conversation in `input`), unary or streamed, function tools included",
             api=True),
    Endpoint("POST", "/v1/messages", EITHER, "createMessage",
             "Anthropic's Messages API, for Claude Code and the `anthropic` SDKs: unary or "
             "streamed, tools included", api=True),
    Endpoint("POST", "/v1/messages/count_tokens", EITHER, "countMessageTokens",
             "Anthropic's token count: an estimate (about 4 bytes of text per token)"),
    Endpoint("GET", "/v1/models", BEARER, "listModels",
             "The model aliases, OpenAI list format, with `description` and `parameters`"),
    Endpoint("GET", "/v1/models/{model}", BEARER, "getModel", "One model card"),
    Endpoint("GET", "/v1/usage", BEARER, "usage",
             "Requests and tokens per key, model and UTC day from the usage ledger "
             "(`?since=7d&by=key,model`); an `admin: true` key when routes.yaml has `keys:`"),
    Endpoint("GET", "/health", NONE, "health",
             "Gateway status and models; `?deep=true` checks every model server (200 or "
             "503), `?deep=generate` (with a key) also asks each for one token", head=True),
    Endpoint("GET", "/", NONE, "page",
             "This page: the models with live status, quick start, errors", head=True),
    Endpoint("GET", "/openapi.json", NONE, "openapi",
             "This API as an OpenAPI 3.1 document", head=True),
    Endpoint("GET", "/metrics", BEARER, "metrics",
             "Prometheus metrics: requests, latency, tokens per key, queue and replica state "
             "(no key with `gateway.metrics_public`)", metrics_only=True),
)

API_PATHS = frozenset(e.path for e in ENDPOINTS if e.api)
POST_PATHS = frozenset(e.path for e in ENDPOINTS if e.method == "POST")


def served(metrics: bool) -> tuple[Endpoint, ...]:
    """The endpoints a gateway with `gateway.metrics` = `metrics` serves."""
    return tuple(e for e in ENDPOINTS if metrics or not e.metrics_only)


def aiohttp_path(path: str) -> str:
    """`{name}` as aiohttp routes it: the rest of the path (an alias may hold slashes)."""
    return path.replace("}", ":.+}")
