"""Where maclustr leans on aiohttp's private parts, and the pin that keeps them there.

protocol.py builds its server from aiohttp's `AppRunner._make_server`, `Server._kwargs` and
`Server._loop`, and its request handler from `aiohttp.web_protocol.RequestHandler`; the
aiohttp exchange waits on the writer's `drain` and reads its `output_size`; the
tests' fixtures override `TestServer._make_runner` and wrap `RequestHandler.connection_made`
(wire_tap). None of that is aiohttp's public API, so setup.cfg caps aiohttp below the next
minor release after the one tested, and this file says by name which part moved when an
upgrade breaks one, instead of an AttributeError deep inside a fixture.
"""

from __future__ import annotations

import configparser
import inspect
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from aiohttp import http_writer, test_utils, web, web_protocol, web_runner
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def aiohttp_requirement() -> Requirement:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options"]["install_requires"].splitlines():
        if line.strip().startswith("aiohttp"):
            return Requirement(line.strip())
    raise AssertionError("setup.cfg: no aiohttp in install_requires")


def test_aiohttp_is_capped_below_the_next_minor_release() -> None:
    """The installed (tested) aiohttp satisfies the pin, and the pin stops before the next
    minor release: a plain install cannot bring one whose private parts moved."""
    req = aiohttp_requirement()
    installed = Version(version("aiohttp"))
    assert req.specifier.contains(installed), (
        f"aiohttp {installed} is installed but setup.cfg asks for '{req}'")
    caps = [Version(s.version) for s in req.specifier if s.operator == "<"]
    next_minor = Version(f"{installed.major}.{installed.minor + 1}")
    assert caps and min(caps) <= next_minor, (
        f"setup.cfg's '{req}' admits aiohttp {next_minor} and later: cap it with "
        f"'<{next_minor}' (maclustr uses private aiohttp parts; see this file)")


def missing(obj: Any, names: list[str]) -> list[str]:
    """The attributes of `names` that `obj` lacks, as 'Type.name'."""
    kind = obj if isinstance(obj, type) else type(obj)
    return [f"{kind.__module__}.{kind.__qualname__}.{n}" for n in names if not hasattr(obj, n)]


def parameters(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def private_parts_broken(server: Any) -> list[str]:
    """What of aiohttp's private parts maclustr uses is gone or changed, named. `server` is
    the web.Server an AppRunner builds."""
    broken = missing(web.AppRunner, ["_make_server"])
    if not broken and not inspect.iscoroutinefunction(web.AppRunner._make_server):
        broken.append("aiohttp.web_runner.AppRunner._make_server is no longer a coroutine")
    broken += missing(server, ["_kwargs", "_loop", "request_handler", "request_factory",
                               "handler_cancellation", "pre_shutdown", "shutdown"])
    if not broken and not isinstance(server._kwargs, dict):
        broken.append("aiohttp.web_server.Server._kwargs is no longer a dict")
    handler = web_protocol.RequestHandler
    if "connection_made" not in vars(handler):  # wire_tap replaces it on this class
        broken.append("aiohttp.web_protocol.RequestHandler.connection_made (own definition)")
    # app.py's AiohttpExchange awaits request.writer.drain() (flow control) and
    # protocol.py reads request.writer.output_size (was part of an answer sent)
    broken += missing(handler, ["handle_error", "data_received", "connection_lost"])
    broken += missing(http_writer.StreamWriter, ["output_size", "drain"])
    if hasattr(handler, "handle_error") and parameters(handler.handle_error) != [
            "self", "request", "status", "exc", "message"]:
        broken.append("aiohttp.web_protocol.RequestHandler.handle_error's parameters "
                      f"{parameters(handler.handle_error)}")
    broken += missing(test_utils.TestServer, ["_make_runner"])
    broken += missing(web_runner, ["BaseRunner"])
    return broken


async def test_the_private_aiohttp_parts_maclustr_uses_are_there() -> None:
    runner = web.AppRunner(web.Application())
    server = await runner._make_server() if hasattr(runner, "_make_server") else None
    try:
        broken = private_parts_broken(server)
        assert not broken, (
            f"aiohttp {version('aiohttp')} changed private parts maclustr relies on (protocol.py, "
            f"tests/conftest.py, tests/wire_tap.py): {'; '.join(broken)}")
    finally:
        await runner.cleanup()


async def test_a_missing_private_part_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail, and says which attribute: one is taken away here."""
    runner = web.AppRunner(web.Application())
    server = await runner._make_server()
    try:
        monkeypatch.delattr(web.Server, "pre_shutdown")
        monkeypatch.delattr(web_protocol.RequestHandler, "connection_made")
        del server._kwargs
        assert private_parts_broken(server) == [
            "aiohttp.web_server.Server._kwargs", "aiohttp.web_server.Server.pre_shutdown",
            "aiohttp.web_protocol.RequestHandler.connection_made (own definition)"]
    finally:
        await runner.cleanup()
