"""Self-healing against the REAL tiny mlx_lm.server (issue 27), in both failure shapes: its
generation thread dies (404 "generation thread died", /health 503) or hangs (/health 200, no
token ever). The server runs as a job of the fake launchd (maclustr/harness/wedge.py) and the
model's `restart` is that launchd's `launchctl kickstart -k`, so a restart really kills and
relaunches the server. Everything goes through one gateway process (`maclustr serve`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY, GatewayProcess, free_port, make_tiny_model

from maclustr.harness import require_module
from maclustr.harness.mlx_server import wait_healthy
from maclustr.harness.wedge import DIE, HANG, FakeLaunchd, mlx_job

pytestmark = pytest.mark.real_upstream

ALIAS = "maclustr-fast"
LABEL = f"io.maclustr.mlx.{ALIAS}"
STALL, GENERATE, LIMIT = 2, 3, 2


@dataclass
class Setup:
    gw: GatewayProcess
    launchd: FakeLaunchd
    model: Path

    def post(self, text: str, stream: bool, timeout: float = 120) -> tuple[int, bytes]:
        body = {"model": ALIAS, "stream": stream, "max_tokens": 3,
                "messages": [{"role": "user", "content": text}]}
        req = urllib.request.Request(
            self.gw.url + "/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def deep(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.gw.url + "/health?deep=true", timeout=30) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return dict(json.loads(e.read()))

    def restarts(self) -> int:
        return self.launchd.kickstarts(LABEL)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.gw.output().splitlines():
            if line.startswith("{") and '"maclustr.heal"' in line:
                out.append(json.loads(line))
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_module("mlx_lm", "the pip package mlx-lm (setup.cfg [test]; `make install`)")
    return make_tiny_model(tmp_path_factory.mktemp("heal-real") / "tiny", seed=7)


@pytest.fixture
def setup(tiny: Path, tmp_path: Path, gateway_process: Any) -> Iterator[Setup]:
    launchd = FakeLaunchd(tmp_path / "launchd")
    port = free_port()
    try:
        launchd.bootstrap(mlx_job(LABEL, tiny, port, tmp_path))
        wait_healthy(f"http://127.0.0.1:{port}", timeout=90)
        routes = tmp_path / "routes.yaml"
        restart = [str(launchd.launchctl), "kickstart", "-k", "gui/0/io.maclustr.mlx.{alias}"]
        routes.write_text(
            f"gateway:\n  generate_timeout: {GENERATE}\n  restart_limit: {LIMIT}\n"
            f"models:\n  {ALIAS}:\n    model: {json.dumps(str(tiny))}\n"
            f"    upstream: http://127.0.0.1:{port}\n    stall_after: {STALL}\n"
            f"    queue_timeout: 120\n    restart: {json.dumps(restart)}\n")
        gw = gateway_process(routes, "--log-format", "json", env=launchd.env())
        yield Setup(gw, launchd, tiny)
    finally:
        launchd.stop_all()


def wedge(s: Setup, shape: str) -> None:
    """The marker request that kills or hangs the generation thread; its client gives up
    (it would wedge the restarted server again if it were moved there)."""
    marker = DIE if shape == "die" else HANG
    try:
        status, body = s.post(f"{marker} please", stream=False, timeout=1.5)
    except (TimeoutError, urllib.error.URLError):
        return
    assert status == 503, body[:300]  # past the limit: out, nothing to wait for


def complete_stream(status: int, body: bytes) -> list[Any]:
    assert status == 200, body[:300]
    events = [e[len(b"data: "):] for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", body[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("error" not in c for c in chunks), body[-300:]
    return chunks


@pytest.mark.parametrize("shape", ["die", "hang"])
def test_a_wedged_real_server_is_restarted_and_answers_through_the_same_gateway(
        setup: Setup, shape: str) -> None:
    s = setup
    assert s.post("hello", stream=False)[0] == 200
    for n in range(1, LIMIT + 1):  # the first wedge, and another within the hour
        wedge(s, shape)
        t0 = time.monotonic()
        complete_stream(*s.post(f"after wedge {n}", stream=True))
        print(f"{shape}: wedge {n}: the stream sent after it took {time.monotonic() - t0:.1f} s")
        assert s.restarts() == n  # exactly once per wedge
    reason = "dead" if shape == "die" else "wedged"
    said = [e for e in s.events() if e.get("event") == reason]
    assert len(said) == LIMIT, said
    assert all(e["model"] == ALIAS and e["replica"] == "0" and e["command"][1:3] == [
        "kickstart", "-k"] for e in said), said
    assert KEY not in s.gw.output()
    # past restart_limit: it stays out, wedged, and says so
    wedge(s, shape)
    status, body = s.post("after the limit", stream=True, timeout=120)
    assert status == 503 and b"model_unavailable" in body, body[:300]
    assert s.restarts() == LIMIT
    report = s.deep()
    assert report["models"][ALIAS]["replicas"][0]["status"] == "wedged", report
    assert any(e.get("action") == "limit" and e["level"] == "error" for e in s.events())


def test_two_real_replicas_one_hung_every_client_answered_in_time(
        tiny: Path, tmp_path: Path, gateway_process: Any) -> None:
    """One of two real replicas hangs: the requests caught on it are moved to the other, and
    no client waits longer than stall_after + generate_timeout + 2 s; it is restarted once."""
    launchd = FakeLaunchd(tmp_path / "launchd")
    ports = [free_port(), free_port()]
    try:
        for p in ports:
            launchd.bootstrap(mlx_job(f"{LABEL}-{p}", tiny, p, tmp_path))
        for p in ports:
            wait_healthy(f"http://127.0.0.1:{p}", timeout=90)
        routes = tmp_path / "routes.yaml"
        restart = [str(launchd.launchctl), "kickstart", "-k",
                   "gui/0/io.maclustr.mlx.{alias}-{port}"]
        ups = "".join(f"      - http://127.0.0.1:{p}\n" for p in ports)
        routes.write_text(
            f"gateway:\n  generate_timeout: {GENERATE}\n"
            f"models:\n  {ALIAS}:\n    model: {json.dumps(str(tiny))}\n"
            f"    upstreams:\n{ups}    stall_after: {STALL}\n    queue_timeout: 120\n"
            f"    restart: {json.dumps(restart)}\n")
        s = Setup(gateway_process(routes, env=launchd.env()), launchd, tiny)
        for i in range(4):  # both replicas load the model
            assert s.post(f"warm {i}", stream=False)[0] == 200
        hung = ports[0]
        req = urllib.request.Request(
            f"http://127.0.0.1:{hung}/v1/chat/completions", data=json.dumps(
                {"model": str(tiny), "max_tokens": 2,
                 "messages": [{"role": "user", "content": HANG}]}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            urllib.request.urlopen(req, timeout=1.5)

        def timed(i: int) -> tuple[float, int, bytes]:
            t0 = time.monotonic()
            status, body = s.post(f"client {i}", stream=bool(i % 2))
            return time.monotonic() - t0, status, body

        with ThreadPoolExecutor(6) as pool:
            done = list(pool.map(timed, range(6)))
        print("two replicas, one hung: client waits", [round(t, 1) for t, _, _ in done])
        for took, status, body in done:
            assert status == 200 and b"error" not in body, body[:300]
            assert took < STALL + GENERATE + 2, took
        deadline = time.monotonic() + 60
        while launchd.kickstarts(f"{LABEL}-{hung}") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launchd.kickstarts(f"{LABEL}-{hung}") == 1
        assert launchd.kickstarts(f"{LABEL}-{ports[1]}") == 0
    finally:
        launchd.stop_all()


def test_a_poison_request_gets_one_error_and_does_not_spend_the_restart_budget(
        setup: Setup) -> None:
    """A request whose own prompt kills the generation thread: moved once onto the
    restarted server, it kills it again; it is then answered a failure (not moved again, not
    blamed on the client), that second restart is not charged to restart_limit, and the
    model keeps serving."""
    s = setup
    assert s.post("hello", stream=False)[0] == 200
    status, body = s.post(f"{DIE} poison", stream=False, timeout=120)
    assert status == 502 and b"upstream_unavailable" in body, body[:300]
    complete_stream(*s.post("an ordinary request", stream=True))
    assert s.restarts() == 2  # its first death, and the second one (dead again: restarted)
    charged = [e.get("charged") for e in s.events() if e.get("action") == "restart"]
    assert charged == [True, False], s.events()
    wedge(s, "die")  # one more ordinary death is still within restart_limit (2)
    complete_stream(*s.post("after one more wedge", stream=True))
    assert s.restarts() == 3
