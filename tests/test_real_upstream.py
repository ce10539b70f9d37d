"""The gateway as users run it (`python -m maclustr serve`) in front of a REAL mlx_lm.server,
driven by real clients: the official `openai` SDK and curl.

Why: the fake upstream only proves what we already believe. The real server answers
HTTP/1.0 close-delimited streams, `: keepalive` comments, echoes model directory paths and
swaps models on demand; the SDK and curl are what users actually point at us. Every raw byte
these clients receive is recorded and checked for internal paths and addresses.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
import pytest
from conftest import KEY, GatewayProcess, RealMLX, real_routes
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

pytestmark = pytest.mark.real_upstream

ALIASES = ("maclustr-coder", "maclustr-fast")
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
MAX = 4  # tokens: the tiny model is fast, but keep every request short


# --- recording every raw byte the clients get ----------------------------------------------


@dataclass
class Seen:
    """Raw answers (headers + body) that real clients received, for the leak check."""

    blobs: list[bytes] = field(default_factory=list)

    def add(self, headers: Any, body: bytes) -> None:
        head = "\n".join(f"{k}: {v}" for k, v in dict(headers).items()).encode()
        self.blobs.append(head + b"\n\n" + body)


class _TeeStream(httpx2.SyncByteStream):
    def __init__(self, inner: Any, on_done: Any) -> None:
        self.inner, self.on_done = inner, on_done
        self.parts: list[bytes] = []

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.parts.append(chunk)
            yield chunk

    def close(self) -> None:
        self.on_done(b"".join(self.parts))
        self.inner.close()


class TeeTransport(httpx2.HTTPTransport):
    """An httpx transport that records every raw response the SDK reads."""

    def __init__(self, seen: Seen) -> None:
        super().__init__()
        self.seen = seen

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        resp = super().handle_request(request)
        headers = resp.headers
        return httpx2.Response(
            status_code=resp.status_code, headers=resp.headers,
            stream=_TeeStream(resp.stream, lambda body: self.seen.add(headers, body)),
            extensions=resp.extensions)


def secrets_of(real: RealMLX) -> set[str]:
    """Everything internal that must never reach a client."""
    port = urlsplit(real.url).port
    out = {str(p) for p in real.models.values()}
    out |= {p.name for p in real.models.values()}  # tiny-coder / tiny-fast dir names
    out |= {real.url, f"127.0.0.1:{port}", f"localhost:{port}", "default_model", "BaseHTTP"}
    return out


def assert_clean(seen: Seen, secrets: set[str]) -> None:
    assert seen.blobs, "nothing was recorded: the leak check would prove nothing"
    for blob in seen.blobs:
        for s in secrets:
            for form in {s.encode(), json.dumps(s)[1:-1].encode()}:
                assert form not in blob, f"internal {s!r} leaked in: {blob[:400]!r}"


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Env:
    gw: GatewayProcess
    real: RealMLX
    seen: Seen
    sdk: OpenAI = field(init=False)

    def __post_init__(self) -> None:
        self.sdk = self.client()

    def client(self, api_key: str = KEY) -> OpenAI:
        return OpenAI(base_url=self.gw.url + "/v1", api_key=api_key, max_retries=0,
                      timeout=30, http_client=httpx2.Client(transport=TeeTransport(self.seen)))


@pytest.fixture
def env(real_mlx: RealMLX, gateway_process: Any, tmp_path: Path) -> Iterator[Env]:
    """A gateway process in front of the real server; at teardown, nothing any client got may
    name an internal path or address."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(real_routes(real_mlx))
    gw = gateway_process(routes)
    seen = Seen()
    e = Env(gw, real_mlx, seen)
    yield e
    e.sdk.close()
    assert_clean(seen, secrets_of(real_mlx))


def curl(env: Env, body: dict[str, Any], *, stream: bool, key: str = KEY,
         path: str = "/v1/chat/completions") -> str:
    """The product page's curl example, pointed at the local gateway; output recorded."""
    args = ["curl", "-sS", "--max-time", "30", "-D", "-", env.gw.url + path,
            "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
            "-d", json.dumps(body)]
    if stream:
        args.insert(1, "-N")
    out = subprocess.run(args, capture_output=True, timeout=40, check=True).stdout
    env.seen.blobs.append(out)
    return out.decode("utf-8", errors="replace")


