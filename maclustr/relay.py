"""The only code that touches both sockets: one client request, one upstream request.

`relay` reads like Go's ReverseProxy.ServeHTTP: take a slot on a replica; open the upstream
request with failover (`_open_with_failover`: the response to answer with, or our error);
answer by content type (`_answerer`: a unary JSON body, a relayed event stream, or a
dialect's stream folded into one answer; each returns the answer and the replica's verdict);
release the slot once. Every failure before the answer starts is one GatewayError. Once
stream bytes have reached the client a failure can only be reported in-band: one final
`data: {"error": ...}` event (a dialect's own error events), then the connection is closed.

A translated request (Call.dialect: Anthropic Messages, OpenAI Responses) is an ordinary chat
completion by the time it gets here, always streamed upstream; only the last step differs:
the stream's bytes go through the dialect's ChatEventRewriter instead of SSERewriter, and a
unary answer is the dialect's events folded (`Dialect.collect`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
from .heal import is_dead_answer
from .outcome import Outcome
from .scheduler import Replica, Scheduler
from .sse import SSEError, SSERewriter, rewrite_body, usage_of
from .upstream import Client, Response

log = logging.getLogger("maclustr.relay")

MAX_UNARY_BYTES = 64 * 1024 * 1024  # a unary completion larger than this is not a completion
MAX_ERROR_BYTES = 64 * 1024
MAX_ATTEMPTS = 3  # replicas tried for one request, before any byte reached the client
WEDGED = "its server was found wedged"  # the watchdog phase of a kicked request
CLIENT_HIGH_WATER = 256 * 1024  # bytes queued for a slow client before the upstream pauses
CLIENT_LOW_WATER = 64 * 1024  # ... and resumes

# Outcome -> passive-health verdict. Only an unreachable, silent or dying server counts
# against a replica; a garbled answer is no sign the next request will fail too.
_VERDICT: dict[str, bool | None] = {"done": True, "upstream_bad_response": None,
                                    "upstream_unavailable": False, "upstream_timeout": False}


@dataclass(frozen=True)
class Backends:
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
    # A stream moved to another replica after its head (and only comments) reached the
    # client: the rewriter and framing it goes on with, on the same connection.
    moved: tuple[SSERewriter | ChatEventRewriter, bool] | None = None


class Watchdog:
    """Cancels the handler task when no progress was made for `limit` seconds.

    Progress is `touch()`: a cheap clock read per read or write on the hot path, instead of a
    timer per await. `fired` tells the handler that the cancellation was ours, not the
    client's disconnect or a shutdown. While `progress` is set (waiting for a slow client),
    the check also counts a shrinking client write buffer as progress.
    """

    __slots__ = ("_handle", "_loop", "_seen", "_task", "clock", "fired", "last", "limit", "on",
                 "phase", "progress")

    def __init__(self, limit: float, phase: str) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.clock = loop.time  # what `last` is on (a stream's pump stamps it itself)
        task = asyncio.current_task(loop)  # with the loop: one getpid() syscall, not two
        assert task is not None
        self._task = task
        self.limit = limit
        self.phase = phase
        self.fired = False
        self.progress: Callable[[], int] | None = None
        self._seen = 0
        self.on: Replica | None = None  # the replica answering (its bytes: `byte`)
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + limit, self._check)

    def touch(self) -> None:
        self.last = self._loop.time()

    def byte(self) -> None:
        """Progress that is a byte from the upstream: the replica's too, for the healer's
        stall verdict (heal.stalled)."""
        self.last = now = self._loop.time()
        if self.on is not None:
            self.on.last_byte = now

    def kick(self) -> None:
        """The replica was declared wedged (Scheduler.kick): interrupt the request now, as a
        timeout of phase WEDGED; the handler moves it or ends it in-band."""
        self.fired = True
        self.phase = WEDGED
        self._task.cancel()

    def recover(self) -> None:
        """Our cancellation was handled (a move): the next one may be the client's."""
        self.absorb()
        self.fired = False

    def rearm(self, limit: float, phase: str) -> None:
        """Start a new phase. The timer moves only if it must fire earlier; a late check just
        re-schedules itself (one timer per request instead of one per phase)."""
        self.limit, self.phase = limit, phase
        self.touch()
        due = self.last + limit
        if due < self._handle.when():
            self._handle.cancel()
            self._handle = self._loop.call_at(due, self._check)

    def watch(self, progress: Callable[[], int] | None) -> None:
        """Count `progress()` going down (a client write buffer draining) as progress, until
        called with None."""
        self.progress = progress
        self._seen = progress() if progress is not None else 0

    def stop(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        if self.progress is not None:
            seen, self._seen = self._seen, self.progress()
            if self._seen < seen:
                self.touch()
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


class Slot:
    """This request's place on one of the route's replicas, carried across failover: the
    replica holding it, whether it is held (not between giving a failed replica's slot back
    and getting the next), and the replicas tried so far, this one included."""

    __slots__ = ("dog", "held", "moved", "replica", "tried", "verdict")

    def __init__(self, replica: Replica, dog: Watchdog) -> None:
        self.dog = dog
        self.moved = False  # off a replica found dead or wedged (at most once)
        self.verdict: bool | None = None  # an error answer's word on the replica
        self.replica = replica
        self.held = True
        self.tried: tuple[str, ...] = (replica.url,)
        self._hold(replica)

    def _hold(self, r: Replica) -> None:
        """This request now waits on `r`: its bytes are `r`'s, and `r` declared wedged kicks
        it (self-healing)."""
        self.replica.kicks.discard(self.dog.kick)
        self.replica = r
        self.dog.on = r
        r.kicks.add(self.dog.kick)

    async def move(self, sched: Scheduler, route: Route, call: Call, o: Outcome) -> None:
        """The replica was found dead or wedged before the client saw content: give its slot
        back (no verdict: the healer has it) and take one on any replica that is up, or
        wait in the queue for the restarted one."""
        self.dog.recover()
        self.release(sched, None)
        o.failovers += 1
        self.dog.rearm(route.queue_timeout + 5, "waiting for a slot")
        o.phase = "queue"
        nxt = sched.take(route, call.prefix, ()) or await _acquire(sched, route, call, o)
        o.phase = "upstream"
        self._hold(nxt)
        self.held = True
        self.tried += (nxt.url,)
        self.dog.rearm(route.timeouts.connect, "connect")

    def last_try(self, route: Route) -> bool:
        return len(self.tried) >= min(MAX_ATTEMPTS, len(route.upstreams))

    async def fail_over(self, sched: Scheduler, route: Route, call: Call, o: Outcome,
                        dog: Watchdog) -> None:
        """Give the failed replica's slot back and take one on a replica not tried yet,
        waiting in the queue when the others are busy but up."""
        sched.release(self.replica, ok=False)
        self.held = False
        o.failovers += 1
        nxt = sched.take(route, call.prefix, self.tried)
        if nxt is None:
            dog.rearm(route.queue_timeout + 5, "waiting for a slot")
            o.phase = "queue"
            nxt = await _acquire(sched, route, call, o, self.tried)
            o.phase = "upstream"
        self._hold(nxt)
        self.held = True
        self.tried += (nxt.url,)
        dog.rearm(route.timeouts.connect, "connect")

    def release(self, sched: Scheduler, ok: bool | None) -> None:
        self.replica.kicks.discard(self.dog.kick)
        if self.held:
            self.held = False
            sched.release(self.replica, ok)


async def relay(ex: Exchange, backends: Backends, route: Route, call: Call) -> Answer | None:
    """Send the call to one of `route`'s replicas and answer the client: a whole `Answer`,
    or None when the answer was streamed to the client already."""
    sched = backends.scheduler
    o = ex.outcome
    o.phase = "queue"  # take a slot
    queued = time.perf_counter()
    replica = (sched.free_slot(route, call.prefix, key=call.key)
               or await _acquire(sched, route, call, o))
    o.queue_wait = time.perf_counter() - queued
    o.phase = "upstream"
    dog = Watchdog(route.timeouts.connect, "connect")
    slot = Slot(replica, dog)
    ok: bool | None = None  # the replica's verdict, for passive health
    try:
        while True:
            try:
                out, ok = await _answer_from(ex, backends, route, call, slot, dog)
                break
            except _Moved:  # found dead or wedged before the client saw content
                await _move(ex, slot, sched, route, call)
    except (UpstreamFailed, UpstreamTimeout) as e:
        ok = slot.verdict if slot.verdict is not None else _VERDICT.get(e.code, False)
        raise
    except UpstreamRejected:
        ok = slot.verdict
        raise
    finally:
        dog.stop()
        slot.release(sched, ok)
    if ok:
        sched.remember(route, call.prefix, slot.replica)
    return out


async def _move(ex: Exchange, slot: Slot, sched: Scheduler, route: Route, call: Call) -> None:
    """Take a slot elsewhere for a moved request; a stream already started that finds none
    ends in-band, as any started stream's failure does. Moved once already, the request is
    the likely cause (a prompt that kills or hangs the server): it gets an error instead of
    taking the restarted server down again."""
    try:
        if slot.moved:
            log.warning("%s a server of %s failed again on a request moved off a failed one: "
                        "answered as a failure, not moved again", call.rid, route.alias)
            raise UpstreamFailed(route.alias, "failed on this request twice; not retried")
        slot.moved = True
        await slot.move(sched, route, call, ex.outcome)
    except GatewayError as e:
        if call.moved is not None:
            rewriter, chunked = call.moved
            _end_with(ex, rewriter, chunked, e)
        raise


class _Moved(Exception):
    """The replica was found dead (mlx's 404 "generation thread died") or wedged (the
    healer's kick) before the client received content: serve the request elsewhere."""


async def _answer_from(ex: Exchange, backends: Backends, route: Route, call: Call, slot: Slot,
                       dog: Watchdog) -> tuple[Answer | None, bool | None]:
    """One try: open the slot's replica (with failover) and answer from it; the answer and
    the replica's verdict."""
    resp = await _open_with_failover(backends.client, backends.scheduler, route, call, slot,
                                     dog, ex.outcome)
    try:
        dog.byte()  # the head
        dog.rearm(route.timeouts.idle, "idle between bytes")
        if resp.status >= 400:
            error = await _upstream_error(resp, route, call.rid, dog)
            if error is None:  # the generation thread died: the healer restarts it
                # dying again on a request already moved for a death: this request is the
                # likely cause, so this restart is not charged to the hourly budget
                backends.scheduler.declare(slot.replica.url, "dead", charge=not slot.moved)
                raise _Moved
            slot.verdict = resp.status not in (502, 503, 504)  # alive unless it says otherwise
            try:
                raise error
            finally:  # this frame, in the error's traceback, must not name it: a cycle
                del error
        answer = _answerer(resp, route, call)
        return await answer(ex, backends, resp, route, call, slot.replica, dog)
    finally:
        resp.close()  # mid-body this drops the socket: the server stops generating


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


# --- open the upstream, with failover --------------------------------------------------------


async def _open_with_failover(client: Client, sched: Scheduler, route: Route, call: Call,
                              slot: Slot, dog: Watchdog, o: Outcome) -> Response:
    """The response head from the slot's replica. A replica that refuses the connection,
    resets it, or answers 502/503 before the client saw a byte gets a failed verdict and the
    next replica is tried (up to MAX_ATTEMPTS, while any is up); the last one's failure is
    raised, or its 502/503 returned to be answered."""
    headers = upstream_headers(call.rid, _upstream_key(route))
    t = route.timeouts

    def connected() -> None:
        dog.rearm(t.first_byte, "waiting for the first byte")

    while True:
        o.replica = replica_name(route, slot.replica)
        last = slot.last_try(route)
        try:
            try:
                resp = await client.request("POST", slot.replica.url, call.path, call.body,
                                            headers, on_connected=connected)
            except (OSError, ValueError, asyncio.CancelledError) as e:  # UpstreamError: OSError
                _raise_ours(e, route, call.rid, dog)
                raise  # a cancellation not ours: the client left, or a shutdown
        except UpstreamFailed:
            if last or sched.all_down(route, slot.tried):
                raise
        else:
            if resp.status not in (502, 503) or last or sched.all_down(route, slot.tried):
                return resp
            resp.close()
        await slot.fail_over(sched, route, call, o, dog)


def _raise_ours(e: BaseException, route: Route, rid: str, dog: Watchdog) -> None:
    """Opening's failures as our errors: the watchdog's cancellation is a move (the replica
    was declared wedged), a connect failure (which fails over) or a first-byte timeout; a
    socket error an unreachable server. Returns (for the caller to re-raise) on a
    cancellation that is not ours. Mapped in an except clause, not a context manager: no
    object and three calls per request; raised here, not returned, since an exception kept in
    the caller's frame would be a reference cycle."""
    alias = route.alias
    if isinstance(e, asyncio.CancelledError):
        if not dog.fired:
            return
        if dog.phase == WEDGED:
            raise _Moved from None
        dog.absorb()
        if dog.phase == "connect":
            raise UpstreamFailed(alias, "did not accept a connection in time") from None
        raise UpstreamTimeout(alias, dog.phase) from None
    log.warning("%s a server of %s is unreachable: %s", rid, alias, type(e).__name__)
    raise UpstreamFailed(alias) from None


# --- answer by content type --------------------------------------------------------------------

Answerer = Callable[[Exchange, Backends, Response, Route, Call, Replica, Watchdog],
                    Awaitable[tuple[Answer | None, bool | None]]]


def _answerer(resp: Response, route: Route, call: Call) -> Answerer:
    """How a 2xx answer reaches the client, by its content type and what the client asked
    for: the stream relayed, a dialect's stream folded into one answer, or a unary body."""
    if resp.status == 200:
        ctype = resp.content_type
        if ctype == "text/event-stream":
            if call.stream:
                return relay_stream
            if call.dialect is not None:
                return relay_collected
        elif ctype == "application/json" and not call.stream and call.dialect is None:
            return relay_unary
    raise UpstreamBadResponse(route.alias)


async def relay_unary(ex: Exchange, backends: Backends, resp: Response, route: Route,
                      call: Call, replica: Replica, dog: Watchdog
                      ) -> tuple[Answer, bool | None]:
    """The upstream's JSON body, with the alias for the model id (the replica's fingerprint
    remembered for the next answer's splice)."""
    data = await _read_capped(resp, MAX_UNARY_BYTES, route, dog)
    try:
        out, replica.fingerprint = rewrite_body(data, route.alias, route.model,
                                                replica.fingerprint)
    except SSEError:
        raise UpstreamBadResponse(route.alias) from None
    if out[:1] != b"{":
        raise UpstreamBadResponse(route.alias)
    o = ex.outcome
    o.usage(usage_of(out))
    o.bytes_out = len(out)
    return Answer(200, out, {"Content-Type": "application/json", "X-Request-Id": call.rid,
                             "Server": SERVER}), True


async def relay_collected(ex: Exchange, backends: Backends, resp: Response, route: Route,
                          call: Call, replica: Replica, dog: Watchdog
                          ) -> tuple[Answer, bool | None]:
    """A dialect's unary answer: its events for the upstream stream, folded. Reading stops
    when the dialect's answer is complete (its [DONE], or an Anthropic stop sequence); the
    caller's resp.close() then hangs up, which stops the generation."""
    dialect = call.dialect
    assert dialect is not None
    rewriter = ChatEventRewriter(dialect.new_stream())
    parts: list[bytes] = []
    size = 0
    try:
        with _BodyRead(route, dog):
            while not rewriter.done:
                chunk = await resp.read()
                if not chunk:
                    raise UpstreamFailed(route.alias, "stopped in the middle of the response")
                dog.byte()
                events = rewriter.feed(chunk)
                size += len(events)
                if size > MAX_UNARY_BYTES:
                    raise UpstreamBadResponse(route.alias)
                parts.append(events)
        answer = dialect.collect(b"".join(parts))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise UpstreamBadResponse(route.alias) from None  # SSEError is a ValueError
    o = ex.outcome
    o.usage(rewriter.usage)
    body = jsonfast.dumps(answer)
    o.bytes_out = len(body)
    return Answer(200, body, {"Content-Type": "application/json", "X-Request-Id": call.rid,
                              "Server": SERVER}), True


# --- relay a stream ----------------------------------------------------------------------------


async def relay_stream(ex: Exchange, backends: Backends, resp: Response, route: Route,
                       call: Call, replica: Replica, dog: Watchdog
                       ) -> tuple[None, bool | None]:
    """Relay an event stream: each upstream read is rewritten and written to the client
    inside the socket callback (`_Pump.feed`), so an event reaches the client the moment its
    last byte arrives. This coroutine only waits for the pump to stop, and says why: the end,
    a slow client (wait for its socket to drain, then go on), or a failure (in-band).

    Backpressure: the client transport pauses writing past CLIENT_HIGH_WATER queued bytes;
    reading from the upstream then pauses until it resumes (below CLIENT_LOW_WATER), so memory
    per stream stays bounded and TCP flow control reaches the model server."""
    o = ex.outcome
    if call.moved is not None:  # the client has the head already: go on after it
        (rewriter, chunked), call.moved = call.moved, None
    else:
        rewriter = _rewriter(route, call, replica)
        chunked = await ex.start_stream({**SSE_HEADERS, "X-Request-Id": call.rid})
    failure: GatewayError | None = None
    try:
        o.phase = "response"
        pump = _Pump(ex, resp, rewriter, chunked, dog, replica, route.alias)
        try:
            resp.pump(pump.feed)
            while await _pumped(ex, resp, pump, dog):
                resp.resume()
            if pump.bad:
                failure = UpstreamBadResponse(route.alias)
            elif not rewriter.done:
                failure = UpstreamFailed(route.alias, "stopped in the middle of the response")
        except asyncio.CancelledError:
            failure = _cancelled(ex, backends, route, call, dog, pump)
            if failure is None:
                raise
        except OSError:
            if _client_gone(ex):
                raise
            failure = UpstreamFailed(route.alias, "stopped in the middle of the response")
        finally:
            pump.resp = None  # the connection holds pump.feed: no cycle through the response
        if failure is None:
            await ex.end_stream()
        else:
            _end_with(ex, pump.rewriter, pump.chunked, failure)
    finally:  # one place for what the stream reported, however it ended
        o.usage(rewriter.usage)
        if isinstance(rewriter, SSERewriter) and rewriter.fingerprint is not None:
            replica.fingerprint = rewriter.fingerprint  # the next stream splices
    return None, _VERDICT.get(o.code, False)


class _Pump:
    """The stream's socket callback: `feed` runs inside the upstream connection's
    data_received and writes what the rewriter made of the bytes straight to the client.
    It never raises; it halts the response and leaves why: `bad` (the rewriter refused the
    upstream's bytes), `full` (the client's transport paused writing), the client gone, or
    the rewriter done."""

    __slots__ = ("alias", "bad", "buffered", "chunked", "clock", "dog", "ex", "full", "outcome",
                 "replica", "resp", "rewriter", "transport")

    def __init__(self, ex: Exchange, resp: Response, rewriter: SSERewriter | ChatEventRewriter,
                 chunked: bool, dog: Watchdog, replica: Replica, alias: str) -> None:
        transport = ex.transport
        if transport is None:
            raise ConnectionResetError("client gone")
        transport.set_write_buffer_limits(CLIENT_HIGH_WATER, CLIENT_LOW_WATER)
        self.transport = transport
        self.buffered = transport.get_write_buffer_size
        self.ex = ex
        self.outcome = ex.outcome
        self.resp: Response | None = resp
        self.rewriter = rewriter
        self.chunked = chunked
        self.dog = dog  # every read is the upstream's byte: Watchdog.byte, inlined in feed
        self.replica = replica
        self.clock = dog.clock
        self.alias = alias
        self.bad = False
        self.full = False

    def feed(self, data: bytes) -> None:
        self.dog.last = self.replica.last_byte = self.clock()  # one clock read, both stamps
        try:
            chunk = self.rewriter.feed(data)
        except Exception as e:  # runs inside data_received: never let it escape
            if not isinstance(e, SSEError):
                log.exception("%s relay of %s failed", self.ex.rid, self.alias)
            self.bad = True
            self._stop()
            return
        if chunk:
            transport = self.transport
            if transport.is_closing():
                self._stop()
                return
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)
            o = self.outcome
            o.bytes_out += len(chunk)
            if o.first_at is None and chunk.find(b"data:") >= 0:  # not a `: keepalive` comment
                o.first_event()
            # past the mark the transport's pause_writing fires at (set above; its
            # resume_writing ends the wait: Exchange.drain): a C call per write, where the
            # exchange's flag would be a Python property per event
            if self.buffered() > CLIENT_HIGH_WATER:
                self.full = True
                self._stop()
        if self.rewriter.done and self.resp is not None:
            self.resp.halt()

    def _stop(self) -> None:
        if self.resp is not None:
            self.resp.pause()
            self.resp.halt()


