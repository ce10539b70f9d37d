"""Shutdown on SIGTERM/SIGINT: stop accepting at once, let streams in flight finish within the
grace period, end the rest with the in-band error event, exit 0. Proven with a live stream
against the gateway as a real process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, Behavior, FakeMLX, read_until, routes_yaml

CHAT = "/v1/chat/completions"
A = "maclustr-coder"
SIGNALS = [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]


def stream_body() -> dict[str, Any]:
    return {"model": A, "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def refuses_connections(url: str, timeout: float = 3.0) -> float:
    """Wait until the gateway's port refuses new connections; returns when that happened."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection(host, int(port))
        except (ConnectionRefusedError, ConnectionResetError):
            # refused, or reset by a listener being closed: not served either way
            return time.monotonic()
        w.close()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{url} still accepts connections after {timeout}s")


async def exit_code(proc: Any, timeout: float) -> int:
    code: int = await asyncio.wait_for(asyncio.to_thread(proc.wait, timeout + 1), timeout + 2)
    return code


def payloads(body: bytes) -> list[Any]:
    out: list[Any] = []
    for frame in body.split(b"\n\n"):
        if frame.startswith(b"data: "):
            p = frame[6:]
            out.append("[DONE]" if p == b"[DONE]" else json.loads(p))
    return out


async def read_rest(resp: aiohttp.ClientResponse) -> bytes:
    """Everything until the connection ends; a stream cut after its error event has no
    chunked terminator, which aiohttp reports as an incomplete payload."""
    parts: list[bytes] = []
    try:
        while chunk := await resp.content.readany():
            parts.append(chunk)
    except aiohttp.ClientPayloadError:
        pass
    return b"".join(parts)


async def _start_stream(gp: Any) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse, bytes]:
    s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    resp = await s.post(gp.url + CHAT, json=stream_body(), headers=AUTH)
    assert resp.status == 200
    first = await read_until(resp, lambda seen: b"data: " in seen, 5)
    return s, resp, first


@pytest.mark.parametrize("sig", SIGNALS)
async def test_signal_lets_live_stream_finish_then_exits_0(gateway_process: Any, tmp_path: Path,
                                                           fake: FakeMLX, sig: int) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}, extra="gateway: {shutdown_grace: 10}"))
    gp = gateway_process(routes, "--reload-interval", "0")
    fake.push(Behavior(events=15, delay=0.1))  # about 1.5 s of stream
    s, resp, first = await _start_stream(gp)
    try:
        t0 = time.monotonic()
        gp.proc.send_signal(sig)
        await refuses_connections(gp.url)
        assert gp.proc.poll() is None, "exited while a stream was still running"
        rest = await asyncio.wait_for(read_rest(resp), 10)
    finally:
        await s.close()
    data = payloads(first + rest)
    assert data[-1] == "[DONE]"
    assert not any(isinstance(d, dict) and "error" in d for d in data)
    assert len([d for d in data if isinstance(d, dict)]) == 16  # 15 tokens + final chunk
    assert await exit_code(gp.proc, 10) == 0
    assert time.monotonic() - t0 < 10
    assert fake.requests[0].closed_by_peer.is_set() is False  # finished, not cut


@pytest.mark.parametrize("sig", SIGNALS)
async def test_stream_longer_than_grace_gets_error_event_and_exit_0(
        gateway_process: Any, tmp_path: Path, fake: FakeMLX, sig: int) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}, extra="gateway: {shutdown_grace: 1}"))
    gp = gateway_process(routes, "--reload-interval", "0")
    fake.push(Behavior(events=200, delay=0.1))  # 20 s: far past the grace period
    s, resp, first = await _start_stream(gp)
    try:
        t0 = time.monotonic()
        gp.proc.send_signal(sig)
        await refuses_connections(gp.url)
        rest = await asyncio.wait_for(read_rest(resp), 10)
        ended = time.monotonic() - t0
    finally:
        await s.close()
    assert 0.8 <= ended < 2.5, ended  # grace 1 s, plus a little
    data = payloads(first + rest)
    assert "[DONE]" not in data
    last = data[-1]
    assert set(last) == {"error"}, last
    assert last["error"]["code"] == "gateway_shutting_down"
    assert all("choices" in d for d in data[:-1])
    assert await exit_code(gp.proc, 5) == 0
    # the upstream generation was abandoned too, not left running for nobody
    await asyncio.wait_for(fake.requests[0].closed_by_peer.wait(), 2)


