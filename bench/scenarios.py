"""The scenarios run in interleaved rounds — (a) unary, (b) streams, (c) paced streams, (i)
bursts, (t) unary tail — and (d) slow streams, (f) the real tiny mlx_lm.server."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from bench.common import BURST_STREAMS, STREAM_CHUNKS, Sizes
from bench.load import med, pct, run_wrk, stream_load
from bench.procs import Pinning, cpu_seconds, mem_kb
from bench.targets import Target, body


def scenario_a(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in (64, 16):
        r = run_wrk(t, "fast", False, c, sizes.wrk_s, pin)
        for k, v in r.items():
            out[f"c{c}_{k}"] = v
    r = run_wrk(t, "fast", False, 1, sizes.seq_s, pin)
    out["c1_p50_ms"] = r.get("p50_ms", math.nan)
    out["c1_rps"] = r["rps"]
    return out


def scenario_t(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    """Issue 25's tail: unary through wrk for tail_s at 1 and 16 keep-alive connections:
    mean, p99, p99.9, max, and (maclustr) the longest collector pause and loop lag."""
    out: dict[str, float] = {}
    for c in (1, 16):
        r = run_wrk(t, "fast", False, c, sizes.tail_s, pin)
        out.update({f"c{c}_{k}": v for k, v in r.items()})
    return out


def scenario_b(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    """Streams through wrk. Faithful (the headline): the `trickle` upstream, one write per
    event TRICKLE_MS apart, so every event is its own read, c=32. Batched (secondary): the
    unpaced `fast` upstream, whose writes coalesce into large reads, c=16.
    CPU per event counts each stream's events (64 chunks + `[DONE]`); streams still open when
    wrk stops (≤ c, ~2 % of a 3 s run) are charged but not counted, for every target alike."""
    events = STREAM_CHUNKS + 1
    r = run_wrk(t, "trickle", True, 32, sizes.wrk_s, pin)
    out = {f"trickle_{k}": v for k, v in r.items()}
    if r.get("requests"):
        out["cpu_us_per_event"] = r["cpu_s"] / (r["requests"] * events) * 1e6
    r = run_wrk(t, "fast", True, 16, sizes.wrk_s, pin)
    out.update({f"c16_{k}": v for k, v in r.items()})
    out["streams_s"] = r["rps"]
    out["chunks_s"] = r["rps"] * STREAM_CHUNKS
    if r.get("requests"):
        out["batched_cpu_us_per_event"] = r["cpu_s"] / (r["requests"] * events) * 1e6
    return out


def scenario_c(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    cpu0 = cpu_seconds(t.pids)
    # 16 workers, starts spread over one stream's length (64 x 20 ms)
    results = asyncio.run(stream_load(t, "paced", sizes.paced_streams, 16, 64,
                                      stagger=1.3 / 16))
    cpu = cpu_seconds(t.pids) - cpu0
    ok = [r for r in results if r.ok]
    lag = [x for r in ok for x in r.relay]
    ttfb = [r.ttfb * 1e3 for r in ok]
    return {"streams": float(len(results)), "complete": float(len(ok)),
            "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99),
            "chunk_lag_p50_ms": pct(lag, 50) * 1e3, "chunk_lag_p99_ms": pct(lag, 99) * 1e3,
            "stamped_events": float(len(lag)),
            "cpu_s": cpu,
            "errors": float(len(results) - len(ok)),
            "first_error": next((r.error for r in results if not r.ok), "")}


async def first_event(host: str, port: int, request: bytes, done: bytes) -> float:
    """One stream on its own new connection, read with bare asyncio streams (the load
    generator must cost next to nothing next to what it measures): seconds from the connect
    to the first `data: {` event; reads on to the end so the stream completes. NaN: failed."""
    t0 = time.monotonic()
    ttfb = math.nan
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        buf = b""
        for _ in range(100000):
            piece = await reader.read(65536)
            if not piece:
                break
            if math.isnan(ttfb):
                buf += piece
                if b"data: {" in buf:
                    ttfb = time.monotonic() - t0
                    buf = buf[-32:]
            else:
                buf = (buf + piece)[-32:]
            if done in buf:
                break
    finally:
        writer.close()
    return ttfb


async def one_burst(t: Target, n: int) -> list[float]:
    """n streams sent at once, each on its own new connection (n clients arriving together):
    each one's TTFB in seconds (NaN when it failed)."""
    url = urllib.parse.urlsplit(t.urls["burst"])
    data = body(t.models["burst"], True)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Content-Type": "application/json",
                                                  **t.headers}.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    got = await asyncio.gather(*(asyncio.wait_for(first_event(url.hostname or "", url.port or 80,
                                                               request, b"[DONE]"), 30)
                                 for _ in range(n)), return_exceptions=True)
    return [g if isinstance(g, float) else math.nan for g in got]


