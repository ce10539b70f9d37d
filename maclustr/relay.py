"""The only code that touches both sockets: one client request, one upstream request.

Read top to bottom like Go's ReverseProxy.ServeHTTP: send upstream under a deadline, map
every failure before the response starts to one GatewayError, then either relay a unary JSON
body or relay an event stream frame by frame. Once stream bytes have reached the client a
failure can only be reported in-band: one final `data: {"error": ...}` event, then the
connection is closed.

A translated request (Call.dialect: Anthropic Messages, OpenAI Responses) is an ordinary chat
completion by the time it gets here; only the last step differs: the stream's bytes go through
the dialect's ChatEventRewriter instead of SSERewriter, a unary body through its translator,
and the in-band error is the dialect's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import jsonfast
from .config import Route
from .dialect import ChatEventRewriter, Dialect
from .errors import (
    GatewayError,
    ModelUnavailable,
    Overloaded,
    ShuttingDown,
    UpstreamBadResponse,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    upstream_message,
)
from .exchange import Answer, Exchange
from .headers import SERVER, SSE_HEADERS, upstream_headers
from .outcome import Outcome
from .scheduler import Replica, Scheduler
from .sse import SSEError, SSERewriter, rewrite_body, usage_of
from .upstream import Client, Response

log = logging.getLogger("maclustr.relay")

MAX_UNARY_BYTES = 64 * 1024 * 1024  # a unary completion larger than this is not a completion
MAX_ERROR_BYTES = 64 * 1024


class Watchdog:
    """Cancels the handler task when no progress was made for `limit` seconds.

    Progress is `touch()`: a cheap clock read per read or write on the hot path, instead of a
    timer per await. `fired` tells the handler that the cancellation was ours, not the
    client's disconnect or a shutdown.
    """

    __slots__ = ("_handle", "_loop", "_task", "fired", "last", "limit", "phase")

    def __init__(self, limit: float, phase: str) -> None:
        self._loop = loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # with the loop: one getpid() syscall, not two
        assert task is not None
        self._task = task
        self.limit = limit
        self.phase = phase
        self.fired = False
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + limit, self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def rearm(self, limit: float, phase: str) -> None:
        """Start a new phase. The timer moves only if it must fire earlier; a late check just
        re-schedules itself (one timer per request instead of one per phase)."""
        self.limit, self.phase = limit, phase
        self.touch()
        due = self.last + limit
        if due < self._handle.when():
            self._handle.cancel()
            self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        due = self.last + self.limit
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.fired = True
        self._task.cancel()

    def absorb(self) -> None:
        """Undo our own cancellation so the handler can still answer (Python 3.11+)."""
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is not None:
            uncancel()


@dataclass(frozen=True)
class Upstream:
    """What every relay shares: the upstream client, the replica scheduler, and whether we
    are shutting down (a cancellation then is a shutdown, reported in-band)."""

    client: Client
    scheduler: Scheduler
    shutting_down: asyncio.Event


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per request
class Call:
    """One client request as the relay sees it. `key` is the API key's name (queue
    fairness, metrics); `prefix` the conversation hash (replica affinity), None when not needed.
    `usage`: the client asked for the stream's usage event (it is always asked of upstream, for
    the metrics; a client that did not ask never sees it)."""

    path: str
    body: bytes
    stream: bool
    rid: str
    key: str
    prefix: str | None
    dialect: Dialect | None = None  # a translated API (Anthropic, Responses); None: OpenAI
    usage: bool = True


MAX_ATTEMPTS = 3  # replicas tried for one request, before any byte reached the client

# Outcome -> passive-health verdict. Only an unreachable, silent or dying server counts
# against a replica; a garbled answer is no sign the next request will fail too.
_VERDICT: dict[str, bool | None] = {"done": True, "upstream_bad_response": None,
                                    "upstream_unavailable": False, "upstream_timeout": False}


async def relay(ex: Exchange, up: Upstream, route: Route, call: Call) -> Answer | None:
    """Send the call to one of `route`'s replicas and answer the client: a whole `Answer`,
    or None when the answer was streamed to the client already.

    Failover: a replica that refuses the connection, resets it, or answers 502/503 before we
    sent the client anything is reported to the scheduler and the next replica is tried.
    """
    sched = up.scheduler
    o = ex.outcome
    o.phase = "queue"
    queued = time.perf_counter()
    replica: Replica | None = (sched.free_slot(route, call.prefix)
                               or await _acquire(sched, route, call, o))
    assert replica is not None
    o.queue_wait = time.perf_counter() - queued
    o.phase = "upstream"
    t = route.timeouts
    dog = Watchdog(t.connect, "connect")
    tried: list[str] = []
    ok: bool | None = None
    try:
        while True:
            tried.append(replica.url)
            o.replica = replica_name(route, replica)
            retry = len(tried) < min(MAX_ATTEMPTS, len(route.upstreams))
            failed: UpstreamFailed | None = None
            resp = None
            try:
                resp = await _open(up, route, replica.url, call, dog)
            except UpstreamFailed as e:
                if not retry:
                    raise
                failed = e
            else:
                if resp.status not in (502, 503) or not retry:
                    break
            # This replica failed before the client saw a byte: free it and try another,
            # waiting for a slot if the others are busy but up.
            if sched.all_down(route, tried):
                if failed is not None:
                    raise failed
                break  # relay this replica's 502/503 as the answer
            if resp is not None:
                resp.close()
            sched.release(replica, ok=False)
            replica = None  # released: the finally below must not release it again
            o.failovers += 1
            nxt = sched.take(route, call.prefix, tried)
            if nxt is None:
                dog.rearm(route.queue_timeout + 5, "waiting for a slot")
                o.phase = "queue"
                nxt = await _acquire(sched, route, call, o, tuple(tried))
                o.phase = "upstream"
            replica = nxt
            dog.rearm(t.connect, "connect")
        assert resp is not None
        try:
            dog.rearm(t.idle, "idle between bytes")
            if resp.status >= 400:
                ok = resp.status not in (502, 503, 504)  # alive unless it says otherwise
                raise await _upstream_error(resp, route, call.rid, dog)
            if resp.status != 200:
                raise UpstreamBadResponse(route.alias)
            ctype = resp.content_type
            collect = call.dialect.collect if call.dialect is not None else None
            out: Answer | None
            if ctype == "text/event-stream" and not call.stream and collect is not None:
                assert call.dialect is not None
                out = await relay_collected(resp, route, call.dialect, call.rid, dog, o)
                ok = True
            elif ctype == "text/event-stream":
                if not call.stream:
                    raise UpstreamBadResponse(route.alias)
                rewriter = (SSERewriter(route.alias, route.model, strip_usage=not call.usage,
                                        fingerprint=replica.fingerprint)
                            if call.dialect is None
                            else ChatEventRewriter(call.dialect.stream()))
                try:
                    await relay_stream(ex, up, resp, route, call.rid, dog, rewriter)
                finally:  # a stream cut short has still shown its fingerprint
                    if isinstance(rewriter, SSERewriter) and rewriter.fingerprint is not None:
                        replica.fingerprint = rewriter.fingerprint  # the next stream splices
                out = None
                ok = _VERDICT.get(o.code, False)
            elif call.stream or ctype != "application/json":
                raise UpstreamBadResponse(route.alias)
            elif call.dialect is not None:
                out = await relay_translated(resp, route, call.dialect, call.rid, dog, o)
                ok = True
            else:
                out = await relay_unary(resp, route, replica, call.rid, dog, o)
                ok = True
        finally:
            resp.close()  # mid-body this drops the socket: the server stops generating
        if ok:
            sched.remember(route, call.prefix, replica)
        return out
    except (UpstreamFailed, UpstreamTimeout) as e:
        if ok is None:
            ok = _VERDICT.get(e.code, False)
        raise
    finally:
        dog.stop()
        if replica is not None:
            sched.release(replica, ok)


async def _acquire(sched: Scheduler, route: Route, call: Call, o: Outcome,
                   exclude: tuple[str, ...] = ()) -> Replica:
    """A slot, noting why the scheduler refused one (for the rejections metric)."""
    try:
        return await sched.acquire(route, call.key, call.prefix, exclude)
    except Overloaded as e:
        o.rejection = e.reason
        raise
    except ModelUnavailable:
        o.rejection = "unavailable"
        raise


def replica_name(route: Route, replica: Replica) -> str:
    """What logs and metrics call a replica: its index in the route's upstreams, never its
    address."""
    try:
        return str(route.upstreams.index(replica.url))
    except ValueError:  # the table was reloaded without it
        return "-"


async def _open(up: Upstream, route: Route, base: str, call: Call, dog: Watchdog) -> Response:
    """Connect and wait for the response head, mapping every failure to our envelope."""
    t = route.timeouts
    try:
        return await up.client.request(
            "POST", base, call.path, call.body, upstream_headers(call.rid, _upstream_key(route)),
            on_connected=lambda: dog.rearm(t.first_byte, "waiting for the first byte"))
    except asyncio.CancelledError:
        if not dog.fired:
            raise
        dog.absorb()
        if dog.phase == "connect":
            raise UpstreamFailed(route.alias, "did not accept a connection in time") from None
        raise UpstreamTimeout(route.alias, dog.phase) from None
    except (OSError, ValueError) as e:  # UpstreamError is an OSError
        log.warning("%s a server of %s is unreachable: %s", call.rid, route.alias,
                    type(e).__name__)
        raise UpstreamFailed(route.alias) from None


async def relay_unary(resp: Response, route: Route, replica: Replica, rid: str,
                      dog: Watchdog, o: Outcome) -> Answer:
    data = await _read_capped(resp, MAX_UNARY_BYTES, route, dog)
    try:
        out, replica.fingerprint = rewrite_body(data, route.alias, route.model,
                                                replica.fingerprint)
    except SSEError:
        raise UpstreamBadResponse(route.alias) from None
    if out[:1] != b"{":
        raise UpstreamBadResponse(route.alias)
    o.usage(usage_of(out))
    o.bytes_out = len(out)
    return Answer(200, out, {"Content-Type": "application/json", "X-Request-Id": rid,
                             "Server": SERVER})


async def relay_translated(resp: Response, route: Route, dialect: Dialect, rid: str,
                           dog: Watchdog, o: Outcome) -> Answer:
    """A unary chat completion, translated into the client's dialect (which names the alias
    and nothing of the upstream's own answer but its content and usage)."""
    data = await _read_capped(resp, MAX_UNARY_BYTES, route, dog)
    try:
        completion = jsonfast.loads(data)
        if not isinstance(completion, dict) or dialect.unary is None:
            raise ValueError("not a completion")
        answer = dialect.unary(completion)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise UpstreamBadResponse(route.alias) from None
    o.usage(completion.get("usage"))
    return _json_answer(answer, rid, o)


