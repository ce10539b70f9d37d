"""The pure Anthropic translation (maclustr/anthropic.py) and the shared stream adapter
(maclustr/dialect.py): recorded request/response pairs, every byte cut of a recorded mlx
stream, and a property test that a translated request keeps everything upstream can express.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr import anthropic
from maclustr.anthropic import AnthropicStream, collect, to_chat
from maclustr.dialect import ChatEventRewriter
from maclustr.errors import BadRequest, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from maclustr.sse import SSEError, encode_event

MODEL = "/Users/admin/models/Qwen3-Coder-30B"
ALIAS = "maclustr-coder"

# --- recorded pairs ---------------------------------------------------------------------------

# A Claude Code 2.1.197 turn 2 (shape from ../shared/agent-clients.md, shortened).
CLAUDE_CODE_TURN_2: dict[str, Any] = {
    "model": ALIAS, "max_tokens": 32000, "stream": True,
    "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; x"},
               {"type": "text", "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>cwd</system-reminder>"},
            {"type": "text", "text": "run echo hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should run it.", "signature": "EuYBCkQ"},
            {"type": "text", "text": "Running it."},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash",
             "input": {"command": "echo hi", "description": "Print hi"}}]},
        {"role": "system", "content": "The user switched to plan mode."},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "hi",
             "is_error": False, "cache_control": {"type": "ephemeral"}}]},
    ],
    "tools": [{"name": "Bash", "description": "Run a command",
               "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                "type": "object",
                                "properties": {"command": {"type": "string"}},
                                "required": ["command"]}},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
    "metadata": {"user_id": "{\"device_id\":\"abc\"}"},
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
    "temperature": 1, "top_p": 0.95, "top_k": 20, "stop_sequences": ["</done>"],
}

CLAUDE_CODE_TURN_2_CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system",
         "content": "You are Claude Code.\n\nThe user switched to plan mode."},
        {"role": "user", "content": "<system-reminder>cwd</system-reminder>\n\nrun echo hi"},
        {"role": "assistant", "content": "Running it.", "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {
                "name": "Bash",
                "arguments": '{"command": "echo hi", "description": "Print hi"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "hi"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "Bash", "description": "Run a command",
        "parameters": CLAUDE_CODE_TURN_2["tools"][0]["input_schema"]}}],
    "max_tokens": 32000, "temperature": 1, "top_p": 0.95, "top_k": 20,
    "stream": True, "stream_options": {"include_usage": True},
}


def test_recorded_request() -> None:
    assert to_chat(json.loads(json.dumps(CLAUDE_CODE_TURN_2)), MODEL) == \
        CLAUDE_CODE_TURN_2_CHAT


# What mlx_lm.server 0.32.2 writes for a reasoning model that thinks, says a word and calls a
# tool: keep-alives while the prompt is processed, `delta.reasoning`, the whole tool call in one
# chunk, a finish chunk, the usage chunk, [DONE].
def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "system_fingerprint": "0.32.2-Linux", "object":
            "chat.completion.chunk", "model": MODEL, "created": 1,
            "choices": [{"index": 0, "finish_reason": finish,
                         "delta": {"role": "assistant", **delta}}]}


RECORDED_CHUNKS = [
    _chunk({"reasoning": "User wants"}), _chunk({"reasoning": " hi."}),
    _chunk({"content": "Sure"}),
    _chunk({"tool_calls": [{"function": {"name": "Bash", "arguments":
                                         '{"command": "echo h\u00e9"}'},
                            "type": "function", "id": "call_1", "index": 0}]}),
    _chunk({}, "tool_calls"),
    {"id": "chatcmpl-1", "system_fingerprint": "0.32.2-Linux", "object": "chat.completion",
     "model": MODEL, "created": 1, "choices": [],
     "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
               "prompt_tokens_details": {"cached_tokens": 100}}},
]
RECORDED_STREAM = (b": keepalive 0/1\n\n: keepalive 1/1\n\n"
                   + b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                              for c in RECORDED_CHUNKS)
                   + b"data: [DONE]\n\n")

EXPECTED_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_test", "type": "message", "role": "assistant", "model": ALIAS,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 7, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("ping", {"type": "ping"}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "thinking", "thinking": "",
                                               "signature": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": "User wants"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "thinking_delta", "thinking": " hi."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1,
                             "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "text_delta", "text": "Sure"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {
        "type": "input_json_delta", "partial_json": '{"command": "echo h\u00e9"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("message_delta", {"type": "message_delta",
                       "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 100, "output_tokens": 30}}),
    ("message_stop", {"type": "message_stop"}),
]


def new_stream() -> AnthropicStream:
    s = AnthropicStream(ALIAS, input_estimate=7)
    s.id = "msg_test"
    return s


def decode(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in body.split(b"\n\n")[:-1]:
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        out.append((name_line[7:].decode(), json.loads(data_line[6:])))
    assert body.endswith(b"\n\n")
    return out


def test_recorded_stream() -> None:
    rw = ChatEventRewriter(new_stream())
    out = rw.feed(RECORDED_STREAM)
    assert rw.done
    assert decode(out) == EXPECTED_EVENTS
    assert rw.usage == RECORDED_CHUNKS[-1]["usage"]
    assert rw.feed(b"data: {}\n\n") == b""  # nothing after [DONE]


def test_every_byte_cut_gives_the_same_events() -> None:
    whole = ChatEventRewriter(new_stream()).feed(RECORDED_STREAM)
    for crlf in (False, True):
        data = RECORDED_STREAM.replace(b"\n", b"\r\n") if crlf else RECORDED_STREAM
        for cut in range(len(data) + 1):
            rw = ChatEventRewriter(new_stream())
            got = rw.feed(data[:cut]) + rw.feed(data[cut:])
            assert got == whole, (crlf, cut)
            assert rw.done


def test_byte_by_byte() -> None:
    rw = ChatEventRewriter(new_stream())
    got = b"".join(rw.feed(RECORDED_STREAM[i:i + 1]) for i in range(len(RECORDED_STREAM)))
    assert decode(got) == EXPECTED_EVENTS


def test_collect_folds_the_recorded_stream_into_a_message() -> None:
    """A unary answer is the stream's events folded, as the SDKs fold them."""
    msg = collect(ChatEventRewriter(new_stream()).feed(RECORDED_STREAM))
    assert msg == {
        "id": "msg_test", "type": "message", "role": "assistant", "model": ALIAS,
        "content": [{"type": "thinking", "thinking": "User wants hi.", "signature": ""},
                    {"type": "text", "text": "Sure"},
                    {"type": "tool_use", "id": "call_1", "name": "Bash",
                     "input": {"command": "echo h\u00e9"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 100, "output_tokens": 30}}
    assert MODEL not in json.dumps(msg)
    with pytest.raises(ValueError):
        collect(b"")


@pytest.mark.parametrize(("finish", "reason"), [
    ("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
    (None, "end_turn")])
def test_stop_reasons(finish: str | None, reason: str) -> None:
    s = new_stream()
    events = decode(b"".join(s.feed(_chunk({"content": "x"}, finish)) + s.finish()))
    assert events[-2][1]["delta"]["stop_reason"] == reason


# --- stop sequences: matched by the gateway ----------------------------------------------------


def stop_run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, Any, bool]:
    """(text the client sees, stop_sequence, ended before [DONE])."""
    s = AnthropicStream(ALIAS, 1, stops)
    out: list[bytes] = []
    for p in pieces:
        out += s.feed(_chunk({"content": p}))
    ended = s.ended
    out += s.feed(_chunk({}, "stop")) + s.finish()
    events = decode(b"".join(out))
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    check = [n for n, _ in events]
    assert check.count("message_stop") == 1 and check[-1] == "message_stop"
    delta = events[-2][1]["delta"]
    assert delta["stop_reason"] == ("stop_sequence" if delta["stop_sequence"] else "end_turn")
    return text, delta["stop_sequence"], ended


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Reference: the stop sequence that completes first (the longer on a tie)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[:end - len(s)], s
    return text, None


def test_stop_sequence_across_chunks() -> None:
    assert stop_run(["Hello </d", "one> tail"], ("</done>",)) == ("Hello ", "</done>", True)
    assert stop_run(["a <", "/x", "> b"], ("</done>",)) == ("a </x> b", None, False)
    assert stop_run(["abc"], ("abc", "b")) == ("a", "b", True)
    assert stop_run(["ab", "c"], ("abc", "b")) == ("a", "b", True)
    assert stop_run(["</d"], ("</done>",)) == ("</d", None, False)  # held, then flushed


_alphabet = st.text(alphabet="ab<", max_size=12)


@settings(max_examples=300, deadline=None)
@given(_alphabet, st.lists(st.integers(0, 12), max_size=4),
       st.lists(st.text(alphabet="ab<", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_sequences_whatever_the_cut(text: str, cuts: list[int],
                                         stops: list[str]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = zip([0, *points], [*points, len(text)], strict=True)
    pieces = [text[a:b] for a, b in bounds if text[a:b]]
    want_text, want_stop = first_stop(text, tuple(stops))
    got_text, got_stop, _ = stop_run(pieces, tuple(stops))
    assert (got_text, got_stop) == (want_text, want_stop)


def test_stop_sequence_hangs_up_through_the_rewriter() -> None:
    rw = ChatEventRewriter(AnthropicStream(ALIAS, 1, ("STOP",)))
    body = b"".join(b"data: " + json.dumps(_chunk({"content": t})).encode() + b"\n\n"
                    for t in ("one ", "two ST", "OP three", "four"))
    out = rw.feed(body)
    assert rw.done  # the relay hangs up on the upstream here
    msg = collect(out)
    assert msg["content"] == [{"type": "text", "text": "one two "}]
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "STOP")


# --- the stream state machine ----------------------------------------------------------------


def run(chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    s = new_stream()
    out: list[bytes] = []
    for c in chunks:
        out += s.feed(c)
    return decode(b"".join(out + s.finish()))


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_both_reasoning_field_names_become_thinking(field: str) -> None:
    events = run([_chunk({field: "hm"}), _chunk({"content": "a"}, "stop")])
    deltas = [e["delta"] for n, e in events if n == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "hm"},
                      {"type": "text_delta", "text": "a"}]


def test_content_and_finish_in_one_chunk_are_split() -> None:
    events = run([_chunk({"content": "a"}), _chunk({"content": "b"}, "stop")])
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]


def test_tool_call_and_finish_in_one_chunk() -> None:
    call = {"function": {"name": "Read", "arguments": '{"path": "a"}'}, "type": "function",
            "id": "c1", "index": 0}
    events = run([_chunk({"content": "x"}), _chunk({"tool_calls": [call]}, "tool_calls")])
    assert [n for n, _ in events][4:] == [
        "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_two_tool_calls_in_one_chunk_get_two_blocks() -> None:
    calls = [{"function": {"name": n, "arguments": "{}"}, "type": "function", "id": n,
              "index": i} for i, n in enumerate(("A", "B"))]
    events = run([_chunk({"tool_calls": calls}, "tool_calls")])
    starts = [d for n, d in events if n == "content_block_start"]
    assert [(d["index"], d["content_block"]["name"]) for d in starts] == [(0, "A"), (1, "B")]


def test_incremental_tool_call_pieces_are_appended() -> None:
    """Not mlx, but OpenAI-style backends: later pieces carry the index and no id."""
    first = {"index": 0, "id": "c1", "type": "function",
             "function": {"name": "Bash", "arguments": '{"comm'}}
    rest = {"index": 0, "function": {"arguments": 'and": "ls"}'}}
    events = run([_chunk({"tool_calls": [first]}), _chunk({"tool_calls": [rest]}, "tool_calls")])
    parts = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert json.loads("".join(parts)) == {"command": "ls"}
    assert [n for n, _ in events].count("content_block_start") == 1


def test_text_after_reasoning_after_text_gets_new_blocks() -> None:
    events = run([_chunk({"content": "a"}), _chunk({"reasoning": "r"}),
                  _chunk({"content": "b"}, "stop")])
    kinds = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert kinds == ["text", "thinking", "text"]


def test_no_usage_chunk_falls_back_to_estimates() -> None:
    events = run([_chunk({"content": "abcdefgh" * 4}, "stop")])
    assert events[-2][1]["usage"] == {"input_tokens": 7, "output_tokens": 8}


def test_empty_stream_still_well_formed() -> None:
    s = new_stream()
    events = decode(b"".join(s.finish()))
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize(("err", "etype"), [
    (UpstreamFailed(ALIAS, "stopped in the middle of the response"), "api_error"),
    (UpstreamTimeout(ALIAS, "idle between bytes"), "api_error"),
    (UpstreamRejected(429, "busy"), "overloaded_error"),
    (UpstreamRejected(404, "template"), "invalid_request_error"),
    (BadRequest("bad"), "invalid_request_error")])
def test_fail_is_one_error_event(err: Any, etype: str) -> None:
    s = new_stream()
    s.feed(_chunk({"content": "a"}))
    assert decode(b"".join(s.fail(err))) == [
        ("error", {"type": "error", "error": {"type": etype, "message": err.message}})]


def test_rewriter_refuses_garbage() -> None:
    with pytest.raises(SSEError):
        ChatEventRewriter(new_stream()).feed(b"data: {nope\n\n")
    with pytest.raises(SSEError):
        ChatEventRewriter(new_stream()).feed(b"data: [1, 2]\n\n")
    rw = ChatEventRewriter(new_stream(), max_event=100)
    with pytest.raises(SSEError):
        rw.feed(b"data: " + b"x" * 200)


def test_encode_event() -> None:
    assert encode_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert encode_event(None, {"a": 1}) == b'data: {"a":1}\n\n'


# --- request translation ---------------------------------------------------------------------


def test_tool_choice_none_sends_no_tools() -> None:
    req = {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "none"},
           "tools": [{"name": "A", "input_schema": {"type": "object"}}]}
    assert "tools" not in to_chat(req, MODEL)
    req["tool_choice"] = {"type": "any"}
    assert len(to_chat(req, MODEL)["tools"]) == 1


def test_image_in_tool_result_is_a_placeholder() -> None:
    req = {"messages": [{"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": "t",
        "content": [{"type": "text", "text": "screenshot:"},
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]}]}
    (msg,) = to_chat(req, MODEL)["messages"]
    assert msg == {"role": "tool", "tool_call_id": "t",
                   "content": "screenshot:\n\n[image omitted: this model reads text only]"}


def test_assistant_with_only_thinking_is_dropped() -> None:
    req = {"messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": [
                            {"type": "redacted_thinking", "data": "..."}]},
                        {"role": "user", "content": "y"}]}
    assert [m["role"] for m in to_chat(req, MODEL)["messages"]] == ["user", "user"]


@pytest.mark.parametrize("req", [
    {"messages": "hi"}, {"messages": []}, {"messages": [1]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "x"}]}]},
    {"system": 5, "messages": [{"role": "user", "content": "x"}]},
    {"system": [{"type": "image"}], "messages": [{"role": "user", "content": "x"}]},
    {"tools": {}, "messages": [{"role": "user", "content": "x"}]},
    {"tools": [{"description": "no name"}], "messages": [{"role": "user", "content": "x"}]},
    {"temperature": "hot", "messages": [{"role": "user", "content": "x"}]},
    {"top_k": 1.5, "messages": [{"role": "user", "content": "x"}]},
    {"max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
    {"stop_sequences": "END", "messages": [{"role": "user", "content": "x"}]},
    {"stream": "yes", "messages": [{"role": "user", "content": "x"}]},
])
def test_bad_requests(req: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        to_chat(req, MODEL)


def test_estimate_tokens_grows_with_the_prompt() -> None:
    small = anthropic.estimate_tokens(to_chat({"messages": [
        {"role": "user", "content": "hi"}]}, MODEL))
    big = anthropic.estimate_tokens(to_chat({"messages": [
        {"role": "user", "content": "hi " * 1000}]}, MODEL))
    assert 1 <= small < 10 and 700 <= big <= 800


# --- property: nothing upstream can express is lost -------------------------------------------

_text = st.text(min_size=1, max_size=30).filter(lambda t: not t.startswith("x-anthropic"))
_name = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,15}", fullmatch=True)
_args = st.dictionaries(_name, st.one_of(st.integers(), _text, st.booleans()), max_size=3)


