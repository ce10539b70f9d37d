"""The README's module map names every module of the package."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_module_map_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("| module | what |"):]
    layout = layout.split("\n\n", 1)[0]
    modules = sorted(p.name for p in (ROOT / "maclustr").glob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, f"README's module map lacks {missing}"
