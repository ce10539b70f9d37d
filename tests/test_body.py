"""The client's request body: which bodies are accepted, the message each refusal carries, and
that going upstream only `model` changes (every other field, known or not, is kept)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr.body import check_content_type, parse_request, upstream_body, wants_stream
from maclustr.errors import BadRequest, GatewayError, InvalidJSON, UnsupportedMediaType

INTERNAL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"

# every test here runs twice: with orjson, and with the stdlib json (no orjson installed)
pytestmark = pytest.mark.usefixtures("json_backend")


@pytest.mark.parametrize("body", [
    b'{"model": "maclustr-coder", "messages": []}',
    b'  {"model": "x"}\n',
    b'{"model": "m", "stream": true, "unknown_field": {"a": [1, 2]}}',
    '{"model": "модель"}'.encode(),
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'\xef\xbb\xbf{"model": "m"}',
])
def test_accepted_bodies(body: bytes) -> None:
    payload = parse_request(body)
    assert isinstance(payload["model"], str) and payload["model"].strip()


@pytest.mark.parametrize(("body", "exc", "message", "param"), [
    (b"", InvalidJSON, "Request body is empty; expected a JSON object.", None),
    (b"  \n\t", InvalidJSON, "Request body is empty; expected a JSON object.", None),
    (b"{", InvalidJSON, "Request body is not valid JSON.", None),
    (b"{'model': 'x'}", InvalidJSON, "Request body is not valid JSON.", None),
    (b'{"model": "x",}', InvalidJSON, "Request body is not valid JSON.", None),
    (b"\xff\xfe\x00", InvalidJSON, "Request body is not valid JSON.", None),
    (b"[" * 100000, InvalidJSON, "Request body is not valid JSON.", None),
    (b"NaN", BadRequest, "Request body must be a JSON object, not a number.", None),
    (b"[1, 2]", BadRequest, "Request body must be a JSON object, not an array.", None),
    (b'"hi"', BadRequest, "Request body must be a JSON object, not a string.", None),
    (b"3", BadRequest, "Request body must be a JSON object, not a number.", None),
    (b"true", BadRequest, "Request body must be a JSON object, not a boolean.", None),
    (b"null", BadRequest, "Request body must be a JSON object, not null.", None),
    (b"{}", BadRequest, "Missing required parameter: 'model'.", "model"),
    (b'{"model": null}', BadRequest, "Missing required parameter: 'model'.", "model"),
    (b'{"model": 3}', BadRequest, "'model' must be a string, not a number.", "model"),
    (b'{"model": ["a"]}', BadRequest, "'model' must be a string, not an array.", "model"),
    (b'{"model": {}}', BadRequest, "'model' must be a string, not an object.", "model"),
    (b'{"model": false}', BadRequest, "'model' must be a string, not a boolean.", "model"),
    (b'{"model": ""}', BadRequest, "'model' must not be empty.", "model"),
    (b'{"model": "  "}', BadRequest, "'model' must not be empty.", "model"),
])
def test_rejected_bodies_name_the_problem(body: bytes, exc: type[GatewayError], message: str,
                                          param: str | None) -> None:
    with pytest.raises(exc) as info:
        parse_request(body)
    assert type(info.value) is exc
    assert info.value.status == 400
    assert info.value.message == message
    assert info.value.param == param


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_a_400(body: bytes) -> None:
    try:
        payload = parse_request(body)
    except GatewayError as e:
        assert e.status == 400
    else:
        assert isinstance(payload, dict) and isinstance(payload["model"], str)


@pytest.mark.parametrize("ctype", ["", "application/json", "text/plain",
                                   "application/x-www-form-urlencoded",
                                   "application/vnd.api+json"])
def test_accepted_content_types(ctype: str) -> None:
    check_content_type(ctype)


@pytest.mark.parametrize("ctype", ["multipart/form-data", "application/xml", "text/html",
                                   "image/png", "x" * 500])
def test_rejected_content_types(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        check_content_type(ctype)
    assert info.value.status == 415
    assert "application/json" in info.value.message
    assert len(info.value.message) < 150


REQUEST: dict[str, Any] = {
    "model": "maclustr-coder",
    "messages": [{"role": "user", "content": "héllo 🦊"}],
    "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": ["\n\n"], "seed": 7,
    "max_tokens": 64, "presence_penalty": 0.5, "frequency_penalty": -0.5,
    "logit_bias": {"50256": -100}, "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto", "response_format": {"type": "json_object"},
    "stream": True, "stream_options": {"include_usage": True},
    "x_unknown": {"nested": [1, None, 1.5e300]},
}


def test_upstream_body_changes_only_model() -> None:
    raw = json.dumps(REQUEST).encode()
    payload = parse_request(raw)
    sent = json.loads(upstream_body(payload, INTERNAL))
    assert sent["model"] == INTERNAL
    assert {k: v for k, v in sent.items() if k != "model"} == \
        {k: v for k, v in REQUEST.items() if k != "model"}
    assert list(sent) == list(REQUEST)


def test_upstream_body_keeps_lone_surrogates_escaped() -> None:
    payload = parse_request(b'{"model": "m", "prompt": "\\ud800x"}')
    out = upstream_body(payload, INTERNAL)
    out.decode("ascii")
    assert json.loads(out)["prompt"] == "\ud800x"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=15,
)


@settings(max_examples=120, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
       model=st.text(min_size=1).filter(str.strip))
def test_upstream_body_property_only_model_differs(extra: dict[str, Any], model: str) -> None:
    checked = ("model", "stream", "n", "stream_options")  # validated fields: own tests
    request = {**{k: v for k, v in extra.items() if k not in checked}, "model": model}
    payload = parse_request(json.dumps(request).encode())
    sent = json.loads(upstream_body(payload, INTERNAL))
    assert sent.pop("model") == INTERNAL
    request.pop("model")
    assert sent == request


def test_non_boolean_stream_is_refused() -> None:
    for v in ("true", 1, [True], {}):
        with pytest.raises(BadRequest) as e:
            parse_request(json.dumps({"model": "m", "stream": v}).encode())
        assert e.value.param == "stream"


def test_wants_stream_only_for_true() -> None:
    assert wants_stream({"stream": True})
    for v in (False, None, "true", 1, [True]):
        assert not wants_stream({"stream": v})
    assert not wants_stream({})


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"), ({"n": 0}, "n"), ({"n": "2"}, "n"), ({"n": True}, "n"), ({"n": 1.5}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {}}, "stream_options"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_n_and_stream_options_refusals_name_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(json.dumps({"model": "m", **body}).encode())
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize(("opts", "usage"), [
    ({}, False), ({"include_usage": True}, True), ({"x": 1}, False)])
def test_stream_options_reach_upstream_with_include_usage_explicit(opts: dict[str, Any],
                                                                   usage: bool) -> None:
    """mlx_lm.server reads stream_options["include_usage"] after streaming the content."""
    payload = parse_request(json.dumps({"model": "m", "stream": True, "n": 1,
                                        "stream_options": opts}).encode())
    sent = json.loads(upstream_body(payload, INTERNAL))
    assert sent["stream_options"]["include_usage"] is usage
    assert {k: v for k, v in sent["stream_options"].items() if k != "include_usage"} == {
        k: v for k, v in opts.items() if k != "include_usage"}
