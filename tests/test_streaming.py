"""Streaming relay: every event reaches the client the moment it leaves the upstream, with the
public alias in every chunk, comments intact, `[DONE]` last, and the SSE headers proxies and
browsers need — over mlx's HTTP/1.0 close-delimited bodies and over HTTP/1.1 keep-alive."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from conftest import AUTH, KEY, Answer, Gateway, routes_yaml
from fake_mlx import SYSTEM_FINGERPRINT, Behavior, FakeMLX

CODER_ID = "/Users/admin/models/internal-maclustr-coder-id"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "maclustr-coder", "messages": [{"role": "user", "content": "hi"}],
            "stream": True, **extra}


def hdr(headers: dict[str, str], name: str) -> str | None:
    low = name.lower()
    return next((v for k, v in headers.items() if k.lower() == low), None)


@pytest.fixture
async def fake11() -> AsyncIterator[FakeMLX]:
    async with FakeMLX(http11=True) as f:
        yield f


def assert_well_formed(ans: Answer, alias: str = "maclustr-coder") -> list[Any]:
    """Every data event is JSON with the alias as model, and `[DONE]` is the last frame."""
    assert ans.status == 200, ans.body[:500]
    assert ans.events[-1] == b"data: [DONE]"
    data = ans.data()
    assert data.count("[DONE]") == 1
    for obj in data[:-1]:
        assert obj["model"] == alias, obj
    return data[:-1]


@pytest.mark.parametrize("echo", [None, "default_model", "", "maclustr-fast", "other/odd",
                                  "with \"quotes\" and ünïcode"])
async def test_every_chunk_model_is_alias_including_usage(
        gateway: Gateway, fake: FakeMLX, echo: str | None) -> None:
    """Token chunks, the finish chunk and the usage chunk (object chat.completion) all name
    the alias, whatever the upstream echoed."""
    fake.push(Behavior(events=4, model_echo=echo))
    ans = await gateway.client.post(CHAT, chat(stream_options={"include_usage": True}))
    objs = assert_well_formed(ans)
    assert len(objs) == 6
    assert [o["object"] for o in objs] == ["chat.completion.chunk"] * 6  # usage too, as OpenAI
    assert "usage" in objs[-1] and objs[-1]["choices"] == []
    assert objs[-2]["choices"][0]["finish_reason"] == "stop"


async def test_other_chunk_fields_untouched(gateway: Gateway, fake: FakeMLX) -> None:
    """Only `model` is rewritten: ids, fingerprint, deltas and unicode text are as sent."""
    fake.push(Behavior(events=3, text="naïve ☃ \ufffd", model_echo="default_model"))
    objs = assert_well_formed(await gateway.client.post(CHAT, chat()))
    assert len({o["id"] for o in objs}) == 1
    assert len({o["system_fingerprint"] for o in objs}) == 1, "one stable fingerprint"
    for o in objs:
        assert o["system_fingerprint"].startswith("fp_")
        assert o["system_fingerprint"] != SYSTEM_FINGERPRINT
        assert list(o) == ["id", "system_fingerprint", "object", "model", "created", "choices"]
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == \
        "naïve ☃ \ufffd" * 3


async def test_next_stream_splices_from_its_first_event(gateway: Gateway, fake: FakeMLX) -> None:
    """A replica's fingerprint, learned from one stream, is handed to the next: that stream's
    first event takes the splice too, and so keeps the server's own bytes (json.dumps spacing)
    instead of being decoded and re-encoded compact (the first stream's first event is)."""
    fake.push(Behavior(events=3), Behavior(events=3))
    first = await gateway.client.post(CHAT, chat())
    second = await gateway.client.post(CHAT, chat())
    for ans in (first, second):
        assert_well_formed(ans)
    one, two = ([e for e in a.events if e.startswith(b"data: {")] for a in (first, second))
    assert one[0].startswith(b'data: {"id":"'), "no fingerprint known yet: the JSON path"
    assert all(e.startswith(b'data: {"id": "') for e in one[1:] + two), two[0][:60]
    assert two[0][len(b"data: "):] == json.dumps(json.loads(two[0][len(b"data: "):])).encode()


async def test_keepalive_comments_passed_through_before_first_event(
        gateway: Gateway, fake: FakeMLX) -> None:
    """mlx's `: keepalive i/n` comments during prompt processing reach the client as
    comments (SSE clients ignore them), in order, before the first token."""
    fake.push(Behavior(events=2, keepalives=3))
    ans = await gateway.client.post(CHAT, chat())
    assert_well_formed(ans)
    assert ans.events[:3] == [b": keepalive 0/2", b": keepalive 1/2", b": keepalive 2/2"]
    assert ans.events[3].startswith(b"data: {")


async def test_openai_sdk_reads_stream_with_keepalives(gateway: Gateway, fake: FakeMLX) -> None:
    """The official SDK, the real client, does not choke on the comments."""
    fake.push(Behavior(events=3, keepalives=2, model_echo="default_model"))
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="maclustr-coder", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = [c async for c in stream]
    finally:
        await client.close()
    assert chunks and {c.model for c in chunks} == {"maclustr-coder"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "The quick\ufffd"


async def test_done_is_last_and_stream_ends(gateway: Gateway, fake: FakeMLX) -> None:
    """Nothing follows `[DONE]`, and the response ends (the client's read returns)."""
    ans = await gateway.client.post(CHAT, chat(), timeout=5)
    assert_well_formed(ans)
    assert ans.body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("path", [CHAT, TEXT])
async def test_sse_headers(gateway: Gateway, fake: FakeMLX, path: str) -> None:
    """Proxies (nginx) and clients must treat the answer as an unbuffered event stream."""
    body = chat() if path == CHAT else {"model": "maclustr-coder", "prompt": "x", "stream": True}
    ans = await gateway.client.post(path, body)
    assert ans.status == 200
    assert (hdr(ans.headers, "Content-Type") or "").split(";")[0] == "text/event-stream"
    assert hdr(ans.headers, "Cache-Control") == "no-cache"
    assert hdr(ans.headers, "X-Accel-Buffering") == "no"
    assert hdr(ans.headers, "Content-Length") is None


async def read_timed(gw: Gateway, body: dict[str, Any]) -> list[tuple[float, bytes]]:
    """POST and read the stream, stamping each complete frame with its arrival time."""
    frames: list[tuple[float, bytes]] = []
    buf = b""
    raw = b""
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + CHAT, json=body, headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        async for chunk in r.content.iter_any():
            now = time.monotonic()
            raw += chunk
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                frames.append((now, frame))
        gw.client.record(Answer(r.status, dict(r.headers), raw))
    return frames


@pytest.mark.parametrize("http11", [False, True])
async def test_no_buffering_each_event_arrives_when_sent(
        make_gateway: Any, fake: FakeMLX, fake11: FakeMLX, http11: bool) -> None:
    """With the upstream pausing 300 ms between events, the client holds event 1 about 300 ms
    before event 2: nothing between upstream and client waits for more data."""
    up = fake11 if http11 else fake
    gw = await make_gateway(routes_yaml({"maclustr-coder": up.url}))
    up.push(Behavior(events=3, delay=0.3))
    frames = await read_timed(gw, chat())
    data = [(t, f) for t, f in frames if f.startswith(b"data: {")]
    assert len(data) == 4  # 3 tokens + finish
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(data)]
    assert all(g >= 0.25 for g in gaps), gaps
    assert frames[-1][1] == b"data: [DONE]"


async def test_first_event_delivered_while_upstream_still_silent(
        gateway: Gateway, fake: FakeMLX) -> None:
    """The upstream sends one event and then goes quiet with the stream open: the client
    must already hold that event (no waiting for a buffer to fill or the body to end)."""
    fake.push(Behavior(events=5, stall_after=1, keepalives=1))
    async with aiohttp.ClientSession() as s, s.post(
            gateway.url + CHAT, json=chat(), headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        buf = b""

        async def first_data_event() -> None:
            nonlocal buf
            while b"data: {" not in buf or not buf.endswith(b"\n\n"):
                chunk = await r.content.readany()
                assert chunk, "stream ended early"
                buf += chunk

        await asyncio.wait_for(first_data_event(), 2.0)
        gateway.client.record(Answer(r.status, dict(r.headers), buf))
    assert buf.startswith(b": keepalive 1/1\n\ndata: {")
    assert json.loads(buf.split(b"\n\n")[1][6:])["model"] == "maclustr-coder"
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2.0)


async def test_http11_keepalive_upstream_works_the_same(
        make_gateway: Any, fake11: FakeMLX) -> None:
    """A well-behaved HTTP/1.1 server (chunked, keep-alive) relays identically, and reusing
    its pooled connection for the next request works."""
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake11.url}))
    fake11.push(Behavior(events=3, keepalives=1, model_echo="default_model"))
    s = await gw.client.post(CHAT, chat(stream_options={"include_usage": True}))
    objs = assert_well_formed(s)
    assert len(objs) == 5
    assert s.events[0] == b": keepalive 1/1"
    u = await gw.client.post(CHAT, {"model": "maclustr-coder",
                                    "messages": [{"role": "user", "content": "hi"}]})
    assert u.status == 200 and u.json()["model"] == "maclustr-coder"
    t = await gw.client.post(TEXT, {"model": "maclustr-coder", "prompt": "x", "stream": True})
    assert [o["object"] for o in assert_well_formed(t)] == ["text_completion"] * 6
    assert len(fake11.requests) == 3


