"""What every part of the bench shares: paths, the key, the fake's shape, the run's sizes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
RESULTS = BENCH / "results"
PY = sys.executable
MODEL = "/Users/admin/models/qwen3-coder-30b"
KEY = "bench-key-0123456789"
ALL_TARGETS = ["direct", "nginx", "caddy", "maclustr", "maclustr-metrics"]
# litellm: the Python proxy people compare with (slow; installed on first use);
# maclustr-quiet: --log-level warning (the access log's share); maclustr-asyncio: the
# standard event loop instead of uvloop (uvloop's share); pipe / pipe-2: the floor of any
# Python proxy, one or two processes (bench/pipe.py); maclustr-keys / maclustr-no-ledger:
# a `keys:` policy with the usage ledger, and neither (issue 28's cost)
EXTRA_TARGETS = ["litellm", "maclustr-quiet", "maclustr-asyncio", "pipe", "pipe-2",
                 "maclustr-keys", "maclustr-no-ledger"]
# (b): content events per stream, and how far apart the per-event-read upstream sends them
STREAM_CHUNKS = 64
TRICKLE_MS = 2.0
# (i): streams started at once, per burst; the burst upstream's events and pacing
BURST_STREAMS = 16
BURST_CHUNKS = 8
BURST_PACE_MS = 5.0
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sizes:
    """How long each measurement runs: full (make bench) or --quick."""

    rounds: int = 3
    wrk_s: float = 3.0
    seq_s: float = 2.0
    paced_streams: int = 48
    bursts: int = 20  # (i) bursts of BURST_STREAMS streams, one after another
    slow_streams: int = 1000
    slow_s: int = 30
    real_requests: int = 3
    real_tokens: int = 256
    queue_s: float = 10.0  # (g) how long the clients keep sending
    queue_clients: int = 32
    affinity_convs: int = 3  # (h) conversations, interleaved turn by turn
    affinity_turns: int = 6
    tail_s: float = 10.0  # (t) each wrk run: issue 25's 10 s at 1 and 16 connections
    wedges: int = 3  # (w) wedges one after another (issue 27)


QUICK = Sizes(rounds=1, wrk_s=1.0, seq_s=1.0, paced_streams=16, bursts=4, slow_streams=100,
              slow_s=3, tail_s=2.0, wedges=1,
              real_requests=1, real_tokens=64, queue_s=3.0, affinity_convs=2,
              affinity_turns=4)

# (g): the saturated upstream serves 2 streams at a time (20 events x 20 ms, ~0.4 s each);
# maclustr's route in front of it uses exactly these admission limits.
QUEUE_LIMITS = {"max_concurrency": 2, "max_queue": 16, "queue_timeout": 2}
QUEUE_MARGIN_S = 0.25  # how far past queue_timeout a wait may run before it counts as a miss