async def relay_collected(resp: Response, route: Route, dialect: Dialect, rid: str,
                          dog: Watchdog, o: Outcome) -> Answer:
    """A unary answer built from an upstream stream: the dialect's events, folded. Reading
    stops when the dialect's answer is complete (its [DONE], or an Anthropic stop sequence);
    the caller's resp.close() then hangs up, which stops the generation."""
    assert dialect.collect is not None
    rewriter = ChatEventRewriter(dialect.stream())
    parts: list[bytes] = []
    size = 0
    try:
        with _BodyRead(route, dog):
            while not rewriter.done:
                chunk = await resp.read()
                if not chunk:
                    raise UpstreamFailed(route.alias, "stopped in the middle of the response")
                dog.touch()
                events = rewriter.feed(chunk)
                size += len(events)
                if size > MAX_UNARY_BYTES:
                    raise UpstreamBadResponse(route.alias)
                parts.append(events)
        answer = dialect.collect(b"".join(parts))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise UpstreamBadResponse(route.alias) from None  # SSEError is a ValueError
    o.usage(rewriter.usage)
    return _json_answer(answer, rid, o)


def _json_answer(answer: dict[str, Any], rid: str, o: Outcome) -> Answer:
    body = jsonfast.dumps(answer)
    o.bytes_out = len(body)
    return Answer(200, body, {"Content-Type": "application/json", "X-Request-Id": rid,
                              "Server": SERVER})


