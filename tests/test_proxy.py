"""Routing and faithful proxying: the upstream gets the client's body with only `model`
swapped for the internal id, the client gets the upstream's answer with only `model` swapped
for the public alias, and no credential or inside header crosses in either direction."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest import KEY, Gateway, routes_yaml
from fake_mlx import SERVER_HEADER, SYSTEM_FINGERPRINT, Behavior, FakeMLX

CODER_ID = "/Users/admin/models/internal-maclustr-coder-id"
FAST_ID = "/Users/admin/models/internal-maclustr-fast-id"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"

# Every OpenAI sampling/tooling field, plus fields nobody knows about and non-ASCII text.
RICH: dict[str, Any] = {
    "messages": [{"role": "system", "content": "Réponds en français 🇫🇷"},
                 {"role": "user", "content": "naïve café — 日本語 \u2028 \"quoted\" \\ back"}],
    "temperature": 0.37,
    "top_p": 0.91,
    "top_k": 17,
    "stop": ["\n\n", "END"],
    "seed": 424242,
    "max_tokens": 3,
    "presence_penalty": 0.25,
    "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100, "13": 2.5},
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {"type": "json_object"},
    "x_unknown_field": {"nested": [1, 2.5, None, True, "ü"]},
    "num_draft_tokens": 4,
    "x_numbers": [12345678901234567890, 0.30000000000000004, 1e-7, -0.0, 1.5e300, 0],
    "x_lone_surrogate": "\ud83d half an emoji",
    "x_empty": {"a": [], "b": {}, "c": "", "d": None},
    "user": "user-123",
}


def hdr(headers: dict[str, str], name: str) -> str | None:
    """A response header by case-insensitive name (the recorded answers keep wire case)."""
    low = name.lower()
    return next((v for k, v in headers.items() if k.lower() == low), None)


def prompt(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("path", [CHAT, TEXT])
@pytest.mark.parametrize("name", ["maclustr-coder", CODER_ID])
async def test_routes_by_alias_or_internal_id_and_sends_internal_id(
        gateway: Gateway, fake: FakeMLX, path: str, name: str) -> None:
    """Either name reaches the upstream as the internal id (mlx loads whatever it is told)."""
    body = ({"model": name, "messages": [{"role": "user", "content": "hi"}]} if path == CHAT
            else {"model": name, "prompt": "Once upon"})
    ans = await gateway.client.post(path, body)
    assert ans.status == 200, ans.body
    assert len(fake.requests) == 1
    rec = fake.requests[0]
    assert rec.path == path
    assert (rec.json or {})["model"] == CODER_ID
    assert ans.json()["model"] == "maclustr-coder"
    assert ans.json()["object"] == ("chat.completion" if path == CHAT else "text_completion")


@pytest.mark.parametrize("path", [CHAT, TEXT])
async def test_every_other_field_reaches_upstream_unchanged(
        gateway: Gateway, fake: FakeMLX, path: str) -> None:
    """Sampling, tools, formats, unknown fields and unicode pass through as the same JSON."""
    body = {"model": "maclustr-fast", **RICH, "stream": False}
    if path == TEXT:
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "Ünïcode ✓"}
    ans = await gateway.client.post(path, body)
    assert ans.status == 200, ans.body
    sent = fake.requests[0].json
    assert sent == {**body, "model": FAST_ID}
    assert list(sent) == list(body), "key order kept"


async def test_stream_options_reach_upstream_unchanged(gateway: Gateway, fake: FakeMLX) -> None:
    """stream and stream_options are the client's business, forwarded as given."""
    body = {"model": "maclustr-coder", **prompt(), "stream": True,
            "stream_options": {"include_usage": True, "x_extra": "é"}}
    ans = await gateway.client.post(CHAT, body)
    assert ans.status == 200
    assert fake.requests[0].json == {**body, "model": CODER_ID}


@pytest.mark.parametrize("echo", ["default_model", "", "something/else", "maclustr-coder",
                                  FAST_ID])
async def test_unary_model_is_alias_whatever_upstream_echoes(
        gateway: Gateway, fake: FakeMLX, echo: str) -> None:
    """mlx reports its own idea of the model; the client always sees the alias it used."""
    fake.push(Behavior(model_echo=echo))
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()})
    assert ans.status == 200, ans.body
    assert ans.json()["model"] == "maclustr-coder"


