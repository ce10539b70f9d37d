"""Server-Sent Events framing and the `model` rewrite: bytes in, bytes out, no I/O.

The hot path of the gateway. mlx_lm.server writes every event as
`data: {json.dumps(obj)}\\n\\n`, so the top-level `"model": "<internal id>"` it echoes is a
fixed byte string we can splice without decoding the JSON. The splice is used only when it
provably gives the same object as a real JSON rewrite:

* the frame is a single `data: {...}` line,
* the bytes `"model"` occur exactly once in it (no nested or duplicate `model` key), and
* they are followed by exactly the echo we expect, with no `{` between the frame's opening
  brace and them (so the key sits at the top level: a key cannot be inside a string, because
  quotes inside JSON strings are escaped).

Anything else (comments aside, which pass through untouched) takes the JSON path. Frames are
split on blank lines ourselves, never by line reads, so one event may span many reads and one
read may carry many events.
"""

from __future__ import annotations

import json

DONE = b"data: [DONE]"
_DATA_OBJ = b"data: {"
_MODEL_KEY = b'"model"'


class SSEError(ValueError):
    """The upstream's event stream cannot be relayed (not JSON, or an event too large)."""


def _spliceable(frame: bytes, echo: bytes, start: int) -> int:
    """Index of `echo` in `frame` when the byte splice is exact, else -1."""
    pos = frame.find(echo, start)
    if pos < 0 or frame.count(_MODEL_KEY) != 1 or frame.find(b"{", start, pos) >= 0:
        return -1
    return pos


def rewrite_json(payload: bytes, alias: str) -> bytes:
    """The reference rewrite: decode, set the top-level `model` (only if present), encode.

    Raises SSEError when `payload` is not JSON.
    """
    try:
        obj = json.loads(payload)
    except ValueError:
        raise SSEError("event data is not JSON") from None
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = alias
        return json.dumps(obj).encode()
    return payload


def rewrite_body(body: bytes, echo: bytes, alias_echo: bytes, alias: str) -> bytes:
    """Rewrite a unary JSON response's top-level `model`. Raises SSEError if it is not JSON."""
    if body[:1] == b"{":
        pos = _spliceable(body, echo, 1)
        if pos > 0:
            try:
                json.loads(body)  # still refuse a broken body, as the JSON path would
            except ValueError:
                raise SSEError("response is not JSON") from None
            return body[:pos] + alias_echo + body[pos + len(echo):]
    return rewrite_json(body, alias)


def rewrite_event(frame: bytes, alias: str) -> bytes:
    """The general path for one frame (without its blank line): any SSE field layout.

    Comments and non-data fields are kept; the data lines are joined (SSE rule), rewritten
    with `rewrite_json`, and written back as one `data:` line in place of the first.
    """
    lines = frame.split(b"\n")
    data: list[bytes] = []
    first = -1
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
            if first < 0:
                first = i
    if first < 0:
        return frame
    payload = b"\n".join(data)
    if payload == b"[DONE]":
        return frame
    new = b"data: " + rewrite_json(payload, alias)
    kept = [line for i, line in enumerate(lines) if i == first or not line.startswith(b"data:")]
    kept[kept.index(lines[first])] = new
    return b"\n".join(kept)


def _is_done(frame: bytes) -> bool:
    if frame == DONE:
        return True
    if b"[DONE]" not in frame:
        return False
    return any(line[5:].strip() == b"[DONE]" for line in frame.split(b"\n")
               if line.startswith(b"data:"))


class SSERewriter:
    """Incremental relay of one upstream event stream for one route.

    `feed(bytes)` returns the rewritten bytes of every event completed so far (possibly b""),
    ready to write to the client as they are. After `data: [DONE]`, `done` is True and
    everything else is ignored. Memory is bounded by `max_event` bytes of incomplete event.
    """

    __slots__ = ("_alias", "_alias_echo", "_cr", "_echo", "_tail", "done", "max_event")

    def __init__(self, echo: bytes, alias_echo: bytes, alias: str,
                 max_event: int = 8 * 1024 * 1024) -> None:
        self._echo = echo
        self._alias_echo = alias_echo
        self._alias = alias
        self._tail = b""
        self._cr = False
        self.done = False
        self.max_event = max_event

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete (what is lost if the upstream stops here)."""
        return self._tail

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if self._tail:
            data = self._tail + data
        if self._cr or b"\r" in data:
            data = self._normalize(data)
        end = data.rfind(b"\n\n")
        if end < 0:
            if len(data) > self.max_event:
                raise SSEError("event too large")
            self._tail = data
            return b""
        self._tail = data[end + 2:]
        if len(self._tail) > self.max_event:
            raise SSEError("event too large")
        return self._rewrite_block(data[:end] if self._tail else data[:-2])

    def _normalize(self, data: bytes) -> bytes:
        """CRLF and CR line ends (allowed by SSE) become LF; a trailing CR waits for the next
        read, since it may be the first half of a CRLF."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _rewrite_block(self, block: bytes) -> bytes:
        """`block` is one or more complete frames joined by blank lines, without the last one."""
        echo = self._echo
        frames = block.split(b"\n\n")
        splice = True
        for i, frame in enumerate(frames):
            if frame[:7] == _DATA_OBJ:
                if frame.find(b"\n") < 0 and _spliceable(frame, echo, 7) > 0:
                    continue
            elif frame[:1] == b":" and b"\n" not in frame:
                if echo not in frame:
                    continue  # a comment such as ": keepalive 3/40"
            elif _is_done(frame):
                self.done = True
                del frames[i + 1:]
                if splice:
                    return (b"\n\n".join(frames).replace(echo, self._alias_echo)
                            if i else frame) + b"\n\n"
                break
            splice = False
        if splice:
            return block.replace(echo, self._alias_echo) + b"\n\n"
        alias = self._alias
        out = []
        for frame in frames:
            if frame[:7] == _DATA_OBJ and b"\n" not in frame:
                pos = _spliceable(frame, echo, 7)
                if pos > 0:
                    out.append(frame[:pos] + self._alias_echo + frame[pos + len(echo):])
                else:
                    out.append(b"data: " + rewrite_json(frame[6:], alias))
            elif frame[:1] == b":" and b"\n" not in frame:
                out.append(frame)
            else:
                out.append(rewrite_event(frame, alias))
        return b"\n\n".join(out) + b"\n\n"
