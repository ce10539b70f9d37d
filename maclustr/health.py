"""/health: is the gateway up, and (deep) can each model's replicas serve.

The answer names aliases and replica indexes only, never an address. A server shared by
several aliases is pinged once. A model sharded over several nodes is one upstream (rank 0
serves HTTP; the group lives or dies together), so it reports like any other, plus
`"placement": "sharded over N nodes"` (a count, no node names). Replica states: `up`;
`down` (unreachable, or taken out by passive health); `loading` (warm-up still running);
`wedged` (`?deep=generate`: /health is ok but no token came within the deadline; or the
healer found it dead or hung); `suspect` and `restarting` (the healer's, see healer.py).
A /health that answers 503 is mlx's dead generation thread: reported to the healer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .config import RouteTable
from .heal import is_dead_health
from .scheduler import Scheduler
from .upstream import Client
from .warmup import generate_one


async def ping(client: Client, base: str, timeout: float) -> tuple[bool, float]:
    """(reachable and answering 200, latency in ms) for one upstream's GET /health."""
    status, ms = await ping_status(client, base, timeout)
    return status == 200, ms


async def ping_status(client: Client, base: str, timeout: float) -> tuple[int | None, float]:
    """(the status of one upstream's GET /health, None when it did not answer; latency in
    ms). A 503 is mlx's dead generation thread (heal.is_dead_health)."""
    start = time.perf_counter()

    async def get() -> int:
        resp = await client.request("GET", base, "/health", b"", {"Accept": "application/json"})
        try:
            while await resp.read():
                pass
            return resp.status
        finally:
            resp.close()

    try:
        status: int | None = await asyncio.wait_for(get(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        status = None
    return status, round((time.perf_counter() - start) * 1000, 1)


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
    statuses = await asyncio.gather(*(ping_status(client, b, timeout) for b in bases))
    for base, (code, _) in zip(bases, statuses, strict=True):
        if code is not None and is_dead_health(code):
            scheduler.declare(base, "dead")
    pings = {b: (code == 200, ms) for b, (code, ms) in zip(bases, statuses, strict=True)}
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
            if rep.health != "up":
                state = rep.health  # suspect, wedged, restarting: the healer's word
            elif not ok or not rep.usable(now):
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
            (s for s in ("loading", "restarting", "suspect", "wedged") if s in states), "down")
        latency = min(latencies, default=None)
        models[r.alias] = {"status": status, "latency_ms": latency, "replicas": replicas}
        if r.shards:
            models[r.alias]["placement"] = r.placement
    up = sum(1 for m in models.values() if m["status"] == "up")
    overall = "ok" if up == len(models) else "degraded" if up else "down"
    return {"status": overall, "models": models}


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The answer for a caller without a key: states and latency, not load. Per-replica
    in-flight counts tell an outsider when the cluster is busy; key holders may see them."""
    models = {alias: {**m, "replicas": [{k: v for k, v in r.items() if k != "in_flight"}
                                        for r in m["replicas"]]}
              for alias, m in report["models"].items()}
    return {**report, "models": models}


class _Slot:
    """One cached deep-health answer and the check that may be computing it."""

    __slots__ = ("at", "key", "report", "running")

    def __init__(self) -> None:
        self.at = 0.0
        self.report: dict[str, Any] | None = None
        self.key: tuple[RouteTable, int] | None = None
        self.running: asyncio.Future[dict[str, Any]] | None = None


class DeepCache:
    """Deep-health answers for `ttl` seconds, with concurrent callers sharing one check; one
    slot for the ping-only check and one for `generate` (which makes every replica produce a
    token, so it must never run once per caller).

    /health is public and the front page polls it from every open browser; without this,
    each poll would ping every model server."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._slots = {False: _Slot(), True: _Slot()}

    async def get(self, table: RouteTable, client: Client, scheduler: Scheduler,
                  generate: bool = False) -> dict[str, Any]:
        """Fresh when the table or the scheduler's replica states changed since."""
        slot = self._slots[generate]
        key = (table, scheduler.version)
        now = time.monotonic()
        if slot.report is not None and slot.key == key and now - slot.at < self.ttl:
            return slot.report
        if slot.running is not None and slot.key == key:
            return await asyncio.shield(slot.running)
        slot.key = key
        slot.running = asyncio.ensure_future(deep(table, client, scheduler, generate))
        try:
            report = await asyncio.shield(slot.running)
        finally:
            slot.running = None
        slot.report, slot.at = report, time.monotonic()
        return report
