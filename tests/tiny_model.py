"""Kept so `from tiny_model import make_tiny_model` in tests keeps working: the code lives in
maclustr.harness.tiny_model (shared with demo/ and bench/)."""

from maclustr.harness.tiny_model import make_tiny_model

__all__ = ["make_tiny_model"]
