"""The self-healing loop: finds dead and hung replicas from live traffic and restarts them.

Wiring only; the rules are heal.py's (verdicts, budget), restarts.py's (which command) and the
scheduler's (who serves). Every second the healer looks for replicas with requests in flight
and no byte for their model's `stall_after`: such a replica is `suspect` and gets one
one-token probe (warmup.generate_one, the `?deep=generate` check); no token within
`gateway.generate_timeout` makes it `wedged`. The relay reports a dead generation thread
(mlx's 404) and deep health a /health 503 through `declare`. A wedged replica's requests in
flight are kicked (the relay moves or ends them), then its restart command runs (one at a
time per replica, within the hourly budget) and it is `restarting` until /health and one
token answer again, then `up` (after its warm-up, for `warmup: true` models).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import Route, RouteTable
from .heal import COMMAND_TIMEOUT, stalled
from .health import ping
from .restarts import describe, mask, output_tail, restart_argv
from .scheduler import Replica, Scheduler
from .upstream import Client
from .warmup import Warmer, generate_one

log = logging.getLogger("maclustr.heal")

TICK = 1.0  # seconds between looks for stalled replicas
BACK_POLL = 0.5  # seconds between checks of a restarting replica
REJOIN_PROBE = 60.0  # seconds between one-token probes of a replica left wedged
OUTPUT_CAP = 64 * 1024  # bytes of a restart command's output kept (for its tail)


def note(level: int, message: str, **fields: Any) -> None:
    """One log line; `fields` become JSON keys under --log-format json."""
    log.log(level, message, extra={"fields": fields})


async def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT
                      ) -> tuple[int | None, bytes]:
    """(exit status, or None when it ran past `timeout` and was killed; its output). Waits for
    the command, not for children that keep its output open (a job it started)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        return 127, f"{argv[0]}: {e.strerror}".encode()
    assert proc.stdout is not None
    out = bytearray()

    async def read(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            out.extend(chunk)
            del out[:-OUTPUT_CAP]

    reader = asyncio.ensure_future(read(proc.stdout))
    status: int | None
    try:
        status = await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        status = None
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), 1.0)
    reader.cancel()
    return status, bytes(out)