@st.composite
def conversations(draw: Any) -> dict[str, Any]:
    """Alternating turns: user text, assistant text + tool uses, user tool results + text."""
    messages: list[dict[str, Any]] = []
    for turn in range(draw(st.integers(1, 4))):
        texts = draw(st.lists(_text, min_size=1, max_size=3))
        if turn and messages[-1]["role"] == "assistant":
            last = messages[-1]["content"]
            calls = [b for b in last if b["type"] == "tool_use"] if isinstance(last,
                                                                                list) else []
            results: list[dict[str, Any]] = [
                {"type": "tool_result", "tool_use_id": c["id"],
                 "content": draw(st.one_of(_text, st.lists(
                     st.builds(lambda t: {"type": "text", "text": t}, _text),
                     min_size=1, max_size=2)))} for c in calls]
            messages.append({"role": "user", "content": results + [
                {"type": "text", "text": t} for t in texts]})
        else:
            messages.append({"role": "user", "content": draw(st.one_of(
                st.just(texts[0]), st.just([{"type": "text", "text": t} for t in texts])))})
        blocks: list[dict[str, Any]] = [{"type": "text", "text": t} for t in
                                        draw(st.lists(_text, max_size=2))]
        for k in range(draw(st.integers(0, 2))):
            blocks.append({"type": "tool_use", "id": f"toolu_{turn}_{k}", "name": draw(_name),
                           "input": draw(_args)})
        if draw(st.booleans()):
            blocks.insert(0, {"type": "thinking", "thinking": "t", "signature": "s"})
        messages.append({"role": "assistant", "content": blocks or "ok"})
    req: dict[str, Any] = {"model": ALIAS, "messages": messages}
    if draw(st.booleans()):
        req["system"] = draw(_text)
    req["tools"] = [{"name": n, "description": draw(_text),
                     "input_schema": {"type": "object", "properties": {
                         p: {"type": "string"} for p in draw(st.lists(_name, max_size=3))}}}
                    for n in draw(st.lists(_name, max_size=3, unique=True))]
    for key, strat in (("max_tokens", st.integers(1, 10**6)),
                       ("temperature", st.floats(0, 2)), ("top_p", st.floats(0, 1)),
                       ("top_k", st.integers(0, 100)),
                       ("stop_sequences", st.lists(_text, max_size=3)),
                       ("stream", st.booleans())):
        if draw(st.booleans()):
            req[key] = draw(strat)
    return req


