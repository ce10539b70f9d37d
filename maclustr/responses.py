"""OpenAI's Responses API (POST /v1/responses) as chat completions: pure, no I/O.

Codex CLI speaks only this dialect, and mlx_lm.server only chat completions, so a Responses
request becomes one chat request (`to_chat`, always streamed upstream), and the chat stream
becomes the Responses event sequence (`ResponsesStream`, fed one chat chunk at a time by the
relay) or, unary, the Response object its last event carries (`collect`). Nothing is stored:
the client resends the whole history each turn (Codex sends `store: false`), so
`previous_response_id` is refused with a clear 400.

Requests, item by item (every item a plain dict as the client sent it):
  * `instructions`, and `system`/`developer` messages anywhere in `input`, become ONE leading
    system message, in order (chat templates such as Qwen's and Llama's accept a single system
    message, first).
  * `user`/`assistant` messages keep their order; their text parts (`input_text`,
    `output_text`, `text`, `refusal`) are joined into one string, as mlx takes text only.
    Image, file and audio parts are refused (400): the model would silently not see them.
  * `function_call` items join the assistant message of their turn as `tool_calls` (one
    assistant message per turn, text included: a chat template rejects a tool message whose
    call it cannot find); `function_call_output` becomes a `tool` message.
  * `reasoning` items are dropped: a local model cannot read another's encrypted reasoning.
  * Tools: `function` tools pass; every other kind (`namespace`, `web_search`, `custom`,
    `file_search`, ...) is dropped, not refused. Function tools inside a `namespace` are
    dropped too: Codex routes a namespaced call by its namespace, which a chat tool call
    cannot carry back.
  * `max_output_tokens` -> `max_tokens` (DEFAULT_MAX_TOKENS when absent; an integer >= 1,
    as /v1/messages checks `max_tokens`: nothing else goes upstream); `temperature`,
    `top_p` pass; `tool_choice: "none"` sends no tools (as the Anthropic dialect does). What a
    local model cannot honour (`reasoning`, `include`, `store`, other `tool_choice` values,
    `parallel_tool_calls`, `text`, `prompt_cache_key`, `client_metadata`, `metadata`,
    `truncation`, `user`, ...) is ignored.

Answers: the upstream's `delta.reasoning` (mlx) or `delta.reasoning_content` (vLLM and others)
becomes a `reasoning` item with `reasoning_text` content (what OpenAI sends for open-weight
models' raw reasoning), text a `message` item,
each tool call a `function_call` item. Every item goes through its whole lifecycle (the openai
SDK's `responses.stream()` helper refuses an event for an item it was not told about), and the
stream ends with exactly one of `response.completed`, `response.incomplete` (the upstream hit
its token limit) or `response.failed`: Codex retries a stream that ends without one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from . import chatparts, jsonfast
from .errors import BadRequest, GatewayError
from .sse import encode_event

# --- request ---------------------------------------------------------------------------------

# Without `max_output_tokens` OpenAI lets a model write up to its own limit, and Codex never
# sends one; mlx_lm.server would cap the answer at its `--max-tokens` default (512), and Codex
# treats the resulting response.incomplete as a failed turn (exit 1) -- any longer answer or
# file write would fail. So the gateway asks for this much instead (Claude Code's own per-turn
# budget is 32000); generation still ends at the model's end of turn.
DEFAULT_MAX_TOKENS = 32768

_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_DROPPED_ITEMS = frozenset({"reasoning"})


def to_chat(req: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat-completions request upstream gets for Responses request `req` (`model`: the
    internal id). Raises BadRequest for what cannot be translated without losing meaning."""
    if req.get("previous_response_id") is not None:
        raise BadRequest("'previous_response_id' is not supported: this gateway stores no "
                         "responses. Send the whole conversation in 'input' (store: false).",
                         param="previous_response_id")
    if req.get("conversation") is not None:
        raise BadRequest("'conversation' is not supported: this gateway stores no "
                         "conversations. Send the whole conversation in 'input'.",
                         param="conversation")
    system: list[str] = []
    instructions = req.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string.", param="instructions")
        if instructions:
            system.append(instructions)
    turns = _Turns(system)
    raw = req.get("input")
    if isinstance(raw, str):
        turns.message("user", raw)
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            turns.item(item, i)
    elif raw is not None:
        raise BadRequest("'input' must be a string or an array of input items.", param="input")
    if not turns.messages and not system:
        raise BadRequest("'input' is empty: send a string or at least one message.",
                         param="input")
    messages = chatparts.with_system(system, turns.messages)
    out: dict[str, Any] = {"model": model, "messages": messages}
    tools = _tools(req.get("tools"))
    if tools and req.get("tool_choice") != "none":  # "none": the model may not call one
        out["tools"] = tools
    chatparts.copy_number(req, out, "max_output_tokens", "max_tokens", integer=True, low=1)
    chatparts.copy_number(req, out, "temperature", "temperature", low=0)
    chatparts.copy_number(req, out, "top_p", "top_p", low=0)
    out.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    # Always a stream upstream, unary answers included (`collect` folds the events): one path,
    # so a unary answer is exactly what the stream would have said.
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}  # mlx fails on `{}` after the content
    return out


