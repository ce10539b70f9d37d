"""A scriptable fake of ``mlx_lm.server`` that speaks its exact wire format.

The gateway's tests need an upstream that fails on demand: dies mid-stream, stalls,
drops or resets the connection, or answers with mlx's bare-string error bodies. A real
``mlx_lm.server`` cannot be told to do any of that, and aiohttp's own server cannot speak
HTTP/1.0 close-delimited bodies or reset a socket, so this is a small HTTP server written
directly on :func:`asyncio.start_server`. It listens on loopback only.

Wire facts reproduced (mlx-lm 0.32.2, ``mlx_lm/server.py``; see ``/work/shared/README.md``
and STYLE.md section 5):

* ``BaseHTTPRequestHandler`` defaults: ``HTTP/1.0`` status line, ``Server`` and ``Date``
  first, then ``Content-type`` (lower-case ``t``, as mlx writes it) and the CORS
  ``Access-Control-Allow-*: *`` headers. Every connection is closed after one response.
* Only the unary 200 carries ``Content-Length``; streams, errors, ``/health`` and
  ``/v1/models`` are close-delimited.
* SSE events are ``f"data: {json.dumps(obj)}\\n\\n"``; ``: keepalive i/n`` comments come
  before the first event; the stream ends with ``data: [DONE]\\n\\n``.
* ``model`` echoes the request's ``model`` (``"default_model"`` when absent).
* Errors are ``{"error": "<str>"}``, not the OpenAI envelope; an unknown path is a 404
  whose body is ``Not Found`` under ``Content-type: application/json``.

``FakeMLX(http11=True)`` answers the same payloads over HTTP/1.1 keep-alive with
``Content-Length`` / chunked bodies, so tests can compare the gateway's behaviour against
a well-behaved upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any

# What BaseHTTPRequestHandler sends on the machine the README was observed on.
SERVER_HEADER = "BaseHTTP/0.6 Python/3.11.7"
SYSTEM_FINGERPRINT = "0.32.2-0.32.4-Linux-6.18.44-x86_64-with-glibc2.36-x86_64"

# Default token texts: varied ASCII plus one U+FFFD, because random-weight models emit
# partial UTF-8 and the gateway must pass it through untouched.
_WORDS = ("The", " quick", "\ufffd", " brown", " fox", " jumps", " over", " the", " lazy", " dog")

_COMPLETION_PATHS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "text",
}

# Bounds that keep a misbehaving client from pinning a fake connection forever.
_MAX_HEAD = 64 * 1024
_IDLE_TIMEOUT = 60.0


def abort(transport: asyncio.WriteTransport) -> None:
    """Drop a server-side connection now, unless it is already gone. Python 3.11's selector
    transport cannot take abort() after its own close() flushed the buffer and dropped the
    connection (its _write_ready calls connection_lost directly and leaves _conn_lost at 0):
    _force_close then calls self._loop.call_soon on a None loop, an AttributeError. Closing
    with nothing buffered means lost, or about to be: there is nothing left to abort."""
    if transport.is_closing() and transport.get_write_buffer_size() == 0:
        return
    transport.abort()


@dataclass
class Recorded:
    """One request the fake received, as parsed off the wire.

    ``headers`` has lower-case names (the last value wins on repeats). ``json`` is the
    decoded body, or ``None`` when the body is empty or not valid JSON.
    ``closed_by_peer`` is set (and ``closed_at`` stamped with ``loop.time()``) when the
    client closed or aborted the connection before the fake finished its answer; it is
    how tests prove that the gateway cancels upstream work on client disconnect.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    closed_by_peer: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None


