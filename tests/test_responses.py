"""The Responses dialect's pure translation (maclustr/responses.py): requests as Codex and the
openai SDK send them, answers as mlx_lm.server sends them, event streams cut anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr.dialect import ChatEventRewriter
from maclustr.errors import BadRequest, UpstreamFailed
from maclustr.responses import (
    DEFAULT_MAX_TOKENS,
    ResponsesStream,
    collect,
    to_chat,
)

INTERNAL = "/Users/admin/models/internal-coder"
ALIAS = "maclustr-coder"

# --- requests --------------------------------------------------------------------------------

# Turn 2 of a Codex tool loop, shaped as agent-clients.md recorded it (trimmed).
CODEX_TURN_2 = {
    "model": ALIAS, "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"}, "store": False,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "abc",
    "client_metadata": {"x": "y"},
    "input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text",
                      "text": "<environment_context>cwd</environment_context>"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "run echo hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Running it."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
         "arguments": "{\"cmd\": \"echo hi\"}", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1",
         "output": "Process exited with code 0\nOutput:\nhi\n"},
    ],
    "tools": [
        {"type": "function", "name": "exec_command", "description": "Run a command",
         "strict": False, "parameters": {"type": "object",
                                         "properties": {"cmd": {"type": "string"}}}},
        {"type": "namespace", "name": "multi_agent_v1",
         "tools": [{"type": "function", "name": "spawn_agent", "parameters": {}}]},
        {"type": "web_search", "external_web_access": False},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar"}},
    ],
}

CODEX_TURN_2_CHAT = {
    "model": INTERNAL,
    "messages": [
        {"role": "system", "content": "You are Codex.\n\nSandbox: read-only."},
        {"role": "user", "content": "<environment_context>cwd</environment_context>"},
        {"role": "user", "content": "run echo hi"},
        {"role": "assistant", "content": "Running it.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "exec_command",
                                      "arguments": "{\"cmd\": \"echo hi\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": "Process exited with code 0\nOutput:\nhi\n"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "exec_command", "description": "Run a command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}],
    "max_tokens": DEFAULT_MAX_TOKENS,  # Codex sends none: not mlx's 512 (responses.py says why)
    "stream": True, "stream_options": {"include_usage": True},
}


def test_codex_turn_with_tool_result_becomes_one_chat_request() -> None:
    assert to_chat(CODEX_TURN_2, INTERNAL) == CODEX_TURN_2_CHAT


def test_sdk_request_with_instructions_and_string_input() -> None:
    req = {"model": ALIAS, "instructions": "Be brief.", "input": "say pong",
           "max_output_tokens": 16, "temperature": 0.2, "top_p": 0.9, "text": {"verbosity": "low"}}
    assert to_chat(req, INTERNAL) == {
        "model": INTERNAL,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "say pong"}],
        "max_tokens": 16, "temperature": 0.2, "top_p": 0.9,
        "stream": True, "stream_options": {"include_usage": True}}


def test_easy_messages_and_a_late_developer_message_fold_into_the_leading_system() -> None:
    req = {"model": ALIAS, "instructions": "A.", "input": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "developer", "content": "B."},
        {"role": "user", "content": [{"type": "input_text", "text": "x"},
                                     {"type": "input_text", "text": "y"}]}]}
    assert to_chat(req, INTERNAL)["messages"] == [
        {"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "xy"}]


def test_parallel_calls_of_one_turn_share_one_assistant_message() -> None:
    req = {"model": ALIAS, "input": [
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "a", "output": "A"},
        {"type": "function_call_output", "call_id": "b",
         "output": [{"type": "input_text", "text": "B"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": ""},
        {"type": "function_call_output", "call_id": "c", "output": "C"}]}
    msgs = to_chat(req, INTERNAL)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool", "assistant", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["a", "b"]
    assert msgs[3]["content"] == "B"
    assert msgs[4]["tool_calls"][0]["function"]["arguments"] == "{}"  # mlx json.loads it


def test_tool_choice_none_sends_no_tools_and_other_choices_are_ignored() -> None:
    req = {"model": ALIAS, "input": "hi", "tools": [CODEX_TURN_2["tools"][0]]}
    assert "tools" not in to_chat({**req, "tool_choice": "none"}, INTERNAL)
    for choice in ("auto", "required", {"type": "function", "name": "exec_command"}):
        assert to_chat({**req, "tool_choice": choice}, INTERNAL)["tools"] == \
            CODEX_TURN_2_CHAT["tools"]


@pytest.mark.parametrize(("req", "param"), [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input[0]"),
    ({"input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 1.5}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "hi", "instructions": ["x"]}, "instructions"),
])
def test_what_cannot_be_translated_is_a_clear_400(req: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        to_chat({"model": ALIAS, **req}, INTERNAL)
    assert e.value.status == 400 and e.value.param == param
    assert json.loads(e.value.to_body())["error"]["param"] == param


# --- unary answers ---------------------------------------------------------------------------

# A unary answer is the stream's events folded (`collect`), as mlx_lm.server 0.32 streams a
# tool call (agent-clients.md section 4): reasoning, text, the whole call, then usage.
UNARY_CHUNKS = [
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
     "model": INTERNAL, "system_fingerprint": "0.32.2-Linux",
     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    for delta, finish in (
        ({"role": "assistant", "reasoning": "The user wants echo."}, None),
        ({"content": "Let me run it."}, None),
        ({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                          "function": {"name": "exec_command",
                                       "arguments": "{\"cmd\": \"echo hi\"}"}}]},
         "tool_calls"))] + [
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
     "model": INTERNAL, "choices": [],
     "usage": {"prompt_tokens": 19, "completion_tokens": 5, "total_tokens": 24,
               "prompt_tokens_details": {"cached_tokens": 3}}}]


def folded(chunks: list[dict[str, Any]], rid: str = "resp_x") -> dict[str, Any]:
    """What the relay answers a unary request with: the whole stream's events, collected."""
    rw = ChatEventRewriter(ResponsesStream(ALIAS, rid=rid, created=1700000000))
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return collect(rw.feed(raw + b"data: [DONE]\n\n"))


