"""How long the cyclic collector and anything else stop the event loop (issue 25).

Why: every request and stream on the loop waits out a pause, so the longest pause is the
tail latency everyone pays. Watched only when `MACLUSTR_PAUSES` names a file (the bench and
the collector test set it): `gc.callbacks` times each collection, a ticker every 10 ms
measures how late the loop runs it, and each SIGUSR1 appends one JSON line with the figures
since the line before, then starts a new window. Off by default: no callback, no ticker.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
from typing import Any

ENV = "MACLUSTR_PAUSES"
TICK_SECONDS = 0.01


class GcWindow:
    """Collections since the window opened: how many, how long, how many objects freed."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]  # per generation
        self.collected = 0
        self.longest_ms = 0.0  # wall clock: what the loop waited (preemption included)
        self.longest_cpu_ms = 0.0  # this thread's CPU: the collector's own work
        self.longest_gen = -1
        self.total_ms = 0.0

    def add(self, generation: int, ms: float, cpu_ms: float, collected: int) -> None:
        self.collections[generation] += 1
        self.collected += collected
        self.total_ms += ms
        self.longest_cpu_ms = max(self.longest_cpu_ms, cpu_ms)
        if ms > self.longest_ms:
            self.longest_ms, self.longest_gen = ms, generation

    def as_dict(self) -> dict[str, Any]:
        return {"collections": self.collections, "collected": self.collected,
                "longest_ms": round(self.longest_ms, 3),
                "longest_cpu_ms": round(self.longest_cpu_ms, 3),
                "longest_gen": self.longest_gen, "total_ms": round(self.total_ms, 3)}


class GcTimer:
    """A `gc.callbacks` hook: each collection's duration and yield into the current window."""

    def __init__(self) -> None:
        self.window = GcWindow()
        self._started = self._started_cpu = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            self._started_cpu = time.thread_time()
        else:
            ms = (time.perf_counter() - self._started) * 1e3
            cpu_ms = (time.thread_time() - self._started_cpu) * 1e3
            self.window.add(info["generation"], ms, cpu_ms, info["collected"])

    def take(self) -> GcWindow:
        w, self.window = self.window, GcWindow()
        return w


class LagTicker:
    """Wakes every TICK_SECONDS and keeps the longest lateness: the loop's longest stall."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.longest_ms = 0.0
        self._due = loop.time() + TICK_SECONDS
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        lag = (now - self._due) * 1e3
        if lag > self.longest_ms:
            self.longest_ms = lag
        self._due = now + TICK_SECONDS
        self._handle = self._loop.call_at(self._due, self._tick)

    def take(self) -> float:
        ms, self.longest_ms = self.longest_ms, 0.0
        return ms

    def restart(self) -> None:
        """Count from now (a stall the report itself caused belongs to no window)."""
        self._handle.cancel()
        self.longest_ms = 0.0
        self._due = self._loop.time() + TICK_SECONDS
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        self._handle.cancel()


class PauseWatch:
    """The collector's timer, the loop's ticker, and the SIGUSR1 report to `path`."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.gc = GcTimer()
        self.lag = LagTicker(loop)
        self._opened = time.monotonic()
        gc.callbacks.append(self.gc)
        loop.add_signal_handler(signal.SIGUSR1, self.report)
        self.report()  # the first line says the watch is on (the bench waits for it)

    def report(self) -> None:
        """One line for the window that ends now; then a forced full collection, whose
        count says what cyclic garbage was still waiting (not part of any window)."""
        now = time.monotonic()
        line: dict[str, Any] = {"seconds": round(now - self._opened, 3),
                                "gc": self.gc.take().as_dict(),
                                "loop_longest_lag_ms": round(self.lag.take(), 3)}
        gc.callbacks.remove(self.gc)
        started = time.perf_counter()
        try:
            line["forced_collected"] = gc.collect()
        finally:
            gc.callbacks.append(self.gc)
        line["forced_ms"] = round((time.perf_counter() - started) * 1e3, 3)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        self.lag.restart()  # the forced collection's own stall is no request's
        self._opened = time.monotonic()

    def stop(self) -> None:
        self.lag.stop()
        if self.gc in gc.callbacks:
            gc.callbacks.remove(self.gc)


def watch_from_env(loop: asyncio.AbstractEventLoop) -> PauseWatch | None:
    path = os.environ.get(ENV)
    return PauseWatch(path, loop) if path else None