async def test_unary_other_response_fields_untouched(gateway: Gateway, fake: FakeMLX) -> None:
    """Only `model` changes: ids, fingerprint, choices, usage, unicode text stay as sent."""
    fake.push(Behavior(text="naïve ☃ \ufffd", events=3, model_echo="default_model"))
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()})
    got = ans.json()
    assert got["id"].startswith("chatcmpl-")
    assert got["system_fingerprint"].startswith("fp_"), "node OS/kernel masked, shape kept"
    assert SYSTEM_FINGERPRINT not in ans.body.decode() and "Linux" not in ans.body.decode()
    assert got["object"] == "chat.completion"
    assert isinstance(got["created"], int)
    assert got["choices"] == [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "naïve ☃ \ufffd" * 3}}]
    assert got["usage"]["completion_tokens"] == 3
    assert list(got) == ["id", "system_fingerprint", "object", "model", "created", "choices",
                         "usage"]


async def test_two_aliases_on_two_upstreams_route_apart(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """Each alias goes to its own server, and only there."""
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake.url, "maclustr-fast": fake2.url}))
    a = await gw.client.post(CHAT, {"model": "maclustr-fast", **prompt()})
    b = await gw.client.post(TEXT, {"model": "maclustr-coder", "prompt": "x"})
    c = await gw.client.post(CHAT, {"model": FAST_ID, **prompt(), "stream": True})
    assert (a.status, b.status, c.status) == (200, 200, 200)
    assert a.json()["model"] == "maclustr-fast"
    assert b.json()["model"] == "maclustr-coder"
    assert [(r.json or {})["model"] for r in fake.requests] == [CODER_ID]
    assert [(r.json or {})["model"] for r in fake2.requests] == [FAST_ID, FAST_ID]


@pytest.mark.parametrize("stream", [False, True])
async def test_client_credentials_never_reach_upstream(
        gateway: Gateway, fake: FakeMLX, stream: bool) -> None:
    """The gateway key, cookies and other client headers are not forwarded."""
    ans = await gateway.client.post(
        CHAT, {"model": "maclustr-coder", **prompt(), "stream": stream},
        headers={"Cookie": "session=s3cr3t", "X-Api-Key": KEY, "Proxy-Authorization": "Basic x",
                 "X-Forwarded-For": "10.0.0.1"})
    assert ans.status == 200
    h = fake.requests[0].headers
    assert "authorization" not in h
    assert "cookie" not in h
    assert "proxy-authorization" not in h
    assert KEY not in repr(h)
    assert "s3cr3t" not in repr(h)


async def test_request_id_on_every_answer_and_sent_upstream(
        gateway: Gateway, fake: FakeMLX) -> None:
    """Successes, streams, errors, models and health all carry x-request-id; the upstream
    sees the same id as the client."""
    answers = [
        await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()}),
        await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt(), "stream": True}),
        await gateway.client.post(CHAT, {"model": "nope", **prompt()}),
        await gateway.client.post(CHAT, {"model": "maclustr-coder"}, auth=False),
        await gateway.client.get("/v1/models"),
        await gateway.client.get("/health"),
        await gateway.client.get("/nowhere"),
    ]
    ids = [hdr(a.headers, "X-Request-Id") for a in answers]
    assert all(ids), list(zip([a.status for a in answers], ids, strict=True))
    assert len(set(ids)) == len(ids), "fresh id per request"
    assert [r.headers.get("x-request-id") for r in fake.requests] == ids[:2]


async def test_sane_client_request_id_is_kept(gateway: Gateway, fake: FakeMLX) -> None:
    """A plain client id lets users correlate their logs with ours and the upstream's."""
    rid = "req-2026.11.25_abc:42@client"
    for stream in (False, True):
        ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt(),
                                               "stream": stream}, headers={"X-Request-Id": rid})
        assert hdr(ans.headers, "X-Request-Id") == rid
    bad = await gateway.client.post(CHAT, {"model": "nope"}, headers={"X-Request-Id": rid})
    assert hdr(bad.headers, "X-Request-Id") == rid
    assert [r.headers["x-request-id"] for r in fake.requests] == [rid, rid]


@pytest.mark.parametrize("rid", ["has spaces in it", "x" * 300, "semi;colon", "<script>",
                                 "ünïcode"])
