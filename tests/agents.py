"""The real agent CLIs (`claude`, `codex`) for the dialect tests: where `make agents` installs
them, and a clean environment to run them in (an empty HOME, nothing of ours inherited but
PATH and the locale, so no user config, login or key can leak in or be used)."""

from __future__ import annotations

import os
from pathlib import Path

from maclustr.harness import require

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".npm-tools" / "node_modules" / ".bin"
PINNED = {"claude": "2.1.197", "codex": "0.171.0"}  # the Makefile's agents target installs these


def require_cli(name: str) -> Path:
    """The installed CLI; a missing one FAILS under CI=true (never a silent skip there)."""
    path = BIN / name
    return require(path if path.exists() else None, f"`{name}` in {BIN}",
                   f"`make agents` (npm, pinned {PINNED[name]})")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1",
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache")}
    env.update(extra)
    return env
