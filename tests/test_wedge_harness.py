"""The wedge harness (maclustr/harness/wedge.py) against the REAL tiny mlx_lm.server: the
marker prompts kill or hang its generation thread the way issue 27 describes, and the fake
launchd's `kickstart -k` brings back a server that answers."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, make_tiny_model

from maclustr.harness import require_module
from maclustr.harness.mlx_server import wait_healthy
from maclustr.harness.wedge import DIE, HANG, WEDGE_SITE, FakeLaunchd, mlx_job

pytestmark = pytest.mark.real_upstream
LABEL = "io.maclustr.mlx.fast"


def get(url: str, body: object = None, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat(model: Path, text: str) -> dict[str, object]:
    return {"model": str(model), "max_tokens": 2,
            "messages": [{"role": "user", "content": text}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_module("mlx_lm", "the pip package mlx-lm (setup.cfg [test]; `make install`)")
    return make_tiny_model(tmp_path_factory.mktemp("wedge") / "tiny", seed=5)


@pytest.fixture
def job(tmp_path: Path, tiny: Path) -> Iterator[tuple[FakeLaunchd, str]]:
    launchd = FakeLaunchd(tmp_path / "launchd")
    port = free_port()
    launchd.bootstrap(mlx_job(LABEL, tiny, port, tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=90)
        yield launchd, url
    finally:
        launchd.stop_all()


def test_markers_match_the_sitecustomize() -> None:
    site = (WEDGE_SITE / "sitecustomize.py").read_text()
    assert re.search(rf'^DIE = "{DIE}"$', site, re.M) and re.search(rf'^HANG = "{HANG}"$', site,
                                                                    re.M)


def test_die_marker_kills_the_generation_thread(job: tuple[FakeLaunchd, str],
                                                tiny: Path) -> None:
    launchd, url = job
    assert get(url + "/v1/chat/completions", chat(tiny, "hi"))[0] == 200
    status, body = get(url + "/v1/chat/completions", chat(tiny, DIE))
    assert (status, json.loads(body)) == (404, {"error": "generation thread died"})
    assert get(url + "/v1/chat/completions", chat(tiny, "hi"))[0] == 404  # forever
    assert get(url + "/health")[0] == 503
    old = launchd.pid(LABEL)
    r = launchd.run("kickstart", "-k", f"gui/0/{LABEL}")
    assert r.returncode == 0, r.stderr
    assert launchd.pid(LABEL) != old
    wait_healthy(url, timeout=90)
    status, body = get(url + "/v1/chat/completions", chat(tiny, "hi"))
    assert status == 200 and b'"choices"' in body


def test_hang_marker_blocks_generation_while_health_says_ok(job: tuple[FakeLaunchd, str],
                                                           tiny: Path) -> None:
    launchd, url = job
    assert get(url + "/v1/chat/completions", chat(tiny, "hi"))[0] == 200
    with pytest.raises(TimeoutError):
        get(url + "/v1/chat/completions", chat(tiny, HANG), timeout=2)
    with pytest.raises(TimeoutError):
        get(url + "/v1/chat/completions", chat(tiny, "hi"), timeout=2)
    assert get(url + "/health")[0] == 200
    assert launchd.run("kickstart", "-k", f"gui/0/{LABEL}").returncode == 0
    wait_healthy(url, timeout=90)
    assert get(url + "/v1/chat/completions", chat(tiny, "hi"))[0] == 200
    assert launchd.kickstarts(LABEL) == 1
