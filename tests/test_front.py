"""The front server (maclustr/front.py): the plain POST requests it serves itself, and every
other shape handed to aiohttp with the bytes read so far, on the same connection."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import KEY, FakeMLX, Gateway
from fake_mlx import Behavior
from hypothesis import given, settings
from hypothesis import strategies as st

from maclustr import front
from maclustr.errors import MalformedRequest

PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
BODY = json.dumps({"model": "maclustr-fast",
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM = json.dumps({"model": "maclustr-fast", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]}).encode()


def post(body: bytes = BODY, extra: str = "", version: str = "HTTP/1.1",
         path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} {version}\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def head(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode()


PLAIN = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Length: 2"]


@pytest.mark.parametrize("lines", [
    PLAIN,
    ["POST /v1/completions?beta=true HTTP/1.0", "content-length: 0"],
    [*PLAIN, "X-Odd: a:b:c", "Authorization: Bearer k"],
])
def test_plain_posts_are_the_fronts(lines: list[str]) -> None:
    got = front.parse_head(head(lines), PATHS)
    assert got is not None and got.path.startswith("/v1/")


@pytest.mark.parametrize("lines", [
    ["GET /v1/chat/completions HTTP/1.1", "Host: x"],  # another method
    ["POST /v1/models HTTP/1.1", "Content-Length: 2"],  # another path
    ["POST /v1/chat/%63ompletions HTTP/1.1", "Content-Length: 2"],  # aiohttp decodes it
    ["POST http://x/v1/chat/completions HTTP/1.1", "Content-Length: 2"],  # absolute form
    ["POST /v1/chat/completions HTTP/2.0", "Content-Length: 2"],
    ["POST /v1/chat/completions  HTTP/1.1", "Content-Length: 2"],
    ["POST /v1/chat/completions HTTP/1.1", "Host: x"],  # no Content-Length
    [*PLAIN, "Content-Length: 2"],  # repeated: a smuggling vector
    [*PLAIN[:2], "Content-Length: +2"],
    [*PLAIN[:2], "Transfer-Encoding: chunked"],
    [*PLAIN, "Transfer-Encoding: chunked"],
    [*PLAIN, "Expect: 100-continue"],
    [*PLAIN, "Upgrade: websocket"],
    [*PLAIN, "Bad Name: x"],
    [*PLAIN, " folded: x"],
    [*PLAIN, "X-Bare: a\nb"],
    [*PLAIN, "X-Cr: a\rb"],
    [*PLAIN, "X-Nul: a\x00b"],
    [*PLAIN, "no colon"],
    ["POST /v1/chat/completions HTTP/1.1", "Content-Length: 2"],  # HTTP/1.1 without Host
    [*PLAIN, "Host: y"],  # two Hosts
    [*PLAIN, "X-Ctl: a\x01b"],  # a control byte h11 refuses
    [*PLAIN, "X-Vt: a\x0bb"],
    ["POST /v1/completions?\xff HTTP/1.1", "Host: x", "Content-Length: 2"],  # not a VCHAR
    ["POST /v1/completions?\x7f HTTP/1.1", "Host: x", "Content-Length: 2"],
])
def test_every_other_shape_goes_to_aiohttp(lines: list[str]) -> None:
    assert front.parse_head(head(lines), PATHS) is None


def reference_parse(head: bytes) -> tuple[str, str, dict[str, str], int] | None:
    """The obvious byte-by-byte statement of what the front serves (parse_head is the fast
    one): path, version, headers (first value wins), Content-Length; None for aiohttp (or
    the front's own 400, for a length of more than 18 digits)."""
    if any((c < 0x20 and c != 0x09) or c == 0x7F for c in head.replace(b"\r\n", b"")):
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if not all(0x21 <= c <= 0x7E for c in parts[1]):
        return None
    path = parts[1].split(b"?", 1)[0].decode("latin-1")
    if path not in PATHS:
        return None
    headers: dict[str, str] = {}
    length = -1
    hosts = 0
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, front._TOKEN):
            return None
        key = name.lower().decode("ascii")
        value = value.strip(b" \t")
        hosts += key == "host"
        if key == "content-length":
            if length >= 0 or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif key in ("transfer-encoding", "expect", "upgrade"):
            return None
        else:
            headers.setdefault(key, value.decode("latin-1"))
    if hosts > 1 or (hosts == 0 and parts[2] == b"HTTP/1.1"):
        return None
    return None if length < 0 else (path, parts[2].decode(), headers, length)


