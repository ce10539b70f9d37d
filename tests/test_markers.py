"""The slow-kind markers `make unit` deselects come from what a test uses (tests/conftest.py),
so a new test that needs a real part is kept out of the fast loop without anyone marking it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from conftest import SLOW_KINDS, require_command, slow_kinds

ROOT = Path(__file__).resolve().parent.parent


def item(fn: Any, *fixtures: str) -> Any:
    return SimpleNamespace(function=fn, fixturenames=list(fixtures), _fixtureinfo=None)


def _starts_nginx() -> None:
    require_command("nginx", "the Debian package nginx-light")


def _helper_that_starts_chromium() -> None:
    require_command(("chromium", "chromium-browser"), "the Debian package chromium")


def test_a_fixture_marks_the_test() -> None:
    assert slow_kinds(item(lambda: None, "real_mlx", "tmp_path")) == {"real_upstream"}


def test_a_program_name_marks_the_test() -> None:
    assert slow_kinds(item(_starts_nginx)) == {"system"}


def test_a_helper_is_followed_down() -> None:
    def test() -> None:
        _helper_that_starts_chromium()

    assert slow_kinds(item(test)) == {"browser", "system"}


def test_a_docstring_does_not_mark() -> None:
    def test() -> None:
        """Unlike the real_mlx tests, this one uses require_command('sh')."""

    assert slow_kinds(item(test, "fake")) == set()


def test_every_kind_is_a_declared_marker_and_make_unit_deselects_it() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    unit = next(ln for ln in makefile.splitlines() if ln.startswith("UNIT_SKIP"))
    for kind in SLOW_KINDS:
        assert f'"{kind}: ' in pyproject, kind
        assert kind in unit.split(), kind


def test_make_unit_keeps_none_of_the_real_part_suites() -> None:
    """Collected as `make unit` selects, the suites of real parts leave nothing."""
    unit = next(ln for ln in (ROOT / "Makefile").read_text().splitlines()
                if ln.startswith("UNIT_SKIP")).split(":=", 1)[1].strip()
    suites = ["tests/test_real_upstream.py", "tests/test_browser.py", "tests/test_deploy_ssh.py",
              "tests/test_replicas_real.py", "tests/test_sharded_real.py",
              "tests/test_smollm.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                        "-m", f"not ({unit})", *suites], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert "::" not in r.stdout, r.stdout
    assert " deselected" in r.stdout, r.stdout + r.stderr
