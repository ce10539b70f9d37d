"""The SSE relay's `model` rewrite: whatever way the upstream's bytes are cut into reads, the
client gets the same events, with only `model` changed, and the byte-splice fast path always
agrees with a real JSON decode/encode."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maclustr.config import Route
from maclustr.sse import (
    SSEError,
    SSERewriter,
    echo,
    mask_fingerprint,
    rewrite_body,
    rewrite_json,
    usage_of,
)

INTERNAL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
ALIAS = "maclustr-coder"
ROUTE = Route(alias=ALIAS, model=INTERNAL, upstream="http://studio-1.local:8081")
MODEL_ECHO = echo("model", INTERNAL)
FP = "0.32.2-0.32.4-Linux-6.18.44-x86_64-with-glibc2.36-x86_64"

# every test here runs twice: with orjson, and with the stdlib json (no orjson installed)
pytestmark = pytest.mark.usefixtures("json_backend")


def rewriter(route: Route = ROUTE, max_event: int = 8 * 1024 * 1024) -> SSERewriter:
    return SSERewriter(route.alias, route.model, max_event=max_event)


def chunk(text: str | None, finish: str | None = None, model: str = INTERNAL) -> dict[str, Any]:
    """One chat.completion.chunk exactly as mlx_lm.server 0.32 builds it."""
    delta: dict[str, Any] = {"role": "assistant"}
    if text:
        delta["content"] = text
    return {"id": "chatcmpl-1", "system_fingerprint": FP, "object": "chat.completion.chunk",
            "model": model, "created": 1764000000,
            "choices": [{"index": 0, "finish_reason": finish, "delta": delta}]}


USAGE = {"id": "chatcmpl-1", "system_fingerprint": FP, "object": "chat.completion",
         "model": INTERNAL, "created": 1764000000, "choices": [],
         "usage": {"prompt_tokens": 19, "completion_tokens": 5, "total_tokens": 24,
                   "prompt_tokens_details": {"cached_tokens": 0}}}

EVENTS: list[dict[str, Any]] = [chunk(t) for t in ("The", " quick", "\ufffd", " fox", "é 🦊")]
EVENTS += [chunk("", "stop"), USAGE]


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def as_alias(obj: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    """What a stream client must see: the alias, an opaque fingerprint instead of mlx's, and
    every event labelled a chunk."""
    out = {**obj, "model": ALIAS}
    if stream and obj.get("object") == "chat.completion":  # the usage event, as OpenAI has it
        out["object"] = "chat.completion.chunk"
    if isinstance(obj.get("system_fingerprint"), str):
        out["system_fingerprint"] = mask_fingerprint(obj["system_fingerprint"])
    return out


STREAM = (b": keepalive 0/1\n\n: keepalive 1/1\n\n" + b"".join(data(e) for e in EVENTS)
          + b"data: [DONE]\n\n")
EXPECTED = (b": keepalive 0/1\n\n: keepalive 1/1\n\n"
            + b"".join(data(as_alias(e)) for e in EVENTS) + b"data: [DONE]\n\n")


def feed_all(parts: list[bytes], rw: SSERewriter | None = None) -> bytes:
    rw = rw or rewriter()
    return b"".join(rw.feed(p) for p in parts)


def events(out: bytes) -> list[Any]:
    """What a client reads: each frame, with `data:` JSON compared as values (the JSON path
    writes compact JSON with orjson, json.dumps spacing without it)."""
    got: list[Any] = []
    for f in (out[:-2].split(b"\n\n") if out.endswith(b"\n\n") else [out]):
        lines = f.split(b"\n")
        got.append([json.loads(x[6:]) if x.startswith(b"data: {") else x for x in lines])
    return got


def frames(out: bytes) -> list[bytes]:
    assert out.endswith(b"\n\n")
    return out[:-2].split(b"\n\n")


# --- whole streams ----------------------------------------------------------------------------


def test_whole_stream_changes_only_model() -> None:
    rw = rewriter()
    out = rw.feed(STREAM)
    assert events(out) == events(EXPECTED)
    assert rw.done
    assert rw.pending == b""
    assert INTERNAL.encode() not in out


def test_comments_and_done_pass_byte_for_byte() -> None:
    out = feed_all([STREAM])
    fs = frames(out)
    assert fs[:2] == [b": keepalive 0/1", b": keepalive 1/1"]
    assert fs[-1] == b"data: [DONE]"
    for f, e in zip(fs[2:-1], EVENTS, strict=True):
        assert json.loads(f[6:]) == as_alias(e)


def test_split_at_every_byte_offset_gives_the_same_output() -> None:
    for i in range(len(STREAM) + 1):
        assert events(feed_all([STREAM[:i], STREAM[i:]])) == events(EXPECTED), i


def test_one_byte_at_a_time_gives_the_same_output() -> None:
    assert events(feed_all([STREAM[i:i + 1] for i in range(len(STREAM))])) == events(EXPECTED)


@st.composite
def partitions(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=40)))
    bounds = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(partitions(STREAM))
def test_random_partitions_give_the_same_output(parts: list[bytes]) -> None:
    assert events(feed_all(parts)) == events(EXPECTED)


CRLF_STREAM = STREAM.replace(b"\n", b"\r\n")


def test_crlf_stream_is_read_like_lf() -> None:
    assert events(feed_all([CRLF_STREAM])) == events(EXPECTED)


def test_crlf_split_at_every_byte_offset() -> None:
    for i in range(len(CRLF_STREAM) + 1):
        assert events(feed_all([CRLF_STREAM[:i], CRLF_STREAM[i:]])) == events(EXPECTED), i


def test_bare_cr_line_ends_mid_stream_are_read_like_lf() -> None:
    cr = STREAM.replace(b"\n", b"\r")
    assert events(feed_all([cr[:50], cr[50:], b"\n"])) == events(EXPECTED)


def test_bare_cr_event_is_relayed_when_its_read_ends() -> None:
    rw = rewriter()
    assert rw.feed(b"data: [DONE]\r\r") == b"data: [DONE]\n\n"


@settings(max_examples=200, deadline=None)
@given(partitions(CRLF_STREAM))
def test_crlf_random_partitions(parts: list[bytes]) -> None:
    assert events(feed_all(parts)) == events(EXPECTED)


def test_nothing_is_relayed_after_done() -> None:
    rw = rewriter()
    out = rw.feed(STREAM + data(EVENTS[0]) + b": late\n\n")
    assert events(out) == events(EXPECTED)
    assert rw.done
    assert rw.feed(data(EVENTS[1])) == b""
    assert rw.feed(b"data: not json\n\n") == b""


def test_done_in_a_mixed_block_drops_the_rest() -> None:
    rw = rewriter()
    odd = b"event: x\n" + data(EVENTS[0])
    out = rw.feed(odd + b"data: [DONE]\n\n" + data(EVENTS[1]))
    assert out.endswith(b"\n\ndata: [DONE]\n\n")
    assert out.count(b"data: ") == 2
    assert rw.done


def test_incomplete_event_waits_and_is_pending() -> None:
    rw = rewriter()
    whole = data(EVENTS[0])
    assert rw.feed(whole[:-1]) == b""
    assert rw.pending == whole[:-1]
    assert events(rw.feed(whole[-1:])) == events(data(as_alias(EVENTS[0])))
    assert rw.pending == b""


def test_a_model_that_is_not_the_internal_id_is_rewritten_too() -> None:
    """mlx reports "default_model" or another path; the client must still see the alias."""
    for other in ("default_model", "/models/other", INTERNAL + "-v2"):
        out = feed_all([data(chunk("hi", model=other))])
        assert json.loads(out[6:]) == as_alias(chunk("hi"))


def test_event_without_model_is_unchanged() -> None:
    obj = {"object": "x", "choices": []}
    assert feed_all([data(obj)]) == data(obj)


# --- the general path ---------------------------------------------------------------------


def test_multi_line_data_event_takes_json_path() -> None:
    body = json.dumps(EVENTS[0], indent=1).encode()
    frame = b"\n".join(b"data: " + line for line in body.split(b"\n")) + b"\n\n"
    out = feed_all([frame])
    assert out.count(b"data:") == 1
    assert json.loads(out[6:]) == as_alias(EVENTS[0])


def test_event_and_id_fields_are_kept_and_data_rewritten() -> None:
    frame = b"event: message\nid: 7\n" + data(EVENTS[1])
    out = feed_all([frame])
    lines = out[:-2].split(b"\n")
    assert lines[:2] == [b"event: message", b"id: 7"]
    assert json.loads(lines[2][6:]) == as_alias(EVENTS[1])
    assert INTERNAL.encode() not in out


def test_data_without_space_after_colon() -> None:
    frame = b"data:" + json.dumps(EVENTS[0]).encode() + b"\n\n"
    assert json.loads(feed_all([frame])[6:]) == as_alias(EVENTS[0])


def test_comment_mentioning_internal_id_is_not_passed_verbatim() -> None:
    out = feed_all([b": " + MODEL_ECHO + b"\n\n" + data(EVENTS[0])])
    assert MODEL_ECHO not in out


def test_other_fields_are_kept_in_order_around_the_rewritten_data() -> None:
    frame = b'id: 1\ndata: {"model": "x"}\nretry: 5\n\n'
    want = b'id: 1\ndata: {"model": "maclustr-coder"}\nretry: 5\n\n'
    assert events(feed_all([frame])) == events(want)


def test_multi_line_comment_frames_pass_unchanged() -> None:
    assert feed_all([b": a\n: b\n\n"]) == b": a\n: b\n\n"


def test_node_fingerprint_never_reaches_the_client() -> None:
    out = feed_all([STREAM])
    assert FP.encode() not in out
    assert b"Linux" not in out and b"glibc" not in out
    fps = {json.loads(f[6:])["system_fingerprint"] for f in frames(out)[2:-1]}
    assert len(fps) == 1
    (fp,) = fps
    assert fp.startswith("fp_") and fp == mask_fingerprint(FP)


def test_fingerprint_token_is_stable_and_distinct_per_backend() -> None:
    assert mask_fingerprint(FP) == mask_fingerprint(FP)
    assert mask_fingerprint(FP) != mask_fingerprint(FP + "x")


def test_non_json_data_raises() -> None:
    for bad in (b"data: hello\n\n", b"data: <html>\n\n", b"data: {\"model\": x}\n\n"):
        with pytest.raises(SSEError):
            rewriter().feed(bad)


def test_broken_object_without_ids_is_relayed_as_is() -> None:
    """The documented trade-off: an event that looks like an object and holds nothing to
    rewrite is not decoded, so a broken one passes as it came."""
    for bad in (b"data: {broken\n\n", b'data: {"a": 1\n\n'):
        assert rewriter().feed(bad) == bad


def test_non_json_data_after_good_events_raises() -> None:
    rw = rewriter()
    assert events(rw.feed(data(EVENTS[0]))) == events(data(as_alias(EVENTS[0])))
    with pytest.raises(SSEError):
        rw.feed(b"event: x\ndata: <html>\n\n")


def test_oversize_incomplete_event_raises() -> None:
    rw = rewriter(max_event=1000)
    rw.feed(b"data: {" + b"x" * 900)
    with pytest.raises(SSEError):
        rw.feed(b"x" * 200)


def test_oversize_tail_after_complete_events_raises() -> None:
    rw = rewriter(max_event=1000)
    with pytest.raises(SSEError):
        rw.feed(data(EVENTS[0]) + b"data: " + b"x" * 1500)


def test_events_up_to_the_limit_pass() -> None:
    rw = rewriter(max_event=len(data(EVENTS[0])))
    assert events(rw.feed(data(EVENTS[0]))) == events(data(as_alias(EVENTS[0])))


# --- unary bodies --------------------------------------------------------------------------


UNARY = {"id": "chatcmpl-2", "system_fingerprint": FP, "object": "chat.completion",
         "model": INTERNAL, "created": 1764000000,
         "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "hi \ufffd"}}],
         "usage": USAGE["usage"]}


def unary(body: bytes) -> bytes:
    return rewrite_json(body, ALIAS, INTERNAL)


def test_rewrite_body_changes_only_model() -> None:
    body = json.dumps(UNARY).encode()
    out = unary(body)
    assert json.loads(out) == as_alias(UNARY, stream=False)


def test_rewrite_body_rewrites_other_model_values() -> None:
    out = unary(json.dumps({**UNARY, "model": "default_model"}).encode())
    assert json.loads(out) == as_alias(UNARY, stream=False)
    assert FP.encode() not in out


def test_rewrite_body_without_model_is_unchanged() -> None:
    for body in (b'{"a": 1}', b"[1, 2]", b'"x"', b"3"):
        assert json.loads(unary(body)) == json.loads(body)


def test_rewrite_body_refuses_non_json() -> None:
    for body in (b"Not Found", b"", b"{" + MODEL_ECHO + b", }", b"<html>", b"[" * 10**5):
        with pytest.raises(SSEError):
            unary(body)


# --- the key property: fast path == JSON path ---------------------------------------------

IDS = [INTERNAL, "default_model", "org/m\"odel", "ümlaut/モデル", "a", "x\\y", "{model}"]
FPS = [FP, "fp-b", "", "ü\"{"]
TOP = ["model", "system_fingerprint"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(), st.sampled_from(IDS + FPS), st.sampled_from([*TOP, '"model": ', "{", "}"]),
    st.builds(lambda k, m: f'"{k}": {json.dumps(m)}', st.sampled_from(TOP),
              st.sampled_from(IDS + FPS)),
)
keys = st.one_of(st.text(max_size=8),
                 st.sampled_from([*TOP, "Model", "model ", "id", "system_fingerprint "]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def chunk_objects(draw: st.DrawFn) -> dict[str, Any]:
    """Arbitrary objects, often with a top-level `model` and `system_fingerprint` (usually the
    values mlx writes) at random positions, so both the splice and the JSON path run."""
    obj = draw(st.dictionaries(keys, values, max_size=6))
    items = [(k, v) for k, v in obj.items() if k not in TOP]
    for key, usual in (("model", IDS), ("system_fingerprint", FPS)):
        if draw(st.integers(0, 3)):
            pos = draw(st.integers(0, len(items)))
            items.insert(pos, (key, draw(st.one_of(st.sampled_from(usual), values))))
    return dict(items)


def expected(node: Any, internal: str, top: bool = True) -> Any:
    """An independent statement of the rewrite: top-level `model` -> alias; at any depth a
    `model` equal to the internal id -> alias and a string `system_fingerprint` masked; the
    stream's usage `object` relabelled."""
    if isinstance(node, list):
        return [expected(v, internal, False) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: expected(v, internal, False) for k, v in node.items()}
    if "model" in out and (top or node["model"] == internal):
        out["model"] = ALIAS
    if isinstance(node.get("system_fingerprint"), str):
        out["system_fingerprint"] = mask_fingerprint(node["system_fingerprint"])
    if top and node.get("object") == "chat.completion":
        out["object"] = "chat.completion.chunk"
    return out