def split_head(raw: str) -> tuple[str, str]:
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    return head, body


def get_raw(env: Env, path: str, key: str | None = KEY) -> tuple[int, bytes]:
    """A plain urllib GET, recorded (status, body)."""
    req = urllib.request.Request(env.gw.url + path)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body, status, headers = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        body, status, headers = e.read(), e.code, e.headers
    env.seen.add(headers.items(), body)
    return status, body


# --- the openai SDK -------------------------------------------------------------------------


@pytest.mark.real_upstream
def test_sdk_unary_chat_reports_alias_choices_and_usage(env: Env) -> None:
    """What a user sees from `client.chat.completions.create(...)`: the alias, not the path."""
    r = env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX)
    assert r.model == "maclustr-coder"
    assert r.object == "chat.completion"
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.real_upstream
def test_sdk_streaming_chat_every_chunk_names_the_alias(env: Env) -> None:
    """The real server echoes its model path in every chunk; the SDK must see only the alias."""
    stream = env.sdk.chat.completions.create(model="maclustr-fast", messages=MSG,
                                             max_tokens=MAX, stream=True)
    chunks = list(stream)
    assert chunks, "no chunks"
    assert {c.model for c in chunks} == {"maclustr-fast"}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)  # random weights: arbitrary text, maybe "\ufffd"


@pytest.mark.real_upstream
def test_sdk_stream_include_usage_ends_with_usage(env: Env) -> None:
    """stream_options passes through: the last chunk carries usage and no choices."""
    chunks = list(env.sdk.chat.completions.create(
        model="maclustr-coder", messages=MSG, max_tokens=MAX, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens >= 1
    assert last.choices == []
    assert {c.model for c in chunks} == {"maclustr-coder"}
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.real_upstream
def test_sdk_stream_without_include_usage_sees_no_usage(env: Env) -> None:
    """The gateway asks mlx for usage on every stream (metrics); a client that did not ask
    (no stream_options, or include_usage false) gets no usage chunk, as from OpenAI."""
    for extra in ({}, {"stream_options": {"include_usage": False}}):
        chunks = list(env.sdk.chat.completions.create(
            model="maclustr-coder", messages=MSG, max_tokens=MAX, stream=True, **extra))
        assert chunks and all(c.usage is None for c in chunks)
        assert all(c.choices for c in chunks)  # no choices-less usage event either
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@pytest.mark.real_upstream
def test_prompt_mlx_cannot_prepare_is_400_not_404(env: Env) -> None:
    """mlx_lm.server answers 404 {"error": ...} when preparing the prompt fails; 404 and
    model_not_found are the gateway's, for an unknown alias: the client gets a 400 with
    mlx's one-line reason."""
    audio = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    for stream in (False, True):
        raw = curl(env, {"model": "maclustr-coder", "max_tokens": MAX, "stream": stream,
                         "messages": [{"role": "user", "content": audio}]}, stream=stream)
        head, body = split_head(raw)
        assert head.startswith("HTTP/1.1 400"), raw[:400]
        err = json.loads(body)["error"]
        assert err["code"] == "upstream_rejected"
        assert err["message"] == ("Model 'maclustr-coder' rejected the request: Only 'text' "
                                  "content type is supported.")


@pytest.mark.real_upstream
def test_empty_stream_options_stream_completes(env: Env) -> None:
    """`stream_options: {}` reached mlx_lm.server bare: it KeyErrors after the content has
    streamed, so the stream never ended with [DONE]. The gateway makes the flag explicit."""
    raw = curl(env, {"model": "maclustr-coder", "messages": MSG, "max_tokens": MAX,
                     "stream": True, "stream_options": {}}, stream=True)
    head, body = split_head(raw)
    assert head.startswith("HTTP/1.1 200")
    events = [e for e in body.split("\n\n") if e.startswith("data: ")]  # no keepalives
    assert events[-1] == "data: [DONE]", body[-300:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c.get("usage") is None and c["choices"] for c in chunks)  # usage not asked


@pytest.mark.real_upstream
def test_n_above_one_and_stream_options_without_stream_are_400(env: Env) -> None:
    """mlx answers one choice whatever `n` says: the SDK gets a 400 naming `n` instead of
    silently fewer choices; `stream_options` without `stream: true` is a 400 as at OpenAI."""
    with pytest.raises(openai.BadRequestError) as info:
        env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX,
                                        n=2)
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX,
                                        stream_options={"include_usage": True})
    assert info.value.param == "stream_options"
    r = env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX,
                                        n=1)
    assert len(r.choices) == 1


