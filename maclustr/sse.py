"""Server-Sent Events framing and the response rewrite: bytes in, bytes out, no I/O.

The hot path of the gateway. What a client must see differs from what mlx_lm.server sends in
three places (`rewrite_obj` is the reference): `model` is the public alias (mlx echoes the
internal id, and the same id anywhere as a `model` key's value is replaced too), the
`system_fingerprint` (mlx puts the node's OS, kernel and libc there) is an opaque token, and
the stream's usage event is labelled `chat.completion.chunk` as OpenAI labels it.

A block of events read together is spliced without decoding it, when that provably gives
the same objects as the JSON path (`KeySplice` checks and rewrites one key):

* every `"model"` token in the block is a key whose value is the internal id, and every
  `"system_fingerprint"` token a key whose value is the learned fingerprint. A token is a key
  when a colon follows (spaces and tabs allowed, as any JSON writer may put them) and its
  opening quote is not escaped (`\\"model"` can end a string, so a block holding it is left
  to the JSON path); the value may be written as `json.dumps` writes it, with or without
  ASCII escapes, or with `\\/` for `/`. Anything else fails the count;
* no `"object"` key holds `chat.completion` or an escaped value that could decode to it (so
  the usage event is never passed unlabelled; `chat.completion.chunk` and `text_completion`
  splice), and every `data:` holds an object (so
  non-JSON data is still refused by the JSON path). Non-data lines (comments, `id:`) get the
  same replacement on both paths, and a key split across `data:` lines fails the count, so
  events need not be one line.

mlx writes every event as `data: {json.dumps(obj)}\\n\\n`: `"model": "<internal id>"` is then
one fixed byte string and one `bytes.replace` does it. Another server's spacing (compact
`"model":"x"`, for one) costs one regular-expression pass on the first block, which learns the
bytes that server writes; later blocks take `bytes.replace` again.

Usage: the gateway always asks the upstream for the stream's usage event (the metrics count
tokens on every request); `strip_usage` drops it for a client that did not ask, and `usage`
keeps what it said either way. The usage event never takes the splice (above), so this costs
one decode per stream, not per event.

The common read (issue 15) is one whole single-line event, and mlx writes every key the
rewrite touches (`system_fingerprint`, `object`, `model`) before the content, the same bytes
in every event of a stream. So the first such event the splice takes teaches a *prefix*: its
bytes up to the end of its last `"key": "value"` pair for those keys, and that prefix
rewritten. A later read that starts with the same prefix, is one line ending in the blank
line, and holds none of the four tokens (`"model"`, `"object"`, `"system_fingerprint"`,
`"usage"`) nor `data:` after it is the rewritten prefix + the rest as it came: JSON is read
left to right, so the same prefix parses to the same keys, and the rest has no key the rewrite
touches. That is the splice's own proof with the prefix's part done once (same conditions,
same bytes out), at the cost of one compare and a few scans of the rest.

Anything else takes the JSON path, event by event. An event that holds the expected bytes but
is not valid JSON elsewhere is relayed as it came: checking would cost a full decode per event,
and mlx only writes `json.dumps` output. Events are split on blank lines here, never by line
reads, so one event may span many reads and one read may carry many events.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

from . import jsonfast

DONE = b"data: [DONE]"
# On the hot paths `data.find(x) >= 0`, not `x in data`: CPython 3.11's bytes `in` first tries
# `x` as an integer and builds (then drops) a TypeError, about 4x the cost of the search.
_MODEL_KEY = b'"model"'
_FP_KEY = b'"system_fingerprint"'
_USAGE_LABEL = b'"chat.completion"'  # the usage event's object; "...chunk" has no quote here
# `usage` as a token: a key, or (rarely) a string value; either way that event is decoded
_USAGE = b'"usage"'


class SSEError(ValueError):
    """The upstream's event stream cannot be relayed (not JSON, or an event too large)."""