def check_reference(obj: dict[str, Any], reference: dict[str, Any], internal: str) -> None:
    """The reference itself agrees with the independent statement of the rule."""
    assert reference == expected(obj, internal)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_objects(), model=st.sampled_from(IDS), ascii_only=st.booleans())
def test_fast_path_equals_json_path(obj: dict[str, Any], model: str, ascii_only: bool) -> None:
    route = Route(alias=ALIAS, model=model, upstream="http://h:1")
    payload = json.dumps(obj, ensure_ascii=ascii_only).encode()
    reference = json.loads(rewrite_json(payload, ALIAS, route.model, stream=True))

    rw = SSERewriter(ALIAS, route.model)
    out = rw.feed(b"data: " + payload + b"\n\n")
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert json.loads(out[6:-2]) == reference

    body = rewrite_json(payload, ALIAS, route.model)
    assert json.loads(body) == reference

    check_reference(obj, reference, route.model)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_objects(), usage=values, last=st.booleans(),
       style=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}]))
def test_usage_of_is_the_decoded_usage(obj: dict[str, Any], usage: Any, last: bool,
                                       style: dict[str, Any]) -> None:
    """The unary body's `usage` read from its tail (the short cut when it is the last key, the
    decoder's scan otherwise) is what decoding the whole body finds, in any spacing (with
    orjson and with the stdlib: the module's json_backend fixture)."""
    items = [(k, v) for k, v in obj.items() if k != "usage"]
    items.insert(len(items) if last else 0, ("usage", usage))
    body = json.dumps(dict(items), **style).encode()
    if body.count(b'"usage"') != 1:  # the tail read takes the last `"usage"` token
        return
    assert usage_of(body) == (usage if isinstance(usage, dict) else None)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=st.lists(chunk_objects(), min_size=1, max_size=4), data_=st.data())
