"""`maclustr top`: per-model figures from /metrics, the same arithmetic as Prometheus's
rate() and histogram_quantile(); and the command against a running gateway."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import wire_tap
from conftest import KEY, ROOT, Behavior, FakeMLX, routes_yaml, wait_for

from maclustr.stats import ModelCounts, Snapshot, quantile, window

CHAT = "/v1/chat/completions"
A = "maclustr-coder"


def test_quantile_interpolates_within_the_bucket() -> None:
    b = {0.1: 0.0, 0.25: 10.0, 0.5: 20.0, math.inf: 20.0}
    assert quantile(0.5, b) == 0.25
    assert abs((quantile(0.95, b) or 0) - 0.475) < 1e-9
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {0.1: 1.0, math.inf: 2.0}) == 0.1  # in +Inf: its lower bound


def test_window_is_rates_between_snapshots() -> None:
    old = Snapshot(10.0, {A: ModelCounts(requests=5, errors=1, completion_tokens=100,
                                         ttft_buckets={0.1: 2, 1.0: 4, math.inf: 4})})
    new = Snapshot(40.0, {A: ModelCounts(requests=35, errors=4, completion_tokens=700,
                                         ttft_buckets={0.1: 12, 1.0: 14, math.inf: 14},
                                         in_flight=3, queued=2)})
    (w,) = window(old, new)
    assert w.requests == 30 and w.requests_per_min == 60.0
    assert w.tokens_per_s == 20.0 and w.errors == 3
    assert w.in_flight == 3 and w.queued == 2
    assert w.ttft_p50 is not None and w.ttft_p50 <= 0.1  # 10 of the 10 new are under 0.1 s
    restarted = Snapshot(50.0, {A: ModelCounts(requests=2, completion_tokens=10)})
    (r,) = window(new, restarted)
    assert r.requests == 2  # counters went down: a restart, counted from zero


async def test_top_reads_a_running_gateway(gateway_process: Any, tmp_path: Path,
                                           fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url, "maclustr-fast": fake.url}))
    gp = gateway_process(routes)
    fake.default = Behavior(events=4, delay=0.01)
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "maclustr", "top", "--url", gp.url, "--key", KEY, "--once",
        "--interval", "2", cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # top's first scrape must come before the traffic (a fixed sleep lost that race on a busy
    # machine): the wire tap shows when the gateway has sent its first /metrics answer.
    wire = tmp_path / f"gateway-{gp.url.rsplit(':', 1)[1]}.wire"
    await wait_for(lambda: b"maclustr_build_info" in b"".join(wire_tap.read_file(wire)),
                   timeout=20, interval=0.05)
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            async with s.post(gp.url + CHAT, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": A, "stream": i % 2 == 0,
                                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
                await r.read()
    out, err = await asyncio.wait_for(top.communicate(), 30)
    assert top.returncode == 0, err
    text = out.decode()
    assert "\x1b[" not in text  # not a terminal: frames are plain text
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("maclustr-")}
    assert set(rows) == {A, "maclustr-fast"}
    coder = rows[A]  # MODEL REQ/MIN P50 ms P95 ms TOK/S IN-FLIGHT QUEUED ERRORS REPLICAS
    assert float(coder[1]) > 0
    assert coder[2] != "-" and coder[3] == "ms"  # streams ran: a p50 time to first token
    assert float(coder[6]) > 0  # tokens/s
    assert coder[-5:-2] == ["0", "0", "0"]  # nothing in flight or queued now, no errors
    assert coder[-2:] == ["1", "up"]  # its one replica's state
    assert rows["maclustr-fast"][1] == "0.0"


def test_top_without_a_key_says_so(gateway_process: Any, tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: "http://127.0.0.1:9"}))
    gp = gateway_process(routes)
    env = {k: v for k, v in os.environ.items() if k != "MACLUSTR_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "maclustr", "top", "--url", gp.url, "--once"],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "401" in r.stderr and "--key" in r.stderr


def test_last_minute_forgets_what_is_older() -> None:
    """The page's figures: counts since the newest sample at least a minute old."""
    from maclustr.config import parse_routes
    from maclustr.metrics import LastMinute, Metrics
    from maclustr.outcome import Outcome

    table = parse_routes(routes_yaml({A: "http://127.0.0.1:9"}))
    metrics = Metrics(lambda: table, lambda: None)
    now = [1000.0]
    last = LastMinute(metrics, clock=lambda: now[0])

    def request(ttft: float) -> None:
        o = Outcome("rid", 0.0, "POST", CHAT, key="k", model=A, stream=True, status=200)
        o.first_at, o.ttft, o.duration = ttft, ttft, ttft * 2
        metrics.observe(o)

    def wait(seconds: int) -> None:  # the app samples every 5 s
        for _ in range(seconds // 5):
            now[0] += 5
            last.sample()

    for _ in range(3):
        request(0.05)
    wait(30)
    assert last.figures([A])[A].requests == 3
    for _ in range(2):
        request(2.0)
    wait(40)  # the first three are now more than a minute old
    w = last.figures([A])[A]
    assert w.requests == 2
    assert w.ttft_p50 is not None and 1.0 < w.ttft_p50 <= 2.5


async def test_front_page_shows_the_last_minute(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(routes_yaml({A: fake.url, "maclustr-fast": fake.url}))
    for stream in (True, True, False):
        ans = await gw.client.post(CHAT, {"model": A, "stream": stream,
                                          "messages": [{"role": "user", "content": "hi"}]})
        assert ans.status == 200
    page = (await gw.client.get("/", auth=False)).body.decode()
    import re

    coder = re.search(r'data-load-for="maclustr-coder">([^<]*)<', page)
    fast = re.search(r'data-load-for="maclustr-fast">([^<]*)<', page)
    assert coder and fast
    assert re.fullmatch(r"3 requests in the last minute · TTFT p50 \d+ ms", coder.group(1))
    assert fast.group(1) == "0 requests in the last minute"