def raw_stream(*payloads: bytes) -> bytes:
    head = (b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.7\r\n"
            b"Content-type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
    return head + b"".join(b"data: " + p + b"\n\n" for p in payloads) + b"data: [DONE]\n\n"


async def test_large_tool_calls_event_relayed_intact(gateway: Gateway, fake: FakeMLX) -> None:
    """A 200 KB event (bigger than aiohttp's 64 KiB line limit) is one event, byte-exact
    apart from `model`."""
    args = json.dumps({"code": "x = '" + "é∑" * 100_000 + "'"})
    big = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": CODER_ID,
           "created": 1, "choices": [{"index": 0, "finish_reason": None, "delta": {
               "role": "assistant", "tool_calls": [{"index": 0, "id": "call_1",
                                                    "type": "function", "function": {
                                                        "name": "run", "arguments": args}}]}}]}
    payload = json.dumps(big).encode()
    assert len(payload) > 200_000
    fake.push(Behavior(kind="raw", raw=raw_stream(payload)))
    ans = await gateway.client.post(CHAT, chat())
    objs = assert_well_formed(ans)
    assert len(objs) == 1
    assert objs[0] == {**big, "model": "maclustr-coder"}


async def test_large_content_event_relayed_intact(gateway: Gateway, fake: FakeMLX) -> None:
    """A huge single token chunk from the fake's own stream survives too."""
    text = "lorem ipsum ✓ " * 20_000
    fake.push(Behavior(events=2, text=text))
    objs = assert_well_formed(await gateway.client.post(CHAT, chat()))
    assert [o["choices"][0]["delta"].get("content") for o in objs] == [text, text, None]


