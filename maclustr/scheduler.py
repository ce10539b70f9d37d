"""Which replica serves a request, and when.

A model may have several replicas (mlx_lm.server processes). A request takes a slot on one
replica: the one that served its conversation before (the server's prompt cache still holds
the shared prefix), else the one with the fewest requests in flight (ties round-robin). Each
replica takes at most `max_concurrency` requests; the rest wait in a per-model FIFO queue
that takes API keys in turn, so one key flooding a model cannot starve the others. The queue
is bounded by `max_queue` and `queue_timeout` (429 beyond either). A key with `max_in_flight`
(routes.yaml `keys:`) holds at most that many slots: at its limit its requests wait in the
queue, and the queue serves the other keys' requests meanwhile (a slot never idles for it).

Passive health: a replica that fails `FAILS_TO_EJECT` times in a row is taken out for a
cool-down, then probed (`/health`) before it serves again; with every replica of a model out,
requests get an immediate 503 with Retry-After instead of a long wait.

Self-healing (healer.py decides, heal.py holds the rules): a replica's `health` is `up`,
`suspect` (silent too long; its probe runs), `wedged` (dead or hung: out of rotation) or
`restarting`. Only an `up` replica takes new requests; while one is suspect or restarting
its model's requests wait in the queue rather than get the 503, since it may be back soon.
`kick` interrupts the requests in flight on a replica declared wedged (the relay moves or
ends them).

State lives here, keyed by upstream URL, so it survives a routes reload; routes are read
from the request's own table snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import Route
from .errors import ModelUnavailable, Overloaded
from .heal import RestartBudget
from .policy import Policies

log = logging.getLogger("maclustr.scheduler")

FAILS_TO_EJECT = 3
COOLDOWN = 10.0  # seconds out before the first probe
AFFINITY_ENTRIES = 10_000  # remembered conversation prefixes per model


@dataclass
class Replica:
    """Runtime state of one upstream server. Never shown to clients with its URL."""

    url: str
    in_flight: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0  # monotonic time; > now means cooling down
    checking: bool = False  # out until a probe passes
    served: int = 0
    warm: dict[str, str] = field(default_factory=dict)  # internal model -> loading/warm/failed
    fingerprint: str | None = None  # its system_fingerprint, once seen (lets unary splice)
    health: str = "up"  # up, suspect, wedged, restarting (heal.STATES)
    healing: bool = False  # a verdict or restart is under way (its requests wait for it)
    last_byte: float = 0.0  # monotonic: the last byte from any of its connections
    restarts: dict[str, int] = field(default_factory=dict)  # reason -> restarts run
    budget: RestartBudget = field(default_factory=RestartBudget)
    # interrupt each request in flight here (registered by the relay, called by `kick`)
    kicks: set[Callable[[], None]] = field(default_factory=set)

    def usable(self, now: float) -> bool:
        return self.health == "up" and not self.checking and self.down_until <= now

    def returning(self) -> bool:
        """Out now, but being checked or restarted: worth waiting for."""
        return self.healing or self.health in ("suspect", "restarting")

    def state(self, now: float) -> str:
        if self.health != "up":
            return self.health
        return "up" if self.usable(now) else "down"


@dataclass
class _Waiter:
    route: Route
    prefix: str | None
    future: asyncio.Future[Replica]
    exclude: tuple[str, ...] = ()  # replicas this request already failed on
    key: str = "-"
    task: asyncio.Task[Any] | None = None  # the request's; set when its key's slots count


class _FairQueue:
    """FIFO per API key; keys are served in turn."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.size = 0

    def push(self, key: str, w: _Waiter) -> None:
        self._by_key.setdefault(key, deque()).append(w)
        self.size += 1

    def first(self, ready: Callable[[_Waiter], bool]) -> _Waiter | None:
        """The head of the first key in turn whose head is ready (a key at its in-flight
        limit waits; the keys after it are served)."""
        for q in self._by_key.values():
            if ready(q[0]):
                return q[0]
        return None

    def pop(self, key: str) -> None:
        q = self._by_key[key]
        q.popleft()
        self.size -= 1
        if q:
            self._by_key.move_to_end(key)  # next key's turn
        else:
            del self._by_key[key]

    def remove(self, key: str, w: _Waiter) -> None:
        q = self._by_key.get(key)
        if q is not None and w in q:
            q.remove(w)
            self.size -= 1
            if not q:
                del self._by_key[key]


