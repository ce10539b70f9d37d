"""The upstream HTTP client: body framings, keep-alive reuse, and the one safe retry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr.upstream import Client, UpstreamError, _Dechunker


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """`body` in the chunked transfer coding, cut at `sizes`, with an extension and a
    trailer for good measure."""
    out, i = b"", 0
    for n in sizes:
        part = body[i:i + n]
        if not part:
            break
        out += b"%x;ext=1\r\n%b\r\n" % (len(part), part)
        i += n
    if i < len(body):
        out += b"%x\r\n%b\r\n" % (len(body) - i, body[i:])
    return out + b"0\r\nX-Trailer: yes\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), sizes=st.lists(st.integers(1, 64), max_size=10),
       cuts=st.lists(st.integers(1, 40), max_size=30))
def test_dechunker_any_cut_gives_the_body(body: bytes, sizes: list[int], cuts: list[int]
                                          ) -> None:
    wire = chunked(body, sizes) + b"NEXT"
    d, out, i, done = _Dechunker(), b"", 0, False
    for n in [*cuts, len(wire)]:
        data, done = d.feed(wire[i:i + n])
        out += data
        i += n
        if done:
            break
    assert done and out == body


@pytest.mark.parametrize("wire", [b"zz\r\n", b"3\r\nabcX\r\n", b"-1\r\n"])
def test_dechunker_refuses_garbage(wire: bytes) -> None:
    with pytest.raises(ValueError):
        _Dechunker().feed(wire)


class Server:
    """A loopback HTTP/1.1 server that answers each request with `reply` and counts the
    connections it accepted; `close_idle` closes a connection after each answer."""

    def __init__(self, reply: bytes, close_idle: bool = False) -> None:
        self.reply = reply
        self.close_idle = close_idle
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await r.readexactly(length))
                w.write(self.reply)
                await w.drain()
                if self.close_idle:
                    await asyncio.sleep(0.05)  # idle, then gone: a stale pooled connection
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def serve() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


async def start(serve: list[Server], reply: bytes, close_idle: bool = False) -> Server:
    s = Server(reply, close_idle)
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    serve.append(s)
    return s


async def fetch(client: Client, url: str) -> tuple[int, bytes]:
    resp = await client.request("POST", url, "/v1/chat/completions", b"{}", {})
    try:
        body = b""
        while chunk := await resp.read():
            body += chunk
        return resp.status, body
    finally:
        resp.close()


async def test_keep_alive_connection_is_reused(serve: list[Server]) -> None:
    s = await start(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client = Client()
    try:
        for _ in range(3):
            assert await fetch(client, s.url) == (200, b"ok")
    finally:
        client.close()
    assert s.connections == 1 and len(s.requests) == 3


async def test_chunked_keep_alive_body_is_decoded_and_reused(serve: list[Server]) -> None:
    body = b'{"a": 1}' * 50
    s = await start(serve, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunked(body, [7, 100, 3]))
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, body)
        assert await fetch(client, s.url) == (200, body)
    finally:
        client.close()
    assert s.connections == 1


async def test_http10_close_delimited_is_never_reused(serve: list[Server]) -> None:
    """mlx_lm.server's shape: HTTP/1.0, no length, the close ends the body."""
    s = await start(serve, b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream\r\n\r\n"
                    b"data: [DONE]\n\n", close_idle=True)
    client = Client()
    try:
        for _ in range(2):
            assert await fetch(client, s.url) == (200, b"data: [DONE]\n\n")
    finally:
        client.close()
    assert s.connections == 2


async def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(
        serve: list[Server]) -> None:
    """The server closed the idle keep-alive connection just as we reused it: nothing was
    processed, so the request goes out again on a new connection (as Go's transport does)."""
    s = await start(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close_idle=True)
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, b"ok")
        await asyncio.sleep(0.2)  # the server has closed its side by now
        assert await fetch(client, s.url) == (200, b"ok")
    finally:
        client.close()
    assert s.connections == 2 and len(s.requests) == 2


async def test_body_cut_short_is_an_error(serve: list[Server]) -> None:
    s = await start(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                    close_idle=True)
    client = Client()
    try:
        with pytest.raises(UpstreamError):
            await fetch(client, s.url)
    finally:
        client.close()


async def test_garbage_head_is_an_error(serve: list[Server]) -> None:
    s = await start(serve, b"SSH-2.0-OpenSSH\r\n\r\n", close_idle=True)
    client = Client()
    try:
        with pytest.raises(UpstreamError):
            await fetch(client, s.url)
    finally:
        client.close()
