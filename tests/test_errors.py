"""Client-visible errors: OpenAI's envelope with the right status/type/code for every case,
and `scrub`, which must leave nothing of the inside (hosts, ports, paths, ids) in an
upstream's words."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    InvalidApiKey,
    InvalidJSON,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    ShuttingDown,
    UnsupportedMediaType,
    UpstreamBadResponse,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    scrub,
)

INTERNAL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
ALIAS = "maclustr-coder"
UPSTREAM = "http://studio-1.local:8081"


def clean(text: str) -> str:
    return scrub(text, alias=ALIAS, model=INTERNAL, upstreams=[UPSTREAM])


CASES: list[tuple[GatewayError, int, str, str]] = [
    (GatewayError(), 500, "server_error", "internal_error"),
    (InvalidApiKey(), 401, "invalid_request_error", "invalid_api_key"),
    (BadRequest("bad"), 400, "invalid_request_error", "invalid_request"),
    (InvalidJSON("bad json"), 400, "invalid_request_error", "invalid_json"),
    (ModelNotFound("foo", ["a", "b"]), 404, "invalid_request_error", "model_not_found"),
    (NotFound("nope"), 404, "invalid_request_error", "not_found"),
    (MethodNotAllowed("no"), 405, "invalid_request_error", "method_not_allowed"),
    (BodyTooLarge(10), 413, "invalid_request_error", "request_too_large"),
    (UnsupportedMediaType("x"), 415, "invalid_request_error", "unsupported_media_type"),
    (UpstreamRejected(400, "m"), 400, "invalid_request_error", "upstream_rejected"),
    (UpstreamRejected(404, "m"), 400, "invalid_request_error", "upstream_rejected"),
    (UpstreamRejected(413, "m"), 413, "invalid_request_error", "request_too_large"),
    (UpstreamRejected(429, "m"), 429, "rate_limit_error", "rate_limit_exceeded"),
    (UpstreamFailed(ALIAS), 502, "server_error", "upstream_unavailable"),
    (UpstreamBadResponse(ALIAS), 502, "server_error", "upstream_bad_response"),
    (UpstreamTimeout(ALIAS, "first byte"), 504, "server_error", "upstream_timeout"),
    (ShuttingDown(), 503, "server_error", "gateway_shutting_down"),
]


@pytest.mark.parametrize(("exc", "status", "type_", "code"), CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_each_error_has_status_type_code_and_envelope(exc: GatewayError, status: int,
                                                      type_: str, code: str) -> None:
    assert exc.status == status
    body = json.loads(exc.to_body())
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "code", "param"}
    err = body["error"]
    assert err["type"] == type_
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert body == exc.to_dict()


def test_to_sse_is_one_data_event() -> None:
    exc = UpstreamFailed(ALIAS)
    sse = exc.to_sse()
    assert sse.startswith(b"data: ")
    assert sse.endswith(b"\n\n")
    assert sse.count(b"\n") == 2
    assert json.loads(sse[6:-2]) == exc.to_dict()


def test_model_not_found_lists_aliases_and_names_param() -> None:
    exc = ModelNotFound("foo", ["maclustr-coder", "maclustr-fast"])
    assert exc.message == "Model 'foo' not found. Available models: maclustr-coder, maclustr-fast"
    assert exc.to_dict()["error"]["param"] == "model"


def test_model_not_found_truncates_a_huge_name() -> None:
    exc = ModelNotFound("x" * 5000, ["a"])
    assert len(exc.message) < 200
    assert "..." in exc.message


def test_invalid_api_key_asks_for_bearer() -> None:
    exc = InvalidApiKey()
    assert exc.headers["WWW-Authenticate"].startswith("Bearer")
    assert "MACLUSTR_API_KEY" in exc.message


def test_upstream_messages_name_the_alias_only() -> None:
    for exc in (UpstreamFailed(ALIAS), UpstreamBadResponse(ALIAS),
                UpstreamTimeout(ALIAS, "idle")):
        assert f"'{ALIAS}'" in exc.message
        assert "studio" not in exc.message
        assert "/health?deep=true" in exc.message


def test_body_too_large_states_the_limit() -> None:
    assert "10485760" in BodyTooLarge(10485760).message


def test_non_ascii_message_round_trips() -> None:
    exc = BadRequest("modèle «x» 🦊")
    assert json.loads(exc.to_body())["error"]["message"] == "modèle «x» 🦊"


# --- scrub --------------------------------------------------------------------------------


def test_scrub_replaces_internal_id_with_alias() -> None:
    out = clean(f"Model {INTERNAL} failed to load")
    assert out == f"Model {ALIAS} failed to load"


def test_scrub_removes_upstream_url_and_host_port() -> None:
    for text in (f"cannot reach {UPSTREAM}/v1/chat/completions",
                 "connect to studio-1.local:8081 refused",
                 "host studio-1.local is down", "port 8081 busy"):
        out = clean(text)
        assert "studio-1" not in out
        assert "8081" not in out
        assert "<internal>" in out


def test_scrub_removes_paths() -> None:
    for text in ("FileNotFoundError: /Users/ana/models/qwen/config.json missing",
                 "cannot open /srv/mlx/weights.safetensors",
                 "see ~/mlx/logs/server.log", "at /home/bob/x.py line 3"):
        out = clean(text)
        for secret in ("/Users", "ana", "/srv", "weights.safetensors", "server.log", "/home",
                       "bob"):
            assert secret not in out, (text, out)


def test_scrub_removes_ips_and_local_hosts() -> None:
    out = clean("peer 10.0.3.17 and 10.0.3.18:8080 and mini.local, nas.lan, db.internal")
    for secret in ("10.0.3", "8080", "mini.local", "nas.lan", "db.internal"):
        assert secret not in out, out


def test_scrub_removes_ipv6_host_port() -> None:
    out = clean("connect to [fe80::1]:8080 failed")
    assert "fe80" not in out
    assert "8080" not in out


def test_scrub_keeps_ordinary_text_readable() -> None:
    text = "Prompt is too long: 9000 tokens, the maximum is 8192. Please shorten it."
    assert clean(text) == text
    assert clean("temperature must be between 0 and 2") == "temperature must be between 0 and 2"


def test_scrub_collapses_whitespace_and_bounds_length() -> None:
    out = clean("a\n\tb   c\r\n" + "word " * 200)
    assert "\n" not in out and "\t" not in out
    assert out.startswith("a b c word")
    assert len(out) <= 300
    assert out.endswith("...")


def test_scrub_does_not_half_rewrite_a_longer_id() -> None:
    """Another model whose name extends the internal id is not turned into 'alias-v2'."""
    out = clean(f"{INTERNAL}-v2 is not loaded")
    assert f"{ALIAS}-v2" not in out
    assert out.endswith("-v2 is not loaded")


def test_scrub_rewrites_quoted_and_punctuated_ids() -> None:
    assert clean(f"'{INTERNAL}' not found.") == f"'{ALIAS}' not found."
    assert clean(f"load {INTERNAL}.") == f"load {ALIAS}."


def test_scrub_empty_is_empty() -> None:
    assert clean("") == ""
    assert clean("   \n ") == ""


SECRETS = [INTERNAL, UPSTREAM, "studio-1.local:8081", "studio-1.local", "/Users/ana/models/q",
           "/srv/mlx/w.bin", "192.168.1.20", "10.0.0.5:9000", "mini.local", "127.0.0.1:8081"]
FORBIDDEN = ["studio-1", "8081", "/Users", "/srv", "192.168", "10.0.0.5", "mini.local",
             "127.0.0.1", INTERNAL]

# Filler: ordinary words and punctuation a python error message might hold.
filler = st.lists(
    st.one_of(st.sampled_from(["error", "model", "failed", "(", ")", "'", '"', ":", ",",
                               " ", "\n", "=", "at", "line", "42", "-", "{", "}"]),
              st.text(alphabet="abcdefghij XYZ.", max_size=6)),
    max_size=12,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.tuples(filler, st.sampled_from(SECRETS)), min_size=1, max_size=5),
       tail=filler)
def test_no_secret_survives_scrub(pieces: list[tuple[str, str]], tail: str) -> None:
    text = "".join(f + " " + s + " " for f, s in pieces) + tail
    out = clean(text)
    for secret in FORBIDDEN:
        assert secret not in out, (text, out)


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(["", "'", '"', "(", "=", "at ", "url=", "[", "<"]),
       suffix=st.sampled_from(["", "'", '"', ")", ",", ".", ":", "/v1/x", "]", ">", "\n"]),
       secret=st.sampled_from(SECRETS))
def test_no_secret_survives_scrub_glued_to_punctuation(prefix: str, suffix: str,
                                                       secret: str) -> None:
    out = clean(f"failed {prefix}{secret}{suffix} now")
    for forbidden in FORBIDDEN:
        assert forbidden not in out, out


def test_scrub_removes_every_replica_not_just_the_first() -> None:
    out = scrub("studio-2 refused; see studio-1", alias=ALIAS, model=INTERNAL,
                upstreams=["http://studio-1:8081", "http://studio-2:8081"])
    assert "studio" not in out


def test_scrub_keeps_slashed_words_but_not_relative_file_paths() -> None:
    """mlx's chat-template refusal is a message for a person; a relative file path is not."""
    text = "Conversation roles must alternate user/assistant/user/assistant/..."
    assert clean(text) == text
    out = clean("No such file: models/internal-coder/config.json")
    assert "internal-coder" not in out and "config.json" not in out
