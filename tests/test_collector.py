"""Requests leave no cyclic garbage (issue 25, item 11).

`maclustr serve` runs the cyclic collector rarely and in small passes on the premise that a
request's objects are freed by reference counting. A cycle per request breaks that premise:
the garbage piles up until a pass frees tens of thousands of objects at once and stops the
loop for tens of milliseconds (measured: 39-68 ms per gen-0 pass, ~9 objects per unary
request: the upstream connection, its transport, response, head future and bound parser).

The gateway runs as users run it (a process, uvloop, the front), with `MACLUSTR_PAUSES`
(maclustr/pauses.py): SIGUSR1 writes what every collection since the last report freed,
then forces a full collection and writes what it found. Both together are all the cyclic
garbage the requests made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
from conftest import AUTH, Behavior, FakeMLX, routes_yaml, wait_for

A = "maclustr-coder"
EACH = 30  # requests of each kind

# Every cycle found so far holds at least 6 objects, so one cycle per request on any single
# kind of request frees >= EACH * 6 = 180 objects. Left for one-off objects (a class built
# on first use, aiohttp's own 404 route): one object per ten requests at most.


def _chat(stream: bool) -> dict[str, Any]:
    return {"model": A, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _messages(stream: bool) -> dict[str, Any]:
    return {"model": A, "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}


async def _report(proc: Any, path: Path, lines: int) -> dict[str, Any]:
    """Ask the gateway for its pause report and return it (the `lines`-th line)."""
    proc.send_signal(signal.SIGUSR1)
    await wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= lines, 10)
    report: dict[str, Any] = json.loads(path.read_text().splitlines()[lines - 1])
    return report


async def _one(s: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> int:
    async with s.post(url, json=body, headers={**AUTH, **(headers or {})}) as r:
        # a stream the gateway cut after its error event (the upstream died) ends early
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await r.read()
        return r.status


async def _cut_stream(s: aiohttp.ClientSession, url: str) -> None:
    """A client that leaves in the middle of a stream."""
    async with s.post(url + "/v1/chat/completions", json=_chat(True), headers=AUTH) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")


async def test_requests_leave_no_cyclic_garbage(gateway_process: Any, tmp_path: Path,
                                                fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))
    pauses = tmp_path / "pauses.jsonl"
    gp = gateway_process(routes, "--reload-interval", "0",
                         env={"MACLUSTR_PAUSES": str(pauses)})
    await wait_for(lambda: pauses.exists(), 10)  # the watch's first line: it is on
    statuses: dict[str, list[int]] = {}
    async with aiohttp.ClientSession() as s:  # keep-alive, as SDK clients connect
        chat, msgs = gp.url + "/v1/chat/completions", gp.url + "/v1/messages"
        await _one(s, chat, _chat(False))  # warm up: first-use objects are not per request
        await _one(s, msgs, _messages(True))
        before = await _report(gp.proc, pauses, 2)
        for _ in range(EACH):
            for kind, url, body, hdrs in (
                    ("unary", chat, _chat(False), None),
                    ("stream", chat, _chat(True), None),
                    ("messages", msgs, _messages(False), None),
                    ("messages-stream", msgs, _messages(True), None),
                    ("responses", gp.url + "/v1/responses", {"model": A, "input": "hi"},
                     None),
                    ("unknown-model", chat, {**_chat(False), "model": "nope"}, None),
                    ("bad-key", chat, _chat(False), {"Authorization": "Bearer wrong"})):
                statuses.setdefault(kind, []).append(await _one(s, url, body, hdrs))
            fake.push(Behavior(kind="error", status=500))
            statuses.setdefault("upstream-500", []).append(await _one(s, chat, _chat(False)))
            fake.push(Behavior(events=5, die_after=2))
            statuses.setdefault("upstream-dies", []).append(await _one(s, chat, _chat(True)))
            fake.push(Behavior(events=50, delay=0.05))
            await _cut_stream(s, gp.url)
    assert statuses["unary"] == [200] * EACH and statuses["stream"] == [200] * EACH
    assert statuses["messages"] == [200] * EACH and statuses["responses"] == [200] * EACH
    assert set(statuses["unknown-model"]) == {404} and set(statuses["bad-key"]) == {401}
    assert 200 not in statuses["upstream-500"]
    await asyncio.sleep(0.5)  # the cut streams' upstream connections are closed by now
    after = await _report(gp.proc, pauses, 3)
    assert before["forced_collected"] >= 0
    freed = after["gc"]["collected"] + after["forced_collected"]
    requests = EACH * 10
    assert freed <= requests // 10, (
        f"{freed} objects in reference cycles after {requests} requests: {after}")


def test_gc_timer_counts_each_collection_and_what_it_freed() -> None:
    """The figures the bench and the test above read: a window counts collections per
    generation, the objects they freed and the longest one; taking it starts a new window."""
    import gc

    from maclustr.pauses import GcTimer

    timer = GcTimer()
    gc.callbacks.append(timer)
    try:
        for _ in range(100):  # 100 two-object cycles
            a: list[Any] = []
            b: list[Any] = [a]
            a.append(b)
        del a, b
        gc.collect()
    finally:
        gc.callbacks.remove(timer)
    w = timer.take()
    assert w.collections[2] >= 1 and w.collected >= 200  # automatic passes may free some
    assert w.longest_ms > 0 and w.longest_gen in (0, 1, 2) and w.total_ms >= w.longest_ms
    assert timer.window.collections == [0, 0, 0] and timer.window.collected == 0
