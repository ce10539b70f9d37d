"""Loaded by an mlx_lm.server whose PYTHONPATH names this directory (harness/wedge.py): its
generation loop dies or hangs on a marker prompt, the two failures of mlx-lm issue 27 is about.

`ResponseGenerator._next_request` runs in the generation thread; wrapping it reproduces both
shapes where they happen in the wild: raising there kills the thread (the server then answers
404 "generation thread died" and /health 503), blocking there leaves the thread alive and every
later request waiting (/health still 200).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

DIE = "maclustr-wedge-die"
HANG = "maclustr-wedge-hang"


def _patch(module: ModuleType) -> None:
    gen = module.ResponseGenerator
    inner = gen._next_request

    def _next_request(self: Any, timeout: float | None = None) -> Any:
        got = inner(self, timeout)
        said = repr(got[1]) if isinstance(got, tuple) and len(got) > 1 else ""
        if DIE in said:
            raise RuntimeError("injected failure in the generation loop (wedge harness)")
        if HANG in said:
            sys.stderr.write("wedge harness: the generation thread hangs now\n")
            sys.stderr.flush()
            threading.Event().wait()
        return got

    gen._next_request = _next_request


class _Finder(importlib.abc.MetaPathFinder):
    """Patches mlx_lm.server right after it is imported (by the console script's `from
    mlx_lm.server import main`)."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name != "mlx_lm.server":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())