@functools.lru_cache(maxsize=64)  # a handful of distinct values: one per upstream build
def mask_fingerprint(value: str) -> str:
    """A stable opaque token for mlx's fingerprint: it still changes when the backend does,
    as OpenAI's does, without naming the node's OS, kernel or libc."""
    return "fp_" + hashlib.sha256(value.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1024)
def echo(key: str, value: str) -> bytes:
    """The bytes json.dumps writes for one `"key": "value"` pair (ASCII-escaped)."""
    return json.dumps(key).encode() + b": " + json.dumps(value).encode()


def rewrite_obj(obj: object, alias: str, internal: str, stream: bool = False) -> bool:
    """The reference rewrite, in place. Top level: `model` (if present) becomes the alias; in
    a stream, `"object": "chat.completion"` becomes `chat.completion.chunk`. At any depth: a
    `model` equal to the internal id becomes the alias and every string `system_fingerprint`
    is masked. True if `obj` is a dict (the only shape we change)."""
    if not isinstance(obj, dict):
        return False
    stack: list[object] = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("model") == internal:
                node["model"] = alias
            fp = node.get("system_fingerprint")
            if isinstance(fp, str):
                node["system_fingerprint"] = mask_fingerprint(fp)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if "model" in obj:
        obj["model"] = alias
    if stream and obj.get("object") == "chat.completion":
        obj["object"] = "chat.completion.chunk"
    return True


def rewrite_json(payload: bytes, alias: str, internal: str, stream: bool = False) -> bytes:
    """`rewrite_obj` on one JSON document. Raises SSEError when `payload` is not JSON."""
    try:
        obj = jsonfast.loads(payload)
    except (ValueError, RecursionError):
        raise SSEError("event data is not JSON") from None
    if rewrite_obj(obj, alias, internal, stream):
        return jsonfast.dumps(obj)
    return payload


def rewrite_body(body: bytes, alias: str, internal: str, fingerprint: str | None
                 ) -> tuple[bytes, str | None]:
    """A unary response: (rewritten body, the upstream's fingerprint: this body's, else the
    one already known).

    With the replica's fingerprint already known, the stream's splice applies (same proof:
    every `"model"` key carries the internal id, every fingerprint key the known value,
    whatever the spacing); otherwise, or when the counts disagree, the JSON path, which also
    learns the fingerprint. Raises SSEError when the body is not JSON (on the JSON path).
    """
    if (fingerprint is not None and body[:1] == b"{" and body[-1:] == b"}"
            and body.find(_MODEL_KEY) >= 0):
        model, fp = _body_splices(alias, internal, fingerprint)
        out = model.apply(body)
        if out is not None:
            out = fp.apply(out)
            if out is not None:
                return out, fingerprint
    try:
        obj = jsonfast.loads(body)
    except (ValueError, RecursionError):
        raise SSEError("response is not JSON") from None
    fp_value = obj.get("system_fingerprint") if isinstance(obj, dict) else None
    learned = fp_value if isinstance(fp_value, str) else fingerprint
    if not rewrite_obj(obj, alias, internal):
        return body, learned
    return jsonfast.dumps(obj), learned


@functools.lru_cache(maxsize=256)
def _body_splices(alias: str, internal: str, fingerprint: str) -> tuple[KeySplice, KeySplice]:
    """One pair per route and fingerprint, kept across requests (each apply() proves its own
    result, whatever the pair learned before)."""
    return (KeySplice("model", internal, alias, newlines=True),
            KeySplice("system_fingerprint", fingerprint, mask_fingerprint(fingerprint),
                      newlines=True))


_DECODER = json.JSONDecoder()


