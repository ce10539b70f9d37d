"""Bearer keys: which keys are valid, what each is called, and how a presented key is checked.

Keys come only from the environment: MACLUSTR_API_KEY is a comma-separated list whose entries
are `name:secret` or a bare `secret`. A name is what logs and metrics show (a bare secret is
named by its fingerprint); the secret is compared in constant time and never logged.
Rotation is "add the new key, deploy, drop the old one"; giving the new key the old one's
name (`alice:old,alice:new`) keeps alice's metrics one series across the change.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

# A name is short and plain, so it is safe as a Prometheus label value and in a log line.
# An entry whose part before the first colon is not such a name is a bare secret.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class KeyConfigError(ValueError):
    """MACLUSTR_API_KEY cannot be used as given (the message never holds a secret)."""


def fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for a key, for logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_entry(entry: str) -> tuple[str, str]:
    """(name, secret) of one MACLUSTR_API_KEY entry: `name:secret` or a bare `secret`."""
    name, sep, secret = entry.partition(":")
    name = name.strip()
    if sep and _NAME.fullmatch(name) and secret.strip():
        return name, secret.strip()
    return fingerprint(entry), entry


def parse_keys(raw: str | None) -> tuple[tuple[str, str], ...]:
    """(name, secret) pairs from the env value; blanks and surrounding spaces are ignored.
    Several secrets may share a name (rotation); one secret under two names is refused."""
    if not raw:
        return ()
    out: dict[str, str] = {}
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, secret = parse_entry(entry)
        other = out.get(secret)
        if other is not None and other != name:
            raise KeyConfigError(f"one key is listed under two names: '{other}' and '{name}'")
        out[secret] = name
    return tuple((name, secret) for secret, name in out.items())


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
    """The valid keys. `check` costs the same whichever key matches, or none.

    Built from (name, secret) pairs, or from entries as MACLUSTR_API_KEY spells them."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str | tuple[str, str]]) -> None:
        pairs = [k if isinstance(k, tuple) else parse_entry(k) for k in keys]
        self._keys = tuple((secret.encode(), name) for name, secret in pairs)
        if not self._keys:
            raise ValueError("at least one API key is required")

    @property
    def names(self) -> tuple[str, ...]:
        """Every key's name, sorted, once each."""
        return tuple(sorted({name for _, name in self._keys}))

    def check(self, token: str | None) -> str | None:
        """The matching key's name, or None. Every key is compared, match or not."""
        if token is None:
            return None
        try:
            presented = token.encode()
        except UnicodeEncodeError:
            return None
        found = None
        for key, name in self._keys:
            if hmac.compare_digest(presented, key):
                found = name
        return found