CLIENT_HIGH_WATER = 256 * 1024  # bytes queued for a slow client before the upstream pauses
CLIENT_LOW_WATER = 64 * 1024


async def relay_stream(ex: Exchange, up: Upstream, resp: Response, route: Route,
                       rid: str, dog: Watchdog, rewriter: SSERewriter | ChatEventRewriter
                       ) -> None:
    """Relay an event stream. Each upstream read is rewritten and written to the client inside
    the socket callback (`Response.pump`): no buffering and no task switch per read, so an
    event reaches the client the moment its last byte arrives.

    `rewriter` is the OpenAI passthrough (SSERewriter) or a dialect's ChatEventRewriter;
    both take upstream bytes at any cut and return the client's bytes.

    Backpressure: past CLIENT_HIGH_WATER bytes queued for a slow client, reading from the
    upstream pauses until the client has taken all but CLIENT_LOW_WATER, so memory per stream
    stays bounded and TCP flow control reaches the model server.
    """
    o = ex.outcome
    # The server chooses the framing: chunked for HTTP/1.1, close-delimited for 1.0.
    chunked = await ex.start_stream({**SSE_HEADERS, "X-Request-Id": rid})
    o.phase = "response"
    transport = ex.transport
    if transport is None:
        raise ConnectionResetError("client gone")
    write = transport.write
    buffered = transport.get_write_buffer_size
    touch = dog.touch
    state = {"bad": False, "full": False}

    def sink(data: bytes) -> None:
        touch()
        try:
            chunk = rewriter.feed(data)
        except Exception as e:  # runs inside data_received: never let it escape
            if not isinstance(e, SSEError):
                log.exception("%s relay of %s failed", rid, route.alias)
            state["bad"] = True
            resp.pause()
            resp.halt()
            return
        if chunk:
            if transport.is_closing():
                resp.pause()
                resp.halt()
                return
            write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            o.bytes_out += len(chunk)
            if o.first_at is None and chunk.find(b"data:") >= 0:  # not a `: keepalive` comment
                o.first_event()
            if buffered() > CLIENT_HIGH_WATER:
                state["full"] = True
                resp.pause()
                resp.halt()
        if rewriter.done:
            resp.halt()

    failure: GatewayError | None = None
    try:
        resp.pump(sink)
        while True:
            await resp.wait()
            if state["bad"]:
                failure = UpstreamBadResponse(route.alias)
            elif rewriter.done:
                pass
            elif transport.is_closing():
                raise ConnectionResetError("client gone")
            elif state["full"]:
                await _drained(transport, buffered, dog)
                state["full"] = False
                resp.resume()
                continue
            else:
                failure = UpstreamFailed(route.alias, "stopped in the middle of the response")
            break
    except asyncio.CancelledError:
        if dog.fired:
            dog.absorb()
            failure = UpstreamTimeout(route.alias, dog.phase)
        elif up.shutting_down.is_set() and not _client_gone(ex):
            o.usage(rewriter.usage)
            err = ShuttingDown()
            o.fail(err.status, err.code)
            _finish_with(ex, chunked, err, rewriter)
            raise
        else:
            o.usage(rewriter.usage)
            raise
    except OSError:
        o.usage(rewriter.usage)
        if _client_gone(ex):
            raise
        failure = UpstreamFailed(route.alias, "stopped in the middle of the response")
    o.usage(rewriter.usage)
    if failure is not None:
        o.fail(failure.status, failure.code)
        _finish_with(ex, chunked, failure, rewriter)
        return None
    await ex.end_stream()
    return None


