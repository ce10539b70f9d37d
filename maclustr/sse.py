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

The same holds for `"system_fingerprint"`, which mlx fills with the node's OS, kernel and
libc: it is learned from the first event (JSON path) and then spliced to an opaque token.
Anything else (comments aside, which pass through untouched) takes the JSON path. A frame
that holds the expected bytes but is not valid JSON elsewhere is relayed as it came: checking
would cost a full decode per event, and mlx only ever writes `json.dumps` output. Frames are
split on blank lines ourselves, never by line reads, so one event may span many reads and one
read may carry many events.
"""

from __future__ import annotations

import hashlib
import json

DONE = b"data: [DONE]"
_DATA_OBJ = b"data: {"
_MODEL_KEY = b'"model"'
_FP_KEY = b'"system_fingerprint"'
_UNARY_OBJECT = b'"object": "chat.completion"'  # not a prefix of "...chunk": the quote closes


class SSEError(ValueError):
    """The upstream's event stream cannot be relayed (not JSON, or an event too large)."""


def mask_fingerprint(value: str) -> str:
    """mlx's `system_fingerprint` names the node's OS, kernel and libc. Clients get a stable
    opaque token instead: it still changes when the backend changes, as OpenAI's does."""
    return "fp_" + hashlib.sha256(value.encode()).hexdigest()[:12]


def rewrite_obj(obj: object, alias: str, stream: bool = False) -> bool:
    """Set the top-level `model` (only if present) and mask `system_fingerprint`; in a stream,
    mlx's usage event says `"object": "chat.completion"` where OpenAI (and typed clients) say
    `chat.completion.chunk`. True if `obj` is a dict (the only shape we change)."""
    if not isinstance(obj, dict):
        return False
    if "model" in obj:
        obj["model"] = alias
    if stream and obj.get("object") == "chat.completion":
        obj["object"] = "chat.completion.chunk"
    fp = obj.get("system_fingerprint")
    if isinstance(fp, str):
        obj["system_fingerprint"] = mask_fingerprint(fp)
    return True


def rewrite_json(payload: bytes, alias: str) -> bytes:
    """The reference rewrite of one JSON document (see `rewrite_obj`).

    Raises SSEError when `payload` is not JSON.
    """
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        raise SSEError("event data is not JSON") from None
    if rewrite_obj(obj, alias):
        return json.dumps(obj).encode()
    return payload


def rewrite_body(body: bytes, alias: str) -> bytes:
    """Rewrite a unary JSON response. Raises SSEError if it is not JSON.

    Always the JSON path: one body per request, and decoding it is the validation we need.
    """
    return rewrite_json(body, alias)


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

    __slots__ = ("_alias", "_alias_echo", "_cr", "_echo", "_fp", "_fp_repl", "_tail", "done",
                 "max_event")

    def __init__(self, echo: bytes, alias_echo: bytes, alias: str,
                 max_event: int = 8 * 1024 * 1024) -> None:
        self._echo = echo
        self._alias_echo = alias_echo
        self._alias = alias
        self._fp: bytes | None = None  # learned from the first event that carries it
        self._fp_repl = b""
        self._tail = b""
        self._cr = False
        self.done = False
        self.max_event = max_event

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete (what is lost if the upstream stops here)."""
        return self._tail

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self._cr or b"\r" in data:
            data = self._normalize(data)
        if self._tail:
            data = self._tail + data
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
        """CRLF and CR line ends (allowed by SSE) become LF. A read ending in CR ends its line
        at once; if the next read starts with LF, that LF was the CRLF's second half."""
        if self._cr:
            self._cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if data.endswith(b"\r"):
            self._cr = True
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    def _spliceable(self, frame: bytes) -> bool:
        """Whether byte replacement of the echo (and the learned fingerprint) in this
        `data: {...}` frame equals the JSON rewrite (see the module docstring)."""
        pos = frame.find(self._echo, 7)
        if pos < 0 or frame.count(_MODEL_KEY) != 1 or frame.find(b"{", 7, pos) >= 0:
            return False
        if _UNARY_OBJECT in frame:  # the usage event: JSON path fixes its `object`
            return False
        if self._fp is None:
            return _FP_KEY not in frame
        return frame.count(_FP_KEY) == 1 and frame.find(self._fp, 7, pos) > 0

    def _splice(self, block: bytes) -> bytes:
        out = block.replace(self._echo, self._alias_echo)
        return out.replace(self._fp, self._fp_repl) if self._fp is not None else out

    def _rewrite_block(self, block: bytes) -> bytes:
        """`block` is one or more complete frames joined by blank lines, without the last one.

        Runs of frames that pass the checks are spliced with one `replace` each; only the
        frames that fail them take the JSON path.
        """
        frames = block.split(b"\n\n")
        out: list[bytes] | None = None
        run = 0  # first frame of the current spliceable run
        echo, fp = self._echo, self._fp
        for i, frame in enumerate(frames):
            if b"\n" not in frame:
                if frame[:7] == _DATA_OBJ:
                    if self._spliceable(frame):
                        continue
                elif frame[:1] == b":" and echo not in frame and (fp is None or fp not in frame):
                    continue  # a comment such as ": keepalive 3/40"
            if out is None:
                out = []
            if i > run:
                out.append(self._splice(b"\n\n".join(frames[run:i])))
            run = i + 1
            if _is_done(frame):
                self.done = True
                out.append(frame)
                return b"\n\n".join(out) + b"\n\n"
            out.append(self._rewrite_event(frame))
            fp = self._fp  # the event may have taught us the fingerprint
        if out is None:
            return self._splice(block) + b"\n\n"
        if run < len(frames):
            out.append(self._splice(b"\n\n".join(frames[run:])))
        return b"\n\n".join(out) + b"\n\n"

    def _rewrite_event(self, frame: bytes) -> bytes:
        """The JSON path for one event; learns the upstream's fingerprint on the way."""
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
            return self._splice(frame)  # comments and other fields only
        try:
            obj = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            raise SSEError("event data is not JSON") from None
        if not rewrite_obj_learning(obj, self._alias, self):
            return frame
        new = b"data: " + json.dumps(obj).encode()
        kept = [new if i == first else self._splice(line) for i, line in enumerate(lines)
                if i == first or not line.startswith(b"data:")]
        return b"\n".join(kept)

    def learn(self, fingerprint: str) -> None:
        if self._fp is None:
            key = b'"system_fingerprint": '
            self._fp = key + json.dumps(fingerprint).encode()
            self._fp_repl = key + json.dumps(mask_fingerprint(fingerprint)).encode()


def rewrite_obj_learning(obj: object, alias: str, rewriter: SSERewriter) -> bool:
    if isinstance(obj, dict):
        fp = obj.get("system_fingerprint")
        if isinstance(fp, str):
            rewriter.learn(fp)
    return rewrite_obj(obj, alias, stream=True)
