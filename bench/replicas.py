"""Issue 7's scenarios: (g) queueing against a saturated upstream, (h) prompt-cache
affinity across two real replicas."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import KEY, PY, QUEUE_LIMITS, QUEUE_MARGIN_S, WORK, Sizes
from bench.load import med, pct
from bench.procs import Pinning, Proc, cpu_seconds, spawn, wait_http
from bench.targets import Target, body, build_tiny_model
from maclustr.harness import free_port


async def queue_client(session: Any, url: str, data: bytes, headers: dict[str, str],
                       deadline: float, out: list[dict[str, Any]]) -> None:
    """(g) one client: request after request until the deadline; on 429 it waits what
    Retry-After says (as the OpenAI SDKs do), bounded by the deadline."""
    for _ in range(10000):
        if time.monotonic() >= deadline:
            return
        t0 = time.monotonic()
        rec: dict[str, Any] = {"status": 0}
        try:
            async with session.post(url, data=data, headers=headers) as r:
                rec["status"] = r.status
                rec["head_s"] = time.monotonic() - t0  # queue wait + the upstream's head
                rec["retry_after"] = r.headers.get("Retry-After")
                if r.status != 200:
                    raw = await r.read()
                    rec["why"] = ("queue full" if b"queue is full" in raw
                                  else "queue_timeout" if b"in time" in raw
                                  else raw[:80].decode(errors="replace"))
                else:
                    buf, done = b"", False
                    async for piece in r.content.iter_any():
                        if "ttfb_s" not in rec and b"data: " in buf + piece:
                            rec["ttfb_s"] = time.monotonic() - t0
                        buf = (buf + piece)[-64:]
                        if b"data: [DONE]" in buf:
                            done = True
                    rec["done"] = done
                rec["total_s"] = time.monotonic() - t0
        except Exception as e:
            rec["error"] = repr(e)[:120]
            rec["total_s"] = time.monotonic() - t0
        out.append(rec)
        if rec["status"] == 429:
            try:
                wait = float(rec.get("retry_after") or 1)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        elif rec["status"] != 200:
            await asyncio.sleep(0.05)  # an error: do not spin


def scenario_g(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(g) 32 clients for queue_s seconds against an upstream that serves 2 at a time."""
    import aiohttp

    async def run() -> list[dict[str, Any]]:
        url = t.urls["queue"] + "/v1/chat/completions"
        data = body(t.models["queue"], True)
        hdrs = {"Content-Type": "application/json", **t.headers}
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + sizes.queue_s
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            await asyncio.gather(*(queue_client(s, url, data, hdrs, deadline, out)
                                   for _ in range(sizes.queue_clients)))
        return out

    cpu0 = cpu_seconds(t.pids)
    t0 = time.monotonic()
    recs = asyncio.run(run())
    wall = time.monotonic() - t0
    ok = [r for r in recs if r["status"] == 200 and r.get("done")]
    limited = [r for r in recs if r["status"] == 429]
    other = [r for r in recs if r not in ok and r not in limited]
    lat = [r["total_s"] * 1e3 for r in ok]
    heads = [r["head_s"] for r in recs if "head_s" in r]
    qt = float(QUEUE_LIMITS["queue_timeout"])
    return {
        "clients": float(sizes.queue_clients), "seconds": sizes.queue_s, "wall_s": wall,
        "requests": float(len(recs)), "completed": float(len(ok)),
        "completed_per_s": len(ok) / wall if wall else math.nan,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
        "ttfb_p50_ms": pct([r["ttfb_s"] * 1e3 for r in ok if "ttfb_s" in r], 50),
        "rejected_429": float(len(limited)),
        "rejected_429_with_retry_after": float(sum(1 for r in limited if r["retry_after"])),
        "rejected_queue_full": float(sum(1 for r in limited if r["why"] == "queue full")),
        "rejected_queue_timeout": float(sum(1 for r in limited
                                            if r["why"] == "queue_timeout")),
        "retry_after_values": ",".join(sorted({str(r["retry_after"]) for r in limited})),
        "max_wait_s": max(heads, default=math.nan),
        "max_wait_ok_s": max((r["head_s"] for r in ok), default=math.nan),
        "max_wait_429_s": max((r["head_s"] for r in limited), default=math.nan),
        "queue_timeout_s": qt,
        "waits_over_timeout": float(sum(1 for h in heads if h > qt + QUEUE_MARGIN_S)),
        "errors": float(len(other)),
        "first_error": next((str(r.get("error") or f"HTTP {r['status']}") for r in other), ""),
        "cpu_s": cpu_seconds(t.pids) - cpu0,
    }


