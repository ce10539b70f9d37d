"""The chat parts both dialects share (maclustr/chatparts.py), where the two copies they
replace disagreed, and the dialects agreeing through them."""

from __future__ import annotations

from typing import Any

import pytest

from maclustr import anthropic, responses
from maclustr.chatparts import (
    NOTHING,
    Parts,
    chunk_parts,
    copy_number,
    function_tool,
    usage_counts,
    with_system,
)
from maclustr.errors import BadRequest


def choice(delta: Any, finish: Any = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_chunk_parts_reads_both_reasoning_names_and_prefers_mlx_s() -> None:
    assert chunk_parts(choice({"reasoning": "a"})).reasoning == "a"
    assert chunk_parts(choice({"reasoning_content": "b"})).reasoning == "b"
    assert chunk_parts(choice({"reasoning": "a", "reasoning_content": "b"})).reasoning == "a"
    assert chunk_parts(choice({"reasoning": "", "reasoning_content": "b"})).reasoning == "b"
    assert chunk_parts(choice({"reasoning": {"x": 1}, "reasoning_content": "b"})).reasoning == "b"


def test_chunk_parts_keeps_what_is_well_formed() -> None:
    call = {"index": 0, "function": {"name": "f", "arguments": "{}"}}
    assert chunk_parts(choice({"content": "x", "tool_calls": [call, 5, "y"]}, "tool_calls")) \
        == Parts("", "x", [call], "tool_calls")
    # A finish reason is a non-empty string (the Responses copy took any non-null value).
    assert chunk_parts(choice({"content": "x"}, 3)).finish is None
    assert chunk_parts(choice({"content": "x"}, "")).finish is None
    assert chunk_parts(choice(None, "stop")) == Parts("", "", [], "stop")
    for bad in ({}, {"choices": []}, {"choices": [5]}, {"choices": "x"}):
        assert chunk_parts(bad) == NOTHING


def test_usage_counts_are_non_negative_integers_or_absent() -> None:
    """A negative or boolean count is no count (the Responses copy passed negatives on)."""
    u = usage_counts({"prompt_tokens": -3, "completion_tokens": True, "total_tokens": 9,
                      "prompt_tokens_details": {"cached_tokens": 2},
                      "completion_tokens_details": {"reasoning_tokens": -1}})
    assert u is not None
    assert (u.prompt, u.completion, u.total, u.cached, u.reasoning) == (None, None, 9, 2, 0)
    assert usage_counts("x") is None
    assert responses.usage_of({"prompt_tokens": -3, "completion_tokens": 4})[
        "input_tokens"] == 0


def test_one_leading_system_message() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert with_system([], msgs) is msgs
    assert with_system(["a", "b"], msgs) == [{"role": "system", "content": "a\n\nb"}, *msgs]


def test_function_tool() -> None:
    assert function_tool({"name": "f"}, "parameters", "tools[0]") == {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(BadRequest) as e:
        function_tool({"name": ""}, "parameters", "tools[2]")
    assert e.value.param == "tools[2].name"


@pytest.mark.parametrize("schema", ["x", 5, ["a"]])
def test_a_tool_schema_that_is_not_an_object_is_a_400_in_both_dialects(schema: Any) -> None:
    """The model would be shown a function without arguments and call it wrong; the
    Responses copy used to replace the schema silently, the Anthropic one refused it."""
    with pytest.raises(BadRequest) as e:
        responses.to_chat({"input": "hi", "tools": [{"type": "function", "name": "f",
                                                     "parameters": schema}]}, "m")
    assert e.value.param == "tools[0].parameters"
    with pytest.raises(BadRequest) as e:
        anthropic.to_chat({"messages": [{"role": "user", "content": "hi"}],
                           "tools": [{"name": "f", "input_schema": schema}]}, "m")
    assert e.value.param == "tools[0].input_schema"


@pytest.mark.parametrize("key,value", [("temperature", -0.5), ("top_p", -1),
                                       ("temperature", "hot")])
def test_sampling_numbers_are_checked_alike(key: str, value: Any) -> None:
    for to_chat, req in ((responses.to_chat, {"input": "hi"}),
                         (anthropic.to_chat, {"messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(BadRequest) as e:
            to_chat({**req, key: value}, "m")
        assert e.value.param == key


def test_copy_number() -> None:
    chat: dict[str, Any] = {}
    copy_number({"n": 3}, chat, "n", "m", integer=True, low=1)
    assert chat == {"m": 3}
    with pytest.raises(BadRequest):
        copy_number({"n": 0}, chat, "n", "m", integer=True, low=1)
