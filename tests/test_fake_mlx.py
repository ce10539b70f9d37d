"""Tests of the fake upstream itself: it must say exactly what mlx_lm.server says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fake_mlx import SERVER_HEADER, SYSTEM_FINGERPRINT, Behavior, FakeMLX, abort

CHAT = {"model": "/srv/models/m-fast", "messages": [{"role": "user", "content": "hi"}]}
T = aiohttp.ClientTimeout(total=5)


@pytest.fixture
async def fake() -> AsyncIterator[FakeMLX]:
    async with FakeMLX() as f:
        yield f


async def raw_exchange(fake: FakeMLX, request: bytes) -> bytes:
    """Send raw bytes, read until the fake closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def post(path: str, body: dict[str, Any] | bytes) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def split_response(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
    return lines[0], headers, body  # type: ignore[return-value]


def sse_frames(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n") or body == b""
    return [f for f in body.split(b"\n\n") if f]


async def test_unary_chat_matches_mlx(fake: FakeMLX) -> None:
    raw = await raw_exchange(fake, post("/v1/chat/completions", CHAT))
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.0 200 OK"
    names = [k for k, _ in headers]
    assert names == ["Server", "Date", "Content-type", "Access-Control-Allow-Origin",
                     "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
                     "Content-Length"]
    assert dict(headers)["Server"] == SERVER_HEADER
    assert int(dict(headers)["Content-Length"]) == len(body)
    obj = json.loads(body)
    assert list(obj) == ["id", "system_fingerprint", "object", "model", "created",
                         "choices", "usage"]
    assert obj["id"].startswith("chatcmpl-")
    assert obj["object"] == "chat.completion"
    assert obj["model"] == CHAT["model"]
    assert obj["system_fingerprint"] == SYSTEM_FINGERPRINT
    assert obj["choices"][0]["finish_reason"] == "stop"
    assert obj["choices"][0]["message"]["role"] == "assistant"
    assert "\ufffd" in obj["choices"][0]["message"]["content"]
    u = obj["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] == u[
        "prompt_tokens"] + 5
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}
    assert fake.requests[0].json == CHAT
    assert fake.requests[0].headers["content-type"] == "application/json"


async def test_stream_raw_framing_keepalives_usage_done(fake: FakeMLX) -> None:
    fake.push(Behavior(events=3, keepalives=2))
    body = dict(CHAT, stream=True, stream_options={"include_usage": True})
    raw = await raw_exchange(fake, post("/v1/chat/completions", body))
    status, headers, payload = split_response(raw)
    assert status == "HTTP/1.0 200 OK"
    h = dict(headers)
    assert h["Content-type"] == "text/event-stream"
    assert h["Cache-Control"] == "no-cache"
    assert "Content-Length" not in h and "Transfer-Encoding" not in h
    frames = sse_frames(payload)
    assert frames[:2] == [b": keepalive 0/1", b": keepalive 1/1"]
    assert frames[-1] == b"data: [DONE]"
    events = [json.loads(f[len(b"data: "):]) for f in frames[2:-1]]
    assert len(events) == 3 + 1 + 1  # tokens, final, usage
    for e in events[:3]:
        assert e["object"] == "chat.completion.chunk"
        assert e["choices"][0]["finish_reason"] is None
        assert e["choices"][0]["delta"]["role"] == "assistant"
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    usage = events[4]
    assert usage["object"] == "chat.completion" and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 3
    assert {e["model"] for e in events} == {CHAT["model"]}
    # json.dumps(obj) framing, byte for byte
    assert frames[2] == b"data: " + json.dumps(events[0]).encode()


async def test_completions_stream_via_aiohttp(fake: FakeMLX) -> None:
    body = {"prompt": "x", "stream": True, "max_tokens": 2}
    async with aiohttp.ClientSession(timeout=T) as s, s.post(
            fake.url + "/v1/completions", json=body) as r:
        assert r.status == 200 and r.version == aiohttp.HttpVersion10
        data = await r.read()
    frames = sse_frames(data)
    assert frames[-1] == b"data: [DONE]"
    events = [json.loads(f[6:]) for f in frames[:-1]]
    assert [e["object"] for e in events] == ["text_completion"] * 3
    assert events[0]["id"].startswith("cmpl-")
    assert events[0]["model"] == "default_model"
    assert events[-1]["choices"][0] == {"index": 0, "finish_reason": "length", "text": ""}


async def test_die_after_closes_without_done(fake: FakeMLX) -> None:
    fake.push(Behavior(events=5, die_after=2))
    async with aiohttp.ClientSession(timeout=T) as s, s.post(
            fake.url + "/v1/chat/completions", json=dict(CHAT, stream=True)) as r:
        data = await r.read()  # close-delimited: EOF looks like a normal end
    frames = sse_frames(data)
    assert len(frames) == 2 and b"[DONE]" not in data


async def test_stall_after_keeps_socket_silent(fake: FakeMLX) -> None:
    fake.push(Behavior(events=5, stall_after=1))
    async with aiohttp.ClientSession(timeout=T) as s, s.post(
            fake.url + "/v1/chat/completions", json=dict(CHAT, stream=True)) as r:
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2)
        assert first.startswith(b"data: ")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.content.read(1), 0.3)
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2)