def usage_of(body: bytes) -> dict[str, object] | None:
    """The `usage` object of a unary response without decoding the whole body: mlx writes it
    last, so only the tail from its last `"usage":` key is decoded. None when absent."""
    at = body.rfind(_USAGE)
    if at < 0:
        return None
    rest = body[at + len(_USAGE):].lstrip()
    if rest[:1] != b":":  # a string value "usage", not the key
        return None
    last = rest.rstrip()
    if last[-1:] == b"}":  # usage is the body's last key: the rest but the `}` is its object
        try:
            obj = jsonfast.loads(last[1:-1])
        except (ValueError, RecursionError):
            pass  # more keys after it: find where the object ends
        else:
            return obj if isinstance(obj, dict) else None
    try:
        obj, _ = _DECODER.raw_decode(rest[1:].decode().lstrip())
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def encodings(value: str) -> list[bytes]:
    """The ways the JSON writers we know encode one string (`json.dumps` with and without
    ASCII escapes, with `/` escaped as `\\/` or not): each decodes to `value`."""
    out: list[bytes] = []
    for ascii_only in (True, False):
        try:
            enc = json.dumps(value, ensure_ascii=ascii_only).encode()
        except UnicodeEncodeError:  # a lone surrogate: only the escaped form exists
            continue
        for e in (enc, enc.replace(b"/", b"\\/")):
            if e not in out:
                out.append(e)
    return out


class KeySplice:
    """Rewrites the string value of every `"key": "old"` in raw JSON bytes to `new`, or says
    it cannot prove that equal to decoding (`apply` returns None): some `"key"` token is not
    such a key with such a value. Spacing-tolerant; learns the bytes it saw, so a server's
    later blocks take one `bytes.replace`. `newlines`: JSON whitespace in full (a unary
    body); without it only spaces and tabs (inside an SSE event a newline ends the line)."""

    __slots__ = ("_exact", "_seen", "_spec")

    def __init__(self, key: str, old: str, new: str, newlines: bool = False) -> None:
        self._spec = _spec(key, old, new, newlines)
        self._exact = self._spec.exact  # json.dumps's bytes until the server shows its own
        self._seen = self._spec.exact_new

    def replace_all(self, data: bytes) -> bytes:
        """Every `"key": "old"`, without the proof (comment lines: the same on both paths)."""
        spec = self._spec
        return spec.pattern.sub(spec.repl, data) if data.find(spec.token) >= 0 else data

    def apply(self, block: bytes) -> bytes | None:
        spec = self._spec
        n = block.count(spec.token)
        if not n:
            return block
        if block.find(spec.escaped) >= 0:
            return None
        out = block.replace(self._exact, self._seen)
        if _count(block, out, self._exact, self._seen) == n:
            return out
        out, done = spec.pattern.subn(spec.repl, block)
        if done != n:
            return None
        m = spec.pattern.search(block)
        if m is not None and m.group(0).find(b"\n") < 0:  # learn this server's bytes
            self._exact = m.group(0)
            self._seen = m.group(1) + spec.new
        return out


class _Spec:
    """What a KeySplice needs that depends only on its arguments (cached)."""

    __slots__ = ("escaped", "exact", "exact_new", "new", "pattern", "repl", "token")

    def __init__(self, key: str, old: str, new: str, newlines: bool) -> None:
        self.token = json.dumps(key).encode()
        self.escaped = b"\\" + self.token
        self.new = json.dumps(new).encode()
        self.exact = self.token + b": " + json.dumps(old).encode()
        self.exact_new = self.token + b": " + self.new
        ws = rb"[ \t\r\n]*" if newlines else rb"[ \t]*"
        values = b"|".join(re.escape(e) for e in encodings(old))
        self.pattern = re.compile(b"(" + re.escape(self.token) + ws + b":" + ws + b")(?:"
                                  + values + b")")
        self.repl = b"\\1" + self.new.replace(b"\\", b"\\\\")  # a template: escape \\


@functools.lru_cache(maxsize=256)
def _spec(key: str, old: str, new: str, newlines: bool) -> _Spec:
    return _Spec(key, old, new, newlines)