_NAMES = [b"Host", b"content-length", b"Content-Length", b"X-A", b"Transfer-Encoding",
          b"expect", b"Connection", b"Bad Name", b"", b" X", b"X\xe9"]
_VALUES = [b"", b" ", b"\t2 ", b"2", b"12", b"+3", b"\xb2", b"\xe9", b"a\rb", b"a\nb", b"\x00",
           b"close", b"chunked", b"a:b", b"\x01", b"\x7f", b"9" * 19]
_lines = st.one_of(
    st.tuples(st.sampled_from(_NAMES), st.sampled_from([b":", b": ", b" :", b""]),
              st.sampled_from(_VALUES)).map(b"".join),
    st.lists(st.sampled_from(_NAMES + _VALUES), max_size=4).map(b"".join))


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from([b"POST /v1/chat/completions HTTP/1.1",
                              b"POST /v1/completions?x=1 HTTP/1.0",
                              b"POST /v1/models HTTP/1.1", b"GET /v1/completions HTTP/1.1"]),
       lines=st.lists(_lines, max_size=6),
       length=st.sampled_from([[b"Content-Length: 2"], []]),
       host=st.sampled_from([[b"Host: x"], []]))
def test_parse_head_equals_the_reference(start: bytes, lines: list[bytes],
                                         length: list[bytes], host: list[bytes]) -> None:
    head = b"\r\n".join([start, *host, *length, *lines])
    try:
        got = front.parse_head(head, PATHS)
    except MalformedRequest:
        got = None
    want = reference_parse(head)
    assert (None if got is None else (got.path, got.version, got.headers, got.length)) == want


