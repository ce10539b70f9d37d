"""Faults at the upstream: every failure becomes one OpenAI envelope (or one final in-band
error event once a stream has started), within a bounded time, naming only the public alias,
and the gateway keeps serving everyone else afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, Answer, Behavior, FakeMLX, Gateway, wait_for
from fake_mlx import abort

from maclustr.harness import free_port

CHAT = "/v1/chat/completions"
GOOD = "maclustr-fast"  # alias that always stays on the healthy fake
BAD = "maclustr-coder"  # alias whose upstream misbehaves


def table(upstreams: dict[str, str], top: str = "", per_model: dict[str, str] | None = None
          ) -> str:
    """A routes file with optional top-level sections and one extra line per model."""
    lines = [top.rstrip()] if top else []
    lines.append("models:")
    for alias, url in upstreams.items():
        lines += [f"  {alias}:", f'    model: "/Users/admin/models/internal-{alias}-id"',
                  f"    upstream: {url}"]
        if per_model and alias in per_model:
            lines.append(f"    {per_model[alias]}")
    return "\n".join(lines) + "\n"


def chat(alias: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": alias, "messages": [{"role": "user", "content": "hi"}],
            "stream": stream, **extra}


def assert_envelope(ans: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert ans.status == status, (ans.status, ans.body[:300])
    assert ans.headers["Content-Type"].startswith("application/json")
    err: dict[str, Any] = ans.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err


async def stream_post(gw: Gateway, body: dict[str, Any], timeout: float = 10) -> Answer:
    """POST a stream on the shared (pooling) session and read it to the end, even when the
    gateway cuts it after an in-band error without the chunked terminator; the answer is
    recorded for the leak check. The next request on the same session must still work: the
    cut connection must not be taken for reusable."""
    parts: list[bytes] = []
    async with gw.client.session.post(gw.url + CHAT, json=body, headers=AUTH,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        try:
            while chunk := await r.content.readany():
                parts.append(chunk)
        except aiohttp.ClientPayloadError:
            pass
        return gw.client.record(Answer(r.status, dict(r.headers), b"".join(parts)))


async def assert_serving(gw: Gateway) -> None:
    """The gateway still answers a normal request on the healthy alias."""
    ans = await gw.client.post(CHAT, chat(GOOD), timeout=10)
    assert ans.status == 200, ans.body[:300]
    assert ans.json()["model"] == GOOD


async def two_aliases(make_gateway: Any, bad_url: str, good_url: str, top: str = "",
                      per_model: dict[str, str] | None = None) -> Gateway:
    gw: Gateway = await make_gateway(table({BAD: bad_url, GOOD: good_url}, top, per_model))
    return gw


# --- before the response starts -------------------------------------------------------------


async def test_refused_port_is_502_naming_only_the_alias_fast(make_gateway: Any,
                                                             fake: FakeMLX) -> None:
    port = free_port()
    gw = await two_aliases(make_gateway, f"http://127.0.0.1:{port}", fake.url)
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(BAD))
    assert time.monotonic() - t0 < 2
    err = assert_envelope(ans, 502, "upstream_unavailable")
    assert BAD in err["message"]
    assert str(port) not in ans.body.decode() and "127.0.0.1" not in ans.body.decode()
    await assert_serving(gw)


async def test_dns_failure_is_502_within_bounded_time(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, "http://nonexistent.invalid:65001", fake.url,
                           top="timeouts: {connect: 1, first_byte: 1, idle: 5}")
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(BAD), timeout=15)
    assert time.monotonic() - t0 < 5
    err = assert_envelope(ans, 502)
    assert err["code"].startswith("upstream_")
    assert "nonexistent" not in ans.body.decode()
    await assert_serving(gw)


async def test_reset_before_headers_is_502(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    for stream in (False, True):
        fake.push(Behavior(kind="reset"))
        ans = await gw.client.post(CHAT, chat(BAD, stream=stream), timeout=10)
        assert_envelope(ans, 502, "upstream_unavailable")
        await assert_serving(gw)


async def test_drop_before_headers_is_502(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    for stream in (False, True):
        fake.push(Behavior(kind="drop"))
        ans = await gw.client.post(CHAT, chat(BAD, stream=stream), timeout=10)
        assert_envelope(ans, 502, "upstream_unavailable")
        await assert_serving(gw)


async def test_hung_upstream_is_504_after_first_byte_timeout(make_gateway: Any,
                                                             fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url,
                           top="timeouts: {connect: 0.2, first_byte: 0.3, idle: 5}")
    fake.push(Behavior(kind="hang"))
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(BAD), timeout=10)
    took = time.monotonic() - t0
    err = assert_envelope(ans, 504, "upstream_timeout")
    assert BAD in err["message"]
    assert 0.3 <= took < 2.5, took
    # the hung upstream request is closed, not left holding the model's slot
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2)
    await assert_serving(gw)


async def test_per_model_first_byte_timeout_beats_the_global_one(make_gateway: Any,
                                                                 fake: FakeMLX) -> None:
    """Short override on a long global default times out early; a long override on a short
    global default lets a slow model load answer."""
    gw = await two_aliases(make_gateway, fake.url, fake.url,
                           top="timeouts: {connect: 0.2, first_byte: 30, idle: 30}",
                           per_model={BAD: "timeouts: {first_byte: 0.3}"})
    fake.push(Behavior(kind="hang"))
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(BAD), timeout=10)
    assert_envelope(ans, 504, "upstream_timeout")
    assert time.monotonic() - t0 < 2.5

    gw2 = await two_aliases(make_gateway, fake.url, fake.url,
                            top="timeouts: {connect: 0.2, first_byte: 0.3, idle: 0.3}",
                            per_model={BAD: "timeouts: {first_byte: 5, idle: 5}"})
    fake.push(Behavior(header_delay=0.8))
    ans = await gw2.client.post(CHAT, chat(BAD), timeout=10)
    assert ans.status == 200, ans.body[:300]
    fake.push(Behavior(kind="hang"))
    ans = await gw2.client.post(CHAT, chat(GOOD), timeout=10)
    assert_envelope(ans, 504, "upstream_timeout")


async def test_keepalive_comments_reset_the_idle_timer(make_gateway: Any, fake: FakeMLX) -> None:
    """A long prompt (keepalives 0.15 s apart, 1.05 s in all) outlives idle=0.4 s."""
    gw = await two_aliases(make_gateway, fake.url, fake.url,
                           top="timeouts: {connect: 1, first_byte: 5, idle: 0.4}")
    fake.push(Behavior(keepalives=7, keepalive_delay=0.15))
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(BAD, stream=True), timeout=10)
    assert time.monotonic() - t0 > 0.9
    assert ans.status == 200
    data = ans.data()
    assert data[-1] == "[DONE]"
    assert not any(isinstance(d, dict) and "error" in d for d in data)


# --- upstream error answers -----------------------------------------------------------------


def _leaky_message(fake: FakeMLX) -> str:
    return (f"Cannot find an appropriate cached snapshot folder for "
            f"/Users/admin/models/internal-{BAD}-id on 127.0.0.1:{fake.port} "
            f"(see /Users/admin/.cache/huggingface/hub/models--x/snapshots)")


def _assert_scrubbed(message: str, fake: FakeMLX) -> None:
    assert "/Users" not in message
    assert "internal-" not in message
    assert str(fake.port) not in message
    assert "127.0.0.1" not in message


HUMAN = "Conversation roles must alternate user/assistant/user/assistant"
TRACEBACK = ("Failed to load model\nTraceback (most recent call last):\n"
             '  File "/opt/homebrew/lib/python3.12/site-packages/mlx_lm/server.py", line 1577, '
             "in handle_completion\nValueError: boom")


async def test_upstream_4xx_one_human_message_passes_status_kept_but_404(
        make_gateway: Any, fake: FakeMLX) -> None:
    """A 4xx's text that reads as one message for a person reaches the client; 404 is ours
    alone (unknown alias), so mlx's 404 for a prompt it could not prepare answers 400."""
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    for status, expect in ((400, 400), (422, 422), (404, 400)):
        fake.push(Behavior(kind="error", status=status,
                           error_body=json.dumps({"error": HUMAN}).encode()))
        err = assert_envelope(await gw.client.post(CHAT, chat(BAD)), expect, "upstream_rejected")
        assert err["message"] == f"Model '{BAD}' rejected the request: {HUMAN}"
    await assert_serving(gw)


