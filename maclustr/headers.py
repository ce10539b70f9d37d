"""Headers we send: built, never copied, so nothing of the inside leaks out and no client
credential leaks in. Pure."""

from __future__ import annotations

import os
import re

_SANE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

SERVER = "maclustr"

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: never buffer this response
    "Server": SERVER,
}


def request_id(incoming: str | None) -> str:
    """The client's X-Request-Id when it is short and plain, else a fresh one."""
    if incoming and _SANE_ID.fullmatch(incoming):
        return incoming
    return os.urandom(12).hex()


def upstream_headers(rid: str, api_key: str | None) -> dict[str, str]:
    """An allow-list: the client's Authorization, cookies and the rest never go upstream."""
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
         "X-Request-Id": rid}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def cors(origin: str | None, origins: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers for a request from `origin` when `gateway.cors_origins` allows it."""
    if not origin or not (origin in origins or "*" in origins):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Expose-Headers": "X-Request-Id"}
