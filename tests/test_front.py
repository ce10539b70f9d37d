"""The front server (maclustr/front.py): the plain POST requests it serves itself, and every
other shape handed to aiohttp with the bytes read so far, on the same connection."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import KEY, FakeMLX, Gateway
from fake_mlx import Behavior
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr import front

PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
BODY = json.dumps({"model": "maclustr-fast",
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps({"model": "maclustr-fast", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]}).encode()


def post(body: bytes = BODY, extra: str = "", version: str = "HTTP/1.1",
         path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} {version}\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def head(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode()


PLAIN = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Length: 2"]


@pytest.mark.parametrize("lines", [
    PLAIN,
    ["POST /v1/completions?beta=true HTTP/1.0", "content-length: 0"],
    [*PLAIN, "X-Odd: a:b:c", "Authorization: Bearer k"],
])
def test_plain_posts_are_the_fronts(lines: list[str]) -> None:
    got = front.parse_head(head(lines), PATHS)
    assert got is not None and got.path.startswith("/v1/")


@pytest.mark.parametrize("lines", [
    ["GET /v1/chat/completions HTTP/1.1", "Host: x"],  # another method
    ["POST /v1/models HTTP/1.1", "Content-Length: 2"],  # another path
    ["POST /v1/chat/%63ompletions HTTP/1.1", "Content-Length: 2"],  # aiohttp decodes it
    ["POST http://x/v1/chat/completions HTTP/1.1", "Content-Length: 2"],  # absolute form
    ["POST /v1/chat/completions HTTP/2.0", "Content-Length: 2"],
    ["POST /v1/chat/completions  HTTP/1.1", "Content-Length: 2"],
    ["POST /v1/chat/completions HTTP/1.1", "Host: x"],  # no Content-Length
    [*PLAIN, "Content-Length: 2"],  # repeated: a smuggling vector
    [*PLAIN[:2], "Content-Length: +2"],
    [*PLAIN[:2], "Transfer-Encoding: chunked"],
    [*PLAIN, "Transfer-Encoding: chunked"],
    [*PLAIN, "Expect: 100-continue"],
    [*PLAIN, "Upgrade: websocket"],
    [*PLAIN, "Bad Name: x"],
    [*PLAIN, " folded: x"],
    [*PLAIN, "X-Bare: a\nb"],
    [*PLAIN, "X-Cr: a\rb"],
    [*PLAIN, "X-Nul: a\x00b"],
    [*PLAIN, "no colon"],
])
def test_every_other_shape_goes_to_aiohttp(lines: list[str]) -> None:
    assert front.parse_head(head(lines), PATHS) is None


def reference_parse(head: bytes) -> tuple[str, str, dict[str, str], int] | None:
    """The obvious byte-by-byte statement of what the front serves (parse_head is the fast
    one): path, version, headers (first value wins), Content-Length; None for aiohttp."""
    if any(c in head.replace(b"\r\n", b"") for c in (b"\r", b"\n", b"\x00")):
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    path = parts[1].split(b"?", 1)[0].decode("latin-1")
    if path not in PATHS:
        return None
    headers: dict[str, str] = {}
    length = -1
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, front._TOKEN):
            return None
        key = name.lower().decode("ascii")
        value = value.strip(b" \t")
        if key == "content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif key in ("transfer-encoding", "expect", "upgrade"):
            return None
        else:
            headers.setdefault(key, value.decode("latin-1"))
    return None if length < 0 else (path, parts[2].decode(), headers, length)


_NAMES = [b"Host", b"content-length", b"Content-Length", b"X-A", b"Transfer-Encoding",
          b"expect", b"Connection", b"Bad Name", b"", b" X", b"X\xe9"]
_VALUES = [b"", b" ", b"\t2 ", b"2", b"12", b"+3", b"\xb2", b"\xe9", b"a\rb", b"a\nb", b"\x00",
           b"close", b"chunked", b"a:b"]
_lines = st.one_of(
    st.tuples(st.sampled_from(_NAMES), st.sampled_from([b":", b": ", b" :", b""]),
              st.sampled_from(_VALUES)).map(b"".join),
    st.lists(st.sampled_from(_NAMES + _VALUES), max_size=4).map(b"".join))


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from([b"POST /v1/chat/completions HTTP/1.1",
                              b"POST /v1/completions?x=1 HTTP/1.0",
                              b"POST /v1/models HTTP/1.1", b"GET /v1/completions HTTP/1.1"]),
       lines=st.lists(_lines, max_size=6),
       length=st.sampled_from([[b"Content-Length: 2"], []]))
def test_parse_head_equals_the_reference(start: bytes, lines: list[bytes],
                                         length: list[bytes]) -> None:
    head = b"\r\n".join([start, *length, *lines])
    got = front.parse_head(head, PATHS)
    want = reference_parse(head)
    assert (None if got is None else (got.path, got.version, got.headers, got.length)) == want


async def exchange(gw: Gateway, data: bytes | list[bytes], pause: float = 0.0,
                   timeout: float = 10.0) -> bytes:
    """Write `data` (pieces `pause` apart) on one connection; everything read until the
    gateway closes it."""
    url = urlsplit(gw.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def statuses(raw: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.[01] (\d{3}) [A-Z]", raw)


@pytest.fixture
def handovers(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The first bytes of every connection the front handed to aiohttp."""
    seen: list[bytes] = []
    original = front.FrontProtocol._hand_over

    def spy(self: front.FrontProtocol) -> None:
        seen.append(bytes(self._buf[:80]))
        original(self)

    monkeypatch.setattr(front.FrontProtocol, "_hand_over", spy)
    return seen


