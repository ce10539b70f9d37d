"""Run maclustr locally against two real ``mlx_lm.server`` processes.

Why: the production cluster is two Mac Studios serving four large models; this demo stands
them in with two loopback ``mlx_lm.server`` processes (ports 8081, 8082) and four tiny
random-weight models, so anyone can try the gateway end to end on a laptop in seconds.
Random weights mean the answers are gibberish; the plumbing is what is on show.

Usage (with the project venv's python, which has mlx and mlx-lm)::

    .venv/bin/python demo/run.py              # upstreams + gateway on :9000
    .venv/bin/python demo/run.py --no-gateway # upstreams + routes.yaml only

Stdlib plus maclustr.harness (shared with bench/ and tests/). Everything it starts it stops
again, by PID, on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from maclustr.harness import build_in_child, start_mlx_server, stop, wait_healthy

REPO = pathlib.Path(__file__).resolve().parent.parent

DEFAULT_KEY = "ml-demo-key-001"
NODE_PORTS = {"node1": 8081, "node2": 8082}


@dataclass(frozen=True)
class Route:
    """One public alias: which tiny model stands in for it and which node serves it."""

    alias: str
    model_name: str
    seed: int
    node: str
    description: str
    parameters: str


ROUTES: list[Route] = [
    Route("maclustr-coder", "qwen3-coder-30b-a3b", 1, "node1",
          "Coding and agent development model", "30B (MoE · 3B active)"),
    Route("maclustr-general", "qwen3-32b", 2, "node1",
          "General-purpose assistant model", "32B"),
    Route("maclustr-reasoning", "qwq-32b-reasoning", 3, "node2",
          "Reasoning, math, econometrics, and complex analysis model", "32B"),
    Route("maclustr-fast", "mistral-small-24b", 4, "node2",
          "Fast model for summaries, routing, rewriting, and lightweight chat", "24B"),
]  # fmt: skip


class Stop(Exception):
    """Raised from the SIGTERM handler so cleanup runs through the same ``finally``."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Stop(f"signal {signum}")


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:``port`` (so we do not talk to a stranger)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def build_models(models_dir: pathlib.Path) -> None:
    """Create the four tiny models, reusing any that already exist (one subprocess)."""
    build_in_child([(models_dir / r.model_name, r.seed) for r in ROUTES], timeout=120)


def write_routes(path: pathlib.Path, models_dir: pathlib.Path) -> None:
    """Write routes.yaml by hand (stdlib only); strings are JSON-quoted, valid YAML."""

    def q(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)

    lines = ["models:"]
    for r in ROUTES:
        lines += [
            f"  {r.alias}:",
            f"    model: {q(str(models_dir / r.model_name))}   # internal model id, sent upstream",
            f"    upstream: http://127.0.0.1:{NODE_PORTS[r.node]}",
            f"    description: {q(r.description)}",
            f"    parameters: {q(r.parameters)}",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def curl_lines(base: str, key: str) -> list[str]:
    """Ready-to-paste requests against the gateway."""
    auth = f"-H {shlex.quote('Authorization: Bearer ' + key)}"
    ct = "-H 'Content-Type: application/json'"
    stream = {
        "model": "maclustr-coder",
        "stream": True,
        "max_tokens": 32,
        "temperature": 1.0,
        "messages": [{"role": "user", "content": "Write hello world in Python"}],
    }
    unary = {
        "model": "maclustr-general",
        "max_tokens": 32,
        "temperature": 1.0,
        "messages": [{"role": "user", "content": "Say hello"}],
    }
    return [
        f"curl -N {base}/v1/chat/completions {auth} {ct} -d {shlex.quote(json.dumps(stream))}",
        f"curl {base}/v1/chat/completions {auth} {ct} -d {shlex.quote(json.dumps(unary))}",
        f"curl {base}/v1/models {auth}",
        f"curl '{base}/health?deep=true' {auth}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Start upstreams, write routes, then run the gateway (or wait) until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000, help="gateway port (default 9000)")
    parser.add_argument(
        "--no-gateway", action="store_true", help="start upstreams and write routes only, then wait"
    )
    parser.add_argument(
        "--dir",
        type=pathlib.Path,
        default=REPO / ".demo",
        help="work directory (default <repo>/.demo)",
    )
    parser.add_argument(
        "--max-hours", type=float, default=12.0, help="stop by itself after this long (default 12)"
    )
    args = parser.parse_args(argv)

    work: pathlib.Path = args.dir.resolve()
    models_dir = work / "models"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    key = os.environ.get("DEMO_KEY", DEFAULT_KEY)

    busy = [p for p in [*NODE_PORTS.values(), args.port] if not port_is_free(p)]
    if busy:
        print(f"ports already in use on 127.0.0.1: {busy}; stop whatever holds them first.")
        return 2

    t0 = time.monotonic()
    build_models(models_dir)
    print(f"models ready in {models_dir} ({time.monotonic() - t0:.1f}s)")
    routes_path = work / "routes.yaml"
    write_routes(routes_path, models_dir)
    print(f"routes written to {routes_path}")

    signal.signal(signal.SIGTERM, _on_sigterm)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node, port in NODE_PORTS.items():
            first = next(r for r in ROUTES if r.node == node)
            log = logs / f"{node}.log"
            procs.append(start_mlx_server(models_dir / first.model_name, port, log))
            print(f"{node}: mlx_lm.server pid {procs[-1].pid} on 127.0.0.1:{port}, log {log}")
        for proc, port in zip(procs, NODE_PORTS.values(), strict=True):
            wait_healthy(f"http://127.0.0.1:{port}", timeout=60, proc=proc)
        print(f"both nodes healthy ({time.monotonic() - t0:.1f}s)")

        base = f"http://127.0.0.1:{args.port}"
        print(f"\nMACLUSTR_API_KEY={key}\n\nTry (once the gateway says it is listening):")
        for line in curl_lines(base, key):
            print(f"  {line}\n")
        if args.no_gateway:
            r = ROUTES[0]
            direct = {
                "model": str(models_dir / r.model_name),
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "hi"}],
            }
            print("--no-gateway: upstreams only. Direct to node1, for example:")
            print(
                f"  curl http://127.0.0.1:{NODE_PORTS[r.node]}/v1/chat/completions "
                f"-d {shlex.quote(json.dumps(direct))}\n"
            )
            print("Ctrl-C to stop.")
            for _ in range(int(args.max_hours * 3600 / 0.5)):
                dead = [p.pid for p in procs if p.poll() is not None]
                if dead:
                    print(f"upstream exited unexpectedly: pid {dead}; see {logs}")
                    return 1
                time.sleep(0.5)
            return 0

        env = dict(os.environ, MACLUSTR_API_KEY=key)
        cmd = [sys.executable, "-m", "maclustr", "serve",
               "--routes", str(routes_path), "--port", str(args.port)]  # fmt: skip
        print("$ " + shlex.join(cmd), flush=True)
        gateway = subprocess.Popen(cmd, env=env, cwd=REPO)
        procs.insert(0, gateway)  # stopped first
        try:
            return gateway.wait(timeout=args.max_hours * 3600)
        except subprocess.TimeoutExpired:
            return 0
    except (KeyboardInterrupt, Stop):
        print("\nstopping…")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        for proc in procs:
            stop(proc)
        print(f"stopped pids {[p.pid for p in procs]}")


if __name__ == "__main__":
    raise SystemExit(main())
