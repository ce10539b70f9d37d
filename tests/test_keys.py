"""Named keys: `name:secret` entries in MACLUSTR_API_KEY, bare secrets named by fingerprint,
rotation under one name, and names (never secrets) in the logs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, FakeMLX, routes_yaml

from maclustr.auth import KeyConfigError, KeyRing, fingerprint, parse_keys

CHAT = "/v1/chat/completions"
BODY = {"model": "maclustr-coder", "messages": [{"role": "user", "content": "hi"}]}


def test_entries_named_and_bare() -> None:
    keys = parse_keys(" alice:sk-a1 , ci-bot:sk-c2,sk-bare-3,, ")
    assert dict(keys) == {"alice": "sk-a1", "ci-bot": "sk-c2",
                          fingerprint("sk-bare-3"): "sk-bare-3"}
    ring = KeyRing(keys)
    assert ring.check("sk-a1") == "alice"
    assert ring.check("sk-c2") == "ci-bot"
    assert ring.check("sk-bare-3") == fingerprint("sk-bare-3")
    assert ring.check("alice:sk-a1") is None  # the name is not part of the secret
    assert ring.check("alice") is None
    assert ring.names == tuple(sorted(["alice", "ci-bot", fingerprint("sk-bare-3")]))


def test_rotation_under_one_name() -> None:
    ring = KeyRing(parse_keys("alice:old-secret,alice:new-secret"))
    assert ring.check("old-secret") == "alice" and ring.check("new-secret") == "alice"
    assert ring.names == ("alice",)


@pytest.mark.parametrize("entry", ["sk:", ":secret", "has space:x y", "-lead:secret",
                                   "a" * 65 + ":secret", "_under:x"])
def test_entries_that_are_not_name_secret_are_bare(entry: str) -> None:
    """Only a plain name before the colon makes a named entry; anything else is a secret."""
    assert parse_keys(entry) == ((fingerprint(entry), entry),)


def test_one_secret_under_two_names_is_refused_without_showing_it() -> None:
    with pytest.raises(KeyConfigError) as e:
        parse_keys("alice:sk-shared-123,bob:sk-shared-123")
    assert "sk-shared-123" not in str(e.value)
    assert parse_keys("alice:sk-1,alice:sk-1") == (("alice", "sk-1"),)  # a repeat is harmless


def test_serve_refuses_ambiguous_keys(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-coder": "http://127.0.0.1:9"}))
    env = {**os.environ, "MACLUSTR_API_KEY": "alice:sk-s3cret-x,bob:sk-s3cret-x"}
    r = subprocess.run([sys.executable, "-m", "maclustr", "serve", "--routes", str(routes),
                        "--port", "0"], env=env, cwd=str(ROOT), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "two names" in r.stderr and "sk-s3cret-x" not in r.stderr + r.stdout


async def test_names_in_log_secrets_never(gateway_process: Any, tmp_path: Path,
                                          fake: FakeMLX) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-coder": fake.url}))
    gp = gateway_process(routes, env={"MACLUSTR_API_KEY": "alice:sk-alice-0001,sk-bare-0002"})
    async with aiohttp.ClientSession() as s:
        for secret in ("sk-alice-0001", "sk-bare-0002"):
            async with s.post(gp.url + CHAT, json=BODY,
                              headers={"Authorization": f"Bearer {secret}"}) as r:
                assert r.status == 200, await r.text()
                await r.read()
    gp.proc.terminate()
    await asyncio.to_thread(gp.proc.wait, 10)
    log = gp.output()
    assert "sk-alice-0001" not in log and "sk-bare-0002" not in log
    assert "key=alice " in log and f"key={fingerprint('sk-bare-0002')} " in log
