"""The slow-kind markers `make unit` deselects come from what a test uses (tests/conftest.py),
so a new test that needs a real part is kept out of the fast loop without anyone marking it."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
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
    unit = makefile[makefile.index("UNIT_SKIP :="):].split("\nunit:")[0]
    for kind in SLOW_KINDS:
        assert f'"{kind}: ' in pyproject, kind
        assert kind in unit.replace("\\", " ").split(), kind


@pytest.mark.parametrize(("module", "kind"), [
    ("test_browser", "browser"), ("test_deploy_ssh", "deploy_ssh"),
    ("test_replicas_real", "real_upstream"), ("test_sharded_real", "real_upstream"),
])
def test_every_test_of_a_real_part_suite_is_marked(module: str, kind: str) -> None:
    mod = importlib.import_module(module)
    tests = [f for name, f in vars(mod).items() if name.startswith("test_") and callable(f)]
    assert tests
    # the module's own fixtures stand for the ones pytest would resolve
    fixtures = {name: [SimpleNamespace(func=f.__wrapped__)] for name, f in vars(mod).items()
                if type(f).__name__ == "FixtureFunctionDefinition"}
    for f in tests:
        it = item(f, *inspect.signature(f).parameters)
        it._fixtureinfo = SimpleNamespace(name2fixturedefs=fixtures)
        assert kind in slow_kinds(it), f.__name__


def test_a_recorded_deploy_is_marked() -> None:
    from test_deploy import test_dry_run_prints_every_command_and_runs_none as t

    assert slow_kinds(item(t, "tmp_path")) == {"deploy_recorded", "process"}
