"""Side-by-side benchmark of maclustr against direct, nginx, Caddy and LiteLLM (issue 6).

Why: a gateway exists to add nothing. Every figure here is taken in one run, rounds
interleaved across targets (direct, nginx, caddy, litellm, maclustr, direct, ...), and
reported as a ratio to direct from the same run, because this 2-core machine is noisy.
The headline is CPU per unit of work (the target's own CPU seconds from /proc divided by
requests or events served): it repeats within ~10% where throughput ratios move by ~0.1.

Placement (see Pinning): by default the load generator (wrk, this process's aiohttp client)
and the fake upstreams share the first CPU and the target process(es) get the second.

Scenarios: (a) unary chat via wrk, c=64 and c=16 (req/s, p50/p99) and c=1 (added latency);
(b) 64-chunk streams, unpaced, c=16 via wrk (streams/s, chunks/s); (c) 64-chunk streams
paced 20 ms, c=16 via aiohttp (TTFB p50/p99, added per-chunk latency vs direct); (d) N slow
streams at 1 chunk/s (RSS, CPU, all complete); (e) CPU microseconds per relayed event (from
b) and per unary request (from a); (f) the real tiny mlx_lm.server through maclustr vs direct;
(g) queueing (issue 7): 32 clients against an upstream that serves 2 streams at a time, maclustr
with max_concurrency 2 / max_queue 16 / queue_timeout 2 (completed, p50/p99, 429s with
Retry-After, longest wait vs queue_timeout), direct as the no-queue reference; (h) prompt-cache
affinity: two real tiny mlx_lm.server replicas behind one maclustr, TTFT of later conversation
turns with affinity vs round-robin, with the replicas' cached_tokens.

Run: `make bench` (full, < 8 min), `python bench/run.py --quick` (seconds),
`--only maclustr,direct`, `--scenarios a,b,e`, `--http11` (keep-alive upstream),
`--placement upstream-with-target`, `--profile` (py-spy of maclustr, not counted).
Every process started here is stopped by PID; every loop and wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maclustr.harness import free_port

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
# Python proxy, one or two processes (bench/pipe.py)
EXTRA_TARGETS = ["litellm", "maclustr-quiet", "maclustr-asyncio", "pipe", "pipe-2"]
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


QUICK = Sizes(rounds=1, wrk_s=1.0, seq_s=1.0, paced_streams=16, bursts=4, slow_streams=100,
              slow_s=3, tail_s=2.0,
              real_requests=1, real_tokens=64, queue_s=3.0, affinity_convs=2,
              affinity_turns=4)

# (g): the saturated upstream serves 2 streams at a time (20 events x 20 ms, ~0.4 s each);
# maclustr's route in front of it uses exactly these admission limits.
QUEUE_LIMITS = {"max_concurrency": 2, "max_queue": 16, "queue_timeout": 2}
QUEUE_MARGIN_S = 0.25  # how far past queue_timeout a wait may run before it counts as a miss


# ---------------------------------------------------------------- processes and /proc


def descendants(pid: int) -> list[int]:
    """pid and all its live descendants (nginx workers, uvicorn children)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    for _ in range(10000):
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of every process in the trees rooted at pids (plus reaped children)."""
    total = 0
    for root in pids:
        for p in descendants(root):
            try:
                f = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            parts = f[f.rfind(")") + 2:].split()
            total += int(parts[11]) + int(parts[12]) + int(parts[13]) + int(parts[14])
    return total / TICK


def settle(pids: list[int], limit: float = 15.0) -> float:
    """Wait (bounded) until the target is idle, so the backlog a slow target still works on
    after the load stopped is not charged to the next measurement. Returns seconds waited."""
    t0 = time.monotonic()
    if not pids:
        return 0.0
    for _ in range(int(limit / 0.2) + 1):
        c0 = cpu_seconds(pids)
        time.sleep(0.2)
        if cpu_seconds(pids) - c0 < 0.02 or time.monotonic() - t0 > limit:
            break
    return time.monotonic() - t0


def mem_kb(pids: list[int], key: str) -> int:
    """Sum of a /proc/<pid>/status field (VmHWM, VmRSS) over the trees rooted at pids."""
    total = 0
    for root in pids:
        for p in descendants(root):
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
            except OSError:
                continue
    return total


class Pinning:
    """Which CPUs the load generator, the upstreams and the target may use.

    none (default, the faithful regime): everything floats, as on the Mac that runs it all.
    split: load + upstreams | target. The target never competes with the load,
      but a proxy that coalesces the upstream's small writes saves the load CPU work, so
      stream throughput can exceed 1.0x direct (it means: the target is not the limit).
    upstream-with-target: load | upstreams + target. Direct is then the upstream's own
      limit, and a target's ratio shows how much CPU it takes from the upstream's machine
      (the Mac that also runs the model).
    """

    def __init__(self, placement: str) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.placement = placement if len(cpus) >= 2 else "none"
        half = max(1, len(cpus) // 2)
        a, b = set(cpus[:half]), set(cpus[half:])
        if self.placement == "split":
            self.load, self.upstream, self.target = a, a, b
        elif self.placement == "upstream-with-target":
            self.load, self.upstream, self.target = a, b, b
        else:
            self.load = self.upstream = self.target = set(cpus)

    def describe(self) -> str:
        if self.placement == "none":
            return "no CPU pinning"
        return (f"placement {self.placement}: load generator on CPU {sorted(self.load)}, fake "
                f"upstreams on CPU {sorted(self.upstream)}, target on CPU {sorted(self.target)}")

    def preexec(self, side: str) -> Callable[[], None]:
        cpus = {"load": self.load, "upstream": self.upstream, "target": self.target}[side]
        return lambda: os.sched_setaffinity(0, cpus)


@dataclass
class Proc:
    """A child process we started; stopped by its PID only."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-600:]

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            # kill the tree we started (e.g. nginx workers) by PID, then the root
            for p in reversed(descendants(self.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            self.popen.wait(timeout=grace)


def spawn(name: str, cmd: list[str], pin: Pinning, side: str,
          env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
    log = WORK / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                 preexec_fn=pin.preexec(side))
    return Proc(name, popen, log)


def wait_http(url: str, proc: Proc | None, timeout: float) -> None:
    """Poll url until it answers any HTTP status; raise if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    for _ in range(int(timeout / 0.1) + 1):
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as e:
            last = repr(e)
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s: {last}")


def try_apt(package: str, binary: str) -> str | None:
    """Install a Debian package if its binary is missing (root + apt only). None on success."""
    if shutil.which(binary):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} not installed (apt-get install {package} needs root)"
    print(f"  installing {package} (apt-get, up to 180 s) ...", flush=True)
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True,
                           timeout=180, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except subprocess.TimeoutExpired:
        return f"apt-get install {package} timed out"
    if r.returncode != 0 or not shutil.which(binary):
        err = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        return f"apt-get install {package} failed: {err[0][:200]}"
    return None


def version_of(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e.__class__.__name__})"
    out = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()
    return out[0] if out else "?"


# ---------------------------------------------------------------- upstreams and targets


@dataclass
class Upstreams:
    """The fake upstreams (fast / paced / slow) and optionally the real tiny mlx_lm.server."""

    ports: dict[str, int] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    real_port: int | None = None
    real_model: str = ""
    real_error: str | None = None

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.ports[kind]}"


def internal_model(kind: str) -> str:
    """maclustr's internal id for one fake upstream (one alias per internal id), which that
    fake echoes in every answer as mlx_lm.server echoes the id it was asked for (an answer
    naming another id would send every event down the JSON path)."""
    return MODEL if kind == "fast" else f"{MODEL}-{kind}"


def start_upstreams(pin: Pinning, sizes: Sizes, http11: bool, chunk_size: int = 8,
                    queue: bool = False, compact: bool = False) -> Upstreams:
    ups = Upstreams()
    chunks = str(STREAM_CHUNKS)
    specs = {"fast": ["--chunks", chunks, "--chunk-size", str(chunk_size)],
             # one write per event, TRICKLE_MS apart: each event is its own read, as from
             # mlx_lm.server (a token at a time), the faithful regime for CPU per event
             "trickle": ["--chunks", chunks, "--chunk-size", str(chunk_size), "--pace-ms",
                         str(TRICKLE_MS)],
             "paced": ["--chunks", chunks, "--pace-ms", "20", "--stamp"],
             "burst": ["--chunks", str(BURST_CHUNKS), "--pace-ms", str(BURST_PACE_MS),
                       "--stamp"],
             "slow": ["--chunks", str(sizes.slow_s + 1), "--pace-ms", "1000"]}  # lasts slow_s
    if queue:  # (g): at most 2 streams at a time, ~0.4 s each
        specs["queue"] = ["--chunks", "20", "--pace-ms", "20",
                          "--max-concurrent", str(QUEUE_LIMITS["max_concurrency"])]
    for kind, extra in specs.items():
        port = free_port()
        cmd = [PY, str(BENCH / "upstream.py"), "--port", str(port), "--model",
               internal_model(kind), *extra]
        if http11:
            cmd.append("--http11")
        if compact:
            cmd.append("--compact")
        proc = spawn(f"upstream-{kind}", cmd, pin, "upstream")
        ups.ports[kind] = port
        ups.procs.append(proc)
    for kind, proc in zip(specs, ups.procs, strict=True):
        wait_http(ups.url(kind) + "/health", proc, 15)
    return ups


def build_tiny_model() -> Path:
    """The tiny model's directory, built once, outside this process (build_in_child says
    why: this load generator must keep its open-file limit for (d)'s streams)."""
    from maclustr.harness import build_in_child

    model_dir = WORK / "tiny-model"
    build_in_child([(model_dir, 0)])
    return model_dir


def start_real_mlx(ups: Upstreams, pin: Pinning) -> None:
    """The real tiny mlx_lm.server for (f), built with maclustr.harness.tiny_model."""
    try:
        from maclustr.harness import mlx_server as real_mlx
    except ImportError as e:
        ups.real_error = f"cannot import maclustr.harness: {e}"
        return
    try:
        model_dir = build_tiny_model()
        port = free_port()
        log = WORK / "logs" / "mlx-real.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, pin.upstream)
        try:
            popen = real_mlx.start_mlx_server(model_dir, port, log)
        finally:
            os.sched_setaffinity(0, old)
        proc = Proc("mlx-real", popen, log)
        ups.procs.append(proc)
        real_mlx.wait_healthy(f"http://127.0.0.1:{port}", timeout=60, proc=popen)
        ups.real_port, ups.real_model = port, str(model_dir)
    except Exception as e:
        ups.real_error = f"real mlx_lm.server unavailable: {e!r}"[:300]


@dataclass
class Target:
    """One thing clients talk to: where, with which model name and headers."""

    name: str
    urls: dict[str, str] = field(default_factory=dict)  # upstream kind -> base URL
    models: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    error: str | None = None
    note: str = ""
    health: str = "/health"
    metrics: bool = False  # serves /metrics (maclustr-metrics): scraped once after the run
    # hands the fake's HTTP/1.0 answers to the client as they are (direct, the byte pipes):
    # wrk counts each close-delimited end as a read error, which is then no anomaly
    raw_framing: bool = False
    # maclustr's MACLUSTR_PAUSES file (maclustr/pauses.py): a build that writes it answers
    # SIGUSR1 with its collector and loop pauses since the last signal; others are not asked
    pauses: Path | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def pause_window(self) -> dict[str, float]:
        """Close the target's pause window (maclustr builds with pauses.py): the longest
        collector pause, collections and objects freed, longest loop lag since the last call."""
        path = self.pauses
        if path is None or not path.exists() or not self.procs:
            return {}
        seen = len(path.read_text().splitlines())
        os.kill(self.procs[0].pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = path.read_text().splitlines()
            if len(lines) > seen and lines[-1].endswith("}"):
                w = json.loads(lines[-1])
                return {"gc_longest_ms": w["gc"]["longest_ms"],
                        "gc_longest_cpu_ms": w["gc"].get("longest_cpu_ms", math.nan),
                        "gc_collections": float(sum(w["gc"]["collections"])),
                        "gc_collected": float(w["gc"]["collected"]),
                        "loop_lag_ms": w["loop_longest_lag_ms"]}
            time.sleep(0.02)
        return {}


def start_direct(ups: Upstreams, pin: Pinning, http11: bool) -> Target:
    t = Target("direct", note="client -> fake upstream", raw_framing=True)
    for kind in ups.ports:
        t.urls[kind] = ups.url(kind)
        t.models[kind] = MODEL
    if ups.real_port:
        t.urls["real"] = f"http://127.0.0.1:{ups.real_port}"
        t.models["real"] = ups.real_model
    return t


def start_nginx(ups: Upstreams, pin: Pinning, http11: bool) -> Target:
    t = Target("nginx")
    if (err := try_apt("nginx-light", "nginx")) is not None:
        t.error = err
        return t
    d = WORK / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ups.ports}
    up_blocks, servers = [], []
    for k, port in ports.items():
        keep = "keepalive 64;" if http11 else ""
        up_blocks.append(f"upstream u_{k} {{ server 127.0.0.1:{ups.ports[k]}; {keep} }}")
        proto = ("proxy_http_version 1.1; proxy_set_header Connection \"\";" if http11
                 else "proxy_http_version 1.0;")
        servers.append(f"server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ "
                       f"proxy_pass http://u_{k}; proxy_buffering off; {proto} }} }}")
        t.urls[k] = f"http://127.0.0.1:{port}"
        t.models[k] = MODEL
    user = "user root;" if os.geteuid() == 0 else ""
    conf = f"""{user}
daemon off; master_process on; worker_processes 1; worker_rlimit_nofile 16384;
pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {' '.join(up_blocks)}
  {' '.join(servers)}
}}
"""
    (d / "nginx.conf").write_text(conf)
    t.procs.append(spawn("nginx", ["nginx", "-p", str(d), "-e", str(d / "error.log"),
                                   "-c", str(d / "nginx.conf")], pin, "target"))
    t.note = "1 worker, proxy_buffering off, access_log off"
    return t


def start_caddy(ups: Upstreams, pin: Pinning, http11: bool) -> Target:
    t = Target("caddy")
    if (err := try_apt("caddy", "caddy")) is not None:
        t.error = err
        return t
    d = WORK / "caddy"
    d.mkdir(parents=True, exist_ok=True)
    sites = []
    for k in ups.ports:
        port = free_port()
        sites.append(f"http://127.0.0.1:{port} {{\n  reverse_proxy 127.0.0.1:{ups.ports[k]} "
                     f"{{\n    flush_interval -1\n  }}\n}}")
        t.urls[k] = f"http://127.0.0.1:{port}"
        t.models[k] = MODEL
    (d / "Caddyfile").write_text("{\n  admin off\n  auto_https off\n}\n" + "\n".join(sites)
                                 + "\n")
    env = dict(os.environ, GOMAXPROCS="1", HOME=str(d), XDG_DATA_HOME=str(d / "data"),
               XDG_CONFIG_HOME=str(d / "config"))
    t.procs.append(spawn("caddy", ["caddy", "run", "--config", str(d / "Caddyfile"),
                                   "--adapter", "caddyfile"], pin, "target", env=env))
    t.note = "GOMAXPROCS=1, flush_interval -1"
    return t


LITELLM_VENV = WORK / "litellm-venv"


def ensure_litellm(timeout: float) -> str | None:
    """Install litellm[proxy] in its own venv on first use. None when ready, else why not."""
    marker = LITELLM_VENV / ".bench-installed"
    if marker.exists():
        return None
    print(f"  installing litellm[proxy] into {LITELLM_VENV} (up to {timeout:.0f} s) ...",
          flush=True)
    log = WORK / "logs" / "litellm-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not (LITELLM_VENV / "bin" / "python").exists():
            subprocess.run([PY, "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120,
                           capture_output=True)
        with open(log, "wb") as fh:
            r = subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q",
                                "litellm[proxy]"], stdout=fh, stderr=subprocess.STDOUT,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"pip install litellm[proxy] exceeded {timeout:.0f} s (see {log})"
    except (OSError, subprocess.CalledProcessError) as e:
        return f"cannot create the litellm venv: {e}"
    if r.returncode != 0:
        return f"pip install litellm[proxy] failed (rc {r.returncode}, see {log})"
    marker.touch()
    return None


def start_litellm(ups: Upstreams, pin: Pinning, http11: bool,
                  install_timeout: float = 300.0) -> Target:
    t = Target("litellm")
    if (err := ensure_litellm(install_timeout)) is not None:
        t.error = err
        return t
    d = WORK / "litellm"
    d.mkdir(parents=True, exist_ok=True)
    lines = ["model_list:"]
    for k in ups.ports:
        lines += [f"  - model_name: bench-{k}", "    litellm_params:",
                  "      model: openai/qwen3-coder-30b",
                  f"      api_base: {ups.url(k)}/v1", "      api_key: sk-bench"]
        t.models[k] = f"bench-{k}"
    lines += ["litellm_settings:", "  telemetry: false", "  drop_params: true",
              "  request_timeout: 120", "general_settings:", f"  master_key: sk-{KEY}"]
    (d / "config.yaml").write_text("\n".join(lines) + "\n")
    port = free_port()
    for k in ups.ports:
        t.urls[k] = f"http://127.0.0.1:{port}"
    env = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
               DISABLE_SCHEMA_UPDATE="True", HOME=str(d))
    t.procs.append(spawn("litellm", [str(LITELLM_VENV / "bin" / "litellm"), "--config",
                                     str(d / "config.yaml"), "--host", "127.0.0.1", "--port",
                                     str(port), "--num_workers", "1"], pin, "target", env=env))
    t.headers = {"Authorization": f"Bearer sk-{KEY}"}
    t.note = "1 worker, openai/ model at the fake, master_key (no DB)"
    t.health = "/health/liveliness"  # /health would call every upstream
    return t


def start_maclustr(ups: Upstreams, pin: Pinning, http11: bool, quiet: bool = False,
                   loop: str = "auto", metrics: bool = False,
                   tree: Path | None = None) -> Target:
    name = ("maclustr-quiet" if quiet else "maclustr-asyncio" if loop == "asyncio"
            else "maclustr-metrics" if metrics else "maclustr-baseline" if tree
            else "maclustr")
    t = Target(name)
    exe = Path(PY).parent / "maclustr"
    if not exe.exists():
        t.error = f"{exe} not found (run `make install`)"
        return t
    # maclustr-baseline: the same venv running another checkout's code (its tree first on
    # the path), so two commits are measured side by side in one run
    run_env = dict(os.environ, MACLUSTR_API_KEY=KEY)
    maclustr = [str(exe)]
    if tree is not None:
        if not (tree / "maclustr" / "__init__.py").exists():
            t.error = f"--baseline {tree}: no maclustr package there"
            return t
        maclustr = [PY, "-m", "maclustr"]
        run_env["PYTHONPATH"] = str(tree)
        commit = version_of(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
        t.note += f"baseline {tree} at {commit}; "
    d = WORK / name
    d.mkdir(parents=True, exist_ok=True)
    lines = ["models:"]
    for k in ups.ports:
        model = internal_model(k)
        lines += [f"  bench-{k}:", f"    model: {model}", f"    upstream: {ups.url(k)}"]
        t.models[k] = f"bench-{k}"
    if ups.real_port:
        lines += ["  bench-real:", f"    model: {ups.real_model}",
                  f"    upstream: http://127.0.0.1:{ups.real_port}"]
        t.models["real"] = "bench-real"
    routes = d / "routes.yaml"
    # The fake upstreams take any concurrency: lift the per-replica admission limit (mlx's
    # decode-concurrency default) so the relay, not the queue, is measured; the real
    # mlx_lm.server (bench-real, last) keeps the product's defaults. Builds without these
    # keys get the plain file.
    lift = ["    max_concurrency: 100000", "    max_queue: 100000"]
    queue_url = ups.url("queue") if "queue" in ups.ports else None
    lifted: list[str] = []
    for line in lines:
        lifted.append(line)
        if queue_url and line == f"    upstream: {queue_url}":  # (g) measures admission
            lifted += [f"    {k}: {v}" for k, v in QUEUE_LIMITS.items()]
        elif line.startswith("    upstream: ") and not line.endswith(f":{ups.real_port}"):
            lifted += lift
    routes.write_text("\n".join(lifted) + "\n")
    check = subprocess.run([*maclustr, "check", "--routes", str(routes)], capture_output=True,
                           timeout=30, env=run_env, cwd=tree)
    if check.returncode != 0:
        lifted = lines
        t.note += "admission limits: build default; "
    else:
        t.note += "admission limits lifted (max_concurrency/max_queue 100000); "
    # Metrics (issue 12: `gateway.metrics`, on by default where the build has it): off for
    # `maclustr` (the relay alone), on for `maclustr-metrics`, /metrics then scraped once at
    # the end to prove it counted. A build without the key: `maclustr-metrics` is not run.
    gateway = ["gateway:", f"  metrics: {'true' if metrics else 'false'}",
               "  metrics_public: true"] if metrics else ["gateway:", "  metrics: false"]
    routes.write_text("\n".join(lifted + gateway) + "\n")
    check = subprocess.run([*maclustr, "check", "--routes", str(routes)], capture_output=True,
                           timeout=30, env=run_env, cwd=tree)
    if check.returncode != 0:
        if metrics:
            t.error = "this build has no metrics (gateway.metrics is not a known setting)"
            return t
        routes.write_text("\n".join(lifted) + "\n")
        t.note += "no metrics in this build; "
    else:
        t.note += f"gateway.metrics {'on' if metrics else 'off'}; "
        if metrics:
            t.metrics = True
    port = free_port()
    for k in t.models:
        t.urls[k] = f"http://127.0.0.1:{port}"
    t.headers = {"Authorization": f"Bearer {KEY}"}
    cmd = [*maclustr, "serve", "--routes", str(d / "routes.yaml"), "--port", str(port)]
    if quiet:
        cmd += ["--log-level", "warning"]
    if loop != "auto":
        cmd += ["--loop", loop]
    t.pauses = d / "pauses.jsonl"  # collector and loop pauses (issue 25), where the build has it
    t.pauses.unlink(missing_ok=True)
    t.procs.append(spawn(name, cmd, pin, "target", env=dict(run_env,
                                                             MACLUSTR_PAUSES=str(t.pauses)),
                         cwd=tree))
    t.note += "`maclustr serve`" + (" --log-level warning" if quiet else " (info: access log)")
    t.note += f" --loop {loop}" if loop != "auto" else ""
    return t


def start_pipe(ups: Upstreams, pin: Pinning, http11: bool, workers: int = 1) -> Target:
    """The floor of any Python proxy (pipe.py): `workers` byte-pipe processes per port."""
    t = Target("pipe" if workers == 1 else f"pipe-{workers}",
               note=f"{workers} × bench/pipe.py: uvloop byte pipe, no HTTP parsing",
               raw_framing=True)
    for k in ups.ports:
        port = free_port()
        for i in range(workers):
            t.procs.append(spawn(f"{t.name}-{k}-{i}", [PY, str(BENCH / "pipe.py"), "--port",
                                                     str(port), "--upstream-port",
                                                     str(ups.ports[k])], pin, "target"))
        t.urls[k] = f"http://127.0.0.1:{port}"
        t.models[k] = MODEL
    return t


STARTERS: dict[str, Callable[..., Target]] = {
    "direct": start_direct, "nginx": start_nginx, "caddy": start_caddy,
    "litellm": start_litellm, "maclustr": start_maclustr,
    "maclustr-quiet": lambda u, p, h: start_maclustr(u, p, h, quiet=True),
    "maclustr-asyncio": lambda u, p, h: start_maclustr(u, p, h, loop="asyncio"),
    "maclustr-metrics": lambda u, p, h: start_maclustr(u, p, h, metrics=True),
    "pipe": start_pipe, "pipe-2": lambda u, p, h: start_pipe(u, p, h, workers=2),
}


def body(model: str, stream: bool, max_tokens: int | None = None) -> bytes:
    obj: dict[str, Any] = {"model": model,
                           "messages": [{"role": "user", "content": "Say hello."}]}
    if stream:
        obj["stream"] = True
    if max_tokens:
        obj["max_tokens"] = max_tokens
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- sanity check


async def sanity(t: Target) -> None:
    """One unary and one stream through the target, parsed: a broken relay must not score."""
    import aiohttp

    url = t.urls["fast"] + "/v1/chat/completions"
    hdrs = {"Content-Type": "application/json", **t.headers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.post(url, data=body(t.models["fast"], False), headers=hdrs) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"unary HTTP {r.status}: {raw[:200]!r}")
            obj = json.loads(raw)
            if not obj["choices"][0]["message"]["content"]:
                raise RuntimeError("unary answer has no content")
            t.note += f"; client sees model={obj.get('model')!r}"
        async with s.post(url, data=body(t.models["fast"], True), headers=hdrs) as r:
            raw = await r.read()
            if r.status != 200:
                raise RuntimeError(f"stream HTTP {r.status}: {raw[:200]!r}")
            events = [e[6:] for e in raw.replace(b"\r\n", b"\n").split(b"\n\n")
                      if e.startswith(b"data: ")]
            if not events or events[-1] != b"[DONE]":
                raise RuntimeError(f"stream did not end with [DONE]: {raw[-120:]!r}")
            chunks = [json.loads(e) for e in events[:-1]]
            content = sum(1 for c in chunks if c.get("choices")
                          and c["choices"][0].get("delta", {}).get("content"))
            if content != STREAM_CHUNKS - 1:
                raise RuntimeError(f"stream relayed {content} content chunks, "
                                   f"expected {STREAM_CHUNKS - 1}")


# ---------------------------------------------------------------- load generators


WRK_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  io.write(string.format("TAIL mean=%d p999=%d max=%d\\n", latency.mean,
                         latency:percentile(99.9), latency.max))
end
"""


def lua_script(t: Target, kind: str, stream: bool) -> Path:
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in t.headers.items())
    p = WORK / "lua" / f"{t.name}-{kind}-{'stream' if stream else 'unary'}.lua"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(WRK_LUA.format(body=json.dumps(body(t.models[kind], stream).decode()),
                                headers=hdrs))
    return p


def parse_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", s)
    if not m:
        return math.nan
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(t: Target, kind: str, stream: bool, conns: int, seconds: float,
            pin: Pinning) -> dict[str, float]:
    """wrk against the target, with the target's CPU seconds over the same window."""
    script = lua_script(t, kind, stream)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "10s", "-s", str(script), t.urls[kind] + "/v1/chat/completions"]
    t.pause_window()  # opens a window for this run (and forces a collection before it)
    cpu0 = cpu_seconds(t.pids)
    r = subprocess.run(cmd, capture_output=True, timeout=seconds + 60,
                       preexec_fn=pin.preexec("load"))
    cpu = cpu_seconds(t.pids) - cpu0
    out = r.stdout.decode(errors="replace")
    res: dict[str, float] = {"cpu_s": cpu, **t.pause_window(), "settle_s": settle(t.pids)}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", out):
        res["requests"] = float(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.M):
            res[f"p{pct}_ms"] = parse_ms(m.group(1))
    if m := re.search(r"^TAIL mean=(\d+) p999=(\d+) max=(\d+)", out, re.M):  # µs, from done()
        res["mean_ms"], res["p999_ms"], res["max_ms"] = (int(v) / 1e3 for v in m.groups())
    res["non2xx"] = float(m.group(1)) if (m := re.search(r"Non-2xx.*?(\d+)", out)) else 0.0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        res["connect_err"], res["read_err"] = float(m.group(1)), float(m.group(2))
        res["timeouts"] = float(m.group(4))
    if "rps" not in res:
        raise RuntimeError(f"wrk failed: {(out + r.stderr.decode())[-300:]}")
    if res.get("requests"):
        res["cpu_us_per_req"] = cpu / res["requests"] * 1e6
    return res


@dataclass
class StreamResult:
    ok: bool
    ttfb: float = math.nan  # seconds to the first data event
    times: list[float] = field(default_factory=list)  # seconds from send, per data event
    relay: list[float] = field(default_factory=list)  # arrival - upstream send stamp, s
    error: str = ""


STAMP = re.compile(rb'"content": ?"T(\d+\.\d+)"')


async def one_stream(session: Any, url: str, data: bytes, headers: dict[str, str],
                     expect: int) -> StreamResult:
    """Send one streaming request; timestamp every `data:` event as it arrives."""
    t0 = time.monotonic()
    times: list[float] = []
    relay: list[float] = []
    buf = b""
    try:
        async with session.post(url, data=data, headers=headers) as r:
            if r.status != 200:
                return StreamResult(False, error=f"HTTP {r.status}")
            done = False
            async for piece in r.content.iter_any():
                arrival = time.monotonic()
                now = arrival - t0
                buf += piece
                if b"\n\n" not in buf:
                    continue
                *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
                for ev in events:
                    if ev.startswith(b"data: "):
                        if ev == b"data: [DONE]":
                            done = True
                        else:
                            times.append(now)
                            if m := STAMP.search(ev):
                                relay.append(arrival - float(m.group(1)))
    except Exception as e:
        return StreamResult(False, times=times, error=repr(e)[:120])
    if not done or len(times) < expect:
        return StreamResult(False, times=times,
                            error=f"incomplete: {len(times)} events, done={done}")
    return StreamResult(True, ttfb=times[0], times=times, relay=relay)


async def stream_load(t: Target, kind: str, total: int, conc: int, expect: int,
                      sample: Callable[[], None] | None = None,
                      max_tokens: int | None = None, stagger: float = 0.0
                      ) -> list[StreamResult]:
    """total streams, conc at a time, through one aiohttp session (keep-alive).

    stagger: worker k starts k*stagger s late, so TTFB is measured in a steady state,
    not in a burst of simultaneous connects."""
    import aiohttp

    url = t.urls[kind] + "/v1/chat/completions"
    data = body(t.models[kind], True, max_tokens)
    hdrs = {"Content-Type": "application/json", **t.headers}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    left = [total]

    async def worker(k: int) -> list[StreamResult]:
        if stagger:
            await asyncio.sleep(k * stagger)
        out = []
        for _ in range(total):
            if left[0] <= 0:
                break
            left[0] -= 1
            out.append(await one_stream(s, url, data, hdrs, expect))
        return out

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        tasks = [asyncio.ensure_future(worker(k)) for k in range(min(conc, total))]
        if sample is not None:
            pending = set(tasks)
            for _ in range(100000):
                _, pending = await asyncio.wait(pending, timeout=0.5)
                sample()
                if not pending:
                    break
        return [r for rs in await asyncio.gather(*tasks) for r in rs]


def rotated(items: list[Target], k: int) -> list[Target]:
    """items started at k: each round starts with another target, so none of them always
    follows the same one (in (f), whichever target ran second after direct was ~3 % slower
    in every round of two runs: the position, not the target)."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def med(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


# ---------------------------------------------------------------- scenarios


def scenario_a(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in (64, 16):
        r = run_wrk(t, "fast", False, c, sizes.wrk_s, pin)
        for k, v in r.items():
            out[f"c{c}_{k}"] = v
    r = run_wrk(t, "fast", False, 1, sizes.seq_s, pin)
    out["c1_p50_ms"] = r.get("p50_ms", math.nan)
    out["c1_rps"] = r["rps"]
    return out


def scenario_t(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    """Issue 25's tail: unary through wrk for tail_s at 1 and 16 keep-alive connections:
    mean, p99, p99.9, max, and (maclustr) the longest collector pause and loop lag."""
    out: dict[str, float] = {}
    for c in (1, 16):
        r = run_wrk(t, "fast", False, c, sizes.tail_s, pin)
        out.update({f"c{c}_{k}": v for k, v in r.items()})
    return out


def scenario_b(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    """Streams through wrk. Faithful (the headline): the `trickle` upstream, one write per
    event TRICKLE_MS apart, so every event is its own read, c=32. Batched (secondary): the
    unpaced `fast` upstream, whose writes coalesce into large reads, c=16.
    CPU per event counts each stream's events (64 chunks + `[DONE]`); streams still open when
    wrk stops (≤ c, ~2 % of a 3 s run) are charged but not counted, for every target alike."""
    events = STREAM_CHUNKS + 1
    r = run_wrk(t, "trickle", True, 32, sizes.wrk_s, pin)
    out = {f"trickle_{k}": v for k, v in r.items()}
    if r.get("requests"):
        out["cpu_us_per_event"] = r["cpu_s"] / (r["requests"] * events) * 1e6
    r = run_wrk(t, "fast", True, 16, sizes.wrk_s, pin)
    out.update({f"c16_{k}": v for k, v in r.items()})
    out["streams_s"] = r["rps"]
    out["chunks_s"] = r["rps"] * STREAM_CHUNKS
    if r.get("requests"):
        out["batched_cpu_us_per_event"] = r["cpu_s"] / (r["requests"] * events) * 1e6
    return out


def scenario_c(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    cpu0 = cpu_seconds(t.pids)
    # 16 workers, starts spread over one stream's length (64 x 20 ms)
    results = asyncio.run(stream_load(t, "paced", sizes.paced_streams, 16, 64,
                                      stagger=1.3 / 16))
    cpu = cpu_seconds(t.pids) - cpu0
    ok = [r for r in results if r.ok]
    lag = [x for r in ok for x in r.relay]
    ttfb = [r.ttfb * 1e3 for r in ok]
    return {"streams": float(len(results)), "complete": float(len(ok)),
            "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99),
            "chunk_lag_p50_ms": pct(lag, 50) * 1e3, "chunk_lag_p99_ms": pct(lag, 99) * 1e3,
            "stamped_events": float(len(lag)),
            "cpu_s": cpu,
            "errors": float(len(results) - len(ok)),
            "first_error": next((r.error for r in results if not r.ok), "")}


async def first_event(host: str, port: int, request: bytes, done: bytes) -> float:
    """One stream on its own new connection, read with bare asyncio streams (the load
    generator must cost next to nothing next to what it measures): seconds from the connect
    to the first `data: {` event; reads on to the end so the stream completes. NaN: failed."""
    t0 = time.monotonic()
    ttfb = math.nan
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        buf = b""
        for _ in range(100000):
            piece = await reader.read(65536)
            if not piece:
                break
            if math.isnan(ttfb):
                buf += piece
                if b"data: {" in buf:
                    ttfb = time.monotonic() - t0
                    buf = buf[-32:]
            else:
                buf = (buf + piece)[-32:]
            if done in buf:
                break
    finally:
        writer.close()
    return ttfb


async def one_burst(t: Target, n: int) -> list[float]:
    """n streams sent at once, each on its own new connection (n clients arriving together):
    each one's TTFB in seconds (NaN when it failed)."""
    url = urllib.parse.urlsplit(t.urls["burst"])
    data = body(t.models["burst"], True)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Content-Type": "application/json",
                                                  **t.headers}.items())
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n{head}"
               f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    got = await asyncio.gather(*(asyncio.wait_for(first_event(url.hostname or "", url.port or 80,
                                                               request, b"[DONE]"), 30)
                                 for _ in range(n)), return_exceptions=True)
    return [g if isinstance(g, float) else math.nan for g in got]


