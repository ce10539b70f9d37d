"""A raw-socket fuzz of a real `maclustr serve` process (issue 25, item 2): a bounded number
of random and mutated requests, seeded so a failure replays. Every answer is our JSON
envelope (or a success) from `Server: maclustr`, or a clean close; afterwards the process is
alive and serving, and its log holds no traceback."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any
from urllib.parse import urlsplit

from conftest import KEY, FakeMLX, routes_yaml

SEED = 25
CASES = 240
AT_ONCE = 8
IDLE = 0.5  # seconds of silence after which a connection's answer is taken as complete

CHAT = json.dumps({"model": "maclustr-fast", "messages": [{"role": "user", "content": "hi"}]})
STREAM = json.dumps({"model": "maclustr-fast", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})
MESSAGES = json.dumps({"model": "maclustr-fast", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}]})
RESPONSES = json.dumps({"model": "maclustr-fast", "input": "hi"})


def post(path: str, body: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {KEY}",
                         *extra]) + "\r\n\r\n").encode()


SEEDS = [
    post("/v1/chat/completions", CHAT), post("/v1/chat/completions", STREAM),
    post("/v1/completions", json.dumps({"model": "maclustr-fast", "prompt": "hi"})),
    post("/v1/messages", MESSAGES), post("/v1/messages/count_tokens", MESSAGES),
    post("/v1/responses", RESPONSES), post("/v1/chat/completions", "{not json"),
    post("/v1/chat/completions", CHAT, "Connection: close"),
    post("/v1/chat/completions", CHAT).replace(  # Expect before the length: aiohttp's
        b"Content-Type:", b"Expect: 100-continue\r\nContent-Type:"),
    get("/health"), get("/v1/models"), get("/openapi.json"), get("/nowhere"),
    b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nOrigin: http://x\r\n\r\n",
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
     + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT.encode())),
]
ODD = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x7f", b"\xff", b"\x01", b"0" * 5000,
       b"-1", b"+5", b"99999999999999999999", b"chunked", b"\r\n\r\n", b"%", b"?", b"/../"]


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One to three random edits: bytes changed, inserted, deleted, lines repeated or
    dropped, the Content-Length replaced, the request doubled or cut."""
    out = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(8)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = rng.choice(ODD)
        elif kind == 2:
            del out[at:at + rng.randint(1, 12)]
        elif kind == 3:
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i] if rng.random() < 0.6 else b"")
            out = bytearray(b"\r\n".join(lines))
        elif kind == 4:
            out = bytearray(bytes(out).replace(
                b"Content-Length: ", b"Content-Length: " + rng.choice(ODD), 1))
        elif kind == 5:
            out += rng.choice(SEEDS)  # pipelined
        elif kind == 6:
            del out[at:]  # cut short
        else:
            out = bytearray(bytes(out).replace(b"\r\n", b"\n", rng.randint(1, 3)))
    return bytes(out)


def random_request(rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # noise
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    return mutate(rng, rng.choice(SEEDS))


def check_answers(data: bytes, server_closed: bool) -> list[int]:
    """The statuses of the complete answers in `data`; fails on anything not ours. A cut
    tail is fine only when we stopped reading (IDLE), not when the gateway closed."""
    statuses: list[int] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            assert not server_closed, f"the gateway closed mid-head: {data[:300]!r}"
            break
        lines = head.decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ")[:2]
        # HTTP/0.9: aiohttp reads a request line without a version as 0.9 and says so
        assert version in ("HTTP/1.1", "HTTP/1.0", "HTTP/0.9"), lines[0]
        status = int(status_text)
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status < 200:  # 100 Continue: a bare interim line
            data = rest
            continue
        assert headers.get("server") == "maclustr", (status, headers)
        if status in (204, 304):
            data = rest
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                assert not server_closed, f"the gateway cut an answer: {data[:300]!r}"
                break
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body, data, whole = dechunk(rest)
            if not whole:
                assert not server_closed, f"the gateway cut a stream: {data[:300]!r}"
                break
        else:
            body, data = rest, b""
        statuses.append(status)
        if status >= 400:
            assert headers.get("content-type", "").startswith("application/json"), headers
            obj = json.loads(body)
            assert "error" in obj and "Traceback" not in body.decode("utf-8", "replace"), body
    return statuses


def dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return body, data, False
        size = int(size_line.split(b";")[0], 16)
        if len(rest) < size + 2:
            return body, data, False
        body += rest[:size]
        data = rest[size + 2:]
        if size == 0:
            return body, data, True


async def one(host: str, port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send `raw`, read until the gateway closes or IDLE seconds of silence."""
    reader, writer = await asyncio.open_connection(host, port)
    got = b""
    closed = False
    try:
        writer.write(raw)
        await writer.drain()
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), IDLE)
            except asyncio.TimeoutError:
                break
            if not chunk:
                closed = True
                break
            got += chunk
    finally:
        writer.close()
    return got, closed


async def test_fuzzed_requests_get_our_answers_and_leave_no_traceback(
        gateway_process: Any, fake: FakeMLX, tmp_path: Any) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml({"maclustr-fast": fake.url}))
    gw = gateway_process(routes)
    url = urlsplit(gw.url)
    host, port = str(url.hostname), int(url.port or 0)
    rng = random.Random(SEED)
    cases = [random_request(rng) for _ in range(CASES)]
    gate = asyncio.Semaphore(AT_ONCE)
    seen: list[int] = []

    async def run(raw: bytes) -> None:
        async with gate:
            data, closed = await one(host, port, raw)
        try:
            seen.extend(check_answers(data, closed))
        except (AssertionError, ValueError) as e:
            raise AssertionError(f"request {raw[:300]!r} got {data[:600]!r}") from e

    await asyncio.gather(*(run(raw) for raw in cases))
    assert gw.proc.poll() is None, "the gateway died"
    data, _ = await one(host, port, get("/health", "Connection: close"))
    assert check_answers(data, True) == [200]
    log = gw.output()
    assert "Traceback" not in log and "Error handling request" not in log, log[-4000:]
    # the fuzz reached both the relay and the refusals
    assert 200 in seen and 400 in seen, sorted(set(seen))
