"""The leak check's eyes: a copy of every byte a gateway under test writes to any client.

Why on the server side: tests read answers through many clients (the shared GatewayClient,
raw aiohttp sessions, SDKs, urllib, curl and Chromium subprocesses, raw sockets, nginx in
front). Recording each of them is a list that the next test forgets; recording what the
gateway writes covers them all, and cannot change what a client sees (no proxy in between).

How: both servers' connection_made (the front's FrontProtocol and aiohttp's RequestHandler)
get a transport that forwards every call to the real one and copies write()/writelines() into
a sink. The relay writes to the exchange's transport, which is this transport, so streams are
covered too; a connection the front hands to aiohttp keeps its one tapped transport. In the
test process only the ports of in-process gateways are recorded (fake upstreams stay out); a
gateway process started by a test loads `wire_tap_site/sitecustomize.py`, which records all of
its connections into a file (framed, so each connection is checked on its own).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web_protocol

from maclustr import front

Sink = Callable[[bytes], Any]
SITE_DIR = Path(__file__).resolve().parent / "wire_tap_site"
ENV = "MACLUSTR_WIRE_TAP"  # the file a gateway process records into


class TappedTransport:
    """Everything goes to `inner`; what is written is also copied to `sink`."""

    def __init__(self, inner: Any, sink: Sink) -> None:
        self._inner = inner
        self._sink = sink

    def write(self, data: Any) -> None:
        self._sink(bytes(data))
        self._inner.write(data)

    def writelines(self, chunks: Iterable[Any]) -> None:
        chunks = list(chunks)
        for c in chunks:
            self._sink(bytes(c))
        self._inner.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install(route: Callable[[Any], Sink | None]) -> None:
    """route(transport) -> the sink for this new connection, or None to leave it alone."""
    for cls in (front.FrontProtocol, web_protocol.RequestHandler):
        original = cls.__dict__["connection_made"]

        def connection_made(self: Any, transport: Any, original: Any = original) -> None:
            if isinstance(transport, TappedTransport):  # handed over by the front: tapped
                original(self, transport)
                return
            sink = route(transport)
            original(self, transport if sink is None else TappedTransport(transport, sink))

        cls.connection_made = connection_made  # type: ignore[method-assign]


class PortRecorder:
    """In the test process: records connections to the registered (gateway) ports."""

    def __init__(self) -> None:
        self.by_port: dict[int, list[bytearray]] = {}

    def watch(self, port: int) -> list[bytearray]:
        return self.by_port.setdefault(port, [])

    def forget(self, port: int) -> list[bytearray]:
        return self.by_port.pop(port, [])

    def route(self, transport: Any) -> Sink | None:
        sockname = transport.get_extra_info("sockname")
        conns = self.by_port.get(sockname[1]) if sockname else None
        if conns is None:
            return None
        buf = bytearray()
        conns.append(buf)
        return buf.extend


def record_to_file(path: str) -> None:
    """In a gateway process: append `<connection> <length>\\n<bytes>` records to `path`."""
    out = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
    ids = itertools.count()

    def route(transport: Any) -> Sink:
        conn = next(ids)

        def sink(data: bytes) -> None:
            out.write(b"%d %d\n" % (conn, len(data)) + data)

        return sink

    install(route)


def read_file(path: Path) -> list[bytes]:
    """The per-connection byte streams recorded by `record_to_file` (so far)."""
    if not path.exists():
        return []
    raw, i = path.read_bytes(), 0
    conns: dict[int, bytearray] = {}
    while i < len(raw):
        nl = raw.find(b"\n", i)
        if nl < 0:
            break  # a record still being written (the process is running)
        conn, size = map(int, raw[i:nl].split())
        conns.setdefault(conn, bytearray()).extend(raw[nl + 1:nl + 1 + size])
        i = nl + 1 + size
    return [bytes(b) for b in conns.values()]


CHUNK_HEADER = re.compile(rb"\r\n[0-9a-fA-F]{1,8}\r\n")


def leaks(streams: Iterable[bytes], secrets: set[str]) -> list[str]:
    """Each secret found in a stream (as is, JSON-escaped, or split by chunked framing)."""
    found = []
    forms = {s: {s.encode(), json.dumps(s)[1:-1].encode()} for s in secrets}
    for stream in streams:
        for blob in (stream, CHUNK_HEADER.sub(b"", stream)):
            for s, fs in forms.items():
                for f in fs:
                    if f in blob:
                        at = blob.index(f)
                        found.append(f"{s!r} in {blob[max(0, at - 200):at + 100]!r}")
    return found


def process_env(path: Path) -> dict[str, str]:
    """Environment for a gateway process that records into `path`."""
    pp = os.environ.get("PYTHONPATH")
    return {ENV: str(path), "PYTHONPATH": str(SITE_DIR) + (os.pathsep + pp if pp else "")}
