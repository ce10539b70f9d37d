"""Team keys (issue 28) over HTTP with the official SDKs: model access (403, a filtered
/v1/models), rates (429 rate_limited, then success after Retry-After on a moved clock), the
day's quota kept across a restart, admin-only endpoints, the ledger's reports agreeing with
the requests made, and a corrupt or read-only ledger that keeps the gateway serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from conftest import (
    ROOT,
    Behavior,
    FakeMLX,
    Gateway,
    dedent,
    routes_yaml,
    sdk_http_client,
    wait_for,
)

from maclustr.app import BACKENDS, USAGE
from maclustr.config import Route
from maclustr.policy import KeyPolicy, Policies
from maclustr.scheduler import Scheduler
from maclustr.usage_db import INSERT, connect

INTERNS = "sk-interns-0001"
OPS = "sk-ops-0002"
KEYS = (f"interns:{INTERNS}", f"ops:{OPS}")
POLICY = """\
keys:
  interns:
    models: [maclustr-fast]
  ops:
    admin: true
"""
CHAT = [{"role": "user", "content": "hi"}]


def oai(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                              http_client=sdk_http_client(gw))


def claude(gw: Gateway, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                    http_client=sdk_http_client(gw))


async def team(make_gateway: Any, fake: FakeMLX, keys: str = POLICY) -> Gateway:
    gw: Gateway = await make_gateway(
        routes_yaml({"maclustr-coder": fake.url, "maclustr-fast": fake.url}, extra=keys),
        keys=KEYS)
    return gw


class Clock:
    """The gateway's wall clock for its windows, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0 + 3600

    def __call__(self) -> float:
        return self.now


