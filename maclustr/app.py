"""Wiring: the routes, the one error funnel, shared objects on typed AppKeys, lifecycle.

Two servers carry requests (exchange.py): the front (front.py) serves the POST endpoints
itself, aiohttp the rest. Both go through `serve`: request id, the `Outcome` reported once
(metrics and one access-log line), CORS preflight, shutdown, the API key (bearer on /v1/*
and /metrics, or x-api-key on /v1/messages*), then the handler, with every error rendered
as an OpenAI envelope, or Anthropic's on /v1/messages*.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from . import anthropic, health, jsonfast, responses
from .auth import KeyRing, bearer_token
from .body import ask_for_usage, check_content_type, parse_request, upstream_body, wants_stream
from .config import Route, RouteTable, usage_db_path
from .dialect import Dialect
from .endpoints import ENDPOINTS, aiohttp_path, served
from .errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    InvalidApiKey,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ShuttingDown,
    UnreadableLength,
)
from .exchange import Answer, Exchange, client_gone
from .front import FrontExchange, FrontServer
from .headers import SERVER, cors, request_id
from .heal import is_dead_health
from .healer import Healer
from .ledger import ReportError, aggregate, parse_by, parse_since
from .metrics import KeyGauges, LastMinute, Metrics
from .openapi import openapi_document
from .outcome import Outcome, access_line
from .page import CSP, base_url, render_page
from .relay import Backends, Call, relay
from .reload import RoutesHolder
from .scheduler import Scheduler, conversation_prefix
from .upstream import Client
from .usage import (
    MODEL_ENDPOINTS,
    KeyUsage,
    allowed_aliases,
    check_access,
    policy_of,
    require_admin,
)
from .usage_db import report_rows
from .warmup import Warmer, generate_one

log = logging.getLogger("maclustr.access")

ROUTES = web.AppKey("routes", RoutesHolder)
KEYS = web.AppKey("keys", KeyRing)
BACKENDS = web.AppKey("backends", Backends)
STARTED = web.AppKey("started", int)
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
IN_FLIGHT = web.AppKey("in_flight", set)  # handler tasks, for the shutdown grace
DEEP_HEALTH = web.AppKey("deep_health", health.DeepCache)
USAGE = web.AppKey("usage", KeyUsage)  # team keys: windows and the ledger (from start)
METRICS = web.AppKey("metrics", Metrics)  # absent when gateway.metrics is false
LAST_MINUTE = web.AppKey("last_minute", LastMinute)  # the front page's figures (with METRICS)
LOG_FORMAT = web.AppKey("log_format", str)  # access log: "text" or "json"
# Where access-log lines go when `maclustr serve` runs: straight into its log stream (the
# logging module's record, lock and formatting cost ~15 µs a request). Absent: logging.
ACCESS_WRITER: web.AppKey[Callable[[str], None]] = web.AppKey("access_writer")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A POST endpoint's handler, the same under either server.
PostHandler = Callable[[web.Application, Exchange], Awaitable[Answer | None]]
R = TypeVar("R")
_JSON = {"Content-Type": "application/json", "Server": SERVER}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=jsonfast.dumps(obj), status=status,
                        headers={**_JSON, **(headers or {})})


def json_answer(obj: Any) -> Answer:
    return Answer(200, jsonfast.dumps(obj), dict(_JSON))


# Paths whose clients expect another error envelope than OpenAI's (the Responses API uses
# OpenAI's own, so it needs no entry).
_ERROR_SHAPES: tuple[tuple[str, Callable[[GatewayError], tuple[int, bytes]]], ...] = (
    ("/v1/messages", anthropic.error_answer),
)


def error_answer(err: GatewayError, path: str = "") -> Answer:
    status, body = next((shape(err) for prefix, shape in _ERROR_SHAPES
                         if path.startswith(prefix)), (err.status, b""))
    return Answer(status, body or err.to_body(), {**_JSON, **err.answer_headers()})


def web_response(answer: Answer) -> web.Response:
    return web.Response(body=answer.body, status=answer.status, headers=answer.headers)


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        return NotFound(f"Unknown path '{request.path[:100]}'. See /v1/models and /health.")
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.path[:100]}.")
        if allowed:
            err.headers["Allow"] = allowed
        return err
    if exc.status == 413:
        return BodyTooLarge(request.app[ROUTES].current.settings.max_body_bytes)
    # Any other refusal from aiohttp: one of the documented codes, never one made up here.
    return BadRequest(f"{exc.reason or 'Bad request'}.") if exc.status < 500 else GatewayError()


def report(app: web.Application, o: Outcome) -> None:
    """The one place a finished request is counted and logged."""
    o.finish()
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.observe(o)
    usage = app.get(USAGE)
    if usage is not None:
        usage.observe(o)
    up = app.get(BACKENDS)
    if up is not None:
        up.scheduler.leave(asyncio.current_task())  # its key's max_in_flight slot
    if log.isEnabledFor(logging.INFO):
        line = access_line(o, app[LOG_FORMAT])
        write = app.get(ACCESS_WRITER)
        if write is not None:
            write(line)
        else:
            log.info("%s", line)


async def serve(app: web.Application, ex: Exchange, endpoint: str,
                handler: Callable[[], Awaitable[R]]) -> R | Answer:
    """The one error funnel, for both servers: whatever `handler` raises becomes one
    envelope, and the request's Outcome is reported exactly once."""
    rid = ex.rid = request_id(ex.header("X-Request-Id"))
    o = ex.outcome = Outcome(rid, time.perf_counter(), ex.method, endpoint)
    ex.key = "-"
    result: R | Answer
    in_flight = app[IN_FLIGHT]
    task = asyncio.current_task()
    in_flight.add(task)
    try:
        if ex.method == "OPTIONS":  # CORS preflight, for any path, without auth
            result = Answer(204, b"", {"Server": SERVER})
        elif app[SHUTTING_DOWN].is_set():
            raise ShuttingDown()
        else:
            authenticate(app, ex)
            result = await handler()
    except GatewayError as e:
        result = error_answer(e, ex.path)
        o.fail(e.status, e.code)
    except (asyncio.CancelledError, ConnectionError) as e:
        cut = _cut_short(app, ex, o, e)
        if cut is None:
            report(app, o)
            raise
        result = cut
        if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
            task.uncancel()  # answered: the cancel is spent
    except Exception:
        log.exception("%s %s %s failed", rid, ex.method, endpoint)
        result = error_answer(GatewayError(), ex.path)
        o.fail(500, GatewayError.code)
    finally:
        in_flight.discard(task)
    if o.code == "done":
        o.status = getattr(result, "status", 200)  # None: streamed, a 200
    report(app, o)
    return result