_OBJECT_KEY = b'"object"'
_CHUNK_LABEL = b'"object": "chat.completion.chunk"'
# an `object` that may be the usage event's: `chat.completion`, or any escaped value (it could
# decode to that). Other labels (`chat.completion.chunk`, `text_completion`) splice.
_USAGE_LABEL_AT = re.compile(rb'"object"[ \t]*:[ \t]*"(?:chat\.completion"|[^"\\]*\\)')


# Any key the rewrite reads (or a string value spelled like one: the splice steps aside then).
_TOKENS = re.compile(rb'"(?:model|object|system_fingerprint|usage)"')
# The rest of a `"key": "string value"` pair after its key token (JSON escapes inside).
_STRING_VALUE = re.compile(rb'[ \t]*:[ \t]*"(?:[^"\\\n]|\\[^\n])*"')
_PREFIX_LESSONS = 4  # prefixes learned per stream at most (a server whose prefix changes)


def _count(before: bytes, after: bytes, old: bytes, new: bytes) -> int:
    """How many `old` became `new` in `before.replace(old, new) == after`."""
    delta = len(new) - len(old)
    return (len(after) - len(before)) // delta if delta else before.count(old)


def _is_done(frame: bytes) -> bool:
    if frame == DONE:
        return True
    if frame.find(b"[DONE]") < 0:
        return False
    return any(line[5:].strip() == b"[DONE]" for line in frame.split(b"\n")
               if line.startswith(b"data:"))


def normalize_line_ends(data: bytes, pending_cr: bool) -> tuple[bytes, bool]:
    """CRLF and CR line ends (allowed by SSE) become LF. A read ending in CR ends its line at
    once (`pending_cr` comes back True); if the next read starts with LF, that LF was the
    CRLF's second half and is dropped."""
    if pending_cr and data[:1] == b"\n":
        data = data[1:]
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), data.endswith(b"\r")


def encode_event(name: str | None, obj: dict[str, Any]) -> bytes:
    """One SSE event: `event: NAME` (when named) and one `data:` line of compact JSON."""
    data = jsonfast.dumps(obj)
    if name is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def event_data(lines: list[bytes]) -> tuple[bytes | None, int]:
    """One event's data: its `data:` lines' values (one leading space dropped) joined by LF,
    and the index of the first; (None, -1) for an event without data (comments, `id:`)."""
    data: list[bytes] = []
    first = -1
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
            if first < 0:
                first = i
    return (b"\n".join(data) if data else None), first


