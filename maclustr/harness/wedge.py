"""Wedged model servers for tests and the bench: a real mlx_lm.server whose generation loop dies
or hangs on a marker prompt, run as a job of a fake launchd that `launchctl kickstart -k`
restarts.

Why: issue 27's two failures of mlx_lm.server happen in its generation thread, behind an HTTP
side that keeps answering; only the real server shows what the gateway then sees. The
`sitecustomize` in wedge_site/ (on the server's PYTHONPATH) wraps
`ResponseGenerator._next_request`: a request whose prompt holds DIE raises there (the thread
dies: 404 "generation thread died", /health 503), one holding HANG blocks there forever (the
thread hangs: /health 200, no completion ever).

How to reproduce a wedge by hand (the bench does the same):
    launchd = FakeLaunchd(tmp / "launchd")
    launchd.bootstrap(mlx_job("io.maclustr.mlx.fast", model_dir, port, tmp))
    # send a chat request whose user message contains HANG (or DIE), then:
    launchd.launchctl  # -> the program for `kickstart -k gui/0/io.maclustr.mlx.fast`
                       #    (run it with FAKE_LAUNCHD=launchd.state in its environment)
"""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

WEDGE_SITE = Path(__file__).resolve().parent / "wedge_site"
DIE = "maclustr-wedge-die"  # the same words as wedge_site/sitecustomize.py
HANG = "maclustr-wedge-hang"

# The fake launchctl: bootstrap/bootout/kickstart/kill/print over a state directory
# ($FAKE_LAUNCHD, else ~/.fake-launchd). bootstrap starts ProgramArguments with the plist's
# environment, working directory and log files, in its own session (it outlives its caller, as
# a launchd job does), and refuses a job already running, as launchd does.
FAKE_LAUNCHCTL = r'''
import json, os, plistlib, signal, subprocess, sys, time
from pathlib import Path
home = Path(os.environ["HOME"])
state = Path(os.environ.get("FAKE_LAUNCHD") or home / ".fake-launchd")
state.mkdir(exist_ok=True)
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")

def alive(label):
    p = state / f"{label}.pid"
    if not p.exists():
        return None
    pid = int(p.read_text())
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

def start(plist):
    d = plistlib.loads(Path(plist).read_bytes())
    label = d["Label"]
    if alive(label):
        sys.exit(f"Bootstrap failed: 5: Input/output error ({label} is running)")
    env = {"HOME": str(home), **d.get("EnvironmentVariables", {})}
    with open(d["StandardOutPath"], "ab") as out, open(d["StandardErrorPath"], "ab") as err:
        p = subprocess.Popen(d["ProgramArguments"], cwd=d["WorkingDirectory"], env=env,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)
    (state / f"{label}.pid").write_text(str(p.pid))
    (state / f"{label}.plist").write_text(plist)

def stop(label):
    pid = alive(label)
    if pid is None:
        sys.exit(f"Boot-out failed: 3: No such process ({label})")
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if alive(label) is None:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
    (state / f"{label}.pid").unlink()

verb = args[0]
label = args[-1].rsplit("/", 1)[-1]
if verb == "bootstrap":
    start(args[2])
elif verb == "bootout":
    stop(label)
elif verb == "kickstart":
    if "-k" in args and alive(label):
        stop(label)
    start((state / f"{label}.plist").read_text())
elif verb == "kill":
    pid = alive(label)
    if pid is None:
        sys.exit(3)
    os.kill(pid, getattr(signal, "SIG" + args[1]))
elif verb == "print":
    pid = alive(label)
    print(f"state = {'running' if pid else 'not running'}\npid = {pid}")
else:
    sys.exit(f"fake launchctl: {verb} is not emulated")
'''


class FakeLaunchd:
    """A state directory and the fake `launchctl` program that manages it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.bin = root / "bin"
        self.state.mkdir(parents=True, exist_ok=True)
        self.bin.mkdir(parents=True, exist_ok=True)
        self.launchctl = self.bin / "launchctl"
        self.launchctl.write_text(f"#!{sys.executable}\n{FAKE_LAUNCHCTL}")
        self.launchctl.chmod(0o755)

    def env(self) -> dict[str, str]:
        """The environment `launchctl` needs to find this launchd's state."""
        return {"FAKE_LAUNCHD": str(self.state)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.launchctl), *args], env={**os.environ, **self.env()},
                              capture_output=True, text=True, timeout=60)

    def bootstrap(self, job: dict[str, Any]) -> None:
        plist = self.root / f"{job['Label']}.plist"
        plist.write_bytes(plistlib.dumps(job))
        r = self.run("bootstrap", "gui/0", str(plist))
        if r.returncode != 0:
            raise RuntimeError(f"fake launchctl bootstrap failed: {r.stderr}")

    def pid(self, label: str) -> int:
        return int((self.state / f"{label}.pid").read_text())

    def calls(self) -> list[list[str]]:
        f = self.state / "calls.jsonl"
        return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []

    def kickstarts(self, label: str) -> int:
        return sum(1 for c in self.calls() if c[:1] == ["kickstart"] and c[-1].endswith(label))

    def stop_all(self) -> None:
        """Kill every job this launchd started, by its recorded PID."""
        for pidfile in self.state.glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def mlx_server_program() -> list[str]:
    """The mlx_lm.server console script of this interpreter (it imports mlx_lm.server as a
    module, so the sitecustomize's import hook sees it), else the same entry point by -c."""
    script = Path(sys.executable).parent / "mlx_lm.server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlx_lm.server import main; sys.exit(main())"]


def mlx_job(label: str, model_dir: Path | str, port: int, log_dir: Path,
            wedge: bool = True) -> dict[str, Any]:
    """A launchd job running mlx_lm.server on 127.0.0.1:port, wedgeable by the markers."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if wedge:
        env["PYTHONPATH"] = str(WEDGE_SITE)
    return {"Label": label,
            "ProgramArguments": [*mlx_server_program(), "--model", str(model_dir),
                                 "--host", "127.0.0.1", "--port", str(port)],
            "EnvironmentVariables": env, "WorkingDirectory": str(log_dir),
            "StandardOutPath": str(log_dir / f"{label}.out.log"),
            "StandardErrorPath": str(log_dir / f"{label}.err.log")}