# (h) prompt-cache affinity with two real mlx_lm.server replicas of one model
AFF_WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega vector "
             "matrix tensor kernel buffer socket stream token cache")


def conversation_text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = AFF_WORDS.split()
    return " ".join(rng.choice(vocab) for _ in range(words))


async def chat_turn(session: Any, url: str, headers: dict[str, str],
                    payload: dict[str, Any]) -> dict[str, float]:
    """One streamed turn: time to the first token, and the usage event's cache figures."""
    t0 = time.monotonic()
    ttft = math.nan
    usage: dict[str, Any] = {}
    buf = b""
    async with session.post(url, json=payload, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        async for piece in r.content.iter_any():
            buf += piece
            *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                obj = json.loads(ev[6:])
                if obj.get("choices") and math.isnan(ttft):
                    ttft = time.monotonic() - t0
                if obj.get("usage"):
                    usage = obj["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_ms": ttft * 1e3, "prompt_tokens": float(usage.get("prompt_tokens", math.nan)),
            "cached_tokens": float(details.get("cached_tokens", math.nan))}


async def conversations(base: str, headers: dict[str, str],
                        alias_for: Callable[[int, int], str],
                        sizes: Sizes, seed: int) -> list[list[dict[str, float]]]:
    """sizes.affinity_convs conversations of affinity_turns turns, interleaved turn by turn
    (conv 1 turn 1, conv 2 turn 1, ..., conv 1 turn 2, ...): each has its own ~1,300-token
    system prompt and adds a ~100-token user message (a tool result) per turn.
    alias_for(conversation, turn) names the model to ask for that request."""
    import aiohttp

    hist: list[list[dict[str, str]]] = [
        [{"role": "system", "content": conversation_text(seed + c, 300)}]
        for c in range(sizes.affinity_convs)]
    out: list[list[dict[str, float]]] = [[] for _ in hist]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for turn in range(sizes.affinity_turns):
            for c, msgs in enumerate(hist):
                msgs.append({"role": "user", "content": f"turn {turn}: "
                             + conversation_text(seed * 1000 + c * 100 + turn, 24)})
                payload = {"model": alias_for(c, turn), "messages": msgs, "stream": True,
                           "max_tokens": 4, "stream_options": {"include_usage": True}}
                out[c].append(await chat_turn(s, base + "/v1/chat/completions", headers,
                                              payload))
                msgs.append({"role": "assistant", "content": "Noted, continuing."})
    return out


def fixed_alias(alias: str, _c: int, _t: int) -> str:
    return alias


def scenario_h(sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(h) two mlx_lm.server replicas of one tiny model (independent prompt caches) behind one
    maclustr: alias bench-pair lists both (affinity, the default), bench-r1 / bench-r2 one
    each; round-robin = alternate bench-r1 / bench-r2 per request. Distinct seeds per mode,
    so the modes never share a cached prefix."""
    from maclustr.harness import mlx_server as real_mlx

    model_dir = build_tiny_model()
    exe = Path(PY).parent / "maclustr"
    procs: list[Proc] = []
    try:
        reps = []
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, pin.upstream)
        try:
            for i in (1, 2):
                port = free_port()
                log = WORK / "logs" / f"mlx-replica-{i}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                procs.append(Proc(f"mlx-replica-{i}",
                                  real_mlx.start_mlx_server(model_dir, port, log), log))
                reps.append(f"http://127.0.0.1:{port}")
        finally:
            os.sched_setaffinity(0, old)
        for url, proc in zip(reps, procs, strict=True):
            real_mlx.wait_healthy(url, timeout=60, proc=proc.popen)
        d = WORK / "maclustr-h"
        d.mkdir(parents=True, exist_ok=True)
        # maclustr wants one alias per internal model id: the one-replica aliases name the
        # same weights through symlinks. A replica reloads when the model id changes, so
        # each mode warms its replicas up first and then keeps to one id per replica.
        links = []
        for i in (1, 2):
            link = WORK / f"tiny-model-r{i}"
            if not link.is_symlink():
                link.symlink_to(model_dir.name)
            links.append(link)
        (d / "routes.yaml").write_text(
            "models:\n"
            f"  bench-pair:\n    model: {model_dir}\n    upstreams: [{reps[0]}, {reps[1]}]\n"
            f"  bench-r1:\n    model: {links[0]}\n    upstream: {reps[0]}\n"
            f"  bench-r2:\n    model: {links[1]}\n    upstream: {reps[1]}\n")
        port = free_port()
        gw = spawn("maclustr-h", [str(exe), "serve", "--routes", str(d / "routes.yaml"),
                                  "--port", str(port)], pin, "target",
                   env=dict(os.environ, MACLUSTR_API_KEY=KEY))
        procs.append(gw)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", gw, 60)
        hdrs = {"Authorization": f"Bearer {KEY}"}
        one = Sizes(affinity_convs=1, affinity_turns=1)
        # round-robin: each conversation changes replica every turn (what a global
        # round-robin does to interleaved conversations, whatever their number)
        modes: dict[str, tuple[Callable[[int, int], str], tuple[str, ...]]] = {
            "affinity": (lambda _c, _t: "bench-pair", ("bench-pair", "bench-pair")),
            "round-robin": (lambda c, t: ("bench-r1", "bench-r2")[(c + t) % 2],
                            ("bench-r1", "bench-r2")),
            "one replica": (lambda _c, _t: "bench-r1", ("bench-r1",)),
        }
        res: dict[str, Any] = {}
        for i, (mode, (alias_for, warm)) in enumerate(modes.items()):
            for j, alias in enumerate(warm):  # (re)load the weights, throwaway prompts
                asyncio.run(conversations(base, hdrs, functools.partial(fixed_alias, alias),
                                          one, 900 + 10 * i + j))
            runs = asyncio.run(conversations(base, hdrs, alias_for, sizes, 10 * (i + 1)))
            later = [turn for conv in runs for turn in conv[1:]]
            first = [conv[0] for conv in runs]
            res[mode] = {
                "ttft_later_p50_ms": med([x["ttft_ms"] for x in later]),
                "ttft_later_mean_ms": statistics.fmean([x["ttft_ms"] for x in later])
                if later else math.nan,
                "ttft_first_p50_ms": med([x["ttft_ms"] for x in first]),
                "ttft_by_turn_ms": [med([conv[k]["ttft_ms"] for conv in runs])
                                    for k in range(sizes.affinity_turns)],
                "later_prompt_tokens": sum(x["prompt_tokens"] for x in later),
                "later_cached_tokens": sum(x["cached_tokens"] for x in later),
                "turns": float(sum(len(c) for c in runs)),
            }
            r = res[mode]
            r["later_cached_share"] = (r["later_cached_tokens"] / r["later_prompt_tokens"]
                                       if r["later_prompt_tokens"] else math.nan)
        a, rr = res["affinity"]["ttft_later_p50_ms"], res["round-robin"]["ttft_later_p50_ms"]
        res["rr_over_affinity"] = rr / a if a else math.nan
        res["conversations"], res["turns"] = sizes.affinity_convs, sizes.affinity_turns
        return res
    finally:
        for proc in reversed(procs):
            proc.stop()
