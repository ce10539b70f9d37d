"""Anthropic's Messages API (`POST /v1/messages`) as chat completions. Pure.

Request in, chat request out (`to_chat`); chat chunks in, Messages events out
(`AnthropicStream`); a whole stream's events in, the unary Message out (`collect`: the
upstream always streams, so unary and streamed answers are one translation). What a local
model cannot honour (`thinking`, `context_management`, `output_config`, `metadata`,
`cache_control`, `tool_choice` other than "none", server-side tools) is dropped rather than
refused; what it cannot read (images, documents) is refused clearly, except inside a tool
result, where a placeholder keeps the agent's loop going.

mlx_lm.server facts this relies on (../shared/agent-clients.md): a list `content` must be
all text (so blocks are flattened to one string), templates often accept one system message
only and only first (so every system text is folded into it), a whole tool call arrives in
one chunk, reasoning arrives as `delta.reasoning`, and usage only with
`stream_options.include_usage`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from . import chatparts, jsonfast
from .errors import BadRequest, GatewayError
from .sse import encode_event

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}

# Claude Code's first system block is billing metadata that changes between requests; it is
# no instruction, and keeping it would defeat the upstream's prompt cache.
_BILLING_PREFIX = "x-anthropic-billing-header:"
_TEXT_ONLY = "This model reads text only; send the image as text or use another model."
_IMAGE_PLACEHOLDER = "[image omitted: this model reads text only]"
# Assistant blocks a local model cannot replay: signed reasoning, Anthropic-hosted tool runs.
_DROPPED_ASSISTANT = frozenset({"thinking", "redacted_thinking", "server_tool_use",
                                "web_search_tool_result", "web_fetch_tool_result",
                                "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result",
                                "container_upload"})


# --- request ------------------------------------------------------------------------------


def to_chat(req: dict[str, Any], model: str) -> dict[str, Any]:
    """The upstream chat request for a Messages request. Raises BadRequest."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    system = _system(req.get("system"))
    chat_messages: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object.", param=where)
        role = m.get("role")
        content = m.get("content")
        if role == "system":  # mid-conversation system text: folded into the first message
            system += [t for t in [_flat_text(content, where)] if t]
        elif role == "user":
            chat_messages += _user(content, where)
        elif role == "assistant":
            chat_messages += _assistant(content, where)
        else:
            raise BadRequest(f"{where}.role must be 'user', 'assistant' or 'system'.",
                             param=f"{where}.role")
    chat: dict[str, Any] = {"model": model,
                            "messages": chatparts.with_system(system, chat_messages)}
    tools = _tools(req.get("tools"))
    choice = req.get("tool_choice")
    if tools and not (isinstance(choice, dict) and choice.get("type") == "none"):
        chat["tools"] = tools
    chatparts.copy_number(req, chat, "max_tokens", "max_tokens", integer=True, low=1)
    chatparts.copy_number(req, chat, "temperature", "temperature", low=0)
    chatparts.copy_number(req, chat, "top_p", "top_p", low=0)
    chatparts.copy_number(req, chat, "top_k", "top_k", integer=True, low=0)
    stop_sequences(req)  # validated here; applied by AnthropicStream, not sent upstream
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream")
    # Always a stream upstream, unary answers included (`collect` folds the events): one path,
    # so a unary answer is exactly what the stream would have said, stop sequences included.
    chat["stream"] = True
    chat["stream_options"] = {"include_usage": True}  # usage for message_delta
    return chat


def stop_sequences(req: dict[str, Any]) -> tuple[str, ...]:
    """The request's stop sequences. The gateway applies them itself: mlx_lm.server strips a
    matched stop word and reports `finish_reason: "stop"` exactly as for the end of a turn,
    so only the gateway can say `stop_reason: "stop_sequence"` and which one matched."""
    stops = req.get("stop_sequences")
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise BadRequest("'stop_sequences' must be an array of non-empty strings.",
                         param="stop_sequences")
    return tuple(stops)


def _system(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        texts = _texts(value, "system")
        return [t for t in texts if t and not t.startswith(_BILLING_PREFIX)]
    raise BadRequest("'system' must be a string or an array of text blocks.", param="system")


def _texts(blocks: list[Any], where: str) -> list[str]:
    out = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(
                b.get("text"), str):
            raise BadRequest(f"{where}[{j}] must be a text block.", param=where)
        out.append(b["text"])
    return out


def _flat_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(_texts(content, f"{where}.content"))
    raise BadRequest(f"{where}.content must be a string or an array of text blocks.",
                     param=f"{where}.content")


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (they answer the previous assistant turn, so they
    come first); the text blocks become one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of blocks.",
                         param=f"{where}.content")
    tools: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, b in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_result":
            tools.append(_tool_result(b, at))
        elif kind in ("image", "document"):
            raise BadRequest(f"{at}: {_TEXT_ONLY}", param=at)
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise BadRequest(f"{at} has an unsupported block type {str(kind)[:40]!r}.",
                             param=at)
    if texts or not tools:
        tools.append({"role": "user", "content": "\n\n".join(texts)})
    return tools


