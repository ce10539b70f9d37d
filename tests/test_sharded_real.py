"""A REAL sharded model: two ranks of mlx_lm.server under `mlx.launch --backend ring` on
loopback, started exactly as rank 0's launchd job would start them, with the gateway process
in front and the official openai SDK as the client.

How it runs here: `maclustr plists` renders rank 0's plist and `maclustr hostfile` its
hostfile for a routes.yaml whose two nodes are both 127.0.0.1 (mlx.launch starts a rank
without ssh when its "ssh" is exactly 127.0.0.1); the test then does launchd's part: it runs
the plist's ProgramArguments with its EnvironmentVariables and WorkingDirectory, in a process
group of its own so that every process it starts is stopped by that group's id.

Facts observed by hand (mlx 0.32.4, mlx-lm 0.32.2, Linux, CPU backend, 2 busy cores): the
group answered /health 10-25 s after start (rank 1 retries the ring connection each second
until rank 0 listens); after `kill -9` of rank 1, rank 0's generation thread raised
"[ring] connection to a peer was lost", mlx.launch SIGTERMed rank 0 (its port refused
connections 0.2 s after the kill) and exited 1.4 s after the kill with status 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from conftest import KEY, ROOT
from openai import OpenAI

from maclustr.harness import free_port, make_tiny_model, require, wait_healthy

pytestmark = pytest.mark.real_upstream

ALIAS = "maclustr-giant"
LABEL = f"io.maclustr.mlx.{ALIAS}"
NODES = ("studio-a", "studio-b")  # node names: never shown to the public


def free_ring_ports(n: int) -> int:
    """The first of `n` consecutive ports that can be bound now, below Linux's ephemeral range
    (32768+): the ring's ports are consecutive, and a port just above a free one may be the
    local end of some outgoing connection (that made rank 1's bind fail with EADDRINUSE)."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - n)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError("no free run of ring ports")


class ShardedGroup:
    """Rank 0's launchd job for a two-rank group on loopback, run by hand."""

    def __init__(self, tmp: Path, model: Path) -> None:
        self.tmp = tmp
        self.model = model
        self.port = free_port()
        self.ring_port = free_ring_ports(2)
        home = tmp / "home"
        venv = Path(sys.executable).parent.parent  # the venv running the tests
        self.routes = tmp / "routes.yaml"
        node = (f"{{ssh: 127.0.0.1, host: 127.0.0.1, home: {home}, venv: {venv}, "
                f"gateway_port: {free_port()}}}")
        self.routes.write_text(
            f"nodes:\n  {NODES[0]}: {node}\n  {NODES[1]}: {node}\n"
            f"models:\n  {ALIAS}:\n    model: {json.dumps(str(model))}\n"
            f"    upstream: http://127.0.0.1:{self.port}\n"
            f"    shards: [{NODES[0]}, {NODES[1]}]\n    backend: ring\n"
            f"    ring_port: {self.ring_port}\n    description: Sharded test model\n"
            f"    parameters: 1M\n")
        self.url = f"http://127.0.0.1:{self.port}"
        agents = tmp / "agents"
        self.cli("plists", "--node", NODES[0], "--out", str(agents))
        self.plist = plistlib.loads((agents / f"{LABEL}.plist").read_bytes())
        hostfile = Path(self.plist["ProgramArguments"][2])
        hostfile.parent.mkdir(parents=True)
        hostfile.write_text(self.cli("hostfile", "--model", ALIAS))
        Path(self.plist["WorkingDirectory"]).mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "maclustr", *args, "--routes",
                            str(self.routes)], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self) -> subprocess.Popen[bytes]:
        """What launchd does with the plist (KeepAlive restarts it the same way)."""
        p = self.plist
        log = Path(p["StandardErrorPath"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as err, Path(p["StandardOutPath"]).open("ab") as out:
            proc = subprocess.Popen(
                p["ProgramArguments"], cwd=p["WorkingDirectory"], stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
                env={**p["EnvironmentVariables"], "HOME": str(self.tmp / "home")})
        self.started.append(proc)
        return proc

    def log(self) -> str:
        return Path(self.plist["StandardErrorPath"]).read_text(errors="replace")[-3000:]

    def rank_pid(self, launcher: subprocess.Popen[bytes], rank: int) -> int:
        """The pid of a rank: a process of the launcher's group with MLX_RANK=<rank>."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.getpgid(int(d.name)) != launcher.pid:
                    continue
                env = (d / "environ").read_bytes().split(b"\0")
                if f"MLX_RANK={rank}".encode() in env:
                    return int(d.name)
        raise AssertionError(f"no rank {rank} in the launcher's group:\n{self.log()}")

    def stop_all(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ShardedGroup]:
    launch = Path(sys.executable).parent / "mlx.launch"  # what the plist will name
    require(launch if launch.exists() else None, f"the program {launch}", "mlx")
    g = ShardedGroup(tmp_path, make_tiny_model(tmp_path / "tiny-giant", seed=3))
    try:
        yield g
    finally:
        g.stop_all()


def ask(gw_url: str, *, timeout: float = 30) -> tuple[int, dict[str, Any], float]:
    """One short unary chat through the gateway: (status, JSON body, seconds)."""
    body = json.dumps({"model": ALIAS, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 2}).encode()
    req = urllib.request.Request(gw_url + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw), time.monotonic() - start


def deep_health(gw_url: str) -> tuple[int, dict[str, Any], bytes]:
    try:
        with urllib.request.urlopen(gw_url + "/health?deep=true", timeout=10) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    return status, json.loads(raw), raw


def test_sharded_group_streams_dies_as_one_and_comes_back_without_gateway_restart(
        group: ShardedGroup, gateway_process: Any) -> None:
    args = group.plist["ProgramArguments"]
    assert Path(args[0]).name == "mlx.launch" and args[3:5] == ["--backend", "ring"]
    assert group.plist["KeepAlive"] is True
    launcher = group.start()
    try:
        wait_healthy(group.url, timeout=180, proc=launcher)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{group.log()}") from None
    gw = gateway_process(group.routes)
    secrets = {str(group.model), group.model.name, group.url, f"127.0.0.1:{group.port}",
               *NODES}
    seen: list[bytes] = []

    # 1. the openai SDK streams through the gateway; every chunk names the alias
    sdk = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=60,
                 http_client=httpx2.Client())
    chunks = list(sdk.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
        stream=True))
    sdk.close()
    assert chunks and all(c.model == ALIAS for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    seen += [c.model_dump_json().encode() for c in chunks]
    status, report, raw = deep_health(gw.url)
    seen.append(raw)
    assert status == 200, report
    model = report["models"][ALIAS]
    assert model["status"] == "up" and model["placement"] == "sharded over 2 nodes"

    # 2. rank 1 dies during a stream: the whole group goes, the stream ends with an error
    # event and the alias answers 502/503, nothing hangs
    rank0, rank1 = group.rank_pid(launcher, 0), group.rank_pid(launcher, 1)
    sdk = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30,
                 http_client=httpx2.Client())
    endless = sdk.chat.completions.create(  # end-of-text banned: it runs until stopped
        model=ALIAS, messages=[{"role": "user", "content": "Count"}], max_tokens=100_000,
        stream=True, logit_bias={"0": -100, "2": -100})
    stream = iter(endless)
    assert next(stream).model == ALIAS
    killed = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            assert chunk.model == ALIAS
    stream_ended = time.monotonic() - killed
    seen.append(str(raised.value).encode())
    sdk.close()
    assert stream_ended < 2.0, stream_ended  # measured: 0.18 s
    answers: list[tuple[int, float, float]] = []  # status, seconds after the kill, duration
    for _ in range(100):
        status, body, took = ask(gw.url, timeout=10)
        seen.append(json.dumps(body).encode())
        answers.append((status, round(time.monotonic() - killed, 2), round(took, 2)))
        if status in (502, 503):
            assert body["error"]["code"] in ("upstream_unavailable", "model_unavailable"), body
            break
        time.sleep(0.05)
    # measured: [(502, 0.19, 0.01)] after the stream's end; without a stream in flight
    # [(502, 0.25, 0.24)]: that first request waited for mlx.launch to stop rank 0
    assert answers[-1][0] in (502, 503), answers
    assert answers[-1][1] < 1.5, f"the alias still answered after the kill: {answers}"
    assert all(took < 1.0 for _, _, took in answers), f"a request hung: {answers}"
    # every later request fails at once too, and deep health says down
    for _ in range(3):
        status, body, took = ask(gw.url, timeout=10)
        seen.append(json.dumps(body).encode())
        assert status in (502, 503) and took < 1.0, (status, took, body)
    status, report, raw = deep_health(gw.url)
    seen.append(raw)
    assert status == 503 and report["models"][ALIAS]["status"] == "down", report
    assert report["models"][ALIAS]["placement"] == "sharded over 2 nodes"
    # mlx.launch stopped rank 0 and exited 0: why rank 0's plist says KeepAlive true
    assert launcher.wait(15) == 0, group.log()
    with pytest.raises(ProcessLookupError):
        os.kill(rank0, 0)

    # 3. the group restarts (launchd's KeepAlive): the alias is back, same gateway process
    relaunched = group.start()
    try:
        wait_healthy(group.url, timeout=180, proc=relaunched)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{group.log()}") from None
    deadline = time.monotonic() + 60
    while True:
        status, body, _ = ask(gw.url)
        seen.append(json.dumps(body).encode())
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and body["model"] == ALIAS, body
    assert gw.proc.poll() is None  # never restarted
    status, report, raw = deep_health(gw.url)
    seen.append(raw)
    assert status == 200 and report["models"][ALIAS]["status"] == "up", report

    for blob in seen:
        for s in secrets:
            assert s.encode() not in blob, f"{s!r} leaked: {blob[:300]!r}"
