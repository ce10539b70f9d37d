"""A test that needs a real part (nginx, Chromium, mlx, an agent CLI) says so in one way.

Why: a silent skip on CI looks exactly like a pass. Under ``CI=true`` a missing part FAILS
the test with the package that provides it; on a developer's machine it skips with the same
message. pytest is imported only when a part is missing, so the demo and the benchmark can
import this module without it.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn, TypeVar

T = TypeVar("T")
FALSE = {"", "0", "false", "no", "off"}


def ci_strict() -> bool:
    """True when missing parts must fail: the CI environment sets ``CI=true``."""
    return os.environ.get("CI", "").strip().lower() not in FALSE


def missing(what: str, package: str) -> NoReturn:
    """Fail (under CI) or skip (elsewhere) the running test: `what` is absent."""
    import pytest

    message = f"{what} is not available; it comes from {package}"
    if ci_strict():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)
    raise AssertionError("pytest.skip returned")  # for type checkers that cannot see pytest


def require(found: T | None, what: str, package: str) -> T:
    """`found` when it is not None (a path, a module, a version); else `missing`."""
    if found is None:
        missing(what, package)
    return found


def require_command(names: str | tuple[str, ...], package: str, *also: str) -> str:
    """Absolute path of the program called `names` (one name or alternatives, searched on
    PATH), or the first executable of the paths in `also` (e.g. /usr/sbin/nginx for users
    without sbin on PATH)."""
    names = (names,) if isinstance(names, str) else names
    path = next((p for p in map(shutil.which, names) if p), None) \
        or next((p for p in also if os.access(p, os.X_OK)), None)
    return require(path, f"the program {' or '.join(names)!r}", package)


def require_module(name: str, package: str) -> ModuleType:
    """The imported module `name`, or `missing` when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"the Python module {name!r} ({e})", package)
