"""/health: is the gateway up, and (deep) can it reach each model's server.

The answer names aliases only: a server shared by several aliases is pinged once and reported
under each of them, never by address.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .config import RouteTable
from .upstream import Client


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


async def deep(table: RouteTable, client: Client) -> dict[str, Any]:
    timeout = table.settings.health_timeout
    bases = table.upstreams
    results = await asyncio.gather(*(ping(client, b, timeout) for b in bases))
    by_base = dict(zip(bases, results, strict=True))
    models = {}
    for r in table.routes:
        ok, ms = by_base[r.upstream]
        models[r.alias] = {"status": "up" if ok else "down", "latency_ms": ms if ok else None}
    up = sum(1 for m in models.values() if m["status"] == "up")
    status = "ok" if up == len(models) else "degraded" if up else "down"
    return {"status": status, "models": models}