def test_unary_answer_becomes_a_response_object_with_alias_and_usage() -> None:
    r = folded(UNARY_CHUNKS)
    assert r["id"] == "resp_x" and r["object"] == "response" and r["model"] == ALIAS
    assert r["status"] == "completed" and r["created_at"] == 1700000000
    assert [o["type"] for o in r["output"]] == ["reasoning", "message", "function_call"]
    assert r["output"][0]["content"] == [{"type": "reasoning_text",
                                          "text": "The user wants echo."}]
    assert r["output"][1]["content"][0]["text"] == "Let me run it."
    call = r["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_9", "exec_command", "{\"cmd\": \"echo hi\"}")
    assert r["usage"] == {"input_tokens": 19, "input_tokens_details": {"cached_tokens": 3},
                          "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": 24}
    assert INTERNAL not in json.dumps(r) and "0.32.2" not in json.dumps(r)


def test_unary_cut_by_the_token_limit_is_incomplete() -> None:
    cut = [{**UNARY_CHUNKS[1], "choices": [{"index": 0, "delta": {"content": "abc"},
                                            "finish_reason": "length"}]}]
    r = folded(cut)
    assert r["status"] == "incomplete"
    assert r["incomplete_details"] == {"reason": "max_output_tokens"}


def test_unary_of_a_stream_that_never_completed_is_refused() -> None:
    """The relay maps this ValueError to a 502: a failed or empty stream is no answer."""
    with pytest.raises(ValueError):
        collect(b"")
    rw = ChatEventRewriter(ResponsesStream(ALIAS))
    with pytest.raises(ValueError):
        collect(rw.feed(b"data: " + json.dumps(UNARY_CHUNKS[1]).encode() + b"\n\n")
                + rw.fail(UpstreamFailed(ALIAS)))


# --- streams ---------------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": INTERNAL,
            "system_fingerprint": "0.32.2-Linux",
            "choices": [{"index": 0, "delta": {"role": "assistant", **delta},
                         "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": INTERNAL,
         "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11,
                                  "prompt_tokens_details": {"cached_tokens": 0}}}

# mlx's order: keepalive comments, reasoning, text (ending with a finish-carrying chunk that
# also carries the whole tool call), the usage chunk, [DONE].
TOOL_STREAM = [chunk({"reasoning": "think "}), chunk({"reasoning": "more"}),
               chunk({"content": "Sure"}), chunk({"content": ", ré"}),
               chunk({"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                                      "function": {"name": "exec_command",
                                                   "arguments": "{\"cmd\": \"echo hi\"}"}}]},
                     "tool_calls"),
               USAGE]


