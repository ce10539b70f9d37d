"""The gateway's HTTP/1.1 server for the POST endpoints, on a bare asyncio Protocol.

Why not aiohttp's server here: measured in the faithful bench (one request per connection,
as mlx clients and the bench send), aiohttp's server side alone costs about 77 µs of CPU per
request over a bare uvloop Protocol, and its request/response objects and middleware chain
about as much again: together more than Caddy's whole figure. The POST endpoints are where
every token passes, so they get this lean server; everything else stays on aiohttp.

What it accepts is a deliberately plain subset of HTTP/1.1: `POST <one of the POST routes>`
with a Content-Length body within the live table's limit and ordinary headers. Anything else
(another method or path, chunked or `Expect` bodies, an oversize or odd-looking head) is
handed, with the bytes read so far, to aiohttp's protocol for the rest of the connection:
aiohttp's strict parser and routing answer it exactly as before. A connection never comes
back from aiohttp.

Keep-alive and pipelining work as in aiohttp: requests on one connection are served one at a
time, in order. A client that disconnects cancels its handler (aiohttp's
`handler_cancellation=True`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from .errors import BodyTooLarge, GatewayError, MalformedRequest, UnreadableLength
from .exchange import Answer
from .headers import SERVER, request_id
from .outcome import Outcome

log = logging.getLogger("maclustr.protocol")  # as protocol.py: refusals before routing

KEEPALIVE_SECONDS = 75.0  # aiohttp's default: an idle connection (or a stalled head) is closed
MAX_HEAD = 32 * 1024  # a longer head goes to aiohttp, which answers 431 as configured
MAX_PIPELINED = 256 * 1024  # bytes buffered behind a request in progress before reading pauses

# RFC 9110 token characters: a header name that still has bytes after deleting these is not one
_TOKEN = b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
_REFUSED = ("transfer-encoding", "expect", "upgrade")  # bodies and protocols aiohttp handles
# Control bytes no head may carry outside its CRLFs (RFC 9110 field-value: HTAB, SP, VCHAR,
# obs-text): h11 refuses most of them, aiohttp some; the front serves none of them.
_CONTROLS = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
# A Content-Length with more digits is refused with a 400 by the front itself: int() refuses
# over 4,300 digits, and no body the gateway accepts needs more than 18 (h11 allows 20).
MAX_LENGTH_DIGITS = 18
SWEEP_SECONDS = 5.0  # how often idle connections are looked for
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Head:
    """A request head the front serves: method, path, version, headers (lower-case names)."""

    __slots__ = ("headers", "keep_alive", "length", "path", "version")

    def __init__(self, path: str, version: str, headers: dict[str, str], length: int) -> None:
        self.path = path
        self.version = version
        self.headers = headers
        self.length = length
        conn = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in conn


def parse_head(head: bytes, paths: frozenset[str]) -> Head | None:
    """The head (without its blank line) if the front serves it, else None (aiohttp will).

    Strict: what it accepts, h11 accepts alike (tests/test_front.py proves it). Raises
    MalformedRequest for a Content-Length no parser should read (too many digits)."""
    flat = head.replace(b"\r\n", b"")
    if len(flat.translate(None, _CONTROLS)) != len(flat):  # a bare CR or LF, a NUL, ...
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "POST" or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return None
    target = parts[1]
    path = target.split("?", 1)[0]
    if path not in paths or not (target.isascii() and target.isprintable()):
        return None
    headers: dict[str, str] = {}
    names: list[str] = []
    length = -1
    hosts = 0
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        names.append(name)
        key = name.lower()
        value = value.strip(" \t")
        if key == "content-length":
            if length >= 0 or not value.isascii() or not value.isdigit():
                return None
            if len(value) > MAX_LENGTH_DIGITS:
                raise UnreadableLength()
            length = int(value)
        elif key in _REFUSED:
            return None
        elif key not in headers:
            headers[key] = value
        if key == "host":
            hosts += 1
    # every name a token: checked once for all of them (a translate per name cost ~1 us)
    if length < 0 or not all(names) or "".join(names).encode("latin-1").translate(None, _TOKEN):
        return None
    # HTTP/1.1 needs exactly one Host (RFC 9112 3.2); 1.0 at most one
    if hosts > 1 or (hosts == 0 and parts[2] == "HTTP/1.1"):
        return None
    return Head(path, parts[2], headers, length)


_date = ("", 0)


def http_date() -> str:
    """The Date header, computed once a second."""
    global _date
    now = int(time.time())
    if _date[1] != now:
        _date = (time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)), now)
    return _date[0]


def response_head(version: str, status: int, headers: dict[str, str], framing: str) -> bytes:
    lines = [f"{version} {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
    lines.append(f"{framing}Date: {http_date()}\r\n\r\n")
    return "".join(lines).encode("latin-1")


class FrontExchange:
    """An Exchange (exchange.py) over the front's connection."""

    __slots__ = ("_body", "_conn", "chunked", "head", "key", "method", "outcome", "path",
                 "rid", "started")
    outcome: Outcome

    def __init__(self, conn: FrontProtocol, head: Head, body: bytes) -> None:
        self._conn = conn
        self.head = head
        self._body = body
        self.method = "POST"
        self.path = head.path
        self.rid = "-"
        self.key = "-"
        self.started = False
        self.chunked = False

    def header(self, name: str) -> str | None:
        return self.head.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        ctype = self.head.headers.get("content-type")
        return "" if ctype is None else ctype.split(";", 1)[0].strip().lower()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    async def drain(self) -> None:
        await self._conn.drain()

    async def body(self, limit: int) -> bytes:
        if len(self._body) > limit:
            raise BodyTooLarge(limit)
        return self._body

    async def start_stream(self, headers: dict[str, str]) -> bool:
        self.started = True
        # Chunked on HTTP/1.1 even when the connection closes after it: the terminator is
        # how a client tells a complete stream from a cut one. HTTP/1.0: the close ends it.
        self.chunked = self.head.version == "HTTP/1.1"
        framing = "Transfer-Encoding: chunked\r\n" if self.chunked else ""
        if not self.head.keep_alive:
            framing += "Connection: close\r\n"
        self._conn.write(response_head(self.head.version, 200,
                                       self._conn.response_headers(self, headers), framing))
        return self.chunked

    async def end_stream(self) -> None:
        if self.chunked:
            self._conn.write(b"0\r\n\r\n")


