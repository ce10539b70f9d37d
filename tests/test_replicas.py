"""Replicas, failover, passive health, per-model queueing with fairness, warm-up, affinity and
the health check that generates (issue 7), driven over HTTP against fake upstreams.

Why: a Mac that wedges, reloads a model or reboots must reach users as a request served by
another replica, or as an immediate 503/429 with Retry-After that SDKs honour, never as a
long wait or a silent failure. Where a test has to know that a request is *queued* (there is
no external signal for it), it reads the scheduler's queue size; everything else is observed
on the wire (the fakes' recorded requests, the gateway's answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import pytest
from conftest import KEY, KEY2, Answer, Behavior, FakeMLX, Gateway, wait_for
from openai import AsyncOpenAI

from maclustr import health
from maclustr import scheduler as sched_mod
from maclustr.app import BACKENDS
from maclustr.harness import free_port

CHAT = "/v1/chat/completions"
ALIAS = "maclustr-coder"
MODEL = "/Users/admin/models/internal-coder-id"


# --- helpers --------------------------------------------------------------------------------


def routes(urls: list[str], *, alias: str = ALIAS, model: str = MODEL, extra: str = "",
           top: str = "") -> str:
    """A routes file with one alias on several replicas; `extra` lines go on the model."""
    lines = [top.rstrip()] if top else []
    lines += ["models:", f"  {alias}:", f"    model: {json.dumps(model)}", "    upstreams:"]
    lines += [f"      - {u}" for u in urls]
    lines += [f"    {ln}" for ln in extra.strip().splitlines()]
    return "\n".join(lines) + "\n"


def chat(content: str = "hi", stream: bool = False, system: str | None = None,
         more: list[dict[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    msgs = ([{"role": "system", "content": system}] if system else [])
    msgs.append({"role": "user", "content": content})
    return {"model": ALIAS, "messages": msgs + (more or []), "stream": stream, **extra}


def contents(fake: FakeMLX) -> list[str]:
    """The last message's content of every completion request the fake saw, in order."""
    out = []
    for r in fake.requests:
        if r.method == "POST" and isinstance(r.json, dict) and r.json.get("messages"):
            out.append(r.json["messages"][-1]["content"])
    return out


def posts(fake: FakeMLX) -> int:
    return sum(1 for r in fake.requests if r.method == "POST")


def warmups(fake: FakeMLX) -> int:
    """One-token requests (warm-up or generate probes) the fake received."""
    return sum(1 for r in fake.requests
               if r.method == "POST" and isinstance(r.json, dict) and r.json.get("max_tokens") == 1)


def queued(gw: Gateway, alias: str = ALIAS) -> int:
    """Requests waiting in the model's queue (no wire signal says 'queued')."""
    q = gw.app[BACKENDS].scheduler._queues.get(alias)
    return q.size if q is not None else 0


def assert_envelope(ans: Answer, status: int, code: str) -> dict[str, Any]:
    assert ans.status == status, (ans.status, ans.body[:300])
    assert ans.headers["Content-Type"].startswith("application/json")
    err: dict[str, Any] = ans.json()["error"]
    assert err["code"] == code, err
    return err


def retry_after(ans: Answer) -> int:
    value = ans.headers.get("Retry-After")
    assert value is not None and value.isdigit() and int(value) >= 1, ans.headers
    return int(value)


async def raw_post(gw: Gateway, body: dict[str, Any], key: str = KEY) -> Answer:
    """POST through the recording client with a chosen API key."""
    return await gw.client.post(CHAT, body, headers={"Authorization": f"Bearer {key}"})


