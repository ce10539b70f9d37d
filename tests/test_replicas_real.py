"""Two REAL mlx_lm.server replicas of one alias; one is killed mid-test and every request
still succeeds (issue 7).

Why: the fakes prove the failover logic; only the real server proves that its actual failure
mode (a process that is gone: connection refused on the next request) is absorbed. The
second replica is started here and stopped by PID; the first is the session's `real_mlx`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RealMLX

from maclustr.app import BACKENDS
from maclustr.harness import free_port, start_mlx_server, stop, wait_healthy

pytestmark = pytest.mark.real_upstream

ALIAS = "maclustr-coder"
CHAT = "/v1/chat/completions"


@pytest.fixture
def second_replica(real_mlx: RealMLX, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """Another mlx_lm.server serving the same tiny model: (url, process)."""
    port = free_port()
    proc = start_mlx_server(real_mlx.models[ALIAS], port, tmp_path / "replica2.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=90, proc=proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def body(i: int, stream: bool = False) -> dict[str, Any]:
    # a distinct conversation each time, so affinity does not pin them all to one replica
    return {"model": ALIAS, "messages": [{"role": "user", "content": f"hello {i}"}],
            "max_tokens": 3, "stream": stream}


async def test_two_real_replicas_one_killed_every_request_succeeds(
        make_gateway: Any, real_mlx: RealMLX, second_replica: tuple[str, Any]) -> None:
    url2, proc2 = second_replica
    model = str(real_mlx.models[ALIAS])
    text = (f"models:\n  {ALIAS}:\n    model: {json.dumps(model)}\n    upstreams:\n"
            f"      - {real_mlx.url}\n      - {url2}\n")
    gw = await make_gateway(text)
    sched = gw.app[BACKENDS].scheduler
    answers = []
    for i in range(20):
        if i == 8:  # both replicas have served by now: kill the second one
            assert sched.replica(url2).served >= 2 and sched.replica(real_mlx.url).served >= 2
            stop(proc2)
            assert proc2.poll() is not None
        answers.append(await gw.client.post(CHAT, body(i, stream=i % 2 == 1), timeout=60))
    answers += await asyncio.gather(*(gw.client.post(CHAT, body(100 + i, stream=i % 2 == 0),
                                                     timeout=60) for i in range(4)))
    for a in answers:
        assert a.status == 200, a.body[:300]
        if a.headers["Content-Type"].startswith("text/event-stream"):
            data = a.data()
            assert data[-1] == "[DONE]", data[-2:]
            assert not any(isinstance(d, dict) and "error" in d for d in data)
        else:
            assert a.json()["choices"][0]["message"]["content"] is not None
    blob = b"".join(a.body + json.dumps(a.headers).encode() for a in answers)
    assert url2.split("://")[1].encode() not in blob and model.encode() not in blob
    health = await gw.client.get("/health?deep=true", timeout=30)
    states = [r["status"] for r in health.json()["models"][ALIAS]["replicas"]]
    assert states == ["up", "down"]