async def _pumped(ex: Exchange, resp: Response, pump: _Pump, dog: Watchdog) -> bool:
    """Wait for the pump to stop; True when it stopped for a slow client that has now taken
    its bytes (go on), False at the end or on a failure (the caller reads which). Raises
    ConnectionResetError when the client is gone."""
    await resp.wait()
    if pump.bad or pump.rewriter.done:
        return False
    if pump.transport.is_closing():
        raise ConnectionResetError("client gone")
    if not pump.full:
        return False
    # A slow client: its draining counts as progress for the idle timeout; one that takes
    # nothing for `idle` seconds is timed out by the watchdog.
    dog.watch(pump.transport.get_write_buffer_size)
    try:
        await ex.drain()
    finally:
        dog.watch(None)
    pump.full = False
    return True


def _rewriter(route: Route, call: Call, replica: Replica) -> SSERewriter | ChatEventRewriter:
    """The OpenAI passthrough, or the client's dialect."""
    if call.dialect is None:
        return SSERewriter(route.alias, route.model, strip_usage=not call.usage,
                           fingerprint=replica.fingerprint)
    return ChatEventRewriter(call.dialect.new_stream())


def _movable(ex: Exchange, rewriter: SSERewriter | ChatEventRewriter) -> bool:
    """The client got the head and nothing with content (OpenAI: `: keepalive` comments; a
    dialect: its preamble and keep-alive events), and no event is half read: the stream can
    go on from another upstream, on the same connection."""
    if _client_gone(ex) or rewriter.pending:
        return False
    if isinstance(rewriter, SSERewriter):
        return ex.outcome.first_at is None
    return not rewriter.data_seen


