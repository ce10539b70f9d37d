"""Processes the bench starts (stopped by PID only), their CPU and memory from /proc, and
where they run (Pinning)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import TICK, WORK


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
