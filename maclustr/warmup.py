"""Warm-up and the health check that generates.

mlx_lm.server loads a model on the first request that names it (tens of seconds for a 30B
model: the "slow first request"), and its /health says ok even when generation is wedged.
Both are answered the same way: ask the replica for one token.
"""

from __future__ import annotations

import asyncio
import json
import logging

from .config import Route, RouteTable
from .scheduler import Scheduler
from .upstream import Client

log = logging.getLogger("maclustr.warmup")


async def generate_one(client: Client, route: Route, base: str, timeout: float) -> bool:
    """True when the replica produced a one-token chat completion within `timeout` s."""
    body = json.dumps({"model": route.model, "max_tokens": 1, "stream": False,
                       "messages": [{"role": "user", "content": "ping"}]}).encode()

    async def ask() -> bool:
        resp = await client.request("POST", base, "/v1/chat/completions", body,
                                    {"Content-Type": "application/json"})
        try:
            data = b""
            while chunk := await resp.read():
                data += chunk
            return resp.status == 200 and b'"choices"' in data
        finally:
            resp.close()

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False


class Warmer:
    """Runs warm-ups in the background and records each (replica, model)'s state on the
    scheduler's Replica: loading → warm, or failed."""

    def __init__(self, client: Client, scheduler: Scheduler) -> None:
        self._client = client
        self._scheduler = scheduler
        self._tasks: set[asyncio.Task[None]] = set()

    def warm_table(self, table: RouteTable, only_url: str | None = None) -> None:
        """Warm every `warmup: true` model on each replica not already warm (or loading)."""
        for route in table.routes:
            if not route.warmup:
                continue
            for url in route.upstreams:
                if only_url is not None and url != only_url:
                    continue
                state = self._scheduler.replica(url).warm
                if only_url is None and state.get(route.model) in ("warm", "loading"):
                    continue
                state[route.model] = "loading"
                self._scheduler.version += 1
                task = asyncio.ensure_future(self._warm(route, url))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def warm_now(self, table: RouteTable, url: str) -> None:
        """Warm the `warmup: true` models of one replica and wait for it (a restarted
        replica rejoins warm)."""
        await asyncio.gather(*(self._warm(r, url) for r in table.routes
                               if r.warmup and url in r.upstreams))

    async def _warm(self, route: Route, url: str) -> None:
        ok = await generate_one(self._client, route, url, route.timeouts.first_byte)
        self._scheduler.replica(url).warm[route.model] = "warm" if ok else "failed"
        self._scheduler.version += 1
        log.info("warm-up of %s on a replica: %s", route.alias, "done" if ok else "failed")

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