async def test_completions_stream(gateway: Gateway, fake: FakeMLX) -> None:
    """/v1/completions streams text_completion chunks with the alias, internal id upstream."""
    fake.push(Behavior(events=3, keepalives=1, model_echo="default_model"))
    ans = await gateway.client.post(TEXT, {"model": CODER_ID, "prompt": "Once", "stream": True,
                                           "max_tokens": 2})
    objs = assert_well_formed(ans)
    assert [o["choices"][0]["text"] for o in objs] == ["The", " quick", ""]
    assert objs[-1]["choices"][0]["finish_reason"] == "length"
    assert (fake.requests[0].json or {})["model"] == CODER_ID
    assert fake.requests[0].path == TEXT


async def test_crlf_framed_upstream_events_rewritten(gateway: Gateway, fake: FakeMLX) -> None:
    """SSE allows CRLF line ends; such events still get the alias and end with [DONE]."""
    body = json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "default_model",
                       "choices": [{"index": 0, "delta": {"content": "hi"}}]}).encode()
    raw = raw_stream(body).replace(b"\n\n", b"\r\n\r\n")
    fake.push(Behavior(kind="raw", raw=raw))
    objs = assert_well_formed(await gateway.client.post(CHAT, chat()))
    assert objs[0]["choices"][0]["delta"]["content"] == "hi"


