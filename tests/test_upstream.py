"""The upstream HTTP client: body framings, keep-alive reuse, and the one safe retry."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from conftest import FakeMLX, routes_yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr import upstream
from maclustr.harness import free_port
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


async def read_request(r: asyncio.StreamReader) -> bytes:
    """One request, head and Content-Length body, as the test servers receive it."""
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


class Server:
    """A loopback HTTP/1.1 server that answers each request with `reply` and counts the
    connections it accepted; `close_idle` closes a connection after each answer."""

    def __init__(self, reply: bytes, close_idle: bool = False) -> None:
        self.reply = reply
        self.close_idle = close_idle
        self.connections = 0
        self.closed = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        with self.hung_up(w):
            while True:
                self.requests.append(await read_request(r))
                w.write(self.reply)
                await w.drain()
                if self.close_idle:
                    await asyncio.sleep(0.05)  # idle, then gone: a stale pooled connection
                    break

    @contextlib.contextmanager
    def hung_up(self, w: asyncio.StreamWriter) -> Iterator[None]:
        """A peer hanging up ends the connection quietly; every end is counted and closed."""
        try:
            yield
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            w.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def key(self) -> tuple[str, int, bool]:
        return ("127.0.0.1", self.port, False)

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
    """One whole exchange, bounded (a client state bug shows as a failure, not a hang)."""
    async def exchange() -> tuple[int, bytes]:
        resp = await client.request("POST", url, "/v1/chat/completions", b"{}", {})
        try:
            body = b""
            while chunk := await resp.read():
                body += chunk
            return resp.status, body
        finally:
            resp.close()

    return await asyncio.wait_for(exchange(), 5)


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
    """mlx_lm.server's shape: HTTP/1.0, no length, the close ends the body. Each connection
    carries one request; the spare opened after the first carries the second."""
    s = await start(serve, b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream\r\n\r\n"
                    b"data: [DONE]\n\n", close_idle=True)
    client = Client()
    try:
        for _ in range(2):
            assert await fetch(client, s.url) == (200, b"data: [DONE]\n\n")
    finally:
        client.close()
    assert len(s.requests) == 2 and s.connections >= 2


class OneThreadServer:
    """Python's single-threaded http.server.HTTPServer answering HTTP/1.0 (older
    mlx_lm.server releases ran on it): one connection at a time, in accept order, blocked
    reading each until its request comes. Records when each connection was accepted and
    when its request was read."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.events: list[tuple[str, float]] = []
        events = self.events

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self) -> None:
                events.append(("accepted", time.monotonic()))
                super().setup()

            def do_POST(self) -> None:  # http.server's name for it
                self.rfile.read(int(self.headers["Content-Length"]))
                events.append(("request", time.monotonic()))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def one_thread() -> Iterator[OneThreadServer]:
    s = OneThreadServer()
    yield s
    s.stop()


async def test_http10_server_gets_a_spare_connection_before_the_next_request(
        one_thread: OneThreadServer) -> None:
    """The connect is off the next request's path: its connection was open (accepted by the
    server, even) before the request was sent."""
    client = Client()
    try:
        assert await fetch(client, one_thread.url) == (200, b"ok")
        for _ in range(50):  # bounded: the spare's connect is a loop turn or two
            if [e for e, _ in one_thread.events].count("accepted") == 2:
                break
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        assert await fetch(client, one_thread.url) == (200, b"ok")
    finally:
        client.close()
    accepted = [t for e, t in one_thread.events if e == "accepted"]
    assert len(accepted) >= 2 and accepted[1] < sent
    assert [e for e, _ in one_thread.events][:4] == ["accepted", "request", "accepted",
                                                      "request"]


async def test_spares_are_used_oldest_first_so_a_one_thread_server_never_waits_on_one(
        one_thread: OneThreadServer) -> None:
    """After a burst, four spares wait; the server has accepted the oldest and reads it.
    A request sent on the newest instead would wait forever behind it."""
    client = Client()
    try:
        got = await asyncio.gather(*(fetch(client, one_thread.url) for _ in range(4)))
        assert got == [(200, b"ok")] * 4
        for _ in range(6):
            await asyncio.sleep(0.05)  # the spares are open and the oldest accepted
            assert await fetch(client, one_thread.url) == (200, b"ok")
    finally:
        client.close()