def sse(chunks: list[dict[str, Any]], done: bool = True) -> bytes:
    out = b": keepalive 0/2\n\n: keepalive 2/2\n\n"
    out += b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def events(raw: bytes) -> list[dict[str, Any]]:
    """The data objects of a Responses event stream, checking each `event:` names its type."""
    out = []
    for frame in raw.split(b"\n\n"):
        if not frame or frame.startswith(b":"):
            continue
        name, data = frame.split(b"\n")
        obj = json.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + obj["type"].encode()
        out.append(obj)
    return out


def run(raw: bytes, cuts: list[int] | None = None) -> bytes:
    rw = ChatEventRewriter(ResponsesStream(ALIAS, rid="resp_fixed", created=1))
    bounds = [0, *(cuts or []), len(raw)]
    return b"".join(rw.feed(raw[a:b]) for a, b in itertools.pairwise(bounds))


def test_stream_emits_the_full_lifecycle_for_reasoning_text_and_a_tool_call() -> None:
    evs = events(run(sse(TOOL_STREAM)))
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    added = evs[16]["item"]
    assert added["type"] == "function_call" and added["arguments"] == ""
    assert evs[17]["delta"] == evs[18]["arguments"] == "{\"cmd\": \"echo hi\"}"
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["model"] == ALIAS
    assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][1]["content"][0]["text"] == "Sure, ré"
    assert final["output"][2] == evs[19]["item"]
    assert final["output"][2]["call_id"] == "call_7"
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["total_tokens"] == 11
    assert [e["output_index"] for e in evs if e["type"] == "response.output_item.done"] == [0, 1, 2]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_both_reasoning_field_names_become_reasoning_output(field: str) -> None:
    """mlx says `delta.reasoning`, vLLM and others `delta.reasoning_content`: both are the
    model's reasoning (as /v1/messages makes both thinking), streamed and unary."""
    chunks = [chunk({field: "think "}), chunk({field: "more"}), chunk({"content": "ok"}, "stop")]
    evs = events(run(sse(chunks)))
    assert [e["delta"] for e in evs if e["type"] == "response.reasoning_text.delta"] == [
        "think ", "more"]
    r = folded(chunks)
    assert [o["type"] for o in r["output"]] == ["reasoning", "message"]
    assert r["output"][0]["content"] == [{"type": "reasoning_text", "text": "think more"}]


def test_stream_cut_at_every_byte_gives_the_same_events() -> None:
    raw = sse(TOOL_STREAM)
    whole = run(raw)
    assert whole
    for i in range(len(raw) + 1):
        assert run(raw, [i]) == whole, f"cut at {i}"
    assert run(raw, list(range(1, len(raw)))) == whole  # one byte per read