@pytest.mark.real_upstream
def test_sdk_completions_unary_and_streaming(env: Env) -> None:
    """Legacy /v1/completions works through the SDK both ways, reporting the alias."""
    r = env.sdk.completions.create(model="maclustr-fast", prompt="Once upon", max_tokens=MAX)
    assert r.model == "maclustr-fast"
    assert r.object == "text_completion"
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
    assert r.usage is not None and r.usage.completion_tokens >= 1

    chunks = list(env.sdk.completions.create(model="maclustr-fast", prompt="Once upon",
                                             max_tokens=MAX, stream=True))
    assert chunks and {c.model for c in chunks} == {"maclustr-fast"}
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@pytest.mark.real_upstream
def test_sdk_models_list_and_retrieve_show_aliases(env: Env) -> None:
    """models.list() is the public catalogue; retrieve(alias) returns that card."""
    ids = [m.id for m in env.sdk.models.list()]
    assert sorted(ids) == sorted(ALIASES)
    m = env.sdk.models.retrieve("maclustr-fast")
    assert m.id == "maclustr-fast" and m.object == "model" and m.owned_by == "maclustr"


@pytest.mark.real_upstream
def test_sdk_bad_key_raises_authentication_error(env: Env) -> None:
    """A wrong key is the SDK's AuthenticationError (401), before anything reaches mlx."""
    bad = env.client(api_key="definitely-not-a-key")
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX)
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    bad.close()


@pytest.mark.real_upstream
def test_sdk_unknown_model_raises_not_found_listing_aliases(env: Env) -> None:
    """An unknown model is NotFoundError whose message tells the user what does exist."""
    with pytest.raises(openai.NotFoundError) as ei:
        env.sdk.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=MAX)
    err = ei.value
    assert err.status_code == 404 and err.code == "model_not_found"
    assert "gpt-4o" in err.message
    for alias in ALIASES:
        assert alias in err.message
    with pytest.raises(openai.NotFoundError):
        env.sdk.models.retrieve("gpt-4o")


@pytest.mark.real_upstream
def test_sdk_routes_by_full_internal_id_but_answers_with_alias(env: Env) -> None:
    """The page promises the internal id is accepted too; the answer still names the alias."""
    internal = str(env.real.models["maclustr-fast"])
    r = env.sdk.chat.completions.create(model=internal, messages=MSG, max_tokens=MAX)
    assert r.model == "maclustr-fast"
    chunks = list(env.sdk.chat.completions.create(model=internal, messages=MSG,
                                                  max_tokens=MAX, stream=True))
    assert chunks and {c.model for c in chunks} == {"maclustr-fast"}


@pytest.mark.real_upstream
def test_two_aliases_alternate_on_one_server_each_with_its_own_model(env: Env) -> None:
    """mlx_lm.server swaps models per request: alternating aliases must each be served by their
    own model dir and report their own alias. Random weights mostly emit the same greedy token,
    so the witness is the first token's logprob (passed through), distinct per model."""
    first: dict[str, list[float]] = {a: [] for a in ALIASES}
    for _ in range(3):
        for alias in ALIASES:
            r = env.sdk.chat.completions.create(model=alias, messages=MSG, max_tokens=2,
                                                temperature=0, logprobs=True, top_logprobs=1)
            assert r.model == alias
            lp = r.choices[0].logprobs
            assert lp is not None and lp.content, "logprobs were not passed through"
            first[alias].append(lp.content[0].logprob)
    coder, fast = first["maclustr-coder"], first["maclustr-fast"]
    # Each model is deterministic across swaps back and forth...
    assert max(coder) - min(coder) < 1e-3 and max(fast) - min(fast) < 1e-3, first
    # ...and the two model dirs really are different models.
    assert abs(coder[0] - fast[0]) > 1e-2, f"same model served both aliases: {first}"


