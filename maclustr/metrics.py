"""Prometheus metrics: one registry per app, the metric objects, and the scrape-time gauges.

The relay never touches a counter: every request ends in one `Metrics.observe(outcome)`
(called by the `frame` middleware), and the scheduler's state (queue depth, requests in
flight, replica up) is read by a collector when /metrics is scraped, so the hot path pays
nothing for the gauges. Served by prometheus-client's own aiohttp handler.

Labels are bounded and public: `model` is the alias (never the internal id), `replica` the
replica's index in the route's `upstreams` list (never its address), `key` the API key's
name (never the secret), `endpoint` the route's path, `code` the HTTP status the client got
(499: the client left; an in-band stream error counts with its error's status).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .config import RouteTable
from .endpoints import API_PATHS
from .heal import REASONS, STATES
from .outcome import Outcome
from .scheduler import Scheduler
from .stats import ModelWindow, Snapshot, window

# Seconds. Generation is slow: whole requests run to minutes, first tokens to tens of seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The request paths counted in maclustr_requests_total (the model-serving API). Other paths
# (/health, /metrics, the page) are not model traffic.
API_ENDPOINTS = API_PATHS  # the inference endpoints (endpoints.py)


class SchedulerGauges(Collector):  # type: ignore[misc, unused-ignore]  # Any when untyped
    """queue_depth, in_flight, replica_up, replica_state and replica_restarts, computed from
    the live table and scheduler at scrape time. A replica is named by its index in its
    route's upstreams."""

    def __init__(self, table: Callable[[], RouteTable],
                 scheduler: Callable[[], Scheduler | None]) -> None:
        self._table = table
        self._scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("maclustr_queue_depth", "Requests waiting for a slot.",
                                  labels=["model"])
        flight = GaugeMetricFamily("maclustr_in_flight",
                                   "Requests holding a slot on a replica (every model that "
                                   "replica's server serves).", labels=["model", "replica"])
        up = GaugeMetricFamily("maclustr_replica_up",
                               "1 when the replica takes requests, 0 when it is out.",
                               labels=["model", "replica"])
        state = GaugeMetricFamily("maclustr_replica_state",
                                  "1 for the replica's state (up, suspect, wedged, "
                                  "restarting, down), 0 for the others.",
                                  labels=["model", "replica", "state"])
        restarts = CounterMetricFamily("maclustr_replica_restarts",
                                       "Restart commands run for a replica (reason: dead, "
                                       "wedged).", labels=["model", "replica", "reason"])
        sched = self._scheduler()
        if sched is not None:
            now = time.monotonic()
            for route in self._table().routes:
                depth.add_metric([route.alias], sched.queue_depth(route.alias))
                for i, (in_flight, usable) in enumerate(sched.replica_states(route)):
                    flight.add_metric([route.alias, str(i)], in_flight)
                    up.add_metric([route.alias, str(i)], 1 if usable else 0)
                for i, r in enumerate(map(sched.replica, route.upstreams)):
                    current = r.state(now)
                    for s in STATES:
                        state.add_metric([route.alias, str(i), s], 1 if s == current else 0)
                    for reason in REASONS:
                        restarts.add_metric([route.alias, str(i), reason],
                                            r.restarts.get(reason, 0))
        yield depth
        yield flight
        yield up
        yield state
        yield restarts


class KeyGauges(Collector):  # type: ignore[misc, unused-ignore]  # Any when untyped
    """maclustr_key_tokens_remaining: each key's tokens left today under its tokens_per_day
    (keys without one are not listed), computed at scrape time."""

    def __init__(self, names: Callable[[], Iterable[str]],
                 left: Callable[[str], int | None]) -> None:
        self._names = names
        self._left = left

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("maclustr_key_tokens_remaining",
                              "Tokens the key may still use today (tokens_per_day, UTC).",
                              labels=["key"])
        for name in self._names():
            left = self._left(name)
            if left is not None:
                g.add_metric([name], left)
        yield g


