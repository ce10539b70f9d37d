"""`make deploy` against a real sshd and rsync (not recorders): one node on a loopback sshd with
a throwaway key, a real venv that deploy pip-installs the code into, a real mlx_lm.server on a
tiny model, and a fake `launchctl` on the remote PATH that records its calls and runs the job's
program the way launchd would. The gateway that deploy started answers /health and a chat
request; a second deploy changes nothing.

The remote side is sandboxed by sshd's ForceCommand: HOME (so ~/Library/LaunchAgents) is a
test directory and PATH starts with the fake launchctl. Linux has no launchd; the fake is the
only stand-in here, and it is what the test reads to prove idempotence.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import plistlib
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY as KEY_GW  # what conftest.gateway_process gives its gateways
from conftest import free_port, make_tiny_model, require_command

from maclustr.harness.mlx_server import wait_healthy
from maclustr.harness.wedge import FAKE_LAUNCHCTL, HANG, mlx_job

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ssh-deploy-test-0123456789"

# The fake launchctl (maclustr/harness/wedge.py) keeps its state in the remote HOME here.


@dataclass
class Node:
    """One sandboxed "Mac Studio": its sshd, remote HOME and the ssh command to reach it."""

    root: Path
    home: Path
    venv: Path
    ssh: str
    target: str

    @property
    def launchd(self) -> Path:
        return self.home / ".fake-launchd"

    def calls(self) -> list[list[str]]:
        f = self.launchd / "calls.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

    def pid(self, label: str) -> int:
        return int((self.launchd / f"{label}.pid").read_text())


def remote_venv(tmp: Path) -> Path:
    """A real venv for the node whose site-packages sees this interpreter's dependencies
    (aiohttp, pyyaml, mlx-lm: no download) but not maclustr, which deploy must install."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    deps = tmp / "deps"
    deps.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if "maclustr" not in entry.name.lower():
            (deps / entry.name).symlink_to(entry)
    (next((venv / "lib").glob("python*/site-packages")) / "deps.pth").write_text(f"{deps}\n")
    py = venv / "bin" / "python"
    for name, code in (("pip", "from pip._internal.cli.main import main"),
                       ("mlx_lm.server", "from mlx_lm.server import main")):
        script = venv / "bin" / name
        script.write_text(f"#!{py}\nimport sys\n{code}\nsys.exit(main())\n")
        script.chmod(0o755)
    return venv


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    sshd = require_command("sshd", "the Debian package openssh-server (`make test` installs it)",
                           "/usr/sbin/sshd")
    require_command("rsync", "the Debian package rsync (`make test` installs it)")
    require_command("ssh", "the Debian package openssh-client")
    require_command("curl", "the Debian package curl")
    root = tmp_path / "node"
    home = root / "home"
    bin_dir = root / "bin"
    for d in (home, bin_dir):
        d.mkdir(parents=True)
    for name in ("hostkey", "userkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)],
                       check=True, timeout=30)
    (root / "authorized_keys").write_text((root / "userkey.pub").read_text())
    launchctl = bin_dir / "launchctl"
    launchctl.write_text(f"#!{sys.executable}\n{FAKE_LAUNCHCTL}")
    launchctl.chmod(0o755)
    wrap = root / "session.sh"
    wrap.write_text(f'#!/bin/bash\nexport HOME={home} PATH={bin_dir}:$PATH\n'
                    f'cd "$HOME" || exit 1\nexec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n')
    wrap.chmod(0o755)
    port = free_port()
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {root}/hostkey\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nPidFile {root}/sshd.pid\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nPrintMotd no\n"
        f"ForceCommand {wrap}\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privsep dir, as root
    log = (root / "sshd.log").open("wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)
    ssh = (f"ssh -i {root}/userkey -p {port} -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR "
           "-o ConnectTimeout=10")
    n = Node(root, home, remote_venv(root), ssh, f"{getpass.getuser()}@127.0.0.1")
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([*ssh.split(), n.target, "true"], capture_output=True,
                             timeout=20).returncode != 0:
            assert proc.poll() is None, (root / "sshd.log").read_text()
            assert time.monotonic() < deadline, (root / "sshd.log").read_text()
            time.sleep(0.1)
        yield n
    finally:
        # the jobs the fake launchd started for this test, by their recorded PIDs
        for pidfile in n.launchd.glob("*.pid") if n.launchd.exists() else ():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
        proc.terminate()
        proc.wait(10)
        log.close()


def get(url: str, headers: dict[str, str] | None = None, body: object = None
        ) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {},
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_make_deploy_over_real_ssh_starts_a_serving_gateway_and_is_idempotent(
        node: Node, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "tiny-fast", seed=4)
    gw_port, mlx_port = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"nodes:\n  box:\n    ssh: {node.target}\n    gateway: true\n"
        f"    gateway_port: {gw_port}\n    home: {node.home}\n    venv: {node.venv}\n"
        "    bind: 127.0.0.1\n"
        f"models:\n  maclustr-fast:\n    model: {json.dumps(str(model))}\n"
        f"    upstream: http://127.0.0.1:{mlx_port}\n    description: Tiny\n"
        "    parameters: 1M\n")
    env_file = node.home / ".config" / "maclustr" / "env"  # the one-time setup per node
    env_file.parent.mkdir(parents=True, mode=0o700)
    env_file.write_text(f"MACLUSTR_API_KEY={KEY}\n")

    def deploy() -> str:
        r = subprocess.run(
            ["make", "-s", "-o", ".venv/.installed", "deploy", f"PY={sys.executable}",
             f"ROUTES={routes}", f"DEPLOY_STATE={tmp_path / 'state'}", f"SSH={node.ssh}",
             "RSYNC=rsync"], cwd=ROOT, capture_output=True, text=True, timeout=600,
            env={k: v for k, v in os.environ.items() if k != "MACLUSTR_API_KEY"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    out = deploy()
    assert "deploy: changed 2 service(s)" in out, out[-2000:]
    agents = node.home / "Library" / "LaunchAgents"
    assert sorted(p.name for p in agents.iterdir()) == [
        "io.maclustr.gateway.plist", "io.maclustr.mlx.maclustr-fast.plist"]
    verbs = [(c[0], c[-1].rsplit("/", 1)[-1].removesuffix(".plist")) for c in node.calls()]
    assert [v for v in verbs if v[0] == "bootstrap"] == [
        ("bootstrap", "io.maclustr.mlx.maclustr-fast"), ("bootstrap", "io.maclustr.gateway")]
    # the code was pip-installed into the node's venv, and that is what the gateway runs
    assert (node.venv / "bin" / "maclustr").exists()
    gw = f"http://127.0.0.1:{gw_port}"
    status, body = get(gw + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    status, body = get(gw + "/v1/chat/completions",
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                       {"model": "maclustr-fast", "max_tokens": 3,
                        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    assert json.loads(body)["model"] == "maclustr-fast"
    for internal in (str(model), f":{mlx_port}"):
        assert internal.encode() not in body
    gw_pid, calls = node.pid("io.maclustr.gateway"), len(node.calls())

    out = deploy()  # idempotence: nothing changed, so nothing is touched
    assert "deploy: changed 0 service(s) (nothing to do)" in out, out[-2000:]
    assert len(node.calls()) == calls, (node.calls()[calls:], out[-3000:])
    assert "pip install" not in out  # the code did not change either
    assert node.pid("io.maclustr.gateway") == gw_pid
    assert get(gw + "/health")[0] == 200


def test_a_hung_model_server_is_restarted_by_the_default_kickstart_over_ssh(
        node: Node, tmp_path: Path, gateway_process: Any) -> None:
    """Issue 27 with no `restart:` key: the model is placed on a node of `nodes:` that is not
    the gateway's, so the gateway runs `ssh <node> 'launchctl kickstart -k
    gui/$(id -u)/io.maclustr.mlx.<alias>'`; the node's launchd (the fake, behind the real
    sshd) kills and relaunches the hung real mlx_lm.server, and the stream sent after the
    hang completes."""
    alias = "maclustr-fast"
    label = f"io.maclustr.mlx.{alias}"
    model = make_tiny_model(tmp_path / "tiny-heal", seed=8)
    port = free_port()
    plist = node.home / f"{label}.plist"
    plist.write_bytes(plistlib.dumps(mlx_job(label, model, port, node.home)))
    r = subprocess.run([*node.ssh.split(), node.target, f"launchctl bootstrap gui/0 {plist}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    upstream = f"http://127.0.0.1:{port}"
    wait_healthy(upstream, timeout=90)
    # The gateway's `ssh` reaches the node with its key and port, as ~/.ssh/config would.
    bin_dir = tmp_path / "gateway-bin"
    bin_dir.mkdir()
    real_ssh, *options = node.ssh.split()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which(real_ssh)} {' '.join(options)} "
                       '"$@"\n')
    wrapper.chmod(0o755)
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "gateway:\n  generate_timeout: 3\n"
        "nodes:\n  gw: {ssh: admin@gateway.invalid, gateway: true}\n"
        f"  box: {{ssh: {node.target}, home: {node.home}}}\n"
        f"models:\n  {alias}:\n    model: {json.dumps(str(model))}\n"
        f"    upstream: {upstream}\n    stall_after: 2\n    queue_timeout: 120\n")
    gp = gateway_process(routes, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    headers = {"Authorization": f"Bearer {KEY_GW}", "Content-Type": "application/json"}

    def chat(text: str, stream: bool, timeout: float) -> tuple[int, bytes]:
        req = urllib.request.Request(
            gp.url + "/v1/chat/completions", headers=headers, data=json.dumps(
                {"model": alias, "stream": stream, "max_tokens": 3,
                 "messages": [{"role": "user", "content": text}]}).encode())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()

    assert chat("hi", False, 60)[0] == 200
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        chat(f"{HANG} now", False, 1.5)  # hangs the generation thread; its client gives up
    status, body = chat("after the hang", True, 120)
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[-300:]
    kicks = [c for c in node.calls() if c[:1] == ["kickstart"]]
    assert kicks == [["kickstart", "-k", f"gui/{os.getuid()}/{label}"]], node.calls()
    said = gp.output()
    assert f"ssh {node.target} 'launchctl kickstart -k gui/$(id -u)/{label}'" in said, said