async def test_upstream_4xx_text_that_is_not_one_human_message_is_replaced(
        make_gateway: Any, fake: FakeMLX) -> None:
    """Paths, addresses, tracebacks, several lines or a wall of text: our own message, status
    kept; a 404 of that kind (mlx failed to load or prepare) is a 502, never a 404."""
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    bodies = [json.dumps({"error": _leaky_message(fake)}).encode(),
              json.dumps({"error": TRACEBACK}).encode(), TRACEBACK.encode(),
              json.dumps({"error": "x" * 500}).encode()]
    for body in bodies:
        for status, expect in ((400, 400), (422, 422), (404, 502)):
            fake.push(Behavior(kind="error", status=status, error_body=body))
            err = assert_envelope(await gw.client.post(CHAT, chat(BAD)), expect)
            if expect == 502:
                assert err["message"].startswith(f"Model '{BAD}' could not prepare the request")
            else:
                assert err["message"] == f"Model '{BAD}' rejected the request."
    await assert_serving(gw)


async def test_upstream_5xx_text_never_reaches_the_client_but_the_log(
        make_gateway: Any, fake: FakeMLX, caplog: pytest.LogCaptureFixture) -> None:
    """A 5xx body (a load failure with its stack trace, or any words at all) is logged with
    the request id; the client gets our own message."""
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    for status in (500, 503):
        for i, body in enumerate((json.dumps({"error": TRACEBACK}).encode(),
                                  json.dumps({"error": HUMAN}).encode(),
                                  TRACEBACK.encode(), _leaky_message(fake).encode())):
            rid = f"rid-{status}-{i}"
            fake.push(Behavior(kind="error", status=status, error_body=body))
            with caplog.at_level(logging.WARNING, logger="maclustr.relay"):
                ans = await gw.client.post(CHAT, chat(BAD), headers={"X-Request-Id": rid})
            err = assert_envelope(ans, 502, "upstream_unavailable")
            assert err["message"] == (f"Model '{BAD}' failed (upstream status {status}). It "
                                      "may be loading or down; check /health?deep=true.")
            logged = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
            assert logged and ("Failed to load model" in logged[0] or HUMAN in logged[0]
                               or "cached snapshot" in logged[0]), logged
            ok = await gw.client.post(CHAT, chat(BAD))  # a success: no ejection after 3 in a row
            assert ok.status == 200
    await assert_serving(gw)


