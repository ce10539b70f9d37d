"""Bad input from clients: each gets a well-formed OpenAI envelope with the right status, never
a 500 or a traceback, and the gateway answers the next normal request as before."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, KEY, Answer, FakeMLX, Gateway, routes_yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CHAT = "/v1/chat/completions"
ALIASES = ("maclustr-coder", "maclustr-fast")
GOOD = {"model": "maclustr-fast", "messages": [{"role": "user", "content": "hi"}]}


def assert_envelope(ans: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert ans.status == status, (ans.status, ans.body[:300])
    assert ans.headers["Content-Type"].startswith("application/json")
    assert "x-request-id" in {k.lower() for k in ans.headers}
    err: dict[str, Any] = ans.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and isinstance(err["code"], str)
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


async def assert_serving(gw: Gateway) -> None:
    ans = await gw.client.post(CHAT, GOOD)
    assert ans.status == 200, ans.body[:300]
    assert ans.json()["model"] == "maclustr-fast"


async def send(gw: Gateway, data: bytes | str | None, content_type: str | None = "application/json",
               **kw: Any) -> Any:
    headers = {"Content-Type": content_type} if content_type else {}
    return await gw.client.request("POST", CHAT, data=data, headers=headers, **kw)


@pytest.mark.parametrize("body, code", [
    (b'{"model": "maclustr-fast", "messages": [', "invalid_json"),
    (b"{'model': 'maclustr-fast'}", "invalid_json"),
    (b"", "invalid_json"),
    (b"   \n", "invalid_json"),
    (b"[1, 2, 3]", None),
    (b'"maclustr-fast"', None),
    (b"42", None),
    (b"null", None),
    (b'{"messages": []}', None),
    (b'{"model": 7}', None),
    (b'{"model": ["maclustr-fast"]}', None),
    (b'{"model": null}', None),
    (b'{"model": ""}', None),
    (b'{"model": "   "}', None),
    (b'{"model": "maclustr-fast", "x": "\xff\xfe\xc0"}', None),
    (b"\xff\xfe\x00\x01garbage", None),
], ids=["truncated", "single-quotes", "empty", "blank", "array", "string", "number", "null",
        "model-missing", "model-number", "model-array", "model-null", "model-empty",
        "model-blank", "non-utf8-in-object", "non-utf8-bytes"])
async def test_malformed_body_is_400_envelope(gateway: Gateway, fake: FakeMLX, body: bytes,
                                              code: str | None) -> None:
    err = assert_envelope(await send(gateway, body), 400, code)
    assert err["type"] == "invalid_request_error"
    assert fake.requests == []  # nothing reached the upstream
    await assert_serving(gateway)


async def test_model_not_an_alias_is_404_listing_aliases(gateway: Gateway) -> None:
    err = assert_envelope(await gateway.client.post(CHAT, {"model": "gpt-4", "messages": []}),
                          404, "model_not_found")
    assert all(a in err["message"] for a in ALIASES)
    await assert_serving(gateway)


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=xyz", "application/xml",
                                   "image/png"])
async def test_wrong_content_type_is_415(gateway: Gateway, fake: FakeMLX, ctype: str) -> None:
    assert_envelope(await send(gateway, json.dumps(GOOD), ctype), 415,
                    "unsupported_media_type")
    assert fake.requests == []
    await assert_serving(gateway)


@pytest.fixture
async def small_limit(make_gateway: Any, fake: FakeMLX) -> Gateway:
    gw: Gateway = await make_gateway(routes_yaml(
        {a: fake.url for a in ALIASES}, extra="gateway: {max_body_bytes: 1000}"))
    return gw


def _big_body(size: int) -> bytes:
    body = json.dumps({**GOOD, "pad": "x" * size}).encode()
    assert len(body) > size
    return body


async def test_body_over_limit_with_content_length_is_413(small_limit: Gateway,
                                                          fake: FakeMLX) -> None:
    ans = await send(small_limit, _big_body(5000))
    assert_envelope(ans, 413, "request_too_large")
    assert "1000" in ans.json()["error"]["message"]
    assert fake.requests == []
    ans = await send(small_limit, json.dumps({**GOOD, "pad": "x" * 800}))  # just under
    assert ans.status == 200
    await assert_serving(small_limit)


async def test_body_over_limit_chunked_is_413(small_limit: Gateway, fake: FakeMLX) -> None:
    body = _big_body(5000)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 700):
            yield body[i:i + 700]

    async with aiohttp.ClientSession() as s, s.post(
            small_limit.url + CHAT, data=chunks(),
            headers={**AUTH, "Content-Type": "application/json"}) as r:
        ans = small_limit.client.record(Answer(r.status, dict(r.headers), await r.read()))
    assert_envelope(ans, 413, "request_too_large")
    assert fake.requests == []
    await assert_serving(small_limit)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_path_is_404_envelope(gateway: Gateway, method: str) -> None:
    for path in ("/v1/nope", "/v2/chat/completions", "/nope", "/v1/chat/completions/extra"):
        ans = await gateway.client.request(method, path, json_body=GOOD)
        assert_envelope(ans, 404, "not_found")
    await assert_serving(gateway)


async def test_wrong_method_is_405_envelope(gateway: Gateway) -> None:
    ans = await gateway.client.get(CHAT)
    assert_envelope(ans, 405, "method_not_allowed")
    assert "POST" in ans.headers.get("Allow", "")
    assert_envelope(await gateway.client.request("PUT", CHAT, json_body=GOOD), 405)
    assert_envelope(await gateway.client.request("DELETE", "/v1/models"), 405)
    await assert_serving(gateway)


@pytest.mark.parametrize("value", [
    f"Basic {KEY}", f"Token {KEY}", "Bearer", "Bearer ", f"{KEY}", f"Bearer {KEY} extra",
    f"Bearer {KEY}x", f"Bearer\t{KEY}x", "", "Bearer \u00e9\u00e9",
])
async def test_other_auth_schemes_and_bad_tokens_are_401(gateway: Gateway, fake: FakeMLX,
                                                         value: str) -> None:
    ans = await gateway.client.post(CHAT, GOOD, auth=False, headers={"Authorization": value})
    assert_envelope(ans, 401, "invalid_api_key")
    assert KEY not in ans.body.decode()
    assert fake.requests == []
    await assert_serving(gateway)


@pytest.mark.parametrize("value", [f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}",
                                   f"Bearer {KEY}  "])
async def test_bearer_with_stray_spaces_or_case_is_accepted(gateway: Gateway, value: str) -> None:
    ans = await gateway.client.post(CHAT, GOOD, auth=False, headers={"Authorization": value})
    assert ans.status == 200, ans.body[:300]


async def test_very_long_header_is_handled_without_500(gateway: Gateway) -> None:
    ans = await gateway.client.post(CHAT, GOOD, headers={"X-Long": "a" * 20_000})
    assert ans.status == 200
    # Beyond the server's field limit: a 4xx, never a 500.
    try:
        ans = await gateway.client.post(CHAT, GOOD, headers={"X-Long": "a" * 100_000})
        assert 400 <= ans.status < 500, ans.status
    except aiohttp.ClientError:
        pass  # closing the connection on an oversized head is acceptable too
    await assert_serving(gateway)


# --- fuzz -----------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
_model = st.one_of(st.sampled_from(ALIASES), st.text(max_size=30), _json)
_request = st.fixed_dictionaries(
    {"model": _model},
    optional={"messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), _json),
              "prompt": _json, "stream": _json, "max_tokens": _json, "extra": _json},
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    _request.map(lambda v: json.dumps(v).encode()),
    _request.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)


def _check_fuzz_answer(ans: Any) -> None:
    assert ans.status != 500, ans.body[:300]
    assert "x-request-id" in {k.lower() for k in ans.headers}
    if ans.status == 200:
        ctype = ans.headers["Content-Type"]
        if ctype.startswith("text/event-stream"):
            assert ans.body.startswith((b"data: ", b": "))
        else:
            assert ctype.startswith("application/json")
            assert isinstance(ans.json(), dict)
        return
    assert ans.headers["Content-Type"].startswith("application/json")
    err = ans.json()["error"]
    assert isinstance(err["message"], str) and isinstance(err["code"], str)
    assert "Traceback" not in ans.body.decode("utf-8", "replace")


async def test_fuzzed_bodies_always_get_envelope_or_relay(gateway: Gateway) -> None:
    """A few hundred random bodies; hypothesis runs in a worker thread and posts each request
    onto this loop, where the gateway lives."""
    loop = asyncio.get_running_loop()
    statuses: list[int] = []

    @settings(max_examples=300, deadline=2000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=_bodies)
    def fuzz(body: bytes) -> None:
        fut = asyncio.run_coroutine_threadsafe(send(gateway, body, timeout=10), loop)
        ans = fut.result(timeout=15)
        statuses.append(ans.status)
        _check_fuzz_answer(ans)

    await asyncio.wait_for(asyncio.to_thread(fuzz), 240)
    assert len(statuses) >= 200, len(statuses)
    assert 200 in statuses and 400 in statuses  # both relays and rejections were exercised
    await assert_serving(gateway)


# --- what aiohttp's HTTP parser refuses, answered by `maclustr serve` itself ----------------


async def _raw_exchange(url: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)  # the answer closes the connection
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
     431, "request_header_too_large"),
    (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "request_header_too_large"),
    (b"THIS IS NOT HTTP\r\n\r\n", 400, "malformed_request"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: y\r\n\r\n", 400, "malformed_request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n", 400,
     "malformed_request"),
], ids=["header-over-limit", "request-line-over-limit", "bad-request-line", "bad-header",
        "bad-content-length"])
async def test_parser_refusals_answer_our_envelope_and_server_header(
        gateway_process: Any, fake: FakeMLX, tmp_path: Any, raw: bytes, status: int,
        code: str) -> None:
    """aiohttp answers these before any middleware runs: text/plain, `Server: aiohttp/…`.
    `maclustr serve` answers them like every other error."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}))
    gw = gateway_process(routes)
    got, headers, body = await _raw_exchange(gw.url, raw)
    assert got == status, (got, headers, body[:300])
    assert headers["server"] == "maclustr"
    assert headers["content-type"].startswith("application/json")
    assert headers.get("x-request-id")
    err = json.loads(body)["error"]
    assert (err["code"], err["type"]) == (code, "invalid_request_error")
    assert "aiohttp" not in body.decode() and "Traceback" not in body.decode()
    assert headers["x-should-retry"] == "false"
    ok, _, _ = await _raw_exchange(gw.url, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                             b"Connection: close\r\n\r\n")
    assert ok == 200
    # The log: one warning line with the request id and the reason, no traceback (aiohttp's
    # own handler logged each refusal at ERROR with one: anyone could flood the log).
    log = gw.output()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    mine = [ln for ln in log.splitlines() if headers["x-request-id"] in ln]
    assert len(mine) == 1 and "WARNING" in mine[0] and f"code={code}" in mine[0], mine
    assert "reason=" in mine[0]
