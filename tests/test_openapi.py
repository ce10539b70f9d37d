"""`GET /openapi.json`: a valid OpenAPI 3.1 document of the gateway's own surface, built from
the live table, that the running gateway actually honours (checked by schemathesis against a
real `maclustr serve` process with the fake upstream behind it)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import KEY, FakeMLX, internal_strings, routes_yaml
from openapi_spec_validator import validate

from maclustr.config import load_routes, parse_routes
from maclustr.openapi import openapi_document

ROOT = Path(__file__).resolve().parent.parent
FOUR = ("maclustr-coder", "maclustr-general", "maclustr-reasoning", "maclustr-fast")
ST = Path(sys.executable).parent / "st"  # schemathesis' CLI, installed by the `test` extra
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")


def test_document_for_the_shipped_routes_is_valid_openapi_31() -> None:
    doc = openapi_document(load_routes(ROOT / "routes.yaml"))
    validate(doc)  # raises on any violation of the OpenAPI 3.1 meta-schema
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                 "/v1/models/{model}", "/health", "/"}
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "A key from MACLUSTR_API_KEY."}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models"):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] == [{"bearer": []}]
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
    assert doc["paths"]["/health"]["get"].get("security") is None  # public


async def test_model_enum_is_the_live_alias_list_and_follows_a_reload(make_gateway: Any,
                                                                      fake: FakeMLX) -> None:
    gw = await make_gateway(routes_yaml({a: fake.url for a in FOUR}))
    doc = (await gw.client.get("/openapi.json", auth=False)).json()
    validate(doc)
    enum = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"]
    assert enum == list(FOUR)
    gw.holder.path.write_text(routes_yaml({"maclustr-coder": fake.url,
                                           "maclustr-vision": fake.url}))
    assert gw.holder.reload()
    doc = (await gw.client.get("/openapi.json", auth=False)).json()
    enum = doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"]
    assert enum == ["maclustr-coder", "maclustr-vision"]
    text = (await gw.client.get("/openapi.json", auth=False)).body.decode()
    for s in internal_strings(gw.holder.current):
        assert s not in text


async def test_public_url_becomes_the_documents_server(make_gateway: Any, fake: FakeMLX) -> None:
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake.url},
                                        "gateway:\n  public_url: https://llm.example.test"))
    doc = (await gw.client.get("/openapi.json", auth=False)).json()
    assert doc["servers"] == [{"url": "https://llm.example.test"}]


async def test_real_error_answers_match_the_documented_envelope(make_gateway: Any,
                                                                fake: FakeMLX) -> None:
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake.url}))
    doc = (await gw.client.get("/openapi.json", auth=False)).json()
    schema = doc["components"]["schemas"]["Error"]
    answers = [
        await gw.client.get("/v1/models", auth=False),  # 401
        await gw.client.post("/v1/chat/completions", {"model": "nope", "messages": []}),  # 404
        await gw.client.request("POST", "/v1/chat/completions", data=b"{",
                                headers={"Content-Type": "application/json"}),  # 400
        await gw.client.get("/v1/chat/completions"),  # 405
        await gw.client.request("POST", "/v1/completions", data=b"x",
                                headers={"Content-Type": "multipart/form-data"}),  # 415
    ]
    assert [a.status for a in answers] == [401, 404, 400, 405, 415]
    for a in answers:
        jsonschema.validate(a.json(), schema)


async def _schemathesis(fake: FakeMLX, gateway_process: Any, tmp_path: Path, mode: str
                        ) -> tuple[int, str]:
    """Run schemathesis' CLI against a real gateway process, bounded in examples and time.
    The CLI runs as a subprocess so this loop keeps serving the fake upstream."""
    assert ST.exists(), f"schemathesis CLI not found at {ST}: pip install -e '.[test]'"
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({a: fake.url for a in FOUR}))
    gw = gateway_process(routes)
    proc = await asyncio.create_subprocess_exec(
        str(ST), "run", f"{gw.url}/openapi.json", "--url", gw.url,
        "-H", f"Authorization: Bearer {KEY}", "--checks", CHECKS, "--mode", mode,
        "--phases", "examples,coverage,fuzzing", "--max-examples", "50", "--seed", "1",
        "--generation-database", "none", "--request-timeout", "10", "--workers", "2",
        "--no-color", "--max-failures", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert gw.proc.poll() is None, "gateway died under schemathesis:\n" + gw.output()[-3000:]
    return proc.returncode or 0, out.decode(errors="replace")


async def test_schemathesis_valid_requests_get_documented_answers_and_no_server_error(
        fake: FakeMLX, gateway_process: Any, tmp_path: Path) -> None:
    rc, out = await _schemathesis(fake, gateway_process, tmp_path, "positive")
    assert rc == 0, out[-6000:]
    assert "No issues found" in out, out[-3000:]


async def test_schemathesis_invalid_requests_never_get_a_server_error(
        fake: FakeMLX, gateway_process: Any, tmp_path: Path) -> None:
    rc, out = await _schemathesis(fake, gateway_process, tmp_path, "negative")
    assert rc == 0, out[-6000:]
    # Negative mode also mangles the Authorization header, so the GETs only ever see 401 and
    # schemathesis prints a warning instead of "No issues found"; failures are what count.
    assert "FAILURES" not in out and " passed" in out, out[-3000:]


# --- every endpoint declared once (maclustr/endpoints.py) ----------------------------------


def _router_paths(app: Any) -> set[tuple[str, str]]:
    """(method, path) the aiohttp router serves, HEAD aside, in OpenAPI's spelling."""
    out = set()
    for route in app.router.routes():
        if route.method != "HEAD":
            out.add((route.method.lower(), route.resource.canonical))
    return out


@pytest.mark.parametrize("metrics", [True, False])
def test_openapi_paths_are_the_routers_paths(tmp_path: Path, metrics: bool) -> None:
    from maclustr.app import make_app
    from maclustr.auth import KeyRing
    from maclustr.reload import RoutesHolder

    text = routes_yaml({"a": "http://h:1"}) + f"gateway:\n  metrics: {str(metrics).lower()}\n"
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    table = parse_routes(text, str(path))
    app = make_app(RoutesHolder(path, table), KeyRing((KEY,)))
    doc = openapi_document(table)
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == _router_paths(app)
    assert ("post", "/v1/responses") in documented
    assert (("get", "/metrics") in documented) is metrics


def test_readme_endpoint_table_lists_every_endpoint() -> None:
    from maclustr.endpoints import ENDPOINTS

    readme = (ROOT / "README.md").read_text()
    start = readme.index("| endpoint | auth | what |")
    table = readme[start:readme.index("\n\n", start)]
    missing = [f"{e.method} {e.path}" for e in ENDPOINTS if f"`{e.method} {e.path}" not in table]
    assert not missing, f"README's endpoint table lacks {missing}"


def test_front_page_lists_every_served_endpoint(tmp_path: Path) -> None:
    from maclustr.endpoints import served
    from maclustr.page import render_page

    table = parse_routes(routes_yaml({"a": "http://h:1"}))
    html = render_page(table, "http://gw")
    for e in served(True):
        assert f'{e.method}</span><code>http://gw{e.path}</code>' in html, e.path
    assert "http://gw/v1/usage" not in render_page(
        parse_routes(routes_yaml({"a": "http://h:1"}, "gateway:\n  usage_db: false")), "http://gw")
