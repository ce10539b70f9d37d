"""A minimal HTTP/1.1 client for the model servers, on a bare asyncio Protocol.

Why not aiohttp's ClientSession: profiling the gateway under load showed ~37% of its CPU in
the client's per-request machinery (happy-eyeballs connect, request object, header writer)
for what is one write of pre-built bytes and a small response parser here. mlx_lm.server
closes every connection (HTTP/1.0), so the connect path is on every request.

What it speaks: one request per connection at a time; responses delimited by Content-Length,
chunked transfer coding, or connection close (mlx). Connections that end a response cleanly
with keep-alive semantics go back to a small per-server pool. For a server that closes every
connection, each response's head opens a spare connection for a later request, off the
critical path (Envoy's preconnect): under a burst the connect's turn of the event loop, which
queues behind every other request's work, is then already done. Reading is flow-controlled:
past `HIGH_WATER` unread bytes the socket is paused, so a slow client stalls the upstream
instead of growing a buffer.

Timeouts are not handled here: the relay's Watchdog cancels the awaiting task.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sized
from typing import Any, cast
from urllib.parse import urlsplit

HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024
POOL_PER_SERVER = 32  # idle keep-alive connections, and spares, kept per server
IDLE_POOL_SECONDS = 30.0  # an idle or spare connection older than this is closed
DNS_TTL = 10.0
ATTEMPT_DELAY = 0.25  # RFC 8305 §5: the next address is tried after this, or at a failure
_HEX = b"0123456789abcdefABCDEF"
Key = tuple[str, int, bool]  # a server: host, port, TLS
# TCP keepalive on every upstream connection: idle seconds, seconds between probes, probes.
# A node that dies without a FIN (power lost, cable pulled) is then noticed by the kernel in
# about 11 s, on a spare or on a connection waiting for its answer, not at the first-byte
# timeout (600 s); a busy but live server's kernel answers the probes whatever mlx is doing.
KEEPALIVE = (5, 2, 3)
_KEEPALIVE_OPTS = [(opt, value) for opt, value in zip(
    (getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None)),  # Linux, macOS
     getattr(socket, "TCP_KEEPINTVL", None), getattr(socket, "TCP_KEEPCNT", None)),
    KEEPALIVE, strict=True) if opt is not None]  # an option the platform lacks: its default


class UpstreamError(ConnectionError):
    """The server could not be reached, or broke the HTTP exchange."""


class NotSent(UpstreamError):
    """The connection was closed before the request was written: nothing reached the
    server, so the request may go out again on another connection (Go's nothingWritten)."""


class _Target:
    """A parsed base URL, computed once per route upstream string."""

    __slots__ = ("host", "host_header", "is_ip", "key", "port", "ssl")

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.ssl else 80)
        default = (self.ssl and self.port == 443) or (not self.ssl and self.port == 80)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = shown if default else f"{shown}:{self.port}"
        self.is_ip = _is_ip(self.host)
        self.key: Key = (self.host, self.port, self.ssl)


