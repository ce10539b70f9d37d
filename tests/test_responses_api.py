"""POST /v1/responses over HTTP, driven by real clients: the official openai SDK
(`responses.create` with and without stream, the stricter `responses.stream()` helper) and the
real `codex exec` CLI, against the real tiny mlx_lm.server and the fake upstream scripted to
ask for a tool call. Every answer the SDK reads is recorded for the leak check."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from agents import clean_env, require_cli
from conftest import (
    KEY,
    Behavior,
    FakeMLX,
    Gateway,
    RealMLX,
    real_routes,
    routes_yaml,
    sdk_http_client,
)

from maclustr.responses import DEFAULT_MAX_TOKENS

ALIAS = "maclustr-coder"
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
SHELL_TOOL = {"type": "function", "name": "exec_command", "description": "Run a command",
              "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                             "required": ["cmd"]}}
ARGS = {"cmd": "echo hi", "note": "ré ✓"}  # non-ASCII: mlx writes ensure_ascii=False


async def sdk(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0,
                              http_client=sdk_http_client(gw))


def check_lifecycle(types: list[str], seqs: list[int]) -> None:
    assert types[:2] == ["response.created", "response.in_progress"]
    assert sum(t in TERMINAL for t in types) == 1 and types[-1] in TERMINAL
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# --- the real upstream ----------------------------------------------------------------------


@pytest.fixture
async def real_gw(make_gateway: Any, real_mlx: RealMLX) -> Gateway:
    gw: Gateway = await make_gateway(real_routes(real_mlx))
    return gw


@pytest.mark.real_upstream
async def test_sdk_unary_against_real_mlx(real_gw: Gateway) -> None:
    client = await sdk(real_gw)
    async with client:
        r = await client.responses.create(model=ALIAS, instructions="Be brief.", input="Hi",
                                          max_output_tokens=6)
    assert r.model == ALIAS and r.object == "response"
    assert r.status in ("completed", "incomplete")
    assert r.output and r.output[-1].type == "message"
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details is not None
        assert r.incomplete_details.reason == "max_output_tokens"


@pytest.mark.real_upstream
async def test_sdk_stream_against_real_mlx(real_gw: Gateway) -> None:
    client = await sdk(real_gw)
    async with client:
        stream = await client.responses.create(model=ALIAS, input="Hi", max_output_tokens=6,
                                               stream=True)
        events = [e async for e in stream]
    check_lifecycle([e.type for e in events], [e.sequence_number for e in events])
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.model == ALIAS
    assert final.response.usage is not None and final.response.usage.input_tokens > 0
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.response.output[-1].content[0].text == text


@pytest.mark.real_upstream
async def test_sdk_stream_helper_against_real_mlx(real_gw: Gateway) -> None:
    """The helper checks every event against the items it was told about; a random-weight
    model usually runs into the token limit, where the helper has no final response."""
    client = await sdk(real_gw)
    async with client, client.responses.stream(model=ALIAS, input="Hi",
                                       max_output_tokens=6) as stream:
        events = [e async for e in stream]
        check_lifecycle([e.type for e in events], [e.sequence_number for e in events])
        if events[-1].type == "response.completed":
            final = await stream.get_final_response()
            assert final.model == ALIAS
        else:
            assert events[-1].type == "response.incomplete"
            with pytest.raises(RuntimeError):
                await stream.get_final_response()


# --- the fake upstream, scripted ------------------------------------------------------------


def tool_call() -> Behavior:
    return Behavior(events=2, text="Let me run it.",
                    tool_calls=({"name": "exec_command", "arguments": ARGS, "id": "call_42"},))


async def test_sdk_unary_sees_the_exact_function_call(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(tool_call())
    client = await sdk(gateway)
    async with client:
        r = await client.responses.create(model=ALIAS, input="run echo hi", tools=[SHELL_TOOL])
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1
    assert (calls[0].call_id, calls[0].name) == ("call_42", "exec_command")
    assert json.loads(calls[0].arguments) == ARGS
    assert r.status == "completed" and r.model == ALIAS
    up = fake.requests[-1].json
    assert up["tools"][0]["function"]["name"] == "exec_command"
    assert up["stream"] is True  # a unary answer is the upstream's stream, folded


async def test_sdk_stream_helper_sees_the_exact_function_call(gateway: Gateway,
                                                              fake: FakeMLX) -> None:
    fake.push(tool_call())
    client = await sdk(gateway)
    async with client, client.responses.stream(model=ALIAS, input="run echo hi",
                                       tools=[SHELL_TOOL]) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    check_lifecycle([e.type for e in events], [e.sequence_number for e in events])
    types = [e.type for e in events]
    at = types.index("response.function_call_arguments.delta")
    assert types[at - 1] == "response.output_item.added"
    assert types[at + 1:at + 3] == ["response.function_call_arguments.done",
                                    "response.output_item.done"]
    assert events[at - 1].item.arguments == ""
    call = final.output[-1]
    assert call.type == "function_call" and call.call_id == "call_42"
    assert json.loads(call.arguments) == ARGS
    assert final.output_text == "Let me run it." * 2
    assert final.usage is not None and final.usage.output_tokens > 0
    up = fake.requests[-1].json
    assert up["stream_options"] == {"include_usage": True}


async def test_sdk_create_stream_completes_with_usage(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=3, text="ok"))
    client = await sdk(gateway)
    async with client:
        stream = await client.responses.create(model=ALIAS, input="hi", stream=True)
        events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "okokok"
    assert events[-1].response.usage.output_tokens == 3


async def test_token_limit_streams_response_incomplete(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=3, finish_reason="length"))
    ans = await gateway.client.post("/v1/responses", {"model": ALIAS, "input": "hi",
                                                      "stream": True})
    last = ans.data()[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_upstream_death_mid_stream_ends_with_response_failed(gateway: Gateway,
                                                                   fake: FakeMLX) -> None:
    """Codex treats a stream without a terminal event as broken and retries it blindly; a
    dead upstream must say so with response.failed, once, last."""
    fake.push(Behavior(events=5, die_after=2))
    ans = await gateway.client.post("/v1/responses", {"model": ALIAS, "input": "hi",
                                                      "stream": True})
    assert ans.status == 200
    evs = ans.data()
    check_lifecycle([e["type"] for e in evs], [e["sequence_number"] for e in evs])
    assert evs[-1]["type"] == "response.failed"
    err = evs[-1]["response"]["error"]
    assert err["code"] == "upstream_unavailable" and ALIAS in err["message"]
    assert any(e["type"] == "response.output_text.delta" for e in evs)


async def test_previous_response_id_is_a_clear_400(gateway: Gateway, fake: FakeMLX) -> None:
    client = await sdk(gateway)
    async with client:
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=ALIAS, input="hi", previous_response_id="r_1")
    assert e.value.status_code == 400
    assert "previous_response_id" in str(e.value)
    assert not fake.requests


@pytest.mark.parametrize("value", [-1, 0, 1.5, "64", True])
async def test_bad_max_output_tokens_is_a_400_naming_it_and_nothing_goes_upstream(
        gateway: Gateway, fake: FakeMLX, value: Any) -> None:
    """As /v1/messages refuses a bad max_tokens: mlx would take a negative limit as none."""
    ans = await gateway.client.post("/v1/responses", {"model": ALIAS, "input": "hi",
                                                      "max_output_tokens": value})
    assert ans.status == 400, ans.body[:300]
    err = ans.json()["error"]
    assert err["param"] == "max_output_tokens" and "max_output_tokens" in err["message"]
    assert not fake.requests


async def test_unknown_model_and_bad_key_use_openai_envelopes(gateway: Gateway) -> None:
    ans = await gateway.client.post("/v1/responses", {"model": "nope", "input": "hi"})
    assert ans.status == 404 and ans.json()["error"]["code"] == "model_not_found"
    ans = await gateway.client.post("/v1/responses", {"model": ALIAS, "input": "hi"},
                                    auth=False)
    assert ans.status == 401 and ans.json()["error"]["code"] == "invalid_api_key"


# --- the real codex CLI ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def issue_command_line(gw: Gateway, prompt: str) -> list[str]:
    """Issue 11's command line, exactly, pointed at the test gateway."""
    provider = (f'model_providers.maclustr={{name="maclustr",base_url="{gw.url}/v1",'
                'env_key="MACLUSTR_API_KEY",wire_api="responses"}')
    return ["exec", "--skip-git-repo-check", "-m", ALIAS, "-c", "model_provider=maclustr",
            "-c", provider, prompt]


