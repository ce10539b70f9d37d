"""Per-model figures from two scrapes of the gateway's metrics: what `maclustr top` prints and
what the front page shows, computed the same way from the same counters.

Pure: a `Snapshot` is built from metric families, either parsed from /metrics text
(`prometheus_client.parser`, for `top`) or collected from the app's own registry (the page),
and `window(old, new)` turns two of them into rates and percentiles, as Prometheus's
`rate()` and `histogram_quantile()` would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelCounts:
    """Cumulative counters of one model at one moment, plus its gauges."""

    requests: float = 0.0
    errors: float = 0.0  # requests that did not end in 2xx
    completion_tokens: float = 0.0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    in_flight: float = 0.0
    queued: float = 0.0
    replicas: dict[str, str] = field(default_factory=dict)  # index -> state (self-healing)


@dataclass
class Snapshot:
    at: float  # seconds (any clock, the same for snapshots compared)
    models: dict[str, ModelCounts] = field(default_factory=dict)

    def model(self, name: str) -> ModelCounts:
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ModelCounts()
        return m

    @classmethod
    def from_families(cls, families: Iterable[Any], at: float) -> Snapshot:
        """From prometheus_client Metric objects (parsed text or `registry.collect()`)."""
        snap = cls(at)
        for fam in families:
            for s in fam.samples:
                name, labels, value = s.name, s.labels, s.value
                model = labels.get("model")
                if model is None or model == "-":
                    continue
                if name == "maclustr_requests_total":
                    m = snap.model(model)
                    m.requests += value
                    if not labels.get("code", "").startswith("2"):
                        m.errors += value
                elif name == "maclustr_tokens_total" and labels.get("type") == "completion":
                    snap.model(model).completion_tokens += value
                elif name == "maclustr_time_to_first_token_seconds_bucket":
                    le = float(labels["le"])
                    b = snap.model(model).ttft_buckets
                    b[le] = b.get(le, 0.0) + value
                elif name == "maclustr_in_flight":
                    snap.model(model).in_flight += value
                elif name == "maclustr_queue_depth":
                    snap.model(model).queued += value
                elif name == "maclustr_replica_state" and value == 1:
                    snap.model(model).replicas[labels.get("replica", "?")] = labels["state"]
        return snap

    @classmethod
    def from_text(cls, text: str, at: float) -> Snapshot:
        from prometheus_client.parser import text_string_to_metric_families

        return cls.from_families(text_string_to_metric_families(text), at)


@dataclass(frozen=True)
class ModelWindow:
    """One model over a window: rates, percentiles, and the gauges now."""

    model: str
    requests_per_min: float
    requests: float  # in the window
    ttft_p50: float | None  # seconds; None without streams in the window
    ttft_p95: float | None
    tokens_per_s: float
    in_flight: float
    queued: float
    errors: float  # in the window
    replicas: str = ""  # "2 up", "1 up, 1 restarting": replica states now


def replica_summary(states: dict[str, str]) -> str:
    """How many replicas are in each state, up first (e.g. "1 up, 1 wedged")."""
    counts: dict[str, int] = {}
    for s in sorted(states.values(), key=lambda s: (s != "up", s)):
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items()) or "-"


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """`histogram_quantile(q, ...)` over cumulative buckets (le -> count): linear within the
    bucket the rank falls in; the +Inf bucket answers its lower bound. None when empty."""
    if not buckets:
        return None
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in edges:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def window(old: Snapshot, new: Snapshot, models: Iterable[str] | None = None
           ) -> list[ModelWindow]:
    """Per model, what happened between two snapshots (models: these, in this order; default:
    every model either snapshot knows)."""
    seconds = max(new.at - old.at, 1e-9)
    names = list(models) if models is not None else sorted(set(old.models) | set(new.models))
    out = []
    for name in names:
        a = old.models.get(name, ModelCounts())
        b = new.models.get(name, ModelCounts())
        # A counter that went down is a restarted gateway: count from zero.
        fresh = b.requests < a.requests
        base = ModelCounts() if fresh else a
        delta = {le: n - base.ttft_buckets.get(le, 0.0) for le, n in b.ttft_buckets.items()}
        n = b.requests - base.requests
        out.append(ModelWindow(
            model=name, requests=n, requests_per_min=n * 60.0 / seconds,
            ttft_p50=quantile(0.5, delta), ttft_p95=quantile(0.95, delta),
            tokens_per_s=(b.completion_tokens - base.completion_tokens) / seconds,
            in_flight=b.in_flight, queued=b.queued, errors=b.errors - base.errors,
            replicas=replica_summary(b.replicas)))
    return out


def format_table(rows: list[ModelWindow], seconds: float) -> str:
    """The `maclustr top` table."""
    head = ("MODEL", "REQ/MIN", "TTFT P50", "TTFT P95", "TOK/S", "IN FLIGHT", "QUEUED",
            "ERRORS", "REPLICAS")
    lines = [head]
    for r in rows:
        lines.append((r.model, f"{r.requests_per_min:.1f}", _ms(r.ttft_p50), _ms(r.ttft_p95),
                      f"{r.tokens_per_s:.1f}", f"{r.in_flight:g}", f"{r.queued:g}",
                      f"{r.errors:g}", r.replicas or "-"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     for row in lines)
    return text + f"\n(last {seconds:.0f} s)"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"
