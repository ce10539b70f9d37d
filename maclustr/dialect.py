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
from .sse import EventFramer, SSEError, event_data


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
    `new_stream` makes a fresh stream state machine (one per request); a streamed answer
    relays its events, a unary one is all of them folded by `collect` into one answer (so a
    unary answer is exactly what the stream would have said). Errors are rendered by path in
    the app's error funnel, before and after routing alike."""

    new_stream: Callable[[], ChatStream]
    collect: Callable[[bytes], dict[str, Any]]


class ChatEventRewriter(EventFramer):
    """Takes the upstream's event stream at any cut (framed by EventFramer), decodes each
    `data:` JSON and drives a ChatStream; returns the bytes to write to the client.

    Same interface as SSERewriter (`feed`, `done`), plus `fail` for the relay's in-band
    error."""

    __slots__ = ("data_seen", "done", "stream")

    def __init__(self, stream: ChatStream, max_event: int = 8 * 1024 * 1024) -> None:
        super().__init__(max_event)
        self.stream = stream
        self.done = False
        # an upstream `data:` event reached the dialect: the client may have content (before
        # it, only the dialect's preamble and keep-alives: a stream the relay may move)
        self.data_seen = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.stream.usage

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        block = self._complete(data)
        if block is None:
            return b""
        out: list[bytes] = []
        for frame in block.split(b"\n\n"):
            out += self._event(frame)
            if self.done or getattr(self.stream, "ended", False):
                self.done = True
                self._tail = b""
                break
        return b"".join(out)

    def fail(self, err: GatewayError) -> bytes:
        return b"".join(self.stream.fail(err))

    def _event(self, frame: bytes) -> list[bytes]:
        lines = frame.split(b"\n")
        payload, _ = event_data(lines)
        if payload is None:
            keepalive = any(line.startswith(b":") and line[1:].strip().startswith(b"keepalive")
                            for line in lines)
            return self.stream.keepalive() if keepalive else []
        self.data_seen = True
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
