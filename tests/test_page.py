"""The front page `GET /`: docs generated from the live route table, served without auth,
self-contained, with a base URL that is configured or sanitized from the request, and never
an internal id, address or real key."""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from conftest import KEY, KEY2, FakeMLX, routes_yaml

from maclustr.config import load_routes
from maclustr.page import render_page

FOUR = ("maclustr-coder", "maclustr-general", "maclustr-reasoning", "maclustr-fast")
URL_RE = re.compile(r"https?://[^\s\"'<>`\\)]+")


class _Text(HTMLParser):
    """The page's visible text, and the tags it contains, for structural assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def parse(html: str) -> _Text:
    p = _Text()
    p.feed(html)
    return p


def four_routes(fake: FakeMLX, extra: str = "") -> str:
    return routes_yaml({a: fake.url for a in FOUR}, extra)


async def get_page(gw: Any, headers: dict[str, str] | None = None) -> str:
    ans = await gw.client.get("/", auth=False, headers=headers)
    assert ans.status == 200, ans.body[:300]
    assert ans.headers["Content-Type"].startswith("text/html")
    return str(ans.body.decode())


async def test_page_is_public_and_lists_every_alias_with_description_and_parameters(
        make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw)
    doc = parse(html)
    rows = {a["data-alias"]: a for t, a in doc.tags if t == "tr" and "data-alias" in a}
    assert tuple(rows) == FOUR
    text = " ".join(doc.text)
    for alias in FOUR:
        assert f"Test model {alias}" in text
    assert text.count("1B") >= 4
    status_cells = [a["data-status-for"] for t, a in doc.tags if "data-status-for" in a]
    assert status_cells == list(FOUR)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                 "/v1/messages/count_tokens", "/v1/models", "/health"):
        assert path in text
    for needle in ("model_not_found", "invalid_api_key", "upstream_unavailable",
                   "Troubleshooting", "Quick start"):
        assert needle in text


async def test_page_quick_start_uses_placeholder_key_never_a_real_one(make_gateway: Any,
                                                                     fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw)
    html = unescape(html)
    assert "$MACLUSTR_API_KEY" in html
    assert 'os.environ["MACLUSTR_API_KEY"]' in html  # Python
    assert "process.env.MACLUSTR_API_KEY" in html  # JavaScript
    assert KEY not in html and KEY2 not in html
    assert "ml-admin-001" not in html


async def test_base_url_comes_from_public_url_when_configured(make_gateway: Any,
                                                             fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(
        fake, "gateway:\n  public_url: https://llm.example.test"))
    html = await get_page(gw, {"Host": "other.example:8080",
                               "X-Forwarded-Host": "proxy.example", "X-Forwarded-Proto": "http"})
    html = unescape(html)
    assert "curl https://llm.example.test/v1/chat/completions" in html
    assert 'base_url="https://llm.example.test/v1"' in html
    assert 'baseURL: "https://llm.example.test/v1"' in html
    assert "other.example" not in html and "proxy.example" not in html


async def test_base_url_falls_back_to_the_host_header(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw, {"Host": "gw.example.test:9000"})
    assert "curl http://gw.example.test:9000/v1/chat/completions" in html
    html = await get_page(gw)  # the client's own Host: the address it reached us on
    assert f"curl {gw.url}/v1/chat/completions" in html


async def test_base_url_follows_x_forwarded_headers_from_a_proxy(make_gateway: Any,
                                                                 fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw, {"Host": "127.0.0.1:9000", "X-Forwarded-Proto": "https",
                               "X-Forwarded-Host": "llm.example.test, inner.proxy"})
    assert "curl https://llm.example.test/v1/chat/completions" in html
    assert "127.0.0.1:9000" not in html and "inner.proxy" not in html


async def test_malicious_host_headers_are_never_reflected(make_gateway: Any,
                                                         fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    evil = '"><script>alert(1)</script>'
    html = await get_page(gw, {"Host": f"evil.example{evil}",
                               "X-Forwarded-Host": f"x{evil}", "X-Forwarded-Proto": "javascript"})
    assert "alert(1)" not in html and "evil.example" not in html
    assert "javascript:" not in html
    assert "curl http://localhost:9000/v1/chat/completions" in html
    # A bad forwarded host falls back to a good Host, with a bad proto ignored.
    html = await get_page(gw, {"Host": "gw.example.test", "X-Forwarded-Host": "a b<c>",
                               "X-Forwarded-Proto": "gopher"})
    assert "curl http://gw.example.test/v1/chat/completions" in html
    assert "a b<c>" not in html and "gopher" not in html
    assert len(parse(html).tags) == len(parse(await get_page(gw)).tags)


async def test_descriptions_from_routes_are_escaped(make_gateway: Any, fake: FakeMLX) -> None:
    text = routes_yaml({"maclustr-coder": fake.url}).replace(
        "description: Test model maclustr-coder",
        "description: \"<img src=x onerror=alert(1)> & co\"")
    gw = await make_gateway(text)
    html = await get_page(gw)
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in html


async def test_editing_routes_changes_the_page_on_next_load(make_gateway: Any,
                                                           fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    before = await get_page(gw)
    assert "maclustr-vision" not in before
    new = routes_yaml({"maclustr-coder": fake.url, "maclustr-vision": fake.url}).replace(
        "description: Test model maclustr-vision", "description: Looks at pictures")
    gw.holder.path.write_text(new)
    assert gw.holder.reload()
    after = await get_page(gw)
    rows = [a["data-alias"] for t, a in parse(after).tags if "data-alias" in a]
    assert rows == ["maclustr-coder", "maclustr-vision"]
    assert "Looks at pictures" in after
    assert "maclustr-fast" not in after


async def test_page_shows_no_internal_id_or_upstream_address(make_gateway: Any,
                                                             fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw)
    for r in gw.holder.current.routes:
        assert r.model not in html
        assert r.upstream not in html
    assert fake.url.split("//")[1] not in html
    assert "/Users/" not in html and "internal-" not in html


async def test_page_loads_no_external_resources(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake, "gateway:\n  public_url: https://llm.example.test"))
    ans = await gw.client.get("/", auth=False)
    html = ans.body.decode()
    urls = URL_RE.findall(html)
    assert urls, "the base URL should appear in the examples"
    assert all(u.startswith("https://llm.example.test") for u in urls), urls
    doc = parse(html)
    for tag, attrs in doc.tags:
        assert not (tag == "script" and attrs.get("src")), attrs
        assert tag not in ("link", "iframe", "img", "object", "embed"), (tag, attrs)
    assert "@import" not in html and "url(" not in html
    assert "default-src 'none'" in ans.headers["Content-Security-Policy"]


async def test_page_has_light_dark_and_phone_styles_and_copy_buttons(make_gateway: Any,
                                                                     fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    html = await get_page(gw)
    assert "prefers-color-scheme:dark" in html
    assert 'name="viewport"' in html and "max-width:600px" in html
    doc = parse(html)
    buttons = [a for t, a in doc.tags if t == "button" and "copy" in (a.get("class") or "")]
    code_ids = {a["id"] for t, a in doc.tags if t == "code" and a.get("id")}
    assert len(buttons) >= 4
    assert all(b["data-for"] in code_ids for b in buttons)
    assert "/health?deep=true" in html and "setTimeout(refresh, 5000)" in html


async def test_openapi_json_is_public_and_lists_live_aliases(make_gateway: Any,
                                                            fake: FakeMLX) -> None:
    gw = await make_gateway(four_routes(fake))
    ans = await gw.client.get("/openapi.json", auth=False)
    assert ans.status == 200
    doc = ans.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"][
        "enum"] == list(FOUR)


def test_page_for_the_shipped_routes_hides_every_internal_name() -> None:
    table = load_routes(Path(__file__).resolve().parent.parent / "routes.yaml")
    html = render_page(table, "https://llm.maclustr.io")
    for r in table.routes:
        assert r.model not in html and r.upstream not in html
        assert f"<code>{r.alias}</code>" in html
    assert "studio-" not in html and "mlx-community" not in html and ".local" not in html
    assert "30B (MoE · 3B active)" in html
