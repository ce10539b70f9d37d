"""The catalogue (/v1/models) speaks OpenAI's list format in public aliases only, and /health
tells operators — shallow or deep — what is up, without ever naming an address."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from conftest import KEY, Answer, Gateway, routes_yaml
from fake_mlx import Behavior, FakeMLX

from maclustr.harness import free_port

CODER_ID = "/Users/admin/models/internal-maclustr-coder-id"
HF_ID = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
CARD_FIELDS = {"id", "object", "created", "owned_by", "description", "parameters"}


def assert_card(card: dict[str, Any], alias: str) -> None:
    assert set(card) >= CARD_FIELDS, card
    assert card["id"] == alias
    assert card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    assert card["owned_by"] == "maclustr"
    assert card["description"] == f"Test model {alias}"
    assert card["parameters"] == "1B"


def assert_not_found(ans: Answer, name: str) -> None:
    assert ans.status == 404, ans.body
    err = ans.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == "model_not_found"
    assert f"'{name}'" in err["message"]
    assert "maclustr-coder" in err["message"] and "maclustr-fast" in err["message"]


async def test_models_list_openai_format(gateway: Gateway) -> None:
    """The shape the openai SDK's models.list() parses, aliases in routes-file order."""
    ans = await gateway.client.get("/v1/models")
    assert ans.status == 200
    body = ans.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["maclustr-coder", "maclustr-fast"]
    for card in body["data"]:
        assert_card(card, card["id"])
    assert b"internal" not in ans.body and b"/Users" not in ans.body


@pytest.mark.parametrize("alias", ["maclustr-coder", "maclustr-fast"])
async def test_model_card_by_alias(gateway: Gateway, alias: str) -> None:
    ans = await gateway.client.get(f"/v1/models/{alias}")
    assert ans.status == 200
    assert_card(ans.json(), alias)
    listed = (await gateway.client.get("/v1/models")).json()["data"]
    assert ans.json() == next(c for c in listed if c["id"] == alias)


async def test_model_card_by_internal_id_is_the_alias_card(
        make_gateway: Any, fake: FakeMLX) -> None:
    """The full internal id (with slashes) is accepted and answered with the public card."""
    gw = await make_gateway(routes_yaml({"maclustr-coder": fake.url, "maclustr-fast": fake.url},
                                        models={"maclustr-coder": HF_ID}))
    ans = await gw.client.get(f"/v1/models/{HF_ID}")
    assert ans.status == 200, ans.body
    assert_card(ans.json(), "maclustr-coder")
    assert HF_ID.encode() not in ans.body


async def test_model_card_by_path_internal_id(gateway: Gateway) -> None:
    """A filesystem-path id (leading slash) resolves too, percent-encoded or not."""
    for path in ("/v1/models/%2FUsers%2Fadmin%2Fmodels%2Finternal-maclustr-coder-id",
                 "/v1/models/" + CODER_ID):
        ans = await gateway.client.get(path)
        assert ans.status == 200, (path, ans.body)
        assert_card(ans.json(), "maclustr-coder")


@pytest.mark.parametrize("name", ["nope", "gpt-4o", "MACLUSTR-CODER", "maclustr-coder-x"])
async def test_unknown_model_card_is_404_envelope(gateway: Gateway, name: str) -> None:
    assert_not_found(await gateway.client.get(f"/v1/models/{name}"), name)


