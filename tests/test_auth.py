"""Bearer auth on every /v1 route: who gets in, who gets a clean 401, and that a refused
request never costs the upstream anything."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import KEY, KEY2, Answer, Gateway, routes_yaml
from fake_mlx import FakeMLX

from maclustr.harness import free_port

CHAT = "/v1/chat/completions"
BODY = {"model": "maclustr-coder", "messages": [{"role": "user", "content": "hi"}]}


def hdr(headers: dict[str, str], name: str) -> str | None:
    low = name.lower()
    return next((v for k, v in headers.items() if k.lower() == low), None)


def assert_401(ans: Answer) -> None:
    """The OpenAI envelope the SDKs turn into AuthenticationError, plus the RFC 6750 hint."""
    assert ans.status == 401, ans.body
    assert ans.json() == {"error": {"message": ans.json()["error"]["message"],
                                    "type": ans.json()["error"]["type"],
                                    "code": "invalid_api_key", "param": None}}
    msg = ans.json()["error"]["message"]
    assert isinstance(msg, str) and msg
    assert KEY not in msg and KEY2 not in msg
    assert (hdr(ans.headers, "WWW-Authenticate") or "").lower().startswith("bearer")
    assert (hdr(ans.headers, "Content-Type") or "").startswith("application/json")


BAD_HEADERS: dict[str, dict[str, str]] = {
    "none": {},
    "empty": {"Authorization": ""},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "key prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key plus suffix": {"Authorization": f"Bearer {KEY}x"},
    "basic scheme": {"Authorization": "Basic " + base64.b64encode(f"u:{KEY}".encode()).decode()},
    "basic with raw key": {"Authorization": f"Basic {KEY}"},
    "bare key": {"Authorization": KEY},
    "token scheme": {"Authorization": f"Token {KEY}"},
    "bearer only": {"Authorization": "Bearer"},
    "two tokens": {"Authorization": f"Bearer {KEY} {KEY2}"},
    "key in x-api-key": {"X-Api-Key": KEY},
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_credentials_get_401_and_upstream_never_called(
        gateway: Gateway, fake: FakeMLX, case: str, stream: bool) -> None:
    """Anything but a valid bearer key is refused before routing or upstream work."""
    ans = await gateway.client.post(CHAT, {**BODY, "stream": stream}, auth=False,
                                    headers=BAD_HEADERS[case])
    assert_401(ans)
    assert fake.requests == []


@pytest.mark.parametrize("value", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY2}",
                                   f"  Bearer {KEY}  ", f"Bearer    {KEY}", f"\tBearer {KEY2}\t"])
async def test_accepted_bearer_forms(gateway: Gateway, fake: FakeMLX, value: str) -> None:
    """Scheme is case-insensitive (RFC 7235) and surrounding spaces are tolerated."""
    ans = await gateway.client.post(CHAT, BODY, auth=False, headers={"Authorization": value})
    assert ans.status == 200, ans.body
    assert len(fake.requests) == 1


async def test_both_rotated_keys_are_valid(gateway: Gateway, fake: FakeMLX) -> None:
    """Rotation: old and new key work side by side."""
    for key in (KEY, KEY2):
        ans = await gateway.client.post(CHAT, BODY, auth=False,
                                        headers={"Authorization": f"Bearer {key}"})
        assert ans.status == 200
        models = await gateway.client.get("/v1/models", auth=False,
                                          headers={"Authorization": f"Bearer {key}"})
        assert models.status == 200


@pytest.mark.parametrize(("path", "status"), [("/v1/models", 200),
                                              ("/v1/models/maclustr-coder", 200),
                                              ("/v1/models/nope", 404)])
async def test_models_routes_need_key(gateway: Gateway, path: str, status: int) -> None:
    """Listing models is an API route too: no key, no catalogue (and no existence oracle)."""
    assert_401(await gateway.client.get(path, auth=False))
    assert_401(await gateway.client.get(path, auth=False,
                                        headers={"Authorization": "Bearer wrong"}))
    ok = await gateway.client.get(path)
    assert ok.status == status, ok.body


async def test_completions_route_needs_key(gateway: Gateway, fake: FakeMLX) -> None:
    ans = await gateway.client.post("/v1/completions", {"model": "maclustr-coder",
                                                        "prompt": "x"}, auth=False)
    assert_401(ans)
    assert fake.requests == []


async def test_401_comes_before_body_validation(gateway: Gateway) -> None:
    """An unauthenticated client learns nothing about models or body rules."""
    assert_401(await gateway.client.post(CHAT, {"model": "nope"}, auth=False))
    assert_401(await gateway.client.request("POST", CHAT, auth=False, data=b"{not json"))


@pytest.mark.parametrize("query", ["", "?deep=true"])
async def test_health_needs_no_key(gateway: Gateway, query: str) -> None:
    """Load balancers and launchd checks have no key."""
    ans = await gateway.client.get("/health" + query, auth=False)
    assert ans.status == 200
    assert ans.json()["status"] == "ok"
    wrong = await gateway.client.get("/health" + query, auth=False,
                                     headers={"Authorization": "Bearer wrong"})
    assert wrong.status == 200


def _get(url: str, key: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_process_reads_comma_separated_keys_from_env(gateway_process: Any, tmp_path: Path
                                                     ) -> None:
    """`maclustr serve` takes every key of MACLUSTR_API_KEY (spaces and empty items
    ignored), and only those."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-coder": f"http://127.0.0.1:{free_port()}"}))
    gw = gateway_process(routes, env={"MACLUSTR_API_KEY": " new-key-1 ,old-key-2,, "})
    for key in ("new-key-1", "old-key-2"):
        status, body = _get(gw.url + "/v1/models", key)
        assert status == 200, body
        assert [m["id"] for m in body["data"]] == ["maclustr-coder"]
    bad: tuple[str | None, ...] = (KEY, "", " ", "new-key-1,old-key-2", None)
    for bad_key in bad:
        status, body = _get(gw.url + "/v1/models", bad_key)
        assert status == 401, (bad_key, body)
        assert body["error"]["code"] == "invalid_api_key"
    log = gw.output()
    assert "new-key-1" not in log and "old-key-2" not in log


@pytest.mark.parametrize("value", [b"Bearer caf\xe9-key", b"Bearer \xff\xfe",
                                   "Bearer ключ".encode()])
async def test_non_ascii_key_is_401_not_500(gateway: Gateway, fake: FakeMLX, value: bytes
                                            ) -> None:
    """Odd bytes in the header are just a wrong key."""
    ans = await gateway.client.post(CHAT, BODY, auth=False,
                                    headers={"Authorization": value.decode("latin-1")})
    assert_401(ans)
    assert fake.requests == []


async def test_very_long_key_is_401(gateway: Gateway, fake: FakeMLX) -> None:
    """A 20 KB token is compared and refused like any other wrong key."""
    ans = await gateway.client.post(CHAT, BODY, auth=False,
                                    headers={"Authorization": "Bearer " + "k" * 20_000})
    assert_401(ans)
    assert fake.requests == []
