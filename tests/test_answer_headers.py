"""Headers every answer carries whoever serves it (the front or aiohttp): `Server: maclustr`
with no version, and on errors whether a retry can help (`x-should-retry`, read by
Anthropic's and OpenAI's SDKs and by Claude Code before their own guess)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Answer, FakeMLX, Gateway

CHAT = {"model": "maclustr-fast", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "maclustr-fast", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "maclustr-fast", "input": "hi"}


async def every_kind_of_answer(gw: Gateway) -> list[tuple[str, Answer]]:
    c = gw.client
    return [
        ("GET /", await c.get("/", auth=False)),
        ("GET /health", await c.get("/health", auth=False)),
        ("GET /health?deep=true", await c.get("/health?deep=true", auth=False)),
        ("GET /metrics", await c.get("/metrics")),
        ("GET /openapi.json", await c.get("/openapi.json", auth=False)),
        ("GET /v1/models", await c.get("/v1/models")),
        ("GET /nowhere (404)", await c.get("/nowhere", auth=False)),
        ("GET /v1/chat/completions (405)", await c.get("/v1/chat/completions")),
        ("HEAD /health", await c.request("HEAD", "/health", auth=False)),
        ("OPTIONS preflight", await c.request("OPTIONS", "/v1/chat/completions", auth=False)),
        ("POST chat", await c.post("/v1/chat/completions", CHAT)),
        ("POST chat stream", await c.post("/v1/chat/completions", {**CHAT, "stream": True})),
        ("POST chat 401", await c.post("/v1/chat/completions", CHAT, auth=False)),
        ("POST chat chunked (aiohttp)", await c.request(
            "POST", "/v1/chat/completions", data=_chunks(),
            headers={"Content-Type": "application/json"})),
    ]


async def _chunks() -> Any:
    import json
    yield json.dumps(CHAT).encode()


async def test_every_answer_says_server_maclustr_without_a_version(gateway: Gateway) -> None:
    answers = await every_kind_of_answer(gateway)
    wrong = {what: a.headers.get("Server") for what, a in answers
             if a.headers.get("Server") != "maclustr"}
    assert not wrong, wrong
    assert {a.status for _, a in answers} >= {200, 204, 401, 404, 405}


# --- x-should-retry: on every error answer, on every path --------------------------------------

POSTS = {"/v1/chat/completions": CHAT, "/v1/completions": {"model": "maclustr-fast",
                                                           "prompt": "hi"},
         "/v1/messages": MESSAGES, "/v1/messages/count_tokens": MESSAGES,
         "/v1/responses": RESPONSES}


def routes_text(url: str, model_extra: str = "") -> str:
    lines = ["gateway:", "  max_body_bytes: 2000", "models:"]
    for alias in ("maclustr-fast", "maclustr-coder"):
        lines += [f"  {alias}:", f'    model: "/Users/admin/models/internal-{alias}"',
                  f"    upstream: {url}"]
        lines += [f"    {ln}" for ln in model_extra.strip().splitlines()]
    return "\n".join(lines) + "\n"


def assert_no_retry(ans: Answer, status: int) -> None:
    assert ans.status == status, (ans.status, ans.body[:200])
    assert ans.headers.get("x-should-retry") == "false", (status, ans.headers)


def assert_retry_after(ans: Answer, status: int) -> None:
    assert ans.status == status, (ans.status, ans.body[:200])
    assert ans.headers.get("x-should-retry") == "true", (status, ans.headers)
    assert int(ans.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("path", list(POSTS))
async def test_errors_no_retry_can_change_say_so(make_gateway: Any, fake: FakeMLX,
                                                 path: str) -> None:
    """400, 401, 404, 413, 415: the same request gets the same answer, so the SDKs must not
    retry it (Claude Code retried a 401 eleven times over two and a half minutes)."""
    gw = await make_gateway(routes_text(fake.url))
    c, body = gw.client, POSTS[path]
    assert_no_retry(await c.post(path, body, auth=False), 401)
    assert_no_retry(await c.request("POST", path, data=b"{not json",
                                    headers={"Content-Type": "application/json"}), 400)
    assert_no_retry(await c.post(path, {**body, "model": "no-such-model"}), 404)
    assert_no_retry(await c.post(path, {**body, "pad": "x" * 3000}), 413)
    assert_no_retry(await c.request("POST", path, data=b"<a/>",
                                    headers={"Content-Type": "application/xml"}), 415)
    assert_no_retry(await c.get(path), 405)
    assert fake.requests == []


async def test_unknown_path_and_header_errors_say_no_retry(gateway: Gateway) -> None:
    assert_no_retry(await gateway.client.get("/v1/nowhere"), 404)
    assert_no_retry(await gateway.client.get("/v1/models/no-such-model"), 404)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
async def test_overload_and_shutdown_say_retry_after(make_gateway: Any, fake: FakeMLX,
                                                     path: str) -> None:
    """A full queue (429) and a restarting gateway (503): a retry may well succeed, after
    Retry-After."""
    import asyncio

    from fake_mlx import Behavior

    from maclustr.app import SHUTTING_DOWN

    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes_text(fake.url, "max_concurrency: 1\nmax_queue: 0"))
    held = asyncio.create_task(gw.client.post("/v1/chat/completions", CHAT))
    await fake.wait_requests(1)
    assert_retry_after(await gw.client.post(path, POSTS[path]), 429)
    held.cancel()
    gw.app[SHUTTING_DOWN].set()
    assert_retry_after(await gw.client.post(path, POSTS[path]), 503)
    gw.app[SHUTTING_DOWN].clear()


def test_the_error_table_says_which_errors_a_retry_can_change() -> None:
    """One rule, in errors.py, for every status the gateway answers."""
    from maclustr.errors import error_table, retry_headers

    for row in error_table():
        if not row.status.isdigit():
            continue
        status = int(row.status)
        want = {429: "true", 503: "true"}.get(status, "false" if status < 500 else None)
        assert retry_headers(status).get("x-should-retry") == want, row