async def test_idle_spares_are_closed_after_the_idle_limit(
        serve: list[Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection outlives its use: a spare nobody takes is closed by the pool's sweep
    (a server taken out of routes.yaml keeps no thread per spare)."""
    monkeypatch.setattr(upstream, "IDLE_POOL_SECONDS", 0.2)
    s = await start(serve, b"HTTP/1.0 200 OK\r\n\r\nok", close_idle=True)
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, b"ok")
        for _ in range(100):  # bounded: the sweep runs 0.2 s after the spare opened
            await asyncio.sleep(0.02)
            if s.closed == 2:
                break
        # this server closes a connection only after answering a request on it: the second
        # close is the client's, of the spare, which carried nothing
        assert (s.connections, s.closed, len(s.requests)) == (2, 2, 1)
        assert not client._spares.get(s.key)
    finally:
        client.close()


async def test_a_server_the_table_no_longer_names_keeps_no_spares(serve: list[Server]) -> None:
    """After a reload moves a model away, the old server's spare is closed and no request
    still in flight to it opens another: the old server drains."""
    s = await start(serve, b"HTTP/1.0 200 OK\r\n\r\nok", close_idle=True)
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, b"ok")
        for _ in range(100):  # bounded: the spare is one connect away
            if client._spares.get(s.key):
                break
            await asyncio.sleep(0.01)
        assert s.connections == 2
        client.keep_only(["http://127.0.0.1:1"])  # the table now names another server
        assert await fetch(client, s.url) == (200, b"ok")  # in flight across the reload
        for _ in range(100):  # bounded: the closes reach the server
            if s.closed == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert (s.connections, s.closed, len(s.requests)) == (3, 3, 2)
        assert not client._spares.get(s.key) and not client._opening.get(s.key)
    finally:
        client.close()


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


# --- every DNS address, happy-eyeballs order (RFC 8305) ------------------------------------


V4, V6 = socket.AF_INET, socket.AF_INET6


def test_interleave_alternates_families_from_the_first_answer_and_drops_duplicates() -> None:
    a6, b6 = (V6, ("fe80::1", 80, 0, 4)), (V6, ("2001:db8::1", 80, 0, 0))
    c6 = (V6, ("::1", 80, 0, 0))
    a4, b4 = (V4, ("10.0.0.1", 80)), (V4, ("10.0.0.2", 80))
    assert upstream.interleave([a6, b6, c6, a4, b4, a6]) == [a6, a4, b6, b4, c6]
    assert upstream.interleave([a4, a6, b4, b6]) == [a4, a6, b4, b6]
    assert upstream.interleave([a4, b4]) == [a4, b4]
    assert upstream.interleave([a6, a4])[0][1] == ("fe80::1", 80, 0, 4)  # scope id kept


@pytest.fixture
def silent_port() -> Iterator[tuple[str, int]]:
    """An address whose connect hangs without an answer (as a dead host's would): a listener
    on 127.0.0.2 with a full accept queue, so further SYNs are dropped."""
    srv = socket.socket()
    srv.bind(("127.0.0.2", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname(), timeout=1)
    try:
        yield srv.getsockname()
    finally:
        filler.close()
        srv.close()


async def test_name_with_dead_addresses_first_reaches_the_live_one(
        make_gateway: Any, fake: FakeMLX, silent_port: tuple[str, int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """studio-1.local resolves to a refusing IPv6 address, a silent IPv4 address and the live
    one: the request is served (one attempt delay late), not a 502 after the first."""
    closed = socket.socket(socket.AF_INET6)
    closed.bind(("::1", 0))
    dead6 = closed.getsockname()
    closed.close()  # nothing listens there now: refused
    answers = [(V6, socket.SOCK_STREAM, 6, "", dead6),
               (V4, socket.SOCK_STREAM, 6, "", silent_port),
               (V4, socket.SOCK_STREAM, 6, "", ("127.0.0.1", fake.port))]
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        asked.append(host)
        return answers if host == "studio-1.local" else []

    monkeypatch.setattr(upstream, "getaddrinfo", resolve)
    gw = await make_gateway(routes_yaml({"maclustr-coder": f"http://studio-1.local:{fake.port}"}))
    body = {"model": "maclustr-coder", "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.monotonic()
    ans = await gw.client.post("/v1/chat/completions", body, timeout=10)
    elapsed = time.monotonic() - t0
    assert ans.status == 200, ans.body[:300]
    assert upstream.ATTEMPT_DELAY <= elapsed < 3, elapsed  # the silent one cost one delay
    streamed = await gw.client.post("/v1/chat/completions", {**body, "stream": True})
    assert streamed.status == 200 and streamed.data()[-1] == "[DONE]"
    assert asked == ["studio-1.local"]  # cached
    assert len([r for r in fake.requests if r.method == "POST"]) == 2


async def test_every_address_dead_is_a_502_in_bounded_time(
        make_gateway: Any, silent_port: tuple[str, int], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    async def resolve(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(V4, socket.SOCK_STREAM, 6, "", silent_port),
                (V4, socket.SOCK_STREAM, 6, "", ("127.0.0.1", free_port()))]

    monkeypatch.setattr(upstream, "getaddrinfo", resolve)
    gw = await make_gateway(routes_yaml({"maclustr-coder": "http://studio-1.local:1234"},
                                        extra="timeouts: {connect: 1}"))
    t0 = time.monotonic()
    ans = await gw.client.post("/v1/chat/completions", {"model": "maclustr-coder"}, timeout=10)
    assert ans.status == 502 and ans.json()["error"]["code"] == "upstream_unavailable"
    assert time.monotonic() - t0 < 3


async def test_ipv6_scope_id_reaches_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fe80::…%en0` is reachable only with its scope id: the sockaddr from the resolver is
    what the connect uses, whole."""
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    scoped = ("::1", port, 0, socket.if_nametoindex("lo"))

    async def resolve(host: str, p: int) -> list[tuple[Any, ...]]:
        return [(V6, socket.SOCK_STREAM, 6, "", scoped)]

    monkeypatch.setattr(upstream, "getaddrinfo", resolve)
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    real = loop.sock_connect

    async def spy(sock: socket.socket, address: Any) -> None:
        seen.append(address)
        await real(sock, address)

    monkeypatch.setattr(loop, "sock_connect", spy)
    client = Client()
    try:
        resp = await client.request("GET", f"http://studio-1.local:{port}", "/", b"", {})
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.close()
    finally:
        client.close()
        server.close()
        await server.wait_closed()
    assert [tuple(a) for a in seen] == [scoped]


# --- pump: body bytes handed to a sink inside the socket callback (the stream relay) --------

class Trickle(Server):
    """Answers with `head`, then each of `parts` in its own write, `gap` apart."""

    def __init__(self, head: bytes, parts: list[bytes], close: bool) -> None:
        super().__init__(b"", close_idle=False)
        self.head, self.parts, self.close = head, parts, close

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                self.requests.append(await read_request(r))
                w.write(self.head)
                for part in self.parts:
                    await w.drain()
                    await asyncio.sleep(0.005)
                    w.write(part)
                await w.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def pumped(client: Client, url: str, halt_after: int = 0) -> tuple[list[bytes], bool]:
    """The sink's reads of one response, and whether the connection went back to the pool."""
    resp = await asyncio.wait_for(
        client.request("POST", url, "/v1/chat/completions", b"{}", {}), 5)
    got: list[bytes] = []

    def sink(data: bytes) -> None:
        got.append(data)
        if halt_after and len(got) >= halt_after:
            resp.halt()

    try:
        resp.pump(sink)
        if resp.content_length is None and "chunked" not in resp.headers.get(
                "transfer-encoding", ""):  # close-delimited: no framing between socket and sink
            assert resp._conn._on_data is sink
        await asyncio.wait_for(resp.wait(), 5)
    finally:
        resp.close()
    idle = sum(len(v) for v in client._idle.values())
    return got, idle > 0


EVENTS_WIRE = [b"data: {\"n\": %d}\n\n" % i for i in range(5)] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("framing", ["close", "length", "chunked"])
async def test_pump_hands_every_body_byte_to_the_sink(serve: list[Server], framing: str) -> None:
    """mlx's close-delimited stream (the sink is called straight from data_received), a
    Content-Length and a chunked body: the sink sees the body, nothing of the head, and a
    kept-alive connection is reused for a plain read afterwards."""
    body = b"".join(EVENTS_WIRE)
    if framing == "close":
        head, parts = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n", EVENTS_WIRE
    elif framing == "length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        parts = EVENTS_WIRE
    else:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        parts = [b"%x\r\n%b\r\n" % (len(p), p) for p in EVENTS_WIRE] + [b"0\r\n\r\n"]
    s = Trickle(head, parts, close=framing == "close")
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    serve.append(s)
    client = Client()
    try:
        got, pooled = await pumped(client, s.url)
        assert b"".join(got) == body
        assert len(got) > 1  # the reads came one by one, through the pump
        assert pooled == (framing != "close")
        if framing != "close":  # the reused connection reads a new head, not body bytes
            resp = await asyncio.wait_for(
                client.request("POST", s.url, "/v1/chat/completions", b"{}", {}), 5)
            try:
                assert resp.status == 200
                data = b""
                while chunk := await resp.read():
                    data += chunk
                assert data == body
            finally:
                resp.close()
            assert s.connections == 1
    finally:
        client.close()


async def test_pump_halt_wakes_the_waiter_and_the_rest_is_dropped(serve: list[Server]) -> None:
    s = Trickle(b"HTTP/1.0 200 OK\r\n\r\n", EVENTS_WIRE, close=True)
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    serve.append(s)
    client = Client()
    try:
        got, pooled = await pumped(client, s.url, halt_after=2)
        assert 2 <= len(got) < len(EVENTS_WIRE) and not pooled
    finally:
        client.close()


async def test_pump_of_a_body_already_read_with_the_head(serve: list[Server]) -> None:
    """Head and the first events in one read: what arrived before pump() is handed over
    first, then the rest as it comes."""
    s = Trickle(b"HTTP/1.0 200 OK\r\n\r\n" + b"".join(EVENTS_WIRE[:3]), EVENTS_WIRE[3:],
                close=True)
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    serve.append(s)
    client = Client()
    try:
        resp = await client.request("POST", s.url, "/v1/chat/completions", b"{}", {})
        await asyncio.sleep(0.002)
        got: list[bytes] = []
        try:
            resp.pump(got.append)
            await asyncio.wait_for(resp.wait(), 5)
        finally:
            resp.close()
        assert b"".join(got) == b"".join(EVENTS_WIRE)
    finally:
        client.close()


async def test_upstream_connections_probe_a_silent_peer(serve: list[Server]) -> None:
    """A node that dies without a FIN is found by TCP keepalive in seconds, on a spare or on a
    connection waiting for its answer: every upstream socket, fresh or spare, has the probes
    on (loopback cannot drop a peer silently, so the settings are what is checked)."""
    s = await start(serve, b"HTTP/1.0 200 OK\r\n\r\nok")  # holds the connection open
    client = Client()
    try:
        resp = await client.request("POST", s.url, "/", b"", {})
        fresh = resp._conn
        for _ in range(100):  # bounded: the spare is one connect away
            if client._spares.get(s.key):
                break
            await asyncio.sleep(0.01)
        spare = client._spares[s.key][0]
        for conn in (fresh, spare):
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            got = tuple(sock.getsockopt(socket.IPPROTO_TCP, opt)
                        for opt in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL,
                                    socket.TCP_KEEPCNT))
            assert got == upstream.KEEPALIVE == (5, 2, 3)
        resp.close()
    finally:
        client.close()


# --- races and framing edges (issue 25 item 5) ----------------------------------------------


class Scripted(Server):
    """Answers request n on connection c with `replies[c]` (the last entry for the rest);
    a connection whose reply is None is closed at once, unread (a server dropping it)."""

    def __init__(self, replies: list[bytes | None], after: bytes = b"") -> None:
        super().__init__(b"")
        self.replies = replies
        self.after = after  # written 50 ms after each answer, while the client idles
        self.wrote_after = asyncio.Event()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reply = self.replies[min(self.connections, len(self.replies) - 1)]
        self.connections += 1
        with self.hung_up(w):
            while reply is not None:
                self.requests.append(await read_request(r))
                w.write(reply)
                await w.drain()
                if self.after:
                    await asyncio.sleep(0.05)
                    w.write(self.after)
                    await w.drain()
                    self.wrote_after.set()
                if reply.startswith(b"HTTP/1.0"):
                    break


async def scripted(serve: list[Server], replies: list[bytes | None], after: bytes = b""
                   ) -> Scripted:
    s = Scripted(replies, after)
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    serve.append(s)
    return s


def spy_on_spares(client: Client, monkeypatch: pytest.MonkeyPatch,
                  then: Callable[[Any], Awaitable[None]]) -> list[Any]:
    """Every connection `client` opens; after the connect of a spare a request is waiting
    for (a claim), `then(conn)` runs before the spare is handed over."""
    opened: list[Any] = []
    real = client._connect

    async def connect(t: Any) -> Any:
        conn = await real(t)
        opened.append(conn)
        if len(opened) == 2:  # the spare the first response opened
            for _ in range(200):  # bounded: the second request claims it within a turn
                if client._claims.get(t.key):
                    break
                await asyncio.sleep(0)
            await then(conn)
        return conn

    monkeypatch.setattr(client, "_connect", connect)
    return opened


async def test_a_spare_handed_to_a_request_cancelled_in_that_turn_is_kept(
        one_thread: OneThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client of the request waiting for a spare leaves in the very turn the spare is
    handed to it: the spare must not fall out of every pool still open, or a one-thread
    HTTP/1.0 server, which accepted it and now waits for its request, blocks the next one."""
    client = Client()
    victim: list[asyncio.Future[Any]] = []

    async def leave(conn: Any) -> None:  # runs just before the spare is handed over
        asyncio.get_running_loop().call_soon(victim[0].cancel)

    opened = spy_on_spares(client, monkeypatch, leave)
    try:
        resp = await client.request("POST", one_thread.url, "/", b"{}", {})
        victim.append(asyncio.ensure_future(
            client.request("POST", one_thread.url, "/", b"{}", {})))
        assert await asyncio.wait_for(resp.read(), 5) == b"ok"
        resp.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(victim[0], 5)
        assert len(opened) == 2
        assert await fetch(client, one_thread.url) == (200, b"ok")
    finally:
        for conn in opened:
            conn.abort()  # without the fix the lost spare holds the server's only thread
        client.close()


def test_a_spare_the_server_closed_before_the_write_is_replaced_on_any_loop() -> None:
    """The server drops the spare between its handover and the request's write: nothing was
    sent, so the request goes out on a fresh connection (as Go retries a request it wrote
    nothing of), not a RuntimeError from uvloop's closed handle (a 500) nor a write into a
    closed socket that waits for an answer forever (the standard loop)."""
    import uvloop

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with pytest.MonkeyPatch.context() as mp, asyncio.Runner(loop_factory=factory) as r:
            r.run(_spare_dropped_before_the_write(mp))


async def _spare_dropped_before_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = b"HTTP/1.0 200 OK\r\n\r\nok"
    s = Scripted([ok, None, ok])  # the second connection (the spare) is dropped unread
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    client = Client()

    async def dropped(conn: Any) -> None:
        for _ in range(200):  # bounded: the server's close reaches the client
            if conn._lost:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the server did not drop the spare")

    opened = spy_on_spares(client, monkeypatch, dropped)
    try:
        resp = await client.request("POST", s.url, "/", b"{}", {})
        second = asyncio.ensure_future(fetch(client, s.url))
        assert await asyncio.wait_for(resp.read(), 5) == b"ok"
        resp.close()
        assert await second == (200, b"ok")
        assert len(s.requests) == 2 and len(opened) >= 3  # the third: the fresh one
    finally:
        client.close()
        s.server.close()
        await s.server.wait_closed()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA",
], ids=["length", "chunked"])
async def test_bytes_after_the_end_of_a_response_close_the_connection(
        serve: list[Server], reply: bytes) -> None:
    """What follows a complete response on the same read is no answer to anything: the
    connection is closed, not pooled (Go's transport does the same)."""
    s = await scripted(serve, [reply])
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, b"ok")
        assert not client._idle.get(s.key)
        assert await fetch(client, s.url) == (200, b"ok")
    finally:
        client.close()
    assert s.connections == 2


async def test_bytes_on_an_idle_pooled_connection_close_it(serve: list[Server]) -> None:
    """A response arriving on an idle keep-alive connection (no request is out) would be
    taken for the answer to the next request sent on it: the connection is closed instead."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    s = await scripted(serve, [ok], after=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
    client = Client()
    try:
        assert await fetch(client, s.url) == (200, b"ok")
        await asyncio.wait_for(s.wrote_after.wait(), 5)
        for _ in range(100):  # bounded: the stale bytes reach the client (and close it)
            if not client._idle.get(s.key):
                break
            await asyncio.sleep(0.02)
        assert await fetch(client, s.url) == (200, b"ok")
    finally:
        client.close()
    assert s.connections == 2


async def test_a_connection_back_from_a_server_a_reload_removed_is_closed(
        serve: list[Server]) -> None:
    """A request in flight across a reload that removed its server finishes, and its
    keep-alive connection is closed, not pooled for a server nothing routes to."""
    s = await start(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client = Client()
    try:
        resp = await client.request("POST", s.url, "/", b"{}", {})
        client.keep_only(["http://127.0.0.1:1"])
        assert await resp.read() == b"ok"
        resp.close()
        assert not client._idle.get(s.key)
        for _ in range(100):  # bounded: the close reaches the server
            if s.closed:
                break
            await asyncio.sleep(0.01)
        assert s.closed == 1
    finally:
        client.close()


HEAD = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nContent-Length: 2\r\n",  # RFC 9110 §8.6: an invalid length
    b"Content-Length: 2, 3\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",  # chunked applied twice
], ids=["lengths-differ", "length-list-differs", "chunked-twice"])
async def test_framing_headers_that_disagree_are_a_bad_response(
        serve: list[Server], headers: bytes) -> None:
    body = b"2\r\nok\r\n0\r\n\r\n" if b"chunked" in headers else b"ok"
    s = await start(serve, HEAD + headers + b"\r\n" + body)
    client = Client()
    try:
        with pytest.raises(UpstreamError, match="malformed response head"):
            await fetch(client, s.url)
    finally:
        client.close()


async def test_repeated_headers_are_joined_or_the_first_kept(serve: list[Server]) -> None:
    """Equal lengths (repeated or as a list) are one length; Content-Type keeps the first
    (a single-valued field, as Go's Header.Get reads it); list fields are joined, so a
    `Connection: close` before a `keep-alive` still closes."""
    s = await start(serve, HEAD + b"Content-Length: 2, 2\r\nContent-Length: 2\r\n"
                    b"Content-Type: application/json\r\nContent-Type: text/event-stream\r\n"
                    b"X-Seen: a\r\nX-Seen: b\r\n"
                    b"Connection: close\r\nConnection: keep-alive\r\n\r\nok")
    client = Client()
    try:
        resp = await asyncio.wait_for(client.request("POST", s.url, "/", b"{}", {}), 5)
        assert (resp.content_length, resp.content_type) == (2, "application/json")
        assert resp.headers["x-seen"] == "a, b"
        assert await resp.read() == b"ok"
        resp.close()
        assert not client._idle.get(s.key)  # the server said close
    finally:
        client.close()
