"""/health: is the gateway up, and (deep) can each model's replicas serve.

The answer names aliases and replica indexes only, never an address. A server shared by
several aliases is pinged once. Replica states: `up`; `down` (unreachable, or taken out by
passive health); `loading` (warm-up still running); `wedged` (`?deep=generate`: /health is ok
but no token came within the deadline).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .config import RouteTable
from .scheduler import Scheduler
from .upstream import Client
from .warmup import generate_one


async def ping(client: Client, base: str, timeout: float) -> tuple[bool, float]:
    """(reachable and answering 200, latency in ms) for one upstream's GET /health."""
    start = time.perf_counter()

    async def get() -> bool:
        resp = await client.request("GET", base, "/health", b"", {"Accept": "application/json"})
        try:
            while await resp.read():
                pass
            return resp.status == 200
        finally:
            resp.close()

    try:
        ok = await asyncio.wait_for(get(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        ok = False
    return ok, round((time.perf_counter() - start) * 1000, 1)


def shallow(table: RouteTable) -> dict[str, Any]:
    return {"status": "ok", "models": list(table.aliases)}


def passive_status(table: RouteTable, scheduler: Scheduler, alias: str) -> str:
    """What the gateway already knows without asking: up, or down (every replica out)."""
    route = table.resolve(alias)
    assert route is not None
    return "down" if scheduler.all_down(route) else "up"


async def deep(table: RouteTable, client: Client, scheduler: Scheduler,
               generate: bool = False) -> dict[str, Any]:
    timeout = table.settings.health_timeout
    bases = table.upstreams
    pings = dict(zip(bases, await asyncio.gather(*(ping(client, b, timeout) for b in bases)),
                     strict=True))
    gen: dict[tuple[str, str], bool] = {}
    if generate:
        pairs = [(r, u) for r in table.routes for u in r.upstreams if pings[u][0]]
        deadline = table.settings.generate_timeout
        results = await asyncio.gather(*(generate_one(client, r, u, deadline) for r, u in pairs))
        gen = {(r.alias, u): ok for (r, u), ok in zip(pairs, results, strict=True)}
    now = time.monotonic()
    models: dict[str, Any] = {}
    for r in table.routes:
        replicas: list[dict[str, Any]] = []
        latencies: list[float] = []
        for u in r.upstreams:
            ok, ms = pings[u]
            rep = scheduler.replica(u)
            if not ok or not rep.usable(now):
                state = "down"
            elif generate and not gen.get((r.alias, u), False):
                state = "wedged"
            elif rep.warm.get(r.model) == "loading":
                state = "loading"
            else:
                state = "up"
            replicas.append({"status": state, "latency_ms": ms if ok else None,
                             "in_flight": rep.in_flight})
            if state == "up":
                latencies.append(ms)
        states = [x["status"] for x in replicas]
        status = "up" if "up" in states else next(
            (s for s in ("loading", "wedged") if s in states), "down")
        latency = min(latencies, default=None)
        models[r.alias] = {"status": status, "latency_ms": latency, "replicas": replicas}
    up = sum(1 for m in models.values() if m["status"] == "up")
    overall = "ok" if up == len(models) else "degraded" if up else "down"
    return {"status": overall, "models": models}


class DeepCache:
    """Deep-health answers for `ttl` seconds, with concurrent callers sharing one check.

    /health is public and the front page polls it from every open browser; without this,
    each poll would ping every model server."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._at = 0.0
        self._report: dict[str, Any] | None = None
        self._key: tuple[RouteTable, int] | None = None
        self._running: asyncio.Future[dict[str, Any]] | None = None

    async def get(self, table: RouteTable, client: Client,
                  scheduler: Scheduler) -> dict[str, Any]:
        """Fresh when the table or the scheduler's replica states changed since."""
        key = (table, scheduler.version)
        now = time.monotonic()
        if self._report is not None and self._key == key and now - self._at < self.ttl:
            return self._report
        if self._running is not None and self._key == key:
            return await asyncio.shield(self._running)
        self._key = key
        self._running = asyncio.ensure_future(deep(table, client, scheduler))
        try:
            report = await asyncio.shield(self._running)
        finally:
            self._running = None
        self._report, self._at = report, time.monotonic()
        return report