def _occupy(r: Replica) -> None:
    """Take a slot. The silence the stall verdict measures starts when a request arrives at an
    idle replica, not at its last byte of long ago."""
    if not r.in_flight:
        r.last_byte = time.monotonic()
    r.in_flight += 1


def _granted(f: asyncio.Future[Replica]) -> bool:
    return f.done() and not f.cancelled() and f.exception() is None


_SYSTEM_ROLES = ("system", "developer")


def conversation_prefix(payload: dict[str, Any]) -> str | None:
    """A stable hash of what every later turn of a conversation starts with: the system prompt
    and the first user message (chat), or the prompt's first 512 characters (completions).
    Only up to the first message that is not a system one: without a system prompt, turn one
    ([user]) and turn two ([user, assistant, user]) must hash alike."""
    msgs = payload.get("messages")
    if isinstance(msgs, list) and msgs:
        first = next((i for i, m in enumerate(msgs)
                      if not isinstance(m, dict) or m.get("role") not in _SYSTEM_ROLES),
                     len(msgs) - 1)
        head: Any = msgs[:first + 1]
    elif isinstance(payload.get("prompt"), str):
        head = payload["prompt"][:512]
    else:
        return None
    try:
        raw = json.dumps(head, sort_keys=True, default=str).encode()
    except (TypeError, ValueError):
        return None
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


