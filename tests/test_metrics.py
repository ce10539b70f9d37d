"""/metrics after a known mix of traffic shows exactly the expected counts, and token totals
equal to what the upstream's usage said: against the fake upstream and the real tiny
mlx_lm.server, scraped over HTTP and parsed with prometheus_client.parser.

The same mix checks the usage contract on the wire: every stream asks the upstream for its
usage event (never a bare `stream_options: {}`), and a client that did not ask sees none.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    Answer,
    Behavior,
    FakeMLX,
    Gateway,
    GatewayClient,
    RealMLX,
    read_until,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from maclustr import __version__
from maclustr.harness import free_port

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
A, F, G = "maclustr-coder", "maclustr-fast", "maclustr-general"
KEYS = ("alice:sk-alice-0001", "bob:sk-bob-0002")
ALICE, BOB = {"Authorization": "Bearer sk-alice-0001"}, {"Authorization": "Bearer sk-bob-0002"}


def mix_routes(models: dict[str, str], a: str, f: str, g: list[str], top: str = "") -> str:
    """A on `a`; F on `f` with one slot and no queue (a second request is a 429); G on the
    replicas `g` (the first is dead: failover)."""
    lines = [top] if top else []
    lines += ["models:",
              f"  {A}:", f"    model: {json.dumps(models[A])}", f"    upstream: {a}",
              f"  {F}:", f"    model: {json.dumps(models[F])}", f"    upstream: {f}",
              "    max_concurrency: 1", "    max_queue: 0",
              f"  {G}:", f"    model: {json.dumps(models[G])}", "    upstreams:"]
    lines += [f"      - {u}" for u in g]
    return "\n".join(lines) + "\n"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def select(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= set(lab)}


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(select(samples, name, **labels).values())


@dataclass
class Expect:
    """What the mix did, to compare with the scrape."""

    requests: Counter[tuple[str, str, str, str, str]] = field(default_factory=Counter)
    tokens: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    ttft: Counter[str] = field(default_factory=Counter)  # streams that sent a data event
    stripped: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # need usage

    def req(self, model: str, endpoint: str, key: str, code: int, stream: bool) -> None:
        self.requests[(model, endpoint, key, str(code), "true" if stream else "false")] += 1

    def usage(self, model: str, key: str, usage: dict[str, Any]) -> None:
        self.tokens[(model, key, "prompt")] += usage["prompt_tokens"]
        self.tokens[(model, key, "completion")] += usage["completion_tokens"]


def body(model: str, content: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "stream": stream, "max_tokens": 8, "temperature": 0, **extra}


def usage_events(data: list[Any]) -> list[Any]:
    return [d for d in data if isinstance(d, dict) and "usage" in d]


async def run_mix(client: GatewayClient, hold: dict[str, Any], leave: dict[str, Any]) -> Expect:
    """The known mix. `hold` is a long stream body for F (holds its one slot), `leave` a
    long stream body for A that the client abandons after its first event."""
    e = Expect()
    # Unary, both keys, both endpoints.
    for key, h in (("alice", ALICE), ("bob", BOB)):
        ans = await client.post(CHAT, body(A, f"unary {key}", False), auth=False, headers=h)
        assert ans.status == 200, ans.body
        e.req(A, CHAT, key, 200, False)
        e.usage(A, key, ans.json()["usage"])
    ans = await client.post(COMPLETIONS, {"model": A, "prompt": "once upon", "max_tokens": 8,
                                          "temperature": 0}, auth=False, headers=ALICE)
    assert ans.status == 200, ans.body
    e.req(A, COMPLETIONS, "alice", 200, False)
    e.usage(A, "alice", ans.json()["usage"])
    # A stream that asked for usage sees it (and it is counted).
    ans = await client.post(CHAT, body(A, "with usage", True,
                                       stream_options={"include_usage": True}),
                            auth=False, headers=ALICE)
    assert ans.status == 200
    seen = usage_events(ans.data())
    assert len(seen) == 1 and seen[0]["choices"] == [] and seen[0]["model"] == A
    e.req(A, CHAT, "alice", 200, True)
    e.usage(A, "alice", seen[0]["usage"])
    e.ttft[A] += 1
    # Streams that did not ask (no stream_options, a bare {}, include_usage false) see none.
    for key, h, extra in (("alice", ALICE, {}), ("bob", BOB, {"stream_options": {}}),
                          ("bob", BOB, {"stream_options": {"include_usage": False}})):
        b = body(A, f"no usage {key} {extra}", True, **extra)
        ans = await client.post(CHAT, b, auth=False, headers=h)
        assert ans.status == 200
        data = ans.data()
        assert data[-1] == "[DONE]" and len(data) > 2
        assert usage_events(data) == [], data
        assert b"usage" not in ans.body
        e.req(A, CHAT, key, 200, True)
        e.stripped.append((key, b))
        e.ttft[A] += 1
    # Errors: no key, unknown model, a bad stream_options (gateway 400s).
    ans = await client.post(CHAT, body(A, "no key", False), auth=False)
    assert ans.status == 401
    e.req("-", CHAT, "-", 401, False)
    ans = await client.post(CHAT, body("no-such-model", "x", False), auth=False, headers=BOB)
    assert ans.status == 404
    e.req("-", CHAT, "bob", 404, False)
    ans = await client.post(CHAT, body(A, "bad", True, stream_options="yes"), auth=False,
                            headers=BOB)
    assert ans.status == 400  # refused before routing: no model label
    e.req("-", CHAT, "bob", 400, False)
    # A 429: F has one slot and no queue; a stream holds it.
    session = client.session
    resp = await session.post(client.base + CHAT, json=hold, headers=ALICE)
    assert resp.status == 200
    first = await read_until(resp, lambda seen: b"data: {" in seen, 60)
    ans = await client.post(CHAT, body(F, "too many", False), auth=False, headers=BOB)
    assert ans.status == 429, ans.body
    e.req(F, CHAT, "bob", 429, False)
    rest = await asyncio.wait_for(resp.read(), 120)
    resp.release()
    held = client.record(Answer(200, dict(resp.headers), first + rest))
    seen = usage_events(held.data())
    assert len(seen) == 1
    e.req(F, CHAT, "alice", 200, True)
    e.usage(F, "alice", seen[0]["usage"])
    e.ttft[F] += 1
    # A client that leaves mid-stream.
    async with aiohttp.ClientSession() as s:
        resp = await s.post(client.base + CHAT, json=leave, headers=BOB)
        assert resp.status == 200
        await read_until(resp, lambda seen: b"data: {" in seen, 60)
        resp.close()
    e.req(A, CHAT, "bob", 499, True)
    e.ttft[A] += 1
    # Failover: G's first replica refuses connections; the second answers.
    ans = await client.post(CHAT, body(G, "failover", False), auth=False, headers=ALICE)
    assert ans.status == 200, ans.body
    e.req(G, CHAT, "alice", 200, False)
    e.usage(G, "alice", ans.json()["usage"])
    return e


def direct_usage(url: str, internal: str, b: dict[str, Any]) -> dict[str, Any]:
    """What the upstream reports for the same request, asked directly (unary; greedy
    decoding, so the same tokens)."""
    req = {**b, "model": internal, "stream": False}
    req.pop("stream_options", None)
    r = urllib.request.Request(url + CHAT, data=json.dumps(req).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as resp:
        usage: dict[str, Any] = json.loads(resp.read())["usage"]
    return usage


async def scrape(client: GatewayClient) -> Samples:
    ans = await client.get("/metrics", auth=False, headers=ALICE)
    assert ans.status == 200, ans.body
    assert ans.headers["Content-Type"].startswith("text/plain")
    return parse(ans.body.decode())


async def check_scrape(client: GatewayClient, e: Expect, upstream: str,
                       internal: str) -> Samples:
    for key, b in e.stripped:  # usage the stripped streams' clients never saw
        e.usage(A, key, await asyncio.to_thread(direct_usage, upstream, internal, b))

    async def settled() -> Samples:  # the disconnect is counted when its handler ends
        for _ in range(100):
            s = await scrape(client)
            if total(s, "maclustr_client_disconnects_total") >= 1:
                return s
            await asyncio.sleep(0.05)
        raise AssertionError("the client disconnect was never counted")

    s = await settled()
    got = {(d["model"], d["endpoint"], d["key"], d["code"], d["stream"]): v
           for lab, v in select(s, "maclustr_requests_total").items() for d in [dict(lab)]}
    assert got == dict(e.requests)
    tokens = {(d["model"], d["key"], d["type"]): v
              for lab, v in select(s, "maclustr_tokens_total").items() for d in [dict(lab)]}
    assert tokens == dict(e.tokens)
    for model, n in e.ttft.items():
        assert total(s, "maclustr_time_to_first_token_seconds_count", model=model) == n
        assert total(s, "maclustr_time_per_output_token_seconds_count", model=model) > 0
    assert total(s, "maclustr_failovers_total", model=G) == 1
    assert total(s, "maclustr_failovers_total") == 1
    assert total(s, "maclustr_rejections_total", model=F, reason="queue_full") == 1
    assert total(s, "maclustr_rejections_total") == 1
    assert total(s, "maclustr_client_disconnects_total", model=A, phase="response") == 1
    assert total(s, "maclustr_client_disconnects_total") == 1
    assert total(s, "maclustr_request_duration_seconds_count") == sum(e.requests.values())
    # Requests that got a slot waited for it (G: once, its failover took the free replica).
    assert total(s, "maclustr_queue_wait_seconds_count") == sum(
        n for (m, _, _, code, _), n in e.requests.items() if code in ("200", "499"))
    # Scrape-time gauges: nothing queued or in flight now; the dead replica is still up
    # (one failure does not eject it), replicas are named by index.
    for m in (A, F, G):
        assert total(s, "maclustr_queue_depth", model=m) == 0
        assert total(s, "maclustr_in_flight", model=m) == 0
    assert set(select(s, "maclustr_replica_up", model=G)) == {
        frozenset({("model", G), ("replica", "0")}), frozenset({("model", G), ("replica", "1")})}
    assert total(s, "maclustr_build_info", version=__version__) == 1
    return s


def assert_nothing_internal(text: str, internal: set[str]) -> None:
    for s in internal:
        assert s not in text, f"{s!r} in /metrics"


async def test_metrics_after_known_mix_fake(make_gateway: Any, fake: FakeMLX,
                                            fake2: FakeMLX) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    models = {A: "/Users/admin/models/internal-a", F: "/Users/admin/models/internal-f",
              G: "/Users/admin/models/internal-g"}
    gw: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [dead, fake2.url]),
                                     keys=KEYS)
    fake.by_model(models[F], Behavior(events=6, delay=0.3))  # holds F's slot ~1.5 s
    # A's requests reach the fake in the mix's order: 7 ordinary, then the one the client
    # leaves (slow, so it leaves mid-stream).
    fake.push(*[Behavior()] * 7, Behavior(events=100, delay=0.05))
    hold = body(F, "hold", True, stream_options={"include_usage": True})
    e = await run_mix(gw.client, hold, body(A, "leave", True, max_tokens=1000))
    # every stream asked the upstream for usage, none went with a bare {}
    for r in fake.requests + fake2.requests:
        if isinstance(r.json, dict) and r.json.get("stream"):
            assert r.json["stream_options"]["include_usage"] is True, r.json
        elif isinstance(r.json, dict):
            assert "stream_options" not in r.json
    s = await check_scrape(gw.client, e, fake.url, models[A])
    raw = (await gw.client.get("/metrics", auth=False, headers=ALICE)).body.decode()
    assert_nothing_internal(raw, gw.secrets | set(models.values()) | {dead, "sk-alice-0001",
                                                                      "sk-bob-0002"})
    assert total(s, "maclustr_replica_up") == 4


async def test_metrics_after_known_mix_real(make_gateway: Any, real_mlx: RealMLX,
                                            tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    coder, fast = str(real_mlx.models[A]), str(real_mlx.models[F])
    general = tmp_path / "tiny-general"  # a third id for the same weights (ids are unique)
    general.symlink_to(real_mlx.models[A], target_is_directory=True)
    models = {A: coder, F: fast, G: str(general)}
    gw: Gateway = await make_gateway(
        mix_routes(models, real_mlx.url, real_mlx.url, [dead, real_mlx.url]), keys=KEYS)
    hold = body(F, "hold the slot", True, max_tokens=600,
                stream_options={"include_usage": True})
    leave = body(A, "leave early", True, max_tokens=100000)
    e = await run_mix(gw.client, hold, leave)
    s = await check_scrape(gw.client, e, real_mlx.url, coder)
    raw = (await gw.client.get("/metrics", auth=False, headers=ALICE)).body.decode()
    assert_nothing_internal(raw, gw.secrets | set(models.values()) | {dead})
    assert total(s, "maclustr_tokens_total", type="completion") > 0


async def test_metrics_needs_a_key_unless_public(make_gateway: Any, fake: FakeMLX) -> None:
    models = {A: "internal-a", F: "internal-f", G: "internal-g"}
    gw: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [fake.url]),
                                     keys=KEYS)
    assert (await gw.client.get("/metrics", auth=False)).status == 401
    assert (await gw.client.get("/metrics", auth=False, headers={
        "Authorization": "Bearer wrong"})).status == 401
    assert (await gw.client.get("/metrics", auth=False, headers=BOB)).status == 200
    pub: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [fake.url],
                                                 top="gateway:\n  metrics_public: true"),
                                      keys=KEYS)
    assert (await pub.client.get("/metrics", auth=False)).status == 200


async def test_metrics_can_be_switched_off(make_gateway: Any, fake: FakeMLX) -> None:
    """gateway.metrics: false (for the bench's metrics-off figures): no /metrics, requests
    still served."""
    models = {A: "internal-a", F: "internal-f", G: "internal-g"}
    gw: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [fake.url],
                                                top="gateway:\n  metrics: false"), keys=KEYS)
    assert (await gw.client.get("/metrics", auth=False, headers=ALICE)).status == 404
    ans = await gw.client.post(CHAT, body(A, "hi", True), auth=False, headers=ALICE)
    assert ans.status == 200 and usage_events(ans.data()) == []


@pytest.mark.parametrize("value", ["yes", 1, "true"])
async def test_config_metrics_flags_must_be_booleans(value: Any) -> None:
    from maclustr.config import ConfigError, parse_routes

    for key in ("metrics", "metrics_public"):
        with pytest.raises(ConfigError, match=f"gateway.{key} must be true or false"):
            parse_routes(f"gateway:\n  {key}: {json.dumps(value)}\nmodels:\n  a:\n"
                         "    model: m\n    upstream: http://127.0.0.1:1\n")


FIELDS = {"time", "request_id", "key", "model", "method", "endpoint", "stream", "status",
          "replica", "ttft_ms", "duration_ms", "prompt_tokens", "completion_tokens",
          "bytes_out", "error"}


def check_json_log(log: str, e: Expect, internal: set[str]) -> list[dict[str, Any]]:
    """Every line one JSON object; no secret or internal string anywhere; one access record
    per API request of the mix, with its labels. Returns the API records."""
    records = [json.loads(ln) for ln in log.splitlines() if ln.strip()]  # every line parses
    for s in (*internal, "sk-alice-0001", "sk-bob-0002"):
        assert s not in log, f"{s!r} in the log"
    access = [r for r in records if "request_id" in r]
    assert all(set(r) == FIELDS for r in access)
    others = [r for r in records if "request_id" not in r]
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in others)
    api = [r for r in access if r["endpoint"] in (CHAT, COMPLETIONS)]
    got = Counter((r["model"], r["endpoint"], r["key"], str(r["status"]),
                   "true" if r["stream"] else "false") for r in api)
    assert got == e.requests
    return api


async def test_json_access_log_after_known_mix(gateway_process: Any, tmp_path: Path,
                                               fake: FakeMLX, fake2: FakeMLX) -> None:
    """`--log-format json`: every line is one JSON object; one access record per request with
    the key's name, alias, replica name, timings and tokens; no secret, address or internal
    id anywhere in the log."""
    dead = f"http://127.0.0.1:{free_port()}"
    models = {A: "/Users/admin/models/internal-a", F: "/Users/admin/models/internal-f",
              G: "/Users/admin/models/internal-g"}
    routes = tmp_path / "routes.yaml"
    routes.write_text(mix_routes(models, fake.url, fake.url, [dead, fake2.url]))
    gp = gateway_process(routes, "--log-format", "json",
                         env={"MACLUSTR_API_KEY": ",".join(KEYS)})
    fake.by_model(models[F], Behavior(events=6, delay=0.3))
    fake.push(*[Behavior()] * 7, Behavior(events=100, delay=0.05))
    async with aiohttp.ClientSession() as session:
        client = GatewayClient(gp.url, session)
        e = await run_mix(client, body(F, "hold", True, stream_options={"include_usage": True}),
                          body(A, "leave", True, max_tokens=1000))
    await wait_for(lambda: '"status":499' in gp.output(), 15)  # the abandoned stream
    gp.proc.terminate()
    await asyncio.to_thread(gp.proc.wait, 10)
    netlocs = [u.split("//", 1)[1] for u in (fake.url, fake2.url, dead)]  # host:port
    api = check_json_log(gp.output(), e, {*models.values(), *netlocs})
    failover = next(r for r in api if r["model"] == G)
    assert failover["replica"] == "1" and failover["error"] is None
    assert failover["prompt_tokens"] > 0 and failover["ttft_ms"] is None
    streams = [r for r in api if r["stream"] and r["status"] == 200]
    assert streams and all(r["ttft_ms"] > 0 and r["bytes_out"] > 0 for r in streams)
    assert all(r["completion_tokens"] > 0 for r in streams)  # usage on every stream
    gone = [r for r in api if r["status"] == 499]
    assert len(gone) == 1 and gone[0]["error"] == "client_disconnected"
    rejected = next(r for r in api if r["status"] == 429)
    assert rejected["error"] == "rate_limit_exceeded" and rejected["key"] == "bob"


async def test_json_access_log_after_known_mix_real(gateway_process: Any, tmp_path: Path,
                                                    real_mlx: RealMLX) -> None:
    """The same against the real mlx_lm.server, whose model ids are filesystem paths."""
    dead = f"http://127.0.0.1:{free_port()}"
    general = tmp_path / "tiny-general"
    general.symlink_to(real_mlx.models[A], target_is_directory=True)
    models = {A: str(real_mlx.models[A]), F: str(real_mlx.models[F]), G: str(general)}
    routes = tmp_path / "routes.yaml"
    routes.write_text(mix_routes(models, real_mlx.url, real_mlx.url, [dead, real_mlx.url]))
    gp = gateway_process(routes, "--log-format", "json",
                         env={"MACLUSTR_API_KEY": ",".join(KEYS)})
    async with aiohttp.ClientSession() as session:
        client = GatewayClient(gp.url, session)
        e = await run_mix(client, body(F, "hold the slot", True, max_tokens=600,
                                       stream_options={"include_usage": True}),
                          body(A, "leave early", True, max_tokens=100000))
    await wait_for(lambda: '"status":499' in gp.output(), 15)  # the abandoned stream
    gp.proc.terminate()
    await asyncio.to_thread(gp.proc.wait, 10)
    netlocs = [u.split("//", 1)[1] for u in (real_mlx.url, dead)]
    api = check_json_log(gp.output(), e, {*models.values(), *netlocs, "tiny-"})
    done = [r for r in api if r["status"] == 200]
    assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] >= 0 for r in done)


async def test_text_access_log_holds_nothing_internal(gateway_process: Any, tmp_path: Path,
                                                      fake: FakeMLX, fake2: FakeMLX) -> None:
    """The default text format: one line per request with the key's name, never a secret,
    an upstream address or an internal id."""
    dead = f"http://127.0.0.1:{free_port()}"
    models = {A: "/Users/admin/models/internal-a", F: "/Users/admin/models/internal-f",
              G: "/Users/admin/models/internal-g"}
    routes = tmp_path / "routes.yaml"
    routes.write_text(mix_routes(models, fake.url, fake.url, [dead, fake2.url]))
    gp = gateway_process(routes, env={"MACLUSTR_API_KEY": ",".join(KEYS)})
    fake.by_model(models[F], Behavior(events=6, delay=0.3))
    fake.push(*[Behavior()] * 7, Behavior(events=100, delay=0.05))
    async with aiohttp.ClientSession() as session:
        e = await run_mix(GatewayClient(gp.url, session),
                          body(F, "hold", True, stream_options={"include_usage": True}),
                          body(A, "leave", True, max_tokens=1000))
    await wait_for(lambda: " status=499 " in gp.output(), 15)  # the abandoned stream
    gp.proc.terminate()
    await asyncio.to_thread(gp.proc.wait, 10)
    log = gp.output()
    for s in (*models.values(), *[u.split("//", 1)[1] for u in (fake.url, fake2.url, dead)],
              "sk-alice-0001", "sk-bob-0002"):
        assert s not in log, f"{s!r} in the log"
    access = [ln for ln in log.splitlines() if " maclustr.access " in ln and
              (f" {CHAT} " in ln or f" {COMPLETIONS} " in ln)]
    assert len(access) == sum(e.requests.values())
    assert sum(" key=alice " in ln for ln in access) == sum(
        n for k, n in e.requests.items() if k[2] == "alice")


async def test_translated_requests_count_the_same(make_gateway: Any, fake: FakeMLX) -> None:
    """Anthropic Messages requests (unary and stream) count like chat ones: tokens from the
    upstream's usage, time to first token for the stream."""
    models = {A: "internal-a", F: "internal-f", G: "internal-g"}
    gw: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [fake.url]),
                                     keys=KEYS)
    msg = {"model": A, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    ans = await gw.client.post("/v1/messages", msg, auth=False,
                               headers={"x-api-key": "sk-alice-0001"})
    assert ans.status == 200, ans.body
    unary = ans.json()["usage"]
    ans = await gw.client.post("/v1/messages", {**msg, "stream": True}, auth=False,
                               headers={"x-api-key": "sk-alice-0001"})
    assert ans.status == 200
    sent = [r.json for r in fake.requests]  # the translated chat requests
    assert len(sent) == 2 and sent[1]["stream_options"] == {"include_usage": True}
    want = [await asyncio.to_thread(direct_usage, fake.url, models[A], b) for b in sent]
    assert unary["output_tokens"] == want[0]["completion_tokens"]
    s = await scrape(gw.client)
    assert total(s, "maclustr_requests_total", endpoint="/v1/messages", key="alice",
                 code="200") == 2
    assert total(s, "maclustr_tokens_total", key="alice", type="prompt") == sum(
        w["prompt_tokens"] for w in want)
    assert total(s, "maclustr_tokens_total", key="alice", type="completion") == sum(
        w["completion_tokens"] for w in want)
    assert total(s, "maclustr_time_to_first_token_seconds_count", model=A) == 1


async def test_responses_requests_count_the_same(make_gateway: Any, fake: FakeMLX) -> None:
    """OpenAI Responses requests (unary and stream) count like chat ones."""
    models = {A: "internal-a", F: "internal-f", G: "internal-g"}
    gw: Gateway = await make_gateway(mix_routes(models, fake.url, fake.url, [fake.url]),
                                     keys=KEYS)
    req = {"model": A, "input": "hi", "max_output_tokens": 8}
    for stream in (False, True):
        ans = await gw.client.post("/v1/responses", {**req, "stream": stream}, auth=False,
                                   headers=BOB)
        assert ans.status == 200, ans.body
    sent = [r.json for r in fake.requests]
    assert len(sent) == 2 and sent[1]["stream_options"] == {"include_usage": True}
    want = [await asyncio.to_thread(direct_usage, fake.url, models[A], b) for b in sent]
    s = await scrape(gw.client)
    assert total(s, "maclustr_requests_total", endpoint="/v1/responses", key="bob",
                 code="200") == 2
    for kind, field_ in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        assert total(s, "maclustr_tokens_total", model=A, key="bob", type=kind) == sum(
            w[field_] for w in want)
    assert total(s, "maclustr_time_to_first_token_seconds_count", model=A) == 1