class Metrics:
    """The app's registry and every metric the gateway reports."""

    def __init__(self, table: Callable[[], RouteTable],
                 scheduler: Callable[[], Scheduler | None]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter("maclustr_requests", "API requests, by how they ended.",
                                ["model", "endpoint", "key", "code", "stream"], registry=r)
        self.duration = Histogram("maclustr_request_duration_seconds",
                                  "Request start to the last byte sent.",
                                  ["model", "endpoint", "stream"], buckets=DURATION_BUCKETS,
                                  registry=r)
        self.ttft = Histogram("maclustr_time_to_first_token_seconds",
                              "Streams: request start to the first data: event sent "
                              "(keepalive comments do not count).", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("maclustr_time_per_output_token_seconds",
                              "Streams: seconds per completion token after the first.",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.tokens = Counter("maclustr_tokens", "Tokens, as the upstream's usage reports "
                              "them.", ["model", "key", "type"], registry=r)
        self.queue_wait = Histogram("maclustr_queue_wait_seconds",
                                    "Seconds a request waited for a slot on a replica.",
                                    ["model"], buckets=QUEUE_BUCKETS, registry=r)
        self.failovers = Counter("maclustr_failovers", "Requests moved to another replica "
                                 "after one failed before answering.", ["model"], registry=r)
        self.rejections = Counter("maclustr_rejections", "Requests refused by the scheduler "
                                  "(queue_full, queue_timeout, unavailable).",
                                  ["model", "reason"], registry=r)
        self.disconnects = Counter("maclustr_client_disconnects", "Clients that left before "
                                   "the end (phase: request, queue, upstream, response).",
                                   ["model", "phase"], registry=r)
        self.reloads = Counter("maclustr_config_reloads", "routes.yaml reloads "
                               "(result: ok, error).", ["result"], registry=r)
        Info("maclustr_build", "The gateway's version.", registry=r).info(
            {"version": __version__})
        r.register(SchedulerGauges(table, scheduler))

    def observe(self, o: Outcome) -> None:
        """Count one finished request (the only way requests reach the metrics)."""
        if o.endpoint not in API_ENDPOINTS:
            return
        child = self._child
        stream = "true" if o.stream else "false"
        child(self.requests, o.model, o.endpoint, o.key, str(o.status), stream).inc()
        child(self.duration, o.model, o.endpoint, stream).observe(o.duration)
        if o.ttft is not None:
            child(self.ttft, o.model).observe(o.ttft)
        tpot = o.time_per_output_token
        if tpot is not None:
            child(self.tpot, o.model).observe(tpot)
        if o.prompt_tokens is not None and o.completion_tokens is not None:
            child(self.tokens, o.model, o.key, "prompt").inc(o.prompt_tokens)
            child(self.tokens, o.model, o.key, "completion").inc(o.completion_tokens)
        if o.queue_wait is not None:
            child(self.queue_wait, o.model).observe(o.queue_wait)
        if o.failovers:
            child(self.failovers, o.model).inc(o.failovers)
        if o.rejection is not None:
            child(self.rejections, o.model, o.rejection).inc()
        if o.client_gone:
            child(self.disconnects, o.model, o.phase).inc()

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once per label set: `labels()` validates and
        locks on every call, half of `observe`'s cost per request (issue 15). Label sets are
        bounded (aliases, key names, codes) and children are never removed."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "error").inc()


class LastMinute:
    """The front page's "last minute" per model, from this registry's own counters (the same
    arithmetic `maclustr top` applies to /metrics). `sample()` runs every SAMPLE seconds; the
    window is from the newest sample at least a minute old (or the start) to now."""

    SAMPLE = 5.0
    SPAN = 60.0

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._samples: deque[Snapshot] = deque([Snapshot(clock())])  # the start: all zero

    def _now(self) -> Snapshot:
        return Snapshot.from_families(self._metrics.registry.collect(), self._clock())

    def sample(self) -> None:
        snap = self._now()
        self._samples.append(snap)
        while len(self._samples) > 1 and self._samples[1].at <= snap.at - self.SPAN:
            self._samples.popleft()

    def figures(self, models: Iterable[str]) -> dict[str, ModelWindow]:
        now = self._now()
        base = self._samples[0]
        for s in self._samples:  # the newest sample at least SPAN old
            if s.at <= now.at - self.SPAN:
                base = s
        return {w.model: w for w in window(base, now, models)}