def _cut_short(app: web.Application, ex: Exchange, o: Outcome, e: BaseException
               ) -> Answer | None:
    """A request that ended early: the client left (499), or the shutdown grace ran out,
    which is the gateway's 503, answered when nothing was sent yet. None: nothing to send."""
    if o.code != "done":  # a shutdown the relay already reported in-band
        return None
    if not (isinstance(e, asyncio.CancelledError) and app[SHUTTING_DOWN].is_set()
            and not client_gone(ex)):
        o.gone()
        return None
    err = ShuttingDown()
    o.fail(err.status, err.code)
    return None if ex.started else error_answer(err, ex.path)


def authenticate(app: web.Application, ex: Exchange) -> None:
    path = ex.path
    if path.startswith("/v1/") or (
            path == "/metrics" and not app[ROUTES].current.settings.metrics_public):
        token = bearer_token(ex.header("Authorization"))
        anthropic_path = path.startswith("/v1/messages")
        if token is None and anthropic_path:  # Anthropic clients send x-api-key
            token = (ex.header("x-api-key") or "").strip() or None
        name = app[KEYS].check(token)
        if name is None:
            raise InvalidApiKey(_ANTHROPIC_KEY_HELP) if anthropic_path else InvalidApiKey()
        ex.key = ex.outcome.key = name
        if path == "/metrics":
            require_admin(app[ROUTES].current, name, "/metrics")


