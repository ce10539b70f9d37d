"""POST /v1/messages and /v1/messages/count_tokens over HTTP, driven by real clients: the
official `anthropic` SDK and the real `claude` CLI (pinned, installed by `make agents`),
against the in-process gateway in front of the fake upstream (scripted tool calls, reasoning,
failures) and in front of the real tiny mlx_lm.server.

Every answer the SDK reads is recorded (conftest.sdk_http_client) for the leak check; the
CLI's output is checked for internal strings too.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anthropic
import pytest
from agents import clean_env, require_cli
from conftest import (
    KEY,
    Behavior,
    FakeMLX,
    Gateway,
    RealMLX,
    real_routes,
    sdk_http_client,
)

BASH_ARGS = {"command": "echo hi && ls -la /tmp", "description": "Say hi, list \u00e9t\u00e9"}


def sdk(gw: Gateway, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                    http_client=sdk_http_client(gw))


def events_of(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per SSE event of an Anthropic stream."""
    out = []
    for frame in body.split(b"\n\n"):
        if not frame.strip():
            continue
        name, data = "", b""
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, json.loads(data)))
    return out


def check_sequence(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Anthropic's grammar: one message_start first, blocks start/delta/stop with increasing
    indexes and never interleaved, message_delta then message_stop last."""
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names.count("message_start") == 1
    assert names[-2:] == ["message_delta", "message_stop"]
    open_index, last = None, -1
    for name, data in events:
        assert data["type"] == name
        if name == "content_block_start":
            assert open_index is None and data["index"] == last + 1
            open_index = last = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None


async def test_create_unary(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=3, text="ok "))
    async with sdk(gateway) as client:
        msg = await client.messages.create(
            model="maclustr-coder", max_tokens=50, system="Be brief.",
            messages=[{"role": "user", "content": "Hi"}])
    assert msg.model == "maclustr-coder"
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "ok ok ok "  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 3 and msg.usage.input_tokens > 0
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"].startswith("/Users/admin/models/")
    assert sent.json["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}]
    assert sent.json["max_tokens"] == 50
    # the upstream streams even for a unary answer (one translation; stop sequences)
    assert sent.json["stream"] is True and sent.json["stream_options"] == {
        "include_usage": True}


async def test_stream_with_sdk_helper(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=4, keepalives=2))
    async with sdk(gateway) as client, client.messages.stream(
            model="maclustr-coder", max_tokens=50,
            messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "The quick\ufffd brown"
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.model == "maclustr-coder" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4
    sent = fake.requests[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    events = events_of(gateway.client.answers[-1].body)
    check_sequence(events)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "ping"]  # keep-alives become pings
    start = events[0][1]["message"]
    assert start["model"] == "maclustr-coder" and start["usage"]["input_tokens"] > 0


async def test_stream_raw_events_and_usage_held_for_message_delta(
        gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=2, text="x"))
    async with sdk(gateway) as client:
        stream = await client.messages.create(
            model="maclustr-fast", max_tokens=50, stream=True,
            messages=[{"role": "user", "content": "Hi"}])
        types = [e.type async for e in stream]
    assert types == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    events = events_of(gateway.client.answers[-1].body)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    # the fake's usage chunk (prompt_tokens = len(json(messages)) // 4) arrives after the
    # finish chunk: message_delta waited for it
    prompt = len(json.dumps(fake.requests[-1].json["messages"])) // 4
    assert delta["usage"]["input_tokens"] == prompt and delta["usage"]["output_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_reaches_sdk_with_exact_arguments(
        gateway: Gateway, fake: FakeMLX, stream: bool) -> None:
    fake.push(Behavior(events=1, text="Let me check.",
                       tool_calls=({"name": "Bash", "arguments": BASH_ARGS, "id": "call_7"},)))
    tools: Any = [{"name": "Bash", "description": "Run a shell command",
                   "input_schema": {"type": "object",
                                    "properties": {"command": {"type": "string"}},
                                    "required": ["command"]},
                   "cache_control": {"type": "ephemeral"}}]
    messages: Any = [{"role": "user", "content": "list /tmp"}]
    async with sdk(gateway) as client:
        if stream:
            async with client.messages.stream(model="maclustr-coder", max_tokens=100,
                                              tools=tools, messages=messages) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model="maclustr-coder", max_tokens=100,
                                               tools=tools, messages=messages)
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    use = msg.content[1]
    assert use.type == "tool_use"
    assert use.name == "Bash" and use.input == BASH_ARGS and use.id == "call_7"
    assert msg.stop_reason == "tool_use"
    sent = fake.requests[-1].json
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "Bash", "parameters": tools[0]["input_schema"],
        "description": "Run a shell command"}}]
    if stream:
        events = events_of(gateway.client.answers[-1].body)
        check_sequence(events)
        deltas = [d["delta"] for n, d in events if n == "content_block_delta"
                  and d["delta"]["type"] == "input_json_delta"]
        assert len(deltas) == 1 and json.loads(deltas[0]["partial_json"]) == BASH_ARGS


async def test_tool_result_round_trip(gateway: Gateway, fake: FakeMLX) -> None:
    """Turn 2 of a tool loop: the assistant's tool_use and the user's tool_result (string and
    blocks) become an assistant tool_calls message and tool messages; thinking is dropped."""
    fake.push(Behavior(events=1, text="done"))
    async with sdk(gateway) as client:
        msg = await client.messages.create(
            model="maclustr-coder", max_tokens=20,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "run it"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                     "input": {"command": "echo hi"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "Bash",
                     "input": {"command": "pwd"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi",
                     "cache_control": {"type": "ephemeral"}},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "no such dir"}]}]},
            ])
    assert msg.content[0].text == "done"  # type: ignore[union-attr]
    sent = fake.requests[-1].json["messages"]
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "Bash", "arguments": '{"command": "echo hi"}'}},
        {"id": "toolu_2", "type": "function",
         "function": {"name": "Bash", "arguments": '{"command": "pwd"}'}}]}
    assert sent[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "hi"},
                        {"role": "tool", "tool_call_id": "toolu_2",
                         "content": "Error: no such dir"}]


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_becomes_thinking_block(gateway: Gateway, fake: FakeMLX,
                                                stream: bool) -> None:
    fake.push(Behavior(events=2, text="42", reasoning=("Let me", " think.")))
    async with sdk(gateway) as client:
        args: Any = {"model": "maclustr-coder", "max_tokens": 50,
                     "thinking": {"type": "adaptive"},
                     "messages": [{"role": "user", "content": "?"}]}
        if stream:
            async with client.messages.stream(**args) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**args)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Let me think."  # type: ignore[union-attr]
    assert msg.content[1].text == "4242"  # type: ignore[union-attr]
    assert "thinking" not in fake.requests[-1].json


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_ends_the_answer_and_the_generation(
        gateway: Gateway, fake: FakeMLX, stream: bool) -> None:
    """mlx_lm.server cannot say which stop sequence matched (it strips it and reports "stop"),
    so the gateway matches them itself and hangs up on the upstream, which stops generating."""
    fake.push(Behavior(events=40, delay=0.02))  # The quick\ufffd brown fox jumps over ...
    args: Any = {"model": "maclustr-coder", "max_tokens": 100,
                 "stop_sequences": ["fox", "k\ufffd b"],
                 "messages": [{"role": "user", "content": "Hi"}]}
    async with sdk(gateway) as client:
        if stream:
            async with client.messages.stream(**args) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**args)
    assert msg.content[0].text == "The quic"  # type: ignore[union-attr]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "k\ufffd b")
    rec = fake.requests[-1]
    assert "stop" not in rec.json
    await asyncio.wait_for(rec.closed_by_peer.wait(), 5)  # long before its 40 tokens


async def test_count_tokens(gateway: Gateway, fake: FakeMLX) -> None:
    async with sdk(gateway) as client:
        short = await client.messages.count_tokens(
            model="maclustr-coder", messages=[{"role": "user", "content": "Hi"}])
        long = await client.messages.count_tokens(
            model="maclustr-coder", system="You are terse. " * 50,
            messages=[{"role": "user", "content": "Hi " * 400}])
    assert 1 <= short.input_tokens < 20
    assert 400 <= long.input_tokens <= 2000  # ~1.6 KB of text, ~4 bytes per token
    assert fake.requests == []  # an estimate: the upstream is not asked


async def test_x_api_key_query_string_and_claude_code_body(gateway: Gateway,
                                                            fake: FakeMLX) -> None:
    """What Claude Code sends: x-api-key, ?beta=true, system blocks with a billing header and
    cache_control, a mid-conversation system message, fields a local model cannot honour."""
    fake.push(Behavior(events=1, text="pong"))
    body = {
        "model": "maclustr-coder", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                   {"type": "text", "text": "You are Claude Code.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "say pong", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Mid-conversation note."},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "{\"device_id\":\"d\"}"},
        "tools": [],
    }
    ans = await gateway.client.post("/v1/messages?beta=true", body, auth=False,
                                    headers={"x-api-key": KEY,
                                             "anthropic-version": "2023-06-01"})
    assert ans.status == 200, ans.body
    assert ans.headers["Content-Type"].startswith("text/event-stream")
    events = events_of(ans.body)
    check_sequence(events)
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["pong"]
    sent = fake.requests[-1].json
    assert sent["messages"] == [
        {"role": "system", "content": "You are Claude Code.\n\nMid-conversation note."},
        {"role": "user", "content": "<system-reminder>ctx</system-reminder>\n\nsay pong"}]
    assert sent["max_tokens"] == 32000
    for ignored in ("thinking", "context_management", "output_config", "metadata", "tools"):
        assert ignored not in sent


async def test_head_root_without_auth(gateway: Gateway) -> None:
    ans = await gateway.client.request("HEAD", "/", auth=False)
    assert ans.status == 200 and ans.body == b""


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401), ({"x-api-key": "wrong"}, 401), ({"Authorization": "Bearer wrong"}, 401),
    ({"x-api-key": KEY}, 200), ({"Authorization": f"Bearer {KEY}"}, 200)])
async def test_auth_on_messages(gateway: Gateway, fake: FakeMLX, headers: dict[str, str],
                                status: int) -> None:
    ans = await gateway.client.post("/v1/messages", {
        "model": "maclustr-coder", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]}, auth=False, headers=headers)
    assert ans.status == status
    if status == 401:
        assert ans.json() == {"type": "error", "error": {
            "type": "authentication_error", "message": ans.json()["error"]["message"]}}
        message = ans.json()["error"]["message"]
        # how to send a key, without the words that make Claude Code print "Not logged in"
        assert "ANTHROPIC_API_KEY" in message and "x-api-key" not in message.lower()


async def test_x_api_key_only_on_messages(gateway: Gateway) -> None:
    ans = await gateway.client.post("/v1/chat/completions", {
        "model": "maclustr-coder", "messages": [{"role": "user", "content": "Hi"}]},
        auth=False, headers={"x-api-key": KEY})
    assert ans.status == 401 and ans.json()["error"]["code"] == "invalid_api_key"


async def test_sdk_error_types(gateway: Gateway, fake: FakeMLX) -> None:
    async with sdk(gateway) as client, sdk(gateway, key="nope") as bad:
        with pytest.raises(anthropic.NotFoundError) as nf:
            await client.messages.create(model="claude-opus-4-8", max_tokens=5,
                                         messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.create(model="maclustr-coder", max_tokens=5,
                                      messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(anthropic.BadRequestError) as br:
            await client.messages.create(model="maclustr-coder", max_tokens=5, messages=[])
    assert nf.value.body == {"type": "error", "error": {
        "type": "not_found_error",
        "message": "Model 'claude-opus-4-8' not found. Available models: maclustr-coder, "
                   "maclustr-fast"}}
    assert br.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert fake.requests == []


@pytest.mark.parametrize(("body", "fragment"), [
    (b"not json", "not valid JSON"),
    (b'{"model": "maclustr-coder"}', "'messages'"),
    (b'{"model": "maclustr-coder", "messages": [{"role": "bot", "content": "x"}]}', "role"),
    (b'{"model": "maclustr-coder", "messages": [{"role": "user", "content": [{"type": '
     b'"image", "source": {}}]}]}', "text only"),
    (b'{"model": "maclustr-coder", "max_tokens": "9", "messages": []}', "messages"),
    (b'{"model": "maclustr-coder", "max_tokens": 0, "messages": [{"role": "user", '
     b'"content": "x"}]}', "max_tokens"),
])
async def test_bad_requests_in_anthropic_shape(gateway: Gateway, fake: FakeMLX, body: bytes,
                                               fragment: str) -> None:
    ans = await gateway.client.request("POST", "/v1/messages", data=body,
                                       headers={"Content-Type": "application/json"})
    assert ans.status == 400
    err = ans.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert fragment in err["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(("behavior", "status", "etype"), [
    (Behavior(kind="error", status=404, error_body=b'{"error": "template failed"}'), 400,
     "invalid_request_error"),
    (Behavior(kind="error", status=429, error_body=b'{"error": "busy"}'), 429,
     "overloaded_error"),
    (Behavior(kind="error", status=500, error_body=b'{"error": "boom"}'), 502, "api_error"),
    (Behavior(kind="drop"), 502, "api_error"),
])
async def test_upstream_errors_in_anthropic_shape(gateway: Gateway, fake: FakeMLX,
                                                  behavior: Behavior, status: int,
                                                  etype: str) -> None:
    fake.push(behavior)
    ans = await gateway.client.post("/v1/messages", {
        "model": "maclustr-coder", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert ans.status == status, ans.body
    assert ans.json()["type"] == "error" and ans.json()["error"]["type"] == etype


async def test_upstream_dies_mid_stream_ends_with_error_event(gateway: Gateway,
                                                              fake: FakeMLX) -> None:
    fake.push(Behavior(events=5, die_after=2))
    ans = await gateway.client.post("/v1/messages", {
        "model": "maclustr-coder", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert ans.status == 200 and not ans.complete
    events = events_of(ans.body)
    assert events[0][0] == "message_start"
    assert events[-1] == ("error", {"type": "error", "error": {
        "type": "api_error", "message": events[-1][1]["error"]["message"]}})
    assert "message_stop" not in [n for n, _ in events]
    async with sdk(gateway) as client:
        fake.push(Behavior(events=5, die_after=2))
        with pytest.raises(anthropic.APIStatusError):
            async with client.messages.stream(
                    model="maclustr-coder", max_tokens=50,
                    messages=[{"role": "user", "content": "Hi"}]) as s:
                async for _ in s:
                    pass


async def test_garbage_stream_ends_with_error_event(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(kind="raw", raw=b"HTTP/1.0 200 OK\r\nContent-type: text/event-stream"
                       b"\r\n\r\ndata: {not json}\n\n"))
    ans = await gateway.client.post("/v1/messages", {
        "model": "maclustr-coder", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "Hi"}]})
    assert ans.status == 200
    assert events_of(ans.body)[-1][0] == "error"


# --- the real `claude` CLI --------------------------------------------------------------------


async def run_claude(gw: Gateway, tmp_path: Path, prompt: str, *args: str,
                     timeout: float = 120, **env_extra: str) -> tuple[int, str, str]:
    """`claude -p` as the issue runs it: base URL + token + model from the environment, an
    empty HOME, no stdin, a time limit."""
    claude = require_cli("claude")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = clean_env(tmp_path / "home", ANTHROPIC_BASE_URL=gw.url, ANTHROPIC_AUTH_TOKEN=KEY,
                    ANTHROPIC_MODEL="maclustr-coder", DISABLE_AUTOUPDATER="1",
                    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_TELEMETRY="1",
                    **env_extra)
    proc = await asyncio.create_subprocess_exec(
        str(claude), "-p", prompt, *args, cwd=str(work), env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    text = out.decode(errors="replace")
    for secret in gw.secrets:
        assert secret not in text
    return proc.returncode, text, err.decode(errors="replace")


async def test_claude_cli_turn(gateway: Gateway, fake: FakeMLX, tmp_path: Path) -> None:
    fake.default = Behavior(events=1, text="pong", keepalives=1)
    rc, out, err = await run_claude(gateway, tmp_path, "say pong")
    assert rc == 0, (out, err)
    assert out.strip() == "pong"
    main = [r for r in fake.requests if r.json and r.json.get("tools")]
    assert main, "no request with Claude Code's tools reached the upstream"
    sent = main[-1].json
    assert sent["model"].startswith("/Users/admin/models/")
    assert sent["messages"][0]["role"] == "system"
    assert [m["role"] for m in sent["messages"]].count("system") == 1
    assert all(isinstance(m["content"], str) for m in sent["messages"])
    assert "Bash" in [t["function"]["name"] for t in sent["tools"]]
    assert sent["stream_options"] == {"include_usage": True}


async def test_claude_cli_tool_loop(gateway: Gateway, fake: FakeMLX, tmp_path: Path) -> None:
    """The fake upstream asks for a shell command; Claude Code runs it and sends the result
    back as a tool_result; the next answer is text."""
    marker = "maclustr-tool-loop-ok"

    def script(body: Any) -> Behavior | None:
        msgs = body.get("messages", []) if isinstance(body, dict) else []
        if not body.get("tools"):
            return Behavior(events=1, text="Tool loop")  # side requests (session title)
        if msgs and msgs[-1]["role"] == "tool":
            return Behavior(events=1, text="The command printed the marker.")
        return Behavior(events=1, text="Running it.", reasoning=("The user wants", " it."),
                        tool_calls=(
            {"name": "Bash", "arguments": {"command": f"echo {marker}",
                                           "description": "Print the marker"},
             "id": "call_loop_1"},))

    fake.rule = script
    rc, out, err = await run_claude(gateway, tmp_path, "run the marker command",
                                    "--allowedTools", "Bash", "--output-format", "json")
    assert rc == 0, (out, err)
    result = json.loads(out)
    assert result["is_error"] is False, result
    assert result["result"] == "The command printed the marker."
    second = [r.json for r in fake.requests
              if r.json and r.json.get("tools") and r.json["messages"][-1]["role"] == "tool"]
    assert second, "no request carried the tool result"
    msgs = second[-1]["messages"]
    assert msgs[-1]["tool_call_id"] == "call_loop_1" and marker in msgs[-1]["content"]
    assert msgs[-2]["content"] == "Running it."  # the thinking block it replays is dropped
    call = msgs[-2]["tool_calls"][0]
    assert call["id"] == "call_loop_1" and json.loads(call["function"]["arguments"]) == {
        "command": f"echo {marker}", "description": "Print the marker"}


# --- the real mlx_lm.server -------------------------------------------------------------------


@pytest.mark.real_upstream
async def test_claude_cli_against_real_mlx(make_gateway: Any, real_mlx: RealMLX,
                                           tmp_path: Path) -> None:
    """Claude Code's whole request (system blocks, 20+ tools, reminders) through the real
    server's prompt preparation; the random-weight model answers noise, so only the exit
    code and the exchange are checked. Output is capped so the tiny model stops soon."""
    gw: Gateway = await make_gateway(real_routes(real_mlx))
    rc, out, err = await run_claude(gw, tmp_path, "say pong", "--output-format", "json",
                                    timeout=240, CLAUDE_CODE_MAX_OUTPUT_TOKENS="8")
    result = json.loads(out)
    # Noise rarely ends on its own within 8 tokens; Claude Code then reports the cap as an
    # error (rc 1) -- which proves it parsed a complete answer that stopped at max_tokens.
    capped = "exceeded the 8 output token maximum" in str(result.get("result"))
    assert (rc, result["is_error"]) in ((0, False), (1, True)), (out[-2000:], err[-2000:])
    assert not result["is_error"] or capped, result
    usage = result["modelUsage"]["maclustr-coder"]  # the real server's counts
    assert usage["inputTokens"] + usage["cacheReadInputTokens"] > 1000


@pytest.mark.real_upstream
async def test_sdk_against_real_mlx(make_gateway: Any, real_mlx: RealMLX) -> None:
    gw: Gateway = await make_gateway(real_routes(real_mlx))
    async with sdk(gw) as client:
        msg = await client.messages.create(
            model="maclustr-coder", max_tokens=4, system=[{"type": "text", "text": "Be short."}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        assert msg.model == "maclustr-coder" and msg.usage.output_tokens > 0
        assert msg.stop_reason in ("max_tokens", "end_turn")
        async with client.messages.stream(
                model="maclustr-fast", max_tokens=4,
                messages=[{"role": "user", "content": "Hi"}]) as s:
            final = await s.get_final_message()
        assert final.model == "maclustr-fast" and final.usage.output_tokens > 0
        assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 0
        count = await client.messages.count_tokens(
            model="maclustr-coder", messages=[{"role": "user", "content": "Hi"}])
        assert count.input_tokens > 0
        check_sequence(events_of(gw.client.answers[-2].body))
        # A tool loop's second turn, as Claude Code sends it: the real server's chat template
        # and message checks (text-only content, JSON tool arguments) accept the translation.
        async with client.messages.stream(
                model="maclustr-coder", max_tokens=4, tools=TOOLS,
                system=[{"type": "text", "text": "You are an agent."}],
                messages=[
                    {"role": "user", "content": [{"type": "text", "text": "run echo hi"}]},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "ok", "signature": "x"},
                        {"type": "text", "text": "Running."},
                        {"type": "tool_use", "id": "toolu_1", "name": "Bash",
                         "input": {"command": "echo hi"}}]},
                    {"role": "system", "content": "Mid-conversation note."},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1",
                         "content": [{"type": "text", "text": "hi"}]},
                        {"type": "text", "text": "go on"}]}]) as s:
            final = await s.get_final_message()
        assert final.usage.output_tokens > 0 and final.stop_reason in (
            "max_tokens", "end_turn", "tool_use")


TOOLS: Any = [{"name": "Bash", "description": "Run a shell command",
               "input_schema": {"type": "object",
                                "properties": {"command": {"type": "string"}},
                                "required": ["command"]}}]


async def test_answers_match_the_openapi_document(gateway: Gateway, fake: FakeMLX) -> None:
    """What /openapi.json documents for /v1/messages* (schemathesis fuzzes it too)."""
    import jsonschema

    doc = (await gateway.client.get("/openapi.json", auth=False)).json()
    schemas = doc["components"]["schemas"]
    assert doc["paths"]["/v1/messages"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    body = {"model": "maclustr-coder", "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}]}
    errors = [await gateway.client.post("/v1/messages", body, auth=False),
              await gateway.client.post("/v1/messages", {**body, "model": "nope"}),
              await gateway.client.post("/v1/messages", {**body, "messages": []}),
              await gateway.client.post("/v1/messages/count_tokens", {**body, "model": "x"})]
    assert [a.status for a in errors] == [401, 404, 400, 404]
    for a in errors:
        jsonschema.validate(a.json(), schemas["AnthropicError"])
    ok = await gateway.client.post("/v1/messages", body)
    assert ok.status == 200
    jsonschema.validate(ok.json(), schemas["Message"])
    count = await gateway.client.post("/v1/messages/count_tokens", body)
    jsonschema.validate(count.json(), schemas["TokenCount"])