class Scheduler:
    """Slots, queues, affinity and passive health for every model of the gateway."""

    def __init__(self, probe: Callable[[str], Awaitable[bool]],
                 on_return: Callable[[str], None] | None = None) -> None:
        self._probe = probe
        self._on_return = on_return
        self.replicas: dict[str, Replica] = {}
        self._queues: dict[str, _FairQueue] = {}
        self._affinity: dict[str, OrderedDict[str, str]] = {}
        self._turn: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._routed: set[str] | None = None  # the replicas the route table names (None: all)
        self.version = 0  # bumped whenever a replica's reported state changes
        self._policies: Policies | None = None  # `keys:`, for max_in_flight
        self._key_limits = False  # some key has a max_in_flight
        self._key_flight: dict[str, int] = {}  # slots held per key (while limits are on)
        self._holders: dict[asyncio.Task[Any], str] = {}  # request task -> its key

        # the healer's `declare(url, reason)`: a replica found dead or wedged (None: no healer)
        self.on_verdict: Callable[[str, str, bool], None] | None = None

    def set_policies(self, policies: Policies | None) -> None:
        """The live `keys:` section (each routes reload)."""
        self._policies = policies
        self._key_limits = policies is not None and policies.in_flight_limits
        self._pump()

    def replica(self, url: str) -> Replica:
        r = self.replicas.get(url)
        if r is None:
            r = self.replicas[url] = Replica(url)
        return r

    # --- choosing ---------------------------------------------------------------------------

    def pick(self, route: Route, prefix: str | None,
             exclude: Iterable[str] = ()) -> Replica | None:
        """A usable replica with a free slot, or None."""
        now = time.monotonic()
        cap = route.max_concurrency
        if len(route.upstreams) == 1:
            r = self.replica(route.upstream)
            ok = r.usable(now) and r.in_flight < cap and route.upstream not in exclude
            return r if ok else None
        free = [r for u in route.upstreams if u not in exclude
                for r in (self.replica(u),) if r.usable(now) and r.in_flight < cap]
        if not free:
            return None
        if prefix is not None:
            known = self._affinity.get(route.alias)
            seen = known.get(prefix) if known is not None else None
            for r in free:
                if r.url == seen:
                    return r
        low = min(r.in_flight for r in free)
        ties = [r for r in free if r.in_flight == low]
        turn = self._turn.get(route.alias, 0)
        self._turn[route.alias] = turn + 1
        return ties[turn % len(ties)]

    def all_down(self, route: Route, exclude: Iterable[str] = ()) -> bool:
        """No replica up, and none suspect or restarting (those are waited for)."""
        now = time.monotonic()
        return not any(r.usable(now) or r.returning() for u in route.upstreams
                       if u not in exclude for r in (self.replica(u),))

    def retry_after(self, route: Route) -> int:
        now = time.monotonic()
        soonest = min(self.replica(u).down_until for u in route.upstreams)
        return max(1, math.ceil(soonest - now if soonest > now else COOLDOWN))

    # --- what /metrics reads at scrape time ------------------------------------------------

    def queue_depth(self, alias: str) -> int:
        q = self._queues.get(alias)
        return q.size if q is not None else 0

    def replica_states(self, route: Route) -> list[tuple[int, bool]]:
        """(requests in flight, usable) of each replica of `route`, in upstreams order."""
        now = time.monotonic()
        return [(r.in_flight, r.usable(now)) for r in map(self.replica, route.upstreams)]

    # --- slots ------------------------------------------------------------------------------

    def free_slot(self, route: Route, prefix: str | None, exclude: tuple[str, ...] = (),
                  key: str | None = None) -> Replica | None:
        """A slot now, when nobody is queued for the model (no jumping the queue) and a
        replica has one: the common case, without the cost of a coroutine. None: `acquire`
        (also while some key has max_in_flight, unless `key` is given and below its own)."""
        q = self._queues.get(route.alias)
        if q is not None and q.size:
            return None
        if not self._key_limits:
            return self.take(route, prefix, exclude)
        if key is None or exclude or not self._ready_key(key):
            return None
        r = self.take(route, prefix, exclude)
        if r is not None:  # counted as _pump counts a granted waiter
            self._holders[asyncio.current_task()] = key  # type: ignore[index]
            self._key_flight[key] = self._key_flight.get(key, 0) + 1
        return r

    async def acquire(self, route: Route, key: str, prefix: str | None,
                      exclude: tuple[str, ...] = ()) -> Replica:
        """A slot on a replica (not one of `exclude`); waits in the model's queue when every
        replica is full."""
        r = self.free_slot(route, prefix, exclude)
        if r is not None:
            return r
        q = self._queues.get(route.alias)
        if self.all_down(route, exclude):
            raise ModelUnavailable(route.alias, self.retry_after(route))
        if q is None:
            q = self._queues[route.alias] = _FairQueue()
        if q.size >= route.max_queue:
            raise Overloaded(route.alias, "its queue is full", retry_after=1)
        w = _Waiter(route, prefix, asyncio.get_running_loop().create_future(), exclude, key)
        if self._key_limits and not exclude:  # a failover's slot is counted already
            w.task = asyncio.current_task()
        q.push(key, w)
        if self._key_limits:
            self._pump()  # a free slot now, unless the key is at its limit
        try:
            return await asyncio.wait_for(asyncio.shield(w.future), route.queue_timeout)
        except asyncio.TimeoutError:
            q.remove(key, w)
            if _granted(w.future):  # granted at the last moment: hand the slot back
                self.release(w.future.result(), ok=None)
            w.future.cancel()
            raise Overloaded(route.alias, "no slot freed up in time",
                             retry_after=max(1, math.ceil(route.queue_timeout / 4)),
                             reason="queue_timeout") from None
        except asyncio.CancelledError:  # the client left while queued: leave at once
            q.remove(key, w)
            if _granted(w.future):
                self.release(w.future.result(), ok=None)
            w.future.cancel()
            raise

    def take(self, route: Route, prefix: str | None, exclude: Iterable[str]) -> Replica | None:
        """A slot on another replica for failover, without queueing."""
        r = self.pick(route, prefix, exclude)
        if r is not None:
            _occupy(r)
        return r

    def release(self, r: Replica, ok: bool | None) -> None:
        """Free the slot; `ok` is the outcome for passive health (None: no verdict)."""
        r.in_flight -= 1
        if ok is True:
            r.failures = 0
            r.served += 1
        elif ok is False:
            r.failures += 1
            if r.failures >= FAILS_TO_EJECT and r.usable(time.monotonic()):
                self._eject(r)
        self._pump()

    def remember(self, route: Route, prefix: str | None, r: Replica) -> None:
        if prefix is None or len(route.upstreams) < 2:
            return
        seen = self._affinity.setdefault(route.alias, OrderedDict())
        seen[prefix] = r.url
        seen.move_to_end(prefix)
        if len(seen) > AFFINITY_ENTRIES:
            seen.popitem(last=False)

    def _pump(self) -> None:
        """Hand free slots to queued requests, oldest first, keys in turn, skipping keys at
        their max_in_flight. When a model has lost its last replica, its queued requests get
        the 503 at once instead of waiting out their queue_timeout."""
        for q in self._queues.values():
            while q.size:
                w = q.first(self._ready)
                if w is None:
                    break
                if w.future.done():
                    q.pop(w.key)
                    continue
                if self.all_down(w.route, w.exclude):
                    q.pop(w.key)
                    w.future.set_exception(
                        ModelUnavailable(w.route.alias, self.retry_after(w.route)))
                    continue
                r = self.pick(w.route, w.prefix, w.exclude)
                if r is None:
                    break
                q.pop(w.key)
                _occupy(r)
                if w.task is not None:
                    self._holders[w.task] = w.key
                    self._key_flight[w.key] = self._key_flight.get(w.key, 0) + 1
                w.future.set_result(r)

    def _ready(self, w: _Waiter) -> bool:
        return w.task is None or w.future.done() or self._ready_key(w.key)

    def _ready_key(self, key: str) -> bool:
        """The key is below its max_in_flight (or has none)."""
        if self._policies is None:
            return True
        limit = self._policies.of(key).max_in_flight
        return limit is None or self._key_flight.get(key, 0) < limit

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """A request ended (its Outcome reported): the slot its key held is free for the
        key's next request. Its replica slot was released already (`release`)."""
        if not self._holders or task is None:
            return
        key = self._holders.pop(task, None)
        if key is not None:
            left = self._key_flight[key] - 1
            if left:
                self._key_flight[key] = left
            else:
                del self._key_flight[key]
            self._pump()

    def key_in_flight(self, key: str) -> int:
        return self._key_flight.get(key, 0)

    # --- self-healing (the healer sets, the relay reads) -------------------------------------

    def set_health(self, r: Replica, health: str, healing: bool | None = None) -> None:
        """A replica's healing state; back `up`, it takes the requests queued for it; out for
        good (`wedged`, not `healing`), its model's queue gets the 503 when no other replica
        is left."""
        if healing is None:
            healing = r.healing
        if (r.health, r.healing) == (health, healing):
            return
        r.health, r.healing = health, healing
        self.version += 1
        self._pump()

    def declare(self, url: str, reason: str, charge: bool = True) -> None:
        """Report a replica found dead (mlx's 404 "generation thread died", /health 503) or
        wedged, for the healer to take out and restart (`charge`: the restart counts against
        gateway.restart_limit; not when a known poison request caused it)."""
        if self.on_verdict is not None:
            self.on_verdict(url, reason, charge)

    def kick(self, r: Replica) -> None:
        """Interrupt every request in flight on `r` (declared wedged)."""
        for interrupt in list(r.kicks):
            interrupt()

    # --- passive health ---------------------------------------------------------------------

    def _eject(self, r: Replica) -> None:
        r.down_until = time.monotonic() + COOLDOWN
        r.checking = True
        self.version += 1
        log.warning("a replica failed %d times in a row: out for %.0f s, then probed",
                    r.failures, COOLDOWN)
        task = asyncio.ensure_future(self._recover(r))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def keep_only(self, urls: Iterable[str]) -> None:
        """After a reload: the replicas the table names. An ejected one it no longer names is
        probed no more (the loop would otherwise outlive the replica, forever)."""
        self._routed = set(urls)

    async def _recover(self, r: Replica) -> None:
        while True:
            await asyncio.sleep(max(0.0, r.down_until - time.monotonic()))
            if self._routed is not None and r.url not in self._routed:
                self._reinstate(r)  # a table naming it again starts it afresh
                log.info("a replica removed from the routes is no longer probed")
                return
            if await self._probe_once(r.url):
                self._reinstate(r)
                log.info("a replica passed its probe and serves again")
                if self._on_return is not None:
                    self._on_return(r.url)
                self._pump()
                return
            r.down_until = time.monotonic() + COOLDOWN

    async def _probe_once(self, url: str) -> bool:
        """The probe's verdict; one that raises (a bug, not an answer) is a failed probe,
        logged in one line, and the replica is probed again after the cool-down."""
        try:
            return await self._probe(url)
        except Exception as e:
            log.warning("a replica's probe raised %s (%.200s); it stays out, probed again in "
                        "%g s", type(e).__name__, e, COOLDOWN)
            return False

    def _reinstate(self, r: Replica) -> None:
        r.failures = 0
        r.checking = False
        r.down_until = 0.0
        self.version += 1

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