# Never the words "x-api-key": Claude Code then prints "Not logged in · Please run /login"
# instead of this message (it takes them for Anthropic's own missing-key answer).
_ANTHROPIC_KEY_HELP = ("Invalid or missing API key. Set ANTHROPIC_API_KEY (or "
                       "ANTHROPIC_AUTH_TOKEN) to a key from MACLUSTR_API_KEY: it is sent as the "
                       "API key header or as 'Authorization: Bearer <key>'.")


class AiohttpExchange:
    """An Exchange over aiohttp's request (the connections the front handed over)."""

    __slots__ = ("key", "method", "outcome", "path", "request", "response", "rid")
    outcome: Outcome

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.path = request.path
        self.response: web.StreamResponse | None = None
        self.rid = "-"
        self.key = "-"

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name)

    @property
    def content_type(self) -> str:
        return self.request.content_type if "Content-Type" in self.request.headers else ""

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.request.transport

    async def drain(self) -> None:
        await self.request.writer.drain()  # aiohttp's protocol waits for its resume_writing

    @property
    def started(self) -> bool:
        return self.response is not None

    async def body(self, limit: int) -> bytes:
        return await read_body(self.request, limit)

    async def start_stream(self, headers: dict[str, str]) -> bool:
        out = self.response = web.StreamResponse(headers=headers)
        await out.prepare(self.request)  # aiohttp chose the framing here
        return out.headers.get("Transfer-Encoding", "").lower() == "chunked"

    async def end_stream(self) -> None:
        assert self.response is not None
        await self.response.write_eof()


EXCHANGE = web.RequestKey("exchange", AiohttpExchange)


@web.middleware
async def frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's side of `serve`: its own refusals (404, 405, 413) become envelopes too."""
    ex = request[EXCHANGE] = AiohttpExchange(request)
    resource = request.match_info.route.resource
    endpoint = resource.canonical if resource is not None else "-"  # never a model id

    async def run() -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            # aiohttp keeps its 404/405 in the request's match_info: the traceback (this
            # frame, the request) would make a cycle per refusal (issue 25)
            e.__traceback__ = None
            raise _from_http_exception(e, request) from None

    result = await serve(request.app, ex, endpoint, run)
    return web_response(result) if isinstance(result, Answer) else result