class EventFramer:
    """Cuts an upstream event stream, read at any cut with LF, CRLF or CR line ends, into
    whole events: the one place that frames the events the gateway reads (SSERewriter for
    OpenAI's passthrough, dialect.ChatEventRewriter for the translated APIs). Memory is bounded
    by `max_event` bytes of incomplete event."""

    __slots__ = ("_cr", "_tail", "max_event")

    def __init__(self, max_event: int) -> None:
        self._tail = b""
        self._cr = False
        self.max_event = max_event

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete (what is lost if the upstream stops here)."""
        return self._tail

    def _complete(self, data: bytes) -> bytes | None:
        """The whole events `data` completes, joined by blank lines without the last one;
        None while none is complete."""
        if self._cr or data.find(b"\r") >= 0:
            data, self._cr = normalize_line_ends(data, self._cr)
        if self._tail:
            data = self._tail + data
        end = data.rfind(b"\n\n")
        if end < 0:
            if len(data) > self.max_event:
                raise SSEError("event too large")
            self._tail = data
            return None
        self._tail = data[end + 2:]
        if len(self._tail) > self.max_event:
            raise SSEError("event too large")
        return data[:end]


class SSERewriter(EventFramer):
    """Incremental relay of one upstream event stream for one route.

    `feed(bytes)` returns the rewritten bytes of every event completed so far (possibly b""),
    ready to write to the client as they are. After `data: [DONE]`, `done` is True and
    everything else is ignored. Memory is bounded by `max_event` bytes of incomplete event.
    `usage` is the upstream's usage object once seen; with `strip_usage` the client does not
    see it (the usage-only event is dropped, a `usage` key elsewhere removed).
    `fingerprint`: the replica's `system_fingerprint` when an earlier response told it (the
    first event then takes the splice instead of the JSON path); a wrong one costs nothing
    but that (the splice proves every value it rewrites) and is replaced by what the events
    carry. After the stream, `fingerprint` is what the events carried, for the next stream.
    """

    __slots__ = ("_alias", "_fp", "_internal", "_label", "_lessons", "_model", "_prefix",
                 "_prefix_out", "done", "fingerprint", "strip_usage", "usage")

    def __init__(self, alias: str, internal: str, max_event: int = 8 * 1024 * 1024,
                 strip_usage: bool = False, fingerprint: str | None = None) -> None:
        super().__init__(max_event)
        self._alias = alias
        self._internal = internal
        self._model = KeySplice("model", internal, alias)
        self._label = _CHUNK_LABEL  # `"object": "chat.completion.chunk"`, mlx's bytes
        self._fp: KeySplice | None = None  # learned from the first event that carries it
        self.fingerprint: str | None = None
        if fingerprint is not None:
            self._learn(fingerprint)
        self._prefix = b""  # a learned event prefix (module docstring), and it rewritten
        self._prefix_out = b""
        self._lessons = _PREFIX_LESSONS
        self.done = False
        self.strip_usage = strip_usage
        self.usage: dict[str, object] | None = None

    def feed(self, data: bytes) -> bytes:
        prefix = self._prefix
        if (prefix and data.startswith(prefix) and not self._tail and not self._cr
                and not self.done):
            n = len(prefix)  # the prefix ends in a `"`: a token can only straddle from n - 1
            if (data.find(b"\n", n) == len(data) - 2 and data[-1:] == b"\n"
                    and data.find(b"\r", n) < 0 and data.find(b"data:", n) < 0
                    and _TOKENS.search(data, n - 1) is None):
                return self._prefix_out + data[n:]
        if self.done or not data:
            return b""
        if (self._lessons and not self._tail and not self._cr and data[:7] == b"data: {"
                and data.find(b"\n") == len(data) - 2 and data[-1:] == b"\n"
                and data.find(b"\r") < 0):
            event = data[:-2]  # one whole single-line event: the splice may teach a prefix
            out = self._splice(event)
            if out is not None:
                self._learn_prefix(event, out)
                return out + b"\n\n"
        block = self._complete(data)
        if block is None:
            return b""
        at = block.find(b"[DONE]")
        if at < 0:
            return self._rewrite(block)
        start = at - 6  # the usual last read: [...events] data: [DONE]
        if block[start:at] == b"data: " and (start == 0 or block[start - 2:start] == b"\n\n"):
            head = self._rewrite(block[:start - 2]) if start else b""
            self.done = True
            return head + DONE + b"\n\n"
        return self._rewrite_frames(block)

    def _learn_prefix(self, event: bytes, out: bytes) -> None:
        """`event`: one single-line event the splice took, `out` its splice. The prefix ends
        with the last token's `"key": "string"` pair; the rest must be unchanged in `out`."""
        self._lessons -= 1
        tokens = list(_TOKENS.finditer(event))
        if not tokens:
            return
        pair = _STRING_VALUE.match(event, tokens[-1].end())
        if pair is None:
            return
        end = pair.end()
        rest = len(event) - end
        if rest and not out.endswith(event[end:]):
            return
        self._prefix = event[:end]
        self._prefix_out = out[:len(out) - rest]

    def _splice(self, block: bytes) -> bytes | None:
        """`block` with `model` and the fingerprint rewritten, or None when that would differ
        from the JSON path (the module docstring's conditions)."""
        if block.find(_USAGE) >= 0 or (block.count(b"data:")
                               != block.count(b"data: {") + block.count(b"data:{")):
            return None  # usage (any event that carries it), or data not an object: JSON path
        labels = block.count(_OBJECT_KEY)
        if labels and labels != block.count(self._label) and _USAGE_LABEL_AT.search(block):
            return None  # the usage event (or a label we cannot read without decoding)
        out = self._model.apply(block)
        if out is None:
            return None
        if self._fp is None:
            return out if block.find(_FP_KEY) < 0 else None
        return self._fp.apply(out)

    def _rewrite(self, block: bytes) -> bytes:
        """`block`: complete events joined by blank lines, without the last blank line.

        One splice for the whole block when exact. Otherwise the usage event (once per
        stream) is cut out and rewritten alone, and the rest goes event by event, with one
        more try at a whole-block splice once the first event has taught us the fingerprint.
        """
        out = self._splice(block)
        if out is not None:
            return out + b"\n\n"
        at = block.find(_USAGE_LABEL)
        if at < 0:
            return self._rewrite_frames(block)
        start = block.rfind(b"\n\n", 0, at)
        start = 0 if start < 0 else start + 2
        end = block.find(b"\n\n", at)
        end = len(block) if end < 0 else end
        parts = [self._splice_or_frames(block[:start - 2])] if start else []
        if not self.done:
            parts.append(self._rewrite_frames(block[start:end]))
        if end < len(block) and not self.done:
            parts.append(self._splice_or_frames(block[end + 2:]))
        return b"".join(parts)

    def _splice_or_frames(self, block: bytes) -> bytes:
        """No further cutting (bounded work whatever an upstream sends)."""
        out = self._splice(block)
        return out + b"\n\n" if out is not None else self._rewrite_frames(block)

    def _rewrite_frames(self, block: bytes) -> bytes:
        """Event by event: splice where it is exact, the JSON path elsewhere."""
        out = []
        known = self._fp  # learning the fingerprint may make the rest spliceable
        retry = True
        offset = 0
        for frame in block.split(b"\n\n"):
            offset += len(frame) + 2
            if _is_done(frame):
                self.done = True
                out.append(frame)
                break
            spliced = self._splice(frame)
            if spliced is not None:
                out.append(spliced)
                continue
            event = self._rewrite_event(frame)
            if event is not None:
                out.append(event)
            if retry and self._fp is not known and offset < len(block):
                retry = False
                rest = self._splice(block[offset:])
                if rest is not None:
                    out.append(rest)
                    break
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _plain(self, line: bytes) -> bytes:
        """A non-data line (comment, id:, event:) never shows the internal id either."""
        out = self._model.replace_all(line)
        return self._fp.replace_all(out) if self._fp is not None else out

    def _rewrite_event(self, frame: bytes) -> bytes | None:
        """The JSON path for one event; learns the upstream's fingerprint and usage on the
        way. None: the event is not for this client (a usage event it did not ask for)."""
        lines = frame.split(b"\n")
        payload, first = event_data(lines)
        if payload is None:
            return self._plain(frame)  # comments and other fields only
        try:
            obj = jsonfast.loads(payload)
        except (ValueError, RecursionError):
            raise SSEError("event data is not JSON") from None
        if isinstance(obj, dict):
            if isinstance(obj.get("system_fingerprint"), str):
                self._learn(obj["system_fingerprint"])
            if isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if self.strip_usage:
                    if not obj.get("choices"):
                        return None
                    del obj["usage"]
        if not rewrite_obj(obj, self._alias, self._internal, stream=True):
            return frame
        new = b"data: " + jsonfast.dumps(obj)
        return b"\n".join(new if i == first else self._plain(line)
                          for i, line in enumerate(lines)
                          if i == first or not line.startswith(b"data:"))

    def _learn(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            self.fingerprint = fingerprint
            self._fp = KeySplice("system_fingerprint", fingerprint,
                                 mask_fingerprint(fingerprint))