async def test_nested_model_keys_left_alone(gateway: Gateway, fake: FakeMLX) -> None:
    """Only the top-level `model` is the upstream's echo; a `model` inside tool arguments,
    deltas or content is the model's output and must reach the client unchanged."""
    nested_first = {"choices": [{"index": 0, "delta": {"model": "default_model",
                                                         "content": '"model": "default_model"'}}],
                    "id": "c1", "model": "default_model", "object": "chat.completion.chunk"}
    in_string = {"id": "c2", "object": "chat.completion.chunk", "model": "default_model",
                 "choices": [{"index": 0, "delta": {"content": '{"model": "default_model"}'}}]}
    tool = {"id": "c3", "object": "chat.completion.chunk", "model": "default_model",
            "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
                "name": "pick", "arguments": {"model": "default_model"}}}]}}]}
    fake.push(Behavior(kind="raw", raw=raw_stream(
        *(json.dumps(o).encode() for o in (nested_first, in_string, tool)))))
    objs = assert_well_formed(await gateway.client.post(CHAT, chat()))
    assert objs == [{**o, "model": "maclustr-coder"} for o in (nested_first, in_string, tool)]


async def test_many_events_in_one_read_all_rewritten(gateway: Gateway, fake: FakeMLX) -> None:
    """A burst of events arriving in one TCP read is split and rewritten event by event."""
    chunks = [json.dumps({"id": "c", "object": "chat.completion.chunk", "model": CODER_ID,
                          "choices": [{"index": 0, "delta": {"content": str(i)}}]}).encode()
              for i in range(500)]
    fake.push(Behavior(kind="raw", raw=raw_stream(*chunks)))
    objs = assert_well_formed(await gateway.client.post(CHAT, chat()))
    assert [o["choices"][0]["delta"]["content"] for o in objs] == [str(i) for i in range(500)]


async def test_multiline_data_event_is_one_event_with_alias(
        gateway: Gateway, fake: FakeMLX) -> None:
    """SSE lets one event's data span several `data:` lines; it is still one JSON event and
    gets the alias, and an `event:`/`id:` field does not confuse the relay."""
    raw = (b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream\r\n\r\n"
           b'id: 1\ndata: {"id": "c", "model": "default_model",\n'
           b'data:  "object": "chat.completion.chunk", "choices": []}\n\n'
           b"data: [DONE]\n\n")
    fake.push(Behavior(kind="raw", raw=raw))
    ans = await gateway.client.post(CHAT, chat())
    assert ans.status == 200
    assert ans.events[-1] == b"data: [DONE]" and len(ans.events) == 2
    lines = ans.events[0].split(b"\n")
    payload = b"\n".join(ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:"))
    assert json.loads(payload) == {"id": "c", "model": "maclustr-coder",
                                   "object": "chat.completion.chunk", "choices": []}
    assert b"id: 1" in lines


async def test_data_field_without_space_still_rewritten(gateway: Gateway, fake: FakeMLX) -> None:
    """`data:{...}` (no space) is valid SSE from other OpenAI-compatible servers."""
    raw = (b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream\r\n\r\n"
           b'data:{"id": "c", "model": "' + CODER_ID.encode() + b'", "choices": []}\n\n'
           b"data:[DONE]\n\n")
    fake.push(Behavior(kind="raw", raw=raw))
    ans = await gateway.client.post(CHAT, chat())
    assert ans.status == 200
    frames = ans.events
    assert len(frames) == 2
    assert json.loads(frames[0].split(b":", 1)[1]) == {"id": "c", "model": "maclustr-coder",
                                                       "choices": []}
    assert frames[1].replace(b" ", b"") == b"data:[DONE]"