async def run_codex(gw: Gateway, tmp: Path, prompt: str, args: list[str] | None = None,
                    config: str | None = None) -> tuple[int, str, str]:
    """`codex` with `args` (default: the issue's command line), an empty HOME and CODEX_HOME
    (or one holding only `config`), stdin /dev/null and a timeout."""
    codex = require_cli("codex")
    home, codex_home, work = tmp / "home", tmp / "codex-home", tmp / "work"
    for d in (codex_home, work):
        d.mkdir(exist_ok=True)
    if config is not None:
        (codex_home / "config.toml").write_text(config)
    env = clean_env(home, CODEX_HOME=str(codex_home), MACLUSTR_API_KEY=KEY)
    proc = await asyncio.create_subprocess_exec(
        codex, *(args if args is not None else issue_command_line(gw, prompt)),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(work), env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    said = out.decode(errors="replace"), err.decode(errors="replace")
    for secret in gw.secrets:  # what Codex shows its user names nothing internal either
        assert secret not in said[0] + said[1], f"internal {secret!r} reached codex"
    return proc.returncode, *said


@pytest.fixture
async def codex_gw(make_gateway: Any, fake: FakeMLX) -> AsyncIterator[Gateway]:
    gw: Gateway = await make_gateway(routes_yaml({ALIAS: fake.url}))
    yield gw


def upstream_turns(fake: FakeMLX) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path == "/v1/chat/completions"]