async def test_insane_client_request_id_is_replaced(
        gateway: Gateway, fake: FakeMLX, rid: str) -> None:
    """Ids that could inject into logs or headers are replaced by a generated one."""
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()},
                                    headers={"X-Request-Id": rid.encode().decode("latin-1")})
    assert ans.status == 200
    got = hdr(ans.headers, "X-Request-Id")
    assert got and got != rid and len(got) <= 128 and " " not in got
    assert fake.requests[0].headers["x-request-id"] == got


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_server_and_cors_headers_do_not_reach_client(
        gateway: Gateway, fake: FakeMLX, stream: bool) -> None:
    """mlx's `Server: BaseHTTP/...` and `Access-Control-Allow-*: *` identify the inside and
    would open CORS; the client sees neither."""
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt(),
                                           "stream": stream}, headers={"Origin": "https://x.io"})
    assert ans.status == 200
    names = {k.lower() for k in ans.headers}
    assert not any(n.startswith("access-control-") for n in names), ans.headers
    assert "BaseHTTP" not in (hdr(ans.headers, "Server") or "")
    assert SERVER_HEADER not in repr(ans.headers)
    assert "Python/" not in repr(ans.headers)


async def test_upstream_error_headers_do_not_reach_client(gateway: Gateway, fake: FakeMLX
                                                          ) -> None:
    """Even when the upstream fails, its headers are not copied onto our error."""
    fake.push(Behavior(kind="error", status=404, error_body=b'{"error": "no such model"}'))
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()})
    assert ans.status == 400  # upstream 404: never our 404 (unknown alias)
    assert not any(k.lower().startswith("access-control-") for k in ans.headers)
    assert "BaseHTTP" not in repr(ans.headers)


async def test_unary_nested_model_keys_left_alone(gateway: Gateway, fake: FakeMLX) -> None:
    """In a close-delimited unary body only the top-level `model` changes."""
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                  "tool_calls": [{"function": {
                                                      "name": "f", "arguments": {
                                                          "model": "default_model"}}}]}}],
            "model": "default_model", "object": "chat.completion", "id": "x"}
    fake.push(Behavior(kind="raw", raw=b"HTTP/1.0 200 OK\r\nContent-type: application/json"
                       b"\r\n\r\n" + json.dumps(body).encode()))
    ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt()})
    assert ans.status == 200, ans.body
    assert ans.json() == {**body, "model": "maclustr-coder"}


async def test_upstream_gets_content_length_and_json(gateway: Gateway, fake: FakeMLX) -> None:
    """mlx_lm.server answers 411 without Content-Length: the gateway always sends one."""
    await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt(), "stream": True})
    h = fake.requests[0].headers
    assert int(h["content-length"]) == len(fake.requests[0].body)
    assert h["content-type"].startswith("application/json")
    assert "transfer-encoding" not in h


async def test_concurrent_requests_to_two_upstreams(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """Interleaved streams and unary calls each get their own alias and upstream."""
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake.url, "maclustr-fast": fake2.url}))
    fake.default = Behavior(events=3, delay=0.02)
    fake2.default = Behavior(events=3, delay=0.02, model_echo="default_model")
    calls = [gw.client.post(CHAT, {"model": alias, **prompt(), "stream": s})
             for _ in range(3) for alias in ("maclustr-coder", "maclustr-fast")
             for s in (False, True)]
    answers = await asyncio.gather(*calls)
    for i, ans in enumerate(answers):
        alias = "maclustr-coder" if i % 4 < 2 else "maclustr-fast"
        assert ans.status == 200
        objs = [ans.json()] if i % 2 == 0 else ans.data()[:-1]
        assert {o["model"] for o in objs} == {alias}
    assert len(fake.requests) == len(fake2.requests) == 6


async def test_an_http10_upstream_gets_each_next_request_on_a_spare(
        gateway: Gateway, fake: FakeMLX) -> None:
    """mlx_lm.server closes every connection: as each answer starts the gateway opens a spare,
    and the next request goes out on it. One open at a time: not one more per request."""
    for _ in range(3):
        ans = await gateway.client.post(CHAT, {"model": "maclustr-coder", **prompt(stream=True)})
        assert ans.status == 200, ans.body
        for _ in range(200):  # bounded: the spare is a connect away
            if fake.open_connections == 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert fake.open_connections == 1