@dataclass
class Behavior:
    """What the fake does with one request to a completion endpoint.

    ``kind``:
      * ``"auto"``: answer like mlx: unary or stream according to the request's
        ``stream`` flag, including mlx's own 400/411 answers to malformed requests.
      * ``"error"``: ``status`` with ``error_body``, close-delimited (mlx's 404/500/503).
      * ``"hang"``: read the request, never answer, until the peer or ``close()`` ends it.
      * ``"drop"``: close the connection (FIN) without a response, as mlx does when an
        exception escapes ``do_POST``.
      * ``"reset"``: close with ``SO_LINGER`` 0, so the client sees a TCP RST.
      * ``"raw"``: write ``raw`` byte for byte, then close.

    Stream timing: ``header_delay`` (model load) → headers → ``keepalives`` comments
    ``keepalive_delay`` apart (prompt processing) → ``events`` token chunks with ``delay``
    before each one after the first → a final chunk carrying ``finish_reason`` → the usage
    chunk if asked for → ``[DONE]``. ``die_after`` / ``stall_after`` count every ``data:``
    event (tokens, final, usage) and stop before writing the next one: ``die_after``
    closes the socket, ``stall_after`` keeps it open and silent.
    """

    kind: str = "auto"
    model_echo: str | None = None
    events: int = 5
    delay: float = 0.0
    keepalives: int = 0  # real mlx sends at least one ("1/1") on a short prompt
    keepalive_delay: float = 0.0
    header_delay: float = 0.0
    die_after: int | None = None
    stall_after: int | None = None
    status: int = 500
    error_body: bytes = b'{"error": "..."}'
    raw: bytes = b""
    content_type: str | None = None
    text: str | None = None
    finish_reason: str | None = None  # None: "length" if max_tokens cut it short, else "stop"
    # What a reasoning / tool-calling model adds (chat only), as mlx-lm 0.32.2 emits it:
    # `reasoning` texts stream first as `delta.reasoning` chunks; each of `tool_calls`
    # ({"name": str, "arguments": dict, "id"?: str}) arrives whole in one chunk after the text
    # (mlx writes nothing while inside the tool markers), and a "stop" finish becomes
    # "tool_calls". Unary: `message.reasoning` and `message.tool_calls`.
    reasoning: tuple[str, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()


class _PeerClosed(Exception):
    """The client went away; nothing more can be written."""


class _Conn:
    """One accepted connection: a read pump that notices EOF while we are writing.

    The pump owns the StreamReader so that a peer close is observed even while the
    handler is sleeping, streaming or hanging (mlx itself only notices on a failed write).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.data = asyncio.Event()
        self.peer_closed = asyncio.Event()
        self.current: Recorded | None = None
        self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                self.buf += chunk
                self.data.set()
        except (ConnectionError, OSError):
            pass
        self.eof = True
        self.data.set()
        self.mark_peer_closed()

    def mark_peer_closed(self) -> None:
        if self.peer_closed.is_set():
            return
        self.peer_closed.set()
        rec = self.current
        if rec is not None and not rec.closed_by_peer.is_set():
            rec.closed_at = asyncio.get_running_loop().time()
            rec.closed_by_peer.set()

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        """Bytes up to and including ``sep``; ``None`` on EOF, idle timeout or overflow."""
        while True:
            idx = self.buf.find(sep)
            if idx >= 0:
                out = bytes(self.buf[: idx + len(sep)])
                del self.buf[: idx + len(sep)]
                return out
            if self.eof or len(self.buf) > limit:
                return None
            self.data.clear()
            try:
                await asyncio.wait_for(self.data.wait(), _IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                return None

    async def read_exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if self.eof:
                return None
            self.data.clear()
            try:
                await asyncio.wait_for(self.data.wait(), _IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        if self.peer_closed.is_set() or self.writer.is_closing():
            raise _PeerClosed
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            self.mark_peer_closed()
            raise _PeerClosed from e

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        """Sleep, but raise ``_PeerClosed`` as soon as the peer goes (or the fake closes)."""
        if seconds <= 0:
            if self.peer_closed.is_set():
                raise _PeerClosed
            return
        waiters = [
            asyncio.ensure_future(self.peer_closed.wait()),
            asyncio.ensure_future(stop.wait()),
        ]
        try:
            timeout = None if seconds == float("inf") else seconds
            done, _ = await asyncio.wait(waiters, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if done:
            raise _PeerClosed


class FakeMLX:
    """A real HTTP server on 127.0.0.1 that answers like ``mlx_lm.server``.

    Use as ``async with FakeMLX() as fake:`` and point the gateway at ``fake.url``.
    Which :class:`Behavior` answers a completion request: :attr:`rule` (a function of the
    decoded body returning a Behavior or None) when set and it answers, else a
    :meth:`by_model` rule for the request's ``model`` if one matches (it never consumes the
    queue), else the next :meth:`push`-ed behaviour (FIFO, one per request), else :attr:`default`.
    ``GET /health`` uses :attr:`health` when set, else answers ``200 {"status": "ok"}``.
    """

    def __init__(self, *, http11: bool = False) -> None:
        self.http11 = http11
        self.default = Behavior()
        self.health: Behavior | None = None
        self.requests: list[Recorded] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._queue: deque[Behavior] = deque()
        self._by_model: dict[str, Behavior] = {}
        self.rule: Callable[[Any], Behavior | None] | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see :attr:`port`)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end every open connection, hung ones included (bounded)."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            abort(conn.writer.transport)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> FakeMLX:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections currently open on the fake (proves upstream cleanup)."""
        return len(self._conns)

    # -- scripting ---------------------------------------------------------------------

    def push(self, *behaviors: Behavior) -> None:
        """Queue behaviours for the next completion requests, first in first out."""
        self._queue.extend(behaviors)

    def by_model(self, model: str, behavior: Behavior) -> None:
        """Answer every request whose body ``model`` equals ``model`` with ``behavior``."""
        self._by_model[model] = behavior

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` requests are recorded; ``TimeoutError`` after ``timeout``."""

        async def until() -> None:
            while len(self.requests) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    def _pick(self, rec: Recorded) -> Behavior:
        if self.rule is not None:
            chosen = self.rule(rec.json)
            if chosen is not None:
                return chosen
        model = rec.json.get("model") if isinstance(rec.json, dict) else None
        if isinstance(model, str) and model in self._by_model:
            return self._by_model[model]
        if self._queue:
            return self._queue.popleft()
        return self.default

    # -- connection handling -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        try:
            while not self._stop.is_set():
                rec = await self._read_request(conn)
                if rec is None:
                    break
                conn.current = rec
                self.requests.append(rec)
                self._changed.set()
                try:
                    keep = await self._respond(conn, rec)
                except _PeerClosed:
                    break
                if conn.current is rec:
                    conn.current = None
                if not (self.http11 and keep):
                    break
        except asyncio.CancelledError:
            pass
        finally:
            conn.current = None
            conn.pump.cancel()
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._conns.discard(conn)
            self._tasks.discard(task)

    async def _read_request(self, conn: _Conn) -> Recorded | None:
        head = await conn.read_until(b"\r\n\r\n", _MAX_HEAD)
        if head is None:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 0:
            got = await conn.read_exactly(int(length))
            if got is None:
                return None
            body = got
        parsed: Any | None = None
        if body:
            with contextlib.suppress(ValueError):
                parsed = json.loads(body.decode())
        return Recorded(method=parts[0], path=parts[1], headers=headers, body=body, json=parsed)

    # -- responses ---------------------------------------------------------------------

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        """Status line and headers in BaseHTTPRequestHandler's order."""
        version = "HTTP/1.1" if self.http11 else "HTTP/1.0"
        out = [
            f"{version} {status} {HTTPStatus(status).phrase}",
            f"Server: {SERVER_HEADER}",
            f"Date: {email.utils.formatdate(time.time(), usegmt=True)}",
        ]
        out += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    def _json_headers(content_type: str = "application/json") -> list[tuple[str, str]]:
        return [
            ("Content-type", content_type),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "*"),
            ("Access-Control-Allow-Headers", "*"),
        ]

    async def _send_whole(
        self, conn: _Conn, status: int, body: bytes, content_type: str = "application/json",
        *, content_length: bool = False,
    ) -> bool:
        """One complete answer. HTTP/1.0: close-delimited unless ``content_length``."""
        headers = self._json_headers(content_type)
        if content_length or self.http11:
            headers.append(("Content-Length", str(len(body))))
        conn.current = None  # everything is handed over in this write
        await conn.write(self._head(status, headers) + body)
        return True

    async def _respond(self, conn: _Conn, rec: Recorded) -> bool:
        """Answer one request; returns whether an HTTP/1.1 connection may be reused."""
        if self.http11 and rec.headers.get("connection", "").lower() == "close":
            keep = False
        else:
            keep = True
        if rec.method == "OPTIONS":
            await self._send_whole(conn, 204, b"")
            return keep
        if rec.method == "GET":
            if rec.path == "/health":
                if self.health is not None:
                    return await self._behave(conn, rec, self.health, health=True) and keep
                await self._send_whole(conn, 200, json.dumps({"status": "ok"}).encode())
                return keep
            if rec.path.startswith("/v1/models"):
                # mlx sends the headers, then scans the HF cache; with no cache the scan
                # raises and the body is empty (README: "200 with an empty body").
                await self._send_whole(conn, 200, b"")
                return keep
            await self._send_whole(conn, 404, b"Not Found")
            return keep
        if rec.method != "POST":
            await self._send_whole(conn, 501, b"Unsupported method", "text/html;charset=utf-8")
            return False
        if rec.path not in _COMPLETION_PATHS:
            await self._send_whole(conn, 404, b"Not Found")
            return keep
        return await self._behave(conn, rec, self._pick(rec)) and keep

    async def _behave(self, conn: _Conn, rec: Recorded, b: Behavior, *, health: bool = False
                      ) -> bool:
        if b.kind == "hang":
            # Never answer; the read pump sets closed_by_peer when the client gives up.
            waiters = [asyncio.ensure_future(conn.peer_closed.wait()),
                       asyncio.ensure_future(self._stop.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            raise _PeerClosed
        if b.kind == "drop":
            conn.current = None
            return False
        if b.kind == "reset":
            conn.current = None
            sock = conn.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.writer.transport.abort()
            return False
        await conn.sleep(b.header_delay, self._stop)
        if b.kind == "raw":
            conn.current = None
            await conn.write(b.raw)
            return False
        if b.kind == "error":
            await self._send_whole(conn, b.status, b.error_body,
                                   b.content_type or "application/json")
            return True
        if health:
            await self._send_whole(conn, 200, json.dumps({"status": "ok"}).encode(),
                                   b.content_type or "application/json")
            return True
        if b.kind != "auto":
            raise ValueError(f"unknown Behavior.kind {b.kind!r}")
        return await self._auto(conn, rec, b)

    async def _auto(self, conn: _Conn, rec: Recorded, b: Behavior) -> bool:
        """mlx's own request validation, then a unary or streamed answer."""
        if "content-length" not in rec.headers:
            await self._send_whole(
                conn, 411, json.dumps({"error": "Content-Length header is required"}).encode())
            return False
        try:
            body = json.loads(rec.body.decode())
        except json.JSONDecodeError as e:
            await self._send_whole(
                conn, 400, json.dumps({"error": f"Invalid JSON in request body: {e}"}).encode())
            return True
        except UnicodeDecodeError:
            conn.current = None  # escapes do_POST in mlx: connection closes, no response
            return False
        if not isinstance(body, dict):
            await self._send_whole(
                conn, 400, json.dumps({"error": "Request should be a JSON dictionary"}).encode())
            return True
        kind = _COMPLETION_PATHS[rec.path]
        need = "messages" if kind == "chat" else "prompt"
        if need not in body:
            what = "messages" if kind == "chat" else "a prompt"
            await self._send_whole(
                conn, 400, json.dumps({"error": f"Request did not contain {what}"}).encode())
            return True

        stream = bool(body.get("stream", False))
        reply = _Reply(body, kind, stream, b)
        if not stream:
            await conn.sleep(b.delay, self._stop)
            payload = json.dumps(reply.unary()).encode()
            await self._send_whole(conn, 200, payload, b.content_type or "application/json",
                                   content_length=True)
            return True
        return await self._stream(conn, reply, b)

    async def _stream(self, conn: _Conn, reply: _Reply, b: Behavior) -> bool:
        headers = [
            ("Content-type", b.content_type or "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "*"),
            ("Access-Control-Allow-Headers", "*"),
        ]
        if self.http11:
            headers.append(("Transfer-Encoding", "chunked"))

        def frame(data: bytes) -> bytes:
            if not self.http11:
                return data
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        await conn.write(self._head(200, headers))
        # Observed: one prompt step gives ": keepalive 1/1"; two give "0/1", "1/1".
        total = max(1, b.keepalives - 1)
        for i in range(b.keepalives):
            if i:
                await conn.sleep(b.keepalive_delay, self._stop)
            done = 1 if b.keepalives == 1 else i
            await conn.write(frame(f": keepalive {done}/{total}\n\n".encode()))
        if b.keepalives:
            await conn.sleep(b.keepalive_delay, self._stop)

        events = reply.events()
        for i, obj in enumerate(events):
            if b.die_after is not None and i >= b.die_after:
                # mlx: an exception after the headers ends the body with no [DONE].
                conn.current = None
                if self.http11:
                    conn.writer.transport.abort()
                return False
            if b.stall_after is not None and i >= b.stall_after:
                await conn.sleep(float("inf"), self._stop)
            if i:
                await conn.sleep(b.delay, self._stop)
            await conn.write(frame(f"data: {json.dumps(obj)}\n\n".encode()))
        conn.current = None
        tail = frame(b"data: [DONE]\n\n")
        if self.http11:
            tail += b"0\r\n\r\n"
        await conn.write(tail)
        return True


class _Reply:
    """The JSON objects mlx would send for one request, with mlx's key order."""

    def __init__(self, body: dict[str, Any], kind: str, stream: bool, b: Behavior) -> None:
        self.body = body
        self.kind = kind
        self.stream = stream
        self.model = b.model_echo if b.model_echo is not None else body.get(
            "model", "default_model")
        self.id = (f"chatcmpl-{uuid.uuid4()}" if kind == "chat" else f"cmpl-{uuid.uuid4()}")
        self.created = int(time.time())
        self.prompt_tokens = max(1, len(json.dumps(body.get("messages", body.get("prompt"))))
                                 // 4)
        n = b.events
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        cut = False
        if isinstance(limit, int) and limit < n:  # mlx stops at max_tokens: "length"
            n, cut = max(0, limit), True
        self.finish = b.finish_reason or ("length" if cut else "stop")
        self.tokens = [b.text if b.text is not None else _word(i) for i in range(n)]
        self.reasoning = list(b.reasoning) if kind == "chat" else []
        self.calls = [self._call(c, i) for i, c in enumerate(b.tool_calls)] \
            if kind == "chat" else []
        if self.calls and self.finish == "stop":
            self.finish = "tool_calls"

    def _call(self, call: dict[str, Any], index: int) -> dict[str, Any]:
        """mlx's ToolCallFormatter._format: arguments as a JSON string (ensure_ascii off),
        the model's id or a uuid4, and `index` only when streaming."""
        out: dict[str, Any] = {
            "function": {"name": call["name"],
                         "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
            "type": "function",
            "id": call.get("id") or str(uuid.uuid4()),
        }
        if self.stream:
            out["index"] = index
        return out

    def _object(self, chunk: bool) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def _base(self, finish: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": self._object(self.stream),
            "model": self.model,
            "created": self.created,
            "choices": [{"index": 0, "finish_reason": finish}],
        }

    def _usage(self) -> dict[str, Any]:
        n = len(self.tokens) + len(self.reasoning) + 8 * len(self.calls)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    def _chunk(self, text: str, finish: str | None, *, reasoning: str = "",
               calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        resp = self._base(finish)
        choice = resp["choices"][0]
        if self.kind == "chat":
            # mlx-lm 0.32.2 generate_response: "content" only when non-empty in a stream
            # delta; "reasoning"/"tool_calls" only when present.
            delta: dict[str, Any] = {"role": "assistant"}
            if text:
                delta["content"] = text
            if reasoning:
                delta["reasoning"] = reasoning
            if calls:
                delta["tool_calls"] = calls
            choice["delta"] = delta
        else:
            choice["text"] = text
        return resp

    def events(self) -> list[dict[str, Any]]:
        """Every ``data:`` payload of the stream, in order, before ``[DONE]``."""
        out = [self._chunk("", None, reasoning=r) for r in self.reasoning]
        out += [self._chunk(t, None) for t in self.tokens]
        out += [self._chunk("", None, calls=[c]) for c in self.calls]
        out.append(self._chunk("", self.finish))
        opts = self.body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            out.append({
                "id": self.id,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "object": "chat.completion",
                "model": self.model,
                "created": self.created,
                "choices": [],
                "usage": self._usage(),
            })
        return out

    def unary(self) -> dict[str, Any]:
        text = "".join(self.tokens)
        resp = self._base(self.finish)
        resp["usage"] = self._usage()
        choice = resp["choices"][0]
        if self.kind == "chat":
            msg: dict[str, Any] = {"role": "assistant", "content": text if text else None}
            if self.reasoning:
                msg["reasoning"] = "".join(self.reasoning)
            if self.calls:
                msg["tool_calls"] = self.calls
            choice["message"] = msg
        else:
            choice["text"] = text
        return resp


def _word(i: int) -> str:
    w = _WORDS[i % len(_WORDS)]
    if w == "\ufffd" and i >= len(_WORDS):
        return " again"  # exactly one U+FFFD per answer
    return w