def _tool_result(b: dict[str, Any], at: str) -> dict[str, Any]:
    call_id = b.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"{at}.tool_use_id must be a non-empty string.", param=at)
    content = b.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image", "document"):
                parts.append(_IMAGE_PLACEHOLDER)
            else:
                raise BadRequest(f"{at}.content[{k}] must be a text block.", param=at)
        text = "\n\n".join(parts)
    else:
        raise BadRequest(f"{at}.content must be a string or an array of blocks.", param=at)
    if b.get("is_error") is True:
        text = "Error: " + text
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of blocks.",
                         param=f"{where}.content")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind == "tool_use":
            name, call_id, args = b.get("name"), b.get("id"), b.get("input", {})
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise BadRequest(f"{at} needs a string 'id' and 'name'.", param=at)
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args)}})
        elif kind in _DROPPED_ASSISTANT:
            continue
        else:
            raise BadRequest(f"{at} has an unsupported block type {str(kind)[:40]!r}.",
                             param=at)
    if not texts and not calls:
        return []  # only reasoning: nothing the model can be shown
    msg: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _tools(value: Any) -> list[dict[str, Any]]:
    """Client tools become chat functions; server tools (typed, no input_schema, e.g.
    `web_search_20250305`) run at Anthropic and are dropped."""
    return [chatparts.function_tool(t, "input_schema", f"tools[{i}]")
            for i, t in enumerate(chatparts.tool_list(value))
            if t.get("type") in (None, "custom") or "input_schema" in t]


def estimate_tokens(chat: dict[str, Any]) -> int:
    """An estimate of the prompt's tokens, without the model's tokenizer (it lives on the
    nodes): UTF-8 bytes of every message text, tool call and tool definition / 4, plus 4 per
    message for the template's role markers. BPE tokenizers average 3-4.5 bytes per token on
    English and code, so this errs high, which is the safe side for context budgeting."""
    size = 0
    for m in chat.get("messages", ()):
        size += 16 + len(str(m.get("content") or "").encode())
        for c in m.get("tool_calls", ()):
            size += len(json.dumps(c["function"]).encode())
    for t in chat.get("tools", ()):
        size += len(json.dumps(t["function"]).encode())
    return max(1, (size + 3) // 4)


# --- responses ----------------------------------------------------------------------------


def message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def _usage(usage: dict[str, Any] | None, input_estimate: int, output_estimate: int
           ) -> dict[str, int]:
    """Anthropic counts cached prompt tokens apart from `input_tokens`."""
    counts = chatparts.usage_counts(usage)
    if counts is None:
        return {"input_tokens": input_estimate, "output_tokens": output_estimate}
    prompt = counts.prompt if counts.prompt is not None else input_estimate
    cached = min(counts.cached, prompt)
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": counts.completion if counts.completion is not None
            else output_estimate}


def _tool_id(call: dict[str, Any]) -> str:
    cid = call.get("id")
    return cid if isinstance(cid, str) and cid else "toolu_" + os.urandom(12).hex()