def test_fast_path_equals_json_path_in_split_streams(objs: list[dict[str, Any]],
                                                     data_: st.DataObject) -> None:
    blob = b": keepalive 1/1\n\n" + b"".join(data(o) for o in objs) + b"data: [DONE]\n\n"
    parts = data_.draw(partitions(blob))
    out = feed_all(parts)
    fs = frames(out)
    assert fs[0] == b": keepalive 1/1"
    assert fs[-1] == b"data: [DONE]"
    got = [json.loads(f[6:]) for f in fs[1:-1]]
    want = [json.loads(rewrite_json(json.dumps(o).encode(), ALIAS, INTERNAL, stream=True))
            for o in objs]
    assert got == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.sampled_from(FPS), objs=st.lists(chunk_objects(), min_size=1, max_size=4),
       model=st.sampled_from(IDS))
def test_after_learning_a_fingerprint_splice_equals_json_path(
        first: str, objs: list[dict[str, Any]], model: str) -> None:
    """Once the rewriter has learned the node's fingerprint from a first mlx-shaped event,
    later events take the splice; each must still equal its own JSON rewrite."""
    route = Route(alias=ALIAS, model=model, upstream="http://h:1")
    rw = SSERewriter(ALIAS, route.model)
    opening = chunk("x", model=model) | {"system_fingerprint": first}
    assert json.loads(rw.feed(data(opening))[6:]) == as_alias(opening)
    for obj in objs:
        out = rw.feed(b"data: " + json.dumps(obj).encode() + b"\n\n")
        reference = json.loads(rewrite_json(json.dumps(obj).encode(), ALIAS, route.model,
                                            stream=True))
        assert json.loads(out[6:-2]) == reference
        check_reference(obj, reference, route.model)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_objects(), model=st.sampled_from(IDS), known=st.sampled_from(FPS))
