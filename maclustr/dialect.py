"""What every translated API (Anthropic Messages, OpenAI Responses) shares with the relay. Pure.

A dialect is a pure translation: its request becomes an ordinary chat completion, and the
upstream's chat-completion chunks drive a `ChatStream` state machine that emits the dialect's
own events. `ChatEventRewriter` gives that state machine the byte interface of
`sse.SSERewriter` (bytes in at any cut, bytes out), so the relay's socket-callback pump drives
either without knowing which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import jsonfast
from .errors import GatewayError
from .sse import SSEError, normalize_line_ends


class ChatStream(Protocol):
    """A dialect's stream state machine, fed the upstream's chat-completion chunks.

    Optional: an `ended` attribute that turns True when the answer is complete before the
    upstream's [DONE] (an Anthropic stop sequence matched): the relay then hangs up on the
    upstream, which stops generating."""

    usage: dict[str, Any] | None  # the upstream's chat usage, once its usage chunk was seen

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """One upstream chunk (the usage chunk included) -> encoded client events."""
        ...

    def keepalive(self) -> list[bytes]:
        """The upstream sent `: keepalive n/m` (prompt processing): maybe a ping."""
        ...

    def finish(self) -> list[bytes]:
        """The upstream sent `data: [DONE]`: the closing events."""
        ...

    def fail(self, err: GatewayError) -> list[bytes]:
        """The stream cannot finish: the dialect's in-band error events."""
        ...


@dataclass(frozen=True)
class Dialect:
    """How one translated request rides the relay. The upstream is always asked to stream:
    `stream` makes a fresh stream state machine; a streamed answer relays its events, a
    unary one is all of them folded by `collect` into one answer (so a unary answer is
    exactly what the stream would have said). Errors are rendered by path in the app's error
    funnel, before and after routing alike."""

    stream: Callable[[], ChatStream]
    collect: Callable[[bytes], dict[str, Any]]


def encode_event(name: str | None, obj: dict[str, Any]) -> bytes:
    """One SSE event: `event: NAME` (when named) and one `data:` line of compact JSON."""
    data = jsonfast.dumps(obj)
    if name is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class ChatEventRewriter:
    """Frames the upstream's event stream (any cut, LF/CRLF/CR line ends), decodes each
    `data:` JSON and drives a ChatStream; returns the bytes to write to the client.

    Same interface as SSERewriter (`feed`, `done`), plus `fail` for the relay's in-band
    error. Memory is bounded by `max_event` bytes of incomplete event."""

    __slots__ = ("_cr", "_tail", "done", "max_event", "stream")

    def __init__(self, stream: ChatStream, max_event: int = 8 * 1024 * 1024) -> None:
        self.stream = stream
        self.done = False
        self.max_event = max_event
        self._tail = b""
        self._cr = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.stream.usage

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self._cr or data.find(b"\r") >= 0:
            data, self._cr = normalize_line_ends(data, self._cr)
        data = self._tail + data if self._tail else data
        frames = data.split(b"\n\n")
        self._tail = frames.pop()
        if len(self._tail) > self.max_event:
            raise SSEError("event too large")
        out: list[bytes] = []
        for frame in frames:
            out += self._event(frame)
            if self.done or getattr(self.stream, "ended", False):
                self.done = True
                self._tail = b""
                break
        return b"".join(out)

    def fail(self, err: GatewayError) -> bytes:
        return b"".join(self.stream.fail(err))

    def _event(self, frame: bytes) -> list[bytes]:
        data: list[bytes] = []
        keepalive = False
        for line in frame.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
            elif line.startswith(b":") and line[1:].strip().startswith(b"keepalive"):
                keepalive = True
        if not data:
            return self.stream.keepalive() if keepalive else []
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return self.stream.finish()
        try:
            obj = jsonfast.loads(payload)
        except (ValueError, RecursionError):
            raise SSEError("event data is not JSON") from None
        if not isinstance(obj, dict):
            raise SSEError("event data is not an object")
        return self.stream.feed(obj)