class _Turns:
    """Builds the chat messages; names the state that carries across items: the assistant
    message of the current turn, which later text and function_call items join."""

    def __init__(self, system: list[str]) -> None:
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.assistant: dict[str, Any] | None = None  # open until a user or tool message
        self.calls: set[str] = set()  # call_ids made so far: an output must answer one

    def item(self, item: object, i: int) -> None:
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{param}' must be an object.", param=param)
        kind = item.get("type", "message")  # EasyInputMessage has no type
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"'{param}.role' must be one of user, assistant, system, "
                                 "developer.", param=f"{param}.role")
            text = _text(item.get("content"), f"{param}.content")
            if role in ("system", "developer"):
                if text:
                    self.system.append(text)
            else:
                self.message(role, text)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            args = item.get("arguments", "")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) \
                    or not name or not isinstance(args, str):
                raise BadRequest(f"'{param}' (function_call) needs string 'call_id', 'name' "
                                 "and 'arguments'.", param=param)
            self.calls.add(call_id)
            msg = self._assistant()
            msg.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": args or "{}"}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"'{param}' (function_call_output) needs a string 'call_id'.",
                                 param=param)
            if call_id not in self.calls:  # a chat template cannot place it (OpenAI: 400)
                raise BadRequest(f"'{param}': no earlier function_call has call_id "
                                 f"'{call_id[:60]}'.", param=param)
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, f"{param}.output")
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            self.assistant = None
        elif kind in _DROPPED_ITEMS:
            pass
        elif kind == "item_reference":
            raise BadRequest(f"'{param}': item references are not supported (nothing is "
                             "stored); send the item itself.", param=param)
        else:
            raise BadRequest(f"'{param}': input items of type '{str(kind)[:40]}' are not "
                             "supported; send message, function_call and "
                             "function_call_output items.", param=param)

    def message(self, role: str, text: str) -> None:
        if role == "assistant":
            msg = self._assistant()
            msg["content"] = f"{msg['content']}\n\n{text}" if msg["content"] and text \
                else msg["content"] or text
            return
        self.messages.append({"role": role, "content": text})
        self.assistant = None

    def _assistant(self) -> dict[str, Any]:
        if self.assistant is None:
            self.assistant = {"role": "assistant", "content": ""}
            self.messages.append(self.assistant)
        return self.assistant


