"""Deploying routes.yaml onto the nodes: cluster validation, rendered launchd plists,
`make deploy` (dry run and a recorded run through SSH/RSYNC recorders), re-homing order, and
the nginx front keeping SSE streams unbuffered."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import plistlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, free_port, require_command, routes_yaml
from fake_mlx import Behavior, FakeMLX

from maclustr.cli import main as cli_main
from maclustr.cluster import plan_cluster
from maclustr.config import ConfigError, parse_routes

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-deploy-test-secret-0123456789"

TWO_NODES = textwrap.dedent("""\
    nodes:
      studio-1:
        ssh: admin@studio-1.local
        gateway: true
      studio-2: admin@studio-2.local
    models:
      maclustr-coder:
        model: mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit
        upstream: http://studio-1.local:8081
        mlx_args: ["--decode-concurrency", "4"]
      maclustr-fast:
        model: mlx-community/Mistral-Small-3.2-24B-Instruct-2506-4bit
        upstream: http://studio-2.local:8082
    """)
# maclustr-fast moved from studio-2 to studio-1 (new port there).
REHOMED = TWO_NODES.replace("http://studio-2.local:8082", "http://studio-1.local:8083")


# --- cluster validation ------------------------------------------------------------------


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    p = tmp_path / "routes.yaml"
    p.write_text(text)
    code = cli_main(["check", "--routes", str(p)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_check_shows_which_node_runs_what(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path, TWO_NODES, capsys)
    assert code == 0, out
    assert "node studio-1 (admin@studio-1.local): gateway :9000, maclustr-coder :8081" in out
    assert "node studio-2 (admin@studio-2.local): maclustr-fast :8082" in out


def test_node_is_derived_from_upstream_host_or_node_host() -> None:
    text = textwrap.dedent("""\
        nodes:
          a: {ssh: admin@10.0.0.5, host: studio-1.local}
          b: admin@studio-2.local
        models:
          m1: {model: x, upstream: "http://studio-1.local:8081"}
          m2: {model: y, upstream: "http://STUDIO-2.local:8081"}
          m3: {model: z, upstream: "http://10.0.0.5:8082", node: a}
        """)
    plans = {p.node.name: p for p in plan_cluster(parse_routes(text))}
    assert [s.alias for s in plans["a"].services] == ["m1", "m3"]
    assert [s.alias for s in plans["b"].services] == ["m2"]
    assert plans["a"].gateway and not plans["b"].gateway  # first node by default


@pytest.mark.parametrize(("models", "message"), [
    ('  m1: {model: x, upstream: "http://studio-3.local:8081"}\n',
     "upstream host 'studio-3.local' is not a declared node"),
    ('  m1: {model: x, upstream: "http://studio-1.local:8081"}\n'
     '  m2: {model: y, upstream: "http://studio-1.local:8081"}\n',
     "port 8081 on node 'studio-1' is already used by models.m1"),
    ('  m1: {model: x, upstream: "http://studio-1.local:9000"}\n',
     "port 9000 on node 'studio-1' is already used by the gateway"),
    ('  m1: {model: x, upstream: "http://studio-2.local:8081", node: studio-1}\n',
     "upstream host 'studio-2.local' is not node 'studio-1'"),
    ('  m1: {model: x, upstream: "http://studio-1.local"}\n',
     "give the port explicitly"),
])
def test_check_rejects_models_that_cannot_be_deployed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], models: str, message: str) -> None:
    text = ("nodes:\n  studio-1: admin@studio-1.local\n  studio-2: admin@studio-2.local\n"
            "models:\n" + models)
    code, out = check(tmp_path, text, capsys)
    assert code == 1
    assert message in out


def test_routes_without_nodes_still_check_and_serve_as_before(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path, routes_yaml({"a": "http://10.1.1.1:8081",
                                             "b": "http://10.1.1.1:8081"}), capsys)
    assert code == 0 and "OK, 2 models" in out and "node " not in out


def test_a_secret_looking_node_env_is_refused() -> None:
    text = TWO_NODES.replace("    gateway: true\n",
                             "    gateway: true\n    env: {MACLUSTR_API_KEY: nope}\n")
    with pytest.raises(ConfigError, match=r"secrets do not go in routes\.yaml"):
        plan_cluster(parse_routes(text))


# --- rendered plists -----------------------------------------------------------------------


def render(tmp_path: Path, text: str, node: str) -> dict[str, dict[str, Any]]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(text)
    out = tmp_path / f"plists-{node}"
    r = subprocess.run([sys.executable, "-m", "maclustr", "plists", "--node", node, "--out",
                        str(out), "--routes", str(routes)], cwd=ROOT, capture_output=True,
                       env={**os.environ, "MACLUSTR_API_KEY": SECRET}, timeout=30)
    assert r.returncode == 0, r.stderr
    docs = {}
    for f in sorted(out.iterdir()):
        raw = f.read_bytes()
        assert SECRET.encode() not in raw
        docs[f.name] = plistlib.loads(raw)
    return docs


def test_plists_for_a_node_parse_and_run_the_right_programs(tmp_path: Path) -> None:
    one = render(tmp_path, TWO_NODES, "studio-1")
    assert sorted(one) == ["io.maclustr.gateway.plist", "io.maclustr.mlx.maclustr-coder.plist"]
    coder = one["io.maclustr.mlx.maclustr-coder.plist"]
    assert coder["Label"] == "io.maclustr.mlx.maclustr-coder"
    assert coder["ProgramArguments"] == [
        "/Users/admin/maclustr/venv/bin/mlx_lm.server",
        "--model", "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit",
        "--host", "studio-1.local", "--port", "8081", "--decode-concurrency", "4"]
    assert coder["EnvironmentVariables"]["HF_HUB_OFFLINE"] == "1"
    gw = one["io.maclustr.gateway.plist"]
    assert gw["Label"] == "io.maclustr.gateway"
    args = gw["ProgramArguments"]
    assert args[:2] == ["/bin/sh", "-c"] and args[3] == "/Users/admin/.config/maclustr/env"
    assert args[4:] == ["/Users/admin/maclustr/venv/bin/maclustr", "serve", "--routes",
                        "/Users/admin/maclustr/conf/routes.yaml", "--host", "127.0.0.1",
                        "--port", "9000"]
    assert "MACLUSTR_API_KEY" not in gw["EnvironmentVariables"]
    for d in one.values():
        assert d["RunAtLoad"] is True and d["KeepAlive"] == {"SuccessfulExit": False}
        assert d["ThrottleInterval"] >= 5 and d["WorkingDirectory"] == "/Users/admin/maclustr"
        for key in ("StandardOutPath", "StandardErrorPath"):
            assert d[key].startswith("/Users/admin/Library/Logs/maclustr/" + d["Label"])
    two = render(tmp_path, TWO_NODES, "studio-2")
    assert list(two) == ["io.maclustr.mlx.maclustr-fast.plist"]


def test_gateway_wrapper_loads_the_key_from_the_env_file_only(tmp_path: Path) -> None:
    """Run the plist's ProgramArguments with a stand-in program: the key reaches the
    process environment from the env file, and nowhere else."""
    gw = render(tmp_path, TWO_NODES, "studio-1")["io.maclustr.gateway.plist"]
    envfile = tmp_path / "env"
    envfile.write_text(f"MACLUSTR_API_KEY={SECRET}\n")
    args = list(gw["ProgramArguments"])
    args[3] = str(envfile)
    args[4:] = [sys.executable, "-c", "import os; print(os.environ['MACLUSTR_API_KEY'])"]
    env = {k: v for k, v in os.environ.items() if k != "MACLUSTR_API_KEY"}
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=10)
    assert r.returncode == 0 and r.stdout.strip() == SECRET
    r = subprocess.run([*args[:3], str(tmp_path / "missing"), *args[4:]], capture_output=True,
                       text=True, env=env, timeout=10)
    assert r.returncode != 0  # launchd restarts it after ThrottleInterval, key still unread


def test_plists_follow_node_paths_and_drop_services_that_left(tmp_path: Path) -> None:
    text = TWO_NODES.replace(
        "  studio-2: admin@studio-2.local\n",
        "  studio-2:\n    ssh: ops@studio-2.local\n    venv: /opt/mlx\n"
        "    log_dir: /var/log/mlx\n    bind: 0.0.0.0\n    env: {HF_HOME: /Volumes/m/hf}\n")
    fast = render(tmp_path, text, "studio-2")["io.maclustr.mlx.maclustr-fast.plist"]
    assert fast["ProgramArguments"][0] == "/opt/mlx/bin/mlx_lm.server"
    assert fast["ProgramArguments"][4] == "0.0.0.0"
    assert fast["StandardErrorPath"] == "/var/log/mlx/io.maclustr.mlx.maclustr-fast.err.log"
    assert fast["WorkingDirectory"] == "/Users/ops/maclustr"
    assert fast["EnvironmentVariables"]["HF_HOME"] == "/Volumes/m/hf"
    # re-rendering into the same directory after the move leaves nothing stale behind
    assert render(tmp_path, REHOMED, "studio-2") == {}


# --- make deploy ---------------------------------------------------------------------------

SSH_RECORDER = r'''
import json, os, re, sys
from pathlib import Path
log, state = os.environ["REC_LOG"], Path(os.environ["REC_STATE"])
target, command = sys.argv[1], " ".join(sys.argv[2:])
with open(log, "a") as f:
    f.write(json.dumps({"tool": "ssh", "target": target, "command": command}) + "\n")
agents = state / target / "Library/LaunchAgents"
if command.startswith("ls -1 ~/Library/LaunchAgents/"):
    for p in sorted(agents.glob("io.maclustr.*")):
        print(p.name)
for name in re.findall(r"rm -f ~/Library/LaunchAgents/(\S+)", command):
    (agents / name).unlink(missing_ok=True)
'''

RSYNC_RECORDER = r'''
import filecmp, json, os, shutil, sys
from pathlib import Path
log, state = os.environ["REC_LOG"], Path(os.environ["REC_STATE"])
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(json.dumps({"tool": "rsync", "argv": args}) + "\n")
paths = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-e"]
src, dest = Path(paths[0]), paths[1]
target, _, rpath = dest.partition(":")
root = state / target / rpath.lstrip("/")
root.mkdir(parents=True, exist_ok=True)
have = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
for rel in sorted(have):
    d = root / rel
    if not d.exists() or not filecmp.cmp(src / rel, d, shallow=False):
        print((">f+++++++++ " if not d.exists() else ">f.st...... ") + rel)
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, d)
if "--delete" in args:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() not in have:
            print("*deleting   " + p.relative_to(root).as_posix())
            p.unlink()
'''


class Cluster:
    """A recorded `make deploy`: SSH/RSYNC are scripts that log their argv and emulate the
    remote side's files (LaunchAgents, app, conf) under `remote/<ssh target>/`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.log = tmp / "calls.jsonl"
        self.remote = tmp / "remote"
        self.state = tmp / "deploy-state"
        self.routes = tmp / "routes.yaml"
        self.ssh = tmp / "rec-ssh"
        self.rsync = tmp / "rec-rsync"
        # a snapshot of the code, so edits to the checkout while tests run change nothing
        self.source = tmp / "source"
        shutil.copytree(ROOT / "maclustr", self.source / "maclustr",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("setup.cfg", "pyproject.toml"):
            shutil.copy(ROOT / name, self.source / name)
        for path, body in ((self.ssh, SSH_RECORDER), (self.rsync, RSYNC_RECORDER)):
            path.write_text(f"#!{sys.executable}\n{body}")
            path.chmod(0o755)

    def make(self, text: str, *extra: str,
             target: str = "deploy") -> tuple[str, list[dict[str, Any]]]:
        """Run make; return its stdout and the calls recorded during this run."""
        self.routes.write_text(text)
        self.log.write_text("")
        r = subprocess.run(
            ["make", "-s", "-o", ".venv/.installed", target, f"PY={sys.executable}",
             f"ROUTES={self.routes}", f"DEPLOY_STATE={self.state}", f"SSH={self.ssh}",
             f"RSYNC={self.rsync}", f"DEPLOY_SOURCE={self.source}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "REC_LOG": str(self.log), "REC_STATE": str(self.remote),
                 "MACLUSTR_API_KEY": SECRET})
        assert r.returncode == 0, r.stdout + r.stderr
        assert SECRET not in r.stdout + r.stderr
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return r.stdout, calls

    def agents(self, node: str) -> list[str]:
        d = self.remote / f"admin@{node}.local" / "Library/LaunchAgents"
        return sorted(p.name for p in d.glob("*.plist"))


def launchctl(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(node, launchctl action + label) for every launchctl use, in order."""
    out = []
    for c in calls:
        if c["tool"] != "ssh":
            continue
        node = c["target"].split("@")[1].removesuffix(".local")
        for part in c["command"].split(";"):
            words = part.split()
            if "launchctl" in words:
                i = words.index("launchctl")
                action = words[i + 1]
                arg = next(w for w in words[i + 2:] if "io.maclustr." in w)
                label = arg.rsplit("/", 1)[-1].removesuffix(".plist")
                out.append((node, f"{action} {label}"))
    return out


def test_dry_run_prints_every_command_and_runs_none(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    out, calls = c.make(TWO_NODES, "DRY_RUN=1")
    assert calls == []  # nothing ran, not even ssh
    printed = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert any(line.startswith(f"{c.rsync} ") and "admin@studio-2.local:Library/LaunchAgents/"
               in line for line in printed)
    for node, label in (("studio-1", "io.maclustr.gateway"),
                        ("studio-1", "io.maclustr.mlx.maclustr-coder"),
                        ("studio-2", "io.maclustr.mlx.maclustr-fast")):
        assert any(line.startswith(f"{c.ssh} admin@{node}.local") and
                   f"launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/{label}.plist"
                   in line for line in printed), label
    assert "would change 3 service(s)" in out


def test_recorded_deploy_installs_both_nodes_and_a_second_run_changes_nothing(
        tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    _, calls = c.make(TWO_NODES)
    assert c.agents("studio-1") == ["io.maclustr.gateway.plist",
                                    "io.maclustr.mlx.maclustr-coder.plist"]
    assert c.agents("studio-2") == ["io.maclustr.mlx.maclustr-fast.plist"]
    actions = launchctl(calls)
    assert ("studio-1", "bootstrap io.maclustr.mlx.maclustr-coder") in actions
    assert ("studio-2", "bootstrap io.maclustr.mlx.maclustr-fast") in actions
    # the gateway starts only after both model servers were bootstrapped
    assert actions.index(("studio-1", "bootstrap io.maclustr.gateway")) > max(
        actions.index(("studio-1", "bootstrap io.maclustr.mlx.maclustr-coder")),
        actions.index(("studio-2", "bootstrap io.maclustr.mlx.maclustr-fast")))
    routes = c.remote / "admin@studio-1.local/Users/admin/maclustr/conf/routes.yaml"
    assert routes.read_text() == TWO_NODES
    app = c.remote / "admin@studio-2.local/Users/admin/maclustr/app"
    assert (app / "maclustr/cli.py").read_bytes() == (c.source / "maclustr/cli.py").read_bytes()
    install = "pip install -q --force-reinstall --no-deps /Users/admin/maclustr/app"
    assert any(install in x.get("command", "") for x in calls)

    out, calls = c.make(TWO_NODES)
    assert launchctl(calls) == []
    assert not any("pip install" in x.get("command", "") for x in calls)
    assert "changed 0 service(s) (nothing to do)" in out
    out, calls = c.make(TWO_NODES, "DRY_RUN=1")
    assert calls == [] and "would change 0 service(s)" in out and "launchctl" not in out


def test_changing_only_routes_reloads_the_gateway_without_restarting_anything(
        tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.make(TWO_NODES)
    _, calls = c.make(TWO_NODES.replace("    mlx_args:", "    description: Coder\n    mlx_args:"))
    assert launchctl(calls) == [("studio-1", "kill io.maclustr.gateway")]
    assert "kill HUP gui/$(id -u)/io.maclustr.gateway" in calls[-1]["command"]


def test_rehoming_starts_the_new_server_reloads_then_stops_the_old(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.make(TWO_NODES)
    dry, none = c.make(REHOMED, "DRY_RUN=1")
    assert none == []
    _, calls = c.make(REHOMED)
    actions = launchctl(calls)
    new = actions.index(("studio-1", "bootstrap io.maclustr.mlx.maclustr-fast"))
    reload_ = actions.index(("studio-1", "kill io.maclustr.gateway"))
    old = actions.index(("studio-2", "bootout io.maclustr.mlx.maclustr-fast"))
    assert new < reload_ < old
    assert not any(a[1].endswith("maclustr-coder") for a in actions)  # untouched
    cmds = [x.get("command") or " ".join(x["argv"]) for x in calls]

    def first(pred: Any) -> int:
        return next(i for i, cmd in enumerate(cmds) if pred(cmd))

    healthy = first(lambda s: "curl" in s and "http://studio-1.local:8083/health" in s)
    conf = first(lambda s: "/maclustr/conf/" in s)  # the gateway sees the new table only now
    hup = first(lambda s: "kill HUP" in s)
    drain = first(lambda s: "lsof" in s)
    stop = first(lambda s: "rm -f ~/Library/LaunchAgents/io.maclustr.mlx.maclustr-fast" in s)
    started = first(lambda s: "bootstrap gui/$(id -u) ~/Library/LaunchAgents/"
                              "io.maclustr.mlx.maclustr-fast.plist" in s)
    assert started < healthy < conf < hup < drain < stop
    assert calls[drain]["target"] == calls[stop]["target"] == "admin@studio-2.local"
    assert c.agents("studio-1") == ["io.maclustr.gateway.plist",
                                    "io.maclustr.mlx.maclustr-coder.plist",
                                    "io.maclustr.mlx.maclustr-fast.plist"]
    assert c.agents("studio-2") == []
    # the dry run predicted the same launchctl sequence from the last deployed state
    dry_calls = [shlex.split(line[2:]) for line in dry.splitlines()
                 if line.startswith(f"+ {c.ssh} ")]
    dry_actions = launchctl([{"tool": "ssh", "target": argv[1], "command": argv[2]}
                             for argv in dry_calls])
    assert dry_actions == actions


def test_status_and_logs_ask_every_node(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    _, calls = c.make(TWO_NODES, target="status")
    cmds = [(x["target"], x["command"]) for x in calls]
    assert any(t == "admin@studio-1.local" and "/health?deep=1" in s for t, s in cmds)
    for t, label in (("admin@studio-1.local", "io.maclustr.gateway"),
                     ("admin@studio-2.local", "io.maclustr.mlx.maclustr-fast")):
        assert any(tt == t and f"launchctl print gui/$(id -u)/{label}" in s for tt, s in cmds)
    _, calls = c.make(TWO_NODES, "LOG_LINES=7", target="logs")
    assert {x["target"] for x in calls} == {"admin@studio-1.local", "admin@studio-2.local"}
    assert all("tail -n 7 " in x["command"] for x in calls)


# --- the shipped configuration -------------------------------------------------------------


def test_shipped_routes_dry_run_prints_the_real_plan_for_both_mac_studios(tmp_path: Path) -> None:
    """A fresh clone's `make deploy DRY_RUN=1` plans the seed's cluster: the gateway and two
    models on studio-1, two models on studio-2, every one of them started."""
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "deploy", "DRY_RUN=1",
                        f"PY={sys.executable}", f"DEPLOY_STATE={tmp_path / 'state'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("node studio-1 (admin@studio-1.local): gateway :9000, maclustr-coder :8081, "
            "maclustr-reasoning :8082") in r.stdout
    assert "node studio-2 (admin@studio-2.local): maclustr-general :8081, maclustr-fast :8082" \
        in r.stdout
    for node, label in (("studio-1", "gateway"), ("studio-1", "mlx.maclustr-coder"),
                        ("studio-1", "mlx.maclustr-reasoning"),
                        ("studio-2", "mlx.maclustr-general"), ("studio-2", "mlx.maclustr-fast")):
        assert any(line.startswith(f"+ ssh admin@{node}.local ") and
                   f"launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/io.maclustr.{label}"
                   in line for line in r.stdout.splitlines()), (node, label)
    assert "would change 5 service(s)" in r.stdout


def test_launchd_holds_the_plists_rendered_from_the_shipped_routes(tmp_path: Path) -> None:
    """launchd/<node>/ is exactly what `make plists` renders from routes.yaml: edit routes.yaml
    without running `make plists` and this fails."""
    fresh = tmp_path / "launchd"
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "plists", f"PY={sys.executable}",
                        f"PLISTS_DIR={fresh}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    def tree(d: Path) -> dict[str, bytes]:
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.plist"))}

    rendered, shipped = tree(fresh), tree(ROOT / "launchd")
    assert sorted(rendered) == ["studio-1/io.maclustr.gateway.plist",
                                "studio-1/io.maclustr.mlx.maclustr-coder.plist",
                                "studio-1/io.maclustr.mlx.maclustr-reasoning.plist",
                                "studio-2/io.maclustr.mlx.maclustr-fast.plist",
                                "studio-2/io.maclustr.mlx.maclustr-general.plist"]
    stale = sorted(n for n in rendered.keys() | shipped.keys()
                   if rendered.get(n) != shipped.get(n))
    assert not stale, f"launchd/ is stale, run `make plists`: {stale}"


def test_make_plists_drops_a_node_that_left(tmp_path: Path) -> None:
    out = tmp_path / "launchd"
    (out / "studio-9").mkdir(parents=True)
    (out / "studio-9" / "io.maclustr.mlx.gone.plist").write_text("old")
    routes = tmp_path / "routes.yaml"
    routes.write_text(TWO_NODES)
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "plists", f"PY={sys.executable}",
                        f"PLISTS_DIR={out}", f"ROUTES={routes}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "studio-1", "studio-1/io.maclustr.gateway.plist",
        "studio-1/io.maclustr.mlx.maclustr-coder.plist",
        "studio-2", "studio-2/io.maclustr.mlx.maclustr-fast.plist"]


# --- nginx in front of the gateway ---------------------------------------------------------


def loopback_nginx_conf(tmp: Path, listen: int, upstream: int, redirect: int) -> str:
    """deploy/nginx.conf with only the listen address, upstream port and paths changed, plus
    `proxy_ignore_headers X-Accel-Buffering`: the gateway already sends `X-Accel-Buffering:
    no`, which would hide a config that buffers; ignoring it proves the config itself."""
    conf = (ROOT / "deploy/nginx.conf").read_text()
    subs = {
        "listen 443 ssl;": f"listen 127.0.0.1:{listen};",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{redirect};",
        "listen [::]:80;": "",
        "server 127.0.0.1:9000;": f"server 127.0.0.1:{upstream};",
        "/run/nginx-maclustr.pid": str(tmp / "nginx.pid"),
        "/var/log/nginx/": str(tmp) + "/",
    }
    for old, new in subs.items():
        assert old in conf, old
        conf = conf.replace(old, new)
    lines = [ln for ln in conf.splitlines()
             if not ln.strip().startswith(("ssl_", "user "))]
    conf = "\n".join(lines)
    # temp paths in the test dir: nginx runs as the current user
    temps = "".join(f"    {k}_temp_path {tmp}/{k};\n"
                    for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    assert "proxy_pass http://maclustr;" in conf
    conf = conf.replace("proxy_pass http://maclustr;",
                        "proxy_pass http://maclustr;\n    proxy_ignore_headers X-Accel-Buffering;")
    return conf.replace("http {", "http {\n" + temps, 1)


@pytest.fixture
def nginx_bin() -> str:
    return require_command("nginx", "the Debian package nginx-light (`make test` installs it)",
                           "/usr/sbin/nginx", "/usr/local/sbin/nginx")


async def test_nginx_front_relays_sse_events_one_by_one(
        nginx_bin: str, fake: FakeMLX, gateway_process: Any, tmp_path: Path) -> None:
    routes = tmp_path / "gw-routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}))
    gw = gateway_process(routes)
    gw_port = int(gw.url.rsplit(":", 1)[1])
    listen = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(loopback_nginx_conf(tmp_path, listen, gw_port, free_port()))
    test = subprocess.run([nginx_bin, "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=10)
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen([nginx_bin, "-p", str(tmp_path), "-c", str(conf),
                             "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    async with s.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "nginx did not come up"
                await asyncio.sleep(0.05)
            fake.push(Behavior(events=4, delay=0.3))
            body = {"model": "maclustr-fast", "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}
            arrivals: list[float] = []
            models = set()
            async with s.post(base + "/v1/chat/completions", json=body, headers=AUTH) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.monotonic())
                        models.add(json.loads(line[6:])["model"])
                    if line.startswith(b"data: [DONE]"):
                        break
        assert models == {"maclustr-fast"}
        gaps = [b - a for a, b in itertools.pairwise(arrivals[:4])]
        assert len(arrivals) >= 4 and len(gaps) == 3
        assert min(gaps) >= 0.25, gaps  # each event arrived on its own, not in one flush
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)



async def test_rehoming_sequence_fails_no_request(
        fake: FakeMLX, fake2: FakeMLX, gateway_process: Any, tmp_path: Path) -> None:
    """What `make deploy` does on a move, against a real gateway process: the new server is
    up, the gateway gets SIGHUP (launchctl kill HUP), the old server drains its established
    connections (the lsof wait), then stops. Traffic runs throughout and nothing fails."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}))
    gw = gateway_process(routes, "--reload-interval", "0")  # SIGHUP is the only trigger
    fake.push(Behavior(events=6, delay=0.2))  # a stream in flight across the move
    statuses: list[int] = []
    stop = asyncio.Event()
    body = {"model": "maclustr-fast", "messages": [{"role": "user", "content": "hi"}]}

    async with aiohttp.ClientSession() as s:
        async def long_stream() -> bytes:
            async with s.post(gw.url + "/v1/chat/completions", headers=AUTH,
                              json={**body, "stream": True}) as r:
                assert r.status == 200
                return await r.read()

        async def traffic() -> None:
            while not stop.is_set():
                async with s.post(gw.url + "/v1/chat/completions", json=body,
                                  headers=AUTH) as r:
                    await r.read()
                    statuses.append(r.status)

        streaming = asyncio.ensure_future(long_stream())
        await fake.wait_requests(1)
        loops = [asyncio.ensure_future(traffic()) for _ in range(3)]
        routes.write_text(routes_yaml({"maclustr-fast": fake2.url}))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not fake2.requests:
            assert time.monotonic() < deadline, "the gateway never switched to the new server"
            await asyncio.sleep(0.02)
        while fake.open_connections:  # drain: the stream that started before the reload
            assert time.monotonic() < deadline, "the old server never drained"
            await asyncio.sleep(0.02)
        before_stop = len(fake.requests)
        await fake.close()  # launchctl bootout on the old node
        n = len(statuses)
        while len(statuses) < n + 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*loops)
        streamed = await streaming
    assert streamed.rstrip().endswith(b"data: [DONE]")
    assert statuses and set(statuses) == {200}, statuses
    assert len(fake.requests) == before_stop
