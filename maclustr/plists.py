"""launchd plists for one node, rendered from its cluster plan with plistlib.

Pure: returns {filename: bytes}. Rendering is deterministic (sorted keys, no timestamps) so
that comparing a fresh render with the installed file tells whether a service changed, which
is what makes `make deploy` idempotent. No secret is ever read here: the gateway's key comes
from the node's env file at start time (see deploy/README.md).
"""

from __future__ import annotations

import plistlib
from typing import Any

from .cluster import GATEWAY_LABEL, MLXService, NodePlan

GATEWAY_THROTTLE = 5  # seconds between restarts after a crash
MLX_THROTTLE = 10  # a crash-looping model server must not hammer the GPU with reloads
BASE_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
# Load the env file (mode 600, service account only) into the environment, then become the
# gateway. "$0" is the env file, "$@" the gateway command: no quoting games, no key in argv.
ENV_WRAPPER = 'set -a && . "$0" && set +a && exec "$@"'


def _common(plan: NodePlan, label: str, program: list[str], throttle: int,
            env: dict[str, str]) -> dict[str, Any]:
    return {
        "Label": label,
        "ProgramArguments": program,
        "RunAtLoad": True,
        # Restart when it crashes or exits non-zero; a clean exit (0) stays down, so a
        # deliberate stop is not undone behind the operator's back.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": throttle,
        "WorkingDirectory": plan.dir,
        "StandardOutPath": f"{plan.log_dir}/{label}.out.log",
        "StandardErrorPath": f"{plan.log_dir}/{label}.err.log",
        "EnvironmentVariables": env,
    }


def gateway_plist(plan: NodePlan, shutdown_grace: float) -> dict[str, Any]:
    program = ["/bin/sh", "-c", ENV_WRAPPER, plan.env_file, f"{plan.venv}/bin/maclustr",
               "serve", "--routes", plan.routes_path, "--host", "127.0.0.1",
               "--port", str(plan.gateway_port)]
    env = {"PATH": f"{plan.venv}/bin:{BASE_PATH}", "PYTHONUNBUFFERED": "1"}
    d = _common(plan, GATEWAY_LABEL, program, GATEWAY_THROTTLE, env)
    d["ProcessType"] = "Standard"
    # launchd sends SIGTERM, then SIGKILL after ExitTimeOut: leave room for the drain.
    d["ExitTimeOut"] = int(shutdown_grace) + 5
    return d


def mlx_plist(plan: NodePlan, svc: MLXService) -> dict[str, Any]:
    program = [f"{plan.venv}/bin/mlx_lm.server", "--model", svc.model, "--host", svc.bind,
               "--port", str(svc.port), *svc.mlx_args]
    env = {"PATH": f"{plan.venv}/bin:{BASE_PATH}", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", **plan.env}
    d = _common(plan, svc.label, program, MLX_THROTTLE, env)
    # Background agents get throttled CPU/GPU QoS on macOS; a model server is latency-bound.
    d["ProcessType"] = "Interactive"
    d["ExitTimeOut"] = 30
    return d


def sharded_plist(plan: NodePlan, svc: MLXService) -> dict[str, Any]:
    """Rank 0's job: mlx.launch starts every rank (the others over ssh) and rank 0 serves HTTP.

    The command after `--` runs on every rank, so it names the venv's mlx_lm.server by its
    absolute path (the same on every shard node, `maclustr check` makes sure) and passes the
    environment with --env: a remote rank does not inherit this plist's variables."""
    env = {"PATH": f"{plan.venv}/bin:{BASE_PATH}", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", **plan.env}
    program = [f"{plan.venv}/bin/mlx.launch", "--hostfile", plan.hostfile_path(svc),
               "--backend", svc.backend, "--starting-port", str(svc.ring_port),
               *(f"--env={k}={v}" for k, v in env.items() if k != "PATH"),
               "--", f"{plan.venv}/bin/mlx_lm.server", "--model", svc.model,
               "--host", svc.bind, "--port", str(svc.port),
               *(["--pipeline"] if svc.pipeline else []), *svc.mlx_args]
    d = _common(plan, svc.label, program, MLX_THROTTLE, env)
    # mlx.launch exits 0 when a rank dies (it stops the others and returns normally; seen
    # with mlx 0.32.4), so "restart only after a failure" would leave the group down.
    d["KeepAlive"] = True
    d["ProcessType"] = "Interactive"
    d["ExitTimeOut"] = 30
    return d


def render_node(plan: NodePlan, shutdown_grace: float = 30.0) -> dict[str, bytes]:
    """{"<label>.plist": XML bytes} for every service on this node."""
    docs: list[dict[str, Any]] = []
    if plan.gateway:
        docs.append(gateway_plist(plan, shutdown_grace))
    docs += [sharded_plist(plan, s) if s.shards else mlx_plist(plan, s) for s in plan.services]
    return {f"{d['Label']}.plist": plistlib.dumps(d, sort_keys=True) for d in docs}