def _all_text(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    for b in content:
        if b["type"] == "text":
            out.append(b["text"])
        elif b["type"] == "tool_result":
            out += _all_text(b["content"])
    return out


@settings(max_examples=200, deadline=None)
@given(conversations())
def test_translation_keeps_everything_upstream_can_express(req: dict[str, Any]) -> None:
    chat = to_chat(json.loads(json.dumps(req)), MODEL)
    assert chat["model"] == MODEL
    msgs = chat["messages"]
    upstream_text = json.dumps([m["content"] for m in msgs])
    # every text reaches the upstream, in order
    for m in req["messages"]:
        for t in _all_text(m["content"]):
            assert json.dumps(t)[1:-1] in upstream_text
    # every tool use is an assistant tool call with the same id, name and input, and is
    # answered by a tool message right after it
    calls = {c["id"]: c for m in msgs for c in m.get("tool_calls", ())}
    for m in req["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else ():
            if b["type"] == "tool_use":
                c = calls[b["id"]]["function"]
                assert c["name"] == b["name"] and json.loads(c["arguments"]) == b["input"]
            elif b["type"] == "tool_result":
                assert any(x["role"] == "tool" and x["tool_call_id"] == b["tool_use_id"]
                           for x in msgs)
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            assert msgs[i - 1]["role"] in ("assistant", "tool")
    # one system message at most, and first; no thinking anywhere
    assert [m["role"] for m in msgs].count("system") <= 1
    assert all(m["role"] != "system" for m in msgs[1:])
    assert all(isinstance(m["content"], str) for m in msgs)  # mlx reads text only
    # every tool and parameter
    assert [t["function"]["name"] for t in chat.get("tools", ())] == \
        [t["name"] for t in req["tools"]]
    assert [t["function"]["parameters"] for t in chat.get("tools", ())] == \
        [t["input_schema"] for t in req["tools"]]
    for ours, theirs in (("max_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("top_k", "top_k")):
        assert chat.get(theirs) == req.get(ours)
    assert "stop" not in chat  # the gateway matches stop sequences (AnthropicStream)
    assert anthropic.stop_sequences(req) == tuple(req.get("stop_sequences", ()))
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


# --- robustness: any JSON in, a clear 400 or a translation out ---------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "text", "role", "content", "id", "name", "input",
                         "tool_use_id", "is_error", "input_schema", "description"]),
        inner, max_size=4),
    max_leaves=12)