def scenario_i(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(i) bursts: BURST_STREAMS streams started at once, `bursts` times, one burst after the
    previous has ended. TTFB = connect to the first data event, per stream; the added figure
    (target − direct) is each request's setup cost queueing behind the others'."""

    async def run() -> list[float]:
        out: list[float] = []
        for _ in range(sizes.bursts):
            out += await one_burst(t, BURST_STREAMS)
            await asyncio.sleep(0.05)
        return out

    cpu0 = cpu_seconds(t.pids)
    results = asyncio.run(run())
    cpu = cpu_seconds(t.pids) - cpu0
    ttfb = [x * 1e3 for x in results if not math.isnan(x)]
    return {"streams": float(len(results)), "complete": float(len(ttfb)),
            "ttfb_p50_ms": pct(ttfb, 50), "ttfb_p99_ms": pct(ttfb, 99), "cpu_s": cpu,
            "cpu_us_per_stream": cpu / len(results) * 1e6 if results else math.nan,
            "errors": float(len(results) - len(ttfb))}


async def slow_one(t: Target, sizes: Sizes) -> dict[str, Any]:
    """(d) through one target: N streams at once, RSS sampled every 0.5 s, CPU over the run."""
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], mem_kb(t.pids, "VmRSS"))

    rss0 = mem_kb(t.pids, "VmRSS")
    cpu0 = cpu_seconds(t.pids)
    t0 = time.monotonic()
    results = await stream_load(t, "slow", sizes.slow_streams, sizes.slow_streams,
                                sizes.slow_s - 1, sample=sample if t.pids else None)
    wall = time.monotonic() - t0
    cpu = cpu_seconds(t.pids) - cpu0
    ok = [r for r in results if r.ok]
    errs = sorted({r.error for r in results if not r.ok})[:3]
    return {"streams": len(results), "complete": len(ok), "wall_s": wall, "cpu_s": cpu,
            "rss_before_mb": rss0 / 1024, "rss_peak_mb": peak[0] / 1024,
            "hwm_mb": mem_kb(t.pids, "VmHWM") / 1024, "errors": errs}


async def slow_all(targets: list[Target], sizes: Sizes, together: bool) -> list[Any]:
    """(d) through several targets, at the same time (saves minutes; the streams are idle
    most of the time, so they hardly interfere) or one after another."""
    if together:
        return list(await asyncio.gather(*(slow_one(t, sizes) for t in targets),
                                         return_exceptions=True))
    out: list[Any] = []
    for t in targets:
        try:
            out.append(await slow_one(t, sizes))
        except Exception as e:
            out.append(e)
    return out


def scenario_f(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, float]:
    results = asyncio.run(stream_load(t, "real", sizes.real_requests, 1, 1,
                                      max_tokens=sizes.real_tokens))
    ok = [r for r in results if r.ok]
    # end to end (tokens / time from send to the last token): a relay that holds the first
    # token back and then delivers a burst cannot look faster than direct
    tps = [len(r.times) / r.times[-1] for r in ok if r.times and r.times[-1] > 0]
    decode = [(len(r.times) - 1) / (r.times[-1] - r.times[0]) for r in ok
              if len(r.times) > 2 and r.times[-1] > r.times[0]]
    return {"ttfb_ms": med([r.ttfb * 1e3 for r in ok]), "tokens_s": med(tps),
            "decode_tokens_s": med(decode),
            "events": med([float(len(r.times)) for r in ok]), "complete": float(len(ok)),
            "requests": float(len(results))}


async def queue_client(session: Any, url: str, data: bytes, headers: dict[str, str],
                       deadline: float, out: list[dict[str, Any]]) -> None:
    """(g) one client: request after request until the deadline; on 429 it waits what
    Retry-After says (as the OpenAI SDKs do), bounded by the deadline."""
    for _ in range(10000):
        if time.monotonic() >= deadline:
            return
        t0 = time.monotonic()
        rec: dict[str, Any] = {"status": 0}
        try:
            async with session.post(url, data=data, headers=headers) as r:
                rec["status"] = r.status
                rec["head_s"] = time.monotonic() - t0  # queue wait + the upstream's head
                rec["retry_after"] = r.headers.get("Retry-After")
                if r.status != 200:
                    raw = await r.read()
                    rec["why"] = ("queue full" if b"queue is full" in raw
                                  else "queue_timeout" if b"in time" in raw
                                  else raw[:80].decode(errors="replace"))
                else:
                    buf, done = b"", False
                    async for piece in r.content.iter_any():
                        if "ttfb_s" not in rec and b"data: " in buf + piece:
                            rec["ttfb_s"] = time.monotonic() - t0
                        buf = (buf + piece)[-64:]
                        if b"data: [DONE]" in buf:
                            done = True
                    rec["done"] = done
                rec["total_s"] = time.monotonic() - t0
        except Exception as e:
            rec["error"] = repr(e)[:120]
            rec["total_s"] = time.monotonic() - t0
        out.append(rec)
        if rec["status"] == 429:
            try:
                wait = float(rec.get("retry_after") or 1)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        elif rec["status"] != 200:
            await asyncio.sleep(0.05)  # an error: do not spin


def scenario_g(t: Target, sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(g) 32 clients for queue_s seconds against an upstream that serves 2 at a time."""
    import aiohttp

    async def run() -> list[dict[str, Any]]:
        url = t.urls["queue"] + "/v1/chat/completions"
        data = body(t.models["queue"], True)
        hdrs = {"Content-Type": "application/json", **t.headers}
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + sizes.queue_s
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            await asyncio.gather(*(queue_client(s, url, data, hdrs, deadline, out)
                                   for _ in range(sizes.queue_clients)))
        return out

    cpu0 = cpu_seconds(t.pids)
    t0 = time.monotonic()
    recs = asyncio.run(run())
    wall = time.monotonic() - t0
    ok = [r for r in recs if r["status"] == 200 and r.get("done")]
    limited = [r for r in recs if r["status"] == 429]
    other = [r for r in recs if r not in ok and r not in limited]
    lat = [r["total_s"] * 1e3 for r in ok]
    heads = [r["head_s"] for r in recs if "head_s" in r]
    qt = float(QUEUE_LIMITS["queue_timeout"])
    return {
        "clients": float(sizes.queue_clients), "seconds": sizes.queue_s, "wall_s": wall,
        "requests": float(len(recs)), "completed": float(len(ok)),
        "completed_per_s": len(ok) / wall if wall else math.nan,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
        "ttfb_p50_ms": pct([r["ttfb_s"] * 1e3 for r in ok if "ttfb_s" in r], 50),
        "rejected_429": float(len(limited)),
        "rejected_429_with_retry_after": float(sum(1 for r in limited if r["retry_after"])),
        "rejected_queue_full": float(sum(1 for r in limited if r["why"] == "queue full")),
        "rejected_queue_timeout": float(sum(1 for r in limited
                                            if r["why"] == "queue_timeout")),
        "retry_after_values": ",".join(sorted({str(r["retry_after"]) for r in limited})),
        "max_wait_s": max(heads, default=math.nan),
        "max_wait_ok_s": max((r["head_s"] for r in ok), default=math.nan),
        "max_wait_429_s": max((r["head_s"] for r in limited), default=math.nan),
        "queue_timeout_s": qt,
        "waits_over_timeout": float(sum(1 for h in heads if h > qt + QUEUE_MARGIN_S)),
        "errors": float(len(other)),
        "first_error": next((str(r.get("error") or f"HTTP {r['status']}") for r in other), ""),
        "cpu_s": cpu_seconds(t.pids) - cpu0,
    }


# (h) prompt-cache affinity with two real mlx_lm.server replicas of one model
AFF_WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega vector "
             "matrix tensor kernel buffer socket stream token cache")


