"""Security defaults: keys never logged, client credentials and hop-by-hop headers never
forwarded, nothing identifying the inside passed back, a request id on every answer, CORS off
unless configured, loopback bind by default."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, KEY, KEY2, ROOT, Behavior, FakeMLX, Gateway, routes_yaml

from maclustr.auth import fingerprint

CHAT = "/v1/chat/completions"
A = "maclustr-coder"
BODY = {"model": A, "messages": [{"role": "user", "content": "hi"}]}
UPSTREAM_SECRET = "sk-upstream-very-secret-0042"


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def with_key_env(upstreams: dict[str, str], env: str, extra: str = "") -> str:
    """routes_yaml with `api_key_env: env` on every model."""
    out = []
    for line in routes_yaml(upstreams, extra=extra).splitlines():
        out.append(line)
        if line.startswith("    upstream:"):
            out.append(f"    api_key_env: {env}")
    return "\n".join(out) + "\n"


# --- keys -----------------------------------------------------------------------------------


async def test_keys_never_logged_only_fingerprints(gateway_process: Any, tmp_path: Path,
                                                   fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(with_key_env({A: fake.url}, "MACLUSTR_TEST_UPSTREAM_KEY"))
    gp = gateway_process(routes, "--log-level", "debug",
                         env={"MACLUSTR_TEST_UPSTREAM_KEY": UPSTREAM_SECRET})
    wrong = "sk-wrong-but-secret-9999"
    async with aiohttp.ClientSession() as s:
        for auth in (KEY, KEY2, wrong):
            async with s.post(gp.url + CHAT, json=BODY,
                              headers={"Authorization": f"Bearer {auth}"}) as r:
                await r.read()
                assert r.status == (401 if auth == wrong else 200)
        async with s.post(gp.url + CHAT, json={**BODY, "stream": True}, headers=AUTH) as r:
            await r.read()
    assert fake.requests[0].headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    gp.proc.terminate()
    await asyncio.to_thread(gp.proc.wait, 10)
    log = gp.output()
    for secret in (KEY, KEY2, wrong, UPSTREAM_SECRET):
        assert secret not in log, f"{secret} in log"
    assert fingerprint(KEY) in log and fingerprint(KEY2) in log


async def test_client_authorization_and_cookies_not_forwarded(gateway: Gateway,
                                                              fake: FakeMLX) -> None:
    ans = await gateway.client.post(CHAT, BODY, headers={"Cookie": "session=abc123",
                                                         "Proxy-Authorization": "Basic eA=="})
    assert ans.status == 200
    h = fake.requests[0].headers
    assert "authorization" not in h
    assert "cookie" not in h
    assert "proxy-authorization" not in h
    assert KEY not in fake.requests[0].body.decode()


async def test_api_key_env_sent_upstream_as_bearer(make_gateway: Any, fake: FakeMLX,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MACLUSTR_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    gw: Gateway = await make_gateway(with_key_env({A: fake.url}, "MACLUSTR_TEST_UPSTREAM_KEY"))
    for stream in (False, True):
        ans = await gw.client.post(CHAT, {**BODY, "stream": stream})
        assert ans.status == 200
        assert UPSTREAM_SECRET.encode() not in ans.body
    for rec in fake.requests:
        assert rec.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"


async def test_upstream_error_never_echoes_the_upstream_key(make_gateway: Any, fake: FakeMLX,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """OpenAI-compatible servers answer 401 'Incorrect API key provided: <key>'."""
    monkeypatch.setenv("MACLUSTR_TEST_UPSTREAM_KEY", UPSTREAM_SECRET)
    gw: Gateway = await make_gateway(with_key_env({A: fake.url}, "MACLUSTR_TEST_UPSTREAM_KEY"))
    fake.push(Behavior(kind="error", status=401,
                       error_body=f'{{"error": "bad key {UPSTREAM_SECRET}"}}'.encode()))
    ans = await gw.client.post(CHAT, BODY)
    assert ans.status == 502, ans.body  # the upstream refusing *our* key is not the client's 4xx
    assert UPSTREAM_SECRET.encode() not in ans.body


# --- headers --------------------------------------------------------------------------------


async def _raw_request(url: str, head_lines: list[str], body: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    r, w = await asyncio.open_connection(host, int(port))
    try:
        head = "\r\n".join([f"POST {CHAT} HTTP/1.1", f"Host: {host}:{port}", *head_lines,
                            f"Content-Length: {len(body)}", "", ""])
        w.write(head.encode() + body)
        await w.drain()
        return await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    finally:
        w.close()


async def test_hop_by_hop_headers_not_forwarded_upstream(gateway: Gateway,
                                                         fake: FakeMLX) -> None:
    import json

    head = await _raw_request(gateway.url, [
        f"Authorization: Bearer {KEY}", "Content-Type: application/json",
        "Connection: X-Foo, Keep-Alive", "X-Foo: bar", "Keep-Alive: timeout=5",
        "TE: trailers", "Upgrade: h2c", "Trailer: X-Bar", "Proxy-Connection: keep-alive",
        "X-Internal-Debug: 1",
    ], json.dumps(BODY).encode())
    assert head.startswith(b"HTTP/1.1 200"), head
    h = fake.requests[0].headers
    for name in ("x-foo", "keep-alive", "te", "upgrade", "trailer", "proxy-connection",
                 "x-internal-debug"):
        assert name not in h, (name, h)
    assert h.get("connection", "close").lower() in ("close", "keep-alive")


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_identifying_headers_not_passed_to_clients(gateway: Gateway,
                                                                  fake: FakeMLX,
                                                                  stream: bool) -> None:
    ans = await gateway.client.post(CHAT, {**BODY, "stream": stream})
    assert ans.status == 200
    h = lower(ans.headers)
    assert h.get("server", "maclustr") == "maclustr"
    assert not [k for k in h if k.startswith("access-control-")]
    assert "BaseHTTP" not in str(ans.headers) and "Python/" not in str(ans.headers)
    assert b"0.32.2-0.32.4-Linux" not in ans.body  # mlx's system_fingerprint


async def test_upstream_error_headers_not_passed_either(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(kind="error", status=404, error_body=b'{"error": "nope"}'))
    ans = await gateway.client.post(CHAT, BODY)
    assert ans.status == 400
    h = lower(ans.headers)
    assert h.get("server", "maclustr") == "maclustr"
    assert not [k for k in h if k.startswith("access-control-")]


# --- request ids ----------------------------------------------------------------------------


async def test_every_answer_has_request_id(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(kind="reset"))
    answers = [
        await gateway.client.post(CHAT, BODY),
        await gateway.client.post(CHAT, {**BODY, "stream": True}),
        await gateway.client.post(CHAT, BODY, auth=False),
        await gateway.client.post(CHAT, {"model": "nope"}),
        await gateway.client.request("POST", CHAT, data=b"{bad"),
        await gateway.client.get("/v1/models"),
        await gateway.client.get("/health"),
        await gateway.client.get("/no/such/path"),
        await gateway.client.request("OPTIONS", CHAT),
    ]
    # the reset was consumed by the first request: it is a 502
    assert answers[0].status == 502
    ids = [lower(a.headers).get("x-request-id") for a in answers]
    assert all(ids), list(zip([a.status for a in answers], ids, strict=True))
    assert len(set(ids)) == len(ids)


async def test_client_request_id_echoed_sent_upstream_and_logged(
        gateway: Gateway, fake: FakeMLX, caplog: pytest.LogCaptureFixture) -> None:
    rid = "client-req-42.abc"
    with caplog.at_level(logging.INFO, logger="maclustr"):
        ans = await gateway.client.post(CHAT, BODY, headers={"X-Request-Id": rid})
    assert lower(ans.headers)["x-request-id"] == rid
    assert fake.requests[0].headers["x-request-id"] == rid
    assert any(rid in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 300, "semi;colon", "<script>"])
async def test_insane_request_id_replaced(gateway: Gateway, fake: FakeMLX, bad: str) -> None:
    ans = await gateway.client.post(CHAT, BODY, headers={"X-Request-Id": bad})
    got = lower(ans.headers)["x-request-id"]
    assert got != bad and got
    assert fake.requests[0].headers["x-request-id"] == got


# --- CORS -----------------------------------------------------------------------------------


async def test_cors_off_by_default(gateway: Gateway) -> None:
    origin = {"Origin": "https://evil.example"}
    for ans in (await gateway.client.post(CHAT, BODY, headers=origin),
                await gateway.client.request("OPTIONS", CHAT, auth=False, headers={
                    **origin, "Access-Control-Request-Method": "POST"}),
                await gateway.client.get("/v1/models", headers=origin)):
        assert "access-control-allow-origin" not in lower(ans.headers)


async def test_cors_on_for_configured_origins_only(make_gateway: Any, fake: FakeMLX) -> None:
    gw: Gateway = await make_gateway(routes_yaml(
        {A: fake.url}, extra='gateway: {cors_origins: ["https://app.example"]}'))
    ok = {"Origin": "https://app.example"}
    ans = await gw.client.post(CHAT, BODY, headers=ok)
    assert lower(ans.headers)["access-control-allow-origin"] == "https://app.example"
    pre = await gw.client.request("OPTIONS", CHAT, auth=False, headers={
        **ok, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status == 204, pre.body
    h = lower(pre.headers)
    assert h["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in h["access-control-allow-headers"].lower()
    other = await gw.client.post(CHAT, BODY, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in lower(other.headers)


async def test_cors_on_every_answer_unary_and_stream_success_and_error(
        make_gateway: Any, fake: FakeMLX) -> None:
    """The stream relay prepares its own response: CORS must be on it too, or a browser on
    an allowed origin cannot read any `stream: true` answer (success or in-band error)."""
    gw: Gateway = await make_gateway(routes_yaml(
        {A: fake.url}, extra='gateway: {cors_origins: ["https://app.example"]}'))
    ok = {"Origin": "https://app.example"}
    fake.push(Behavior(), Behavior(), Behavior(die_after=2), Behavior(kind="error", status=500))
    answers = {
        "unary": await gw.client.post(CHAT, BODY, headers=ok),
        "stream": await gw.client.post(CHAT, {**BODY, "stream": True}, headers=ok),
        "stream cut short": await gw.client.post(CHAT, {**BODY, "stream": True}, headers=ok),
        "upstream error": await gw.client.post(CHAT, {**BODY, "stream": True}, headers=ok),
        "bad key": await gw.client.post(CHAT, BODY, headers=ok, auth=False),
        "unknown model": await gw.client.post(CHAT, {**BODY, "model": "nope"}, headers=ok),
    }
    assert [a.status for a in answers.values()] == [200, 200, 200, 502, 401, 404]
    assert answers["stream"].data()[-1] == "[DONE]"
    assert "error" in answers["stream cut short"].data()[-1]
    for what, ans in answers.items():
        h = lower(ans.headers)
        assert h.get("access-control-allow-origin") == "https://app.example", what
        assert h.get("access-control-expose-headers") == "X-Request-Id", what
        assert h.get("x-request-id"), what


# --- bind -----------------------------------------------------------------------------------


def _listening_addresses(port: int) -> set[str]:
    out: set[str] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":  # LISTEN
                out.add(addr)
    return out


async def test_default_bind_is_loopback(gateway_process: Any, tmp_path: Path,
                                        fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))
    gp = gateway_process(routes)
    port = int(gp.url.rsplit(":", 1)[1])
    addrs = _listening_addresses(port)
    assert addrs == {"0100007F"}, addrs  # 127.0.0.1, little-endian hex; nothing else
    help_text = subprocess.run([sys.executable, "-m", "maclustr", "serve", "--help"],
                               capture_output=True, text=True, cwd=str(ROOT), timeout=30).stdout
    assert "127.0.0.1" in help_text