def _cancelled(ex: Exchange, backends: Backends, route: Route, call: Call, dog: Watchdog,
               pump: _Pump) -> GatewayError | None:
    """A cancelled stream: our watchdog's (a replica declared wedged while only the head
    and comments went out: the stream moves, raising _Moved; else an idle upstream: the
    failure to report), or a shutdown's (the client gets ShuttingDown in-band; the
    cancellation goes on: None), or the client's (it is gone: None)."""
    if dog.fired:
        if dog.phase == WEDGED and _movable(ex, pump.rewriter):
            call.moved = (pump.rewriter, pump.chunked)
            raise _Moved from None
        dog.absorb()
        return UpstreamTimeout(route.alias, dog.phase)
    if backends.shutting_down.is_set() and not _client_gone(ex):
        _end_with(ex, pump.rewriter, pump.chunked, ShuttingDown())
    return None


def _end_with(ex: Exchange, rewriter: SSERewriter | ChatEventRewriter, chunked: bool,
              error: GatewayError) -> None:
    """End a started stream with one error event, then close the connection without the
    chunked terminator: nothing follows the error, and no client mistakes the connection
    for reusable or the body for complete (Go's ErrAbortHandler, in effect). A dialect says
    it its own way (Anthropic `event: error`, Responses `response.failed`)."""
    ex.outcome.fail(error.status, error.code)
    last = error.to_sse() if isinstance(rewriter, SSERewriter) else rewriter.fail(error)
    transport = ex.transport
    if transport is None or transport.is_closing():
        return
    transport.write(b"%x\r\n%b\r\n" % (len(last), last) if chunked else last)
    transport.close()  # flushes what is buffered, then closes


# --- shared parts ------------------------------------------------------------------------------


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
            dog.byte()
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
            if self.dog.phase == WEDGED:
                raise _Moved from None
            self.dog.absorb()
            raise UpstreamTimeout(self.route.alias, self.dog.phase) from None
        if issubclass(kind, OSError):
            raise UpstreamFailed(self.route.alias,
                                 "stopped in the middle of the response") from None


async def _upstream_error(resp: Response, route: Route, rid: str,
                          dog: Watchdog) -> GatewayError | None:
    """Map the upstream's 4xx/5xx to our envelope. A 5xx's text (stack traces, load
    failures) goes to the log only; a 4xx's passes when it reads as one human message.
    None: mlx's dead generation thread, never the client's error (heal.is_dead_answer)."""
    try:
        raw = await _read_capped(resp, MAX_ERROR_BYTES, route, dog)
    except UpstreamBadResponse:
        raw = b""
    text = _error_text(raw)
    status = resp.status
    log.warning("%s upstream for %s answered %d: %.1000r", rid, route.alias, status, text)
    if is_dead_answer(status, text):
        return None
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