async def test_model_outside_the_list_is_403_and_never_sent(make_gateway: Any,
                                                            fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake)
    interns = oai(gw, INTERNS)
    with pytest.raises(openai.PermissionDeniedError) as e:
        await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    assert e.value.status_code == 403
    assert e.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert e.value.message.endswith("The key 'interns' may not use model 'maclustr-coder'.")
    assert fake.requests == []  # nothing went upstream
    with pytest.raises(openai.PermissionDeniedError):
        await interns.completions.create(model="maclustr-coder", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        await interns.models.retrieve("maclustr-coder")
    assert [m.id async for m in interns.models.list()] == ["maclustr-fast"]
    with pytest.raises(openai.NotFoundError) as nf:  # the 404 offers only its aliases
        await interns.chat.completions.create(model="maclustr-nope", messages=CHAT)
    assert nf.value.message.endswith("Available models: maclustr-fast")
    ops = oai(gw, OPS)
    assert [m.id async for m in ops.models.list()] == ["maclustr-coder", "maclustr-fast"]
    assert fake.requests == []
    ok = await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    assert ok.choices[0].message.content
    # Anthropic's envelope on /v1/messages: permission_error
    with pytest.raises(anthropic.PermissionDeniedError) as ae:
        await claude(gw, INTERNS).messages.create(model="maclustr-coder", max_tokens=5,
                                                  messages=CHAT)  # type: ignore[arg-type]
    assert ae.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert "'interns' may not use model 'maclustr-coder'" in ae.value.message
    assert len(fake.requests) == 1
    for a in gw.client.answers:
        assert INTERNS.encode() not in a.body and OPS.encode() not in a.body


async def test_rate_limited_then_served_after_retry_after(make_gateway: Any,
                                                          fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake, "keys:\n  interns:\n    requests_per_minute: 2\n")
    clock = gw.app[USAGE].clock = Clock()
    interns = oai(gw, INTERNS)
    first = await interns.chat.completions.with_raw_response.create(
        model="maclustr-coder", messages=CHAT)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    clock.now += 15
    await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    clock.now += 1
    with pytest.raises(openai.RateLimitError) as e:
        await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    r = e.value.response
    assert e.value.body["code"] == "rate_limited"  # type: ignore[index]
    assert "'interns' is over its limit of 2 requests per minute" in e.value.message
    assert r.headers["Retry-After"] == "44"  # the first request leaves the window at 60 s
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(anthropic.RateLimitError) as ae:  # Anthropic's envelope
        await claude(gw, INTERNS).messages.create(model="maclustr-coder", max_tokens=5,
                                                  messages=CHAT)  # type: ignore[arg-type]
    assert ae.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert len(fake.requests) == 2
    clock.now += int(r.headers["Retry-After"])
    again = await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    assert again.choices[0].message.content
    # a key without limits gets no x-ratelimit-* headers
    ops = await oai(gw, OPS).chat.completions.with_raw_response.create(
        model="maclustr-coder", messages=CHAT)
    assert not [h for h in ops.headers if h.startswith("x-ratelimit")]


async def test_tokens_per_minute_counts_upstream_usage(make_gateway: Any,
                                                       fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake, "keys:\n  '*':\n    tokens_per_minute: 20\n")
    clock = gw.app[USAGE].clock = Clock()
    interns = oai(gw, INTERNS)
    done = await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    assert done.usage is not None
    spent = done.usage.total_tokens
    assert 0 < spent < 20
    raw = await interns.chat.completions.with_raw_response.create(
        model="maclustr-fast", messages=CHAT, stream=True)
    assert raw.headers["x-ratelimit-limit-tokens"] == "20"  # on a stream's head too
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(20 - spent)
    async for _ in raw.parse():
        pass
    with pytest.raises(openai.RateLimitError) as e:
        await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    assert e.value.body["code"] == "rate_limited"  # type: ignore[index]
    assert e.value.response.headers["x-ratelimit-limit-tokens"] == "20"
    assert e.value.response.headers["x-ratelimit-remaining-tokens"] == str(max(0, 20 - 2 * spent))
    clock.now += int(e.value.response.headers["Retry-After"])
    await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    # the other key has its own window
    await oai(gw, OPS).chat.completions.create(model="maclustr-fast", messages=CHAT)


async def test_admin_only_endpoints(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake)
    await oai(gw, INTERNS).chat.completions.create(model="maclustr-fast", messages=CHAT)
    for path in ("/metrics", "/v1/usage", "/health?deep=generate"):
        a = await gw.client.get(path, headers={"Authorization": f"Bearer {INTERNS}"})
        assert a.status == 403, (path, a.body)
        assert a.json()["error"]["code"] == "admin_only"
        assert "'interns' is not an admin key" in a.json()["error"]["message"]
        b = await gw.client.get(path, headers={"Authorization": f"Bearer {OPS}"})
        assert b.status == 200, (path, b.body)
    deep = await gw.client.get("/health?deep=true", headers={"Authorization": f"Bearer {INTERNS}"})
    assert "in_flight" not in deep.body.decode()
    deep = await gw.client.get("/health?deep=true", headers={"Authorization": f"Bearer {OPS}"})
    assert "in_flight" in deep.body.decode()
    metrics = (await gw.client.get("/metrics", headers={"Authorization": f"Bearer {OPS}"})).body
    assert b"maclustr_requests_total" in metrics


async def test_without_keys_section_every_key_is_admin(make_gateway: Any,
                                                       fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake, "")
    for path in ("/metrics", "/v1/usage"):
        a = await gw.client.get(path, headers={"Authorization": f"Bearer {INTERNS}"})
        assert a.status == 200, (path, a.body)
    ok = await oai(gw, INTERNS).chat.completions.with_raw_response.create(
        model="maclustr-coder", messages=CHAT)
    assert not [h for h in ok.headers if h.startswith("x-ratelimit")]


async def test_usage_report_agrees_with_the_requests(make_gateway: Any, fake: FakeMLX,
                                                     tmp_path: Path) -> None:
    """/v1/usage and `maclustr usage` give the same rows, and those are the requests made."""
    gw = await team(make_gateway, fake, "keys:\n  ops: {admin: true}\n")
    made: dict[tuple[str, str], list[int]] = {}
    for key, name, model, n in ((INTERNS, "interns", "maclustr-fast", 3),
                                (INTERNS, "interns", "maclustr-coder", 1),
                                (OPS, "ops", "maclustr-fast", 2)):
        for _ in range(n):
            r = await oai(gw, key).chat.completions.create(model=model, messages=CHAT)
            assert r.usage is not None
            s = made.setdefault((name, model), [0, 0, 0])
            s[0] += 1
            s[1] += r.usage.prompt_tokens
            s[2] += r.usage.completion_tokens
    expected = [{"key": k, "model": m, "requests": n, "prompt_tokens": p,
                 "completion_tokens": c, "total_tokens": p + c}
                for (k, m), (n, p, c) in sorted(made.items())]
    a = await gw.client.get("/v1/usage?by=key,model&since=1d",
                            headers={"Authorization": f"Bearer {OPS}"})
    assert a.status == 200, a.body
    assert a.json() == {"object": "list", "data": expected}
    db = gw.holder.path.parent / "maclustr-usage.sqlite3"
    cli = subprocess.run([sys.executable, "-m", "maclustr", "usage", "--db", str(db), "--by",
                          "key,model", "--format", "json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == expected
    csv = subprocess.run([sys.executable, "-m", "maclustr", "usage", "--routes",
                          str(gw.holder.path), "--since", "1d", "--by", "model",
                          "--format", "csv"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)  # the ledger beside the routes file
    assert csv.returncode == 0, csv.stderr
    per_model = {m: sum(n for (_, mm), (n, _, _) in made.items() if mm == m)
                 for m in ("maclustr-coder", "maclustr-fast")}
    assert [line.split(",")[:2] for line in csv.stdout.splitlines()] == [
        ["model", "requests"], *[[m, str(n)] for m, n in sorted(per_model.items())]]
    bad = subprocess.run([sys.executable, "-m", "maclustr", "usage", "--db", str(db),
                          "--since", "last week"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "--since must be YYYY-MM-DD" in bad.stderr
    by_day = await gw.client.get("/v1/usage", headers={"Authorization": f"Bearer {OPS}"})
    rows = by_day.json()["data"]
    assert {r["key"] for r in rows} == {"interns", "ops"} and all("day" in r for r in rows)
    wrong = await gw.client.get("/v1/usage?by=colour",
                                headers={"Authorization": f"Bearer {OPS}"})
    assert wrong.status == 400


def _ask(url: str, key: str) -> tuple[int, dict[str, str], Any]:
    """One chat request with the SDK in a thread-free way: the sync client."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        r = client.chat.completions.with_raw_response.create(model="maclustr-fast",
                                                              messages=CHAT)  # type: ignore[arg-type]
        return r.http_response.status_code, dict(r.headers), r.parse()
    except openai.APIStatusError as e:
        return e.status_code, dict(e.response.headers), e


def _stop(gp: Any) -> None:
    gp.proc.send_signal(signal.SIGTERM)  # a clean stop writes the ledger's last rows
    gp.proc.wait(20)


async def test_quota_exceeded_kept_across_a_restart(gateway_process: Any, fake: FakeMLX,
                                                    tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}, extra=dedent("""\
        keys:
          interns:
            tokens_per_day: 10
        gateway:
          usage_db: ledger/usage.sqlite3
        """)))
    (tmp_path / "ledger").mkdir()
    env = {"MACLUSTR_API_KEY": ",".join(KEYS)}
    gp = gateway_process(routes, env=env)
    status, headers, _ = await asyncio.to_thread(_ask, gp.url, INTERNS)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "10"
    status, headers, err = await asyncio.to_thread(_ask, gp.url, INTERNS)
    assert status == 429 and isinstance(err, openai.RateLimitError)
    assert err.body["code"] == "quota_exceeded"  # type: ignore[index]
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert 0 < int(headers["retry-after"]) <= 86400
    assert headers["x-should-retry"] == "false"
    _stop(gp)
    assert (tmp_path / "ledger" / "usage.sqlite3").exists()
    gp2 = gateway_process(routes, env=env)
    status, _, err = await asyncio.to_thread(_ask, gp2.url, INTERNS)
    assert status == 429 and err.body["code"] == "quota_exceeded"  # type: ignore[union-attr]
    status, _, _ = await asyncio.to_thread(_ask, gp2.url, OPS)  # no entry, no limit
    assert status == 200
    _stop(gp2)
    db = sqlite3.connect(tmp_path / "ledger" / "usage.sqlite3")
    rows = db.execute("SELECT key, status, error FROM usage ORDER BY time").fetchall()
    assert rows == [("interns", 200, None), ("interns", 429, "quota_exceeded"),
                    ("interns", 429, "quota_exceeded"), ("ops", 200, None)]


@pytest.mark.parametrize("fault", ["corrupt", "read-only"])
async def test_broken_ledger_keeps_serving(gateway_process: Any, fake: FakeMLX, tmp_path: Path,
                                           fault: str) -> None:
    """The gateway serves and logs one line. Limits fail open for what an unreadable ledger
    held (a corrupt one: counted in memory from the start); a read-only ledger is still read
    back (interns' spent day holds), only not written."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}, extra=dedent("""\
        keys:
          interns:
            tokens_per_day: 10
        """)))
    ledger = tmp_path / "maclustr-usage.sqlite3"
    if fault == "corrupt":
        ledger.write_bytes(b"this is not a database\n" * 200)
    else:
        db = connect(ledger)
        db.execute(INSERT, (time.time() - 5, "interns", "maclustr-fast", "/v1/chat/completions",
                            200, 8, 4, 0, 1.0, None))  # the day's 10 tokens spent already
        db.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal/-shm beside it
        db.close()
        if os.geteuid() == 0:  # root writes through a mode of 0444
            subprocess.run(["chattr", "+i", str(ledger)], check=True)
        else:
            ledger.chmod(0o444)
    try:
        gp = gateway_process(routes, env={"MACLUSTR_API_KEY": ",".join(KEYS)})
        for _ in range(3):
            status, _, _ = await asyncio.to_thread(_ask, gp.url, OPS)
            assert status == 200
        if fault == "corrupt":
            status, _, _ = await asyncio.to_thread(_ask, gp.url, INTERNS)
            assert status == 200
        status, _, err = await asyncio.to_thread(_ask, gp.url, INTERNS)
        assert status == 429 and err.body["code"] == "quota_exceeded"  # type: ignore[union-attr]
        _stop(gp)
    finally:
        if fault == "read-only" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ledger)], check=True)
    lines = [ln for ln in gp.output().splitlines() if "usage ledger" in ln]
    assert len(lines) == 1, gp.output()
    assert "Traceback" not in gp.output()
    word = "not a database" if fault == "corrupt" else "readonly"
    assert word in lines[0] and "requests go on" in lines[0]
    if fault == "read-only":
        rows = sqlite3.connect(ledger).execute("SELECT COUNT(*) FROM usage").fetchone()
        assert rows == (1,)  # nothing written


class CountingPipe:
    """A TCP pipe in front of the fake that counts, per key, the requests in flight at the
    upstream: a connection counts from its first request bytes to its close (the fake, like
    mlx_lm.server, closes after each answer). The key is read from the prompt."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        key: list[str] = []

        async def up() -> None:
            while data := await cr.read(65536):
                for name in ("ci", "ops"):
                    if not key and f"from {name}".encode() in data:
                        key.append(name)
                        self.now[name] = self.now.get(name, 0) + 1
                        self.peak[name] = max(self.peak.get(name, 0), self.now[name])
                uw.write(data)
            uw.close()

        async def down() -> None:
            while data := await ur.read(65536):
                cw.write(data)
            if key:
                self.now[key[0]] -= 1
            cw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)


async def test_max_in_flight_at_the_upstream(make_gateway: Any, fake: FakeMLX) -> None:
    fake.default = Behavior(header_delay=0.15)
    pipe = CountingPipe(fake.port)
    url = await pipe.start()
    gw = await make_gateway(dedent(f"""\
        keys:
          ci:
            max_in_flight: 2
        models:
          maclustr-coder:
            model: internal-coder
            upstream: {url}
            max_concurrency: 4
        """), keys=("ci:sk-ci-0001", "ops:sk-ops-0002"))
    ci, ops = oai(gw, "sk-ci-0001"), oai(gw, "sk-ops-0002")

    async def ask(client: openai.AsyncOpenAI, who: str) -> float:
        await client.chat.completions.create(
            model="maclustr-coder", messages=[{"role": "user", "content": f"from {who}"}])
        return asyncio.get_running_loop().time()

    flood = [asyncio.create_task(ask(ci, "ci")) for _ in range(20)]
    await asyncio.sleep(0.2)
    served = await asyncio.gather(*(ask(ops, "ops") for _ in range(5)))
    ci_done = await asyncio.gather(*flood)
    assert pipe.peak["ci"] == 2  # never more, and the limit was used
    assert max(served) < max(ci_done)  # ops was served while ci's requests waited
    assert pipe.peak["ops"] >= 2  # on the slots ci could not take
    assert gw.app[BACKENDS].scheduler.key_in_flight("ci") == 0
    assert pipe.server is not None
    pipe.server.close()


async def test_free_slot_knows_the_key_while_a_key_has_max_in_flight() -> None:
    """relay passes the key: a key below its max_in_flight (or without one) takes a free slot
    at once, counted; one at its limit, or no key said, goes through `acquire`'s queue."""
    async def probe(url: str) -> bool:
        return True

    s = Scheduler(probe)
    s.set_policies(Policies({"ci": KeyPolicy(max_in_flight=1)}))
    route = Route("m", "internal-m", "http://a", upstreams=("http://a",), max_concurrency=8)

    async def request(key: str) -> tuple[bool, asyncio.Task[Any] | None]:  # a request's task
        return s.free_slot(route, None, key=key) is not None, asyncio.current_task()

    assert s.free_slot(route, None) is None
    ops, ops_task = await asyncio.create_task(request("ops"))
    ci, ci_task = await asyncio.create_task(request("ci"))
    assert ops and ci and s.key_in_flight("ci") == 1
    assert not (await asyncio.create_task(request("ci")))[0]  # at its limit
    s.leave(ci_task)
    s.leave(ops_task)
    assert s.key_in_flight("ci") == 0 and s.key_in_flight("ops") == 0


async def test_policies_reload_live(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake)
    interns = oai(gw, INTERNS)
    with pytest.raises(openai.PermissionDeniedError):
        await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    gw.holder.path.write_text(routes_yaml(
        {"maclustr-coder": fake.url, "maclustr-fast": fake.url},
        extra="keys:\n  interns:\n    requests_per_minute: 1\n    max_in_flight: 1\n"))
    assert gw.holder.reload()
    ok = await interns.chat.completions.with_raw_response.create(model="maclustr-coder",
                                                                 messages=CHAT)
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    gw.holder.path.write_text(routes_yaml({"maclustr-coder": fake.url,
                                           "maclustr-fast": fake.url}))
    assert gw.holder.reload()  # no keys: section any more: nothing limited
    await interns.chat.completions.create(model="maclustr-coder", messages=CHAT)
    assert [m.id async for m in interns.models.list()] == ["maclustr-coder", "maclustr-fast"]


async def test_without_ledger_token_limits_are_off(make_gateway: Any, fake: FakeMLX) -> None:
    """`gateway.usage_db: false`: no file, no token limits; request rates still apply."""
    gw = await team(make_gateway, fake, dedent("""\
        keys:
          interns:
            tokens_per_day: 1
            requests_per_minute: 2
          ops:
            admin: true
        gateway:
          usage_db: false
        """))
    interns = oai(gw, INTERNS)
    first = await interns.chat.completions.with_raw_response.create(model="maclustr-fast",
                                                                    messages=CHAT)
    assert "x-ratelimit-limit-tokens" not in first.headers
    await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    with pytest.raises(openai.RateLimitError) as e:
        await interns.chat.completions.create(model="maclustr-fast", messages=CHAT)
    assert e.value.body["code"] == "rate_limited"  # type: ignore[index]
    assert not list(gw.holder.path.parent.glob("*.sqlite3*"))
    off = await gw.client.get("/v1/usage", headers={"Authorization": f"Bearer {OPS}"})
    assert off.status == 404 and "ledger is off" in off.json()["error"]["message"]


async def test_tokens_remaining_gauge(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await team(make_gateway, fake, dedent("""\
        keys:
          interns:
            tokens_per_day: 1000
          ops:
            admin: true
        """))
    done = await oai(gw, INTERNS).chat.completions.create(model="maclustr-fast", messages=CHAT)
    assert done.usage is not None
    text = (await gw.client.get("/metrics", headers={"Authorization": f"Bearer {OPS}"})).body
    gauges = [ln for ln in text.decode().splitlines()
              if ln.startswith("maclustr_key_tokens_remaining")]
    assert gauges == [f'maclustr_key_tokens_remaining{{key="interns"}} '
                      f'{float(1000 - done.usage.total_tokens)}']


async def test_refusals_and_limited_answers_leave_no_cyclic_garbage(
        gateway_process: Any, fake: FakeMLX, tmp_path: Path) -> None:
    """Issue 25's rule for team keys: a 403 or 429 raised on admission, and the answers of a
    limited key, leave nothing for the cyclic collector (see test_collector.py)."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url, "maclustr-coder": fake.url},
                                  extra=dedent("""\
        keys:
          interns:
            models: [maclustr-fast]
            tokens_per_day: 100000000
            max_in_flight: 4
          ci:
            requests_per_minute: 1
        """)))
    pauses = tmp_path / "pauses.jsonl"
    gp = gateway_process(routes, "--reload-interval", "0",
                         env={"MACLUSTR_PAUSES": str(pauses),
                              "MACLUSTR_API_KEY": f"{KEYS[0]},ci:sk-ci-0003"})
    await wait_for(lambda: pauses.exists(), 10)

    def body(model: str, stream: bool = False) -> dict[str, Any]:
        return {"model": model, "messages": CHAT, "stream": stream}

    async with aiohttp.ClientSession() as s:
        chat = gp.url + "/v1/chat/completions"

        async def one(key: str, b: dict[str, Any]) -> int:
            async with s.post(chat, json=b, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                return r.status

        assert await one("sk-ci-0003", body("maclustr-fast")) == 200  # warm-up; ci's 1/min
        assert await one(INTERNS, body("maclustr-fast")) == 200
        proc = gp.proc
        proc.send_signal(signal.SIGUSR1)
        await wait_for(lambda: len(pauses.read_text().splitlines()) >= 2, 10)
        seen: dict[int, int] = {}
        for _ in range(30):
            for key, b in ((INTERNS, body("maclustr-coder")),  # 403
                           ("sk-ci-0003", body("maclustr-fast")),  # 429
                           (INTERNS, body("maclustr-fast")),
                           (INTERNS, body("maclustr-fast", True))):
                status = await one(key, b)
                seen[status] = seen.get(status, 0) + 1
    assert seen == {403: 30, 429: 30, 200: 60}
    proc.send_signal(signal.SIGUSR1)
    await wait_for(lambda: len(pauses.read_text().splitlines()) >= 3, 10)
    after = json.loads(pauses.read_text().splitlines()[2])
    freed = after["gc"]["collected"] + after["forced_collected"]
    assert freed <= 12, f"{freed} objects in reference cycles after 120 requests: {after}"
