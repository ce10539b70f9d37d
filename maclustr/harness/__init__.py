"""Helpers that the demo, the benchmark and the tests share: a tiny random-weight model, the
real SmolLM2-135M-Instruct converted from its GGUF (smollm.py), a real ``mlx_lm.server`` on
loopback, free ports, and "this test needs X" checks.

Why a package inside ``maclustr`` and not a test file: ``make demo`` and ``make bench`` must
not depend on the layout of ``tests/`` (renaming a test module used to break the demo), and
``pip install -e .`` already puts this package on every interpreter's path, so nothing needs
``sys.path`` edits; ``mypy maclustr`` checks it like the rest. The gateway never imports
it (imports go one way: harness -> nothing in the data path), and importing it is free:
mlx, mlx-lm, tokenizers and pytest are imported inside the functions that need them.
"""

from __future__ import annotations

from .mlx_server import free_port, start_mlx_server, stop, wait_healthy
from .requirements import ci_strict, missing, require, require_command, require_module
from .smollm import convert_in_child, find_gguf
from .tiny_model import build_in_child, make_tiny_model

__all__ = ["build_in_child", "ci_strict", "convert_in_child", "find_gguf", "free_port",
           "make_tiny_model", "missing", "require", "require_command", "require_module",
           "start_mlx_server", "stop", "wait_healthy"]