def on_aiohttp(handler: PostHandler) -> Handler:
    """A POST handler served by aiohttp (after the front handed its connection over)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        ex = request[EXCHANGE]
        answer = await handler(request.app, ex)
        if answer is not None:
            return web_response(answer)
        assert ex.response is not None
        return ex.response

    return handle


async def add_response_headers(request: web.Request, resp: web.StreamResponse) -> None:
    """on_response_prepare: request id and CORS on every answer aiohttp sends, including a
    stream the relay prepares itself (a middleware sees it only after its headers are sent),
    and `Server: maclustr` over aiohttp's default (its name and version, e.g. on /metrics)."""
    resp.headers["Server"] = SERVER
    # Taken out, not read: the request holds the exchange and the exchange the request, a
    # cycle that would wait for the collector (issue 25); nothing reads it after this.
    ex = request.pop(EXCHANGE, None)
    if ex is not None and ex.rid != "-":
        resp.headers["X-Request-Id"] = ex.rid
    if ex is not None:
        resp.headers.update(rate_headers(request.app, ex))
    origins = request.app[ROUTES].current.settings.cors_origins
    if origins:
        resp.headers.update(cors(request.headers.get("Origin"), origins))


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes without reading them all."""
    try:
        length = request.content_length
    except ValueError:  # more digits than int() reads: aiohttp's parser let them through
        raise UnreadableLength() from None
    if length is not None:
        if length > limit:
            raise BodyTooLarge(limit)
        return await request.read()  # bounded by the length just checked
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


async def _request(app: web.Application, ex: Exchange) -> tuple[RouteTable, dict[str, Any]]:
    """The live table (one snapshot for the whole request) and the checked JSON body."""
    table = app[ROUTES].current
    check_content_type(ex.content_type)
    return table, parse_request(await ex.body(table.settings.max_body_bytes))


def _route_for(app: web.Application, ex: Exchange, table: RouteTable, payload: dict[str, Any],
               admit: bool = True) -> Route:
    """The request's route, once its key may use it now (`keys:`): 403 for a model outside
    its list, 429 past its rates or quota; `admit` False: access only (nothing counted)."""
    route = table.resolve(payload["model"])
    if route is None:
        raise ModelNotFound(payload["model"], allowed_aliases(table, ex.key))
    usage = app.get(USAGE)
    if admit and usage is not None:
        usage.admit(table, ex.key, route.alias)
    else:
        check_access(table, ex.key, route.alias)
    return route


def rate_headers(app: web.Application, ex: Exchange) -> dict[str, str]:
    """x-ratelimit-* on every model answer of a key with limits."""
    usage = app.get(USAGE)
    if usage is None or ex.key == "-" or ex.path not in MODEL_ENDPOINTS:
        return {}
    return usage.headers(app[ROUTES].current, ex.key)


def completions_handler(path: str) -> PostHandler:
    """POST /v1/chat/completions or /v1/completions, routed by the body's `model`."""

    async def handle(app: web.Application, ex: Exchange) -> Answer | None:
        table, payload = await _request(app, ex)
        route = _route_for(app, ex, table, payload)
        o = ex.outcome
        o.model, o.stream = route.alias, wants_stream(payload)
        prefix = conversation_prefix(payload) if len(route.upstreams) > 1 else None
        usage = ask_for_usage(payload)
        call = Call(path=path, stream=o.stream, rid=ex.rid, key=ex.key, prefix=prefix,
                    usage=usage, body=upstream_body(payload, route.model))
        return await relay(ex, app[BACKENDS], route, call)

    return handle


async def relay_chat(app: web.Application, ex: Exchange, route: Route, chat: dict[str, Any],
                     dialect: Dialect, stream: bool) -> Answer | None:
    """Send a translated request (already a chat completion) through the ordinary relay:
    routing, queueing, failover, timeouts, disconnect and shutdown are the same. `stream`:
    whether the client gets a stream (the upstream always streams, see Dialect)."""
    o = ex.outcome
    o.model, o.stream = route.alias, stream
    prefix = conversation_prefix(chat) if len(route.upstreams) > 1 else None
    call = Call(path="/v1/chat/completions", stream=stream, rid=ex.rid, key=ex.key,
                prefix=prefix, body=jsonfast.dumps(chat), dialect=dialect)
    return await relay(ex, app[BACKENDS], route, call)


async def messages(app: web.Application, ex: Exchange) -> Answer | None:
    """POST /v1/messages: Anthropic's Messages API, unary or streamed, over chat completions.
    Routed by path alone (Claude Code adds `?beta=true`) and the body's `model`."""
    table, payload = await _request(app, ex)
    route = _route_for(app, ex, table, payload)
    chat = anthropic.to_chat(payload, route.model)
    estimate = anthropic.estimate_tokens(chat)
    alias, stops = route.alias, anthropic.stop_sequences(payload)
    dialect = Dialect(new_stream=lambda: anthropic.AnthropicStream(alias, estimate, stops),
                      collect=anthropic.collect)
    return await relay_chat(app, ex, route, chat, dialect, stream=payload.get("stream") is True)