def test_unary_splice_with_known_fingerprint_equals_json_path(
        obj: dict[str, Any], model: str, known: str) -> None:
    """Once a replica's fingerprint is known, unary bodies take the splice; whatever the
    body holds, the result equals the JSON rewrite (or the splice steps aside)."""
    payload = json.dumps(obj).encode()
    reference = json.loads(rewrite_json(payload, ALIAS, model))
    out, learned = rewrite_body(payload, ALIAS, model, known)
    assert json.loads(out) == reference
    fp = obj.get("system_fingerprint")
    assert learned == (fp if isinstance(fp, str) else known)


def test_strip_usage_at_any_cut() -> None:
    """The usage event a client did not ask for is gone from what it sees, whatever the read
    boundaries; `usage` keeps what it said; every other byte is what the full stream gives."""
    ev = [{"id": "c1", "system_fingerprint": "fp-x", "object": "chat.completion.chunk",
           "model": "internal/m", "created": 1, "choices": [{"index": 0, "delta": {
               "role": "assistant", "content": w}, "finish_reason": None}]}
          for w in ("usage", " a", "\"usage\": 1")]
    usage = {"id": "c1", "system_fingerprint": "fp-x", "object": "chat.completion",
             "model": "internal/m", "created": 1, "choices": [],
             "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
    wire = b": keepalive 1/1\n\n" + b"".join(
        b"data: " + json.dumps(o).encode() + b"\n\n" for o in [*ev, usage]) + b"data: [DONE]\n\n"
    full = SSERewriter("alias", "internal/m")
    want = full.feed(wire)
    assert full.usage == usage["usage"]
    for cut in range(1, len(wire)):
        r = SSERewriter("alias", "internal/m", strip_usage=True)
        got = r.feed(wire[:cut]) + r.feed(wire[cut:])
        assert r.done and r.usage == usage["usage"]
        assert b'"usage":' not in got
        kept = [f for f in want.split(b"\n\n") if b'"usage":' not in f]
        assert got == b"\n\n".join(kept), cut
# --- any server's spacing (issue 15): the splice is a tolerant scan, still equal to the JSON path

# (item separator, key separator): json.dumps's default, compact (other OpenAI-compatible
# servers), and odd but valid spacing. Never a newline inside an SSE event's line.
SEPARATORS = [(", ", ": "), (",", ":"), (" ,", " : "), (",\t", "\t:\t"), (", ", ":")]


@st.composite
def writers(draw: st.DrawFn, newlines: bool = False) -> Any:
    """A JSON writer: spacing, ASCII escapes or raw UTF-8, `/` escaped as `\\/` or not (valid
    anywhere: a `/` can only be inside a string); unary bodies may also be indented."""
    seps = draw(st.sampled_from(SEPARATORS))
    ascii_only = draw(st.booleans())
    slash = draw(st.booleans())
    indent = draw(st.sampled_from([None, 2])) if newlines else None

    def write(obj: Any) -> bytes:
        text = json.dumps(obj, separators=seps, ensure_ascii=ascii_only, indent=indent)
        raw = text.encode("utf-8", "surrogatepass")
        return raw.replace(b"/", b"\\/") if slash else raw

    return write


def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, any JSON decode in sse.py fails the test: the splice must do it all."""
    def refuse(_: Any) -> Any:
        raise AssertionError("took the JSON path")

    monkeypatch.setattr("maclustr.sse.jsonfast.loads", refuse)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_objects(), model=st.sampled_from(IDS), write=writers(),
       first=st.sampled_from(FPS))
def test_any_spacing_splice_equals_json_path(obj: dict[str, Any], model: str, write: Any,
                                             first: str) -> None:
    payload = write(obj)
    try:
        reference = json.loads(rewrite_json(payload, ALIAS, model, stream=True))
    except SSEError:  # raw lone surrogates: not UTF-8, nobody can read it
        return
    assert json.loads(SSERewriter(ALIAS, model).feed(b"data: " + payload + b"\n\n")[6:-2]) \
        == reference
    rw = SSERewriter(ALIAS, model)  # the same after learning a fingerprint from the writer
    rw.feed(b"data: " + write(chunk("x", model=model) | {"system_fingerprint": first})
            + b"\n\n")
    assert json.loads(rw.feed(b"data: " + payload + b"\n\n")[6:-2]) == reference
    check_reference(obj, reference, model)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=chunk_objects(), model=st.sampled_from(IDS), known=st.sampled_from(FPS),
       write=writers(newlines=True))
def test_any_spacing_unary_splice_equals_json_path(obj: dict[str, Any], model: str,
                                                   known: str, write: Any) -> None:
    payload = write(obj)
    try:
        reference = json.loads(rewrite_json(payload, ALIAS, model))
    except SSEError:
        return
    out, _ = rewrite_body(payload, ALIAS, model, known)
    assert json.loads(out) == reference


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(write=writers(), model=st.sampled_from(IDS), text=st.text(max_size=20))
def test_a_compact_server_streams_through_the_splice(write: Any, model: str, text: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the first event has told the fingerprint, every chunk of any writer is spliced:
    no decode per event, whatever the server's spacing, escapes or key order."""
    with monkeypatch.context() as m:
        rw = SSERewriter(ALIAS, model)
        rw.feed(b"data: " + write(chunk("a", model=model)) + b"\n\n")
        no_decode(m)
        reordered = dict(reversed(list(chunk(text, model=model).items())))
        block = b"".join(b"data: " + write(o) + b"\n\n"
                         for o in (chunk(text, model=model), reordered, chunk(None, "stop",
                                                                             model=model)))
        out = rw.feed(block)
    got = [json.loads(f[6:]) for f in frames(out)]
    assert got == [as_alias(chunk(text)), as_alias(dict(reversed(list(chunk(text).items())))),
                   as_alias(chunk(None, "stop"))]


def test_a_completions_stream_takes_the_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`text_completion` events (/v1/completions) are not the usage event: spliced too."""
    ev = {"id": "cmpl-1", "object": "text_completion", "model": INTERNAL, "created": 1,
          "system_fingerprint": FP, "choices": [{"index": 0, "text": "hi"}]}
    rw = rewriter()
    rw.feed(data(ev))
    no_decode(monkeypatch)
    out = rw.feed(data(ev) * 3)
    assert [json.loads(f[6:]) for f in frames(out)] == [as_alias(ev)] * 3


@pytest.mark.parametrize("label", [b'"object":"chat.completion"', b'"object" : "chat.completion"',
                                   b'"object": "chat\\u002ecompletion"'])
def test_usage_event_is_relabelled_whatever_its_spelling(label: bytes) -> None:
    """The usage event's label, however written, never passes the splice unrelabelled."""
    rw = rewriter()
    rw.feed(data(EVENTS[0]))
    usage = json.dumps(USAGE).encode().replace(b'"object": "chat.completion"', label)
    out = rw.feed(b"data: " + usage + b"\n\n")
    assert json.loads(out[6:-2])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("key", ["model", "system_fingerprint"])
def test_a_key_that_only_ends_in_the_token_is_not_rewritten(key: str) -> None:
    """`"say \\"model": "<id>"` holds the bytes `"model": "<id>"` but its key is `say "model`:
    the splice must not touch it (the JSON path does not)."""
    rw = rewriter()
    rw.feed(data(EVENTS[0]))  # learn the fingerprint
    value = INTERNAL if key == "model" else FP
    obj = {**chunk("x"), f'say "{key}': value}
    out = rw.feed(data(obj))
    assert json.loads(out[6:-2])[f'say "{key}'] == value
    assert json.loads(out[6:-2]) == json.loads(rewrite_json(json.dumps(obj).encode(), ALIAS,
                                                            INTERNAL, stream=True))
    body, _ = rewrite_body(json.dumps(obj).encode(), ALIAS, INTERNAL, FP)
    assert json.loads(body)[f'say "{key}'] == value


# --- the learned prefix (issue 15): one whole event per read, one compare and one scan -------

def no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, the block splice (and the JSON path) fail the test: only the learned
    prefix may rewrite an event."""
    def refuse(*_: Any) -> Any:
        raise AssertionError("took the block splice")

    monkeypatch.setattr(SSERewriter, "_splice", refuse)
    no_decode(monkeypatch)


def taught(model: str, fp: str, write: Any = None) -> SSERewriter:
    """A rewriter that has read two mlx-shaped events, one read each: the first teaches the
    fingerprint (JSON path), the second the prefix (splice)."""
    write = write or (lambda o: json.dumps(o).encode())
    rw = SSERewriter(ALIAS, model)
    for text in ("a", "b"):
        out = rw.feed(b"data: " + write(chunk(text, model=model) | {"system_fingerprint": fp})
                      + b"\n\n")
        assert json.loads(out[6:-2]) == as_alias(chunk(text, model=model)
                                                 | {"system_fingerprint": fp})
    return rw


def test_mlx_events_take_the_learned_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    rw = taught(INTERNAL, FP)
    no_splice(monkeypatch)
    for text in ("The", " quick", "\ufffd", "é 🦊", '"model": "x"', "\\", "use", None):
        ev = chunk(text, "stop" if text is None else None)
        out = rw.feed(data(ev))
        assert out.endswith(b"\n\n") and b"\n" not in out[:-2]
        assert json.loads(out[6:-2]) == as_alias(ev)
        assert INTERNAL.encode() not in out and FP.encode() not in out
    assert rw.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert rw.feed(data(chunk("late"))) == b""


def test_a_read_ending_one_byte_after_a_line_end_waits_for_the_blank_line() -> None:
    rw = taught(INTERNAL, FP)
    half = data(chunk("half"))[:-1] + b"x"  # `}\nx`: the event's blank line has not come
    assert rw.feed(half) == b"" and rw.pending == half
    assert events(rw.feed(b"\n\n")) == [[as_alias(chunk("half")), b"x"]]


def without_prefix(rw: SSERewriter) -> SSERewriter:
    """The reference for the prefix: the same rewriter state, minus the prefix."""
    rw._prefix = b""
    rw._lessons = 0
    return rw


# The rest of an event after the learned prefix: any keys (those the rewrite reads, often,
# duplicates allowed: raw pairs, not a dict) with any values, written by any writer.
TOUCHED = ["model", "object", "usage", "system_fingerprint", 'say "model', "model\\"]
TRICKY = ["chat.completion", "chat.completion.chunk", *IDS, *FPS, "\n", "\r", "\\",
          "data: x", "data:{", "[DONE]", '"model": "a"']
rest_pairs = st.one_of(st.tuples(st.sampled_from(TOUCHED), st.sampled_from(TRICKY)),
                       st.tuples(keys, st.sampled_from(TRICKY)),
                       st.tuples(keys, values),
                       st.tuples(keys, st.builds(lambda u: {"usage": u}, values)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(IDS), fp=st.sampled_from(FPS), write=writers(),
       pairs=st.lists(rest_pairs, max_size=4))
def test_learned_prefix_equals_json_path(model: str, fp: str, write: Any,
                                         pairs: list[tuple[str, Any]]) -> None:
    """After the prefix is learned, an event that starts with it and goes on with anything
    gives what the JSON path gives, in the very bytes the block path gives."""
    rw = taught(model, fp, write)
    plain = without_prefix(taught(model, fp, write))
    head = write(chunk("x", model=model) | {"system_fingerprint": fp})[:-1]  # without `}`
    key_sep = write({"k": 1})[4:-2]  # this writer's `: ` (and `, ` below)
    item_sep = write([1, 2])[2:-2]
    payload = head + b"".join(item_sep + write(k) + key_sep + write(v) for k, v in pairs) + b"}"
    try:
        reference = json.loads(rewrite_json(payload, ALIAS, model, stream=True))
    except SSEError:  # raw lone surrogates: not UTF-8, nobody can read it
        return
    out = rw.feed(b"data: " + payload + b"\n\n")
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    assert json.loads(out[6:-2]) == reference
    assert out == plain.feed(b"data: " + payload + b"\n\n")


TAIL_PIECES = [b"x", b'"', b"\\", b'"model"', b'"usage"', b'"object"', b'"system_fingerprint"',
               b": ", b":", b", ", b"\n", b"\r", b"\n\n", b"\r\n", b"}", b"{", b"data: ",
               b'"chat.completion"', b"[DONE]", b'model"', b'usage"', b"ata:",
               json.dumps(INTERNAL).encode(), json.dumps(FP).encode()]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(TAIL_PIECES), max_size=6),
       at=st.one_of(st.integers(-3, 3), st.integers(0, 400)), at_prefix=st.booleans(),
       cut=st.one_of(st.just(0), st.integers(0, 40)), model=st.sampled_from(IDS))
def test_learned_prefix_agrees_with_the_block_path_on_any_bytes(
        pieces: list[bytes], at: int, at_prefix: bool, cut: int, model: str) -> None:
    """Whatever bytes are put into an mlx event at any place (newlines, CRs, tokens, a token
    straddling the prefix's end, more events) and wherever the read is cut, the client gets
    what a rewriter that never learns a prefix sends (the block splice, else the JSON path):
    the same bytes, or the same error. `at_prefix`: `at` counts from the prefix's end."""
    learned = taught(model, FP)
    plain = without_prefix(taught(model, FP))
    assert learned._prefix
    ev = data(chunk("x", model=model))
    at = min(max(at + len(learned._prefix) if at_prefix else at, 0), len(ev))
    wire = ev[:at] + b"".join(pieces) + ev[at:]
    wire = wire[:len(wire) - cut] if cut < len(wire) else wire
    try:
        want = plain.feed(wire) + plain.feed(b"data: [DONE]\n\n")
    except SSEError:
        with pytest.raises(SSEError):
            learned.feed(wire)
            learned.feed(b"data: [DONE]\n\n")
        return
    got = learned.feed(wire) + learned.feed(b"data: [DONE]\n\n")
    assert got == want
    assert learned.done == plain.done
    if learned.done:  # nothing after [DONE], the prefix's reads included
        assert learned.feed(ev) == b""


def test_a_changed_prefix_is_learned_again_a_few_times_only() -> None:
    rw = taught(INTERNAL, FP)
    first = rw._prefix
    assert first.startswith(b"data: {") and first.endswith(json.dumps(INTERNAL).encode())
    for n in range(10):
        ev = chunk("x") | {"id": f"chatcmpl-{n}"}
        assert json.loads(rw.feed(data(ev))[6:-2]) == as_alias(ev)
    assert rw._prefix != first
    assert rw._lessons == 0


# --- a fingerprint known from an earlier response: the first event takes the splice ----------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(guess=st.sampled_from(FPS), first=st.sampled_from(FPS),
       objs=st.lists(chunk_objects(), min_size=1, max_size=4), model=st.sampled_from(IDS),
       write=writers())
def test_a_given_fingerprint_right_or_wrong_gives_the_json_path(
        guess: str, first: str, objs: list[dict[str, Any]], model: str, write: Any) -> None:
    """The constructor's fingerprint is a hint: whether it is the stream's or not, every
    event equals its JSON rewrite, and `fingerprint` ends as what the events carried."""
    rw = SSERewriter(ALIAS, model, fingerprint=guess)
    opening = chunk("x", model=model) | {"system_fingerprint": first}
    out = rw.feed(b"data: " + write(opening) + b"\n\n")
    assert json.loads(out[6:-2]) == as_alias(opening)
    assert rw.fingerprint == first
    for obj in objs:
        payload = write(obj)
        try:
            reference = json.loads(rewrite_json(payload, ALIAS, model, stream=True))
        except SSEError:  # raw lone surrogates: not UTF-8, nobody can read it
            continue
        assert json.loads(rw.feed(b"data: " + payload + b"\n\n")[6:-2]) == reference


def test_a_known_fingerprint_spares_the_first_events_decode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rw = SSERewriter(ALIAS, INTERNAL, fingerprint=FP)
    no_decode(monkeypatch)
    assert rw.feed(b": keepalive 1/1\n\n") == b": keepalive 1/1\n\n"
    assert events(rw.feed(data(chunk("a")))) == [[as_alias(chunk("a"))]]
    no_splice(monkeypatch)  # the first event's splice taught the prefix
    assert events(rw.feed(data(chunk("b")))) == [[as_alias(chunk("b"))]]


def test_a_wrong_fingerprint_is_replaced_and_the_block_is_spliced_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A block whose first event shows the real fingerprint: after that one decode the rest
    of the block takes the splice (as when nothing was known)."""
    from maclustr import jsonfast
    decodes: list[bytes] = []
    real = jsonfast.loads

    def counting(data: bytes) -> Any:
        decodes.append(data)
        return real(data)

    monkeypatch.setattr("maclustr.sse.jsonfast.loads", counting)
    rw = SSERewriter(ALIAS, INTERNAL, fingerprint="fp-old")
    out = rw.feed(b"".join(data(chunk(t)) for t in ("a", "b", "c")))
    assert events(out) == [[as_alias(chunk(t))] for t in ("a", "b", "c")]
    assert rw.fingerprint == FP
    assert len(decodes) == 1
