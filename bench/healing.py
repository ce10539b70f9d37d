"""Issue 27's scenario (w): how long a wedged replica keeps clients waiting.

A real tiny mlx_lm.server runs as a job of a fake launchd (maclustr/harness/wedge.py) behind
`maclustr serve`, whose route names the job's `launchctl kickstart -k` as its `restart:`. A
prompt holding the DIE marker kills the server's generation thread (404 "generation thread
died" from then on, /health 503), as issue 27 saw mlx_lm.server fail. Measured: the time from
that request to the first answer the restarted replica serves through the gateway, with a
client asking again every 50 ms (each request may wait in the model's queue while the replica
restarts), what the clients got in between, and each restart's own time from the gateway's
log. Two kinds of wedge: `poison`, whose client waits for its answer (the gateway may send the
same request, marker and all, to the restarted replica), and `one-shot`, whose client leaves
after half a second (the request is gone; only the restart is measured).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import KEY, PY, WORK, Sizes
from bench.procs import Pinning, Proc, cpu_seconds, spawn, wait_http
from bench.targets import build_tiny_model
from maclustr.harness import free_port
from maclustr.harness.mlx_server import wait_healthy
from maclustr.harness.wedge import DIE, FakeLaunchd, mlx_job

LABEL = "io.maclustr.mlx.bench"
ALIAS = "bench-heal"
RETRY_S = 0.05
RECOVERY_LIMIT_S = 240.0


async def _ask(session: Any, url: str, text: str, timeout: float = 120) -> int:
    import aiohttp

    body = {"model": ALIAS, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
    try:
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return int(r.status)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0  # no answer at all (reset, timeout)


async def one_wedge(url: str, kind: str, given_up: Callable[[], bool]) -> dict[str, Any]:
    """DIE, then ask every RETRY_S until an answer is 200 (or the gateway gives the replica
    up): seconds and what came before."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while await _ask(s, url, "hi") != 200:  # answering before the wedge
            if time.monotonic() > deadline:
                raise RuntimeError("the replica never answered before the wedge")
            await asyncio.sleep(0.5)
        t0 = time.monotonic()
        wedge_status = await _ask(s, url, f"please {DIE}",
                                  timeout=120 if kind == "poison" else 0.5)
        seen: dict[str, int] = {}
        while time.monotonic() - t0 < RECOVERY_LIMIT_S and not given_up():
            status = await _ask(s, url, "hi")
            if status == 200:
                return {"recovery_s": time.monotonic() - t0, "wedge_status": wedge_status,
                        "before_first_200": seen}
            seen[str(status)] = seen.get(str(status), 0) + 1
            await asyncio.sleep(RETRY_S)
    return {"recovery_s": float("nan"), "wedge_status": wedge_status, "before_first_200": seen,
            "error": "the gateway gave the replica up" if given_up()
            else f"no 200 within {RECOVERY_LIMIT_S:g} s"}


def restarts_logged(log: Path) -> list[float]:
    """Each restart's seconds, as the gateway logs them ("back after its restart (3.2 s)")."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [float(x) for x in re.findall(r"back after its restart \(([\d.]+) s\)", text)]


def scenario_w(sizes: Sizes, pin: Pinning) -> dict[str, Any]:
    """(w): `sizes.wedges` one-shot wedges, then one poison wedge, through one gateway (with
    restart_limit above them all, so the budget ends no run early)."""
    model = build_tiny_model()
    d = WORK / "heal"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    launchd = FakeLaunchd(d / "launchd")
    port = free_port()
    up = f"http://127.0.0.1:{port}"
    gw: Proc | None = None
    try:
        launchd.bootstrap(mlx_job(LABEL, model, port, d))
        wait_healthy(up, timeout=180)
        routes = d / "routes.yaml"
        routes.write_text("\n".join([
            "models:", f"  {ALIAS}:", f"    model: {model}", f"    upstream: {up}",
            f"    restart: [{launchd.launchctl}, kickstart, -k, gui/0/{LABEL}]",
            "gateway:", "  metrics: false", "  usage_db: false",
            f"  restart_limit: {sizes.wedges + 3}"]) + "\n")
        gport = free_port()
        exe = str(Path(PY).parent / "maclustr")
        gw = spawn("maclustr-heal", [exe, "serve", "--routes", str(routes), "--port",
                                     str(gport)], pin, "target",
                   env={**os.environ, "MACLUSTR_API_KEY": KEY, **launchd.env()})
        wait_http(f"http://127.0.0.1:{gport}/health", gw, 60)
        runs = []
        log = gw.log
        for kind in ["one-shot"] * sizes.wedges + ["poison"]:
            cpu0, logged = cpu_seconds([gw.pid]), len(restarts_logged(log))
            r = asyncio.run(one_wedge(f"http://127.0.0.1:{gport}/v1/chat/completions", kind,
                                      lambda: "it stays out" in log.read_text(errors="replace")))
            r.update(kind=kind, gateway_cpu_s=cpu_seconds([gw.pid]) - cpu0,
                     restarts_s=restarts_logged(log)[logged:])
            runs.append(r)
            print(f"      wedge: {r}", flush=True)
        return {"runs": runs, "kickstarts": launchd.kickstarts(LABEL)}
    finally:
        if gw is not None:
            gw.stop()
        launchd.stop_all()
