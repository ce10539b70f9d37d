"""The chat-completions parts both translated dialects share (anthropic.py, responses.py). Pure.

A dialect's request becomes a chat request and the chat stream becomes the dialect's events;
what the two dialects say to and read from a chat completion is said here once, and each
dialect keeps only its own shapes:

  * function tools: a client tool (name, description, argument schema) as a chat function;
  * the system message: every system text folded into ONE leading message, in order (chat
    templates such as Qwen's and Llama's take a single system message, first);
  * request numbers: checked before anything goes upstream (400 naming the parameter);
  * usage: the chat usage object's counts, each a non-negative integer or absent;
  * a streamed chunk's parts: usage, reasoning (`delta.reasoning`, as mlx writes it, or
    `delta.reasoning_content`, as vLLM and others do), content, tool calls, finish reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .errors import BadRequest

EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def function_tool(tool: dict[str, Any], schema_key: str, where: str) -> dict[str, Any]:
    """`tool` (an object the client sent as `where`) as a chat function tool; its argument
    schema is `tool[schema_key]` (absent: a function without arguments)."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"'{where}.name' must be a non-empty string.", param=f"{where}.name")
    schema = tool.get(schema_key)
    if schema is None:
        schema = dict(EMPTY_SCHEMA)
    elif not isinstance(schema, dict):
        raise BadRequest(f"'{where}.{schema_key}' must be an object.",
                         param=f"{where}.{schema_key}")
    fn: dict[str, Any] = {"name": name}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    fn["parameters"] = schema
    return {"type": "function", "function": fn}


def tool_list(tools: object) -> list[dict[str, Any]]:
    """The request's `tools`, each checked to be an object (absent: none)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"'tools[{i}]' must be an object.", param=f"tools[{i}]")
    return tools


def with_system(system: list[str], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` after one leading system message holding every system text, in order."""
    if not system:
        return messages
    return [{"role": "system", "content": "\n\n".join(system)}, *messages]


def copy_number(req: dict[str, Any], chat: dict[str, Any], key: str, to: str, *,
                integer: bool = False, low: float = 0) -> None:
    """`req[key]` to `chat[to]` when present: a number (an integer with `integer`) >= `low`,
    else a 400 naming `key`."""
    value = req.get(key)
    if value is None:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < low:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind} >= {low:g}.", param=key)
    chat[to] = value


def count(value: object) -> int | None:
    """A token count: a non-negative integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


class Usage(NamedTuple):
    """A chat usage object's counts (None: absent or not a count)."""

    prompt: int | None
    completion: int | None
    total: int | None
    cached: int  # prompt tokens served from the cache (0 when not said)
    reasoning: int  # completion tokens spent reasoning (0 when not said)


def usage_counts(usage: object) -> Usage | None:
    """The counts of a chat `usage` object; None when it is not one."""
    if not isinstance(usage, dict):
        return None
    pd, cd = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
    cached = count(pd.get("cached_tokens")) if isinstance(pd, dict) else None
    reasoning = count(cd.get("reasoning_tokens")) if isinstance(cd, dict) else None
    return Usage(count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")),
                 count(usage.get("total_tokens")), cached or 0, reasoning or 0)


class Parts(NamedTuple):
    """What one streamed chat chunk says, in the order a dialect emits it."""

    reasoning: str  # "" when none
    content: str  # "" when none
    tool_calls: list[dict[str, Any]]  # the call objects (fragments, for a streamed call)
    finish: str | None  # the finish_reason, when this chunk ends the choice


NOTHING = Parts("", "", [], None)


def chunk_usage(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """The chunk's usage object (the stream's usage chunk), else None."""
    usage = chunk.get("usage")
    return usage if isinstance(usage, dict) else None


def chunk_parts(chunk: dict[str, Any]) -> Parts:
    """The first choice's delta and finish reason (NOTHING for a chunk without a choice)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return NOTHING
    choice = choices[0]
    delta = choice.get("delta")
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) and finish else None
    if not isinstance(delta, dict):
        return Parts("", "", [], finish)
    reasoning = delta.get("reasoning")
    if not isinstance(reasoning, str) or not reasoning:
        reasoning = delta.get("reasoning_content")
    content = delta.get("content")
    calls = delta.get("tool_calls")
    return Parts(reasoning if isinstance(reasoning, str) else "",
                 content if isinstance(content, str) else "",
                 [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else [],
                 finish)