async def test_error_body_exact(fake: FakeMLX) -> None:
    err = b'{"error": "Cannot find an appropriate cached snapshot folder"}'
    fake.by_model("nope/nope", Behavior(kind="error", status=404, error_body=err))
    raw = await raw_exchange(fake, post("/v1/chat/completions", dict(CHAT, model="nope/nope")))
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.0 404 Not Found"
    assert body == err
    assert "Content-Length" not in dict(headers)
    assert dict(headers)["Content-type"] == "application/json"


async def test_mlx_own_errors(fake: FakeMLX) -> None:
    raw = await raw_exchange(fake, post("/v1/chat/completions", b"not json"))
    status, _, body = split_response(raw)
    assert status == "HTTP/1.0 400 Bad Request"
    assert json.loads(body) == {
        "error": "Invalid JSON in request body: Expecting value: line 1 column 1 (char 0)"}
    raw = await raw_exchange(fake, post("/v1/nope", CHAT))
    status, headers, body = split_response(raw)
    assert (status, body) == ("HTTP/1.0 404 Not Found", b"Not Found")
    assert dict(headers)["Content-type"] == "application/json"
    raw = await raw_exchange(fake, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split_response(raw)
    assert (status, body) == ("HTTP/1.0 200 OK", b'{"status": "ok"}')


async def test_push_fifo_then_default(fake: FakeMLX) -> None:
    fake.push(Behavior(kind="error", status=500), Behavior(kind="error", status=503))
    async with aiohttp.ClientSession(timeout=T) as s:
        got = []
        for _ in range(3):
            async with s.post(fake.url + "/v1/chat/completions", json=CHAT) as r:
                got.append(r.status)
    assert got == [500, 503, 200]


async def test_drop_and_reset(fake: FakeMLX) -> None:
    fake.push(Behavior(kind="drop"), Behavior(kind="reset"))
    async with aiohttp.ClientSession(timeout=T) as s:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with s.post(fake.url + "/v1/chat/completions", json=CHAT):
                pass
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.post(fake.url + "/v1/chat/completions", json=CHAT):
                pass
    assert len(fake.requests) == 2


async def test_hang_peer_close_observed(fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(fake.url + "/v1/chat/completions", json=CHAT):
                pass
    t = loop.time()
    rec = fake.requests[0]
    await asyncio.wait_for(rec.closed_by_peer.wait(), 2)
    assert rec.closed_at is not None and abs(rec.closed_at - t) < 1.0
    for _ in range(100):
        if fake.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert fake.open_connections == 0


async def test_slow_stream_peer_close_observed(fake: FakeMLX) -> None:
    fake.push(Behavior(events=50, delay=0.05))
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.post(fake.url + "/v1/chat/completions", json=dict(CHAT, stream=True))
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2)
        r.close()  # abort mid-stream
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2)


async def test_finished_request_not_marked_closed(fake: FakeMLX) -> None:
    async with aiohttp.ClientSession(timeout=T) as s, s.post(
            fake.url + "/v1/chat/completions", json=CHAT) as r:
        await r.read()
    await asyncio.sleep(0.05)
    assert not fake.requests[0].closed_by_peer.is_set()


async def test_header_delay_and_wait_requests(fake: FakeMLX) -> None:
    fake.push(Behavior(header_delay=0.2))
    async with aiohttp.ClientSession(timeout=T) as s:
        task = asyncio.ensure_future(s.post(fake.url + "/v1/chat/completions", json=CHAT))
        await fake.wait_requests(1, timeout=2)
        assert not task.done()
        r = await asyncio.wait_for(task, 2)
        assert r.status == 200
        r.release()
    with pytest.raises(asyncio.TimeoutError):
        await fake.wait_requests(2, timeout=0.05)


async def test_http11_mode_keepalive_and_chunked() -> None:
    async with FakeMLX(http11=True) as fake, aiohttp.ClientSession(timeout=T) as s:
        async with s.post(fake.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.version == aiohttp.HttpVersion11
            assert r.headers["Content-Length"]
            await r.read()
        async with s.post(fake.url + "/v1/chat/completions",
                          json=dict(CHAT, stream=True)) as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            frames = sse_frames(await r.read())
        assert frames[-1] == b"data: [DONE]"
        assert fake.open_connections == 1  # reused


async def test_by_model_echo_and_raw(fake: FakeMLX) -> None:
    fake.by_model("m", Behavior(model_echo="/srv/models/m", events=1))
    fake.push(Behavior(kind="raw", raw=b"HTTP/1.0 200 OK\r\n\r\ngarbage"))
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(fake.url + "/v1/chat/completions", json=dict(CHAT, model="m")) as r:
            assert (await r.json())["model"] == "/srv/models/m"
        async with s.post(fake.url + "/v1/chat/completions", json=CHAT) as r:
            assert await r.read() == b"garbage"


async def test_abort_after_a_close_that_flushed_and_dropped_the_connection() -> None:
    """The teardown's abort of a connection the handler closed with bytes still buffered,
    which the peer then read to the end: on Python 3.11 a bare transport.abort() there is an
    AttributeError inside asyncio (seen once in test_slow_client_that_reads_again...)."""
    closed: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * (8 * 1024 * 1024))  # more than the kernel takes at once
        writer.close()  # with bytes buffered: the transport drops itself once they are sent
        closed.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1",
                                                   server.sockets[0].getsockname()[1])
    got = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
        got += len(chunk)
    assert got == 8 * 1024 * 1024
    await asyncio.sleep(0.05)  # the server side's connection_lost has run
    abort(closed[0].transport)  # no AttributeError
    writer.close()
    server.close()
