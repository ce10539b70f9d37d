"""The fake upstreams and the targets in front of them (direct, nginx, Caddy, LiteLLM,
maclustr, the byte pipes): how each is started and checked."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    BURST_CHUNKS,
    BURST_PACE_MS,
    KEY,
    MODEL,
    PY,
    QUEUE_LIMITS,
    STREAM_CHUNKS,
    TRICKLE_MS,
    WORK,
    Sizes,
)
from bench.procs import Pinning, Proc, spawn, try_apt, version_of, wait_http
from maclustr.harness import free_port

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
                   tree: Path | None = None, usage: str = "", label: str = "") -> Target:
    name = label or ("maclustr-quiet" if quiet else "maclustr-asyncio" if loop == "asyncio"
                     else "maclustr-metrics" if metrics
                     else f"maclustr-{usage}" if usage else "maclustr")
    t = Target(name)
    exe = Path(PY).parent / "maclustr"
    if not exe.exists():
        t.error = f"{exe} not found (run `make install`)"
        return t
    # --baseline (maclustr@<commit>): the same venv running another checkout's code (its tree
    # first on the path), so commits are measured side by side in one run
    # maclustr-keys: the bench key named `bench` under a `keys:` policy (issue 28)
    run_env = dict(os.environ, MACLUSTR_API_KEY=f"bench:{KEY}" if usage == "keys" else KEY)
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
    if usage:
        ledger, keys = usage_settings(usage, d)
        routes.write_text("\n".join(lifted + gateway + ledger + keys) + "\n")
        check = subprocess.run([*maclustr, "check", "--routes", str(routes)],
                               capture_output=True, timeout=30, env=run_env, cwd=tree)
        if check.returncode != 0:
            t.error = "this build has no team keys / usage ledger (issue 28)"
            return t
        t.note += ledger[0].strip() + ("; keys: bench, every limit far above the load; "
                                       if keys else "; ")
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


def usage_settings(usage: str, d: Path) -> tuple[list[str], list[str]]:
    """Issue 28's cost: `keys` = a policy on the bench key (every limit set far above the
    load, max_in_flight so every request goes through the scheduler's queue check) and the
    usage ledger in SQLite; `no-ledger` = neither (`gateway.usage_db: false`)."""
    if usage == "no-ledger":
        return ["  usage_db: false"], []
    db = d / "usage.sqlite3"
    for f in d.glob("usage.sqlite3*"):
        f.unlink()
    return [f"  usage_db: {db}"], [
        "keys:", "  bench:", "    requests_per_minute: 100000000",
        "    tokens_per_minute: 1000000000", "    tokens_per_day: 100000000000",
        "    max_in_flight: 10000", '  "*":', "    tokens_per_day: 100000000000"]


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
    "maclustr-keys": lambda u, p, h: start_maclustr(u, p, h, usage="keys"),
    "maclustr-no-ledger": lambda u, p, h: start_maclustr(u, p, h, usage="no-ledger"),
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