async def exchange(gw: Gateway, data: bytes | list[bytes], pause: float = 0.0,
                   timeout: float = 10.0) -> bytes:
    """Write `data` (pieces `pause` apart) on one connection; everything read until the
    gateway closes it."""
    url = urlsplit(gw.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def statuses(raw: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.[01] (\d{3}) [A-Z]", raw)


@pytest.fixture
def handovers(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The first bytes of every connection the front handed to aiohttp."""
    seen: list[bytes] = []
    original = front.FrontProtocol._hand_over

    def spy(self: front.FrontProtocol) -> None:
        seen.append(bytes(self._buf[:80]))
        original(self)

    monkeypatch.setattr(front.FrontProtocol, "_hand_over", spy)
    return seen


async def test_pipelined_posts_answered_in_order_by_the_front(
        gateway: Gateway, fake: FakeMLX, handovers: list[bytes]) -> None:
    raw = await exchange(gateway, post(extra="X-Request-Id: first\r\n")
                         + post(STREAM, "X-Request-Id: second\r\n")
                         + post(extra="X-Request-Id: third\r\nConnection: close\r\n"))
    assert statuses(raw) == [b"200", b"200", b"200"]
    assert raw.index(b"X-Request-Id: first") < raw.index(b"X-Request-Id: second") \
        < raw.index(b"X-Request-Id: third")
    assert raw.count(b"data: [DONE]") == 1 and b"0\r\n\r\n" in raw  # the stream, chunked
    assert b"maclustr-fast" in raw and len(fake.requests) == 3
    assert handovers == []


async def test_keep_alive_after_another_endpoint_is_aiohttps(
        gateway: Gateway, handovers: list[bytes]) -> None:
    """A GET first: aiohttp serves it and the POST after it on the same connection."""
    raw = await exchange(gateway, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: "
                         + f"Bearer {KEY}".encode() + b"\r\n\r\n"
                         + post(extra="Connection: close\r\n"))
    assert statuses(raw) == [b"200", b"200"]
    assert raw.count(b"Server: maclustr") == 2
    assert len(handovers) == 1 and handovers[0].startswith(b"GET /v1/models")


async def test_chunked_and_expect_bodies_are_served_by_aiohttp(
        gateway: Gateway, handovers: list[bytes]) -> None:
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
               + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))
    raw = await exchange(gateway, chunked)
    assert statuses(raw) == [b"200"] and b"maclustr-fast" in raw
    expect = post(extra="Expect: 100-continue\r\nConnection: close\r\n")
    cut = expect.index(b"\r\n\r\n") + 4
    raw = await exchange(gateway, [expect[:cut], expect[cut:]], pause=0.05)
    assert statuses(raw) == [b"100", b"200"]
    assert len(handovers) == 2


async def test_http10_stream_is_close_delimited(gateway: Gateway, fake: FakeMLX) -> None:
    fake.push(Behavior(events=3))
    raw = await exchange(gateway, post(STREAM, version="HTTP/1.0"))
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in head_
    assert b"Transfer-Encoding" not in head_
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")


async def test_http11_stream_closing_after_is_still_chunked(gateway: Gateway,
                                                            fake: FakeMLX) -> None:
    """`Connection: close` on HTTP/1.1: the stream keeps its chunked terminator (how a client
    tells a complete stream from a cut one), then the connection closes."""
    fake.push(Behavior(events=3))
    raw = await exchange(gateway, post(STREAM, "Connection: close\r\n"))
    head_, _, body = raw.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head_
    assert b"Transfer-Encoding: chunked" in head_
    assert body.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_body_in_pieces_then_the_next_client(gateway: Gateway, fake: FakeMLX) -> None:
    """A head and body trickling in are put together; a client that leaves halfway costs
    nothing upstream, and the gateway serves the next one."""
    whole = post(extra="Connection: close\r\n")
    raw = await exchange(gateway, [whole[:20], whole[20:-10], whole[-10:]], pause=0.05)
    assert statuses(raw) == [b"200"]
    url = urlsplit(gateway.url)
    _, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(whole[:-5])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.1)
    assert len(fake.requests) == 1
    raw = await exchange(gateway, whole)
    assert statuses(raw) == [b"200"] and len(fake.requests) == 2


async def test_over_limit_body_is_refused_before_it_is_read(
        make_gateway: Any, fake: FakeMLX, handovers: list[bytes]) -> None:
    from conftest import routes_yaml

    gw = await make_gateway(routes_yaml({"maclustr-fast": fake.url},
                                        extra="gateway:\n  max_body_bytes: 1000\n"))
    raw = await exchange(gw, post(b" " * 5000, "Connection: close\r\n"))
    assert statuses(raw) == [b"413"] and b"request_too_large" in raw
    assert len(handovers) == 1 and fake.requests == []


async def test_idle_and_stalled_connections_are_closed(
        make_gateway: Any, fake: FakeMLX, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between requests, and a head that stops arriving: closed after the keep-alive time
    (75 s in production; shortened here). A request in progress is never cut."""
    from conftest import routes_yaml

    monkeypatch.setattr(front, "KEEPALIVE_SECONDS", 0.3)
    monkeypatch.setattr(front, "SWEEP_SECONDS", 0.1)
    gw = await make_gateway(routes_yaml({"maclustr-fast": fake.url}))
    url = urlsplit(gw.url)
    streams = []
    for data in (post(), post()[:30], post(STREAM)):
        if data.endswith(STREAM):
            fake.push(Behavior(events=3, delay=0.8))  # slower than the keep-alive time
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(data)
        streams.append((reader, writer))
        await asyncio.sleep(0.05)
    try:
        for reader, _ in streams:
            got = await asyncio.wait_for(reader.read(), 5)  # the gateway closes each
            assert got == b"" or statuses(got) == [b"200"], got[:200]
        assert statuses(got) == [b"200"] and got.endswith(b"0\r\n\r\n")
    finally:
        for _, writer in streams:
            writer.close()


@pytest.mark.parametrize("digits", [b"0" * 5000, b"9" * 19, b"0" * 19 + b"2"])
async def test_unreadable_content_length_is_the_fronts_400(
        gateway: Gateway, fake: FakeMLX, handovers: list[bytes],
        caplog: pytest.LogCaptureFixture, digits: bytes) -> None:
    """A Content-Length of more digits than any body needs (5,000 zeros passes isdigit(),
    then int() refuses it): our 400 from the front itself, one warning line, no traceback,
    the answer readable (no reset), and the gateway serving the next client."""
    raw = post(b"").replace(b"Content-Length: 0", b"Content-Length: " + digits)
    got = await exchange(gateway, raw + b"{}")
    head_, _, body = got.partition(b"\r\n\r\n")
    assert statuses(got) == [b"400"], got[:300]
    assert b"Server: maclustr\r\n" in head_ and b"Connection: close" in head_
    assert b"x-should-retry: false" in head_
    err = json.loads(body)["error"]
    assert (err["code"], err["type"]) == ("malformed_request", "invalid_request_error")
    assert handovers == [] and fake.requests == []
    refusals = [r for r in caplog.records if r.name.startswith(("maclustr", "asyncio", "aiohttp"))
                and r.levelno >= 30]
    assert len(refusals) == 1 and refusals[0].exc_info is None, refusals
    assert "malformed_request" in refusals[0].getMessage()
    ok = await exchange(gateway, post(extra="Connection: close\r\n"))
    assert statuses(ok) == [b"200"]


# --- the front's parser against a reference implementation (h11) ------------------------------

# Mostly valid heads with one or two odd parts, so that many are served by the front and each
# of its accepting paths is compared (odd bytes in every position, repeated, folded and empty
# headers, lengths with signs, spaces, leading zeros and huge values).
def _mostly(valid: Any, odd: Any) -> st.SearchStrategy[bytes]:
    """`valid` nine times in ten, else `odd` (lists are sampled from)."""
    def strat(x: Any) -> st.SearchStrategy[bytes]:
        return st.sampled_from(x) if isinstance(x, list) else x

    # the odd branch last: hypothesis favours the simplest draw (the first, the bounds)
    return st.sampled_from(range(10)).flatmap(lambda i: strat(odd) if i == 9 else strat(valid))


_METHODS = _mostly([b"POST"], [b"GET", b"post", b"POST\t", b"", b"P\xc3ST", b"PUT"])
_TARGETS = _mostly([b"/v1/chat/completions", b"/v1/completions", b"/v1/completions?beta=true",
                    b"/v1/chat/completions?a=%20&b=~!$'()*+,;=:@/?"],
                   [b"/v1/chat/completions?a b", b"/v1/models", b"http://x/v1/completions",
                    b"/v1/completions#f", b"", b"/v1/chat/completions?\x7f",
                    b"/v1/completions?\xff", b"/v1/completions?\x01",
                    b"/v1/completions?\t", b"/v1/chat/completions/"])
_VERSIONS = _mostly([b"HTTP/1.1", b"HTTP/1.0"],
                    [b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1", b"HTTP/1.1\x00"])
_DIGITS = st.one_of(st.integers(0, 10**6), st.integers(0, 10**25)).map(lambda n: str(n).encode())
_LENGTHS = _mostly(_DIGITS, st.one_of(
    st.tuples(st.sampled_from([b"", b" ", b"\t", b"0", b"000", b"0" * 16, b"+", b"-"]),
              st.integers(0, 99).map(lambda n: str(n).encode()),
              st.sampled_from([b"", b" ", b"\t", b"  ", b",2", b", 2", b" 2", b"x", b".0"]))
    .map(b"".join),
    st.sampled_from([b"0" * 5000, b"9" * 21, b"0" * 19, b"\xb2", b"\xd9\xa2", b"0x10", b"1e3",
                     b""])))
_LEGAL = [b"a", b"Z", b"0", b" ", b"\t", b"\x80", b"\xe9", b"\xff", b",", b":", b";", b'"',
          b"close", b"keep-alive", b"~", b"=", b"application/json"]
_ILLEGAL = [b"\x00", b"\x01", b"\x0b", b"\x0c", b"\x1f", b"\x7f", b"\r", b"\n"]
_VALUE = _mostly(st.lists(st.sampled_from(_LEGAL), max_size=5).map(b"".join),
                 st.one_of(st.lists(st.sampled_from(_LEGAL + _ILLEGAL), max_size=5)
                           .map(b"".join), st.binary(max_size=8)))
_NAME = _mostly(
    [b"X-A", b"x-a", b"Connection", b"Authorization", b"Content-Type", b"X-Request-Id",
     b"!#$%&'*+-.^_`|~09azAZ"],
    st.one_of(st.sampled_from([b"host", b"HOST", b"Content-Length", b"content-length",
                               b"Transfer-Encoding", b"Expect", b"Upgrade", b"", b" X", b"X ",
                               b"\tX", b"X\xe9", b"X\x01", b"X(", b"X/Y", b"X:Y"]),
              st.binary(min_size=1, max_size=6)))
_SEP = _mostly([b":", b": ", b":\t", b":  "], [b" :", b"", b"\t:"])


@st.composite
def _header_lines(draw: st.DrawFn) -> bytes:
    name = draw(_NAME)
    value = draw(_LENGTHS) if name.lower() == b"content-length" else draw(_VALUE)
    line = name + draw(_SEP) + value + draw(st.sampled_from([b"", b"", b" ", b"\t"]))
    if draw(st.sampled_from(range(10))) == 9:  # an obsolete folded continuation line
        line += b"\r\n" + draw(st.sampled_from([b" ", b"\t"])) + draw(_VALUE)
    return line


_HOST = b"Host: gw"
_CL = st.tuples(st.sampled_from([b"Content-Length", b"content-length"]), _SEP, _LENGTHS
                ).map(b"".join)


@st.composite
def _heads(draw: st.DrawFn) -> bytes:
    start = b" ".join([draw(_METHODS), draw(_TARGETS), draw(_VERSIONS)])
    lines = draw(st.lists(_header_lines(), max_size=4))
    if draw(st.sampled_from(range(10))) != 9:
        lines.insert(draw(st.integers(0, len(lines))), _HOST)
    if draw(st.sampled_from(range(10))) != 9:
        lines.insert(draw(st.integers(0, len(lines))), draw(_CL))
    if draw(st.sampled_from(range(10))) == 9:  # a repeat
        lines.append(draw(st.sampled_from([_HOST, b"Content-Length: 2", b"X-A: again"])))
    # What the front parses ends at the first blank line (that is where it cuts the head).
    return b"\r\n".join([start, *lines]).split(b"\r\n\r\n")[0]


def h11_request(raw: bytes) -> Any:
    """h11's Request for the head, or None when h11 refuses it."""
    import h11

    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(raw + b"\r\n\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


FRONT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@settings(max_examples=500, deadline=None)
@given(raw=_heads())
def test_what_the_front_accepts_h11_accepts_alike(raw: bytes) -> None:
    """Differential: whenever parse_head serves a head, h11 (a well-kept strict parser)
    reads the same method, target, version, headers (the first of each name) and length.
    The front may refuse more (aiohttp then answers): never accept what h11 refuses."""
    try:
        got = front.parse_head(raw, FRONT_PATHS)
    except MalformedRequest:
        got = None
    if got is None:
        return
    ref = h11_request(raw)
    assert ref is not None, f"the front serves what h11 refuses: {raw!r}"
    assert ref.method == b"POST"
    assert ref.target.decode("ascii").split("?", 1)[0] == got.path
    assert b"HTTP/" + ref.http_version == got.version.encode()
    first: dict[str, str] = {}
    length = None
    for name, value in ref.headers:
        if name == b"content-length":
            length = int(value)
        else:
            first.setdefault(name.decode("ascii"), value.decode("latin-1"))
    assert (first, length) == (got.headers, got.length), raw


@pytest.mark.parametrize("before", ["Expect: 100-continue", "Upgrade: h2c", "X-Bad\x01: 1"])
async def test_unreadable_content_length_on_a_handed_over_head_is_a_400(
        gateway: Gateway, fake: FakeMLX, caplog: pytest.LogCaptureFixture,
        before: str) -> None:
    """A head the front hands to aiohttp before it reaches the Content-Length: aiohttp's
    `request.content_length` calls int() on the same 5,000 digits (a 500 and a traceback)."""
    raw = post(b"", extra="Connection: close\r\n").replace(
        b"Content-Length: 0", before.encode() + b"\r\nContent-Length: " + b"0" * 5000)
    got = await exchange(gateway, raw)
    assert statuses(got)[-1:] == [b"400"], got[:300]
    err = json.loads(got.rsplit(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "malformed_request", err
    assert not [r for r in caplog.records if r.exc_info], caplog.text[-2000:]
    assert fake.requests == []
