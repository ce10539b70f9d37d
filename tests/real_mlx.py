"""Kept so `from real_mlx import ...` in tests keeps working: the code lives in
maclustr.harness.mlx_server (shared with demo/ and bench/)."""

from maclustr.harness.mlx_server import free_port, start_mlx_server, stop, wait_healthy

__all__ = ["free_port", "start_mlx_server", "stop", "wait_healthy"]
