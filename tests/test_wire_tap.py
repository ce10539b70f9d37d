"""The leak check sees what any client reads: the wire tap records what servers write, in the
test process and in gateway processes, unary and streamed, through any client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import wire_tap
from aiohttp import web
from conftest import KEY, WIRE, FakeMLX, free_port, routes_yaml

SECRET = "/Users/admin/models/secret-internal-id"


async def test_in_process_tap_sees_raw_sessions_and_streams(aiohttp_server: Any) -> None:
    async def unary(request: web.Request) -> web.Response:
        return web.json_response({"model": SECRET})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for part in (SECRET[:10], SECRET[10:]):  # split across two chunks on the wire
            await resp.write(part.encode())
            await asyncio.sleep(0.01)
        return resp

    app = web.Application()
    app.router.add_get("/u", unary)
    app.router.add_get("/s", stream)
    server = await aiohttp_server(app)
    WIRE.watch(server.port)
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/u", "/s"):
                async with s.get(f"http://127.0.0.1:{server.port}{path}") as r:
                    await r.read()
        streams = [bytes(b) for b in WIRE.by_port[server.port]]
    finally:
        WIRE.forget(server.port)
    assert len(streams) == 1  # one keep-alive connection
    found = wire_tap.leaks(streams, {SECRET})
    assert len(found) >= 2, found  # the JSON body, and the stream rejoined across chunks


async def test_unwatched_servers_are_not_recorded(aiohttp_server: Any) -> None:
    async def leaky(request: web.Request) -> web.Response:  # e.g. a fake upstream
        return web.Response(text=SECRET)

    app = web.Application()
    app.router.add_get("/", leaky)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/")) as r:
        assert SECRET in await r.text()
    assert server.port not in WIRE.by_port


def test_a_server_process_records_what_curl_reads(tmp_path: Path) -> None:
    wire = tmp_path / "wire"
    port = free_port()
    code = ("from aiohttp import web; app = web.Application(); "
            f"app.router.add_get('/', lambda r: web.Response(text={SECRET!r})); "
            f"web.run_app(app, host='127.0.0.1', port={port}, print=None)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ,
                            **wire_tap.process_env(wire)})
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None
                time.sleep(0.05)
        out = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{port}/"], capture_output=True,
                             timeout=10).stdout
        assert SECRET.encode() in out
    finally:
        proc.terminate()
        proc.wait(10)
    streams = wire_tap.read_file(wire)
    assert len(streams) == 2  # urllib's probe and curl
    assert len(wire_tap.leaks(streams, {SECRET})) >= 2


async def test_gateway_processes_are_tapped(gateway_process: Any, fake: FakeMLX,
                                            tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}))
    gp = gateway_process(routes)
    async with aiohttp.ClientSession() as s, s.get(
            gp.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as r:
        body = await r.read()
    wire = tmp_path / f"gateway-{gp.url.rsplit(':', 1)[1]}.wire"
    recorded = b"".join(wire_tap.read_file(wire))
    assert body in recorded and b"maclustr-fast" in recorded