async def responses_api(app: web.Application, ex: Exchange) -> Answer | None:
    """POST /v1/responses: OpenAI's Responses API (Codex CLI speaks nothing else), unary or
    streamed, over chat completions. Stateless: the client resends the whole history."""
    table, payload = await _request(app, ex)
    route = _route_for(app, ex, table, payload)
    chat = responses.to_chat(payload, route.model)
    alias = route.alias
    dialect = Dialect(new_stream=lambda: responses.ResponsesStream(alias),
                      collect=responses.collect)
    return await relay_chat(app, ex, route, chat, dialect, stream=payload.get("stream") is True)


async def count_tokens(app: web.Application, ex: Exchange) -> Answer | None:
    """POST /v1/messages/count_tokens: an estimate (anthropic.estimate_tokens says how); the
    tokenizer lives with the model on its node, and asking it would cost a prompt pass."""
    table, payload = await _request(app, ex)
    route = _route_for(app, ex, table, payload, admit=False)
    ex.outcome.model = route.alias
    payload.pop("stream", None)
    return json_answer({"input_tokens": anthropic.estimate_tokens(
        anthropic.to_chat(payload, route.model))})


# The POST endpoints, served by the front (and by aiohttp on handed-over connections).
POST_HANDLERS: dict[str, PostHandler] = {  # by endpoints.Endpoint.operation
    "createChatCompletion": completions_handler("/v1/chat/completions"),
    "createCompletion": completions_handler("/v1/completions"),
    "createMessage": messages,
    "countMessageTokens": count_tokens,
    "createResponse": responses_api,
}
POST_ROUTES: dict[str, PostHandler] = {
    e.path: POST_HANDLERS[e.operation] for e in ENDPOINTS if e.method == "POST"}


def _model_card(request: web.Request, alias: str) -> dict[str, Any]:
    route = request.app[ROUTES].current.resolve(alias)
    assert route is not None
    table = request.app[ROUTES].current
    return {"id": route.alias, "object": "model", "created": request.app[STARTED],
            "owned_by": "maclustr", "description": route.description,
            "parameters": route.parameters,
            "status": health.passive_status(table, request.app[BACKENDS].scheduler, alias)}


async def list_models(request: web.Request) -> web.Response:
    """The aliases the key may use (`keys:`), every alias without that section."""
    table = request.app[ROUTES].current
    return json_response({"object": "list", "data": [
        _model_card(request, a) for a in allowed_aliases(table, request[EXCHANGE].key)]})


async def get_model(request: web.Request) -> web.Response:
    table = request.app[ROUTES].current
    name = request.match_info["model"]
    route = table.resolve(name)
    if route is None:
        raise ModelNotFound(name, allowed_aliases(table, request[EXCHANGE].key))
    check_access(table, request[EXCHANGE].key, route.alias)
    return json_response(_model_card(request, route.alias))


async def get_health(request: web.Request) -> web.Response:
    table = request.app[ROUTES].current
    deep = request.query.get("deep", "").lower()
    up = request.app[BACKENDS]
    generate = deep == "generate"
    if not generate and deep not in ("1", "true", "yes"):
        return json_response(health.shallow(table))
    # Public: states only. `generate` makes every replica produce a token: key holders only.
    keyed = request.app[KEYS].check(bearer_token(request.headers.get("Authorization")))
    if generate and keyed is None:
        raise InvalidApiKey("'/health?deep=generate' asks every model for a token and needs "
                            "'Authorization: Bearer <key>'; '?deep=true' is public.")
    if generate:
        require_admin(table, keyed, "'/health?deep=generate'")
    admin = keyed is not None and policy_of(table, keyed).admin  # in-flight figures
    report = await request.app[DEEP_HEALTH].get(table, up.client, up.scheduler, generate)
    shown = report if admin else health.public(report)
    return json_response(shown, status=200 if report["status"] == "ok" else 503)