async def test_unknown_model_on_completions_is_404_envelope(
        gateway: Gateway, fake: FakeMLX) -> None:
    """Same envelope when routing fails, and the upstream is not bothered."""
    ans = await gateway.client.post("/v1/chat/completions", {
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert_not_found(ans, "gpt-4o")
    assert fake.requests == []


async def test_shallow_health(gateway: Gateway, fake: FakeMLX) -> None:
    """Cheap liveness: no upstream traffic, aliases listed."""
    ans = await gateway.client.get("/health", auth=False)
    assert ans.status == 200
    assert ans.json() == {"status": "ok", "models": ["maclustr-coder", "maclustr-fast"]}
    assert fake.requests == []


def health_gateway(upstreams: dict[str, str], timeout: float = 0.5) -> str:
    return routes_yaml(upstreams, extra=f"gateway:\n  health_timeout: {timeout}")


async def test_deep_health_all_up(gateway: Gateway, fake: FakeMLX) -> None:
    """Every alias up with a latency; the shared server is asked (once or more), by GET."""
    ans = await gateway.client.get("/health?deep=true", auth=False)
    assert ans.status == 200
    body = ans.json()
    assert body["status"] == "ok"
    assert set(body["models"]) == {"maclustr-coder", "maclustr-fast"}
    for m in body["models"].values():
        assert m["status"] == "up"
        assert isinstance(m["latency_ms"], (int, float)) and 0 <= m["latency_ms"] < 5000
    assert fake.requests and all((r.method, r.path) == ("GET", "/health")
                                 for r in fake.requests)


@pytest.mark.parametrize("how", ["closed fake", "refused port", "error status"])
async def test_deep_health_one_down_is_degraded(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX, how: str) -> None:
    """One node gone: 503 `degraded`, that alias down, the other up, no address shown."""
    down_url = fake2.url
    if how == "closed fake":
        await fake2.close()
    elif how == "refused port":
        down_url = f"http://127.0.0.1:{free_port()}"
    else:
        fake2.health = Behavior(kind="error", status=503, error_body=b"loading")
    gw = await make_gateway(health_gateway({"maclustr-coder": fake.url,
                                            "maclustr-fast": down_url}))
    ans = await gw.client.get("/health?deep=true", auth=False)
    assert ans.status == 503
    body = ans.json()
    assert body["status"] == "degraded"
    assert body["models"]["maclustr-coder"]["status"] == "up"
    # a /health 503 is mlx's dead generation thread: `wedged`, the healer's (issue 27)
    assert body["models"]["maclustr-fast"]["status"] == (
        "wedged" if how == "error status" else "down")
    blob = ans.body.decode()
    assert "127.0.0.1" not in blob and "http" not in blob and str(fake2.port) not in blob


async def test_deep_health_all_down_is_not_ok(make_gateway: Any) -> None:
    gw = await make_gateway(health_gateway({"maclustr-coder": f"http://127.0.0.1:{free_port()}"}))
    ans = await gw.client.get("/health?deep=true", auth=False)
    assert ans.status == 503
    assert ans.json()["status"] != "ok"
    assert ans.json()["models"]["maclustr-coder"]["status"] == "down"


async def test_deep_health_bounded_by_timeout_when_upstreams_hang(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    """Hung servers are pinged concurrently under health_timeout: three hung servers answer
    in about one timeout (sequential pings would take three), and all say down."""
    async with FakeMLX() as fake3:
        for f in (fake, fake2, fake3):
            f.health = Behavior(kind="hang")
        gw = await make_gateway(health_gateway({"maclustr-coder": fake.url,
                                                "maclustr-fast": fake2.url,
                                                "maclustr-general": fake3.url}, timeout=0.4))
        start = time.monotonic()
        ans = await gw.client.get("/health?deep=true", auth=False, timeout=5)
        took = time.monotonic() - start
    assert 0.35 <= took < 1.1, took
    assert ans.status == 503
    assert {m["status"] for m in ans.json()["models"].values()} == {"down"}
    assert len(ans.json()["models"]) == 3


async def test_deep_health_one_hung_one_up(
        make_gateway: Any, fake: FakeMLX, fake2: FakeMLX) -> None:
    fake2.health = Behavior(kind="hang")
    gw = await make_gateway(health_gateway({"maclustr-coder": fake.url,
                                            "maclustr-fast": fake2.url}, timeout=0.3))
    start = time.monotonic()
    ans = await gw.client.get("/health?deep=true", auth=False, timeout=5)
    assert time.monotonic() - start < 0.8
    assert ans.status == 503
    body = ans.json()
    assert body["status"] == "degraded"
    assert body["models"]["maclustr-coder"]["status"] == "up"
    fast = body["models"]["maclustr-fast"]
    assert (fast["status"], fast["latency_ms"]) == ("down", None)
    assert fast["replicas"] == [{"status": "down", "latency_ms": None}]  # public: no load


@pytest.mark.parametrize("query", ["?deep=false", "?deep=0", "?other=1"])
async def test_non_deep_query_is_shallow(gateway: Gateway, fake: FakeMLX, query: str) -> None:
    ans = await gateway.client.get("/health" + query, auth=False)
    assert ans.status == 200
    assert ans.json()["models"] == ["maclustr-coder", "maclustr-fast"]
    assert fake.requests == []


async def test_openai_sdk_lists_and_retrieves_models(gateway: Gateway) -> None:
    """The official SDK parses our catalogue and maps our errors to its exceptions."""
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    bad = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0)
    try:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["maclustr-coder", "maclustr-fast"]
        assert all(m.owned_by == "maclustr" for m in page.data)
        card = await client.models.retrieve("maclustr-fast")
        assert card.id == "maclustr-fast"
        with pytest.raises(openai.NotFoundError) as nf:
            await client.models.retrieve("nope")
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError) as au:
            await bad.models.list()
        assert au.value.code == "invalid_api_key"
    finally:
        await client.close()
        await bad.close()