class Healer:
    """Suspicion, verdicts and restarts for every replica of the live table."""

    def __init__(self, client: Client, scheduler: Scheduler, table: Callable[[], RouteTable],
                 warmer: Warmer | None = None,
                 secrets: Callable[[], Sequence[str]] = lambda: (),
                 watch_stalls: bool = True) -> None:
        self._client = client
        self._sched = scheduler
        self._table = table
        self._warmer = warmer
        self._secrets = secrets
        self._busy: dict[str, asyncio.Task[None]] = {}  # url -> its probe or restart
        self._loop: asyncio.Task[None] | None = None
        self.watch_stalls = watch_stalls

    def start(self) -> None:
        self._sched.on_verdict = self.declare
        if self.watch_stalls:
            self._loop = asyncio.ensure_future(self._watch())

    def close(self) -> None:
        for t in (self._loop, *self._busy.values()):
            if t is not None:
                t.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.scan(time.monotonic())
            except Exception:  # the watch must outlive any bug in one look
                log.exception("self-healing scan failed")

    def scan(self, now: float) -> None:
        """Make every silent replica with requests in flight suspect."""
        for route in self._table().routes:
            for url in route.upstreams:
                r = self._sched.replica(url)
                if (r.health == "up" and url not in self._busy
                        and stalled(r.in_flight, r.last_byte, now, route.stall_after)):
                    self._spawn(url, self._suspect(route, r, now))

    def declare(self, url: str, reason: str, charge: bool = True) -> None:
        """A replica is dead (`reason` "dead": mlx said its generation thread died) or wedged
        (a failed probe): take it out and restart it, unless that is under way already."""
        table = self._table()
        route = next((r for r in table.routes if url in r.upstreams), None)
        if route is None:
            return
        r = self._sched.replica(url)
        if r.healing or r.health in ("wedged", "restarting"):
            return
        if url in self._busy:  # a probe is running: its verdict follows
            if reason != "dead":
                return
            self._busy.pop(url).cancel()
        # out at once, so a request moved off it cannot land on it again; while its fate is
        # decided its model's requests wait
        self._sched.set_health(r, "wedged", healing=True)
        self._spawn(url, self._verdict(route, r, reason, charge))

    def _spawn(self, url: str, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._busy[url] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._busy.get(url) is t:
                del self._busy[url]
            if not t.cancelled() and t.exception() is not None:
                log.error("self-healing of a replica failed", exc_info=t.exception())

        task.add_done_callback(done)

    def _name(self, route: Route, r: Replica) -> str:
        return str(route.upstreams.index(r.url)) if r.url in route.upstreams else "-"

    async def _suspect(self, route: Route, r: Replica, since: float) -> None:
        """One one-token probe; no token in time and no byte meanwhile: wedged."""
        idx = self._name(route, r)
        silent = since - r.last_byte
        self._sched.set_health(r, "suspect")
        note(logging.WARNING, f"replica {idx} of {route.alias} is suspect: {r.in_flight} "
             f"request(s) in flight and no byte for {silent:.0f} s; probing it",
             event="suspect", model=route.alias, replica=idx, silent_s=round(silent, 1))
        ok = await generate_one(self._client, route, r.url,
                                self._table().settings.generate_timeout)
        if ok or r.last_byte > since:
            self._sched.set_health(r, "up")
            note(logging.INFO, f"replica {idx} of {route.alias} answered its probe: up",
                 event="cleared", model=route.alias, replica=idx)
            return
        await self._verdict(route, r, "wedged")

    async def _verdict(self, route: Route, r: Replica, reason: str,
                       charge: bool = True) -> None:
        """Out of rotation, its requests in flight kicked, then restarted if it may be."""
        idx = self._name(route, r)
        self._sched.set_health(r, "wedged", healing=True)
        self._sched.kick(r)
        table = self._table()
        argv = restart_argv(route, r.url, table.nodes, os.getuid(), route.restart)
        what = "its generation thread died" if reason == "dead" else \
            "it produced no token within the probe's deadline"
        now = time.monotonic()
        if argv is None:
            note(logging.ERROR, f"replica {idx} of {route.alias} is {reason}: {what}; no "
                 "restart command (set 'restart' or place the model on a node), it stays out",
                 event=reason, model=route.alias, replica=idx, action="none")
            self._sched.set_health(r, "wedged", healing=False)
            await self._rejoin(route, r)
            return
        r.budget.limit = table.settings.restart_limit
        if charge and not r.budget.allows(now):
            note(logging.ERROR, f"replica {idx} of {route.alias} is {reason}: {what}; "
                 f"restarted {r.budget.used(now)} time(s) this hour (restart_limit "
                 f"{r.budget.limit}), it stays out",
                 event=reason, model=route.alias, replica=idx, action="limit")
            self._sched.set_health(r, "wedged", healing=False)
            await self._rejoin(route, r)
            return
        note(logging.WARNING, f"replica {idx} of {route.alias} is {reason}: {what}; "
             f"restarting it: {describe(argv, self._secrets())}", event=reason,
             model=route.alias, replica=idx, action="restart", charged=charge,
             command=[mask(a, self._secrets()) for a in argv])
        await self._restart(route, r, reason, argv, charge)

    async def _restart(self, route: Route, r: Replica, reason: str,
                       argv: Sequence[str], charge: bool = True) -> None:
        idx = self._name(route, r)
        if charge:  # not for a death a known poison request caused
            r.budget.spend(time.monotonic())
        r.restarts[reason] = r.restarts.get(reason, 0) + 1
        self._sched.set_health(r, "restarting")
        started = time.monotonic()
        status, output = await run_command(argv)
        took = time.monotonic() - started
        if status != 0:
            said = f"ran past {COMMAND_TIMEOUT:.0f} s and was killed" if status is None \
                else f"exited with status {status}"
            note(logging.ERROR, f"restart of replica {idx} of {route.alias} {said}: "
                 f"{output_tail(output, self._secrets())}", event="restart_failed",
                 model=route.alias, replica=idx, status=status, seconds=round(took, 1))
        if await self._back(route, r):
            note(logging.WARNING, f"replica {idx} of {route.alias} is back after its restart "
                 f"({time.monotonic() - started:.1f} s)", event="restarted",
                 model=route.alias, replica=idx, seconds=round(time.monotonic() - started, 1))
            self._sched.set_health(r, "up", healing=False)
            return
        note(logging.ERROR, f"replica {idx} of {route.alias} did not come back after its "
             "restart", event="restart_failed", model=route.alias, replica=idx)
        await self._verdict(route, r, reason)

    async def _rejoin(self, route: Route, r: Replica) -> None:
        """A replica left wedged (no command, or past its budget) rejoins only if someone
        else brings it back: it is watched, not restarted. /health is asked often; a token
        when /health has just come back, else every REJOIN_PROBE s (each probe of a hung
        server holds one of its threads for good)."""
        settings = self._table().settings
        was_ok, probed = False, 0.0
        while r.url in self._table().upstreams:
            ok, _ = await ping(self._client, r.url, settings.health_timeout)
            now = time.monotonic()
            if ok and (not was_ok or now - probed >= REJOIN_PROBE):
                probed = now
                if await generate_one(self._client, route, r.url, settings.generate_timeout):
                    idx = self._name(route, r)
                    note(logging.WARNING, f"replica {idx} of {route.alias} answers again: up",
                         event="recovered", model=route.alias, replica=idx)
                    self._sched.set_health(r, "up", healing=False)
                    return
            was_ok = ok
            await asyncio.sleep(BACK_POLL)

    async def _back(self, route: Route, r: Replica) -> bool:
        """/health and one token answer again (and the warm-up ran), within the model's
        first-byte timeout (a model load)."""
        settings = self._table().settings
        deadline = time.monotonic() + route.timeouts.first_byte
        while time.monotonic() < deadline:
            if r.url not in self._table().upstreams:  # a reload removed it
                return False
            ok, _ = await ping(self._client, r.url, settings.health_timeout)
            if ok and await generate_one(self._client, route, r.url,
                                         settings.generate_timeout):
                if route.warmup and self._warmer is not None:
                    await self._warmer.warm_now(self._table(), r.url)
                return True
            await asyncio.sleep(BACK_POLL)
        return False