async def get_usage(request: web.Request) -> web.Response:
    """GET /v1/usage?since=...&by=...: the ledger's report (admin keys), the same rows as
    `maclustr usage --format json`."""
    table = request.app[ROUTES].current
    require_admin(table, request[EXCHANGE].key, "/v1/usage")
    usage = request.app[USAGE]
    if usage.db is None:
        raise NotFound("The usage ledger is off ('gateway.usage_db: false').")
    try:
        since = parse_since(request.query.get("since"), time.time())
        by = parse_by(request.query.get("by"))
    except ReportError as e:
        raise BadRequest(str(e).replace("--", "")) from None
    await asyncio.to_thread(usage.flush)
    try:
        rows = await asyncio.to_thread(report_rows, usage.db, since)
    except sqlite3.Error as e:
        log.error("usage ledger cannot be read for /v1/usage: %s", e)
        rows = []
    return json_response({"object": "list", "data": aggregate(rows, by)})


async def front_page(request: web.Request) -> web.Response:
    """GET /: the API page, rebuilt from the live table on every load (no auth)."""
    table = request.app[ROUTES].current
    base = base_url(table.settings.public_url, request.headers, request.scheme)
    last = request.app.get(LAST_MINUTE)
    load = last.figures(table.aliases) if last is not None else None
    return web.Response(text=render_page(table, base, load), content_type="text/html",
                        headers={"Server": SERVER, "Cache-Control": "no-cache",
                                 "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff"})


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: the OpenAPI 3.1 document of this gateway (no auth)."""
    return json_response(openapi_document(request.app[ROUTES].current),
                         headers={"Cache-Control": "no-cache"})


def make_front(app: web.Application, fallback: Callable[[], asyncio.Protocol]) -> FrontServer:
    """The front server for the POST routes, on the same funnel and handlers as aiohttp's."""

    async def dispatch(ex: FrontExchange) -> Answer | None:
        post = POST_ROUTES[ex.path]
        return await serve(app, ex, ex.path, lambda: post(app, ex))

    def response_headers(ex: FrontExchange, headers: dict[str, str]) -> dict[str, str]:
        out = {**headers, "X-Request-Id": ex.rid} if ex.rid != "-" else dict(headers)
        limits = rate_headers(app, ex)
        if limits:
            out.update(limits)
        origins = app[ROUTES].current.settings.cors_origins
        if origins:
            out.update(cors(ex.header("Origin"), origins))
        return out

    return FrontServer(frozenset(POST_ROUTES), dispatch, fallback, response_headers,
                       lambda: app[ROUTES].current.settings.max_body_bytes)


def make_app(holder: RoutesHolder, keys: KeyRing, log_format: str = "text",
             access_writer: Callable[[str], None] | None = None) -> web.Application:
    """`gateway.metrics` is read here, once: turning metrics on or off takes a restart."""
    # The body cap is enforced by read_body from the live table; this is only a hard ceiling.
    app = web.Application(middlewares=[frame], client_max_size=2**40)
    app[ROUTES] = holder
    app[KEYS] = keys
    app[LOG_FORMAT] = log_format
    if access_writer is not None:
        app[ACCESS_WRITER] = access_writer
    if holder.current.settings.metrics:
        metrics = app[METRICS] = Metrics(
            lambda: holder.current,
            lambda: app[BACKENDS].scheduler if BACKENDS in app else None)
        holder.results.append(metrics.reloaded)
        metrics.registry.register(KeyGauges(
            lambda: keys.names,
            lambda name: app[USAGE].tokens_left_today(holder.current, name)
            if USAGE in app else None))
        app[LAST_MINUTE] = LastMinute(metrics)
        app.cleanup_ctx.append(_sample_last_minute)
    app[STARTED] = int(time.time())
    app[SHUTTING_DOWN] = asyncio.Event()
    app[IN_FLIGHT] = set()
    app[DEEP_HEALTH] = health.DeepCache()
    app.on_response_prepare.append(add_response_headers)
    app.cleanup_ctx.append(_backends)
    app.cleanup_ctx.append(_key_usage)
    gets: dict[str, Handler] = {
        "listModels": list_models, "getModel": get_model, "usage": get_usage,
        "health": get_health, "page": front_page, "openapi": openapi_json}
    if METRICS in app:
        gets["metrics"] = make_aiohttp_handler(app[METRICS].registry)
    for e in served(METRICS in app):
        if e.method == "POST":
            app.router.add_post(e.path, on_aiohttp(POST_ROUTES[e.path]))
        else:
            app.router.add_get(aiohttp_path(e.path), gets[e.operation], allow_head=e.head)
    return app


