"""A client that goes away makes the gateway close its upstream request within 1 s, in every
phase, so the Mac stops generating for nobody and the next user gets the model's slot."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, Behavior, FakeMLX, Gateway, RealMLX, real_routes, routes_yaml
from conftest import read_until as read_until_seen

CHAT = "/v1/chat/completions"


def chat(stream: bool, alias: str = "maclustr-coder", **extra: Any) -> dict[str, Any]:
    return {"model": alias, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            **extra}


async def assert_upstream_closed_soon(fake: FakeMLX, gone_at: float) -> None:
    """The fake saw its request's connection closed by the gateway within 1 s of the client
    leaving (closed_at is the fake's loop.time(), the same loop as ours)."""
    rec = fake.requests[0]
    await asyncio.wait_for(rec.closed_by_peer.wait(), 2)
    assert rec.closed_at is not None
    assert rec.closed_at - gone_at < 1.0, rec.closed_at - gone_at


async def _post_then_leave(gw: Gateway, fake: FakeMLX, body: dict[str, Any],
                           read_until: bytes | None) -> float:
    """Send `body`; once the fake has the request (and, if `read_until` is given, once the
    client has read that marker), drop the client's connection. Returns when it left."""
    loop = asyncio.get_running_loop()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        if read_until is None:
            task = asyncio.ensure_future(session.post(gw.url + CHAT, json=body, headers=AUTH))
            await fake.wait_requests(1)
            await asyncio.sleep(0.05)  # let the gateway settle into waiting on the upstream
            assert not task.done(), "the gateway answered before the client could leave"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        else:
            resp = await session.post(gw.url + CHAT, json=body, headers=AUTH)
            assert resp.status == 200
            marker = read_until
            await read_until_seen(resp, lambda seen: marker in seen, 5)
            resp.close()
        gone_at = loop.time()
    finally:
        await session.close()
    return gone_at


async def test_disconnect_before_upstream_answered_closes_upstream(gateway: Gateway,
                                                                   fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    gone = await _post_then_leave(gateway, fake, chat(True), None)
    await assert_upstream_closed_soon(fake, gone)


async def test_disconnect_during_model_load_closes_upstream(gateway: Gateway,
                                                            fake: FakeMLX) -> None:
    fake.push(Behavior(header_delay=30))
    gone = await _post_then_leave(gateway, fake, chat(True), None)
    await assert_upstream_closed_soon(fake, gone)


async def test_disconnect_during_keepalives_closes_upstream(gateway: Gateway,
                                                            fake: FakeMLX) -> None:
    """Only `: keepalive` comments so far (prompt processing)."""
    fake.push(Behavior(keepalives=300, keepalive_delay=0.1))
    gone = await _post_then_leave(gateway, fake, chat(True), b": keepalive")
    await assert_upstream_closed_soon(fake, gone)
    assert fake.requests[0].closed_at is not None


async def test_disconnect_mid_stream_closes_upstream(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=300, delay=0.1))
    gone = await _post_then_leave(gateway, fake, chat(True), b"data: ")
    await assert_upstream_closed_soon(fake, gone)


async def test_disconnect_mid_stream_closes_keepalive_upstream(make_gateway: Any) -> None:
    """An HTTP/1.1 upstream connection is dropped, not returned to a pool mid-generation."""
    async with FakeMLX(http11=True) as f11:
        gw: Gateway = await make_gateway(routes_yaml({"maclustr-coder": f11.url}))
        f11.push(Behavior(events=300, delay=0.1))
        gone = await _post_then_leave(gw, f11, chat(True), b"data: ")
        await assert_upstream_closed_soon(f11, gone)
        f11.push(Behavior(delay=30))
        gone = await _post_then_leave(gw, f11, chat(False), None)
        rec = f11.requests[1]
        await asyncio.wait_for(rec.closed_by_peer.wait(), 2)
        assert rec.closed_at is not None and rec.closed_at - gone < 1.0


async def test_disconnect_from_unary_request_closes_upstream(gateway: Gateway,
                                                             fake: FakeMLX) -> None:
    fake.push(Behavior(delay=30))
    gone = await _post_then_leave(gateway, fake, chat(False), None)
    await assert_upstream_closed_soon(fake, gone)


async def test_gateway_serves_normally_after_disconnects(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=300, delay=0.1))
    await _post_then_leave(gateway, fake, chat(True), b"data: ")
    ans = await gateway.client.post(CHAT, chat(False))
    assert ans.status == 200
    assert fake.open_connections <= 1


# --- the real mlx_lm.server -----------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.real_upstream
async def test_disconnect_stops_real_mlx_generation(make_gateway: Any, real_mlx: RealMLX
                                                    ) -> None:
    """Abandon a 100000-token stream (minutes of work for the tiny model: it does ~450 tokens/s
    and random weights never stop early). A request for the *other* model makes mlx_lm.server
    drain its current batch before swapping models, so it would wait for a leaked generation;
    it answers promptly instead, and the server then sits idle (no CPU burnt for nobody)."""
    gw: Gateway = await make_gateway(real_routes(real_mlx))
    body = chat(True, max_tokens=100000)
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as s:
        resp = await s.post(gw.url + CHAT, json=body, headers=AUTH)
        assert resp.status == 200
        seen = await read_until_seen(resp, lambda seen: seen.count(b"data: ") >= 20, 60)
        assert b"finish_reason\": \"" not in seen  # still generating when we leave
        resp.close()
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat(False, alias="maclustr-fast", max_tokens=5),
                               timeout=120)
    took = time.monotonic() - t0
    assert ans.status == 200, ans.body[:300]
    assert took < 15, took
    before = _cpu_seconds(real_mlx.pid)  # the server the fixture started, never "not found"
    await asyncio.sleep(1.0)  # a measurement window, not synchronisation
    assert _cpu_seconds(real_mlx.pid) - before < 0.5, "mlx_lm.server is still generating"
