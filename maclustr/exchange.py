"""One client request as the handlers and the relay see it, whichever HTTP server carries it.

Two servers carry requests into the same handlers: `front.py`, a bare asyncio Protocol for
the POST endpoints (the hot path: its per-request cost is the gateway's), and aiohttp for
everything else and for the connections the front hands over. Both give the handlers an
`Exchange`; a handler answers with an `Answer` (a whole response) or streams through
`start_stream` / `end_stream`, writing events straight to `transport` (the relay's pump).

Pure: no aiohttp.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from .outcome import Outcome


@dataclass(slots=True)
class Answer:
    """A whole response; the server adds the framing (Content-Length, Date, Connection)."""

    status: int
    body: bytes
    headers: dict[str, str]


class Exchange(Protocol):
    """The client side of one request. `rid`, `outcome` and `key` (the API key's *name*)
    are set by the error funnel before any handler runs."""

    method: str
    path: str
    rid: str
    outcome: Outcome
    key: str

    def header(self, name: str) -> str | None:
        """A request header, case-insensitively (the first, when repeated)."""
        ...

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case; "" when there is no header."""
        ...

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's socket, for the stream relay's writes; None once it is gone."""
        ...

    async def drain(self) -> None:
        """Until the client's transport resumes writing (resume_writing: its buffer fell
        below the low-water mark), or is gone."""
        ...

    @property
    def started(self) -> bool:
        """A stream's head was sent: no other answer can follow."""
        ...

    async def body(self, limit: int) -> bytes:
        """The whole body; BodyTooLarge past `limit` bytes, without reading them all."""
        ...

    async def start_stream(self, headers: dict[str, str]) -> bool:
        """Send a 200 head with `headers`; True when the body must be chunk-framed."""
        ...

    async def end_stream(self) -> None:
        """End a started stream cleanly (the chunked terminator, or the close)."""
        ...


def client_gone(ex: Exchange) -> bool:
    """The client closed its connection (or is closing it)."""
    tr = ex.transport
    return tr is None or tr.is_closing()
