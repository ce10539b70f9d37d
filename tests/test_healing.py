"""Self-healing through the gateway in front of the fake upstream (issue 27): a dead replica
(/health 503) is taken out, restarted by its `restart` command exactly once, and rejoins; the
restart budget, a missing or failing command, and what health, metrics and the log say."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY, Answer, Behavior, FakeMLX, Gateway, wait_for
from prometheus_client.parser import text_string_to_metric_families

from maclustr import healer as healer_mod
from maclustr.app import BACKENDS
from maclustr.healer import run_command
from maclustr.logs import JSONFormatter

CHAT = "/v1/chat/completions"
ALIAS = "maclustr-coder"
# Records each run as one JSON line: what a restart command was given.
RECORDER = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"


def routes(url: str, restart: list[str] | None, limit: int | None = None) -> str:
    top = f"gateway:\n  restart_limit: {limit}\n" if limit is not None else ""
    cmd = f"    restart: {json.dumps(restart)}\n" if restart else ""
    return (f"{top}models:\n  {ALIAS}:\n    model: /Users/admin/models/internal-id\n"
            f"    upstream: {url}\n{cmd}")


def recorder(tmp_path: Path) -> tuple[list[str], Path]:
    runs = tmp_path / "runs.jsonl"
    return [sys.executable, "-c", RECORDER, str(runs), "{alias}", "{port}"], runs


def runs_of(path: Path) -> list[list[str]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def health_of(gw: Gateway, url: str) -> str:
    return str(gw.app[BACKENDS].scheduler.replica(url).health)


async def deep(gw: Gateway) -> dict[str, Any]:
    ans = await gw.client.get("/health?deep=true")
    return dict(ans.json())


async def metric(gw: Gateway, name: str, **labels: str) -> float:
    body = (await gw.client.get("/metrics")).body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


@pytest.fixture
def fast_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(healer_mod, "BACK_POLL", 0.05)


async def test_a_dead_replica_is_restarted_once_and_rejoins(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, fast_back: None,
        caplog: pytest.LogCaptureFixture) -> None:
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes(fake.url, cmd))
    assert (await gw.client.post(CHAT, {"model": ALIAS, "messages": [
        {"role": "user", "content": "hi"}]})).status == 200
    fake.health = Behavior(kind="error", status=503)  # mlx: the generation thread died
    with caplog.at_level(logging.INFO, "maclustr.heal"):
        await deep(gw)
        await wait_for(lambda: runs_of(runs), timeout=10)
        assert runs_of(runs) == [[ALIAS, str(fake.port)]]
        report = await deep(gw)
        assert report["models"][ALIAS]["replicas"][0]["status"] == "restarting"
        assert await metric(gw, "maclustr_replica_state", model=ALIAS, replica="0",
                            state="restarting") == 1
        # no other replica: a request waits in the queue for the restarted one
        waiting = asyncio.ensure_future(gw.client.post(CHAT, {"model": ALIAS, "messages": [
            {"role": "user", "content": "while restarting"}]}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert "while restarting" not in json.dumps([r.json for r in fake.requests])
        fake.health = None  # the restart worked
        await wait_for(lambda: health_of(gw, fake.url) == "up", timeout=10)
        assert (await asyncio.wait_for(waiting, 10)).status == 200
    assert runs_of(runs) == [[ALIAS, str(fake.port)]]  # exactly once
    assert await metric(gw, "maclustr_replica_restarts_total", model=ALIAS, replica="0",
                        reason="dead") == 1
    assert await metric(gw, "maclustr_replica_state", model=ALIAS, replica="0",
                        state="up") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "maclustr.heal"]
    said = "\n".join(lines)
    assert f"replica 0 of {ALIAS} is dead" in said and "restarting it:" in said, said
    assert sum("is dead" in x for x in lines) == 1  # one line per detection
    assert any("is back after its restart" in x for x in lines), said
    assert fake.url not in said and f":{fake.port}" not in said.replace(
        f"{ALIAS} {fake.port}", "")


async def test_past_restart_limit_the_replica_stays_wedged(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, fast_back: None,
        caplog: pytest.LogCaptureFixture) -> None:
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes(fake.url, cmd, limit=1))
    fake.health = Behavior(kind="error", status=503)
    await deep(gw)
    await wait_for(lambda: runs_of(runs), timeout=10)
    fake.health = None
    await wait_for(lambda: health_of(gw, fake.url) == "up", timeout=10)
    fake.health = Behavior(kind="error", status=503)  # dead again within the hour
    with caplog.at_level(logging.INFO, "maclustr.heal"):
        await deep(gw)
        await wait_for(lambda: health_of(gw, fake.url) == "wedged", timeout=10)
        report = await deep(gw)
    assert report["models"][ALIAS]["replicas"][0]["status"] == "wedged"
    assert len(runs_of(runs)) == 1  # not restarted again
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "restarted 1 time(s) this hour (restart_limit 1), it stays out" in said, said
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    ans = await gw.client.post(CHAT, {"model": ALIAS, "messages": [
        {"role": "user", "content": "hi"}]})
    assert ans.status == 503 and ans.json()["error"]["code"] == "model_unavailable"
    assert await metric(gw, "maclustr_replica_restarts_total", model=ALIAS, replica="0",
                        reason="dead") == 1
    assert await metric(gw, "maclustr_replica_state", model=ALIAS, replica="0",
                        state="wedged") == 1


async def test_without_a_restart_command_it_stays_wedged_and_says_so(
        make_gateway: Any, fake: FakeMLX, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(routes(fake.url, None))
    fake.health = Behavior(kind="error", status=503)
    with caplog.at_level(logging.INFO, "maclustr.heal"):
        await deep(gw)
        await wait_for(lambda: health_of(gw, fake.url) == "wedged", timeout=5)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "no restart command (set 'restart' or place the model on a node)" in said, said
    assert (await deep(gw))["models"][ALIAS]["replicas"][0]["status"] == "wedged"
    assert await metric(gw, "maclustr_replica_state", model=ALIAS, replica="0",
                        state="wedged") == 1


async def test_a_failing_command_is_logged_with_status_and_tail_and_counts(
        make_gateway: Any, fake: FakeMLX, fast_back: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MACLUSTR_API_KEY", f"ops:{KEY}")
    cmd = [sys.executable, "-c", f"print('cannot reach {KEY}: boom'); raise SystemExit(3)"]
    gw = await make_gateway(routes(fake.url, cmd, limit=1))
    fake.health = Behavior(kind="error", status=503)
    with caplog.at_level(logging.INFO, "maclustr.heal"):
        await deep(gw)
        await wait_for(lambda: any("exited with status 3" in r.getMessage()
                                   for r in caplog.records), timeout=10)
    line = next(r.getMessage() for r in caplog.records if "exited with status 3" in
                r.getMessage())
    assert "cannot reach *** : boom" in line or "cannot reach ***: boom" in line, line
    assert KEY not in "\n".join(r.getMessage() for r in caplog.records)
    assert await metric(gw, "maclustr_replica_restarts_total", model=ALIAS, replica="0",
                        reason="dead") == 1


async def test_a_command_past_its_deadline_is_killed() -> None:
    start = time.monotonic()
    status, out = await run_command([sys.executable, "-c",
                                     "print('slow', flush=True); import time; time.sleep(30)"],
                                    timeout=1.0)
    assert status is None and b"slow" in out
    assert time.monotonic() - start < 10
    assert await run_command(["/nonexistent/launchctl"]) == (
        127, b"/nonexistent/launchctl: No such file or directory")


def test_json_log_lines_carry_the_fields() -> None:
    rec = logging.LogRecord("maclustr.heal", logging.WARNING, __file__, 1, "replica 0 is dead",
                            None, None)
    rec.fields = {"event": "dead", "model": ALIAS, "replica": "0",
                  "command": ["launchctl", "kickstart", "-k", "gui/501/io.maclustr.mlx.x"]}
    obj = json.loads(JSONFormatter().format(rec))
    assert obj["message"] == "replica 0 is dead" and obj["event"] == "dead"
    assert obj["model"] == ALIAS and obj["replica"] == "0" and obj["command"][0] == "launchctl"


# --- from live traffic: stalls, kicks and moves (the relay's part) -----------------------------


def routes2(urls: list[str], restart: list[str] | None, *, stall: float = 0.5,
            generate: float = 0.5) -> str:
    cmd = f"    restart: {json.dumps(restart)}\n" if restart else ""
    ups = "".join(f"      - {u}\n" for u in urls)
    return (f"gateway:\n  generate_timeout: {generate}\nmodels:\n  {ALIAS}:\n"
            f"    model: /Users/admin/models/internal-id\n    upstreams:\n{ups}"
            f"    stall_after: {stall}\n    queue_timeout: 30\n{cmd}")


def chat(text: str, stream: bool = False) -> dict[str, Any]:
    return {"model": ALIAS, "stream": stream, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(healer_mod, "TICK", 0.05)
    monkeypatch.setattr(healer_mod, "BACK_POLL", 0.05)


async def test_a_stream_wedged_after_head_and_comments_completes_after_the_restart(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, quick_watch: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """The server sends the head and two keepalive comments, then nothing: the client's
    stream goes on, on the same connection, with a whole answer from the restarted server."""
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url], cmd))
    fake.default = Behavior(kind="hang")  # wedged: the probe gets no token either
    fake.push(Behavior(keepalives=2, stall_after=0))

    async def restart_works() -> None:
        await wait_for(lambda: runs_of(runs), timeout=20)
        fake.default = Behavior(events=3)  # what the restarted server does

    with caplog.at_level(logging.INFO, "maclustr.heal"):
        fixer = asyncio.ensure_future(restart_works())
        ans = await gw.client.post(CHAT, chat("wedge me", stream=True), timeout=30)
        await fixer
    assert ans.status == 200 and ans.complete, ans.body[-300:]
    body = ans.body.decode()
    assert body.startswith(": keepalive"), body[:200]
    data = [x for x in body.split("\n\n") if x.startswith("data:")]
    assert data[-1] == "data: [DONE]" and len(data) >= 3, body
    assert "error" not in body
    assert runs_of(runs) == [[ALIAS, str(fake.port)]]  # exactly once
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "is suspect" in said and "is wedged" in said and "is back" in said, said
    assert sum(1 for r in fake.requests if r.json and r.json.get("messages", [{}])[-1].get(
        "content") == "wedge me") == 2  # asked again of the restarted server
    assert await metric(gw, "maclustr_replica_restarts_total", model=ALIAS, replica="0",
                        reason="wedged") == 1


async def test_two_replicas_one_wedged_the_other_answers_in_time(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, tmp_path: Path,
        quick_watch: None) -> None:
    """Requests caught on the wedged replica are moved and answered by the other within
    stall_after + generate_timeout + 2 s; later ones go to the other only."""
    stall, generate = 0.5, 0.5
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url, fake2.url], cmd, stall=stall,
                                    generate=generate))
    fake.default = Behavior(kind="hang")

    async def timed(i: int) -> tuple[float, Answer]:
        t0 = time.monotonic()
        ans = await gw.client.post(CHAT, chat(f"req {i}", stream=bool(i % 2)), timeout=30)
        return time.monotonic() - t0, ans

    done = await asyncio.gather(*(timed(i) for i in range(6)))
    on_wedged = [r for r in fake.requests if r.method == "POST" and r.json
                 and str(r.json.get("messages", [{}])[0].get("content", "")).startswith("req")]
    assert on_wedged, "no request reached the wedged replica"
    for took, ans in done:
        assert ans.status == 200 and ans.complete, ans.body[-300:]
        assert b"error" not in ans.body
        assert took < stall + generate + 2, took
    await wait_for(lambda: runs_of(runs), timeout=10)
    assert runs_of(runs) == [[ALIAS, str(fake.port)]]
    before = len(fake.requests)
    for i in range(3):
        assert (await gw.client.post(CHAT, chat(f"after {i}"))).status == 200
    assert not [r for r in fake.requests[before:] if r.method == "POST" and r.json
                and r.json.get("max_tokens") != 1]  # only probes reach the restarting one


async def test_a_dead_thread_404_is_moved_not_blamed_on_the_client(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, tmp_path: Path,
        quick_watch: None) -> None:
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url, fake2.url], cmd))
    fake.default = Behavior(kind="error", status=404,
                            error_body=b'{"error": "generation thread died"}')
    answers = [await gw.client.post(CHAT, chat(f"d{i}", stream=bool(i % 2))) for i in range(4)]
    assert [a.status for a in answers] == [200] * 4, [a.body[:200] for a in answers]
    await wait_for(lambda: runs_of(runs), timeout=10)
    assert await metric(gw, "maclustr_replica_restarts_total", model=ALIAS, replica="0",
                        reason="dead") == 1


async def test_an_ordinary_404_stays_the_clients_400_and_restarts_nothing(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, quick_watch: None) -> None:
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url], cmd))
    fake.push(Behavior(kind="error", status=404,
                       error_body=b'{"error": "Cannot find an appropriate cached snapshot"}'))
    ans = await gw.client.post(CHAT, chat("x"))
    assert ans.status == 400 and ans.json()["error"]["type"] == "invalid_request_error"
    await asyncio.sleep(0.3)
    assert not runs_of(runs) and health_of(gw, fake.url) == "up"


def test_top_shows_replica_states() -> None:
    from maclustr.stats import Snapshot, format_table, window

    text = "\n".join(
        f'maclustr_replica_state{{model="{ALIAS}",replica="{i}",state="{s}"}} {v}'
        for i, now in (("0", "restarting"), ("1", "up"))
        for s, v in (("up", int(now == "up")), ("restarting", int(now == "restarting")),
                     ("wedged", 0))) + "\n"
    snap = Snapshot.from_text(text, 1.0)
    rows = window(Snapshot(0.0), snap)
    assert rows[0].replicas == "1 up, 1 restarting"
    table = format_table(rows, 60)
    assert "REPLICAS" in table.splitlines()[0] and "1 up, 1 restarting" in table


async def test_front_page_names_a_replica_the_healer_has_out(make_gateway: Any,
                                                            fake: FakeMLX) -> None:
    gw = await make_gateway(routes(fake.url, None))
    html = (await gw.client.get("/", auth=False)).body.decode()
    assert "'replica ' + i + ' ' + r.status" in html  # the status cell's script


async def test_a_replica_delivering_bytes_is_never_suspect(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, quick_watch: None) -> None:
    """A long prefill (keepalive comments 0.2 s apart, 1.6 s in all) and a request that
    hangs beside it on the same replica: while any connection delivers bytes, no probe and no
    restart, whatever stall_after (0.5 s) says of the silent one alone."""
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url], cmd))
    fake.push(Behavior(keepalives=8, keepalive_delay=0.2, events=2))
    slow = asyncio.ensure_future(gw.client.post(CHAT, chat("slow", stream=True)))
    await fake.wait_requests(1)
    fake.push(Behavior(kind="hang"))
    hung = asyncio.ensure_future(gw.client.post(CHAT, chat("hung"), timeout=30))
    ans = await slow
    assert ans.status == 200 and ans.complete and b"[DONE]" in ans.body
    assert not runs_of(runs) and not [r for r in fake.requests if r.json
                                      and r.json.get("max_tokens") == 1]  # no probe yet
    hung.cancel()


async def test_a_restarted_warmup_model_rejoins_warm(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, fast_back: None) -> None:
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes(fake.url, cmd).replace(
        "    restart:", "    warmup: true\n    restart:"))
    rep = gw.app[BACKENDS].scheduler.replica(fake.url)
    model = gw.holder.current.routes[0].model
    await wait_for(lambda: rep.warm.get(model) == "warm", timeout=10)
    fake.health = Behavior(kind="error", status=503)
    await deep(gw)
    await wait_for(lambda: runs_of(runs), timeout=10)
    rep.warm[model] = "cold"  # what a restarted server is
    fake.health = None
    await wait_for(lambda: health_of(gw, fake.url) == "up", timeout=10)
    assert rep.warm.get(model) == "warm"  # warmed before it rejoined


async def test_an_anthropic_stream_wedged_after_its_pings_completes_after_the_restart(
        make_gateway: Any, fake: FakeMLX, tmp_path: Path, quick_watch: None) -> None:
    """Claude Code's dialect: the client got message_start and pings (mlx's keepalives),
    no content; the stream goes on from the restarted server with one message_start."""
    cmd, runs = recorder(tmp_path)
    gw = await make_gateway(routes2([fake.url], cmd))
    fake.default = Behavior(kind="hang")
    fake.push(Behavior(keepalives=2, stall_after=0))

    async def restart_works() -> None:
        await wait_for(lambda: runs_of(runs), timeout=20)
        fake.default = Behavior(events=3)

    fixer = asyncio.ensure_future(restart_works())
    ans = await gw.client.post("/v1/messages", {
        "model": ALIAS, "max_tokens": 20, "stream": True,
        "messages": [{"role": "user", "content": "wedge me"}]}, timeout=30)
    await fixer
    assert ans.status == 200 and ans.complete, ans.body[-300:]
    names = [e.split(b"\n", 1)[0] for e in ans.body.split(b"\n\n") if e.startswith(b"event:")]
    assert names.count(b"event: message_start") == 1, names
    assert b"event: ping" in names and names[-1] == b"event: message_stop", names
    assert b"event: error" not in names
    assert len(runs_of(runs)) == 1