async def _sample_last_minute(app: web.Application) -> AsyncIterator[None]:
    """Feeds the front page's last-minute figures: a registry sample every few seconds."""
    last = app[LAST_MINUTE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(last.SAMPLE)
            last.sample()

    task = asyncio.ensure_future(loop())
    try:
        yield
    finally:
        task.cancel()


async def _key_usage(app: web.Application) -> AsyncIterator[None]:
    """Team keys' windows and ledger: the ledger's totals are read back before the first
    request; its last rows are written at cleanup."""
    holder = app[ROUTES]
    settings = holder.current.settings
    db = usage_db_path(holder.path, settings)
    usage = app[USAGE] = await asyncio.to_thread(KeyUsage, db, settings.usage_retention_days)
    try:
        yield
    finally:
        await asyncio.to_thread(usage.close)


def _secrets(holder: RoutesHolder) -> Callable[[], list[str]]:
    """What a restart command's output must never show in the log: the gateway's keys and
    the upstreams' keys, as the environment holds them now."""

    def read() -> list[str]:
        keys = [e.rpartition(":")[2].strip()
                for e in os.environ.get("MACLUSTR_API_KEY", "").split(",")]
        keys += [os.environ.get(r.api_key_env, "") for r in holder.current.routes
                 if r.api_key_env]
        return [k for k in keys if k]

    return read


async def _backends(app: web.Application) -> AsyncIterator[None]:
    """The upstream client, scheduler and warmer: created at start, closed at cleanup."""
    client = Client()
    holder = app[ROUTES]
    warmer: Warmer | None = None

    def on_return(url: str) -> None:  # a replica back from passive-health exile
        if warmer is not None:
            warmer.warm_table(holder.current, only_url=url)

    async def probe(url: str) -> bool:
        """A replica returns from exile when its /health answers, and (probe_generate) when
        it also produces a token: /health alone says ok while generation is wedged. A 503
        is a dead generation thread: the healer's."""
        table = holder.current
        status, _ = await health.ping_status(client, url, table.settings.health_timeout)
        if status is not None and is_dead_health(status):
            scheduler.declare(url, "dead")
        ok = status == 200
        if ok and table.settings.probe_generate:
            route = next((r for r in table.routes if url in r.upstreams), None)
            if route is not None:
                ok = await generate_one(client, route, url, table.settings.generate_timeout)
        return ok

    scheduler = Scheduler(probe, on_return)
    warmer = Warmer(client, scheduler)
    healer = Healer(client, scheduler, lambda: holder.current, warmer, _secrets(holder))
    healer.start()
    app[BACKENDS] = Backends(client=client, scheduler=scheduler,
                             shutting_down=app[SHUTTING_DOWN])

    def keep_routed(table: RouteTable) -> None:
        client.keep_only(table.upstreams)
        scheduler.keep_only(table.upstreams)
        scheduler.set_policies(table.keys)

    holder.listeners += [warmer.warm_table, keep_routed]
    warmer.warm_table(holder.current)
    keep_routed(holder.current)
    try:
        yield
    finally:
        holder.listeners.remove(warmer.warm_table)
        holder.listeners.remove(keep_routed)
        warmer.close()
        healer.close()
        scheduler.close()
        client.close()