def test_completed_waits_for_the_usage_chunk() -> None:
    s = ResponsesStream(ALIAS)
    out = b"".join(s.feed(chunk({"content": "a"}, "stop")))
    assert b"response.completed" not in out
    out += b"".join(s.feed(USAGE))
    assert b"response.completed" not in out
    final = events(out + b"".join(s.finish()))[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["usage"]["output_tokens"] == 4
    assert s.usage == USAGE["usage"]


def test_token_limit_ends_with_response_incomplete() -> None:
    evs = events(run(sse([chunk({"content": "a"}), chunk({"content": "b"}, "length"), USAGE])))
    assert evs[-1]["type"] == "response.incomplete"
    assert evs[-1]["response"]["status"] == "incomplete"
    assert evs[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert sum(e["type"].startswith("response.completed") for e in evs) == 0


def test_upstream_death_mid_stream_ends_with_exactly_one_response_failed() -> None:
    s = ResponsesStream(ALIAS)
    rw = ChatEventRewriter(s)
    out = rw.feed(sse([chunk({"content": "par"})], done=False))
    out += b"".join(s.fail(UpstreamFailed(ALIAS, "stopped in the middle of the response")))
    out += b"".join(s.finish()) + b"".join(s.fail(UpstreamFailed(ALIAS)))
    evs = events(out)
    terminal = [e for e in evs if e["type"] in ("response.completed", "response.failed",
                                                "response.incomplete")]
    assert [e["type"] for e in terminal] == ["response.failed"]
    assert evs[-1] is terminal[0]
    failed = terminal[0]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "upstream_unavailable"
    assert ALIAS in failed["error"]["message"]


def test_failure_before_any_chunk_still_starts_the_response() -> None:
    s = ResponsesStream(ALIAS)
    evs = events(b"".join(s.fail(UpstreamFailed(ALIAS))))
    assert [e["type"] for e in evs] == ["response.created", "response.in_progress",
                                        "response.failed"]


def test_fragmented_openai_style_tool_calls_are_one_item_each() -> None:
    frags = [chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "f",
                                                                         "arguments": ""}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
             chunk({"tool_calls": [{"index": 1, "id": "c1", "function": {"name": "g",
                                                                         "arguments": "{}"}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                   "tool_calls"), USAGE]
    final = events(run(sse(frags)))[-1]["response"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in final["output"]] == [
        ("c0", "f", "{\"a\": 1}"), ("c1", "g", "{}")]


def test_keepalive_is_an_sse_comment_and_nothing_internal_is_echoed() -> None:
    raw = run(sse(TOOL_STREAM))
    assert b": keepalive" in raw
    assert INTERNAL.encode() not in raw and b"0.32.2" not in raw


# --- property: nothing the upstream can express is lost --------------------------------------

_text = st.text(min_size=1, max_size=12)
_ident = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
_params = st.dictionaries(_ident, st.dictionaries(st.just("type"), st.just("string")),
                          max_size=2).map(lambda p: {"type": "object", "properties": p})


@st.composite
def _turn(draw: st.DrawFn, n: int) -> list[dict[str, Any]]:
    """One turn: a user or developer message, then maybe assistant text and calls + outputs."""
    role = draw(st.sampled_from(["user", "user", "developer", "system"]))
    content: Any = draw(st.one_of(_text, st.lists(_text.map(
        lambda t: {"type": "input_text", "text": t}), min_size=1, max_size=3)))
    items: list[dict[str, Any]] = [{"type": "message", "role": role, "content": content}]
    if draw(st.booleans()):
        items.append({"type": "message", "role": "assistant",
                      "content": [{"type": "output_text", "text": draw(_text)}]})
    calls = [f"call_{n}_{i}" for i in range(draw(st.integers(0, 2)))]
    for c in calls:
        items.append({"type": "function_call", "call_id": c, "name": draw(_ident),
                      "arguments": json.dumps({"v": draw(_text)})})
    for c in calls:
        items.append({"type": "function_call_output", "call_id": c, "output": draw(_text)})
    return items


@st.composite
def _request(draw: st.DrawFn) -> dict[str, Any]:
    turns = draw(st.lists(st.integers(0, 99), min_size=1, max_size=4))
    req: dict[str, Any] = {"model": ALIAS,
                           "input": [i for n, _ in enumerate(turns) for i in draw(_turn(n))]}
    tools = draw(st.lists(st.one_of(
        st.builds(lambda n, d, p: {"type": "function", "name": n, "description": d,
                                   "parameters": p}, _ident, _text, _params),
        st.just({"type": "web_search"}),
        st.builds(lambda n: {"type": "namespace", "name": n, "tools": []}, _ident)),
        max_size=4))
    if tools:
        req["tools"] = tools
    for key, strat in (("instructions", _text), ("max_output_tokens", st.integers(1, 4096)),
                       ("temperature", st.floats(0, 2)), ("top_p", st.floats(0, 1)),
                       ("stream", st.booleans())):
        if draw(st.booleans()):
            req[key] = draw(strat)
    return req


def _flat(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


@settings(max_examples=150, deadline=None)
@given(_request())
def test_translation_keeps_every_message_tool_and_parameter(req: dict[str, Any]) -> None:
    chat = to_chat(req, INTERNAL)
    msgs = chat["messages"]
    system = [req["instructions"]] if req.get("instructions") else []
    system += [_flat(i["content"]) for i in req["input"]
               if i.get("role") in ("system", "developer")]
    # System text: one leading message, in order; nowhere else.
    assert [m for m in msgs if m["role"] == "system"] == (
        [{"role": "system", "content": "\n\n".join(system)}] if system else [])
    assert all(m["role"] != "system" for m in msgs[1:])
    # User text, in order.
    assert [m["content"] for m in msgs if m["role"] == "user"] == [
        _flat(i["content"]) for i in req["input"] if i.get("role") == "user"]
    # Assistant text and calls, in order; every tool message answers a call made before it.
    said = [i["content"][0]["text"] for i in req["input"] if i.get("role") == "assistant"]
    # (a turn's texts join with a blank line; a developer message between two assistant
    # messages moves to the system prompt, so they become one)
    assert "\n\n".join(m["content"] for m in msgs
                        if m["role"] == "assistant" and m["content"]) == "\n\n".join(said)
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"])
             for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert calls == [(i["call_id"], i["name"], i["arguments"]) for i in req["input"]
                     if i.get("type") == "function_call"]
    seen: set[str] = set()
    for m in msgs:
        seen |= {c["id"] for c in m.get("tool_calls", [])}
        if m["role"] == "tool":
            assert m["tool_call_id"] in seen
    assert [(m["tool_call_id"], m["content"]) for m in msgs if m["role"] == "tool"] == [
        (i["call_id"], i["output"]) for i in req["input"]
        if i.get("type") == "function_call_output"]
    # Roles alternate as chat templates need: no two assistant messages in a row.
    roles = [m["role"] for m in msgs]
    assert all(not (a == b == "assistant") for a, b in itertools.pairwise(roles))
    # Function tools all kept, as chat tools; hosted and namespaced ones dropped.
    assert chat.get("tools", []) == [
        {"type": "function", "function": {"name": t["name"], "description": t["description"],
                                          "parameters": t["parameters"]}}
        for t in req.get("tools", []) if t["type"] == "function"]
    # Parameters mlx reads.
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p")):
        assert chat.get(dst) == req.get(src)
    assert chat["max_tokens"] == req.get("max_output_tokens", DEFAULT_MAX_TOKENS)
    # Always streamed upstream: a unary answer is the stream folded (collect).
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["model"] == INTERNAL


_chunk = st.one_of(
    _text.map(lambda t: chunk({"reasoning": t})),
    _text.map(lambda t: chunk({"content": t})),
    st.builds(lambda i, a: chunk({"tool_calls": [{"index": i, "id": f"c{i}", "type": "function",
                                                  "function": {"name": f"f{i}", "arguments": a}}]}),
              st.integers(0, 2), _text))


@settings(max_examples=200, deadline=None)
@given(st.lists(_chunk, max_size=8), st.sampled_from(["stop", "length", "tool_calls", None]),
       st.booleans())
def test_any_chunk_sequence_gives_a_well_formed_event_stream(
        chunks: list[dict[str, Any]], finish: str | None, dies: bool) -> None:
    """Whatever the upstream interleaves: every delta names an item that was added and is not
    done yet, every added item is done exactly once before the one terminal event, and the
    final output is exactly the done items, in order, with all the text."""
    s = ResponsesStream(ALIAS)
    out = [e for c in chunks for e in s.feed(c)]
    if finish is not None:
        out += s.feed(chunk({}, finish))
    out += s.fail(UpstreamFailed(ALIAS)) if dies else s.finish()
    evs = events(b"".join(out))
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    open_items: dict[int, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    for e in evs[:-1]:
        t = e["type"]
        assert t not in TERMINAL
        if t == "response.output_item.added":
            assert e["output_index"] not in open_items and e["output_index"] not in done
            open_items[e["output_index"]] = e["item"]
        elif t == "response.output_item.done":
            assert open_items.pop(e["output_index"])["id"] == e["item"]["id"]
            done[e["output_index"]] = e["item"]
        elif "output_index" in e:
            assert e["output_index"] in open_items
            assert e["item_id"] == open_items[e["output_index"]]["id"]
    final = evs[-1]
    if dies:
        assert final["type"] == "response.failed"
        return
    assert not open_items
    assert final["type"] == ("response.incomplete" if finish == "length"
                             else "response.completed")
    assert final["response"]["output"] == [done[i] for i in sorted(done)]
    assert sorted(done) == list(range(len(done)))
    texts = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "".join(p["text"] for o in final["response"]["output"] if o["type"] == "message"
                   for p in o["content"]) == texts
    # Calls: a run of tool-call chunks is one group, each upstream index one item in order of
    # first appearance, its id from the first fragment, its arguments all fragments joined.
    want: list[list[Any]] = []
    group: dict[int, list[Any]] = {}
    for c in chunks:
        calls = c["choices"][0]["delta"].get("tool_calls")
        if not calls:
            group = {}
            continue
        for call in calls:
            if call["index"] not in group:
                group[call["index"]] = [call["id"], ""]
                want.append(group[call["index"]])
            group[call["index"]][1] += call["function"]["arguments"]
    assert [[o["call_id"], o["arguments"]] for o in final["response"]["output"]
            if o["type"] == "function_call"] == want

TERMINAL = ("response.completed", "response.incomplete", "response.failed")