Dispatch = Callable[[FrontExchange], Awaitable[Answer | None]]


class FrontProtocol(asyncio.Protocol):
    """One client connection, served by the front until it hands the connection over."""

    __slots__ = ("_buf", "_drained", "_last", "_loop", "_paused", "_refused", "_server",
                 "_task", "transport", "writing_paused")

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._loop = server.loop
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._refused = False
        self._last = 0.0
        self.transport: asyncio.Transport | None = None
        self.writing_paused = False  # the transport's pause_writing, until resume_writing
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._last = self._loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self.transport = None
        self.resume_writing()  # a writer waiting for the client to drain: it is gone
        if self._task is not None:
            self._task.cancel()  # the client left: stop its work (and its upstream request)

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        if self._refused:
            return  # read and dropped until the client closes (a lingering close)
        self._buf += data
        if self._task is None:
            self._next()
        elif len(self._buf) > MAX_PIPELINED and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Until the transport resumes writing (a slow client took its bytes) or is lost."""
        if not self.writing_paused or self.transport is None:
            return
        if self._drained is None:
            self._drained = self._loop.create_future()
        await self._drained

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def idle_for(self, now: float) -> float:
        """Seconds without a byte from the client and no request in progress (0 when busy)."""
        return 0.0 if self._task is not None else now - self._last

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def response_headers(self, ex: FrontExchange, headers: dict[str, str]) -> dict[str, str]:
        return self._server.response_headers(ex, headers)

    def _next(self) -> None:
        """Start serving the next complete request in the buffer, or hand the connection
        to aiohttp when the front does not serve it."""
        buf = self._buf
        if not buf:
            return
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_over()
            return
        try:
            head = parse_head(bytes(buf[:end]), self._server.paths)
        except MalformedRequest as e:
            self._refuse(e)
            return
        if head is None or head.length > self._server.max_body():
            self._hand_over()
            return
        start = end + 4
        if len(buf) - start < head.length:
            return  # the body is still arriving
        body = bytes(buf[start:start + head.length])
        del buf[:start + head.length]
        self._task = self._loop.create_task(self._run_exchange(FrontExchange(self, head, body)))

    async def _run_exchange(self, ex: FrontExchange) -> None:
        try:
            answer = await self._server.dispatch(ex)
        except asyncio.CancelledError:
            return  # the client left (serve has counted it)
        except Exception:  # serve answers every error; this is a broken socket at most
            self.close()
            return
        finally:
            self._task = None
        if answer is not None and not ex.started:
            self._answer(ex, answer)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not ex.head.keep_alive:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self._last = self._loop.time()
        self._next()

    def _answer(self, ex: FrontExchange, answer: Answer) -> None:
        framing = f"Content-Length: {len(answer.body)}\r\n"
        if not ex.head.keep_alive:
            framing += "Connection: close\r\n"
        self.write(response_head(ex.head.version, answer.status,
                                 self.response_headers(ex, answer.headers), framing) + answer.body)

    def _refuse(self, err: GatewayError) -> None:
        """A head no parser should read (aiohttp would fail on it too): our envelope from
        the front, one log line, and the connection closed (where its body ends is unknown):
        our side at once, theirs when they close or go idle, so unread bytes cause no reset
        that could destroy the answer."""
        rid = request_id(None)
        log.warning("%s refused before routing: status=%d code=%s reason=%s", rid,
                    err.status, err.code, err.message)
        headers = {"Content-Type": "application/json", "Server": SERVER, "X-Request-Id": rid,
                   **err.answer_headers()}
        body = err.to_body()
        self._buf.clear()
        self._refused = True
        self.write(response_head("HTTP/1.1", err.status, headers,
                                 f"Content-Length: {len(body)}\r\nConnection: close\r\n")
                   + body)
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.close()

    def _hand_over(self) -> None:
        """aiohttp serves the rest of this connection, starting with the bytes read so far."""
        transport = self.transport
        if transport is None:
            return
        self._server.connections.discard(self)
        proto = self._server.fallback()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        if data:
            proto.data_received(data)


class FrontServer:
    """The protocol factory for the listening socket: a FrontProtocol per connection.

    `dispatch` serves one request (the app's error funnel and POST handlers); `fallback`
    makes aiohttp's protocol for a handed-over connection; `response_headers` adds the request
    id and CORS headers every answer carries; `max_body` reads the live table's body limit."""

    def __init__(self, paths: frozenset[str], dispatch: Dispatch,
                 fallback: Callable[[], asyncio.Protocol],
                 response_headers: Callable[[FrontExchange, dict[str, str]], dict[str, str]],
                 max_body: Callable[[], int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.paths = paths
        self.dispatch = dispatch
        self.fallback = fallback
        self.response_headers = response_headers
        self.max_body = max_body
        self.connections: set[FrontProtocol] = set()
        self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def close_idle(self) -> None:
        """At shutdown: close the connections that have no request in progress."""
        for conn in list(self.connections):
            if conn._task is None:
                conn.close()

    def close_all(self) -> None:
        self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close()

    def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE_SECONDS (between requests, or a head or body
        that stopped arriving): one timer for the server instead of one per connection."""
        now = self.loop.time()
        for conn in [c for c in self.connections if c.idle_for(now) > KEEPALIVE_SECONDS]:
            conn.close()
        self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)