def _text(content: object, param: str) -> str:
    """A message's content as one string: a string, or text parts joined (mlx takes text
    only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{param}' must be a string or an array of content parts.",
                         param=param)
    texts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        part = part if isinstance(part, dict) else {}
        kind = part.get("type")
        key = "refusal" if kind == "refusal" else "text"
        if (kind in _TEXT_PARTS or kind == "refusal") and isinstance(part.get(key), str):
            texts.append(part[key])
        else:
            raise BadRequest(f"'{param}[{j}]': content of type '{str(kind)[:40]}' is not "
                             "supported; this gateway's models take text only.",
                             param=f"{param}[{j}]")
    return "".join(texts)


def _tools(tools: object) -> list[dict[str, Any]]:
    """Function tools as chat functions; hosted and namespaced tools dropped (module
    docstring)."""
    return [chatparts.function_tool(t, "parameters", f"tools[{i}]")
            for i, t in enumerate(chatparts.tool_list(tools)) if t.get("type") == "function"]


# --- answers ---------------------------------------------------------------------------------


def new_response_id() -> str:
    return "resp_" + uuid.uuid4().hex


def _response(rid: str, alias: str, created: int, status: str, output: list[dict[str, Any]],
              usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
              incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": alias, "output": output, "usage": usage, "error": error,
            "incomplete_details": incomplete, "instructions": None, "metadata": {},
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "temperature": None, "top_p": None, "max_output_tokens": None,
            "previous_response_id": None, "reasoning": None, "store": False,
            "text": {"format": {"type": "text"}}, "truncation": "disabled",
            "background": False}


def usage_of(chat: object) -> dict[str, Any] | None:
    """Chat usage -> Responses usage (None when the upstream sent none)."""
    counts = chatparts.usage_counts(chat)
    if counts is None:
        return None
    inp, out = counts.prompt or 0, counts.completion or 0
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": counts.cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": counts.reasoning},
            "total_tokens": counts.total or inp + out}


def _ending(finish: object) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details) for a chat finish_reason."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def _message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str
          ) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def collect(events: bytes) -> dict[str, Any]:
    """The unary Response for a whole ResponsesStream output: the final snapshot its terminal
    event (`response.completed` or `response.incomplete`) carries."""
    at = events.rstrip().rfind(b"\n\n")
    last = events[at + 2:] if at >= 0 else events
    data = last.find(b"\ndata: ")
    if data < 0:
        raise ValueError("no terminal event")
    event = jsonfast.loads(last[data + 7:])
    if event["type"] not in ("response.completed", "response.incomplete"):
        raise ValueError("the stream did not complete")
    response: dict[str, Any] = event["response"]
    return response


def _item_id(rid: str, prefix: str, index: int) -> str:
    """Item ids derive from the response id: stable for one response, unique across."""
    return f"{prefix}_{rid[5:]}{index:02d}"


class ResponsesStream:
    """Chat chunks in, Responses events out (DIALECT-CONTRACT's ChatStream).

    State: the one item open now (`_open`: a reasoning or message item, or function calls
    keyed by the upstream's tool-call index), the items finished so far (the final response's
    `output`), the sequence number, and whether the one terminal event has been sent.
    """

    def __init__(self, alias: str, rid: str | None = None, created: int | None = None
                 ) -> None:
        self.alias = alias
        self.rid = rid or new_response_id()
        self.created = created if created is not None else int(time.time())
        self.usage: dict[str, Any] | None = None
        self._seq = 0
        self._started = False
        self._ended = False
        self._finish: object = None
        self._output: list[dict[str, Any]] = []
        self._open: str | None = None  # "reasoning" | "message" | "calls"
        self._item_id = ""
        self._text: list[str] = []
        self._calls: dict[int, tuple[int, dict[str, Any]]] = {}  # tool-call index ->
        # (output index, open function_call item)

    # -- ChatStream ---------------------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        out = self._start()
        if self._ended:
            return out
        self.usage = chatparts.chunk_usage(chunk) or self.usage
        parts = chatparts.chunk_parts(chunk)
        if parts.reasoning:
            out += self._delta("reasoning", parts.reasoning)
        if parts.content:
            out += self._delta("message", parts.content)
        for call in parts.tool_calls:
            out += self._call_delta(call)
        if parts.finish is not None:
            self._finish = parts.finish
            out += self._close()
        return out

    def keepalive(self) -> list[bytes]:
        """Prompt processing: a comment keeps proxies and idle timers from cutting us."""
        return [*self._start(), b": keepalive\n\n"]

    def finish(self) -> list[bytes]:
        out = self._start()
        if self._ended:
            return out
        out += self._close()
        self._ended = True
        status, incomplete = _ending(self._finish)
        name = "response.completed" if status == "completed" else "response.incomplete"
        final = self._snapshot(status, usage=usage_of(self.usage), incomplete=incomplete)
        return [*out, self._event(name, response=final)]

    def fail(self, err: GatewayError) -> list[bytes]:
        out = self._start()
        if self._ended:
            return out
        self._ended = True
        final = self._snapshot("failed", usage=usage_of(self.usage),
                               error={"code": err.code, "message": err.message})
        return [*out, self._event("response.failed", response=final)]

    # -- items --------------------------------------------------------------------------------

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self._snapshot("in_progress")),
                self._event("response.in_progress", response=self._snapshot("in_progress"))]

    def _delta(self, kind: str, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open != kind:
            out += self._close()
            out += self._open_item(kind)
        self._text.append(text)
        name = ("response.output_text.delta" if kind == "message"
                else "response.reasoning_text.delta")
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        out.append(self._event(name, item_id=self._item_id, output_index=len(self._output),
                               content_index=0, delta=text, **extra))
        return out

    def _open_item(self, kind: str) -> list[bytes]:
        index = len(self._output)
        self._open = kind
        self._text = []
        if kind == "message":
            self._item_id = _item_id(self.rid, "msg", index)
            return [self._event("response.output_item.added", output_index=index,
                                item=_message(self._item_id, "", "in_progress")),
                    self._event("response.content_part.added", item_id=self._item_id,
                                output_index=index, content_index=0, part=_text_part(""))]
        self._item_id = _item_id(self.rid, "rs", index)
        return [self._event("response.output_item.added", output_index=index,
                            item=_reasoning(self._item_id, None)),
                self._event("response.content_part.added", item_id=self._item_id,
                            output_index=index, content_index=0,
                            part={"type": "reasoning_text", "text": ""})]

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        """mlx sends each call whole in one chunk; OpenAI-style fragments (id and name
        first, then argument pieces under the same index) work too."""
        index = call.get("index")
        index = index if isinstance(index, int) else len(self._calls)
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out: list[bytes] = []
        if index not in self._calls:
            if self._open != "calls":
                out += self._close()
                self._open = "calls"
            n = len(self._output) + len(self._calls)
            item_id = _item_id(self.rid, "fc", n)
            item = _call(item_id, str(call.get("id") or "call_" + item_id[3:]),
                         str(fn.get("name") or ""), "", "in_progress")
            self._calls[index] = (n, item)
            out.append(self._event("response.output_item.added", output_index=n,
                                   item=dict(item)))
        n, item = self._calls[index]
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            item["arguments"] += args
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=item["id"], output_index=n, delta=args))
        return out

    def _close(self) -> list[bytes]:
        """Finish the open item(s): their done events, and into the final output."""
        kind, self._open = self._open, None
        if kind is None:
            return []
        if kind == "calls":
            out: list[bytes] = []
            for n, item in sorted(self._calls.values(), key=lambda c: c[0]):
                item["status"] = "completed"
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item["id"], output_index=n, name=item["name"],
                                       arguments=item["arguments"]))
                out.append(self._event("response.output_item.done", output_index=n,
                                       item=item))
                self._output.append(item)
            self._calls = {}
            return out
        text, index, item_id = "".join(self._text), len(self._output), self._item_id
        if kind == "message":
            part = _text_part(text)
            item = _message(item_id, text)
            done = self._event("response.output_text.done", item_id=item_id,
                               output_index=index, content_index=0, text=text, logprobs=[])
        else:
            part = {"type": "reasoning_text", "text": text}
            item = _reasoning(item_id, text)
            done = self._event("response.reasoning_text.done", item_id=item_id,
                               output_index=index, content_index=0, text=text)
        self._output.append(item)
        return [done,
                self._event("response.content_part.done", item_id=item_id, output_index=index,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _snapshot(self, status: str, **kw: Any) -> dict[str, Any]:
        return _response(self.rid, self.alias, self.created, status, list(self._output), **kw)

    def _event(self, event_type: str, **fields: Any) -> bytes:
        obj = {"type": event_type, "sequence_number": self._seq, **fields}
        self._seq += 1
        return encode_event(event_type, obj)
