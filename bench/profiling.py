"""--profile: py-spy of maclustr during (a) and (b), summarized (not counted)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import PY, RESULTS, Sizes
from bench.load import run_wrk
from bench.procs import Pinning
from bench.targets import Target


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
