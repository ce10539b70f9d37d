"""The floor of a Python proxy, for the benchmark's `pipe` targets (issue 15).

Why: to tell which part of maclustr's cost is maclustr and which is any proxy written in
Python on uvloop, measure a proxy that does nothing a proxy can skip: a byte pipe with one
upstream connection per client connection (as maclustr has for mlx_lm.server's HTTP/1.0),
no HTTP parsing, no routing, no rewrite, no log. Whatever it adds over direct, no
single-process Python gateway can avoid. It binds with SO_REUSEPORT: the benchmark's
`pipe-2` target starts two on one port (the kernel spreads the connections), to show what a
second process would buy.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop  # a maclustr dependency wherever the bench runs: the floor of maclustr's loop


class _UpstreamSide(asyncio.Protocol):
    """Bytes from the upstream go straight to the client."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _ClientSide(asyncio.Protocol):
    """One client connection: connect the upstream, hold the client's bytes until then."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.held: list[bytes] = []
        self.up: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        asyncio.get_running_loop().create_task(self._connect(client))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: _UpstreamSide(client), *self.upstream)
        except OSError:
            client.close()
            return
        self.up = up
        for data in self.held:
            up.write(data)
        self.held = []
        if client.is_closing():
            up.close()

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.held.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def serve(port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream), "127.0.0.1", port,
                                      backlog=4096, reuse_port=True)
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, ("127.0.0.1", args.upstream_port)))


if __name__ == "__main__":
    main()