async def test_idle_gateway_exits_0_promptly_on_sigterm(gateway_process: Any, tmp_path: Path,
                                                        fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))  # default grace 30 s: not waited for
    gp = gateway_process(routes)
    t0 = time.monotonic()
    gp.proc.send_signal(signal.SIGTERM)
    assert await exit_code(gp.proc, 5) == 0
    assert time.monotonic() - t0 < 3


UNARY = {"model": A, "messages": [{"role": "user", "content": "hi"}]}


async def test_unary_cut_by_the_grace_gets_the_503_and_is_logged_as_one(
        gateway_process: Any, tmp_path: Path, fake: FakeMLX) -> None:
    """A unary request still waiting when the grace runs out is the gateway's doing: the
    client gets the 503 `gateway_shutting_down` envelope before the connection closes, and
    the access log says 503, not the 499 of a client that left."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}, extra="gateway: {shutdown_grace: 1}"))
    gp = gateway_process(routes, "--reload-interval", "0")
    fake.push(Behavior(kind="hang"))
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.post(gp.url + CHAT, json=UNARY, headers=AUTH))
        await fake.wait_requests(1)
        gp.proc.send_signal(signal.SIGTERM)
        resp = await asyncio.wait_for(pending, 10)
        body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "gateway_shutting_down", body
    assert await exit_code(gp.proc, 5) == 0
    access = [ln for ln in gp.output().splitlines() if " POST /v1/chat/completions " in ln]
    assert len(access) == 1 and "status=503" in access[0], access
    assert "outcome=gateway_shutting_down" in access[0]


@pytest.mark.parametrize("server", ["front", "aiohttp"])
async def test_unary_cut_by_the_grace_counts_as_503_in_the_metrics(
        make_gateway: Any, fake: FakeMLX, server: str) -> None:
    """In-process, through `drain` itself: the cut request is answered 503 and counts under
    code 503, not as a client disconnect, whichever server carries it (a chunked request
    body is handed over to aiohttp)."""
    from maclustr.app import METRICS
    from maclustr.cli import drain

    class Listening:  # the site drain stops first: the in-process server's stays open
        async def stop(self) -> None:
            pass

    gw = await make_gateway(routes_yaml({A: fake.url}))
    fake.push(Behavior(kind="hang"))
    if server == "front":
        pending = asyncio.ensure_future(gw.client.post(CHAT, UNARY))
    else:
        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps(UNARY).encode()

        pending = asyncio.ensure_future(gw.client.request(
            "POST", CHAT, data=chunks(), headers={"Content-Type": "application/json"}))
    await fake.wait_requests(1)
    await drain(gw.app, Listening(), 0.2)  # type: ignore[arg-type]
    ans = await asyncio.wait_for(pending, 5)
    assert ans.status == 503 and ans.json()["error"]["code"] == "gateway_shutting_down"
    registry = gw.app[METRICS].registry

    def requests(code: str) -> float:
        return sum(sample.value for metric in registry.collect() for sample in metric.samples
                   if sample.name == "maclustr_requests_total"
                   and sample.labels["code"] == code and sample.labels["model"] == A)

    assert (requests("503"), requests("499")) == (1.0, 0.0)
    assert not registry.get_sample_value("maclustr_client_disconnects_total",
                                         {"model": A, "phase": "upstream"})