async def _drained(transport: asyncio.BaseTransport, buffered: Callable[[], int],
                   dog: Watchdog) -> None:
    """Wait for a slow client to take its queued bytes. Polls: this runs only under
    backpressure. Progress counts as activity for the idle timeout; a client that takes
    nothing for `idle` seconds is timed out by the watchdog."""
    last = buffered()
    while last > CLIENT_LOW_WATER and not transport.is_closing():
        await asyncio.sleep(0.005)
        now = buffered()
        if now < last:
            dog.touch()
        last = now


def _finish_with(ex: Exchange, chunked: bool, error: GatewayError,
                 rewriter: SSERewriter | ChatEventRewriter) -> None:
    """End a started stream with one error event, then close the connection without the
    chunked terminator: nothing follows the error, and no client mistakes the connection
    for reusable or the body for complete (Go's ErrAbortHandler, in effect). A dialect says
    it its own way (Anthropic `event: error`, Responses `response.failed`)."""
    last = error.to_sse() if isinstance(rewriter, SSERewriter) else rewriter.fail(error)
    transport = ex.transport
    if transport is None or transport.is_closing():
        return
    transport.write(b"%x\r\n%b\r\n" % (len(last), last) if chunked else last)
    transport.close()  # flushes what is buffered, then closes


def _client_gone(ex: Exchange) -> bool:
    tr = ex.transport
    return tr is None or tr.is_closing()


