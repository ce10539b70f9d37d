"""The front page in a real browser: headless Debian Chromium driven by Playwright (the Python
package, pointed at the system Chromium: no browser download), against a `maclustr serve`
process with fake upstreams. Checks what a person sees: the four aliases with live status
filled in by the page's script (and changing when a model server dies), the copy button
yielding a working curl line for this base URL, and screenshots (desktop light and dark, phone).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY, Behavior, FakeMLX, require_command
from playwright import async_api as playwright_api

from maclustr.config import load_routes

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
FOUR = ("maclustr-coder", "maclustr-reasoning", "maclustr-general", "maclustr-fast")
README_SHOT = ROOT / "docs" / "screenshot.png"



def shipped_routes_on(urls: dict[str, str]) -> str:
    """The shipped routes.yaml's aliases, descriptions and parameters, on test upstreams."""
    lines = ["gateway:", "  health_timeout: 1", "models:"]
    for r in load_routes(ROOT / "routes.yaml").routes:
        lines += [f"  {r.alias}:", f"    model: {json.dumps('internal/' + r.alias + '-4bit')}",
                  f"    upstream: {urls[r.alias]}",
                  f"    description: {json.dumps(r.description)}",
                  f"    parameters: {json.dumps(r.parameters)}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    """A headless Chromium with a fresh profile, closed at teardown."""
    chromium = require_command(("chromium", "chromium-browser"),
                               "the Debian package chromium (`make test` installs it)")
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True,
            args=[f for f in FLAGS if f != "--headless"],  # Playwright adds its own
            viewport={"width": 1100, "height": 900}, color_scheme="light")
        try:
            yield b
        finally:
            await b.close()


async def status_of(page: Any) -> dict[str, str]:
    cells = await page.query_selector_all("[data-status-for]")
    return {await c.get_attribute("data-status-for"): (await c.inner_text()).strip()
            for c in cells}


async def test_page_in_chromium_shows_live_status_and_copies_a_working_curl_line(
        browser: Any, fake: FakeMLX, fake2: FakeMLX, gateway_process: Any,
        tmp_path: Path) -> None:
    urls = {a: fake.url for a in FOUR} | {"maclustr-reasoning": fake2.url}
    routes = tmp_path / "routes.yaml"
    routes.write_text(shipped_routes_on(urls))
    gw = gateway_process(routes)

    await browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    page = await browser.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    resp = await page.goto(gw.url + "/")
    assert resp is not None and resp.status == 200
    assert await page.title() == "MacLustr LLM API"

    # The script fills every status cell from /health?deep=true.
    await page.wait_for_function(
        "() => [...document.querySelectorAll('[data-status-for]')]"
        ".every(c => c.textContent.trim() === 'up')", timeout=10_000)
    rows = await page.eval_on_selector_all("#model-table tbody tr",
                                           "rs => rs.map(r => r.innerText)")
    assert [r.split()[0] for r in rows] == list(FOUR)
    assert "Reasoning, math, econometrics" in rows[1] and "32B" in rows[1]
    assert await status_of(page) == dict.fromkeys(FOUR, "up")
    assert "Cluster: ok" in await page.inner_text("#overall")

    # Copying the curl quick start gives the line for this gateway, with the key placeholder.
    await page.click("button.copy[data-for='code-1']")
    await page.wait_for_function("() => document.body.dataset.copied", timeout=5_000)
    copied = await page.evaluate("() => navigator.clipboard.readText()")
    assert copied == await page.get_attribute("body", "data-copied")
    first = copied.splitlines()
    assert first[0] == f"curl {gw.url}/v1/chat/completions -N \\"
    assert first[1].strip() == '-H "Authorization: Bearer $MACLUSTR_API_KEY" \\'
    assert '"model": "maclustr-coder"' in copied
    await page.wait_for_function(
        "() => document.querySelector(\"button.copy[data-for='code-1']\").textContent"
        " === 'Copied'", timeout=5_000)

    # The Python tab shows the SDK snippet for the same base URL.
    await page.click("#tab-python")
    assert await page.is_visible("#panel-python") and not await page.is_visible("#panel-curl")
    python = await page.inner_text("#panel-python code")
    assert f'base_url="{gw.url}/v1"' in python and 'os.environ["MACLUSTR_API_KEY"]' in python
    await page.click("#tab-curl")

    # ...and that line, run as a user would with their key exported, streams an answer.
    require_command("curl", "the Debian package curl")
    run = await asyncio.create_subprocess_exec(
        "bash", "-c", copied, env={**os.environ, "MACLUSTR_API_KEY": KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(run.communicate(), 20)
    assert run.returncode == 0
    assert re.search(rb'"model": ?"maclustr-coder"', out)
    assert out.rstrip().endswith(b"data: [DONE]")

    await page.screenshot(path=str(tmp_path / "page-desktop.png"), full_page=True)

    # Behind a proxy (ngrok, Caddy): the page shows the public URL the proxy forwards.
    proxied = await browser.new_page()
    await proxied.set_extra_http_headers({"X-Forwarded-Proto": "https",
                                          "X-Forwarded-Host": "llm.maclustr.io"})
    await proxied.goto(gw.url + "/")
    await proxied.wait_for_function(
        "() => [...document.querySelectorAll('[data-status-for]')]"
        ".every(c => c.textContent.trim() === 'up')", timeout=10_000)
    assert (await proxied.inner_text("#code-1")).startswith(
        "curl https://llm.maclustr.io/v1/chat/completions")
    await proxied.screenshot(path=str(tmp_path / "page-proxied.png"))
    if os.environ.get("MACLUSTR_SCREENSHOT") or not README_SHOT.exists():
        README_SHOT.parent.mkdir(exist_ok=True)
        await proxied.screenshot(path=str(README_SHOT))
    await proxied.close()

    await page.emulate_media(color_scheme="dark")
    bg = await page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(18, 20, 24)", bg
    await page.screenshot(path=str(tmp_path / "page-dark.png"), full_page=True)

    # A model server dies: the open page shows it down on its next refresh, no reload needed.
    await fake2.close()
    await page.wait_for_function(
        "() => document.querySelector(\"[data-status-for='maclustr-reasoning']\")"
        ".textContent.trim() === 'down'", timeout=15_000)
    assert await status_of(page) == dict.fromkeys(FOUR, "up") | {"maclustr-reasoning": "down"}
    assert "Cluster: degraded" in await page.inner_text("#overall")

    # Phone width: nothing overflows horizontally except inside scrollable code/table boxes.
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.emulate_media(color_scheme="light")
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    await page.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)
    await page.evaluate("() => window.scrollTo(0, 0)")
    await page.screenshot(path=str(tmp_path / "page-phone-top.png"))
    await page.evaluate("() => document.getElementById('models').scrollIntoView()")
    await page.screenshot(path=str(tmp_path / "page-phone-models.png"))

    assert all(u.startswith(gw.url + "/") for u in requests), requests
    # Chromium logs the deep check's 503 (degraded) as a failed load; nothing else may error.
    assert not [m for m in console_errors if "status of 503" not in m], console_errors
    for shot in ("page-desktop.png", "page-dark.png", "page-phone.png"):
        assert (tmp_path / shot).stat().st_size > 10_000


_FETCH_ALL = """
async ({url, key}) => {
  const out = {};
  async function go(name, body, auth) {
    const headers = {'Content-Type': 'application/json'};
    if (auth) headers['Authorization'] = 'Bearer ' + key;
    let r;
    try {
      r = await fetch(url + '/v1/chat/completions',
                      {method: 'POST', headers, body: JSON.stringify(body)});
    } catch (e) { out[name] = {blocked: String(e)}; return; }
    let text = '', cut = null;
    const reader = r.body.getReader(), dec = new TextDecoder();
    try {
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        text += dec.decode(value, {stream: true});
      }
    } catch (e) { cut = String(e); }
    out[name] = {status: r.status, text, cut, rid: r.headers.get('X-Request-Id')};
  }
  const m = 'maclustr-coder', msgs = [{role: 'user', content: 'hi'}];
  await go('unary', {model: m, messages: msgs}, true);
  await go('stream', {model: m, messages: msgs, stream: true}, true);
  await go('stream cut short', {model: m, messages: msgs, stream: true}, true);
  await go('bad key', {model: m, messages: msgs, stream: true}, false);
  await go('unknown model', {model: 'nope', messages: msgs, stream: true}, true);
  return out;
}
"""


async def test_page_on_another_origin_reads_streams_and_errors_under_cors(
        browser: Any, fake: FakeMLX, gateway_process: Any, tmp_path: Path) -> None:
    """A web app on an allowed origin fetches from the gateway: unary and streamed answers,
    success and error, are all readable (a stream without CORS headers is not)."""
    from aiohttp import web
    from conftest import routes_yaml

    async def blank(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>app</title>", content_type="text/html")

    page_app = web.Application()
    page_app.router.add_get("/", blank)
    runner = web.AppRunner(page_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        origin = f"http://127.0.0.1:{port}"
        routes = tmp_path / "routes.yaml"
        routes.write_text(routes_yaml({"maclustr-coder": fake.url},
                                      extra=f"gateway: {{cors_origins: [{json.dumps(origin)}]}}"))
        gw = gateway_process(routes)
        fake.push(Behavior(), Behavior(), Behavior(die_after=2))
        page = await browser.new_page()
        await page.goto(origin + "/")
        got = await page.evaluate(_FETCH_ALL, {"url": gw.url, "key": KEY})
    finally:
        await runner.cleanup()
    assert not [n for n, r in got.items() if "blocked" in r], got
    assert {n: r["status"] for n, r in got.items()} == {
        "unary": 200, "stream": 200, "stream cut short": 200, "bad key": 401,
        "unknown model": 404}
    assert json.loads(got["unary"]["text"])["model"] == "maclustr-coder"
    assert got["stream"]["text"].rstrip().endswith("data: [DONE]")
    assert got["stream"]["cut"] is None
    # The gateway ends a failed stream with an error event and drops the connection: the
    # page sees the event, or (Chromium may discard a tail that arrives with the reset) the
    # read failing; either way it could read the stream, which CORS alone decides.
    cut = got["stream cut short"]
    assert '"error"' in cut["text"].split("data: ")[-1] or cut["cut"], cut
    assert json.loads(got["bad key"]["text"])["error"]["code"] == "invalid_api_key"
    assert json.loads(got["unknown model"]["text"])["error"]["code"] == "model_not_found"
    assert all(r["rid"] for r in got.values()), got  # X-Request-Id is exposed