def conversation_text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = AFF_WORDS.split()
    return " ".join(rng.choice(vocab) for _ in range(words))


async def chat_turn(session: Any, url: str, headers: dict[str, str],
                    payload: dict[str, Any]) -> dict[str, float]:
    """One streamed turn: time to the first token, and the usage event's cache figures."""
    t0 = time.monotonic()
    ttft = math.nan
    usage: dict[str, Any] = {}
    buf = b""
    async with session.post(url, json=payload, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        async for piece in r.content.iter_any():
            buf += piece
            *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                obj = json.loads(ev[6:])
                if obj.get("choices") and math.isnan(ttft):
                    ttft = time.monotonic() - t0
                if obj.get("usage"):
                    usage = obj["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_ms": ttft * 1e3, "prompt_tokens": float(usage.get("prompt_tokens", math.nan)),
            "cached_tokens": float(details.get("cached_tokens", math.nan))}


async def conversations(base: str, headers: dict[str, str],
                        alias_for: Callable[[int, int], str],
                        sizes: Sizes, seed: int) -> list[list[dict[str, float]]]:
    """sizes.affinity_convs conversations of affinity_turns turns, interleaved turn by turn
    (conv 1 turn 1, conv 2 turn 1, ..., conv 1 turn 2, ...): each has its own ~1,300-token
    system prompt and adds a ~100-token user message (a tool result) per turn.
    alias_for(conversation, turn) names the model to ask for that request."""
    import aiohttp

    hist: list[list[dict[str, str]]] = [
        [{"role": "system", "content": conversation_text(seed + c, 300)}]
        for c in range(sizes.affinity_convs)]
    out: list[list[dict[str, float]]] = [[] for _ in hist]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for turn in range(sizes.affinity_turns):
            for c, msgs in enumerate(hist):
                msgs.append({"role": "user", "content": f"turn {turn}: "
                             + conversation_text(seed * 1000 + c * 100 + turn, 24)})
                payload = {"model": alias_for(c, turn), "messages": msgs, "stream": True,
                           "max_tokens": 4, "stream_options": {"include_usage": True}}
                out[c].append(await chat_turn(s, base + "/v1/chat/completions", headers,
                                              payload))
                msgs.append({"role": "assistant", "content": "Noted, continuing."})
    return out


def fixed_alias(alias: str, _c: int, _t: int) -> str:
    return alias


def scenario_h(sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(h) two mlx_lm.server replicas of one tiny model (independent prompt caches) behind one
    maclustr: alias bench-pair lists both (affinity, the default), bench-r1 / bench-r2 one
    each; round-robin = alternate bench-r1 / bench-r2 per request. Distinct seeds per mode,
    so the modes never share a cached prefix."""
    from maclustr.harness import mlx_server as real_mlx

    model_dir = build_tiny_model()
    exe = Path(PY).parent / "maclustr"
    procs: list[Proc] = []
    try:
        reps = []
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, pin.upstream)
        try:
            for i in (1, 2):
                port = free_port()
                log = WORK / "logs" / f"mlx-replica-{i}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                procs.append(Proc(f"mlx-replica-{i}",
                                  real_mlx.start_mlx_server(model_dir, port, log), log))
                reps.append(f"http://127.0.0.1:{port}")
        finally:
            os.sched_setaffinity(0, old)
        for url, proc in zip(reps, procs, strict=True):
            real_mlx.wait_healthy(url, timeout=60, proc=proc.popen)
        d = WORK / "maclustr-h"
        d.mkdir(parents=True, exist_ok=True)
        # maclustr wants one alias per internal model id: the one-replica aliases name the
        # same weights through symlinks. A replica reloads when the model id changes, so
        # each mode warms its replicas up first and then keeps to one id per replica.
        links = []
        for i in (1, 2):
            link = WORK / f"tiny-model-r{i}"
            if not link.is_symlink():
                link.symlink_to(model_dir.name)
            links.append(link)
        (d / "routes.yaml").write_text(
            "models:\n"
            f"  bench-pair:\n    model: {model_dir}\n    upstreams: [{reps[0]}, {reps[1]}]\n"
            f"  bench-r1:\n    model: {links[0]}\n    upstream: {reps[0]}\n"
            f"  bench-r2:\n    model: {links[1]}\n    upstream: {reps[1]}\n")
        port = free_port()
        gw = spawn("maclustr-h", [str(exe), "serve", "--routes", str(d / "routes.yaml"),
                                  "--port", str(port)], pin, "target",
                   env=dict(os.environ, MACLUSTR_API_KEY=KEY))
        procs.append(gw)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", gw, 60)
        hdrs = {"Authorization": f"Bearer {KEY}"}
        one = Sizes(affinity_convs=1, affinity_turns=1)
        # round-robin: each conversation changes replica every turn (what a global
        # round-robin does to interleaved conversations, whatever their number)
        modes: dict[str, tuple[Callable[[int, int], str], tuple[str, ...]]] = {
            "affinity": (lambda _c, _t: "bench-pair", ("bench-pair", "bench-pair")),
            "round-robin": (lambda c, t: ("bench-r1", "bench-r2")[(c + t) % 2],
                            ("bench-r1", "bench-r2")),
            "one replica": (lambda _c, _t: "bench-r1", ("bench-r1",)),
        }
        res: dict[str, Any] = {}
        for i, (mode, (alias_for, warm)) in enumerate(modes.items()):
            for j, alias in enumerate(warm):  # (re)load the weights, throwaway prompts
                asyncio.run(conversations(base, hdrs, functools.partial(fixed_alias, alias),
                                          one, 900 + 10 * i + j))
            runs = asyncio.run(conversations(base, hdrs, alias_for, sizes, 10 * (i + 1)))
            later = [turn for conv in runs for turn in conv[1:]]
            first = [conv[0] for conv in runs]
            res[mode] = {
                "ttft_later_p50_ms": med([x["ttft_ms"] for x in later]),
                "ttft_later_mean_ms": statistics.fmean([x["ttft_ms"] for x in later])
                if later else math.nan,
                "ttft_first_p50_ms": med([x["ttft_ms"] for x in first]),
                "ttft_by_turn_ms": [med([conv[k]["ttft_ms"] for conv in runs])
                                    for k in range(sizes.affinity_turns)],
                "later_prompt_tokens": sum(x["prompt_tokens"] for x in later),
                "later_cached_tokens": sum(x["cached_tokens"] for x in later),
                "turns": float(sum(len(c) for c in runs)),
            }
            r = res[mode]
            r["later_cached_share"] = (r["later_cached_tokens"] / r["later_prompt_tokens"]
                                       if r["later_prompt_tokens"] else math.nan)
        a, rr = res["affinity"]["ttft_later_p50_ms"], res["round-robin"]["ttft_later_p50_ms"]
        res["rr_over_affinity"] = rr / a if a else math.nan
        res["conversations"], res["turns"] = sizes.affinity_convs, sizes.affinity_turns
        return res
    finally:
        for proc in reversed(procs):
            proc.stop()


def scrape_metrics(t: Target) -> dict[str, Any]:
    """GET /metrics once: proof that the metrics target counted what it served."""
    url = t.urls["fast"] + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as e:
        return {"error": repr(e)[:200]}
    total = 0.0
    for line in text.splitlines():
        if line.startswith("maclustr_requests_total{"):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return {"requests_total": total, "bytes": len(text)}


def summarize_collapsed(path: Path, top: int = 25) -> str:
    """Top frames by self and inclusive samples from py-spy's collapsed-stack output."""
    self_n: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self %  frame"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in
            sorted(self_n.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "incl %  frame"]
    out += [f"{100 * n / total:5.1f}  {f}" for f, n in
            sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


def profile(t: Target, sizes: Sizes, pin: Pinning, scen: set[str]) -> dict[str, str]:
    """py-spy the target during one extra (a) c=64 and (b) run; figures are not counted."""
    spy = Path(PY).parent / "py-spy"
    if not spy.exists():
        spy = Path(shutil.which("py-spy") or "/nonexistent")
    if not spy.exists():
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out: dict[str, str] = {}
    for s, stream in (("a", False), ("b", True)):
        if s not in scen:
            continue
        raw = RESULTS / f"profile-{t.name}-{s}.collapsed"
        raw.parent.mkdir(parents=True, exist_ok=True)
        secs = max(2, round(sizes.wrk_s) + 1)
        spy_proc = subprocess.Popen(
            [str(spy), "record", "-p", str(t.pids[0]), "-d", str(secs), "-r", "500",
             "--nonblocking", "--function", "-f", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pin.preexec("load"))
        time.sleep(0.5)
        with contextlib.suppress(Exception):
            run_wrk(t, "fast", stream, 64 if not stream else 16, sizes.wrk_s, pin)
        try:
            _, err = spy_proc.communicate(timeout=secs + 30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            _, err = spy_proc.communicate(timeout=10)
        if raw.exists():
            summary = summarize_collapsed(raw)
            raw.with_suffix(".txt").write_text(summary + "\n")
            out[s] = str(raw.with_suffix(".txt"))
        else:
            out[s] = f"py-spy failed: {err.decode(errors='replace')[-200:]}"
    return out


RATIO_KEYS = ["a.c64_rps", "a.c16_rps", "b.streams_s"]
ADDED_KEYS = ["a.c1_p50_ms", "c.ttfb_p50_ms", "c.ttfb_p99_ms", "c.chunk_lag_p50_ms",
              "c.chunk_lag_p99_ms", "i.ttfb_p50_ms", "i.ttfb_p99_ms"]

SCENARIOS: dict[str, Callable[[Target, Sizes, Pinning], dict[str, Any]]] = {
    "a": scenario_a, "b": scenario_b, "c": scenario_c, "i": scenario_i, "t": scenario_t,
}


# ---------------------------------------------------------------- report


def fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def ratio(v: float, d: float) -> str:
    if math.isnan(v) or math.isnan(d) or not d:
        return ""
    return f" ({v / d:.2f}×)"


RSS_LIMIT_MB = 150.0
TOKENS_FLOOR = 0.97
BURST_TTFB_LIMIT_MS = 1.0


def verdicts(report: dict[str, Any], name: str) -> list[tuple[str, str, bool | None]]:
    """Issue 15's targets for one maclustr target, from this run's figures only:
    (what, the figures, met? — None when not measured in this run)."""
    m = report["medians"].get(name, {})
    c = report["medians"].get("caddy", {})
    d = report["medians"].get("direct", {})

    def get(src: dict[str, float], k: str) -> float:
        return float(src.get(k, math.nan))

    def below(v: float, ref: float) -> bool | None:
        return None if math.isnan(v) or math.isnan(ref) else v < ref

    out: list[tuple[str, str, bool | None]] = []
    for key, what in (("b.cpu_us_per_event", "CPU per relayed event (per-event reads)"),
                      ("a.c64_cpu_us_per_req", "CPU per unary request")):
        v, ref = get(m, key), get(c, key)
        out.append((f"{what} below Caddy's", f"{fmt(v, 1)} vs {fmt(ref, 1)} µs"
                    f"{ratio(v, ref)}", below(v, ref)))
    added = get(m, "i.ttfb_p50_ms") - get(d, "i.ttfb_p50_ms")
    out.append((f"added TTFB p50, {BURST_STREAMS}-stream burst ≤ {BURST_TTFB_LIMIT_MS:g} ms",
                f"{fmt(added, 2)} ms", None if math.isnan(added)
                else added <= BURST_TTFB_LIMIT_MS))
    lag = get(m, "c.chunk_lag_p50_ms") - get(d, "c.chunk_lag_p50_ms")
    lag_c = get(c, "c.chunk_lag_p50_ms") - get(d, "c.chunk_lag_p50_ms")
    out.append(("added per-chunk latency p50 ≤ Caddy's", f"{fmt(lag, 3)} vs {fmt(lag_c, 3)} ms",
                None if math.isnan(lag) or math.isnan(lag_c) else lag <= lag_c))
    real, rd = report.get("real", {}).get(name, {}), report.get("real", {}).get("direct", {})
    tps = float(real.get("tokens_s", math.nan)) / float(rd.get("tokens_s", math.nan) or math.nan)
    out.append((f"real tiny mlx_lm.server tokens/s ≥ {TOKENS_FLOOR}× direct", f"{fmt(tps, 3)}×",
                None if math.isnan(tps) else tps >= TOKENS_FLOOR))
    slow = report.get("slow", {}).get(name, {})
    if "complete" in slow:
        ok: bool | None = (slow["complete"] == slow["streams"]
                           and slow["rss_peak_mb"] <= RSS_LIMIT_MB)
        if ok and slow["streams"] < 1000:
            ok = None  # a smaller run (--quick) proves nothing about 1,000
        out.append((f"1,000 slow streams complete, peak RSS ≤ {RSS_LIMIT_MB:g} MB",
                    f"{slow['complete']}/{slow['streams']}, {fmt(slow['rss_peak_mb'], 0)} MB",
                    ok))
    else:
        out.append((f"1,000 slow streams complete, peak RSS ≤ {RSS_LIMIT_MB:g} MB",
                    "not measured", None))
    return out


def headline(report: dict[str, Any]) -> str:
    """The faithful-regime summary: CPU per unit of work beside Caddy and direct, the burst,
    per-chunk latency; batched-read CPU as a secondary row; issue 15's targets checked."""
    med_ = report["medians"]
    if not med_:
        return ""
    d, c = med_.get("direct", {}), med_.get("caddy", {})
    lines = ["Faithful regime: HTTP/1.0 upstream (one request per connection), `data: ` + "
             "json.dumps(obj) per event, one write per event"
             f" ({TRICKLE_MS:g} ms apart in (b): each event its own read), "
             f"{report['placement']}.\n",
             "| target | CPU µs / unary request (× Caddy) | CPU µs / relayed event (× Caddy) "
             f"| burst of {BURST_STREAMS}: TTFB p50 / p99 ms (added p50 / p99) "
             "| paced: added per-chunk p50 ms |", "|---|---|---|---|---|"]
    for name in report["targets"]:
        if report["target_info"].get(name, {}).get("error") or name not in med_:
            continue
        m = med_[name]

        def g(k: str, src: dict[str, float] = m) -> float:
            return float(src.get(k, math.nan))

        direct = name == "direct"
        lag = ("(" + fmt(g("c.chunk_lag_p50_ms"), 3) + " direct)" if direct
               else fmt(g("c.chunk_lag_p50_ms") - g("c.chunk_lag_p50_ms", d), 3))
        lines.append(
            f"| {name} | {'' if direct else fmt(g('a.c64_cpu_us_per_req'), 0)}"
            f"{'' if direct else ratio(g('a.c64_cpu_us_per_req'), g('a.c64_cpu_us_per_req', c))}"
            f" | {'' if direct else fmt(g('b.cpu_us_per_event'), 1)}"
            f"{'' if direct else ratio(g('b.cpu_us_per_event'), g('b.cpu_us_per_event', c))}"
            f" | {fmt(g('i.ttfb_p50_ms'), 2)} / {fmt(g('i.ttfb_p99_ms'), 2)}"
            + ("" if direct else f" (+{fmt(g('i.ttfb_p50_ms') - g('i.ttfb_p50_ms', d), 2)} / "
                                 f"+{fmt(g('i.ttfb_p99_ms') - g('i.ttfb_p99_ms', d), 2)})")
            + f" | {lag} |")
    row = ["Secondary (batched reads: the unpaced upstream, whose events coalesce into large "
           "reads), CPU µs / relayed event: "]
    row.append(", ".join(
        f"{n} {fmt(float(med_[n].get('b.batched_cpu_us_per_event', math.nan)), 1)}"
        for n in report["targets"] if n in med_ and n != "direct"))
    out = "\n".join(lines) + "\n\n" + "".join(row) + "\n"
    for name in report["targets"]:
        if not name.startswith("maclustr") or name not in med_:
            continue
        out += f"\nIssue 15 targets, {name} (this run):\n\n"
        for what, figures, ok in verdicts(report, name):
            mark = "not measured" if ok is None else "met" if ok else "NOT met"
            out += f"- {what}: {figures} — {mark}\n"
    return out + "\n"


def build_tables(report: dict[str, Any]) -> str:
    med_ = report["medians"]
    d = med_.get("direct", {})
    lines = ["| target | unary req/s c=64 | unary req/s c=16 | unary p50/p99 ms c=64 "
             "| seq c=1 added ms | stream req/s c=16 | chunks/s | paced TTFB p50/p99 ms "
             "(added p50) | paced added per-chunk p50 ms | CPU µs / unary req | "
             "CPU µs / relayed event (per-event reads) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in report["targets"]:
        info = report["target_info"][name]
        if info.get("error"):
            lines.append(f"| {name} | not run: {info['error']} |" + " |" * 10)
            continue
        m = med_.get(name, {})

        def g(k: str, m: dict[str, float] = m) -> float:
            return float(m.get(k, math.nan))

        def dg(k: str) -> float:
            return float(d.get(k, math.nan))

        added_seq = g("a.c1_p50_ms") - dg("a.c1_p50_ms")
        added_ttfb = g("c.ttfb_p50_ms") - dg("c.ttfb_p50_ms")
        added_chunk = g("c.chunk_lag_p50_ms") - dg("c.chunk_lag_p50_ms")
        is_direct = name == "direct"
        direct_lag = "(" + fmt(g("c.chunk_lag_p50_ms"), 2) + ")"
        lines.append(
            f"| {name} | {fmt(g('a.c64_rps'), 0)}{ratio(g('a.c64_rps'), dg('a.c64_rps'))} "
            f"| {fmt(g('a.c16_rps'), 0)}{ratio(g('a.c16_rps'), dg('a.c16_rps'))} "
            f"| {fmt(g('a.c64_p50_ms'), 2)} / {fmt(g('a.c64_p99_ms'), 2)} "
            f"| {'(' + fmt(g('a.c1_p50_ms'), 3) + ')' if is_direct else fmt(added_seq, 3)} "
            f"| {fmt(g('b.streams_s'), 0)}{ratio(g('b.streams_s'), dg('b.streams_s'))} "
            f"| {fmt(g('b.chunks_s'), 0)} "
            f"| {fmt(g('c.ttfb_p50_ms'), 2)} / {fmt(g('c.ttfb_p99_ms'), 2)}"
            f"{'' if is_direct else ' (+' + fmt(added_ttfb, 2) + ')'} "
            f"| {direct_lag if is_direct else fmt(added_chunk, 2)} "
            f"| {'' if is_direct else fmt(g('a.c64_cpu_us_per_req'), 0)} "
            f"| {'' if is_direct else fmt(g('b.cpu_us_per_event'), 1)} "
            f"| {'' if is_direct else fmt(report['rss'].get(name, math.nan), 0)} |")
    out = "\n".join(lines) if set(report["scenarios"]) & {"a", "b", "c"} else ""
    notes = []
    for name, by_s in report["raw"].items():
        for s, runs in by_s.items():
            for i, r in enumerate(runs):
                bad = {k: r[k] for k in ("c64_non2xx", "c16_non2xx", "c64_timeouts",
                                         "c16_timeouts", "c16_connect_err", "errors",
                                         "error", "first_error")
                       if r.get(k)}
                if not report["target_info"].get(name, {}).get("raw_framing"):
                    bad.update({k: r[k] for k in ("c64_read_err", "c16_read_err") if r.get(k)})
                if bad:
                    notes.append(f"- {name} ({s}) round {i + 1}: {bad}")
    if notes:
        out += "\n\nAnomalies (non-2xx, socket errors, incomplete streams):\n" + "\n".join(notes)
    if report.get("slow"):
        out += ("\n\n(d) slow streams: N concurrent streams, 1 chunk/s\n\n"
                "| target | complete | wall s | target CPU s | RSS before → peak MB | VmHWM MB "
                "| errors |\n|---|---|---|---|---|---|---|\n")
        for name, r in report["slow"].items():
            if "skipped" in r:
                out += f"| {name} | {r['skipped']} | | | | | |\n"
                continue
            out += (f"| {name} | {r['complete']}/{r['streams']} | {fmt(r['wall_s'])} "
                    f"| {fmt(r['cpu_s'], 2)} | {fmt(r['rss_before_mb'])} → "
                    f"{fmt(r['rss_peak_mb'])} | {fmt(r['hwm_mb'])} "
                    f"| {'; '.join(r['errors'])} |\n")
    if report.get("real"):
        out += ("\n(f) real tiny mlx_lm.server, streamed (tokens/s end to end = tokens / time "
                "from send to last token; decode = first to last token)\n\n| target | TTFB ms "
                "| tokens/s | decode tokens/s | events | complete |\n|---|---|---|---|---|---|\n")
        rd = report["real"].get("direct", {})
        for name, r in report["real"].items():
            if "skipped" in r:
                out += f"| {name} | {r['skipped']} | | | | |\n"
                continue
            out += (f"| {name} | {fmt(r['ttfb_ms'], 2)} | {fmt(r['tokens_s'], 0)}"
                    f"{ratio(r['tokens_s'], rd.get('tokens_s', math.nan))} "
                    f"| {fmt(r['decode_tokens_s'], 0)} | {fmt(r['events'], 0)} "
                    f"| {fmt(r['complete'], 0)}/"
                    f"{fmt(r['requests'], 0)} |\n")
    out += queue_tables(report) + tail_table(report)
    return out.lstrip("\n")


TAIL_LIMIT = 3.0  # issue 25: unary p99.9 through maclustr within 3x Caddy's, same run


def tail_table(report: dict[str, Any]) -> str:
    """(t): unary tail latency at 1 and 16 keep-alive connections, the pauses maclustr saw
    in the same windows, and issue 25's p99.9 target against Caddy."""
    med_ = report["medians"]
    have = [n for n in report["targets"] if "t.c1_p999_ms" in med_.get(n, {})]
    if not have:
        return ""
    secs = report["sizes"].get("tail_s", "?")
    out = (f"\n\n(t) unary tail: wrk {secs} s per run, keep-alive, the unpaced fake (ms; "
           "the longest collector pause and loop lag are maclustr's own, from MACLUSTR_PAUSES)"
           "\n\n| target | c=1 mean / p99 / p99.9 / max | c=16 mean / p99 / p99.9 / max "
           "| longest gc pause c=1 / c=16 (collections) | longest loop lag c=1 / c=16 |\n"
           "|---|---|---|---|---|\n")
    for name in have:
        m = med_[name]

        def g(k: str, m: dict[str, float] = m) -> float:
            return float(m.get(f"t.{k}", math.nan))

        lat = [" / ".join(fmt(g(f"c{c}_{k}"), 2) for k in ("mean_ms", "p99_ms", "p999_ms",
                                                           "max_ms")) for c in (1, 16)]
        gc_ = " / ".join(f"{fmt(g(f'c{c}_gc_longest_ms'), 2)} ({fmt(g(f'c{c}_gc_collections'), 0)})"
                         for c in (1, 16))
        lag = " / ".join(fmt(g(f"c{c}_loop_lag_ms"), 1) for c in (1, 16))
        out += f"| {name} | {lat[0]} | {lat[1]} | {gc_} | {lag} |\n"
    caddy = med_.get("caddy", {})
    for name in have:
        if not name.startswith("maclustr"):
            continue
        for c in (1, 16):
            v = float(med_[name].get(f"t.c{c}_p999_ms", math.nan))
            ref = float(caddy.get(f"t.c{c}_p999_ms", math.nan))
            ok = None if math.isnan(v) or math.isnan(ref) else v <= TAIL_LIMIT * ref
            mark = "not measured" if ok is None else "met" if ok else "NOT met"
            out += (f"\n- {name}, c={c}: unary p99.9 within {TAIL_LIMIT:g}× Caddy's: "
                    f"{fmt(v, 2)} vs {fmt(ref, 2)} ms{ratio(v, ref)} — {mark}")
    return out + "\n"


def queue_tables(report: dict[str, Any]) -> str:
    """The (g) and (h) tables (issue 7): admission control and prompt-cache affinity."""
    out = ""
    if report.get("queue"):
        lim = QUEUE_LIMITS
        out += ("\n\n(g) queueing: an upstream that serves "
                f"{lim['max_concurrency']} streams at a time (20 events × 20 ms, ~0.4 s "
                "each; it holds the rest), clients sending back to back, honouring "
                "Retry-After on 429; maclustr's route: "
                + ", ".join(f"`{k}: {v}`" for k, v in lim.items())
                + f". Wait = time to the response head; over = waits longer than "
                f"queue_timeout + {QUEUE_MARGIN_S} s.\n\n"
                "| target | clients × s | completed (/s) | latency p50 / p99 ms | TTFB p50 ms "
                "| 429 (with Retry-After) | 429 queue full / queue timeout | max wait s "
                "(ok / 429) | over | errors |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for name, r in report["queue"].items():
            if "skipped" in r:
                out += f"| {name} | {r['skipped']} |" + " |" * 8 + "\n"
                continue
            direct = name == "direct"
            ra = f", Retry-After {r['retry_after_values']}" if r["retry_after_values"] else ""
            of = " of " + fmt(r["requests"], 0)
            err = " " + r["first_error"] if r["first_error"] else ""
            out += (f"| {name}{' (no queue: the upstream holds)' if direct else ''} "
                    f"| {fmt(r['clients'], 0)} × {fmt(r['seconds'], 0)} "
                    f"| {fmt(r['completed'], 0)} ({fmt(r['completed_per_s'], 1)}) "
                    f"| {fmt(r['p50_ms'], 0)} / {fmt(r['p99_ms'], 0)} "
                    f"| {fmt(r['ttfb_p50_ms'], 0)} "
                    f"| {fmt(r['rejected_429'], 0)} ({fmt(r['rejected_429_with_retry_after'], 0)}"
                    f"{ra}"
                    f") | {fmt(r['rejected_queue_full'], 0)} / "
                    f"{fmt(r['rejected_queue_timeout'], 0)} "
                    f"| {fmt(r['max_wait_s'], 2)} ({fmt(r['max_wait_ok_s'], 2)} / "
                    f"{fmt(r['max_wait_429_s'], 2)}) "
                    f"| {fmt(r['waits_over_timeout'], 0)}{of} "
                    f"| {fmt(r['errors'], 0)}{err} |\n")
    a = report.get("cache_affinity")
    if a:
        if "skipped" in a:
            return out + f"\n\n(h) prompt-cache affinity: {a['skipped']}\n"
        out += ("\n\n(h) prompt-cache affinity, real tiny mlx_lm.server: two replicas of one "
                f"model (independent prompt caches) behind one maclustr; "
                f"{a['conversations']} conversations × {a['turns']} turns, interleaved turn "
                "by turn, each a ~1,300-token system prompt plus ~100 tokens per turn, "
                "streamed, max_tokens 4. affinity = one alias listing both replicas "
                "(the default routing); round-robin = two one-replica aliases, each "
                "conversation alternating between them turn by turn; one replica = every "
                "request to the same replica (reference: one cache, all conversations). "
                "Cached = `usage.prompt_tokens_details.cached_tokens` of turns 2+.\n\n"
                "| routing | TTFT turns 2+ p50 (mean) ms | TTFT turn 1 p50 ms "
                "| TTFT per turn ms (median over conversations) "
                "| cached / prompt tokens, turns 2+ |\n|---|---|---|---|---|\n")
        for mode in ("affinity", "round-robin", "one replica"):
            r = a.get(mode)
            if not r:
                continue
            out += (f"| {mode} | {fmt(r['ttft_later_p50_ms'], 1)} "
                    f"({fmt(r['ttft_later_mean_ms'], 1)}) "
                    f"| {fmt(r['ttft_first_p50_ms'], 1)} "
                    f"| {' / '.join(fmt(x, 0) for x in r['ttft_by_turn_ms'])} "
                    f"| {fmt(r['later_cached_tokens'], 0)} / {fmt(r['later_prompt_tokens'], 0)}"
                    f" ({fmt(100 * r['later_cached_share'], 0)} %) |\n")
        out += (f"\nround-robin / affinity, TTFT of turns 2+: "
                f"{fmt(a['rr_over_affinity'], 2)}×\n")
    return out


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--only", default=",".join(ALL_TARGETS),
                   help=f"targets (default: %(default)s; also: {','.join(EXTRA_TARGETS)})")
    p.add_argument("--scenarios", default="a,b,c,d,e,f,i",
                   help="(default: %(default)s; also g, h: queueing and cache affinity; "
                        "t: issue 25's unary tail, 10 s at 1 and 16 connections)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--slow-seconds", type=int, help="(d) duration (default 30, quick 3)")
    p.add_argument("--slow-streams", type=int, help="(d) streams (default 1000, quick 100)")
    p.add_argument("--slow-targets",
                   help="targets that run (d) (default: nginx,caddy,maclustr,maclustr-metrics; "
                        "quick: maclustr,maclustr-metrics)")
    p.add_argument("--slow-apart", action="store_true",
                   help="(d) one target after another instead of all at the same time")
    p.add_argument("--http11", action="store_true", help="keep-alive HTTP/1.1 fake upstream")
    p.add_argument("--compact-upstream", action="store_true",
                   help="the fake upstream writes compact JSON (separators , and :)")
    p.add_argument("--chunk-size", type=int, default=8,
                   help="content bytes per event of the unpaced fake (default: %(default)s)")
    p.add_argument("--placement", default="none",
                   choices=["split", "upstream-with-target", "none"],
                   help="CPU placement (default: %(default)s; see Pinning)")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, py-spy maclustr during (a) and (b) (not counted)")
    p.add_argument("--litellm-install-timeout", type=float, default=300.0)
    p.add_argument("--baseline", type=Path,
                   help="another checkout (e.g. a git worktree at an older commit), run with "
                        "this venv as the maclustr-baseline target (added to --only)")
    p.add_argument("--out", default=str(RESULTS / "latest"), help="path prefix for .md/.json")
    args = p.parse_args(argv)

    sizes = Sizes() if not args.quick else Sizes(**QUICK.__dict__)
    if args.rounds:
        sizes.rounds = args.rounds
    if args.slow_seconds:
        sizes.slow_s = args.slow_seconds
    if args.slow_streams:
        sizes.slow_streams = args.slow_streams
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.baseline:  # another checkout's code as one more target, same run
        STARTERS["maclustr-baseline"] = functools.partial(start_maclustr,
                                                          tree=args.baseline.resolve())
        if "maclustr-baseline" not in names:
            names.append("maclustr-baseline")
    unknown = [n for n in names if n not in STARTERS]
    if unknown:
        p.error(f"unknown targets {unknown}; known: {list(STARTERS)}")
    scen = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if "e" in scen:
        scen |= {"a", "b"}  # (e) is computed from (a) and (b)
    if "direct" not in names and scen & {"a", "b", "c", "f", "i", "t"}:
        names.insert(0, "direct")  # ratios need the limit

    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    pin = Pinning(args.placement)
    os.sched_setaffinity(0, pin.load)  # this process is the aiohttp load generator
    print(f"bench: targets {names}, scenarios {sorted(scen)}, {sizes.rounds} round(s); "
          f"{pin.describe()}", flush=True)
    wrk_missing = try_apt("wrk", "wrk") if scen & {"a", "b", "t"} else None
    if wrk_missing:
        print(f"  scenarios a, b, t skipped: {wrk_missing}")
        scen -= {"a", "b", "e", "t"}

    ups = Upstreams()
    targets: dict[str, Target] = {}
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
        "placement": pin.describe(), "quick": args.quick, "sizes": sizes.__dict__,
        "upstream_mode": ("HTTP/1.1 keep-alive" if args.http11 else "HTTP/1.0 close-delimited")
        + f", {args.chunk_size}-byte content per chunk"
        + (", compact JSON" if args.compact_upstream else ", json.dumps default separators"),
        "targets": names, "scenarios": sorted(scen), "target_info": {}, "raw": {},
        "medians": {}, "ratios": {}, "rss": {}, "slow": {}, "real": {}, "queue": {},
        "cache_affinity": {}, "versions": {}, "metrics_scrape": {}}
    try:
        ups = start_upstreams(pin, sizes, args.http11, args.chunk_size, queue="g" in scen,
                              compact=args.compact_upstream)
        if "f" in scen:
            print("  starting the real tiny mlx_lm.server for (f) ...", flush=True)
            start_real_mlx(ups, pin)
        for n in names:
            print(f"  starting {n} ...", flush=True)
            try:
                if n == "litellm":
                    t = start_litellm(ups, pin, args.http11, args.litellm_install_timeout)
                else:
                    t = STARTERS[n](ups, pin, args.http11)
            except Exception as e:
                t = Target(n, error=f"start failed: {e!r}"[:300])
            targets[n] = t
        for t in targets.values():
            if t.error:
                continue
            try:
                for proc in t.procs:
                    wait_http(t.urls["fast"] + t.health, proc, 90)
                asyncio.run(sanity(t))
                if scen & {"a", "t"}:  # warm-up: imports, pools, JIT-less caches
                    run_wrk(t, "fast", False, 16, 1, pin)
            except Exception as e:
                tail = " ".join(p.tail(3) for p in t.procs)
                t.error = f"{e}"[:300] + (f" [log: {tail[:200]}]" if tail.strip() else "")
            print(f"  {t.name}: {'ready' if not t.error else 'NOT RUN: ' + t.error}",
                  flush=True)
        report["target_info"] = {n: {"error": t.error, "note": t.note, "pids": t.pids,
                                     "raw_framing": t.raw_framing}
                                 for n, t in targets.items()}
        live = [t for t in targets.values() if not t.error]

        for rnd in range(sizes.rounds):
            for t in rotated(live, rnd):
                for s in ("a", "b", "c", "i", "t"):
                    if s not in scen:
                        continue
                    try:
                        settle(t.pids)
                        r = SCENARIOS[s](t, sizes, pin)
                    except Exception as e:
                        r = {"error": repr(e)[:300]}
                    report["raw"].setdefault(t.name, {}).setdefault(s, []).append(r)
                    brief = {k: round(v, 2) for k, v in r.items()
                             if k in ("c64_rps", "streams_s", "ttfb_p50_ms", "cpu_us_per_event",
                                      "batched_cpu_us_per_event", "c64_cpu_us_per_req",
                                      "chunk_lag_p50_ms", "c1_p999_ms", "c16_p999_ms",
                                      "c16_gc_longest_ms", "c16_loop_lag_ms")}
                    print(f"  round {rnd + 1} {t.name:>14} ({s}) {brief or r}", flush=True)
        for t in live:
            m: dict[str, float] = {}
            for s, runs in report["raw"].get(t.name, {}).items():
                keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
                for k in keys:
                    m[f"{s}.{k}"] = med([r.get(k, math.nan) for r in runs])
            report["medians"][t.name] = m
        d_med = report["medians"].get("direct", {})
        for name, m in report["medians"].items():
            rat = {f"{k}/direct": m[k] / d_med[k] for k in RATIO_KEYS
                   if k in m and d_med.get(k) and not math.isnan(m[k])}
            rat.update({f"{k}-direct": m[k] - d_med[k] for k in ADDED_KEYS
                        if k in m and k in d_med})
            report["ratios"][name] = rat

        if "d" in scen:
            slow_default = ("maclustr,maclustr-metrics" if args.quick
                            else "nginx,caddy,maclustr,maclustr-metrics")
            slow_names = [n.strip() for n in (args.slow_targets or slow_default).split(",")]
            slow_ts = [t for t in live if t.name in slow_names]
            # together, this process holds every target's streams open at once; where the
            # descriptor limit cannot hold them all, run them apart rather than fail them all
            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            apart = (args.slow_apart
                     or fd_limit < len(slow_ts) * sizes.slow_streams + 1024)
            print(f"  (d) {sizes.slow_streams} slow streams for {sizes.slow_s} s through "
                  f"{', '.join(t.name for t in slow_ts)} "
                  f"({'one after another' if apart else 'at the same time'}; "
                  f"open-file limit {fd_limit}) ...",
                  flush=True)
            for t in slow_ts:
                settle(t.pids)
            for t, res in zip(slow_ts, asyncio.run(slow_all(slow_ts, sizes,
                                                             not apart)),
                              strict=True):
                report["slow"][t.name] = (res if not isinstance(res, BaseException)
                                          else {"skipped": f"failed: {res!r}"[:200]})
                print(f"      {t.name}: {report['slow'][t.name]}", flush=True)
        if "f" in scen:
            for t in live:
                if t.name not in ("direct", "maclustr", "maclustr-metrics", "maclustr-quiet"):
                    continue
                if ups.real_error or "real" not in t.urls:
                    report["real"][t.name] = {"skipped": ups.real_error or "no real upstream"}
                    continue
                with contextlib.suppress(Exception):  # first request loads the weights
                    asyncio.run(stream_load(t, "real", 1, 1, 1, max_tokens=8))
            real_runs: dict[str, list[dict[str, float]]] = {}
            real_ts = [t for t in live if "real" in t.urls]
            for rnd in range(sizes.rounds):
                for t in rotated(real_ts, rnd):
                    if t.name in report["real"]:
                        continue
                    try:
                        real_runs.setdefault(t.name, []).append(scenario_f(t, sizes, pin))
                    except Exception as e:
                        report["real"][t.name] = {"skipped": f"failed: {e!r}"[:200]}
            for name, rs in real_runs.items():
                if name in report["real"]:
                    continue
                report["real"][name] = {k: med([r[k] for r in rs]) for k in rs[0]}
                report["real"][name]["requests"] = sum(r["requests"] for r in rs)
                report["real"][name]["complete"] = sum(r["complete"] for r in rs)
                report["raw"].setdefault(name, {})["f"] = rs

        if "g" in scen:
            print(f"  (g) {sizes.queue_clients} clients for {sizes.queue_s:.0f} s against an "
                  f"upstream serving {QUEUE_LIMITS['max_concurrency']} at a time ...",
                  flush=True)
            for t in live:
                if t.name != "direct" and not t.name.startswith("maclustr"):
                    continue
                settle(t.pids)
                try:
                    report["queue"][t.name] = scenario_g(t, sizes, pin)
                except Exception as e:
                    report["queue"][t.name] = {"skipped": f"failed: {e!r}"[:200]}
                print(f"      {t.name}: {report['queue'][t.name]}", flush=True)
        if "h" in scen:
            if any(t.name.startswith("maclustr") for t in live):
                print(f"  (h) prompt-cache affinity: {sizes.affinity_convs} conversations x "
                      f"{sizes.affinity_turns} turns, two real mlx_lm.server replicas ...",
                      flush=True)
                try:
                    report["cache_affinity"] = scenario_h(sizes, pin)
                except Exception as e:
                    report["cache_affinity"] = {"skipped": f"failed: {e!r}"[:300]}
            else:
                report["cache_affinity"] = {"skipped": "maclustr not among the targets"}
            print(f"      {report['cache_affinity']}", flush=True)

        for t in live:
            if t.metrics:
                report["metrics_scrape"][t.name] = scrape_metrics(t)
        if args.profile:
            for t in live:
                if t.name.startswith("maclustr"):
                    report.setdefault("profiles", {})[t.name] = profile(t, sizes, pin, scen)
        for t in live:
            report["rss"][t.name] = mem_kb(t.pids, "VmHWM") / 1024
    finally:
        for t in targets.values():
            for proc in t.procs:
                proc.stop()
        for proc in ups.procs:
            proc.stop()

    report["versions"] = {
        "python": platform.python_version(), "kernel": platform.release(),
        "machine": platform.machine(),
        "wrk": version_of(["wrk", "-v"]), "nginx": version_of(["nginx", "-v"]),
        "caddy": version_of(["caddy", "version"]),
        "litellm": version_of([str(LITELLM_VENV / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print(m.version('litellm'))"]),
        "maclustr": version_of([PY, "-c", "import maclustr; print(maclustr.__version__)"]),
        "aiohttp": version_of([PY, "-c", "import aiohttp; print(aiohttp.__version__)"]),
        "uvloop": version_of([PY, "-c", "import uvloop; print(uvloop.__version__)"]),
        "mlx_lm": version_of([PY, "-c",
                              "import importlib.metadata as m; print(m.version('mlx-lm'))"]),
    }
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    table = build_tables(report)
    header = (f"# maclustr benchmark ({'quick' if args.quick else 'full'} run)\n\n"
              f"{report['date']}, nproc {report['nproc']}, {report['placement']}; upstream "
              f"{report['upstream_mode']}; {sizes.rounds} interleaved round(s), medians; "
              f"ratios are × direct from this run; added = target − direct. "
              f"Elapsed {report['elapsed_s']} s.\n\n"
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
              + "\n\nTargets: " + "; ".join(
                  f"{n}: {i['note'] or ''}" for n, i in report["target_info"].items()) + "\n\n")
    md = header + headline(report) + table + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    print("\n" + md)
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