async def test_codex_exec_completes_a_turn(codex_gw: Gateway, fake: FakeMLX,
                                           tmp_path: Path) -> None:
    fake.default = Behavior(events=1, text="pong")
    rc, out, err = await run_codex(codex_gw, tmp_path, "say pong")
    assert rc == 0, err[-2000:]
    assert "pong" in out
    turns = upstream_turns(fake)
    assert len(turns) == 1  # no retry: the stream ended with response.completed
    first = turns[0]
    assert first["messages"][0]["role"] == "system"
    assert first["messages"][-1] == {"role": "user", "content": "say pong"}
    assert {t["function"]["name"] for t in first["tools"]} >= {"exec_command"}
    assert first["stream_options"] == {"include_usage": True}
    assert first["max_tokens"] == DEFAULT_MAX_TOKENS  # Codex sends no max_output_tokens


async def test_codex_exec_runs_a_tool_loop(codex_gw: Gateway, fake: FakeMLX,
                                           tmp_path: Path) -> None:
    """The upstream asks for a shell command; Codex runs it, and the second request carries
    its output as a tool message answering the call, and gets text."""
    marker = "maclustr-codex-ok"

    def script(body: Any) -> Behavior:
        done = any(m.get("role") == "tool" for m in body.get("messages", []))
        if done:
            return Behavior(events=1, text="The command printed it.")
        return Behavior(events=1, text="Running.", tool_calls=(
            {"name": "exec_command", "arguments": {"cmd": f"echo {marker}"},
             "id": "call_7"},))

    fake.rule = script
    rc, out, err = await run_codex(codex_gw, tmp_path, "run the echo command")
    assert rc == 0, err[-2000:]
    assert "The command printed it." in out
    turns = upstream_turns(fake)
    assert len(turns) == 2
    second = turns[1]["messages"]
    calls = [c for m in second if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [("call_7", "exec_command")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"cmd": f"echo {marker}"}
    result = [m for m in second if m["role"] == "tool"]
    assert len(result) == 1 and result[0]["tool_call_id"] == "call_7"
    assert marker in result[0]["content"]


async def test_codex_retries_a_failed_stream_and_completes(codex_gw: Gateway, fake: FakeMLX,
                                                           tmp_path: Path) -> None:
    """An upstream that dies mid-answer reaches Codex as response.failed (a retryable
    error to it), and the retry completes the turn."""
    fake.push(Behavior(events=5, die_after=2, text="x"))
    fake.default = Behavior(events=1, text="pong")
    rc, out, err = await run_codex(codex_gw, tmp_path, "say pong")
    assert rc == 0, err[-2000:]
    assert "pong" in out
    assert len(upstream_turns(fake)) == 2


def readme_config_toml(gw: Gateway) -> str:
    """docs/agents.md's config.toml example, its base_url pointed at the test gateway."""
    readme = (ROOT / "docs" / "agents.md").read_text()
    block = next(b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]
                 if "[model_providers.maclustr]" in b)
    assert 'base_url = "http://localhost:9000/v1"' in block
    return block.replace("http://localhost:9000", gw.url)


async def test_codex_with_the_readme_config_toml(codex_gw: Gateway, fake: FakeMLX,
                                                 tmp_path: Path) -> None:
    fake.default = Behavior(events=1, text="pong")
    rc, out, err = await run_codex(codex_gw, tmp_path, "say pong", config=readme_config_toml(
        codex_gw), args=["exec", "--skip-git-repo-check", "say pong"])
    assert rc == 0, err[-2000:]
    assert "pong" in out and len(upstream_turns(fake)) == 1


async def test_codex_reports_the_token_limit_without_retrying(codex_gw: Gateway, fake: FakeMLX,
                                                             tmp_path: Path) -> None:
    """response.incomplete is a failed turn to Codex (exit 1, the reason on stderr), not a
    broken stream: no retry. Why the gateway asks for DEFAULT_MAX_TOKENS when Codex names
    no limit, instead of leaving mlx_lm.server's 512."""
    fake.default = Behavior(events=2, text="partial", finish_reason="length")
    rc, _, err = await run_codex(codex_gw, tmp_path, "say pong")
    assert rc != 0
    assert "Incomplete response returned, reason: max_output_tokens" in err
    assert len(upstream_turns(fake)) == 1