def scenario_i(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(i) bursts: BURST_STREAMS streams started at once, `bursts` times, one burst after the
    previous has ended. TTFB = connect to the first data event, per stream; the added figure
    (target − direct) is each request's setup cost queueing behind the others'."""

    async def run() -> list[float]:
        out: list[float] = []
        for _ in range(sizes.bursts):
            out += await one_burst(t, BURST_STREAMS)
            await asyncio.sleep(0.05)
        return out

    cpu0 = cpu_seconds(t.pids)
    results = asyncio.run(run())
    cpu = cpu_seconds(t.pids) - cpu0
    ttfb = [x * 1e3 for x in results if not math.isnan(x)]
    return {"streams": float(len(results)), "complete": float(len(ttfb)),
            "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99), "cpu_s": cpu,
            "cpu_us_per_stream": cpu / len(results) * 1e6 if results else math.nan,
            "errors": float(len(results) - len(ttfb))}


async def slow_one(t: Target, sizes: Sizes) -> dict[str, Any]:
    """(d) through one target: N streams at once, RSS sampled every 0.5 s, CPU over the run."""
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], mem_kb(t.pids, "VmRSS"))

    rss0 = mem_kb(t.pids, "VmRSS")
    cpu0 = cpu_seconds(t.pids)
    t0 = time.monotonic()
    results = await stream_load(t, "slow", sizes.slow_streams, sizes.slow_streams,
                                sizes.slow_s - 1, sample=sample if t.pids else None)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(t.pids) - cpu0
    ok = [r for r in results if r.ok]
    errs = sorted({r.error for r in results if not r.ok})[:3]
    return {"streams": len(results), "complete": len(ok), "wall_s": wall, "cpu_s": cpu,
            "rss_before_mb": rss0 / 1024, "rss_peak_mb": peak[0] / 1024,
            "hwm_mb": mem_kb(t.pids, "VmHWM") / 1024, "errors": errs}


async def slow_all(targets: list[Target], sizes: Sizes, together: bool) -> list[Any]:
    """(d) through several targets, at the same time (saves minutes; the streams are idle
    most of the time, so they hardly interfere) or one after another."""
    if together:
        return list(await asyncio.gather(*(slow_one(t, sizes) for t in targets),
                                         return_exceptions=True))
    out: list[Any] = []
    for t in targets:
        try:
            out.append(await slow_one(t, sizes))
        except Exception as e:
            out.append(e)
    return out


def scenario_f(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    results = asyncio.run(stream_load(t, "real", sizes.real_requests, 1, 1,
                                      max_tokens=sizes.real_tokens))
    ok = [r for r in results if r.ok]
    # end to end (tokens / time from send to the last token): a relay that holds the first
    # token back and then delivers a burst cannot look faster than direct
    tps = [len(r.times) / r.times[-1] for r in ok if r.times and r.times[-1] > 0]
    decode = [(len(r.times) - 1) / (r.times[-1] - r.times[0]) for r in ok
              if len(r.times) > 2 and r.times[-1] > r.times[0]]
    return {"ttfb_ms": med([r.ttfb * 1e3 for r in ok]), "tokens_s": med(tps),
            "decode_tokens_s": med(decode),
            "events": med([float(len(r.times)) for r in ok]), "complete": float(len(ok)),
            "requests": float(len(results))}


def scrape_metrics(t: Target) -> dict[str, Any]:
    """GET /metrics once: proof that the metrics target counted what it served."""
    url = t.urls["fast"] + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as e:
        return {"error": repr(e)[:200]}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("maclustr_requests_total{"):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return {"requests_total": total, "bytes": len(text)}


RATIO_KEYS = ["a.c64_rps", "a.c16_rps", "b.streams_s"]
ADDED_KEYS = ["a.c1_p50_ms", "c.ttfb_p50_ms", "c.ttfb_p99_ms", "c.chunk_lag_p50_ms",
              "c.chunk_lag_p99_ms", "i.ttfb_p50_ms", "i.ttfb_p99_ms"]

SCENARIOS: dict[str, Callable[[Target, Sizes, Pinning], dict[str, Any]]] = {
    "a": scenario_a, "b": scenario_b, "c": scenario_c, "i": scenario_i, "t": scenario_t,
}