@pytest.mark.real_upstream
def test_streamed_text_matches_unary_text_for_greedy_decoding(env: Env) -> None:
    """No event lost, duplicated or mangled on the way: with temperature 0 the streamed deltas
    joined are exactly the unary answer, and the token counts agree."""
    kw: dict[str, Any] = {"model": "maclustr-coder", "messages": MSG, "max_tokens": 6,
                          "temperature": 0}
    unary = env.sdk.chat.completions.create(**kw)
    chunks = list(env.sdk.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == unary.choices[0].message.content
    assert chunks[-1].usage is not None and unary.usage is not None
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


@pytest.mark.real_upstream
def test_concurrent_requests_for_both_aliases_all_complete_with_their_alias(env: Env) -> None:
    """Several users at once on the one real server (which serves one at a time and swaps
    models between them): every request completes, each stream labelled with its own alias."""

    def one(i: int) -> tuple[str, set[str]]:
        alias = ALIASES[i % 2]
        chunks = list(env.sdk.chat.completions.create(model=alias, messages=MSG,
                                                      max_tokens=MAX, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        return alias, {c.model for c in chunks}

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(6), timeout=60))
    assert len(results) == 6
    for alias, models in results:
        assert models == {alias}


# --- curl, like the product page ----------------------------------------------------------


@pytest.mark.real_upstream
def test_curl_streaming_example_every_data_line_names_alias_and_ends_done(env: Env) -> None:
    """The page's streaming curl: SSE, each data line the alias, terminated by [DONE]."""
    raw = curl(env, {"model": "maclustr-fast", "messages": MSG, "stream": True,
                     "max_tokens": MAX}, stream=True)
    head, body = split_head(raw)
    assert head.splitlines()[0].split()[1] == "200"
    assert "content-type: text/event-stream" in head.lower()
    data = [ln[len("data: "):] for ln in body.splitlines() if ln.startswith("data:")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events and all(e["model"] == "maclustr-fast" for e in events)
    assert body.rstrip("\n").endswith("data: [DONE]")
    low = head.lower()
    assert "cache-control: no-cache" in low and "x-accel-buffering: no" in low
    assert "access-control-allow" not in low and "http/1.0" not in low.splitlines()[0]


@pytest.mark.real_upstream
def test_curl_unary_example_returns_openai_json_with_alias(env: Env) -> None:
    """The page's non-streaming curl (temperature passed through) gives one JSON object."""
    raw = curl(env, {"model": "maclustr-coder",
                     "messages": [{"role": "user", "content": "Explain MacLustr."}],
                     "temperature": 0.7, "stream": False, "max_tokens": MAX}, stream=False)
    head, body = split_head(raw)
    assert head.splitlines()[0].split()[1] == "200"
    assert "application/json" in head.lower()
    obj = json.loads(body)
    assert obj["model"] == "maclustr-coder" and obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"]["role"] == "assistant"
    assert obj["usage"]["total_tokens"] >= 1


@pytest.mark.real_upstream
def test_curl_stream_with_usage_every_event_is_a_chunk(env: Env) -> None:
    """OpenAI's stream is all `chat.completion.chunk` events, the usage one included; mlx
    labels its usage event `chat.completion`, which strict clients may reject."""
    raw = curl(env, {"model": "maclustr-coder", "messages": MSG, "stream": True,
                     "max_tokens": MAX, "stream_options": {"include_usage": True}}, stream=True)
    _, body = split_head(raw)
    events = [json.loads(ln[6:]) for ln in body.splitlines()
              if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert [e["object"] for e in events] == ["chat.completion.chunk"] * len(events)


@pytest.mark.real_upstream
def test_curl_unknown_model_gets_404_envelope_listing_aliases(env: Env) -> None:
    """The troubleshooting row '404 model_not_found': an OpenAI envelope naming the aliases."""
    raw = curl(env, {"model": "maclustr-general", "messages": MSG, "stream": True},
               stream=True)
    head, body = split_head(raw)
    assert head.splitlines()[0].split()[1] == "404"
    err = json.loads(body)["error"]
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert all(a in err["message"] for a in ALIASES)


@pytest.mark.real_upstream
def test_curl_bad_key_gets_clean_401_envelope(env: Env) -> None:
    """The troubleshooting row: a wrong key is a JSON 401, nothing from upstream."""
    raw = curl(env, {"model": "maclustr-fast", "messages": MSG}, stream=False, key="nope")
    head, body = split_head(raw)
    assert head.splitlines()[0].split()[1] == "401"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


# --- health and the leak sweep ------------------------------------------------------------


@pytest.mark.real_upstream
def test_deep_health_reports_both_aliases_up(env: Env) -> None:
    """?deep=true really pings mlx_lm.server: both aliases up, no address in the answer."""
    status, body = get_raw(env, "/health?deep=true", key=None)
    assert status == 200
    report = json.loads(body)
    assert report["status"] == "ok"
    assert set(report["models"]) == set(ALIASES)
    assert all(m["status"] == "up" for m in report["models"].values())


@pytest.mark.real_upstream
def test_no_internal_path_or_address_in_any_raw_answer(env: Env) -> None:
    """Sweep every kind of answer with raw clients and grep them for internals. (Every other
    test in this module is grepped the same way at teardown.)"""
    internal = str(env.real.models["maclustr-coder"])
    for path in ("/v1/models", "/v1/models/maclustr-coder", "/health", "/health?deep=true",
                 "/v1/models/nope", "/nope"):
        get_raw(env, path)
    raw = env.sdk.chat.completions.with_raw_response.create(
        model="maclustr-coder", messages=MSG, max_tokens=MAX)
    assert raw.parse().model == "maclustr-coder"
    assert raw.headers.get("server", "").find("BaseHTTP") == -1
    assert "access-control-allow-origin" not in {k.lower() for k in raw.headers}
    curl(env, {"model": internal, "messages": MSG, "stream": True, "max_tokens": MAX,
               "stream_options": {"include_usage": True}}, stream=True)
    curl(env, {"model": "maclustr-coder", "prompt": "x", "stream": True, "max_tokens": MAX},
         stream=True, path="/v1/completions")
    assert len(env.seen.blobs) >= 9
    assert_clean(env.seen, secrets_of(env.real))


@pytest.mark.real_upstream
def test_system_fingerprint_does_not_reveal_node_platform(env: Env) -> None:
    """mlx_lm.server's system_fingerprint is '<mlx versions>-Linux-<kernel>-...-glibc...': the
    node's OS and kernel. Clients must not learn what the inside runs on, unary or streamed;
    what they get instead stays one stable value, as OpenAI's field promises."""
    body = json.dumps({"model": str(env.real.models["maclustr-coder"]), "messages": MSG,
                       "max_tokens": 1}).encode()
    req = urllib.request.Request(env.real.url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # straight to mlx, not recorded
        upstream_fp = json.loads(r.read())["system_fingerprint"]
    assert "-" in upstream_fp  # the real thing, e.g. 0.32.2-0.32.4-Linux-6.18...-x86_64

    r1 = env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG, max_tokens=MAX)
    chunks = list(env.sdk.chat.completions.create(model="maclustr-coder", messages=MSG,
                                                  max_tokens=MAX, stream=True))
    prints = {r1.system_fingerprint} | {c.system_fingerprint for c in chunks}
    assert len(prints) == 1, f"fingerprint not stable: {prints}"
    for fp in prints - {None}:
        assert fp is not None
        for word in ("Linux", "Darwin", "macOS", "glibc", "x86_64", "arm64"):
            assert word not in fp, f"system_fingerprint reveals the node: {fp!r}"
    assert_clean(env.seen, {upstream_fp})