def collect(events: bytes) -> dict[str, Any]:
    """The unary Message for a whole AnthropicStream output, folded the way the SDKs fold a
    stream: blocks in index order, deltas appended, a tool's JSON parsed at its end."""
    message: dict[str, Any] = {}
    content: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    for frame in events.split(b"\n\n"):
        at = frame.find(b"\ndata: ")
        if at < 0:
            continue
        event = jsonfast.loads(frame[at + 7:])
        kind = event["type"]
        if kind == "message_start":
            message = event["message"]
        elif kind == "content_block_start":
            content.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = content[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and event["index"] in partial:
            args = jsonfast.loads(partial.pop(event["index"]) or "{}")
            content[event["index"]]["input"] = args if isinstance(args, dict) else {}
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = event["usage"]
    if not message:
        raise ValueError("no message_start")
    message["content"] = content
    return message


class AnthropicStream:
    """Chat chunks -> Messages events: exactly one message_start (at the first sign of life,
    a keep-alive included), blocks with increasing indexes that never mix kinds (thinking,
    text, tool_use each get their own), and message_delta held until the upstream's [DONE],
    so it carries the usage chunk's counts.

    Stop sequences are matched in the text here. Text that could be the start of one is held
    back until the next chunk decides; on a match the text before it is sent, the message
    ends at once (`stop_reason: "stop_sequence"`) and `ended` tells the relay to hang up on
    the upstream, which stops generating."""

    def __init__(self, alias: str, input_estimate: int = 0,
                 stop_sequences: tuple[str, ...] = ()) -> None:
        self.alias = alias
        self.input_estimate = input_estimate
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.usage: dict[str, Any] | None = None
        self.id = message_id()
        self.ended = False  # the message is complete before the upstream's [DONE]
        self._held = ""  # text that may begin a stop sequence
        self._matched: str | None = None
        self._started = False
        self._index = -1
        self._open: str | None = None  # "thinking" | "text" | "tool_use" | None
        self._tool_key: Any = None  # the upstream's index of the open tool call
        self._finish: str | None = None
        self._chars = 0  # generated characters: an output estimate if usage never comes

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        if self.ended:
            return []
        out = self._start()
        self.usage = chatparts.chunk_usage(chunk) or self.usage
        parts = chatparts.chunk_parts(chunk)
        if parts.reasoning:
            out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": parts.reasoning}))
            self._chars += len(parts.reasoning)
        if parts.content:
            out += self._text(parts.content)
            if self.ended:
                return out
        for call in parts.tool_calls:
            out += self._tool(call)
        if parts.finish is not None:  # may share a chunk with content: split
            out += self._close()
            self._finish = parts.finish
        return out

    def keepalive(self) -> list[bytes]:
        if self.ended:
            return []
        return [*self._start(), encode_event("ping", {"type": "ping"})]

    def finish(self) -> list[bytes]:
        if self.ended:
            return []
        self.ended = True
        out = self._start() + self._close()
        usage = _usage(self.usage, self.input_estimate, max(1, self._chars // 4))
        if self._matched is not None:
            reason = "stop_sequence"
        else:
            reason = STOP_REASONS.get(self._finish or "stop", "end_turn")
        out.append(encode_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": self._matched},
            "usage": usage}))
        out.append(encode_event("message_stop", {"type": "message_stop"}))
        return out

    def _text(self, text: str) -> list[bytes]:
        """Text out, minus what may start a stop sequence; a match ends the message."""
        out: list[bytes] = []
        if self.stop_sequences:
            text, self._held = self._held + text, ""
            # the match that completes first (as generation would meet it), the longer on a tie
            _, at, matched = min(((i + len(s), i, s) for s in self.stop_sequences
                                  if (i := text.find(s)) >= 0), default=(0, -1, ""))
            if at >= 0:
                if at:
                    out += self._text_delta(text[:at])
                self._matched = matched
                return out + self.finish()
            keep = self._partial(text)
            if keep:
                text, self._held = text[:-keep], text[-keep:]
        if text or self._held:
            out += self._block("text", {"type": "text", "text": ""})
        if text:
            out += self._text_delta(text)
        return out

    def _text_delta(self, text: str) -> list[bytes]:
        self._chars += len(text)
        return [*self._block("text", {"type": "text", "text": ""}),
                self._delta({"type": "text_delta", "text": text})]

    def _partial(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of a stop sequence."""
        longest = min(len(text), max(len(s) for s in self.stop_sequences) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop_sequences):
                return k
        return 0

    def fail(self, err: GatewayError) -> list[bytes]:
        return [encode_event("error", error_object(err))]

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [encode_event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.alias,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_estimate, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}})]

    def _block(self, kind: str, start: dict[str, Any]) -> list[bytes]:
        if self._open == kind:
            return []
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(encode_event("content_block_start", {
            "type": "content_block_start", "index": self._index, "content_block": start}))
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return encode_event("content_block_delta", {
            "type": "content_block_delta", "index": self._index, "delta": delta})

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._held:  # no stop sequence after all
            out.append(self._delta({"type": "text_delta", "text": self._held}))
            self._chars += len(self._held)
            self._held = ""
        self._open = None
        self._tool_key = None
        out.append(encode_event("content_block_stop", {"type": "content_block_stop",
                                                       "index": self._index}))
        return out

    def _tool(self, call: dict[str, Any]) -> list[bytes]:
        """mlx sends a whole call per chunk: block start with `input: {}`, one
        input_json_delta with the complete arguments. A backend that streams a call in pieces
        (same index, no new id) gets its pieces appended to the open block."""
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(fn, dict)
        raw = fn.get("arguments")
        key = call.get("index")
        out: list[bytes] = []
        continued = (self._open == "tool_use" and key is not None and key == self._tool_key
                     and not call.get("id"))
        if not continued:
            out += self._close()
            self._index += 1
            self._open = "tool_use"
            self._tool_key = key
            name = fn.get("name") if isinstance(fn.get("name"), str) else ""
            out.append(encode_event("content_block_start", {
                "type": "content_block_start", "index": self._index,
                "content_block": {"type": "tool_use", "id": _tool_id(call), "name": name,
                                  "input": {}}}))
        part = raw if isinstance(raw, str) else (json.dumps(raw) if raw is not None else "")
        if part:
            out.append(self._delta({"type": "input_json_delta", "partial_json": part}))
            self._chars += len(part)
        return out


# --- errors -------------------------------------------------------------------------------


def error_type(err: GatewayError) -> str:
    """Anthropic's error type for our status."""
    s = err.status
    if s == 401:
        return "authentication_error"
    if s == 403:
        return "permission_error"
    if s == 404:
        return "not_found_error"
    if s == 413:
        return "request_too_large"
    if err.anthropic_type is not None:  # e.g. a key's own rate limit (429), not load
        return err.anthropic_type
    if s in (429, 503):
        return "overloaded_error"
    if s >= 500:
        return "api_error"
    return "invalid_request_error"


def error_object(err: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err), "message": err.message}}


def error_body(err: GatewayError) -> bytes:
    return jsonfast.dumps(error_object(err))


def error_answer(err: GatewayError) -> tuple[int, bytes]:
    """Status and body of the error answer on /v1/messages*."""
    return err.status, error_body(err)
