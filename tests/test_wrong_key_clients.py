"""Real clients with a wrong key stop at once (issue 25, item 12): the gateway's 401 says
`x-should-retry: false`, which Claude Code and the OpenAI and Anthropic SDKs obey before
their own rule (without it, `claude -p` retried a 401 eleven times over two and a half
minutes, printing nothing)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import openai
import pytest
from agents import clean_env, require_cli
from conftest import FakeMLX, Gateway, sdk_http_client

WRONG = "sk-wrong-key-from-the-shell"


def refusals(caplog: pytest.LogCaptureFixture, path: str) -> int:
    """Requests on `path` the gateway answered 401 (its access log, one line each)."""
    return sum(1 for r in caplog.records if r.name == "maclustr.access"
               and f" {path} " in r.getMessage() and "status=401" in r.getMessage())


async def test_claude_code_with_a_wrong_key_stops_at_once(
        gateway: Gateway, fake: FakeMLX, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maclustr.access")
    claude = require_cli("claude")
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(tmp_path / "home", ANTHROPIC_BASE_URL=gateway.url,
                    ANTHROPIC_AUTH_TOKEN=WRONG, ANTHROPIC_MODEL="maclustr-coder",
                    DISABLE_AUTOUPDATER="1", CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                    DISABLE_TELEMETRY="1")
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(claude), "-p", "say pong", cwd=str(work), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"claude still retrying after 60 s "
                             f"({refusals(caplog, '/v1/messages')} refusals)") from None
    took = time.monotonic() - t0
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert proc.returncode != 0, text
    assert "Failed to authenticate. API Error: 401 Invalid or missing API key" in text, text
    assert refusals(caplog, "/v1/messages") == 1, caplog.text[-2000:]
    assert took < 10, f"{took:.1f} s"
    assert fake.requests == []


async def test_openai_sdk_with_a_wrong_key_does_not_retry(
        gateway: Gateway, fake: FakeMLX) -> None:
    async with sdk_http_client(gateway) as http:
        client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=WRONG,
                                    http_client=http, max_retries=2)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="maclustr-fast", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):  # a wrong model: no retry either
            await openai.AsyncOpenAI(
                base_url=gateway.url + "/v1", api_key="test-key-alpha", http_client=http,
                max_retries=2).chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert [a.status for a in gateway.client.answers] == [401, 404]
    assert fake.requests == []