async def abandon(task: asyncio.Task[Any]) -> None:
    """Cancel a client request task: the client disconnects."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


@pytest.fixture
async def make_gateway(make_gateway: Any) -> AsyncIterator[Any]:
    """The shared factory, plus a check at teardown that every slot was given back: no
    failover, cancellation or queue path may leak a replica's in-flight count."""
    made: list[Gateway] = []

    async def make(text: str, **kw: Any) -> Gateway:
        gw: Gateway = await make_gateway(text, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        sched = gw.app[BACKENDS].scheduler
        await wait_for(lambda s=sched: all(r.in_flight == 0 for r in s.replicas.values()),
                       timeout=3)
        assert all(q.size == 0 for q in sched._queues.values())


@pytest.fixture
async def fake3() -> AsyncIterator[FakeMLX]:
    async with FakeMLX() as f:
        yield f


@pytest.fixture
def short_cooldown(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(sched_mod, "COOLDOWN", 0.3)
    return 0.3


def no_addresses(ans: Answer, *urls: str) -> None:
    """Neither the URL nor host:port of any replica appears in an answer."""
    blob = ans.body + json.dumps(ans.headers).encode()
    for u in urls:
        netloc = u.split("://", 1)[1]
        assert u.encode() not in blob and netloc.encode() not in blob, blob[:400]


# --- least-in-flight selection --------------------------------------------------------------


async def test_concurrent_requests_spread_over_two_slow_replicas(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """Four concurrent slow requests: each replica gets two (fewest in flight wins)."""
    for f in (fake, fake2):
        f.default = Behavior(header_delay=0.3)
    gw = await make_gateway(routes([fake.url, fake2.url]))
    answers = await asyncio.gather(*(gw.client.post(CHAT, chat(f"c{i}")) for i in range(4)))
    assert [a.status for a in answers] == [200] * 4
    assert (posts(fake), posts(fake2)) == (2, 2)


async def test_sequential_ties_alternate_round_robin(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    gw = await make_gateway(routes([fake.url, fake2.url]))
    for i in range(6):
        assert (await gw.client.post(CHAT, chat(f"conv {i}"))).status == 200
    assert contents(fake) == ["conv 0", "conv 2", "conv 4"]
    assert contents(fake2) == ["conv 1", "conv 3", "conv 5"]


async def test_busy_replica_is_avoided_while_another_is_idle(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """A replica with a request in flight gets nothing new while the other has none."""
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url, fake2.url]))
    slow = asyncio.create_task(gw.client.post(CHAT, chat("slow")))
    await fake.wait_requests(1)
    for i in range(3):
        assert (await gw.client.post(CHAT, chat(f"quick {i}"))).status == 200
    assert contents(fake2) == ["quick 0", "quick 1", "quick 2"]
    assert contents(fake) == ["slow"]
    await abandon(slow)


# --- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["reset", "503", "502", "drop"])
async def test_failover_before_first_byte(make_gateway: Any, fake: FakeMLX, fake2: FakeMLX,
                                          fault: str, stream: bool) -> None:
    """Replica 1 fails before answering: the request succeeds on replica 2."""
    b = {"reset": Behavior(kind="reset"), "drop": Behavior(kind="drop"),
         "503": Behavior(kind="error", status=503, error_body=b'{"error": "busy"}'),
         "502": Behavior(kind="error", status=502, error_body=b'{"error": "bad gw"}')}[fault]
    fake.push(b)
    gw = await make_gateway(routes([fake.url, fake2.url]))
    ans = await gw.client.post(CHAT, chat("failover", stream=stream))
    assert ans.status == 200, ans.body[:300]
    if stream:
        data = ans.data()
        assert data[-1] == "[DONE]" and not any("error" in d for d in data[:-1])
    else:
        assert ans.json()["choices"][0]["message"]["content"]
    assert contents(fake) == ["failover"]  # replica 1 saw it first
    assert contents(fake2) == ["failover"]


async def test_failover_from_refused_port(make_gateway: Any, fake2: FakeMLX) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await make_gateway(routes([dead, fake2.url]))
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("refused"))
    assert ans.status == 200
    assert contents(fake2) == ["refused"]
    assert time.monotonic() - t0 < 2


async def test_failover_waits_for_a_busy_healthy_replica(make_gateway: Any,
                                                         fake2: FakeMLX) -> None:
    """Replica 1 refuses connections and replica 2 is at max_concurrency: the request waits
    for replica 2's slot instead of failing with 502."""
    dead = f"http://127.0.0.1:{free_port()}"
    fake2.push(Behavior(delay=0.4), Behavior())  # the first request holds the only slot
    gw = await make_gateway(routes([dead, fake2.url], extra="max_concurrency: 1"))
    busy = asyncio.ensure_future(gw.client.post(CHAT, chat("holder")))
    await wait_for(lambda: posts(fake2) == 1)
    ans = await gw.client.post(CHAT, chat("waiter"))
    assert ans.status == 200, ans.body[:300]
    assert (await busy).status == 200
    assert contents(fake2) == ["holder", "waiter"]


async def test_generate_probe_keeps_a_wedged_replica_out(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """With probe_generate, a replica whose /health is fine but which never yields a token
    stays out after its cool-down; without it, /health alone would bring it back."""
    monkeypatch.setattr(sched_mod, "COOLDOWN", 0.2)
    gw = await make_gateway(routes([fake.url, fake2.url],
                                   top="gateway: {probe_generate: true, generate_timeout: 0.3}"))
    rep = gw.app[BACKENDS].scheduler.replica(fake.url)
    fake.default = Behavior(kind="error", status=503, error_body=b'{"error": "wedged"}')
    for i in range(12):  # until fake has failed three times in a row (ties alternate)
        assert (await gw.client.post(CHAT, chat(f"x{i}"))).status == 200  # fake2 serves
        if rep.checking:
            break
    assert rep.checking
    fake.default = Behavior(kind="hang")  # /health still answers; generation never does
    await asyncio.sleep(1.0)  # several cool-downs and probes
    assert rep.checking, "a replica that yields no token came back"
    fake.default = Behavior()
    await wait_for(lambda: not rep.checking, timeout=3)


async def test_upstream_500_is_not_retried_elsewhere(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """Only connect failures and 502/503 fail over: a 500 is the answer."""
    fake.push(Behavior(kind="error", status=500, error_body=b'{"error": "boom"}'))
    gw = await make_gateway(routes([fake.url, fake2.url]))
    ans = await gw.client.post(CHAT, chat("five hundred"))
    assert ans.status == 502, ans.body  # UpstreamFailed: the replica's 500 is the answer
    assert "error" in ans.json()
    assert posts(fake2) == 0


async def test_no_retry_after_first_byte(make_gateway: Any, fake: FakeMLX,
                                         fake2: FakeMLX) -> None:
    """A replica that dies mid-stream: the client gets the in-band error event, and the
    request is not replayed on replica 2 (the client already has half an answer)."""
    fake.push(Behavior(events=6, die_after=2))
    gw = await make_gateway(routes([fake.url, fake2.url]))
    ans = await gw.client.post(CHAT, chat("mid-stream", stream=True))
    assert ans.status == 200
    data = ans.data()
    assert len([d for d in data if isinstance(d, dict) and "choices" in d]) == 2
    assert isinstance(data[-1], dict) and data[-1]["error"]["code"] == "upstream_unavailable"
    assert "[DONE]" not in data
    assert posts(fake2) == 0


async def test_attempts_are_bounded(make_gateway: Any) -> None:
    """Four dead replicas: one request fails fast with one envelope, not a long crawl."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(4)]
    gw = await make_gateway(routes(dead))
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("nobody"))
    assert ans.status == 502, ans.body[:300]
    assert ans.json()["error"]["code"] == "upstream_unavailable"
    assert time.monotonic() - t0 < 3


# --- passive health: ejection, 503, return --------------------------------------------------


async def test_three_failures_eject_then_immediate_503_then_return_after_probe(
        make_gateway: Any, short_cooldown: float) -> None:
    """A lone replica failing three times is taken out: the next request is an immediate 503
    `model_unavailable` with Retry-After; once a server listens again it is probed with GET
    /health after the cool-down and serves again."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gw = await make_gateway(routes([url]))
    for _ in range(3):
        ans = await gw.client.post(CHAT, chat("x"))
        assert ans.status == 502
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("x"))
    assert time.monotonic() - t0 < 0.5
    assert_envelope(ans, 503, "model_unavailable")
    retry_after(ans)
    revived = FakeMLX()
    await revived.start("127.0.0.1", port)
    try:
        await wait_for(lambda: any(r.path == "/health" for r in revived.requests), timeout=3)
        await wait_for(lambda: not gw.app[BACKENDS].scheduler.all_down(
            gw.holder.current.routes[0]), timeout=3)
        ans = await gw.client.post(CHAT, chat("back"))
        assert ans.status == 200
        assert contents(revived) == ["back"]
    finally:
        await revived.close()


async def test_failing_probe_keeps_replica_out(make_gateway: Any, fake: FakeMLX,
                                               short_cooldown: float) -> None:
    """503 answers eject the replica; while its /health fails it stays out (503 to clients);
    when /health is ok again it serves again."""
    fake.push(*[Behavior(kind="error", status=503, error_body=b'{"error": "x"}')] * 3)
    fake.health = Behavior(kind="error", status=503)
    gw = await make_gateway(routes([fake.url]))
    for _ in range(3):
        assert (await gw.client.post(CHAT, chat("x"))).status == 502
    assert posts(fake) == 3  # two failures do not eject: the third request was still sent
    await wait_for(lambda: sum(r.path == "/health" for r in fake.requests) >= 2, timeout=3)
    ans = await gw.client.post(CHAT, chat("still out"))
    assert_envelope(ans, 503, "model_unavailable")
    retry_after(ans)
    assert "still out" not in contents(fake)
    fake.health = None
    route = gw.holder.current.routes[0]
    await wait_for(lambda: not gw.app[BACKENDS].scheduler.all_down(route), timeout=3)
    assert (await gw.client.post(CHAT, chat("ok again"))).status == 200


async def test_a_replica_a_reload_removed_is_no_longer_probed(
        make_gateway: Any, fake: FakeMLX, short_cooldown: float) -> None:
    """An ejected replica the routes no longer name is left alone: its probing ends (a
    server brought back on its address sees no /health), and the model serves from the
    replica the new table names."""
    port = free_port()
    gw = await make_gateway(routes([f"http://127.0.0.1:{port}"]))
    for _ in range(3):
        assert (await gw.client.post(CHAT, chat("x"))).status == 502
    sched = gw.app[BACKENDS].scheduler
    assert sched._tasks, "the replica should be out and probed"
    gw.holder.path.write_text(routes([fake.url]))
    assert gw.holder.reload() is True
    revived = FakeMLX()
    await revived.start("127.0.0.1", port)
    try:
        await wait_for(lambda: not sched._tasks, timeout=3)
        await asyncio.sleep(3 * short_cooldown)  # probes would have come by now
        assert not [r.path for r in revived.requests], "a removed replica was probed"
        assert (await gw.client.post(CHAT, chat("moved"))).status == 200
        assert contents(fake) == ["moved"]
    finally:
        await revived.close()


async def test_a_probe_that_raises_logs_one_line_and_probing_goes_on(
        make_gateway: Any, fake: FakeMLX, short_cooldown: float,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A probe that raises (a bug, not an answer) counts as a failed probe: one log line
    without a traceback, and the next probe brings the replica back."""
    fake.push(*[Behavior(kind="error", status=503, error_body=b'{"error": "x"}')] * 3)
    gw = await make_gateway(routes([fake.url]))
    real, calls = health.ping_status, []

    async def ping(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the probe")
        return await real(*args, **kw)

    monkeypatch.setattr(health, "ping_status", ping)  # what the passive probe calls
    route = gw.holder.current.routes[0]
    with caplog.at_level(logging.INFO, logger="maclustr.scheduler"):
        for _ in range(3):
            assert (await gw.client.post(CHAT, chat("x"))).status == 502
        await wait_for(lambda: not gw.app[BACKENDS].scheduler.all_down(route), timeout=3)
    said = [r for r in caplog.records if r.name == "maclustr.scheduler"
            and "probe raised" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].exc_info is None, [r.getMessage() for r in said]
    assert "RuntimeError" in said[0].getMessage() and "\n" not in said[0].getMessage()
    assert len(calls) >= 2
    assert (await gw.client.post(CHAT, chat("back"))).status == 200


async def test_mid_stream_deaths_count_toward_ejection(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, short_cooldown: float) -> None:
    """Three streams dying on replica 1 take it out: later requests go to replica 2 only."""
    fake.push(*[Behavior(events=4, die_after=1)] * 3)
    fake.health = Behavior(kind="error", status=503)  # keep it out for the test
    gw = await make_gateway(routes([fake.url, fake2.url]))
    # distinct conversations; after each death replica 1 has in_flight 0 again, so steer by
    # hanging nothing: alternate until replica 1 has failed three times
    i = 0
    while posts(fake) < 3 and i < 12:
        await gw.client.post(CHAT, chat(f"s{i}", stream=True))
        i += 1
    assert posts(fake) == 3
    for j in range(4):
        assert (await gw.client.post(CHAT, chat(f"after {j}"))).status == 200
    assert posts(fake) == 3
    deep = (await gw.client.get("/health?deep=true")).json()
    # its /health 503 is mlx's dead generation thread: out as `wedged` (issue 27)
    assert [r["status"] for r in deep["models"][ALIAS]["replicas"]] == ["wedged", "up"]


async def test_first_byte_timeouts_count_toward_ejection(make_gateway: Any, fake: FakeMLX,
                                                         short_cooldown: float) -> None:
    """A server that accepts and never answers is as sick as one that refuses."""
    fake.default = Behavior(kind="hang")
    fake.health = Behavior(kind="error", status=503)
    gw = await make_gateway(routes([fake.url], extra="timeouts:\n  first_byte: 0.2"))
    for _ in range(3):
        assert (await gw.client.post(CHAT, chat("slow"))).status == 504
    ans = await gw.client.post(CHAT, chat("slow"))
    assert_envelope(ans, 503, "model_unavailable")
    assert posts(fake) == 3


async def test_client_errors_do_not_eject(make_gateway: Any, fake: FakeMLX,
                                          short_cooldown: float) -> None:
    """A 404/400 from the server is the user's problem, not a sign the replica is sick."""
    fake.push(*[Behavior(kind="error", status=404, error_body=b'{"error": "nope"}')] * 4)
    gw = await make_gateway(routes([fake.url]))
    for _ in range(4):
        assert (await gw.client.post(CHAT, chat("bad"))).status == 400  # mlx's 404
    assert (await gw.client.post(CHAT, chat("fine"))).status == 200


async def test_all_replicas_out_gives_immediate_503(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, short_cooldown: float) -> None:
    for f in (fake, fake2):
        f.default = Behavior(kind="error", status=503, error_body=b'{"error": "x"}')
        f.health = Behavior(kind="error", status=503)
    gw = await make_gateway(routes([fake.url, fake2.url]))
    for i in range(3):  # each request tries both replicas
        assert (await gw.client.post(CHAT, chat(f"x{i}"))).status == 502
    n = posts(fake) + posts(fake2)
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("late"))
    assert time.monotonic() - t0 < 0.5
    assert_envelope(ans, 503, "model_unavailable")
    retry_after(ans)
    assert posts(fake) + posts(fake2) == n
    models = (await gw.client.get("/v1/models")).json()["data"]
    assert [m["status"] for m in models] == ["down"]
    assert (await gw.client.get(f"/v1/models/{ALIAS}")).json()["status"] == "down"
    streamed = await gw.client.post(CHAT, chat("late stream", stream=True))
    assert_envelope(streamed, 503, "model_unavailable")  # an envelope, not an event stream
    retry_after(streamed)
    deep = await gw.client.get("/health?deep=true")
    assert deep.status == 503
    # their /health 503 is mlx's dead generation thread: `wedged` (issue 27)
    assert deep.json()["models"][ALIAS]["status"] == "wedged"


# --- deep health and the models list ----------------------------------------------------------


async def test_deep_health_shows_replica_states_without_addresses(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, short_cooldown: float) -> None:
    fake.health = Behavior(kind="error", status=503)
    gw = await make_gateway(routes([fake.url, fake2.url]))
    before = (await gw.client.get("/health?deep=true")).json()
    # a /health 503 is mlx's dead generation thread: `wedged` (issue 27)
    assert [r["status"] for r in before["models"][ALIAS]["replicas"]] == ["wedged", "up"]
    fake.health = None
    states: list[str] = []
    for _ in range(40):  # deep results are cached up to 1 s (DeepCache)
        before = (await gw.client.get("/health?deep=true")).json()
        states = [r["status"] for r in before["models"][ALIAS]["replicas"]]
        if states == ["up", "up"]:
            break
        await asyncio.sleep(0.05)
    assert states == ["up", "up"]
    no_addresses(ans := await gw.client.get("/health?deep=true"), fake.url, fake2.url)
    assert ans.json()["models"][ALIAS]["status"] == "up"
    fake.health = Behavior(kind="error", status=503)
    models = await gw.client.get("/v1/models")
    no_addresses(models, fake.url, fake2.url)
    assert models.json()["data"][0]["status"] == "up"  # one replica is enough


async def test_deep_health_marks_ejected_replica_down(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """An ejected replica shows `down` in deep health even though its /health answers ok."""
    monkeypatch.setattr(sched_mod, "COOLDOWN", 30.0)
    fake.default = Behavior(kind="error", status=503, error_body=b'{"error": "x"}')
    gw = await make_gateway(routes([fake.url, fake2.url]))
    i = 0
    while posts(fake) < 3 and i < 12:
        assert (await gw.client.post(CHAT, chat(f"d{i}"))).status == 200
        i += 1
    ans = await gw.client.get("/health?deep=true")
    no_addresses(ans, fake.url, fake2.url)
    body = ans.json()
    assert [r["status"] for r in body["models"][ALIAS]["replicas"]] == ["down", "up"]
    assert body["models"][ALIAS]["status"] == "up"
    assert "127.0.0.1" not in json.dumps(body)


async def test_queued_requests_get_503_when_the_last_replica_is_ejected(
        make_gateway: Any, fake: FakeMLX, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request queued behind the failure that takes the model's last replica out gets the
    immediate 503 + Retry-After too, not a wait until queue_timeout (or the cool-down)."""
    monkeypatch.setattr(sched_mod, "COOLDOWN", 30.0)
    err = Behavior(kind="error", status=503, error_body=b'{"error": "x"}')
    fake.push(err, err, Behavior(kind="error", status=503, error_body=b'{"error": "x"}',
                                 header_delay=0.3))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1\nqueue_timeout: 2.5"))
    for _ in range(2):
        assert (await gw.client.post(CHAT, chat("x"))).status == 502
    third = asyncio.create_task(gw.client.post(CHAT, chat("third")))
    await fake.wait_requests(3)
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("queued"))
    assert (await third).status == 502
    assert time.monotonic() - t0 < 1.5, "waited for queue_timeout with every replica out"
    assert_envelope(ans, 503, "model_unavailable")
    assert 25 <= retry_after(ans) <= 30  # about the cool-down left


async def test_client_disconnects_do_not_eject(make_gateway: Any, fake: FakeMLX,
                                               short_cooldown: float) -> None:
    """Clients that hang up mid-stream say nothing about the replica's health."""
    fake.default = Behavior(events=40, delay=0.05)
    fake.health = Behavior(kind="error", status=503)  # an ejection would stick
    gw = await make_gateway(routes([fake.url]))
    for i in range(4):
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + CHAT, json=chat(f"leave {i}", stream=True),
                headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
            first = await r.content.readuntil(b"\n\n")
            gw.client.record(Answer(r.status, dict(r.headers), first, complete=False))
        await wait_for(lambda n=i: fake.requests[n].closed_by_peer.is_set(), timeout=3)
    fake.default = Behavior()
    ans = await gw.client.post(CHAT, chat("still served"))
    assert ans.status == 200, ans.body[:200]


# --- queueing, 429, fairness ------------------------------------------------------------------


async def test_max_concurrency_is_per_replica(make_gateway: Any, fake: FakeMLX,
                                             fake2: FakeMLX) -> None:
    """Two replicas at max_concurrency 1 take two requests at once; the third waits."""
    fake.default = fake2.default = Behavior(kind="hang")
    gw = await make_gateway(routes([fake.url, fake2.url], extra="max_concurrency: 1"))
    tasks = [asyncio.create_task(gw.client.post(CHAT, chat(f"m{i}"))) for i in range(3)]
    await wait_for(lambda: posts(fake) + posts(fake2) == 2 and queued(gw) == 1)
    assert (posts(fake), posts(fake2)) == (1, 1)
    for t in tasks:
        await abandon(t)


async def test_full_queue_gets_429_with_retry_after(make_gateway: Any, fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1\nmax_queue: 1"))
    first = asyncio.create_task(gw.client.post(CHAT, chat("in flight")))
    await fake.wait_requests(1)
    second = asyncio.create_task(gw.client.post(CHAT, chat("queued")))
    await wait_for(lambda: queued(gw) == 1)
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("over"))
    assert time.monotonic() - t0 < 0.5
    assert_envelope(ans, 429, "rate_limit_exceeded")
    retry_after(ans)
    await abandon(first)
    assert (await second).status == 200
    assert contents(fake) == ["in flight", "queued"]


async def test_queue_timeout_gives_429_with_retry_after(make_gateway: Any,
                                                        fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1\nqueue_timeout: 0.3"))
    first = asyncio.create_task(gw.client.post(CHAT, chat("in flight")))
    await fake.wait_requests(1)
    t0 = time.monotonic()
    ans = await gw.client.post(CHAT, chat("waits"))
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 1.5, waited
    assert_envelope(ans, 429, "rate_limit_exceeded")
    retry_after(ans)
    assert contents(fake) == ["in flight"]
    assert queued(gw) == 0
    await abandon(first)


async def test_queued_requests_are_served_in_order(make_gateway: Any, fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1"))
    first = asyncio.create_task(gw.client.post(CHAT, chat("in flight")))
    await fake.wait_requests(1)
    waiting = []
    for i in range(4):
        waiting.append(asyncio.create_task(gw.client.post(CHAT, chat(f"q{i}"))))
        await wait_for(lambda n=i + 1: queued(gw) == n)
    await abandon(first)
    assert [a.status for a in await asyncio.gather(*waiting)] == [200] * 4
    assert contents(fake) == ["in flight", "q0", "q1", "q2", "q3"]


async def test_flooding_key_does_not_starve_another_key(make_gateway: Any,
                                                        fake: FakeMLX) -> None:
    """KEY queues six requests, then KEY2 one: KEY2's is served second, not seventh."""
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1"))
    first = asyncio.create_task(raw_post(gw, chat("in flight"), KEY))
    await fake.wait_requests(1)
    waiting = []
    for i in range(6):
        waiting.append(asyncio.create_task(raw_post(gw, chat(f"flood {i}"), KEY)))
        await wait_for(lambda n=i + 1: queued(gw) == n)
    waiting.append(asyncio.create_task(raw_post(gw, chat("other key"), KEY2)))
    await wait_for(lambda: queued(gw) == 7)
    await abandon(first)
    assert [a.status for a in await asyncio.gather(*waiting)] == [200] * 7
    served = contents(fake)[1:]
    assert served[:2] == ["flood 0", "other key"], served
    assert served[2:] == [f"flood {i}" for i in range(1, 6)]


async def test_fair_queue_alternates_keys(make_gateway: Any, fake: FakeMLX) -> None:
    """Both keys have several queued: they are served in turn, each key in its own order."""
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1"))
    first = asyncio.create_task(raw_post(gw, chat("in flight"), KEY))
    await fake.wait_requests(1)
    plan = [(KEY, "a0"), (KEY, "a1"), (KEY, "a2"), (KEY2, "b0"), (KEY, "a3"), (KEY2, "b1")]
    waiting = []
    for n, (key, text) in enumerate(plan, 1):
        waiting.append(asyncio.create_task(raw_post(gw, chat(text), key)))
        await wait_for(lambda n=n: queued(gw) == n)
    await abandon(first)
    assert [a.status for a in await asyncio.gather(*waiting)] == [200] * len(plan)
    assert contents(fake)[1:] == ["a0", "b0", "a1", "b1", "a2", "a3"]


async def test_queued_client_that_disconnects_leaves_the_queue(make_gateway: Any,
                                                               fake: FakeMLX) -> None:
    fake.push(Behavior(kind="hang"))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1"))
    first = asyncio.create_task(gw.client.post(CHAT, chat("in flight")))
    await fake.wait_requests(1)
    gone = asyncio.create_task(gw.client.post(CHAT, chat("gone")))
    await wait_for(lambda: queued(gw) == 1)
    stays = asyncio.create_task(gw.client.post(CHAT, chat("stays")))
    await wait_for(lambda: queued(gw) == 2)
    await abandon(gone)
    await wait_for(lambda: queued(gw) == 1, timeout=1)  # at once, not at queue_timeout
    await abandon(first)
    assert (await stays).status == 200
    assert contents(fake) == ["in flight", "stays"]
    assert posts(fake) == 2


async def test_openai_sdk_retries_429_and_succeeds(make_gateway: Any, fake: FakeMLX) -> None:
    """max_queue 0: a request finding the only slot busy gets 429 + Retry-After; the SDK's
    own retry (max_retries=3) honours it and the retried call succeeds."""
    fake.push(Behavior(header_delay=1.0))
    gw = await make_gateway(routes([fake.url], extra="max_concurrency: 1\nmax_queue: 0"))
    statuses: list[int] = []

    async def hook(resp: Any) -> None:
        statuses.append(resp.status_code)

    # The SDK is built before the blocker starts, so on a loaded machine its first request
    # still meets the busy slot; each retry waits Retry-After (1 s) and the blocker's answer
    # takes 1 s, so one of three retries finds the slot free.
    async with httpx2.AsyncClient(event_hooks={"response": [hook]}) as http:
        sdk = AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=3,
                          http_client=http, timeout=10)
        blocker = asyncio.create_task(gw.client.post(CHAT, chat("blocker")))
        await fake.wait_requests(1)
        out = await sdk.chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": "sdk"}], max_tokens=3)
    assert out.choices[0].message.content is not None
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    assert (await blocker).status == 200
    assert contents(fake) == ["blocker", "sdk"]


# --- affinity -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_system", [True, False])
async def test_conversation_turns_stick_to_their_replica(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, with_system: bool) -> None:
    """Later turns (same system + first user message) land where the first turn was served,
    while a different conversation lands on the other replica. Without a system prompt too:
    the first turn ([user]) and the second ([user, assistant, user]) are one conversation (a
    prefix of the first two messages missed there, so the second turn lost the cache)."""
    gw = await make_gateway(routes([fake.url, fake2.url]))

    def turn(conv: str, n: int) -> dict[str, Any]:
        more: list[dict[str, str]] = []
        for k in range(1, n):
            more += [{"role": "assistant", "content": f"{conv} reply {k}"},
                     {"role": "user", "content": f"{conv} turn {k + 1}"}]
        return chat(f"{conv} turn 1", system=f"system of {conv}" if with_system else None,
                    more=more)

    # B's second turn comes third: round-robin alone would send it to A's replica
    for conv, n in [("A", 1), ("B", 1), ("B", 2), ("A", 2), ("A", 3), ("B", 3), ("A", 4)]:
        assert (await gw.client.post(CHAT, turn(conv, n))).status == 200
    a_side, b_side = (fake, fake2) if contents(fake)[0].startswith("A") else (fake2, fake)
    assert contents(a_side) == ["A turn 1", "A turn 2", "A turn 3", "A turn 4"]
    assert contents(b_side) == ["B turn 1", "B turn 2", "B turn 3"]


async def test_completions_with_a_shared_prompt_head_stick_together(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """/v1/completions: prompts that extend the same long head go to the same replica."""
    gw = await make_gateway(routes([fake.url, fake2.url]))
    heads = {"A": "A" * 600, "B": "B" * 600}
    for conv, n in [("A", 0), ("B", 0), ("A", 1), ("A", 2), ("B", 1), ("B", 2)]:
        body = {"model": ALIAS, "prompt": heads[conv] + f" turn {n}", "max_tokens": 2}
        assert (await gw.client.post("/v1/completions", body)).status == 200
    for f in (fake, fake2):
        firsts = {r.json["prompt"][0] for r in f.requests if isinstance(r.json, dict)}
        assert len(firsts) == 1 and posts(f) == 3


async def test_affinity_yields_to_a_full_replica(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """When the conversation's replica is at max_concurrency, the turn goes to the other one
    at once instead of queueing behind it."""
    gw = await make_gateway(routes([fake.url, fake2.url], extra="max_concurrency: 1"))

    def turn(last: str) -> dict[str, Any]:
        return chat("shared first", system="sys",
                    more=[{"role": "assistant", "content": "r"}, {"role": "user", "content": last}])

    assert (await gw.client.post(CHAT, chat("shared first", system="sys"))).status == 200
    home, other = (fake, fake2) if posts(fake) == 1 else (fake2, fake)
    home.push(Behavior(kind="hang"))
    busy = asyncio.create_task(gw.client.post(CHAT, turn("occupies home")))  # affinity: home
    await home.wait_requests(2)
    t0 = time.monotonic()
    assert (await gw.client.post(CHAT, turn("t3"))).status == 200
    assert time.monotonic() - t0 < 1
    assert contents(other) == ["t3"]
    assert queued(gw) == 0
    await abandon(busy)


# --- warm-up and the health check that generates ------------------------------------------


async def test_reload_warms_new_replicas(make_gateway: Any, fake: FakeMLX,
                                         fake2: FakeMLX) -> None:
    """A reload that adds a replica (or turns warm-up on) warms what is not warm yet."""
    gw = await make_gateway(routes([fake.url]))
    assert (await gw.client.get("/health?deep=true")).status == 200
    assert warmups(fake) == 0
    gw.holder.path.write_text(routes([fake.url, fake2.url], extra="warmup: true"))
    assert gw.holder.reload()
    await wait_for(lambda: warmups(fake) == 1 and warmups(fake2) == 1, timeout=3)
    ans = await gw.client.get("/health?deep=true")
    no_addresses(ans, fake.url, fake2.url)
    assert ans.status == 200


async def test_warmup_sends_one_token_request_and_reports_loading_then_up(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    # the warm-up: a model that takes a while to load (long enough that a loaded machine still
    # asks /health before it ends)
    fake.push(Behavior(header_delay=2.0))
    gw = await make_gateway(routes([fake.url, fake2.url], extra="warmup: true"))
    await fake.wait_requests(1)
    await fake2.wait_requests(1)
    for f in (fake, fake2):
        w = f.requests[0].json
        assert isinstance(w, dict)
        assert f.requests[0].method == "POST" and w["max_tokens"] == 1
        assert w["model"] == MODEL
    ans = await gw.client.get("/health?deep=true")
    reps = ans.json()["models"][ALIAS]["replicas"]
    assert reps[0]["status"] == "loading", reps
    assert reps[1]["status"] == "up", reps

    async def state() -> str:
        report = (await gw.client.get("/health?deep=true")).json()
        return str(report["models"][ALIAS]["replicas"][0]["status"])

    deadline = time.monotonic() + 6
    while (s := await state()) != "up" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert s == "up"


async def test_model_with_every_replica_loading_reports_loading(
        make_gateway: Any, fake: FakeMLX) -> None:
    fake.push(Behavior(header_delay=2.0))  # loading for longer than /health takes to ask
    gw = await make_gateway(routes([fake.url], extra="warmup: true"))
    await fake.wait_requests(1)
    ans = await gw.client.get("/health?deep=true")
    assert ans.json()["models"][ALIAS]["status"] == "loading"
    await wait_for(lambda: gw.app[BACKENDS].scheduler.replica(fake.url).warm.get(MODEL)
                   == "warm", timeout=6)
    ans = await gw.client.get("/health?deep=true")
    assert ans.status == 200 and ans.json()["models"][ALIAS]["status"] == "up"


async def test_no_warmup_without_the_flag(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(routes([fake.url]))
    assert (await gw.client.get("/health?deep=true")).status == 200
    assert posts(fake) == 0


async def test_returning_replica_is_warmed_again(make_gateway: Any, fake: FakeMLX,
                                                  fake2: FakeMLX,
                                                  short_cooldown: float) -> None:
    """A replica back from passive-health exile gets a fresh warm-up request."""
    fake.push(*[Behavior(kind="error", status=503, error_body=b'{"error": "x"}')] * 4)
    gw = await make_gateway(routes([fake.url], extra="warmup: true"))
    await fake.wait_requests(1)  # the start-up warm-up (answered 503)
    assert warmups(fake) == 1
    for _ in range(3):
        assert (await gw.client.post(CHAT, chat("x"))).status == 502
    await wait_for(lambda: any(r.path == "/health" for r in fake.requests), timeout=3)
    await wait_for(lambda: warmups(fake) == 2, timeout=3)


async def test_deep_generate_reports_wedged_replica(make_gateway: Any, fake: FakeMLX,
                                                    fake2: FakeMLX) -> None:
    """/health is ok but no token comes: `?deep=generate` says `wedged` within the
    gateway's generate_timeout; the healthy replica is `up`."""
    fake.default = Behavior(kind="hang")
    gw = await make_gateway(routes([fake.url, fake2.url],
                                   top="gateway:\n  generate_timeout: 0.5"))
    plain = (await gw.client.get("/health?deep=true")).json()
    assert [r["status"] for r in plain["models"][ALIAS]["replicas"]] == ["up", "up"]
    t0 = time.monotonic()
    ans = await gw.client.get("/health?deep=generate", timeout=10)
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 2, elapsed
    no_addresses(ans, fake.url, fake2.url)
    body = ans.json()
    assert [r["status"] for r in body["models"][ALIAS]["replicas"]] == ["wedged", "up"]
    assert body["models"][ALIAS]["status"] == "up"
    assert warmups(fake2) == 1  # the healthy replica was asked for one token too


async def test_deep_generate_all_wedged_is_503(make_gateway: Any, fake: FakeMLX) -> None:
    fake.default = Behavior(kind="hang")
    gw = await make_gateway(routes([fake.url], top="gateway:\n  generate_timeout: 0.3"))
    ans = await gw.client.get("/health?deep=generate")
    assert ans.status == 503
    assert ans.json()["models"][ALIAS]["status"] == "wedged"


async def test_deep_generate_needs_a_key_and_is_cached(make_gateway: Any, fake: FakeMLX,
                                                       fake2: FakeMLX) -> None:
    """`?deep=generate` makes every replica produce a token: without a key it is a 401 that
    asks nothing upstream, and callers within a second share one check."""
    gw = await make_gateway(routes([fake.url, fake2.url]))
    for auth in ({"auth": False}, {"headers": {"Authorization": "Bearer wrong"}, "auth": False}):
        ans = await gw.client.get("/health?deep=generate", **auth)
        assert_envelope(ans, 401, "invalid_api_key")
    assert (warmups(fake), warmups(fake2)) == (0, 0)
    answers = await asyncio.gather(*(gw.client.get("/health?deep=generate") for _ in range(5)))
    answers.append(await gw.client.get("/health?deep=generate"))
    assert [a.status for a in answers] == [200] * 6
    assert (warmups(fake), warmups(fake2)) == (1, 1)  # one probe each, not six


async def test_public_deep_health_shows_states_not_load(make_gateway: Any,
                                                        fake: FakeMLX) -> None:
    """Per-replica in-flight counts tell an outsider when the cluster is busy: the public
    answer has states and latency only; a key holder also sees the load."""
    gw = await make_gateway(routes([fake.url]))
    fake.push(Behavior(kind="hang"))
    busy = asyncio.ensure_future(gw.client.post(CHAT, chat("busy"), timeout=10))
    try:
        await wait_for(lambda: posts(fake) == 1, timeout=3)
        public = (await gw.client.get("/health?deep=true", auth=False)).json()
        keyed = (await gw.client.get("/health?deep=true")).json()
    finally:
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy
    assert public["models"][ALIAS]["replicas"] == [
        {"status": "up", "latency_ms": keyed["models"][ALIAS]["replicas"][0]["latency_ms"]}]
    assert keyed["models"][ALIAS]["replicas"][0]["in_flight"] == 1
    assert "in_flight" not in json.dumps(public)


async def test_one_replica_form_still_works(make_gateway: Any, fake: FakeMLX) -> None:
    """`upstream:` (singular) is still the one-replica form."""
    text = f'models:\n  {ALIAS}:\n    model: "{MODEL}"\n    upstream: {fake.url}\n'
    gw = await make_gateway(text)
    assert (await gw.client.post(CHAT, chat("single"))).status == 200
    assert contents(fake) == ["single"]


async def test_deep_health_is_shared_by_concurrent_and_quick_callers(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """The public page polls /health?deep=true from every browser: within a second, callers
    share one check instead of each pinging every server."""
    gw = await make_gateway(routes([fake.url, fake2.url]))

    def pings() -> int:
        return sum(1 for r in fake.requests if r.path == "/health")

    answers = await asyncio.gather(*(gw.client.get("/health?deep=true") for _ in range(8)))
    answers.append(await gw.client.get("/health?deep=true"))
    assert all(a.status == 200 for a in answers)
    assert pings() == 1