async def test_upstream_plain_text_error_body_becomes_envelope(make_gateway: Any,
                                                               fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    text = _leaky_message(fake).encode()
    fake.push(Behavior(kind="error", status=500, error_body=text, content_type="text/plain"))
    err = assert_envelope(await gw.client.post(CHAT, chat(BAD)), 502)
    _assert_scrubbed(err["message"], fake)
    fake.push(Behavior(kind="error", status=400, error_body=text,
                       content_type="text/html;charset=utf-8"))
    err = assert_envelope(await gw.client.post(CHAT, chat(BAD)), 400)
    _assert_scrubbed(err["message"], fake)
    fake.push(Behavior(kind="error", status=400, error_body=HUMAN.encode(),
                       content_type="text/plain"))
    err = assert_envelope(await gw.client.post(CHAT, chat(BAD)), 400)
    assert err["message"].endswith(HUMAN)
    await assert_serving(gw)


async def test_invalid_json_unary_body_is_502(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    for garbage in (b'{"id": "x", "choices": [', b"<html>oops</html>", b""):
        fake.push(Behavior(kind="raw", raw=b"HTTP/1.0 200 OK\r\nContent-Type: application/json"
                           b"\r\n\r\n" + garbage))
        assert_envelope(await gw.client.post(CHAT, chat(BAD)), 502)
    await assert_serving(gw)


async def test_non_sse_body_for_stream_request_is_502(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    fake.push(Behavior(content_type="application/json"))  # stream bytes, wrong type
    assert_envelope(await gw.client.post(CHAT, chat(BAD, stream=True)), 502)
    fake.push(Behavior(kind="raw", raw=b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n"
                       b"<html>hello</html>"))
    assert_envelope(await gw.client.post(CHAT, chat(BAD, stream=True)), 502)
    await assert_serving(gw)


# --- mid-stream failures --------------------------------------------------------------------


def _assert_ends_with_one_error(ans: Any, k: int, code: str) -> None:
    assert ans.status == 200
    data = ans.data()
    assert "[DONE]" not in data
    assert len(data) == k + 1, data
    assert all("choices" in d for d in data[:k])
    last = data[-1]
    assert set(last) == {"error"}, last
    assert last["error"]["code"] == code
    assert BAD in last["error"]["message"]
    assert ans.body.endswith(b"\n\n")


async def test_upstream_dies_mid_stream_ends_with_one_error_event(make_gateway: Any,
                                                                  fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url)
    fake.push(Behavior(events=6, die_after=3))
    t0 = time.monotonic()
    ans = await stream_post(gw, chat(BAD, stream=True))
    assert time.monotonic() - t0 < 2
    _assert_ends_with_one_error(ans, 3, "upstream_unavailable")
    await assert_serving(gw)


async def test_http11_upstream_dying_mid_stream_on_completions_endpoint(make_gateway: Any,
                                                                        fake: FakeMLX) -> None:
    """Same on a keep-alive chunked upstream (aborted mid-chunk) and on /v1/completions."""
    async with FakeMLX(http11=True) as f11:
        gw = await two_aliases(make_gateway, f11.url, fake.url)
        f11.push(Behavior(events=6, die_after=2))
        parts: list[bytes] = []
        body = {"model": BAD, "prompt": "hi", "stream": True}
        async with gw.client.session.post(gw.url + "/v1/completions", json=body,
                                          headers=AUTH) as r:
            try:
                while chunk := await r.content.readany():
                    parts.append(chunk)
            except aiohttp.ClientPayloadError:
                pass
            ans = gw.client.record(Answer(r.status, dict(r.headers), b"".join(parts)))
        _assert_ends_with_one_error(ans, 2, "upstream_unavailable")
        f11.push(Behavior())
        ok = await gw.client.post("/v1/completions", {"model": BAD, "prompt": "hi"})
        assert ok.status == 200 and ok.json()["model"] == BAD
        await assert_serving(gw)


async def test_upstream_stalls_mid_stream_past_idle_ends_with_one_error_event(
        make_gateway: Any, fake: FakeMLX) -> None:
    gw = await two_aliases(make_gateway, fake.url, fake.url,
                           top="timeouts: {connect: 1, first_byte: 5, idle: 0.3}")
    fake.push(Behavior(events=6, stall_after=2))
    t0 = time.monotonic()
    ans = await stream_post(gw, chat(BAD, stream=True))
    assert 0.3 <= time.monotonic() - t0 < 2.5
    _assert_ends_with_one_error(ans, 2, "upstream_timeout")
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2)
    await assert_serving(gw)


# --- backpressure ---------------------------------------------------------------------------


class FloodUpstream:
    """An upstream that streams `total` bytes of SSE as fast as the socket takes them and
    counts what it managed to hand to the kernel, so a test can see backpressure arrive."""

    def __init__(self, total: int, model: str) -> None:
        self.total = total
        self.written = 0
        self.finished = False
        self.model = model
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> FloodUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self._writers):
            abort(w.transport)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream\r\n\r\n")
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": self.model,
                     "choices": [{"index": 0, "delta": {"content": "x" * 16000}}]}
            frame = f"data: {json.dumps(chunk)}\n\n".encode()
            while self.written < self.total:
                writer.write(frame)
                await writer.drain()
                self.written += len(frame)
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            self.finished = True
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)  # closing itself now: flushes, then drops
            writer.close()


