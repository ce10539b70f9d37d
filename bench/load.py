"""Load generators: wrk (unary and streams, with the target's CPU and pauses over the same
window) and an aiohttp stream client; percentiles and medians."""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import WORK
from bench.procs import Pinning, cpu_seconds, settle
from bench.targets import Target, body

WRK_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  io.write(string.format("TAIL mean=%d p999=%d max=%d\\n", latency.mean,
                         latency:percentile(99.9), latency.max))
end
"""


def lua_script(t: Target, kind: str, stream: bool) -> Path:
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in t.headers.items())
    p = WORK / "lua" / f"{t.name}-{kind}-{'stream' if stream else 'unary'}.lua"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(WRK_LUA.format(body=json.dumps(body(t.models[kind], stream).decode()),
                                headers=hdrs))
    return p


def parse_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        return math.nan
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(t: Target, kind: str, stream: bool, conns: int, seconds: float,
            pin: Pinning) -> dict[str, float]:
    """wrk against the target, with the target's CPU seconds over the same window."""
    script = lua_script(t, kind, stream)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s", "-s", str(script), t.urls[kind] + "/v1/chat/completions"]
    t.pause_window()  # opens a window for this run (and forces a collection before it)
    cpu0 = cpu_seconds(t.pids)
    r = subprocess.run(cmd, capture_output=True, timeout=seconds + 60,
                       preexec_fn=pin.preexec("load"))
    cpu = cpu_seconds(t.pids) - cpu0
    out = r.stdout.decode(errors="replace")
    res: dict[str, float] = {"cpu_s": cpu, **t.pause_window(), "settle_s": settle(t.pids)}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", out):
        res["requests"] = float(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M):
            res[f"p{pct}_ms"] = parse_ms(m.group(1))
    if m := re.search(r"^TAIL mean=(\d+) p999=(\d+) max=(\d+)", out, re.M):  # µs, from done()
        res["mean_ms"], res["p999_ms"], res["max_ms"] = (int(v) / 1e3 for v in m.groups())
    res["non2xx"] = float(m.group(1)) if (m := re.search(r"Non-2xx.*?(\d+)", out)) else 0.0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        res["connect_err"], res["read_err"] = float(m.group(1)), float(m.group(2))
        res["timeouts"] = float(m.group(4))
    if "rps" not in res:
        raise RuntimeError(f"wrk failed: {(out + r.stderr.decode())[-300:]}")
    if res.get("requests"):
        res["cpu_us_per_req"] = cpu / res["requests"] * 1e6
    return res


@dataclass
class StreamResult:
    ok: bool
    ttfb: float = math.nan  # seconds to the first data event
    times: list[float] = field(default_factory=list)  # seconds from send, per data event
    relay: list[float] = field(default_factory=list)  # arrival - upstream send stamp, s
    error: str = ""


STAMP = re.compile(rb'"content": ?"T(\d+\.\d+)"')


async def one_stream(session: Any, url: str, data: bytes, headers: dict[str, str],
                     expect: int) -> StreamResult:
    """Send one streaming request; timestamp every `data:` event as it arrives."""
    t0 = time.monotonic()
    times: list[float] = []
    relay: list[float] = []
    buf = b""
    try:
        async with session.post(url, data=data, headers=headers) as r:
            if r.status != 200:
                return StreamResult(False, error=f"HTTP {r.status}")
            done = False
            async for piece in r.content.iter_any():
                arrival = time.monotonic()
                now = arrival - t0
                buf += piece
                if b"\n\n" not in buf:
                    continue
                *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
                for ev in events:
                    if ev.startswith(b"data: "):
                        if ev == b"data: [DONE]":
                            done = True
                        else:
                            times.append(now)
                            if m := STAMP.search(ev):
                                relay.append(arrival - float(m.group(1)))
    except Exception as e:
        return StreamResult(False, times=times, error=repr(e)[:120])
    if not done or len(times) < expect:
        return StreamResult(False, times=times,
                            error=f"incomplete: {len(times)} events, done={done}")
    return StreamResult(True, ttfb=times[0], times=times, relay=relay)


async def stream_load(t: Target, kind: str, total: int, conc: int, expect: int,
                      sample: Callable[[], None] | None = None,
                      max_tokens: int | None = None, stagger: float = 0.0
                      ) -> list[StreamResult]:
    """total streams, conc at a time, through one aiohttp session (keep-alive).

    stagger: worker k starts k*stagger s late, so TTFB is measured in a steady state,
    not in a burst of simultaneous connects."""
    import aiohttp

    url = t.urls[kind] + "/v1/chat/completions"
    data = body(t.models[kind], True, max_tokens)
    hdrs = {"Content-Type": "application/json", **t.headers}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    left = [total]

    async def worker(k: int) -> list[StreamResult]:
        if stagger:
            await asyncio.sleep(k * stagger)
        out = []
        for _ in range(total):
            if left[0] <= 0:
                break
            left[0] -= 1
            out.append(await one_stream(s, url, data, hdrs, expect))
        return out

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        tasks = [asyncio.ensure_future(worker(k)) for k in range(min(conc, total))]
        if sample is not None:
            pending = set(tasks)
            for _ in range(100000):
                _, pending = await asyncio.wait(pending, timeout=0.5)
                sample()
                if not pending:
                    break
        return [r for rs in await asyncio.gather(*tasks) for r in rs]


def rotated(items: list[Target], k: int) -> list[Target]:
    """items started at k: each round starts with another target, so none of them always
    follows the same one (in (f), whichever target ran second after direct was ~3 % slower
    in every round of two runs: the position, not the target)."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def med(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan
