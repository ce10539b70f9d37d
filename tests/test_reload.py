"""Live reload of routes.yaml: re-homing a model is an edit, picked up by the poller and by
SIGHUP without a restart; a bad edit keeps the old table; requests in flight finish on the
route they started on."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import AUTH, Behavior, FakeMLX, Gateway, routes_yaml, wait_for

from maclustr.config import load_routes
from maclustr.reload import RoutesHolder

CHAT = "/v1/chat/completions"
A = "maclustr-coder"
NEW = "maclustr-new"


def chat(alias: str, stream: bool = False) -> dict[str, Any]:
    return {"model": alias, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def aliases_of(url: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(url + "/v1/models", headers=AUTH) as r:
        assert r.status == 200
        return [m["id"] for m in (await r.json())["data"]]


async def eventually_listed(url: str, alias: str, present: bool = True,
                            timeout: float = 5.0) -> None:
    seen: list[list[str]] = []

    async def poll() -> None:
        while True:
            got = await aliases_of(url)
            seen.append(got)
            if (alias in got) == present:
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"{alias} present={present} not reached; last {seen[-1:]}") from None


# --- as a process: poller and SIGHUP --------------------------------------------------------


async def test_poller_picks_up_an_edit(gateway_process: Any, tmp_path: Path,
                                       fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))
    gp = gateway_process(routes, "--reload-interval", "0.2")
    assert await aliases_of(gp.url) == [A]
    routes.write_text(routes_yaml({A: fake.url, NEW: fake.url}))
    await eventually_listed(gp.url, NEW)
    routes.write_text(routes_yaml({NEW: fake.url}))
    await eventually_listed(gp.url, A, present=False)
    assert gp.proc.poll() is None


async def test_sighup_reloads_without_polling(gateway_process: Any, tmp_path: Path,
                                              fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))
    gp = gateway_process(routes, "--reload-interval", "0")
    routes.write_text(routes_yaml({A: fake.url, NEW: fake.url}))
    # polling is off: nothing may change on its own, not even after the default 1 s poll
    await asyncio.sleep(1.5)
    assert await aliases_of(gp.url) == [A]
    gp.proc.send_signal(signal.SIGHUP)
    await eventually_listed(gp.url, NEW)
    assert gp.proc.poll() is None


async def test_invalid_edit_keeps_serving_and_logs_one_line(gateway_process: Any,
                                                            tmp_path: Path,
                                                            fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({A: fake.url}))
    gp = gateway_process(routes, "--reload-interval", "0.2")
    routes.write_text("models:\n  maclustr-coder:\n    upstream: not-a-url\n")

    def rejected() -> list[str]:
        return [ln for ln in gp.output().splitlines() if "reload" in ln and "reject" in ln]

    await wait_for(lambda: len(rejected()) >= 1, timeout=5)
    await asyncio.sleep(0.6)  # a few more poll rounds: the same bad file is not re-logged
    assert len(rejected()) == 1, rejected()
    assert "routes" in rejected()[0]
    assert await aliases_of(gp.url) == [A]
    async with aiohttp.ClientSession() as s, s.post(gp.url + CHAT, json=chat(A),
                                                     headers=AUTH) as r:
        assert r.status == 200


# --- in-process -----------------------------------------------------------------------------


async def test_holder_reload_swaps_the_table(make_gateway: Any, fake: FakeMLX,
                                             fake2: FakeMLX) -> None:
    gw: Gateway = await make_gateway(routes_yaml({A: fake.url}))
    assert (await gw.client.post(CHAT, chat(NEW))).status == 404
    gw.holder.path.write_text(routes_yaml({A: fake.url, NEW: fake2.url}))
    assert gw.holder.reload() is True
    ans = await gw.client.post(CHAT, chat(NEW))
    assert ans.status == 200 and ans.json()["model"] == NEW
    assert len(fake2.requests) == 1


async def test_invalid_edit_in_process_keeps_old_table(make_gateway: Any, fake: FakeMLX,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    gw: Gateway = await make_gateway(routes_yaml({A: fake.url}))
    old = gw.holder.current
    gw.holder.path.write_text("models: [this is: not: valid")
    with caplog.at_level(logging.INFO, logger="maclustr.reload"):
        assert gw.holder.reload() is False
    errors = [r for r in caplog.records if r.name == "maclustr.reload"
              and r.levelno >= logging.WARNING]
    assert len(errors) == 1
    assert "\n" not in errors[0].getMessage()
    assert gw.holder.current is old
    assert (await gw.client.post(CHAT, chat(A))).status == 200


async def test_rehome_while_streaming_finishes_on_old_route(make_gateway: Any, fake: FakeMLX,
                                                            fake2: FakeMLX) -> None:
    """The running stream completes on `fake`; requests after the swap go to `fake2`."""
    gw: Gateway = await make_gateway(routes_yaml({A: fake.url}))
    fake.push(Behavior(events=12, delay=0.05))
    running = asyncio.ensure_future(gw.client.post(CHAT, chat(A, stream=True)))
    await fake.wait_requests(1)

    gw.holder.path.write_text(routes_yaml({A: fake2.url}))
    assert gw.holder.reload() is True
    after = await gw.client.post(CHAT, chat(A))
    assert after.status == 200 and after.json()["model"] == A
    assert len(fake2.requests) == 1
    assert not running.done(), "the stream should still be running on the old upstream"

    ans = await asyncio.wait_for(running, 10)
    assert ans.status == 200
    data = ans.data()
    assert data[-1] == "[DONE]"
    assert not any(isinstance(d, dict) and "error" in d for d in data)
    assert len([d for d in data if isinstance(d, dict)]) == 13  # 12 tokens + final chunk
    assert len(fake.requests) == 1


async def test_reload_of_settings_keeps_old_ones_valid(tmp_path: Path, fake: FakeMLX) -> None:
    """holder.changed() notices an edit; reload with a new gateway section swaps it."""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml({A: fake.url}))
    holder = RoutesHolder(path, load_routes(path))
    assert not holder.changed()
    path.write_text(routes_yaml({A: fake.url}, extra="gateway: {max_body_bytes: 2048}"))
    assert holder.changed()
    assert holder.reload() is True
    assert holder.current.settings.max_body_bytes == 2048
    assert not holder.changed()
