"""CI checks what the README promises (issue 25, item 13): `.ci/run` is exactly the README's
test command, and that command runs the linters (`make lint`: ruff, mypy strict) before the
tests, so "ruff and mypy clean" stays true."""

from __future__ import annotations

import subprocess

from conftest import ROOT


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    commands = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert commands[-1] == "make test", commands
    readme = (ROOT / "README.md").read_text()
    assert "\nmake test " in readme and "CI runs `.ci/run`, which is `make test`" in readme


def test_make_test_lints_before_it_tests() -> None:
    """`make -n`: the commands `make test` would run, in order, without running them."""
    r = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()

    def first(word: str) -> int:
        found = [i for i, ln in enumerate(lines) if word in ln]
        assert found, f"`make test` does not run {word}:\n{r.stdout}"
        return found[0]

    assert first("ruff check .") < first("mypy maclustr") < first("-m pytest"), r.stdout
