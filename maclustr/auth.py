"""Bearer keys: which keys are valid, and how a presented key is checked.

Keys come only from the environment (MACLUSTR_API_KEY, comma-separated: rotation is "add the
new key, deploy, drop the old one"). They are compared in constant time and never logged;
logs carry `fingerprint(key)` instead.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def parse_keys(raw: str | None) -> frozenset[str]:
    """Keys from the env value; blanks and surrounding spaces are ignored."""
    if not raw:
        return frozenset()
    return frozenset(k.strip() for k in raw.split(",") if k.strip())


def fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a key, for logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive,
    surrounding spaces ignored), or None for a missing header or another scheme."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class KeyRing:
    """The valid keys. `check` costs the same whichever key matches, or none."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple((k.encode(), fingerprint(k)) for k in keys)
        if not self._keys:
            raise ValueError("at least one API key is required")

    def check(self, token: str | None) -> str | None:
        """The matching key's fingerprint, or None. Every key is compared, match or not."""
        if token is None:
            return None
        try:
            presented = token.encode()
        except UnicodeEncodeError:
            return None
        found = None
        for key, fp in self._keys:
            if hmac.compare_digest(presented, key):
                found = fp
        return found
