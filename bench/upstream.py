"""A fast fake mlx_lm.server for the benchmark: byte-exact answers, almost no CPU per request.

Why: a proxy's cost is only visible when the upstream is cheaper than the proxy. The real
mlx_lm.server spends milliseconds per request; this one answers from pre-encoded bytes, so
the figures measure the target in front of it, not the upstream.

Shape (mlx-lm 0.32.2, see /work/shared/README.md): `HTTP/1.0 200 OK`, `Server: BaseHTTP/0.6
Python/3.11.7`, a Date, `Content-type` (+ `Cache-Control: no-cache` on streams), the three
`Access-Control-Allow-*: *` headers; unary answers carry Content-Length, streams are
close-delimited. Bodies use `json.dumps` default spacing, the internal `model` path and a
`system_fingerprint`; streams start with `: keepalive 1/1`, send one `data:` event per chunk
(one write each, like mlx's flush per token), the usage event `{"object": "chat.completion",
"choices": [], ...}` when `stream_options.include_usage` is set, then `data: [DONE]`.
`--http11` answers HTTP/1.1 with keep-alive (chunked streams) to measure pooled relays.
`--max-concurrent N` serves at most N streams at a time and holds the rest (connection open,
no byte sent) until one ends, FIFO: an upstream that is saturated, for scenario (g).

A slow reader gets backpressure: the stream pauses while the transport is above its high
water mark (mlx's blocking `wfile.write` behaves the same way).

`--compact` writes `json.dumps(obj, separators=(",", ":"))` instead, as other
OpenAI-compatible servers do (the splice must not depend on one server's spacing).

Usage: python bench/upstream.py --port P [--chunks 64] [--chunk-size 8] [--pace-ms 0]
       [--unary-chunks 16] [--http11] [--stamp] [--max-concurrent N] [--compact]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from email.utils import formatdate

MODEL = "/Users/admin/models/qwen3-coder-30b"
FINGERPRINT = "0.32.2-0.32.4-Darwin-24.6.0-arm64-arm-64bit"
WORDS = "the quick brown fox jumps over the lazy dog and keeps on running "


def _text(size: int) -> str:
    return (WORDS * (size // len(WORDS) + 1))[:size]


class Bodies:
    """Every byte the fake will ever send, encoded once at start-up."""

    def __init__(self, chunks: int, chunk_size: int, unary_chunks: int,
                 compact: bool = False, model: str = MODEL) -> None:
        seps = (",", ":") if compact else (", ", ": ")

        def dumps(obj: object) -> str:
            return json.dumps(obj, separators=seps)

        rid = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())
        text = _text(chunk_size)
        base = {"id": rid, "system_fingerprint": FINGERPRINT}

        def chunk(finish: str | None, content: str | None) -> bytes:
            delta: dict[str, str] = {"role": "assistant"}
            if content:
                delta["content"] = content
            obj = dict(base, object="chat.completion.chunk", model=model, created=created,
                       choices=[{"index": 0, "finish_reason": finish, "delta": delta}])
            return f"data: {dumps(obj)}\n\n".encode()

        self.events = [chunk(None, text) for _ in range(chunks - 1)] + [chunk("stop", None)]
        # --stamp: the content is the send time (CLOCK_MONOTONIC, shared by all processes
        # on the host), so a client measures each event's relay latency exactly.
        marker = "\x00STAMP\x00"
        head, _, tail = chunk(None, marker).partition(json.dumps(marker)[1:-1].encode())
        self.stamp_parts = (head, tail)
        usage = {"prompt_tokens": 19, "completion_tokens": chunks, "total_tokens": 19 + chunks,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        usage_obj = dict(base, object="chat.completion", model=model, created=created,
                         choices=[], usage=usage)
        self.usage = f"data: {dumps(usage_obj)}\n\n".encode()
        self.keepalive = b": keepalive 1/1\n\n"
        self.done = b"data: [DONE]\n\n"
        unary = dict(base, object="chat.completion", model=model, created=created,
                     choices=[{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant",
                                           "content": _text(chunk_size * unary_chunks)}}],
                     usage={"prompt_tokens": 19, "completion_tokens": unary_chunks,
                            "total_tokens": 19 + unary_chunks,
                            "prompt_tokens_details": {"cached_tokens": 0}})
        self.unary = dumps(unary).encode()
        self.health = json.dumps({"status": "ok"}).encode()


class Clock:
    """The Date header, re-formatted at most once a second (like a real server's cost: none)."""

    def __init__(self) -> None:
        self.sec = 0
        self.value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.sec:
            self.sec = now
            self.value = formatdate(now, usegmt=True).encode()
        return self.value


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked request body starting at pos: (body, end offset), or None if incomplete."""
    out = bytearray()
    for _ in range(100000):
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # optional trailers, then a blank line
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2: eol + 2 + size]
        pos = eol + 2 + size + 2
    return None


class Upstream(asyncio.Protocol):
    """One connection: parse a request (Content-Length or chunked body), answer from Bodies."""

    bodies: Bodies
    pace: float
    stamp: bool
    http11: bool
    clock: Clock
    gate: asyncio.Semaphore | None = None  # --max-concurrent: streams served at a time

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.resume: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()
        if self.resume is not None and not self.resume.done():
            self.resume.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        """Handle the next complete request in the buffer, if any."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        length = 0
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17: j if j >= 0 else len(head)])
        if b"\r\ntransfer-encoding: chunked" in head:
            got = _dechunk(buf, end + 4)
            if got is None:
                return
            body, used = got
            del buf[:used]
        else:
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4: end + 4 + length])
            del buf[: end + 4 + length]
        close = (not self.http11) or b"\r\nconnection: close" in head
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        if line.startswith(b"get /health"):
            self._unary(self.bodies.health, close)
        elif line.startswith(b"post /v1/chat/completions"):
            compact = body.replace(b" ", b"")
            if b'"stream":true' in compact:
                usage = b'"include_usage":true' in compact
                self.busy = True
                self.task = asyncio.get_running_loop().create_task(self._stream(usage, close))
            else:
                self._unary(self.bodies.unary, close)
        else:
            self._unary(b"Not Found", close, status=b"404 Not Found", ctype=b"text/plain")

    def _head(self, status: bytes, ctype: bytes, extra: bytes) -> bytes:
        proto = b"HTTP/1.1 " if self.http11 else b"HTTP/1.0 "
        return (proto + status + b"\r\nServer: BaseHTTP/0.6 Python/3.11.7\r\nDate: "
                + self.clock.date() + b"\r\nContent-type: " + ctype + b"\r\n" + extra
                + b"Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: *\r\n"
                  b"Access-Control-Allow-Headers: *\r\n")

    def _unary(self, body: bytes, close: bool, status: bytes = b"200 OK",
               ctype: bytes = b"application/json") -> None:
        t = self.transport
        if t is None:
            return
        head = self._head(status, ctype, b"")
        conn = b"Connection: close\r\n" if (close and self.http11) else b""
        t.write(head + conn + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if close:
            t.close()
        elif self.buf:
            self._next()

    async def _stream(self, usage: bool, close: bool) -> None:
        t = self.transport
        if t is None:
            return
        b = self.bodies
        chunked = self.http11 and not close
        extra = b"Cache-Control: no-cache\r\n"
        if chunked:
            extra += b"Transfer-Encoding: chunked\r\n"
        elif self.http11:
            extra += b"Connection: close\r\n"

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

        gate = self.gate
        held = False
        try:
            if gate is not None:  # saturated: hold the request, send nothing yet
                await gate.acquire()
                held = True
                t = self.transport
                if t is None:
                    return
            t.write(self._head(b"200 OK", b"text/event-stream", extra) + b"\r\n"
                    + frame(b.keepalive))
            events = b.events + ([b.usage] if usage else []) + [b.done]
            pace = self.pace
            stamp = self.stamp
            head, tail = b.stamp_parts
            last = len(b.events) - 1
            start = time.monotonic()
            for n, ev in enumerate(events):
                if self.transport is None:
                    return
                if self.paused:
                    self.resume = asyncio.get_running_loop().create_future()
                    await self.resume
                if pace and 0 < n <= last:  # an absolute schedule: no drift over a stream
                    delay = start + n * pace - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if self.transport is None:
                    return
                if stamp and n < last:
                    ev = b"%sT%.6f%s" % (head, time.monotonic(), tail)
                t.write(frame(ev))
            if chunked:
                t.write(b"0\r\n\r\n")
            if close:
                t.close()
        except asyncio.CancelledError:
            return
        finally:
            if held and gate is not None:
                gate.release()
            self.task = None
            self.busy = False
        if not close and self.buf and self.transport is not None:
            self._next()


async def serve(args: argparse.Namespace) -> None:
    Upstream.bodies = Bodies(args.chunks, args.chunk_size, args.unary_chunks, args.compact,
                             args.model)
    Upstream.pace = args.pace_ms / 1000.0
    Upstream.http11 = args.http11
    Upstream.stamp = args.stamp
    Upstream.clock = Clock()
    if args.max_concurrent > 0:
        Upstream.gate = asyncio.Semaphore(args.max_concurrent)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, args.host, args.port, backlog=4096)
    print(f"fake upstream on http://{args.host}:{args.port} chunks={args.chunks} "
          f"size={args.chunk_size} pace={args.pace_ms}ms http11={args.http11}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=64, help="content events per stream")
    p.add_argument("--chunk-size", type=int, default=8, help="bytes of content text per event")
    p.add_argument("--pace-ms", type=float, default=0.0, help="ms between events (0: unpaced)")
    p.add_argument("--unary-chunks", type=int, default=16,
                   help="unary content is this many chunks of text")
    p.add_argument("--http11", action="store_true", help="HTTP/1.1 keep-alive answers")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="serve at most N streams at a time, hold the rest (0: no limit)")
    p.add_argument("--model", default=MODEL,
                   help="the model id every answer names (mlx_lm.server echoes the one it "
                        "was asked for: the gateway's internal id for this route)")
    p.add_argument("--compact", action="store_true",
                   help="compact JSON separators (other servers' style), not json.dumps's")
    p.add_argument("--stamp", action="store_true",
                   help="content = send time (time.monotonic) to measure relay latency")
    args = p.parse_args()
    try:
        import uvloop  # optional: the fake must never be the bottleneck
        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