async def test_pipelined_posts_answered_in_order_by_the_front(
        gateway: Gateway, fake: FakeMLX, handovers: list[bytes]) -> None:
    raw = await exchange(gateway, post(extra="X-Request-Id: first\r\n")
                         + post(STREAM, "X-Request-Id: second\r\n")
                         + post(extra="X-Request-Id: third\r\nConnection: close\r\n"))
    assert statuses(raw) == [b"200", b"200", b"200"]
    assert raw.index(b"X-Request-Id: first") < raw.index(b"X-Request-Id: second") \
        < raw.index(b"X-Request-Id: third")
    assert raw.count(b"data: [DONE]") == 1 and b"0\r\n\r\n" in raw  # the stream, chunked
    assert b"maclustr-fast" in raw and len(fake.requests) == 3
    assert handovers == []


async def test_keep_alive_after_another_endpoint_is_aiohttps(
        gateway: Gateway, handovers: list[bytes]) -> None:
    """A GET first: aiohttp serves it and the POST after it on the same connection."""
    raw = await exchange(gateway, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: "
                         + f"Bearer {KEY}".encode() + b"\r\n\r\n"
                         + post(extra="Connection: close\r\n"))
    assert statuses(raw) == [b"200", b"200"]
    assert raw.count(b"Server: maclustr") == 2
    assert len(handovers) == 1 and handovers[0].startswith(b"GET /v1/models")


async def test_chunked_and_expect_bodies_are_served_by_aiohttp(
        gateway: Gateway, handovers: list[bytes]) -> None:
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
               + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
    raw = await exchange(gateway, chunked)
    assert statuses(raw) == [b"200"] and b"maclustr-fast" in raw
    expect = post(extra="Expect: 100-continue\r\nConnection: close\r\n")
    cut = expect.index(b"\r\n\r\n") + 4
    raw = await exchange(gateway, [expect[:cut], expect[cut:]], pause=0.05)
    assert statuses(raw) == [b"100", b"200"]
    assert len(handovers) == 2


async def test_http10_stream_is_close_delimited(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=3))
    raw = await exchange(gateway, post(STREAM, version="HTTP/1.0"))
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in head_
    assert b"Transfer-Encoding" not in head_
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")


async def test_http11_stream_closing_after_is_still_chunked(gateway: Gateway,
                                                            fake: FakeMLX) -> None:
    """`Connection: close` on HTTP/1.1: the stream keeps its chunked terminator (how a client
    tells a complete stream from a cut one), then the connection closes."""
    fake.push(Behavior(events=3))
    raw = await exchange(gateway, post(STREAM, "Connection: close\r\n"))
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head_
    assert b"Transfer-Encoding: chunked" in head_
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_body_in_pieces_then_the_next_client(gateway: Gateway, fake: FakeMLX) -> None:
    """A head and body trickling in are put together; a client that leaves halfway costs
    nothing upstream, and the gateway serves the next one."""
    whole = post(extra="Connection: close\r\n")
    raw = await exchange(gateway, [whole[:20], whole[20:-10], whole[-10:]], pause=0.05)
    assert statuses(raw) == [b"200"]
    url = urlsplit(gateway.url)
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(whole[:-5])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.1)
    assert len(fake.requests) == 1
    raw = await exchange(gateway, whole)
    assert statuses(raw) == [b"200"] and len(fake.requests) == 2


async def test_over_limit_body_is_refused_before_it_is_read(
        make_gateway: Any, fake: FakeMLX, handovers: list[bytes]) -> None:
    from conftest import routes_yaml

    gw = await make_gateway(routes_yaml({"maclustr-fast": fake.url},
                                        extra="gateway:\n  max_body_bytes: 1000\n"))
    raw = await exchange(gw, post(b" " * 5000, "Connection: close\r\n"))
    assert statuses(raw) == [b"413"] and b"request_too_large" in raw
    assert len(handovers) == 1 and fake.requests == []


async def test_idle_and_stalled_connections_are_closed(
        make_gateway: Any, fake: FakeMLX, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between requests, and a head that stops arriving: closed after the keep-alive time
    (75 s in production; shortened here). A request in progress is never cut."""
    from conftest import routes_yaml

    monkeypatch.setattr(front, "KEEPALIVE_SECONDS", 0.3)
    monkeypatch.setattr(front, "SWEEP_SECONDS", 0.1)
    gw = await make_gateway(routes_yaml({"maclustr-fast": fake.url}))
    url = urlsplit(gw.url)
    streams = []
    for data in (post(), post()[:30], post(STREAM)):
        if data.endswith(STREAM):
            fake.push(Behavior(events=3, delay=0.8))  # slower than the keep-alive time
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(data)
        streams.append((reader, writer))
        await asyncio.sleep(0.05)
    try:
        for reader, _ in streams:
            got = await asyncio.wait_for(reader.read(), 5)  # the gateway closes each
            assert got == b"" or statuses(got) == [b"200"], got[:200]
        assert statuses(got) == [b"200"] and got.endswith(b"0\r\n\r\n")
    finally:
        for _, writer in streams:
            writer.close()