class Response:
    """One upstream response. `read()` returns the next body bytes, b"" at the end."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        ctype = headers.get("content-type", "")
        self.content_type = ctype.split(";", 1)[0].strip().lower()
        cl = headers.get("content-length")
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None

    def read(self) -> Coroutine[Any, Any, bytes]:
        """The next body bytes, b"" at the end (the connection's own coroutine: no wrapper)."""
        return self._conn.read_body()

    def pump(self, sink: Callable[[bytes], None]) -> None:
        """From now on, hand body bytes to `sink` as they arrive, inside the socket callback:
        no buffering and no task switch per read (the stream relay's fast path). `sink`
        must not raise; it may call `halt()` and `pause()`."""
        self._conn.pump(sink)

    def wait(self) -> Coroutine[Any, Any, None]:
        """With a sink: until the body ends or `halt()` is called; raises if it broke."""
        return self._conn.wait()

    def halt(self) -> None:
        """Wake `wait()` (from the sink)."""
        self._conn.halt()

    def pause(self) -> None:
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    def close(self) -> None:
        """Drop the connection unless the response was read completely and may be reused."""
        self._conn.finish()


class _Conn(asyncio.Protocol):
    """One connection's state: response head, body framing, buffered body, waiter."""

    def __init__(self, client: Client, key: Key,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._loop = loop  # passed in: get_running_loop() costs a getpid() syscall
        self._head = b""
        self._head_waiter: asyncio.Future[Response] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._exc: BaseException | None = None
        self._lost = False
        self._got_bytes = False
        self.response: Response | None = None
        # body framing: remaining Content-Length, or chunked state, or close-delimited
        self._remaining: int | None = None
        self._chunked: _Dechunker | None = None
        self._body_done = False
        self._keep_alive = False
        self.idle_since = 0.0
        self._sink: Callable[[bytes], None] | None = None
        self._halted = False
        # where the next read goes: nowhere before a request is sent (bytes then answer
        # nothing), then the head parser, the body framing, or (a close-delimited body being
        # pumped: mlx's streams) straight to the sink, with no check per read
        self._on_data: Callable[[bytes], None] = self._on_idle_bytes

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        _keep_probing(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._client.forget(self)
        if self.response is None:
            self._fail(UpstreamError("connection closed before a response"))
        else:
            if not self._body_done:
                if self._remaining is None and self._chunked is None:
                    self._body_done = True  # close-delimited body: EOF ends it (HTTP/1.0, mlx)
                else:
                    self._exc = UpstreamError("connection closed in the middle of the body")
            self._wake()
        self._unlink()

    def _unlink(self) -> None:
        """Nothing arrives any more: drop the references back to this connection (the bound
        parser, the sink's closure, the response and the future holding it), so it is freed
        by reference counting, not left as cyclic garbage for the collector (issue 25)."""
        self._on_data = _ignore
        self._sink = None
        self.response = None
        self._head_waiter = None

    def pause_writing(self) -> None:  # requests are small; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # --- parsing --------------------------------------------------------------------------

    def _on_idle_bytes(self, data: bytes) -> None:
        """Bytes while no request is out (a spare, or pooled): taken for the answer to the
        next request they would desync the connection, so it is closed."""
        self.abort()

    def _on_head_bytes(self, data: bytes) -> None:
        self._got_bytes = True
        head = self._head + data if self._head else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                self._fail(UpstreamError("response head too large"))
            self._head = head
            return
        self._head = b""
        try:
            status, headers, http10 = _parse_head(head[:end])
        except ValueError:
            self._fail(UpstreamError("malformed response head"))
            return
        if 100 <= status < 200:  # interim response: skip it, wait for the real one
            rest = head[end + 4:]
            if rest:
                self._on_head_bytes(rest)
            return
        resp = Response(self, status, headers)
        self.response = resp
        self._on_data = self._on_body
        conn_hdr = headers.get("connection", "").lower()
        te = headers.get("transfer-encoding")
        if te is not None:  # RFC 9112 §6.3: it overrides Content-Length
            if te.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._chunked = _Dechunker()
            # else chunked is not the final coding: the close ends the body
        elif resp.content_length is not None:
            self._remaining = resp.content_length
        elif "content-length" in headers:
            self._fail(UpstreamError("bad Content-Length"))
            return
        self._keep_alive = (not http10 and "close" not in conn_hdr
                            and (self._chunked is not None or self._remaining is not None))
        if status in (204, 304):
            self._remaining = 0
        if self._remaining == 0:
            self._body_done = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)
        rest = head[end + 4:]
        if rest:
            self._on_body(rest)

    def _on_body(self, data: bytes) -> None:
        if self._body_done:  # bytes after the end of a delimited body answer nothing:
            self._keep_alive = False  # the connection is closed, not reused (as Go does)
            return
        if self._chunked is not None:
            try:
                data, done = self._chunked.feed(data)
            except ValueError:
                self._exc = UpstreamError("malformed chunked body")
                self._wake()
                if self.transport is not None:
                    self.transport.abort()
                return
            if done:
                self._body_done = True
                if self._chunked.surplus:
                    self._keep_alive = False
        elif self._remaining is not None:
            if len(data) >= self._remaining:
                if len(data) > self._remaining:
                    self._keep_alive = False
                data = data[: self._remaining]
                self._remaining = 0
                self._body_done = True
            else:
                self._remaining -= len(data)
        if self._sink is not None:
            if data:
                self._sink(data)
            if self._body_done:
                self._wake()
            return
        if data:
            self._buf.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        w = self._head_waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self._wake()
        if self.transport is not None and not self._lost:
            self.transport.abort()

    # --- consumer side --------------------------------------------------------------------

    async def send(self, request: bytes) -> Response:
        tr = self.transport
        if tr is None or self._lost or tr.is_closing():
            # closed after it was taken (a loaded loop runs the close first): uvloop's write
            # would raise RuntimeError, asyncio's drop the bytes and leave us waiting
            raise NotSent("connection closed before the request was written")
        self._on_data = self._on_head_bytes
        self._head_waiter = self._loop.create_future()
        tr.write(request)
        try:
            return await self._head_waiter
        except BaseException:  # cancelled (client gone, timeout) or failed: drop the socket
            tr.abort()
            raise
        finally:
            self._head_waiter = None  # it holds the Response, which holds this connection

    async def read_body(self) -> bytes:
        while True:
            if self._buf:
                buf = self._buf
                data = buf[0] if len(buf) == 1 else b"".join(buf)
                self._buf = []
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self._body_done or self._lost:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def pump(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        if self._remaining is None and self._chunked is None and not self._body_done:
            self._on_data = sink  # close-delimited: every byte until EOF is body
        if self._buf:
            data = b"".join(self._buf)
            self._buf = []
            self._buffered = 0
            sink(data)
        if self._lost:
            self._unlink()  # the whole body had arrived: keep no reference to the sink
        else:
            self.resume()

    def halt(self) -> None:
        self._halted = True
        self._wake()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def wait(self) -> None:
        while not (self._halted or self._body_done or self._lost or self._exc is not None):
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._halted = False
        if self._exc is not None:
            raise self._exc

    def finish(self) -> None:
        """Return to the pool if the exchange completed cleanly, else drop the socket."""
        tr = self.transport
        if tr is None or self._lost:
            return
        if self._body_done and self._keep_alive and not self._buf and self._exc is None:
            self.resume()
            self._reset_for_reuse()
            self._client.release(self)
        else:
            tr.abort()  # mid-body: the server must see the close (stop generating)

    def _reset_for_reuse(self) -> None:
        self.response = None
        self._head_waiter = None
        self._remaining = None
        self._chunked = None
        self._body_done = False
        self._keep_alive = False
        self._got_bytes = False
        self._sink = None
        self._halted = False
        self._on_data = self._on_idle_bytes
        self.idle_since = time.monotonic()

    def ready(self, now: float) -> bool:
        """Open, not closing, and idle for less than IDLE_POOL_SECONDS."""
        tr = self.transport
        return (tr is not None and not self._lost and not tr.is_closing()
                and now - self.idle_since < IDLE_POOL_SECONDS)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Dechunker:
    """Incremental decoder of the chunked transfer coding (RFC 9112 §7.1)."""

    __slots__ = ("_done", "_line", "_need", "_state", "surplus")

    def __init__(self) -> None:
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._need = 0
        self._line = b""
        self._done = False
        self.surplus = 0  # bytes fed after the end (they belong to no response)

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n and not self._done:
            if self._state == 1:
                take = min(self._need, n - i)
                out.append(data[i:i + take])
                i += take
                self._need -= take
                if self._need == 0:
                    self._state = 2
                    self._line = b""
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > 4096:
                    raise ValueError("chunk line too long")
                break
            line = (self._line + data[i:j]).rstrip(b"\r")
            self._line = b""
            i = j + 1
            if self._state == 0:
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(_HEX):
                    raise ValueError("bad chunk size")  # int() would take "-1" or "+a"
                self._need = int(size, 16)
                self._state = 1 if self._need else 3
            elif self._state == 2:
                if line:
                    raise ValueError("missing CRLF after chunk")
                self._state = 0
            elif not line:  # state 3: blank line ends the trailers
                self._done = True
                self.surplus = n - i
        return b"".join(out), self._done


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError("not HTTP/1.x")
    status = int(rest[:3])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        _add_header(headers, name.strip().lower(), value.strip())
    te = headers.get("transfer-encoding", "").lower()
    if [c.strip() for c in te.split(",")].count("chunked") > 1:
        raise ValueError("chunked applied twice")  # RFC 9112 §6.1: a sender must not
    return status, headers, version == "HTTP/1.0"


_FIRST_KEPT = frozenset({"content-type"})  # single-valued: a repeat is ignored (Go's Get)


def _add_header(headers: dict[str, str], name: str, value: str) -> None:
    """A repeated field: list fields joined (RFC 9110 §5.3), Content-Length values that
    disagree refused (RFC 9112 §6.3: the framing is then unknown), others the first kept."""
    if name == "content-length":
        values = {v.strip() for v in value.split(",")}
        if name in headers:
            values.add(headers[name])
        if len(values) != 1:
            raise ValueError("Content-Length values disagree")
        headers[name] = values.pop()
        return
    old = headers.get(name)
    if old is None:
        headers[name] = value
    elif name not in _FIRST_KEPT:
        headers[name] = f"{old}, {value}"


class Client:
    """Per-application upstream client: DNS cache, keep-alive pool, request builder."""

    def __init__(self) -> None:
        self._targets: dict[str, _Target] = {}
        self._dns: dict[str, tuple[float, list[Addr]]] = {}
        # keep-alive connections back from a response, taken newest first (the oldest may be
        # about to time out); spares opened ahead for servers that close each connection,
        # taken oldest first (a one-thread HTTP/1.0 server accepted that one first and is
        # blocked reading it)
        self._idle: dict[Key, list[_Conn]] = {}
        self._spares: dict[Key, collections.deque[_Conn]] = {}
        self._opening: dict[Key, int] = {}
        self._claims: dict[Key, collections.deque[asyncio.Future[_Conn | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wanted: set[Key] | None = None  # the servers the route table names (None: all)
        self._sweeper: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None

    def target(self, base: str) -> _Target:
        t = self._targets.get(base)
        if t is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            t = self._targets[base] = _Target(base)
        return t

    async def request(self, method: str, base: str, path: str, body: bytes,
                      headers: Mapping[str, str],
                      on_connected: Callable[[], None] | None = None) -> Response:
        """Send one request and wait for the response head. The caller must `close()` the
        Response. Raises OSError (UpstreamError among them) when the exchange fails.
        `on_connected` runs once a connection is ready, before the request is written."""
        t = self.target(base)
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {t.host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        raw = "".join(lines).encode("latin-1") + body
        key = t.key
        conn = self._reused(key)
        if conn is not None:
            if on_connected is not None:
                on_connected()
            try:
                resp = await conn.send(raw)
            except UpstreamError:
                if conn._got_bytes:
                    raise
                # the server closed the idle connection as we reused it: nothing was
                # processed, so one retry on a fresh connection is safe (as Go does; a spare
                # carried nothing before, so like a new connection it gets no retry)
            else:
                self._open_spare(t, conn)
                return resp
        conn = self._spare(key) or await self._claim(key) or await self._connect(t)
        if on_connected is not None:
            on_connected()
        try:
            resp = await conn.send(raw)
        except NotSent:  # the server closed it first: nothing was sent, one fresh try
            conn = await self._connect(t)
            resp = await conn.send(raw)
        self._open_spare(t, conn)
        return resp

    def keep_only(self, bases: Iterable[str]) -> None:
        """After a reload: close the idle and spare connections to the servers the table no
        longer names, and open no more to them, so that a re-homed model's old server drains."""
        self._wanted = {self.target(b).key for b in bases}
        for pools in (self._idle, self._spares):
            for key in [k for k in pools if k not in self._wanted]:
                for conn in pools.pop(key):
                    conn.abort()

    def _open_spare(self, t: _Target, used: _Conn) -> None:
        """Replace a connection the server will close with a spare, up to POOL_PER_SERVER:
        in a steady state the spares number the requests that arrive together."""
        key = used.key
        if used._keep_alive or self._unrouted(key):
            return
        opening = self._opening.get(key, 0)
        if opening + len(self._spares.get(key, ())) >= POOL_PER_SERVER:
            return
        self._opening[key] = opening + 1
        task = used._loop.create_task(self._preconnect(t, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, key: Key) -> _Conn | None:
        """A spare still connecting that no other request has claimed (None: there is none,
        or it failed). Waiting for it beats a connect of our own: it started earlier, and a
        one-thread server, accepting in order, would be blocked reading it while ours waits."""
        opening = self._opening.get(key, 0)
        if not opening:
            return None  # the common case for a server that keeps connections alive
        claims = self._claims.setdefault(key, collections.deque())
        if opening <= len(claims):
            return None
        fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        claims.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and (conn := fut.result()) is not None:
                self._offer(key, conn)  # handed over in the turn we were cancelled: pass it on
            raise
        finally:
            if fut in claims:
                claims.remove(fut)

    async def _preconnect(self, t: _Target, key: Key) -> None:
        conn: _Conn | None = None
        try:
            conn = await self._connect(t)
        except (OSError, ValueError):
            pass  # a claimant connects itself and reports what is wrong
        finally:
            self._opening[key] -= 1
        self._offer(key, conn)

    def _offer(self, key: Key, conn: _Conn | None) -> None:
        """A new spare (None: its connect failed) to the oldest request still waiting for
        one, else to the pool; never dropped, or a one-thread server waits on it forever."""
        for fut in self._claims.get(key, ()):
            if not fut.done():
                fut.set_result(conn)
                return
        if conn is None:
            return
        if self._unrouted(key):
            conn.abort()  # the table moved away from this server while it connected
            return
        conn.idle_since = time.monotonic()
        self._spares.setdefault(key, collections.deque()).append(conn)
        self._sweep_later(conn._loop)

    def _unrouted(self, key: Key) -> bool:
        return self._wanted is not None and key not in self._wanted

    async def _connect(self, t: _Target) -> _Conn:
        loop = asyncio.get_running_loop()
        key = t.key
        ctx = None
        if t.ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        if t.is_ip:  # one address: the loop's own connect (in C under uvloop) is the cheapest
            _, conn = await loop.create_connection(
                lambda: _Conn(self, key, loop), t.host, t.port, ssl=ctx,
                server_hostname=t.host if ctx else None)
            return conn
        sock = await happy_eyeballs(await self._resolve(t.host, t.port))
        try:
            _, proto = await loop.create_connection(
                lambda: _Conn(self, key, loop), sock=sock, ssl=ctx,
                server_hostname=t.host if ctx else None,
            )
        except BaseException:
            sock.close()
            raise
        return proto

    async def _resolve(self, host: str, port: int) -> list[Addr]:
        """Every address of `host`, in RFC 8305 order, each sockaddr whole (an IPv6 scope id
        is what makes `fe80::…%en0` reachable). Cached for DNS_TTL."""
        now = time.monotonic()
        hit = self._dns.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
        infos = await getaddrinfo(host, port)
        addrs = interleave([(family, sockaddr) for family, _, _, _, sockaddr in infos])
        if not addrs:
            raise UpstreamError("name did not resolve")
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[host] = (now + DNS_TTL, addrs)
        return addrs

    def _reused(self, key: Key) -> _Conn | None:
        """The newest live keep-alive connection back from a response."""
        idle = self._idle.get(key)
        return _first_ready(idle, idle.pop) if idle else None

    def _spare(self, key: Key) -> _Conn | None:
        """The oldest live spare."""
        spares = self._spares.get(key)
        return _first_ready(spares, spares.popleft) if spares else None

    def release(self, conn: _Conn) -> None:
        if self._unrouted(conn.key):  # a reload removed its server meanwhile: let it drain
            conn.abort()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= POOL_PER_SERVER:
            conn.abort()
            return
        idle.append(conn)
        self._sweep_later(conn._loop)

    def forget(self, conn: _Conn) -> None:
        for pool in (self._idle.get(conn.key), self._spares.get(conn.key)):
            if pool and conn in pool:
                pool.remove(conn)

    def _sweep_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None:
            self._sweeper = loop.call_later(IDLE_POOL_SECONDS, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close what has idled past IDLE_POOL_SECONDS, so that no connection outlives its
        use: a server taken out of routes.yaml is not left holding a thread per spare."""
        self._sweeper = None
        now = time.monotonic()
        pools: list[list[_Conn] | collections.deque[_Conn]] = [
            *self._idle.values(), *self._spares.values()]
        for pool in pools:
            for conn in [c for c in pool if not c.ready(now)]:
                pool.remove(conn)
                conn.abort()
        if any(pools):
            self._sweep_later(loop)

    def close(self) -> None:
        """Close every pooled connection and open no more (a request still in flight
        finishes on its own connection)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in self._tasks:
            task.cancel()
        for claims in self._claims.values():
            for fut in claims:
                fut.cancel()
        self.keep_only(())


def _ignore(data: bytes) -> None:
    """Where bytes go once the connection is lost (none should)."""


def _keep_probing(transport_sock: Any) -> None:
    """Turn on KEEPALIVE's probes. Through one socket object on the transport's descriptor:
    uvloop's pseudo-socket builds a socket object per call (9 µs for the four, 5 µs so)."""
    if transport_sock is None:
        return
    try:
        sock = socket.socket(transport_sock.family, transport_sock.type, transport_sock.proto,
                             fileno=transport_sock.fileno())
    except (OSError, ValueError):
        return  # closed already: nothing to probe
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in _KEEPALIVE_OPTS:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError:
        pass  # not a TCP socket: nothing to probe
    finally:
        sock.detach()  # the descriptor stays the transport's


def _first_ready(pool: Sized, take: Callable[[], _Conn]) -> _Conn | None:
    """The first connection `take` gives that is still ready; the stale ones are closed."""
    now = time.monotonic()
    while pool:
        conn = take()
        if conn.ready(now):
            return conn
        conn.abort()
    return None


Addr = tuple[int, tuple[Any, ...]]  # (address family, sockaddr as getaddrinfo gave it)


async def getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
    """The resolver (a seam: tests make a name resolve to chosen addresses)."""
    return await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


def interleave(addrs: list[Addr]) -> list[Addr]:
    """RFC 8305 §4: duplicates dropped, families alternated starting with the first answer's
    (a name with a dead IPv6 and a live IPv4 address costs one attempt delay, not all v6)."""
    by_family: dict[int, list[Addr]] = {}
    seen: set[tuple[Any, ...]] = set()
    for family, sockaddr in addrs:
        if sockaddr not in seen:
            seen.add(sockaddr)
            by_family.setdefault(family, []).append((family, sockaddr))
    queues = list(by_family.values())
    out: list[Addr] = []
    while queues:
        for q in queues:
            out.append(q.pop(0))
        queues = [q for q in queues if q]
    return out


async def happy_eyeballs(addrs: list[Addr], delay: float = ATTEMPT_DELAY) -> socket.socket:
    """A connected socket to the first address that answers (RFC 8305 §5): attempts start
    `delay` apart, or at once when the previous one fails; the first to connect wins and the
    others are closed. Raises the last OSError when every address failed."""
    if len(addrs) == 1:
        return await _attempt(*addrs[0])
    pending: set[asyncio.Task[socket.socket]] = set()
    last: OSError = UpstreamError("no address")
    try:
        for i in range(len(addrs) + 1):
            if i < len(addrs):
                pending.add(asyncio.ensure_future(_attempt(*addrs[i])))
            while pending:
                done, _ = await asyncio.wait(pending, timeout=delay if i < len(addrs) else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break  # nothing answered within the delay: start the next attempt
                pending -= done
                winner = None
                for task in done:
                    exc = task.exception()
                    if exc is None and winner is None:
                        winner = task.result()
                    elif exc is None:
                        task.result().close()
                    elif isinstance(exc, OSError):
                        last = exc
                    else:
                        raise exc
                if winner is not None:
                    return winner
                if i < len(addrs) - 1:
                    break  # a failure: the next attempt starts now
        raise last
    finally:
        for task in pending:  # the losers: cancelled, or closed if they connected meanwhile
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().close()


async def _attempt(family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False