async def until_writes_stop(flood: FloodUpstream) -> None:
    """Backpressure has reached the upstream once its byte count holds still for 0.5 s."""
    last = [-1, time.monotonic()]

    def settled() -> bool:
        now = time.monotonic()
        if flood.written != last[0]:
            last[0], last[1] = flood.written, now
            return False
        return now - last[1] > 0.5

    await wait_for(settled, timeout=20, interval=0.05)


async def test_slow_client_backpressure_reaches_the_upstream(make_gateway: Any,
                                                             fake: FakeMLX) -> None:
    """A client that stops reading must stall the upstream instead of the gateway buffering
    the whole generation: the upstream cannot write much more than the socket buffers."""
    total = 400 * 1024 * 1024
    async with FloodUpstream(total, f"/Users/admin/models/internal-{BAD}-id") as flood:
        gw = await two_aliases(make_gateway, f"http://127.0.0.1:{flood.port}", fake.url)
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as s:
            resp = await s.post(gw.url + CHAT, json=chat(BAD, stream=True), headers=AUTH,
                                read_bufsize=2**16)
            assert resp.status == 200
            first = await resp.content.readany()
            assert first.startswith(b"data: ")
            # Now the client stops reading. Wait until the upstream's writes stop advancing.
            await until_writes_stop(flood)
            assert not flood.finished
            assert flood.written < 96 * 1024 * 1024, flood.written
            resp.close()
        await assert_serving(gw)


@pytest.mark.parametrize("handed_over", [False, True], ids=["front", "aiohttp"])
async def test_slow_client_that_reads_again_gets_the_whole_stream(make_gateway: Any,
                                                                  fake: FakeMLX,
                                                                  handed_over: bool) -> None:
    """Backpressure is a pause, not an end: once the stalled client reads again, the client
    transport's resume_writing resumes the upstream and every byte arrives, [DONE] last. On
    both servers: the front, and aiohttp for a connection the front handed over (a chunked
    request body)."""
    total = 64 * 1024 * 1024
    async with FloodUpstream(total, f"/Users/admin/models/internal-{BAD}-id") as flood:
        gw = await two_aliases(make_gateway, f"http://127.0.0.1:{flood.port}", fake.url)
        body = json.dumps(chat(BAD, stream=True)).encode()

        async def chunked() -> Any:
            yield body

        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as s:
            resp = await s.post(gw.url + CHAT, data=chunked() if handed_over else body,
                                headers={**AUTH, "Content-Type": "application/json"},
                                read_bufsize=2**16)
            assert resp.status == 200
            got = len(await resp.content.readany())
            await until_writes_stop(flood)
            assert not flood.finished  # stalled by the client, not done
            tail = b""
            while chunk := await asyncio.wait_for(resp.content.readany(), 20):
                got += len(chunk)
                tail = (tail + chunk)[-64:]
            assert flood.finished
            assert tail.endswith(b"data: [DONE]\n\n")
            assert got > total * 0.95  # every frame (each names the shorter alias)
        await assert_serving(gw)