_block = st.fixed_dictionaries({"type": st.sampled_from(
    ["text", "tool_use", "tool_result", "thinking", "image", "x"])}, optional={
    "text": _json, "id": _json, "name": _json, "input": _json, "tool_use_id": _json,
    "content": _json, "is_error": _json})
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                  "content": st.one_of(_json, st.lists(_block, max_size=3))})


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"messages": st.one_of(_json, st.lists(_message, max_size=4))},
                             optional={"system": _json, "tools": _json, "tool_choice": _json,
                                       "max_tokens": _json, "temperature": _json,
                                       "top_k": _json, "stop_sequences": _json,
                                       "stream": _json}))
def test_any_request_is_translated_or_refused_clearly(req: dict[str, Any]) -> None:
    try:
        chat = to_chat(req, MODEL)
    except BadRequest:
        return
    json.dumps(chat)
    assert anthropic.estimate_tokens(chat) >= 1
    assert all(isinstance(m["content"], str) for m in chat["messages"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["choices", "usage", "id"]), st.one_of(
    _json, st.lists(st.fixed_dictionaries({}, optional={
        "finish_reason": _json, "delta": st.one_of(_json, st.fixed_dictionaries({}, optional={
            "content": _json, "reasoning": _json, "tool_calls": st.one_of(
                _json, st.lists(st.fixed_dictionaries({}, optional={
                    "index": _json, "id": _json, "function": st.one_of(
                        _json, st.fixed_dictionaries({}, optional={
                            "name": _json, "arguments": _json}))}), max_size=2))}))}),
        max_size=2))), max_size=5))
def test_any_upstream_chunks_give_a_well_formed_stream(chunks: list[dict[str, Any]]) -> None:
    s = new_stream()
    out: list[bytes] = []
    for c in chunks:
        out += s.feed(c)
    body = b"".join(out + s.finish())
    names = [n for n, _ in decode(body)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    try:
        msg = collect(body)
    except json.JSONDecodeError:
        return  # garbage tool arguments: the relay answers 502 upstream_bad_response
    assert msg["model"] == ALIAS and msg["type"] == "message"