async def _read_capped(resp: Response, cap: int, route: Route, dog: Watchdog) -> bytes:
    if resp.content_length is not None and resp.content_length > cap:
        raise UpstreamBadResponse(route.alias)
    parts: list[bytes] = []
    size = 0
    with _BodyRead(route, dog):
        while True:
            chunk = await resp.read()
            if not chunk:
                break
            dog.touch()
            size += len(chunk)
            if size > cap:
                raise UpstreamBadResponse(route.alias)
            parts.append(chunk)
    return b"".join(parts)


class _BodyRead:
    """A body read's failures as our errors: the watchdog's own cancellation is a timeout
    (any other cancellation passes), a socket error an upstream that died mid-answer.
    A class, not @contextmanager: its generator cost ~1 us on every unary request."""

    __slots__ = ("dog", "route")

    def __init__(self, route: Route, dog: Watchdog) -> None:
        self.route = route
        self.dog = dog

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if kind is None:
            return
        if issubclass(kind, asyncio.CancelledError):
            if not self.dog.fired:
                return
            self.dog.absorb()
            raise UpstreamTimeout(self.route.alias, self.dog.phase) from None
        if issubclass(kind, OSError):
            raise UpstreamFailed(self.route.alias,
                                 "stopped in the middle of the response") from None


async def _upstream_error(resp: Response, route: Route, rid: str,
                          dog: Watchdog) -> GatewayError:
    """Map the upstream's 4xx/5xx to our envelope. A 5xx's text (stack traces, load
    failures) goes to the log only; a 4xx's passes when it reads as one human message."""
    try:
        raw = await _read_capped(resp, MAX_ERROR_BYTES, route, dog)
    except UpstreamBadResponse:
        raw = b""
    text = _error_text(raw)
    status = resp.status
    log.warning("%s upstream for %s answered %d: %.1000r", rid, route.alias, status, text)
    if 400 <= status < 500 and status not in (401, 403, 407):
        key = _upstream_key(route)
        said = upstream_message(text, alias=route.alias, model=route.model,
                                upstreams=route.upstreams, secrets=(key,) if key else ())
        if status == 404 and not said:  # mlx: preparing the prompt (or loading) failed
            return UpstreamFailed(route.alias, "could not prepare the request")
        msg = f"Model '{route.alias}' rejected the request"
        return UpstreamRejected(status, f"{msg}: {said}" if said else f"{msg}.")
    return UpstreamFailed(route.alias, f"failed (upstream status {status})")


def _error_text(raw: bytes) -> str:
    """The message inside mlx's `{"error": "..."}`, OpenAI's `{"error": {"message": ...}}`, or
    plain text."""
    try:
        obj = jsonfast.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")[:1000]
    if isinstance(obj, dict):
        e = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(e, dict):
            e = e.get("message")
        if isinstance(e, str):
            return e
    return ""


def _upstream_key(route: Route) -> str | None:
    """Read at request time, so rotating the upstream's key needs no gateway restart."""
    if route.api_key_env is None:
        return None
    return os.environ.get(route.api_key_env) or None
